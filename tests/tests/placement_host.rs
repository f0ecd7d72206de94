//! The host side of MC VMs for real: `vmm` processes in child cgroups of an
//! MC subtree that carries the reserve as its limits (claim 11), and a move
//! between two such sites through the placement's move sequence, keeping
//! the agent's counters (claim 5).

use std::time::Duration;

use governor::placement::host::{HostSite, HostSiteOptions};
use governor::placement::mover::{move_task, Sites};
use governor::placement::{HostCost, Side};
use integration_tests::*;
use vmm::host::api::AgentOp;

fn site(tag: &str, run: &TempDir) -> HostSite {
    let layout = cgroupfs::Layout::detect().expect("layout");
    let opts = HostSiteOptions {
        vmm_bin: bin_dir().join("vmm"),
        guest: guest_elf(),
        run_dir: run.path().join(tag),
        subtree: format!("governor-test-mc-{}", unique_long(tag)),
        reserve: HostCost { cpus: 1.0, memory_bytes: 512 << 20 },
    };
    assert!(opts.vmm_bin.exists(), "{} is missing: build it first (cargo xtask test does)", opts.vmm_bin.display());
    HostSite::new(opts, &layout).expect("host site")
}

#[test]
fn an_mc_vm_moves_between_sites_and_keeps_its_counters() {
    require_root();
    require_kvm();
    let before = Inventory::take();
    {
        let run = TempDir::new("governor-test-mc").expect("run dir");
        let mut sites = Sites { card: site("a", &run), host: site("b", &run) };
        sites.card.cold_start("log", 32).expect("cold start");
        let vmm = sites.card.vmm("log").expect("live");
        let mut last = None;
        for _ in 0..5 {
            last = Some(vmm.request(AgentOp::Step, 100).expect("step"));
        }
        let last = last.expect("stepped");
        // The VMM is in the task's own child cgroup of the MC subtree, and
        // the subtree carries the reserve.
        let pid = vmm.pid();
        let layout = cgroupfs::Layout::detect().expect("layout");
        let task_cg = layout.open(&sites.card.task_cgroup("log")).expect("task cgroup");
        assert!(task_cg.pids().contains(&pid), "vmm {pid} not in {:?}", task_cg.rel());
        assert_eq!(sites.card.subtree().cpu_quota().expect("quota"), Some((100_000, 100_000)));
        assert_eq!(sites.card.subtree().memory_limit().expect("limit"), Some(512 << 20));

        let report = move_task(&mut sites, "log", Side::Card);
        eprintln!("move: pause {:.2} ms, steps {:?}", report.pause_ms, report.steps);
        assert!(report.ok, "{report:?}");
        assert!(sites.card.vmm("log").is_none(), "the source's copy is released");
        let moved = sites.host.vmm("log").expect("running on the destination");
        let c = moved.request(AgentOp::Counters, 0).expect("counters");
        assert_eq!((c.work, c.log_seq), (last.work, last.log_seq), "the agent's state came along");
        let next = moved.request(AgentOp::Step, 100).expect("step");
        assert_eq!(next.log_seq, last.log_seq + 1, "no log sequence number lost or repeated");
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "the host sites left: {left}");
}
