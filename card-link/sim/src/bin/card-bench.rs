//! Measurements behind `cargo xtask bench card`. Prints one line per row:
//! `ROW<TAB>metric<TAB>value<TAB>peer<TAB>note`, which xtask turns into the
//! BENCHMARKS.md table. Needs card-sim (found as in `SimProcess`).
//! Diagnostics (e.g. a card that could not be cleaned up) go to stderr
//! through `tracing` (RUST_LOG, default warn).
//!
//! - floor: a plain vfio_user region read (4 bytes) against a trivial
//!   in-process vfio_user server, measured in the same run
//! - register read: the full BAR0 snapshot (512 B) read and validated
//! - mailbox: echo command round trip (slot write, doorbell, eventfd, slot read)
//! - snapshot streaming: card -> host and host -> card, MiB/s

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use card_link::mailbox::VmSpec;
use card_link::{CardOptions, Transport, VfioUserTransport};
use card_sim::device::{irqs, regions, remove_stale_socket};
use card_sim::{SimConfig, SimOptions, SimProcess};
use tracing_subscriber::EnvFilter;
use vfio_user::{Client, Server, ServerBackend};

const OPS: usize = 10_000;

struct Nothing;

impl ServerBackend for Nothing {
    fn region_read(&mut self, _: u32, _: u64, data: &mut [u8]) -> std::io::Result<()> {
        data.fill(0);
        Ok(())
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn dma_map(&mut self, _: vfio_user::DmaMapFlags, _: u64, _: u64, _: u64, _: Option<File>) -> std::io::Result<()> {
        Ok(())
    }
    fn dma_unmap(&mut self, _: vfio_user::DmaUnmapFlags, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: Vec<File>) -> std::io::Result<()> {
        Ok(())
    }
}

/// The nearest-rank percentile `q` (0..=1) of samples sorted ascending, 0
/// for none: the one percentile of card-sim's measurements, defined as
/// xtask's `stats::percentile` is, so both kinds of rows read alike.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize],
    }
}

fn time_ops(mut f: impl FnMut(usize) -> Result<(), String>) -> Result<(f64, f64), String> {
    for i in 0..200 {
        f(i)?; // warm-up
    }
    let mut v = Vec::with_capacity(OPS);
    for i in 0..OPS {
        let t = Instant::now();
        f(i)?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok((percentile(&v, 0.50), percentile(&v, 0.99)))
}

fn ms(since: Instant) -> String {
    format!("{:.1} ms", since.elapsed().as_secs_f64() * 1e3)
}

fn row(metric: &str, value: String, peer: String, note: &str) {
    println!("ROW\t{metric}\t{value}\t{peer}\t{note}");
}

fn floor() -> Result<(f64, f64), String> {
    let path = std::env::temp_dir().join(format!("card-bench-floor-{}.sock", std::process::id()));
    remove_stale_socket(&path);
    let cfg = SimConfig::new(path.clone());
    let server = Server::new(&path, false, irqs(), regions(&cfg, None)).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        // It serves one connection, ours; that connection ending (when the
        // process exits) is how it stops, so its error says nothing.
        let _ = server.run(&mut Nothing);
    });
    let mut c = Client::new(&path).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    let r = time_ops(|_| c.region_read(0, 0, &mut buf).map_err(|e| e.to_string()));
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!("could not remove the floor server's socket {}: {e}", path.display());
    }
    r
}

fn main() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = run() {
        eprintln!("card-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let (f50, f99) = floor()?;
    let floor_s = format!("{f50:.1} µs p50 / {f99:.1} µs p99");
    let is_root = unsafe { libc::geteuid() } == 0;
    // Management VMs are real KVM guests when the agent ELF is given.
    let guest = std::env::var_os("VMM_GUEST_ELF").map(std::path::PathBuf::from).filter(|p| p.is_file());
    let backend = if guest.is_some() { "vmm KVM guest" } else { "modelled VM (no VMM_GUEST_ELF)" };
    let sim =
        SimProcess::spawn(&SimOptions { cgroup: is_root, guest, ..Default::default() }).map_err(|e| e.to_string())?;
    let sock: &Path = sim.socket_path();

    let mut t = VfioUserTransport::connect(sock, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    let mut w = [0u8; 4];
    let (r50, r99) = time_ops(|_| t.read(0, 0, &mut w).map_err(|e| e.to_string()))?;
    row(
        "register read, 4 B (card-sim)",
        format!("{r50:.1} µs p50 / {r99:.1} µs p99"),
        floor_s.clone(),
        "10,000 reads; raw BAR0 word",
    );
    drop(t);

    let mut card = card_link::connect_vfio_user(sock, Duration::from_secs(1), CardOptions::default())
        .map_err(|e| e.to_string())?;
    let (s50, s99) = time_ops(|_| card.registers().map(|_| ()).map_err(|e| e.to_string()))?;
    row(
        "register snapshot read + validate, 512 B",
        format!("{s50:.1} µs p50 / {s99:.1} µs p99"),
        floor_s.clone(),
        "10,000 reads; magic, ABI, CRC, ranges checked",
    );
    let (m50, m99) = time_ops(|i| card.echo(i as u64, b"8 bytes!").map(|_| ()).map_err(|e| e.to_string()))?;
    row(
        "mailbox command round trip (echo, fused doorbell)",
        format!("{m50:.1} µs p50 / {m99:.1} µs p99"),
        floor_s.clone(),
        "10,000 commands; slot write that rings (ABI 1.1) + eventfd + slot read",
    );
    drop(card);
    let classic = CardOptions { classic_doorbell: true, ..CardOptions::default() };
    let mut card = card_link::connect_vfio_user(sock, Duration::from_secs(1), classic).map_err(|e| e.to_string())?;
    let (c50, c99) = time_ops(|i| card.echo(i as u64, b"8 bytes!").map(|_| ()).map_err(|e| e.to_string()))?;
    row(
        "mailbox command round trip (echo, doorbell register)",
        format!("{c50:.1} µs p50 / {c99:.1} µs p99"),
        floor_s.clone(),
        "10,000 commands; slot write + doorbell write + eventfd + slot read",
    );

    // The management VM life cycle on this card (a vmm KVM guest when the
    // agent ELF is given: its snapshot stream skips untouched RAM).
    let e = |e: card_link::CardError| e.to_string();
    let spec = VmSpec { name: "bench-vm".into(), mem_mib: 64, vcpus: 1 };
    let t0 = Instant::now();
    let vm = card.start_vm(&spec).map_err(e)?;
    row("start VM on the card, to agent ready", ms(t0), String::new(), backend);
    let t0 = Instant::now();
    let info = card.snapshot_vm(vm).map_err(e)?;
    let mut image = Vec::with_capacity(info.size as usize);
    card.read_snapshot(vm, &info, &mut image).map_err(e)?;
    let note = format!("{} KiB image of a {backend} with 64 MiB RAM", info.size >> 10);
    row("snapshot on the card + stream to host", ms(t0), String::new(), &note);
    card.stop_vm(vm).map_err(e)?;
    let t0 = Instant::now();
    let spec2 = VmSpec { name: "bench-restored".into(), mem_mib: 64, vcpus: 1 };
    let vm2 = card.restore_vm(&spec2, image.len() as u64, &mut image.as_slice()).map_err(e)?;
    row("stream to the card + restore + resume", ms(t0), String::new(), &note);
    card.stop_vm(vm2).map_err(e)?;
    drop(card);
    drop(sim);

    // Streaming throughput needs a dense image: a modelled VM whose 64 MiB
    // are all touched, on a fresh card.
    let sim = SimProcess::spawn(&SimOptions { cgroup: is_root, ..Default::default() }).map_err(|e| e.to_string())?;
    let mut card =
        card_link::connect_vfio_user(sim.socket_path(), Duration::from_secs(1), CardOptions::default()).map_err(e)?;
    let vm = card.start_vm(&spec).map_err(e)?;
    let info = card.snapshot_vm(vm).map_err(e)?;
    let mib = info.size as f64 / (1 << 20) as f64;
    let mut best_out = 0.0f64;
    for _ in 0..3 {
        image.clear();
        let t0 = Instant::now();
        card.read_snapshot(vm, &info, &mut image).map_err(e)?;
        best_out = best_out.max(mib / t0.elapsed().as_secs_f64());
    }
    let chunks = format!("{:.0} MiB dense image, {} KiB chunks, CRC checked", mib, card.max_payload() >> 10);
    row("snapshot stream card -> host", format!("{best_out:.0} MiB/s"), String::new(), &format!("{chunks}; best of 3"));
    card.stop_vm(vm).map_err(e)?;
    let t0 = Instant::now();
    let vm2 = card.restore_vm(&spec2, image.len() as u64, &mut image.as_slice()).map_err(e)?;
    let rate_in = mib / t0.elapsed().as_secs_f64();
    row(
        "snapshot stream host -> card",
        format!("{rate_in:.0} MiB/s"),
        String::new(),
        &format!("{chunks}; includes the restore"),
    );
    card.stop_vm(vm2).map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }
}
