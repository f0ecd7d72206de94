//! The host's view of the management-and-control board card as a PCI function.
//!
//! - `abi`: the versioned register layout of BAR0 (identity, heartbeat, telemetry)
//! - `mailbox`: the BAR2 command mailbox wire format and its decoders
//! - `costs`: the card's measured cost of each VM (ABI 1.2) and per-VM rates
//! - `shm`: memory shared with the card (mapped BARs, DMA buffers, ABI 1.3)
//! - `transport`: one trait, two transports (vfio-user, kernel VFIO)
//! - `card`: the host driver on top of any transport (commands, snapshots, health)
//! - `watchdog`: a thread reporting a stalled, silent or dead card (see `Card::check_health` for how soon)
//!
//! Everything read from the card is validated; errors are `CardError`. The
//! card simulator is its own crate (`card-sim`, in `sim/`): it depends on
//! this one for the ABI, never the other way round.

pub mod abi;
pub mod card;
pub mod costs;
pub mod error;
pub mod mailbox;
pub mod shm;
pub mod transport;
mod vms;
pub mod watchdog;
mod wire;

pub use card::{Access, Card, CardOptions, HealthReport, LinkMode, SnapshotInfo, StreamStats, TransportInfo};
pub use costs::{CostSource, VmCost, VmCosts, VmUtilisation};
pub use error::{CardError, Result};
pub use transport::kernel_vfio::{KernelVfioTransport, PciAddress};
pub use transport::vfio_user::VfioUserTransport;
pub use transport::Transport;
pub use watchdog::{Verdict, Watchdog};

/// Connect to a card-sim (or any vfio-user card) at `socket`.
pub fn connect_vfio_user(
    socket: &std::path::Path,
    link_timeout: std::time::Duration,
    opts: CardOptions,
) -> Result<Card> {
    let t = VfioUserTransport::connect(socket, link_timeout)?;
    Card::open(Box::new(t), opts)
}
