//! Each VM's counters in its slot of the in-place array (`VM_STATS`), as
//! root against the real kernel: a VM's CPU time against the kernel's
//! cpuacct, also the time a child cgroup ran before the governor saw it,
//! its traffic against the interface statistics, and a governor that
//! adopts the maps of one that died with its VMs in another order.

use std::process::Command;
use std::time::Duration;

use governor::governor::Governor;
use governor::netdev;
use integration_tests::*;

fn hog_in(cg: &mut cgroupfs::Cgroup) -> Guarded {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "while :; do :; done"]);
    cg.join_on_exec(&mut cmd).expect("join");
    Guarded(Some(cmd.spawn().expect("hog")))
}

fn stop(mut hog: Guarded) {
    hog.child().kill().expect("kill the hog");
    hog.child().wait().expect("reap the hog");
}

/// A child cgroup that runs before the governor has seen it counts in its
/// own entry of the per-cgroup map; once seen it counts in the VM's slot.
/// The VM's total (both, and the VM cgroup's own time) agrees with the
/// kernel's cpuacct within 2%, and its traffic with the interface's
/// statistics within 1%.
#[test]
fn a_vms_slot_holds_all_its_cpu_time_and_traffic() {
    require_root();
    require_tool("iperf3");
    let pins = PinDir::new();
    let net = VmNet::new(2);
    let cg = TestCgroup::new("slot");
    let (ns_a, host_a, _) = &net.ports[0];
    let (ns_b, _, addr_b) = &net.ports[1];
    let mut gov =
        Governor::new(&governor_config(&pins, &unique("gifb"), &[("vm", &cg, Some(&host_a.name))])).expect("governor");
    gov.tick().expect("tick");
    let layout = cgroupfs::Layout::detect().expect("layout");
    let mut child =
        layout.create(&format!("{}/vcpu0", cg.cg.rel().to_string_lossy()), &Default::default()).expect("child cgroup");
    // Runs unseen: the governor walks a VM's children every 10 ticks.
    let hog = hog_in(&mut child);
    std::thread::sleep(Duration::from_millis(1000));
    for _ in 0..12 {
        gov.tick().expect("tick");
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop(hog);
    let hog = hog_in(&mut cg.cg.clone());
    std::thread::sleep(Duration::from_millis(500));
    stop(hog);
    std::thread::sleep(Duration::from_millis(300));
    let st = gov.tick().expect("tick")[0].clone();
    let kernel = cg.cg.cpu_usage_ns().expect("cpuacct") as f64;
    let bpf = st.cpu_seconds_total * 1e9;
    let err = rel_err(bpf, kernel);
    eprintln!("VM CPU: eBPF {:.3} s, cpuacct {:.3} s, error {:.2}%", bpf / 1e9, kernel / 1e9, err * 100.0);
    assert!(kernel > 2.0e9, "the hogs ran: {kernel} ns");
    assert!(err <= 0.02, "VM CPU: eBPF {bpf} ns vs cpuacct {kernel} ns");

    let before = gov.tick().expect("tick")[0].clone();
    let if0 = netdev::stats(&host_a.name).expect("stats");
    iperf3_both_ways(ns_a, ns_b, addr_b, 1);
    let after = gov.tick().expect("tick")[0].clone();
    let ifs = netdev::stats(&host_a.name).expect("stats");
    // The VM's directions: what the host-side interface receives the VM sent.
    for (what, vm, iface) in [
        ("VM tx bytes", after.tx_bytes_total - before.tx_bytes_total, ifs.rx_bytes - if0.rx_bytes),
        ("VM rx bytes", after.rx_bytes_total - before.rx_bytes_total, ifs.tx_bytes - if0.tx_bytes),
    ] {
        let err = rel_err(vm as f64, iface as f64);
        eprintln!("{what}: eBPF {vm}, interface {iface}, error {:.3}%", err * 100.0);
        assert!(iface > 100_000, "{what}: too little traffic ({iface})");
        assert!(err <= 0.01, "{what}: eBPF {vm} vs interface {iface}");
    }
    drop(gov);
    child.remove().expect("remove the child cgroup");
}

/// A governor that dies (here: forgotten, its pins and links left as a
/// kill -9 leaves them) and one that adopts its maps with the VMs in the
/// other order: each VM keeps its own slot, so each VM's CPU time goes on
/// from its own total, and none takes the other's.
#[test]
fn an_adopting_governor_finds_each_vms_slot_whatever_the_order() {
    require_root();
    let pins = PinDir::new();
    let ifb = unique("gifb");
    let (busy, idle) = (TestCgroup::new("slotb"), TestCgroup::new("sloti"));
    let mut first =
        Governor::new(&governor_config(&pins, &ifb, &[("busy", &busy, None), ("idle", &idle, None)])).expect("gov");
    first.tick().expect("tick");
    let hog = hog_in(&mut busy.cg.clone());
    std::thread::sleep(Duration::from_millis(1000));
    let was = first.tick().expect("tick").to_vec();
    // Dies without its cleanup: the kernel goes on counting into the maps.
    std::mem::forget(first);
    std::thread::sleep(Duration::from_millis(500));
    let mut second = Governor::new(&governor_config(&pins, &ifb, &[("idle", &idle, None), ("busy", &busy, None)]))
        .expect("adopting gov");
    std::thread::sleep(Duration::from_millis(300));
    stop(hog);
    let now = second.tick().expect("tick").to_vec();
    let total = |s: &[governor::sampler::VmStatus], vm: &str| {
        s.iter().find(|v| v.name == vm).map(|v| v.cpu_seconds_total).expect("the VM's status")
    };
    let kernel = busy.cg.cpu_usage_ns().expect("cpuacct") as f64 / 1e9;
    eprintln!(
        "busy: {:.3} s before, {:.3} s after adoption (cpuacct {kernel:.3} s); idle: {:.3} -> {:.3} s",
        total(&was, "busy"),
        total(&now, "busy"),
        total(&was, "idle"),
        total(&now, "idle")
    );
    assert!(total(&was, "busy") > 0.5, "the first governor counted the hog");
    assert!(
        total(&now, "busy") >= total(&was, "busy") + 0.5,
        "busy went on from its own total (also while no governor ran)"
    );
    assert!(rel_err(total(&now, "busy"), kernel) <= 0.02, "busy's total is the kernel's");
    assert!(total(&now, "idle") < 0.2, "idle took none of busy's time");
}
