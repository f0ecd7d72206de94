//! Measurements behind `cargo xtask bench card`. Prints one line per row:
//! `ROW<TAB>metric<TAB>value<TAB>peer<TAB>note`, which xtask turns into the
//! BENCHMARKS.md table. Needs card-sim (found as in `SimProcess`).
//! Diagnostics (e.g. a card that could not be cleaned up) go to stderr
//! through `tracing` (RUST_LOG, default warn).
//!
//! - floors, same run: an eventfd ping-pong between two processes (what a
//!   doorbell-and-interrupt path allows), and the two other doorbell
//!   options measured the same way (a futex on a shared word, a polled
//!   word); a plain vfio_user region read against a trivial server (the
//!   message path's floor); a 64 MiB memcpy (the streams' ceiling)
//! - register snapshot read + validate: mapped (ABI 1.3) and by message
//! - mailbox: echo round trip, mapped (futex doorbell) and by message
//! - snapshot streaming of a dense 64 MiB image, both ways, by DMA and by
//!   mailbox chunks
//!
//! Each goal of issue 13 is printed with `meets` or `MISSES`.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use card_link::card::LinkMode;
use card_link::mailbox::VmSpec;
use card_link::shm::SharedMem;
use card_link::{Card, CardOptions, Transport, VfioUserTransport};
use card_sim::device::{irqs, regions, remove_stale_socket};
use card_sim::{SimConfig, SimOptions, SimProcess};
use tracing_subscriber::EnvFilter;
use vfio_user::{Client, Server, ServerBackend};

const OPS: usize = 10_000;
/// Each stream is timed this many times, the best kept: the memory
/// bandwidth of this shared machine varies from one second to the next.
const STREAM_RUNS: usize = 5;

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

fn p50_99((a, b): (f64, f64)) -> String {
    format!("{a:.1} µs p50 / {b:.1} µs p99")
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "meets"
    } else {
        "MISSES"
    }
}

/// One side of a ping-pong between two processes.
#[derive(Clone, Copy)]
enum Pong {
    /// Blocking eventfds, one each way.
    Eventfd(i32, i32),
    /// A shared word: odd = ping, even = pong; sleep on it as a futex.
    Futex,
    /// The same word, polled.
    Poll,
}

/// Round trips between this process and a forked child, p50/p99 in µs.
/// Run before any thread exists (fork copies only the calling thread).
fn ping_pong(kind: Pong) -> Result<(f64, f64), String> {
    let word = SharedMem::create("card-bench-pingpong", 4096).map_err(|e| e.to_string())?;
    let w = word.word(0).map_err(|e| e.to_string())?;
    let rounds = OPS + 200;
    // SAFETY: no other thread exists yet (called first in `run`); the child
    // only touches its copy of `word`'s mapping and the fds, then _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        for i in 0..rounds as u32 {
            match kind {
                Pong::Eventfd(ping, pong) => {
                    let mut v = 0u64;
                    // SAFETY: reading and writing 8 bytes of our own u64 on inherited eventfds.
                    unsafe {
                        libc::read(ping, (&mut v as *mut u64).cast(), 8);
                        libc::write(pong, (&1u64 as *const u64).cast(), 8);
                    }
                }
                Pong::Futex | Pong::Poll => {
                    let ping = 2 * i + 1;
                    while w.load(std::sync::atomic::Ordering::Acquire) != ping {
                        if matches!(kind, Pong::Futex) {
                            let _ = word.futex_wait(0, 2 * i, Duration::from_millis(100));
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    w.store(ping + 1, std::sync::atomic::Ordering::Release);
                    if matches!(kind, Pong::Futex) {
                        let _ = word.futex_wake(0);
                    }
                }
            }
        }
        // SAFETY: leave the forked child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let mut i = 0u32;
    let r = time_ops(|_| {
        match kind {
            Pong::Eventfd(ping, pong) => {
                let mut v = 0u64;
                // SAFETY: as in the child.
                let ok = unsafe {
                    libc::write(ping, (&1u64 as *const u64).cast(), 8) == 8
                        && libc::read(pong, (&mut v as *mut u64).cast(), 8) == 8
                };
                if !ok {
                    return Err(format!("eventfd ping-pong: {}", std::io::Error::last_os_error()));
                }
            }
            Pong::Futex | Pong::Poll => {
                let ping = 2 * i + 1;
                w.store(ping, std::sync::atomic::Ordering::Release);
                if matches!(kind, Pong::Futex) {
                    word.futex_wake(0).map_err(|e| e.to_string())?;
                }
                while w.load(std::sync::atomic::Ordering::Acquire) != ping + 1 {
                    if matches!(kind, Pong::Futex) {
                        word.futex_wait(0, ping, Duration::from_millis(100)).map_err(|e| e.to_string())?;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        i += 1;
        Ok(())
    });
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    r
}

fn eventfd_ping_pong() -> Result<(f64, f64), String> {
    // SAFETY: eventfd(2) returns a new fd or -1.
    let (a, b) = unsafe { (libc::eventfd(0, libc::EFD_CLOEXEC), libc::eventfd(0, libc::EFD_CLOEXEC)) };
    if a < 0 || b < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    let r = ping_pong(Pong::Eventfd(a, b));
    // SAFETY: closing the two fds made above.
    unsafe {
        libc::close(a);
        libc::close(b);
    }
    r
}

/// Best of `STREAM_RUNS` copies of 64 MiB between two touched buffers, GiB/s.
fn memcpy_gib_s() -> f64 {
    let src = vec![0x5au8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    let mut best = 0.0f64;
    for _ in 0..STREAM_RUNS {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.max(64.0 / 1024.0 / t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    best
}

/// Echo round trips 1 ms apart (p50, p99 in µs): idle between commands,
/// both sides pay their wake-up path.
fn spaced_echoes(card: &mut Card) -> Result<(f64, f64), String> {
    let mut v = Vec::with_capacity(1000);
    for i in 0..1000u64 {
        std::thread::sleep(Duration::from_millis(1));
        let t = Instant::now();
        card.echo(i, b"8 bytes!").map_err(|e| e.to_string())?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok((percentile(&v, 0.50), percentile(&v, 0.99)))
}

fn open(sock: &Path, mode: LinkMode, opts: CardOptions) -> Result<Card, String> {
    let t = VfioUserTransport::connect(sock, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    Card::open_with(Box::new(t), opts, mode).map_err(|e| e.to_string())
}

fn run() -> Result<(), String> {
    // Forks first, while this process has one thread.
    let evfd = eventfd_ping_pong()?;
    let futex = ping_pong(Pong::Futex)?;
    let poll = ping_pong(Pong::Poll)?;
    let floor_s = p50_99(evfd);
    row(
        "floor: eventfd ping-pong between two processes",
        floor_s.clone(),
        String::new(),
        "10,000 round trips; a write and a blocking read each way",
    );
    row(
        "doorbell option: futex on a shared word",
        p50_99(futex),
        floor_s.clone(),
        "10,000 round trips between two processes; wake + wait each way",
    );
    row("doorbell option: polled shared word", p50_99(poll), floor_s.clone(), "10,000 round trips between two processes, both spinning (the card-sim doorbell polls while busy, sleeps on the futex after 100 µs idle)");
    let (f50, f99) = floor()?;
    let msg_floor = format!("{f50:.1} µs p50 / {f99:.1} µs p99");
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
        "register read by message, 4 B (card-sim)",
        format!("{r50:.1} µs p50 / {r99:.1} µs p99"),
        format!("vfio_user floor {msg_floor}"),
        "10,000 reads; raw BAR0 word over the socket",
    );
    drop(t);

    let mut card = open(sock, LinkMode::Auto, CardOptions::default())?;
    let mapped_info = card.transport_info().to_string();
    let snap = time_ops(|_| card.registers().map(|_| ()).map_err(|e| e.to_string()))?;
    let mbox = time_ops(|i| card.echo(i as u64, b"8 bytes!").map(|_| ()).map_err(|e| e.to_string()))?;
    let idle = spaced_echoes(&mut card)?;
    // The card serves one host at a time.
    drop(card);
    let mut msg = open(sock, LinkMode::Messages, CardOptions::default())?;
    let msg_snap = time_ops(|_| msg.registers().map(|_| ()).map_err(|e| e.to_string()))?;
    let msg_mbox = time_ops(|i| msg.echo(i as u64, b"8 bytes!").map(|_| ()).map_err(|e| e.to_string()))?;
    let msg_idle = spaced_echoes(&mut msg)?;
    row(
        "register snapshot read + validate, 512 B, mapped",
        p50_99(snap),
        format!("by message {}", p50_99(msg_snap)),
        &format!(
            "10,000 reads under the sequence word; magic, ABI, CRC, ranges checked; {:.0}x faster; goal <= 5 µs p50: {}",
            msg_snap.0 / snap.0.max(1e-3),
            verdict(snap.0 <= 5.0)
        ),
    );
    row(
        "mailbox round trip (echo), mapped, futex doorbell",
        p50_99(mbox),
        format!("eventfd floor {floor_s}"),
        &format!(
            "10,000 commands; {:.2}x the floor p50; by message {} ({:.0}x slower); goal <= 20 µs p50: {}, <= 60 µs p99: {}",
            mbox.0 / evfd.0.max(1e-3),
            p50_99(msg_mbox),
            msg_mbox.0 / mbox.0.max(1e-3),
            verdict(mbox.0 <= 20.0),
            verdict(mbox.1 <= 60.0)
        ),
    );
    drop(msg);
    row(
        "mailbox round trip (echo), mapped, card asleep",
        p50_99(idle),
        format!("eventfd floor {floor_s}"),
        &format!(
            "1,000 commands 1 ms apart: the card sleeps on its futex between them (futex wake + completion eventfd); by message, same spacing: {}",
            p50_99(msg_idle)
        ),
    );
    let mut card = open(sock, LinkMode::Auto, CardOptions::default())?;

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

    streams(is_root)?;
    eprintln!("card-bench: mapped link: {mapped_info}");
    Ok(())
}

/// Streaming throughput needs a dense image: a modelled VM whose 64 MiB
/// are all touched, on a fresh card.
fn streams(is_root: bool) -> Result<(), String> {
    let e = |e: card_link::CardError| e.to_string();
    let ceiling = memcpy_gib_s();
    let sim = SimProcess::spawn(&SimOptions { cgroup: is_root, ..Default::default() }).map_err(|e| e.to_string())?;
    for mode in [LinkMode::Auto, LinkMode::Messages] {
        let mut card = open(sim.socket_path(), mode, CardOptions::default())?;
        let spec = VmSpec { name: format!("bench-dense-{mode:?}"), mem_mib: 64, vcpus: 1 };
        let vm = card.start_vm(&spec).map_err(e)?;
        let info = card.snapshot_vm(vm).map_err(e)?;
        let mib = info.size as f64 / (1 << 20) as f64;
        let mut image = Vec::with_capacity(info.size as usize);
        let (mut best_out, mut stats) = (0.0f64, None);
        for _ in 0..STREAM_RUNS {
            image.clear();
            card.read_snapshot_into(vm, &info, &mut image).map_err(e)?;
            let s = card.last_stream().cloned().ok_or("no stream stats")?;
            if s.gib_per_s() > best_out {
                best_out = s.gib_per_s();
                stats = Some(s);
            }
        }
        let s = stats.ok_or("no stream")?;
        // The same stream into any `Write` (a private staging chunk first).
        let mut generic = 0.0f64;
        for _ in 0..STREAM_RUNS {
            image.clear();
            card.read_snapshot(vm, &info, &mut image).map_err(e)?;
            generic = generic.max(card.last_stream().map(|s| s.gib_per_s()).unwrap_or(0.0));
        }
        let how = if s.dma { "DMA" } else { "mailbox" };
        let chunks = format!("{mib:.0} MiB dense image, {} KiB {how} chunks, CRC checked", s.chunk >> 10);
        let goal = |g: f64| {
            if s.dma {
                format!("; {:.0}% of memcpy; goal >= 4 GiB/s: {}", 100.0 * g / ceiling, verdict(g >= 4.0))
            } else {
                String::new()
            }
        };
        row(
            &format!("snapshot stream card -> host, {how}"),
            format!("{best_out:.2} GiB/s"),
            format!("memcpy 64 MiB {ceiling:.2} GiB/s"),
            &format!(
                "{chunks}; best of {STREAM_RUNS}, into a Vec (`read_snapshot_into`); into any writer {generic:.2} GiB/s{}",
                goal(best_out)
            ),
        );
        card.stop_vm(vm).map_err(e)?;
        let mut best_in = 0.0f64;
        let mut total = Duration::MAX;
        for i in 0..STREAM_RUNS {
            let spec = VmSpec { name: format!("bench-in-{i}"), mem_mib: 64, vcpus: 1 };
            let t0 = Instant::now();
            let vm2 = card.restore_vm(&spec, image.len() as u64, &mut image.as_slice()).map_err(e)?;
            total = total.min(t0.elapsed());
            best_in = best_in.max(card.last_stream().map(|s| s.gib_per_s()).unwrap_or(0.0));
            card.stop_vm(vm2).map_err(e)?;
        }
        row(
            &format!("snapshot stream host -> card, {how}"),
            format!("{best_in:.2} GiB/s"),
            format!("memcpy 64 MiB {ceiling:.2} GiB/s"),
            &format!(
                "{chunks}; best of {STREAM_RUNS}; data phase (with begin + commit + restore: {:.1} ms){}",
                total.as_secs_f64() * 1e3,
                goal(best_in)
            ),
        );
    }
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
