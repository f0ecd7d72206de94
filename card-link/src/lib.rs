//! The host's view of the management-and-control board card (issue 5 builds it out).
