//! Claim 11: a VMM and its vCPU thread run in their own cgroup with CPU and
//! memory limits, and the kernel's own accounting shows a busy guest held to
//! its CPU quota. Works on pure cgroup v2 and on hybrid hosts (this one).

mod vmm_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgroupfs::{CgroupError, Controller, Layout, Limits};
use serde_json::json;
use vmm::host::api::AgentOp;
use vmm::host::process::{SpawnOptions, Start, VmmProcess};
use vmm_support::*;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())).trim().to_string()
}

fn layout() -> Layout {
    Layout::detect().expect("cgroup layout")
}

/// The directory of cgroup `name` holding controller `ctrl`'s files.
fn dir(ctrl: Controller, name: &str) -> PathBuf {
    layout().root_of(ctrl).join(name)
}

/// CPU time of the cgroup in ns, from the kernel's accounting.
fn usage_ns(name: &str) -> u64 {
    layout().open(name).expect("open cgroup").cpu_usage_ns().expect("usage")
}

fn spawn_in_cgroup(name: &str, quota_us: u64, cpuset: Option<&str>) -> VmmProc {
    let elf = guest_elf();
    let quota = quota_us.to_string();
    let mut args = vec![
        "--guest",
        elf.to_str().expect("utf-8"),
        "--mem-mib",
        "64",
        "--cgroup",
        name,
        "--cpu-quota-us",
        &quota,
        "--cpu-period-us",
        "100000",
        "--memory-mib",
        "256",
    ];
    if let Some(c) = cpuset {
        args.extend(["--cpuset", c]);
    }
    VmmProc::spawn(&args)
}

#[test]
fn cgroup_shows_the_configured_limits_and_holds_the_vcpu() {
    require_kvm();
    let name = unique("vmm-test-cg");
    let _cg = CgroupGuard(name.clone());
    let mut p = spawn_in_cgroup(&name, 20_000, Some("0"));
    let stats = p.call(json!({"cmd": "stats"}));
    let tid = stats["vcpu_tid"].as_u64().expect("vcpu tid");
    let cg = layout().open(&name).expect("the VMM made its cgroup");
    assert_eq!(cg.cpu_quota().expect("quota"), Some((20_000, 100_000)));
    assert_eq!(read(&dir(Controller::Cpuset, &name).join("cpuset.cpus")), "0");
    assert_eq!(cg.memory_limit().expect("limit"), Some(256 << 20));
    if layout().is_hybrid() {
        for ctrl in Controller::ALL {
            let tasks = read(&dir(ctrl, &name).join("tasks"));
            assert!(tasks.lines().any(|l| l == tid.to_string()), "vCPU thread {tid} in {ctrl:?}: {tasks}");
            assert!(tasks.lines().any(|l| l == p.pid().to_string()), "VMM process in {ctrl:?}");
        }
    } else {
        assert!(read(&cg.dir().join("cgroup.threads")).lines().any(|l| l == tid.to_string()));
    }
    // The v2 identity the eBPF side keys on.
    assert!(cg.pids().contains(&p.pid()), "VMM in the unified hierarchy");
    // The vCPU thread is affine to the cpuset.
    let status = read(&PathBuf::from(format!("/proc/{}/task/{tid}/status", p.pid())));
    let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list");
    assert_eq!(allowed.trim(), "0");
    p.call(json!({"cmd": "shutdown"}));
    p.child.child().wait().expect("reap the vmm");
    assert!(!dir(Controller::Cpu, &name).exists(), "the VMM removes the cgroup it made on shutdown");
}

#[test]
fn busy_guest_stays_within_cpu_quota() {
    require_kvm();
    let name = unique("vmm-test-quota");
    let _cg = CgroupGuard(name.clone());
    // 20% of one CPU. The quota must sit well below what the vCPU gets
    // unthrottled to be the binding limit: on the shared 2-CPU test machine
    // (load average ~5) an unthrottled busy vCPU, like any busy host
    // process, got only ~50%.
    // No cpuset here: pinning would let unrelated load on that CPU starve
    // the vCPU below its quota.
    let mut p = spawn_in_cgroup(&name, 20_000, None);
    p.request(AgentOp::Auto, 100_000_000); // steps of 1e8 units: a busy loop with rare exits
    std::thread::sleep(Duration::from_millis(500));
    let (u0, t0) = (usage_ns(&name), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (u1, t1) = (usage_ns(&name), Instant::now());
    let share = (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64;
    p.call(json!({"cmd": "shutdown"}));
    assert!((share - 0.20).abs() <= 0.20 * 0.05, "CPU share {share:.4} is not within 5% of the 0.20 quota");
}

#[test]
fn invalid_limits_are_refused_whole() {
    let name = unique("vmm-test-bad");
    let _cg = CgroupGuard(name.clone());
    let bad = Limits { cpu_quota_us: Some(20_000), memory_bytes: Some(1024), ..Default::default() };
    match layout().create(&name, &bad) {
        Err(CgroupError::Limit { field, .. }) => assert_eq!(field, "memory_bytes"),
        other => panic!("expected a limit error, got {other:?}"),
    }
    assert!(!dir(Controller::Cpu, &name).exists(), "nothing half applied");
    assert!(matches!(layout().create("../escape", &Limits::default()), Err(CgroupError::BadPath(_))));
}

#[test]
fn library_places_only_the_vcpu_thread_under_a_quota() {
    require_kvm();
    use vmm::proto::op;
    let name = unique("vmm-test-vcpu");
    let _guard = CgroupGuard(name.clone());
    let limits = Limits { cpu_quota_us: Some(20_000), cpu_period_us: Some(100_000), ..Default::default() };
    let mut cg = layout().create(&name, &limits).expect("create cgroup");
    let unified = layout().unified().join(&name);
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&unified).expect("v2 directory"));
    assert_eq!(cg.id().expect("v2 id"), ino, "the id eBPF sees for the cgroup");
    let vm = vmm::Vm::create(&vmm::VmConfig::new(guest_elf(), 32), vmm::Sinks::default()).expect("create VM");
    vm.start(false).expect("start");
    vm.wait_ready(Duration::from_secs(10)).expect("banner");
    let tid = vm.vcpu_tid().expect("vCPU tid");
    cg.attach_thread(tid as u32).expect("move the vCPU thread");
    let tasks = read(&dir(Controller::Cpu, &name).join(if layout().is_hybrid() { "tasks" } else { "cgroup.threads" }));
    assert_eq!(tasks.lines().collect::<Vec<_>>(), vec![tid.to_string().as_str()], "only the vCPU thread");
    vm.request(op::AUTO, 100_000_000, Duration::from_secs(10)).expect("busy");
    std::thread::sleep(Duration::from_millis(300));
    let (u0, t0) = (usage_ns(&name), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (u1, t1) = (usage_ns(&name), Instant::now());
    vm.shutdown();
    cg.remove().expect("remove the cgroup");
    let share = (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64;
    assert!((share - 0.20).abs() <= 0.20 * 0.05, "vCPU share {share:.4} not within 5% of 0.20");
}

#[test]
fn sigterm_shuts_the_vm_down_and_removes_the_cgroup() {
    require_kvm();
    let name = unique("vmm-test-term");
    let _cg = CgroupGuard(name.clone());
    let mut p = spawn_in_cgroup(&name, 50_000, None);
    assert!(dir(Controller::Cpu, &name).exists());
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = p.child.child().try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "vmm did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
    assert!(!dir(Controller::Cpu, &name).exists(), "cgroup removed on SIGTERM");
    assert!(!p.socket.0.exists(), "control socket removed");
}

/// A `VmmProcess` with a cgroup of its own, as the governor spawns a
/// host-side management VM.
fn spawn_process(name: &str, socket: &TempPath) -> VmmProcess {
    let limits = Limits { cpu_quota_us: Some(50_000), cpu_period_us: Some(100_000), ..Default::default() };
    let opts = SpawnOptions {
        bin: vmm_bin(),
        start: Start::Guest { elf: guest_elf(), mem_mib: 64 },
        socket: socket.0.clone(),
        serial: None,
        log: None,
        cgroup: Some((name.to_string(), limits)),
    };
    VmmProcess::spawn(&opts).expect("spawn a vmm process in a cgroup")
}

/// Drop a handle and say how long its child took to go.
fn drop_timed(p: VmmProcess) -> Duration {
    let t0 = Instant::now();
    drop(p);
    t0.elapsed()
}

#[test]
fn a_dropped_vmm_process_leaves_neither_its_cgroup_nor_its_socket() {
    require_kvm();
    let name = unique("vmm-test-drop");
    let _cg = CgroupGuard(name.clone());
    let socket = TempPath::new("vmm-test-drop.sock");
    let mut p = spawn_process(&name, &socket);
    p.request(AgentOp::Ping, 0).expect("the agent answers");
    let pid = p.pid();
    assert!(layout().open(&name).expect("the VMM made its cgroup").pids().contains(&pid));
    assert!(socket.0.exists(), "control socket");
    let took = drop_timed(p);
    // SIGKILL alone (the old drop) leaves the cgroup behind: only a vmm
    // that handled SIGTERM released it.
    for ctrl in Controller::ALL {
        assert!(!dir(ctrl, &name).exists(), "{ctrl:?} cgroup left behind by a dropped VmmProcess");
    }
    assert!(!layout().unified().join(&name).exists(), "v2 cgroup left behind by a dropped VmmProcess");
    assert!(!socket.0.exists(), "control socket left behind by a dropped VmmProcess");
    assert!(took < Duration::from_secs(2), "drop took {took:?}: the vmm did not exit on SIGTERM");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the dropped child {pid} was not reaped");
}

#[test]
fn a_dropped_vmm_process_leaves_a_cgroup_it_only_joined() {
    require_kvm();
    let name = unique("vmm-test-join");
    let _cg = CgroupGuard(name.clone());
    // Made beforehand, as the governor does for a VM it places.
    let made = layout().create(&name, &Limits::default()).expect("create the cgroup");
    let socket = TempPath::new("vmm-test-join.sock");
    let p = spawn_process(&name, &socket);
    let pid = p.pid();
    assert!(made.pids().contains(&pid), "the VMM joined the existing cgroup");
    drop_timed(p);
    assert!(dir(Controller::Cpu, &name).exists(), "a cgroup the VMM did not make stays");
    assert!(made.pids().is_empty(), "the dropped VMM is out of the cgroup: {:?}", made.pids());
    assert!(!socket.0.exists(), "control socket left behind by a dropped VmmProcess");
}
