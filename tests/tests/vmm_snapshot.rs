//! Snapshot a paused VM, kill its process, restore in a new process: the
//! agent's work counter continues and no log sequence number is lost or
//! repeated. Also: the stream form of the format, and refusal of bad input.

mod vmm_support;

use std::time::Duration;

use serde_json::{json, Value};
use vmm::host::api::AgentOp;
use vmm::proto::op;
use vmm::{Error, RunState, Sinks, SnapshotError, Vm, VmConfig};
use vmm_support::*;

const T: Duration = Duration::from_secs(10);

/// Sequence numbers of the JSON-lines log a vmm process wrote.
fn log_seqs(path: &std::path::Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}"));
            v["seq"].as_u64().unwrap_or_else(|| panic!("log line without seq: {l}"))
        })
        .collect()
}

fn assert_contiguous(seqs: &[u64], first: u64, what: &str) {
    assert!(!seqs.is_empty(), "{what}: no log records");
    assert_eq!(seqs[0], first, "{what}: first sequence number");
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: sequence jumps from {} to {}", w[0], w[1]);
    }
}

#[test]
fn snapshot_kill_restore_in_new_process_continues() {
    require_kvm();
    let elf = guest_elf();
    let snap = TempPath::new("vmm-test.snap");
    let (log_a, log_b) = (TempPath::new("vmm-test-a.log"), TempPath::new("vmm-test-b.log"));

    let mut a = VmmProc::spawn(&[
        "--guest",
        elf.to_str().expect("utf-8"),
        "--mem-mib",
        "64",
        "--log",
        log_a.0.to_str().expect("utf-8"),
    ]);
    a.request(AgentOp::Auto, 20_000);
    let deadline = std::time::Instant::now() + T;
    while a.call(json!({"cmd": "state"}))["logs"].as_u64().unwrap_or(0) < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    a.call(json!({"cmd": "pause"}));
    let before = a.call(json!({"cmd": "state"}));
    let seq_a = before["last_log"]["log_seq"].as_u64().expect("a log record before the snapshot");
    let work_a = before["last_log"]["work"].as_u64().expect("work counter");
    let s = a.call(json!({"cmd": "snapshot", "path": snap.0}));
    assert!(s["bytes"].as_u64().expect("bytes") >= 64 << 20);
    a.kill(); // SIGKILL: nothing of process A survives but the file

    let mut b =
        VmmProc::spawn(&["--restore", snap.0.to_str().expect("utf-8"), "--log", log_b.0.to_str().expect("utf-8")]);
    // Let B make progress (bounded wait; a loaded machine may be slow).
    let deadline = std::time::Instant::now() + T;
    while b.call(json!({"cmd": "state"}))["logs"].as_u64().unwrap_or(0) < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = b.request(AgentOp::Auto, 0);
    let c = b.request(AgentOp::Counters, 0);
    b.call(json!({"cmd": "shutdown"}));

    let (sa, sb) = (log_seqs(&log_a.0), log_seqs(&log_b.0));
    assert_contiguous(&sa, 1, "process A");
    assert_eq!(*sa.last().expect("nonempty"), seq_a, "A logged up to the paused state");
    assert_contiguous(&sb, seq_a + 1, "process B continues where A stopped");
    assert!(r.work > work_a, "work counter continued: {r:?} vs {work_a}");
    assert_eq!(Some(c.log_seq), sb.last().copied(), "agent's counter matches the last record");
    // The request counter is guest state too: A served 1 request, B 2 more.
    assert_eq!(c.requests, 3);
}

#[test]
fn snapshot_stream_round_trip_in_process() {
    require_kvm();
    let vm = Vm::create(&VmConfig::new(guest_elf(), 64), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    for _ in 0..10 {
        vm.request(op::STEP, 100, T).expect("step");
    }
    vm.request(op::TOUCH, 256, T).expect("touch 1 MiB");
    vm.pause().expect("pause");
    let mut buf = Vec::new();
    let n = vm.snapshot_to(&mut buf).expect("snapshot to a stream");
    assert_eq!(n as usize, buf.len());
    assert_eq!(&buf[..8], b"MCVMSNAP");
    // Sparse: the touched MiB and the agent's pages, not 64 MiB.
    assert!(buf.len() > 1 << 20 && buf.len() < 2 << 20, "stream is {} bytes", buf.len());
    vm.shutdown();

    let vm2 = Vm::restore_from(buf.as_slice(), Sinks::default()).expect("restore from the stream");
    assert_eq!(vm2.state(), RunState::Paused);
    vm2.resume().expect("resume");
    let r = vm2.request(op::STEP, 100, T).expect("step after restore");
    assert_eq!((r.work, r.log_seq), (1100, 11));
    let sum = vm2.request(op::CHECKSUM, 256, T).expect("checksum");
    assert_eq!(sum.value, 256 * 255 / 2, "touched pages came through the stream");
}

#[test]
fn bad_snapshots_are_refused_with_typed_errors() {
    require_kvm();
    let vm = Vm::create(&VmConfig::new(guest_elf(), 16), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    assert!(
        matches!(vm.snapshot_to(Vec::new()), Err(Error::State { state: RunState::Running, .. })),
        "running VMs are not snapshotted"
    );
    vm.pause().expect("pause");
    let mut good = Vec::new();
    vm.snapshot_to(&mut good).expect("snapshot");
    vm.shutdown();

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut bad_version = good.clone();
    bad_version[8] = 99;
    let truncated = &good[..good.len() / 2];
    let mut bad_json = good.clone();
    bad_json[64] = b'#';
    let refused = |bytes: &[u8]| match Vm::restore_from(bytes, Sinks::default()) {
        Err(e) => e,
        Ok(_) => panic!("a corrupt snapshot was accepted"),
    };
    let e = refused(&bad_magic);
    assert!(matches!(e, Error::Snapshot(SnapshotError::BadMagic)), "magic: {e}");
    let e = refused(&bad_version);
    assert!(matches!(e, Error::Snapshot(SnapshotError::Version { found: 99, .. })), "version: {e}");
    let e = refused(truncated);
    assert!(
        matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof),
        "truncated: {e}"
    );
    let e = refused(&bad_json);
    assert!(matches!(e, Error::Snapshot(SnapshotError::State(_))), "state: {e}");
}

/// Drop a file's pages from the page cache, so a later mapping of it really
/// has non-resident pages (the case a naive mincore-based writer gets wrong).
fn evict(path: &std::path::Path) {
    let f = std::fs::File::open(path).expect("open snapshot");
    f.sync_all().expect("fsync");
    use std::os::unix::io::AsRawFd;
    // SAFETY: advisory call on a descriptor we own.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

#[test]
fn snapshot_of_a_restored_vm_keeps_pages_it_never_touched() {
    require_kvm();
    const PAGES: u64 = 512; // 2 MiB of scratch
    let (a, b) = (TempPath::new("vmm-test-a.snap"), TempPath::new("vmm-test-b.snap"));
    let vm = Vm::create(&VmConfig::new(guest_elf(), 64), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    vm.request(op::TOUCH, PAGES, T).expect("touch");
    vm.request(op::STEP, 10, T).expect("step");
    vm.pause().expect("pause");
    vm.snapshot_to_file(&a.0).expect("snapshot A");
    vm.shutdown();
    evict(&a.0);

    // Restore A, do unrelated work, snapshot again without touching scratch.
    let vm2 = Vm::restore_from_file(&a.0, Sinks::default()).expect("restore A");
    vm2.resume().expect("resume");
    vm2.request(op::STEP, 10, T).expect("step");
    vm2.pause().expect("pause");
    // Readahead pulled neighbours of the pages vm2 used into the page cache;
    // drop the unmapped ones again, as memory pressure would.
    evict(&a.0);
    vm2.snapshot_to_file(&b.0).expect("snapshot B");
    vm2.shutdown();

    let vm3 = Vm::restore_from_file(&b.0, Sinks::default()).expect("restore B");
    vm3.resume().expect("resume");
    let sum = vm3.request(op::CHECKSUM, PAGES, T).expect("checksum");
    assert_eq!(sum.value, PAGES * (PAGES - 1) / 2, "scratch pages survived two snapshot generations");
    let c = vm3.request(op::COUNTERS, 0, T).expect("counters");
    assert_eq!((c.work, c.log_seq), (20, 2));
}

#[test]
fn diff_snapshots_from_the_dirty_log_restore_as_a_chain() {
    require_kvm();
    let (a, b, c) =
        (TempPath::new("vmm-test-base.snap"), TempPath::new("vmm-test-d1.snap"), TempPath::new("vmm-test-d2.snap"));
    let vm = Vm::create(&VmConfig::new(guest_elf(), 64), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    vm.pause().expect("pause");
    assert!(matches!(vm.snapshot_diff_to(Vec::new()), Err(Error::NoBase)), "a diff needs a base");
    vm.resume().expect("resume");

    vm.request(op::TOUCH, 256, T).expect("touch");
    vm.request(op::STEP, 10, T).expect("step");
    vm.pause().expect("pause");
    vm.snapshot_to_file(&a.0).expect("base");

    vm.resume().expect("resume");
    vm.request(op::TOUCH, 512, T).expect("touch more");
    vm.request(op::STEP, 10, T).expect("step");
    vm.pause().expect("pause");
    let d1 = vm.snapshot_diff_to_file(&b.0).expect("diff 1");

    vm.resume().expect("resume");
    let last = vm.request(op::STEP, 10, T).expect("step");
    vm.pause().expect("pause");
    let d2 = vm.snapshot_diff_to_file(&c.0).expect("diff 2");
    vm.shutdown();

    // Diff 1 carries the 1 MiB of newly touched pages and little else;
    // diff 2 only the pages a step and its log record touch.
    assert!(d1 > 1 << 20 && d1 < 3 << 20, "diff 1 is {d1} bytes");
    assert!(d2 < 256 << 10, "diff 2 is {d2} bytes");
    assert!(
        matches!(Vm::restore_from_file(&b.0, Sinks::default()), Err(Error::Snapshot(SnapshotError::DiffWithoutBase))),
        "a diff alone is refused"
    );

    let chain = [b.0.clone(), c.0.clone()];
    let vm2 = Vm::restore_chain_files(&a.0, &chain, Sinks::default()).expect("restore the chain");
    vm2.resume().expect("resume");
    let now = vm2.request(op::COUNTERS, 0, T).expect("counters");
    assert_eq!((now.work, now.log_seq, now.steps), (last.work, last.log_seq, last.steps));
    let sum = vm2.request(op::CHECKSUM, 512, T).expect("checksum");
    assert_eq!(sum.value, 512 * 511 / 2, "pages touched after the base came from diff 1");
    vm2.shutdown();

    // The same chain as streams.
    let open = |p: &std::path::Path| std::fs::File::open(p).expect("open");
    let vm3 = Vm::restore_chain(open(&a.0), [open(&b.0), open(&c.0)], Sinks::default()).expect("chain from streams");
    vm3.resume().expect("resume");
    assert_eq!(vm3.request(op::COUNTERS, 0, T).expect("counters").work, last.work);
}

/// Pre-copy: a base taken while the guest runs (and writes memory all the
/// while), then at the pause only a diff; a VM restored from the base and
/// given the diff equals the source at its pause, counters and memory.
#[test]
fn pre_copy_base_while_running_plus_diff_at_the_pause_restores_exactly() {
    require_kvm();
    let vm = Vm::create(&VmConfig::new(guest_elf(), 64), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    vm.request(op::TOUCH, 4096, T).expect("touch 16 MiB");
    // Steps run autonomously: state and log pages change during the copy.
    vm.request(op::AUTO, 50, T).expect("auto");
    let mut base = Vec::new();
    let n = vm.snapshot_live_to(&mut base).expect("live base");
    assert_eq!(vm.state(), RunState::Running, "the base does not stop the guest");
    assert!(n > 16 << 20, "the base carries the 16 MiB touched: {n}");
    vm.request(op::TOUCH, 1024, T).expect("dirty 4 MiB again");
    // A pre-copy round while it runs: what it wrote during the base.
    let mut round = Vec::new();
    let r = vm.snapshot_diff_live_to(&mut round).expect("live round");
    assert_eq!(vm.state(), RunState::Running, "a round does not stop the guest");
    assert!(r < n / 2, "the round ({r}) is what changed, not the base ({n})");
    vm.request(op::TOUCH, 1 | 2000 << 32, T).expect("dirty one more page after the round");
    vm.request(op::AUTO, 0, T).expect("stop stepping");
    let at_pause = vm.request(op::COUNTERS, 0, T).expect("counters");
    vm.pause().expect("pause");
    let mut diff = Vec::new();
    let d = vm.snapshot_diff_to(&mut diff).expect("diff");
    vm.shutdown();
    assert!(d < r, "the last diff ({d}) is smaller than the round ({r})");

    let vm2 = Vm::restore_from(base.as_slice(), Sinks::default()).expect("restore the base");
    vm2.apply_diff_from(round.as_slice()).expect("apply the round");
    vm2.apply_diff_from(diff.as_slice()).expect("apply the diff");
    vm2.resume().expect("resume");
    let c = vm2.request(op::COUNTERS, 0, T).expect("counters");
    assert!(at_pause.steps > 0, "the agent stepped during the base");
    assert_eq!((c.work, c.log_seq, c.steps), (at_pause.work, at_pause.log_seq, at_pause.steps), "exactly the source");
    let sum = vm2.request(op::CHECKSUM, 4096, T).expect("checksum");
    assert_eq!(sum.value, 4096 * 4095 / 2, "memory written before and during the base is whole");
    vm2.shutdown();
}
