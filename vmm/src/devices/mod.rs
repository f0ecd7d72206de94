//! The devices of a management VM. There are two, both handled
//! synchronously on the vCPU thread by [`crate::vm`]'s bus: an output-only
//! serial port and the virtio-mmio control channel. Their state lives in
//! plain structs so it is easy to snapshot (and, later, to put vhost-user
//! front ends beside them).

pub mod serial;
pub mod virtio;
