//! The management tasks' decisions, as pure functions the freestanding
//! agent runs inside its MC VM (claim 14) and the host can test: no I/O,
//! no allocation; the agent keeps the state in guest memory, so a snapshot
//! (a move, a checkpoint) carries it.
//!
//! - `monitor`: status monitoring: each tick, every user VM's signals ->
//!   its health state and reason; changes are reported
//! - `log`: log management: user VMs' lines taken once, in order, into each
//!   VM's log, across moves and governor restarts
//! - `qos`: QoS flow-limit policy: measured rates, delays and the card's
//!   network use -> limit changes (narrow a noisy VM, restore it when calm)
#![cfg_attr(not(test), no_std)]

pub mod log;
pub mod monitor;
pub mod qos;
