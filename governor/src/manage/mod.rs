//! Management done by the management VMs (claim 14): the governor is the
//! plumbing. Each tick it turns its telemetry of every user VM into the
//! signals protocol 2 carries (`signals.rs`), the placement thread hands
//! them to the monitor MC VM wherever it runs, and the health the agent
//! decides comes back into a board the status shows (`board.rs`). While the
//! monitor VM cannot answer (paused, moving, its card dead) the last states
//! stay and the board says management is degraded: fail static. The log
//! VM numbers every user VM's log lines (`logs.rs`); the qos VM decides
//! limit changes the governor applies (`qos.rs`).

pub mod board;
pub mod logs;
pub mod qos;
pub mod signals;
