//! Embedded KVM VMM for the management VMs (issue 4 builds it out).
