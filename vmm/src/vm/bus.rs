//! The I/O bus of a management VM: every port and MMIO exit of the vCPU is
//! dispatched here, synchronously on the vCPU thread, to the serial port
//! (0x3f8..0x3ff), the idle and exit ports, or the virtio-mmio control
//! channel. Writes to absent ports are dropped as on hardware; any MMIO
//! outside the virtio window stops the VM with a typed reason.

use std::sync::atomic::Ordering;
use std::time::Instant;

use kvm_ioctls::VcpuExit;

use super::shared::{lock, Shared};
use crate::error::StopReason;
use crate::proto;

/// What the run loop does after an exit.
pub(super) enum Next {
    Continue,
    /// The agent has nothing to do: park until a request or a timeout.
    Idle,
    Stop(StopReason),
}

fn is_serial(port: u16) -> bool {
    (proto::SERIAL_PORT..proto::SERIAL_PORT + 8).contains(&port)
}

fn is_virtio(addr: u64) -> bool {
    (proto::VIRTIO_MMIO_BASE..proto::VIRTIO_MMIO_BASE + proto::VIRTIO_MMIO_SIZE).contains(&addr)
}

pub(super) fn handle_exit(sh: &Shared, exit: VcpuExit<'_>) -> Next {
    let counter = match &exit {
        VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => Some(&sh.exits.pio),
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => Some(&sh.exits.mmio),
        VcpuExit::Intr => Some(&sh.exits.interrupted),
        _ => None,
    };
    if let Some(c) = counter {
        c.fetch_add(1, Ordering::Relaxed);
    }
    match exit {
        VcpuExit::IoOut(port, data) => port_write(sh, port, data.first().copied().unwrap_or(0)),
        VcpuExit::IoIn(port, data) => {
            let v = if is_serial(port) { lock(&sh.dev).serial.read(port - proto::SERIAL_PORT) } else { 0xff };
            data.fill(v);
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !is_virtio(addr) {
                return Next::Stop(StopReason::UnknownMmio { addr, kind: format!("read of {} bytes", data.len()) });
            }
            match lock(&sh.dev).console.read(addr - proto::VIRTIO_MMIO_BASE, data) {
                Ok(()) => Next::Continue,
                Err(e) => Next::Stop(StopReason::Device(e.to_string())),
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !is_virtio(addr) {
                return Next::Stop(StopReason::UnknownMmio { addr, kind: format!("write of {} bytes", data.len()) });
            }
            virtio_write(sh, addr, data)
        }
        VcpuExit::Hlt => Next::Stop(StopReason::Halted),
        VcpuExit::Shutdown => Next::Stop(StopReason::TripleFault { rip: 0 }),
        VcpuExit::FailEntry(reason, _) => Next::Stop(StopReason::FailEntry(reason)),
        VcpuExit::InternalError => Next::Stop(StopReason::InternalError(0)),
        VcpuExit::Intr => Next::Continue,
        other => Next::Stop(StopReason::UnexpectedExit(format!("{other:?}"))),
    }
}

fn port_write(sh: &Shared, port: u16, byte: u8) -> Next {
    match port {
        p if is_serial(p) => {
            let line = lock(&sh.dev).serial.write(p - proto::SERIAL_PORT, byte);
            if line.as_deref() == Some(proto::BANNER) {
                let mut ctl = lock(&sh.ctl);
                ctl.ready_at.get_or_insert_with(Instant::now);
                sh.cv.notify_all();
            }
            Next::Continue
        }
        proto::IDLE_PORT => Next::Idle,
        proto::EXIT_PORT => Next::Stop(StopReason::GuestExit(byte)),
        _ => Next::Continue, // writes to absent ISA ports are dropped, as on hardware
    }
}

/// A register write in the virtio window. A notify of the transmit queue
/// hands the guest's frames over in this same exit; a notify of the
/// receive queue means the guest offered buffers, so pending requests move.
fn virtio_write(sh: &Shared, addr: u64, data: &[u8]) -> Next {
    let mut dev = lock(&sh.dev);
    let frames = match dev.console.write(&sh.mem, addr - proto::VIRTIO_MMIO_BASE, data) {
        Ok(Some(q)) if q == proto::TX_QUEUE => dev.console.pop_frames(&sh.mem),
        Ok(Some(_)) => dev.console.push_request(&sh.mem, None).map(|_| Vec::new()),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(e),
    };
    drop(dev);
    match frames {
        Ok(f) => {
            sh.deliver(f);
            Next::Continue
        }
        Err(e) => Next::Stop(StopReason::Device(e.to_string())),
    }
}
