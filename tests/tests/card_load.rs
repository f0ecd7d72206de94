//! What loads the card, measured by the card: each VM's own cost (ABI 1.2
//! `vm-costs`: CPU and memory from its child cgroup, network and FPGA work
//! charged to it) and user traffic relayed through the card (forwards).
//! card-sim runs as in `card_link.rs`: its own process and cgroup.

use std::sync::atomic::Ordering;
use std::time::Duration;

use card_link::abi::{utilisation, ResourceKind};
use card_link::mailbox::VmSpec;
use card_link::{Card, CardOptions};
use card_sim::{Load, Request, SimOptions, SimProcess};
use integration_tests::{vm_cgroup, Sink};

const PERIOD_MS: u64 = 100;

fn sim() -> SimProcess {
    SimProcess::spawn(&SimOptions { period_ms: PERIOD_MS as u32, ..Default::default() }).expect("start card-sim")
}

fn load(l: Load) -> Request {
    Request::Load(l)
}

fn connect(sim: &SimProcess, cmd_timeout: Duration) -> Card {
    card_link::connect_vfio_user(
        sim.socket_path(),
        Duration::from_millis(200),
        CardOptions { command_timeout: cmd_timeout, ..CardOptions::default() },
    )
    .expect("connect to card-sim")
}

/// ABI 1.2 `vm-costs` with real KVM guests: each VM's CPU and memory are its
/// own child cgroup's (the kernel's accounting, checked here against the
/// cgroup directly), and the network client's bytes and FPGA jobs sent on a
/// VM's behalf are charged to that VM and to no other.
#[test]
fn card_vm_costs_are_each_vms_own_measured() {
    let guest = integration_tests::guest_elf();
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is required for the card-side VMM");
    let s = SimProcess::spawn(&SimOptions { period_ms: PERIOD_MS as u32, guest: Some(guest), ..Default::default() })
        .expect("start card-sim with the vmm backend");
    let mut card = connect(&s, Duration::from_secs(20));
    let busy = card.start_vm(&VmSpec { name: "mc-busy".into(), mem_mib: 32, vcpus: 1 }).expect("boot busy");
    let idle = card.start_vm(&VmSpec { name: "mc-idle".into(), mem_mib: 32, vcpus: 1 }).expect("boot idle");
    let r = s
        .control(&Request::Agent { vm: busy, request: vmm::host::api::AgentOp::Auto, arg: 200_000 })
        .expect("make the busy agent work");
    assert!(r.agent.is_some(), "{r:?}");
    let sink = Sink::start();
    s.control(&load(Load {
        net_bps: Some(10_000_000),
        net_target: Some(sink.addr),
        net_vm: Some(busy),
        ..Load::default()
    }))
    .expect("network on the busy VM's behalf");
    // Refused whole, naming the field, for a VM the card does not run.
    let e = s.control(&Request::FpgaJobs { count: 1, service_us: 1000, vm: Some(999) }).expect_err("no VM 999");
    assert!(e.to_string().contains("field vm: no VM 999"), "{e}");
    std::thread::sleep(Duration::from_millis(500));

    let (busy_cg, idle_cg) = (vm_cgroup(&s, busy), vm_cgroup(&s, idle));
    let regs = card.registers().expect("registers");
    let a = card.vm_costs().expect("cost table");
    let (ka, kai) = (busy_cg.cpu_usage_ns().expect("cpu"), idle_cg.cpu_usage_ns().expect("cpu"));
    let r = s.control(&Request::FpgaJobs { count: 40, service_us: 10_000, vm: Some(idle) }).expect("jobs for idle");
    assert_eq!(r.queued, Some(40));
    std::thread::sleep(Duration::from_millis(2000));
    let b = card.vm_costs().expect("cost table");
    let (kb, kbi) = (busy_cg.cpu_usage_ns().expect("cpu"), idle_cg.cpu_usage_ns().expect("cpu"));
    let mem_idle = idle_cg.memory().expect("memory").map(|m| m.usage_bytes);
    s.control(&load(Load { net_bps: Some(0), ..Load::default() })).expect("net off");
    let received = sink.received.load(Ordering::Relaxed);
    drop(sink);

    let u = card_link::costs::vm_utilisation(&a, &b, &regs).expect("rates");
    let get = |id| u.iter().find(|v| v.vm == id).unwrap_or_else(|| panic!("no rate for VM {id}: {u:?}"));
    let (ub, ui) = (get(busy), get(idle));
    eprintln!("busy: {ub:?}\nidle: {ui:?}");
    for c in &b.vms {
        assert_eq!(c.source, card_link::CostSource::Cgroup, "{c:?}");
    }
    // CPU: the card's figure is the child cgroup's, read around the same instants.
    let slack = 60_000_000; // the reads are up to a few ms apart on a busy vCPU
    assert!(ub.cpu_ns.abs_diff(kb - ka) <= slack, "busy VM: card {} ns, cgroup {} ns", ub.cpu_ns, kb - ka);
    assert!(ui.cpu_ns.abs_diff(kbi - kai) <= slack, "idle VM: card {} ns, cgroup {} ns", ui.cpu_ns, kbi - kai);
    assert!(ub.cpu > 0.2, "a stepping agent uses the card's CPU: {:.3}", ub.cpu);
    assert!(ub.cpu > 5.0 * ui.cpu, "busy {:.3} vs idle {:.3}", ub.cpu, ui.cpu);
    // Memory: the child cgroup's usage (a gauge, so within a few pages).
    let mem_idle = mem_idle.expect("memory controller over the card's cgroup");
    assert!(ui.memory_bytes.abs_diff(mem_idle) <= 4 << 20, "idle VM memory {} vs cgroup {mem_idle}", ui.memory_bytes);
    // Pages the VM's process faulted in since it joined (its binary's page
    // cache was charged to whoever read it first): at least its stacks and
    // the guest's touched RAM.
    assert!(ui.memory_bytes > 256 << 10, "a running VM holds memory: {}", ui.memory_bytes);
    // Network: only the busy VM's, and no more than the peer received.
    assert_eq!(ui.net_bytes, 0);
    assert!(ub.net_bytes > 10_000_000, "2 s at 10 MB/s: {}", ub.net_bytes);
    assert!(ub.net_bytes <= received, "charged {} > received {received}", ub.net_bytes);
    // FPGA: the jobs queued for the idle VM (400 ms of engine time), not the busy one.
    assert_eq!(ub.fpga_busy_ns, 0);
    assert!(ui.fpga_busy_ns >= 350_000_000 && ui.fpga_busy_ns <= 400_000_000, "idle fpga {}", ui.fpga_busy_ns);
    card.stop_vm(busy).expect("stop");
    card.stop_vm(idle).expect("stop");
    assert!(!busy_cg.dir().exists(), "a stopped VM's cgroup is removed");
}

/// User traffic crossing the card: iperf3 through a card forward. The card's
/// network telemetry counts what it relayed, which agrees with what iperf3
/// says it moved, and the relaying costs card CPU.
#[test]
fn card_forwards_user_traffic_and_counts_it() {
    integration_tests::require_tool("iperf3");
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(2));
    let server_port = 20000 + (std::process::id() % 10000) as u16;
    let server = fixtures::Guarded(Some(
        std::process::Command::new("iperf3")
            .args(["-s", "-1", "-B", "127.0.0.1", "-p", &server_port.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 server"),
    ));
    let r = s
        .control(&Request::Forward {
            listen: "127.0.0.1:0".parse().expect("addr"),
            to: format!("127.0.0.1:{server_port}").parse().expect("addr"),
        })
        .expect("forward");
    let port = r.port.expect("the forward's port");
    let e = s
        .control(&Request::Forward {
            listen: "0.0.0.0:0".parse().expect("addr"),
            to: "127.0.0.1:1".parse().expect("addr"),
        })
        .expect_err("not loopback");
    assert!(e.to_string().contains("field listen"), "{e}");
    std::thread::sleep(Duration::from_millis(300));
    let a = card.registers().expect("registers");
    let out = integration_tests::run(std::process::Command::new("iperf3").args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-b",
        "400M",
        "-t",
        "3",
        "-J",
    ]));
    std::thread::sleep(Duration::from_millis(2 * PERIOD_MS));
    let b = card.registers().expect("registers");
    drop(server);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let sent = j["end"]["sum_sent"]["bytes"].as_f64().expect("bytes sent");
    let relayed = (b.resource(ResourceKind::Network).expect("net").total
        - a.resource(ResourceKind::Network).expect("net").total) as f64;
    let u = utilisation(&a, &b).expect("rates");
    eprintln!("iperf3 sent {sent} B, the card relayed {relayed} B; card cpu {:.3}, network {:.3}", u.cpu, u.network);
    assert!(sent > 100e6, "iperf3 moved too little: {sent}");
    // Relayed = the data plus iperf3's control exchange (a few KiB).
    assert!((relayed - sent).abs() / sent < 0.02, "card relayed {relayed} vs iperf3 {sent}");
    assert!(u.cpu > 0.005, "relaying costs the card CPU: {:.3}", u.cpu);
    s.control(&Request::Unforward { port }).expect("unforward");
    assert!(s.control(&Request::Unforward { port }).is_err(), "already gone");
}
