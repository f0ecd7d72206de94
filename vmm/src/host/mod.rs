//! What a host-side caller (the governor, the card simulator, the tests)
//! needs to run VMs in their own `vmm` processes: the control protocol's
//! types ([`api`], with the management tasks' records in [`records`]), its client ([`client`]) and spawning a process
//! ([`process`]). The server side of the protocol is the `vmm` binary.

pub mod api;
pub mod client;
pub mod process;
pub mod records;
