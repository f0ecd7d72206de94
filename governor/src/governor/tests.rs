//! The governor's logic without a kernel: fake telemetry and shaping, and a
//! scratch cgroup tree shaped like a pure v2 host.

use std::path::PathBuf;

use cgroupfs::Layout;
use governor_common::{CgroupStats, NetStats, OomEvent, QOS_POLICE, QOS_SHAPE};

use super::*;
use crate::qos::{Limit, Mode};
use crate::shape::{FakeShaper, Op};
use crate::telemetry::{qos_index, FakeTelemetry};

struct Host {
    root: PathBuf,
    layout: Layout,
    tel: FakeTelemetry,
    net: FakeShaper,
}

impl Host {
    /// Cgroups `vm-a` and `vm-b`; interfaces tap-a (ifindex 10), tap-b1 (11), tap-b2 (12).
    fn new(tag: &str) -> Host {
        let root = std::env::temp_dir().join(format!("governor-unit-{tag}-{}", std::process::id()));
        // A scratch tree of an earlier, killed run of this pid may be there.
        let _ = std::fs::remove_dir_all(&root);
        for vm in ["vm-a", "vm-b"] {
            std::fs::create_dir_all(root.join("sys/fs/cgroup").join(vm)).expect("scratch cgroup");
        }
        let layout = Layout::from_mounts_at("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", &root).expect("layout");
        let tel = FakeTelemetry::new();
        for (n, i) in [("tap-a", 10), ("tap-b1", 11), ("tap-b2", 12)] {
            tel.add_link(n, i);
        }
        Host { root, layout, tel, net: FakeShaper::new() }
    }

    fn config(&self, extra_a: &str) -> Config {
        let text = format!(
            "qos_ifb = \"ifb-unit\"\n\
             [[vm]]\nname = \"a\"\ncgroup = \"vm-a\"\ninterfaces = [\"tap-a\"]\n{extra_a}\n\
             [[vm]]\nname = \"b\"\ncgroup = \"vm-b\"\ninterfaces = [\"tap-b1\", \"tap-b2\"]\nrole = \"mc\"\n"
        );
        Config::parse(&text).expect("config")
    }

    fn governor(&self, extra_a: &str) -> Governor<FakeTelemetry, FakeShaper> {
        Governor::with(&self.config(extra_a), self.tel.clone(), self.net.clone(), self.layout.clone())
            .expect("governor")
    }

    fn id(&self, vm: &str) -> u64 {
        self.layout.open(vm).expect("open").id().expect("id")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            eprintln!("warning: removing {}: {e}", self.root.display());
        }
    }
}

fn limit(mode: Mode, mbit: u64) -> Limit {
    Limit { mode, rate_bps: mbit * 1_000_000, burst_bytes: 256 * 1024, packet_rate: None }
}

#[test]
fn tick_turns_counters_into_per_vm_totals_and_rates() {
    let h = Host::new("tick");
    let mut g = h.governor("");
    let (a, b) = (h.id("vm-a"), h.id("vm-b"));
    {
        let mut st = h.tel.state();
        st.cgroups.insert(a, CgroupStats { on_cpu_ns: 1_000_000_000, ..Default::default() });
        st.net.insert(11, NetStats { rx_bytes: 1000, tx_bytes: 2000, rx_packets: 1, tx_packets: 2 });
        st.net.insert(12, NetStats { rx_bytes: 10, tx_bytes: 20, rx_packets: 1, tx_packets: 1 });
    }
    let first = g.tick().expect("tick").to_vec();
    assert_eq!(first.len(), 2);
    assert_eq!((first[0].name.as_str(), first[0].role.as_str(), first[0].cgroup_id), ("a", "user", a));
    assert_eq!(first[0].cpu_seconds_total, 1.0);
    assert_eq!(first[0].cpu_percent, 0.0, "no rate on the first tick");
    // Host-side tx is what the VM receives; both interfaces of b add up.
    assert_eq!((first[1].rx_bytes_total, first[1].tx_bytes_total), (2020, 1010));
    assert_eq!(first[1].role, "mc");
    {
        let mut st = h.tel.state();
        st.cgroups.insert(a, CgroupStats { on_cpu_ns: 3_000_000_000, ..Default::default() });
        st.net.insert(11, NetStats { rx_bytes: 1000, tx_bytes: 1_002_000, rx_packets: 1, tx_packets: 3 });
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let second = g.tick().expect("tick").to_vec();
    assert_eq!(second[0].cpu_seconds_total, 3.0);
    assert!(second[0].cpu_percent > 100.0, "2 s of CPU in ~50 ms: {}", second[0].cpu_percent);
    assert!(second[1].rx_bits_per_s > 0.0);
    assert_eq!(second[1].rx_bytes_total, 1_002_020);
    assert!(b != a);
}

#[test]
fn a_child_cgroup_counts_for_its_vm_and_never_goes_back() {
    let h = Host::new("subtree");
    let mut g = h.governor("");
    let child = h.root.join("sys/fs/cgroup/vm-a/vcpu0");
    std::fs::create_dir(&child).expect("child");
    let cid = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&child).expect("stat"));
    h.tel.state().cgroups.insert(cid, CgroupStats { on_cpu_ns: 500_000_000, ..Default::default() });
    assert_eq!(g.tick().expect("tick")[0].cpu_seconds_total, 0.5);
    let slots = h.tel.state().cg_slot.clone();
    assert_eq!(
        (slots.get(&h.id("vm-a")), slots.get(&cid), slots.get(&h.id("vm-b"))),
        (Some(&0), Some(&0), Some(&1)),
        "each VM's cgroups, its child too, are counted into its slot"
    );
    std::fs::remove_dir(&child).expect("rmdir");
    assert_eq!(g.tick().expect("tick")[0].cpu_seconds_total, 0.5, "a vanished child keeps its time");
}

/// A child made after the first tick is counted at the next tick (inotify
/// tells which VM has one), not at the periodic walk tens of ticks later.
#[test]
fn a_new_child_cgroup_is_seen_at_the_next_tick() {
    let h = Host::new("inotify");
    let mut g = h.governor("");
    g.tick().expect("tick");
    let child = h.root.join("sys/fs/cgroup/vm-b/vcpu0");
    std::fs::create_dir(&child).expect("child");
    let cid = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&child).expect("stat"));
    h.tel.state().cgroups.insert(cid, CgroupStats { on_cpu_ns: 250_000_000, ..Default::default() });
    let st = g.tick().expect("tick").to_vec();
    assert_eq!((st[0].cpu_seconds_total, st[1].cpu_seconds_total), (0.0, 0.25), "the child counts for vm b at once");
    assert_eq!(h.tel.state().cg_slot.get(&cid), Some(&1));
}

/// A child that is gone stops being counted into the VM's slot at the
/// next look (its time stays in the VM's total), and what a governor
/// before left pointing at the VMs' slots is forgotten at the first tick.
#[test]
fn gone_children_and_stale_entries_leave_the_slots() {
    let h = Host::new("stale");
    {
        let mut st = h.tel.state();
        st.cg_slot.insert(4242, 0);
        st.vm_of_if.insert(99, 0);
    }
    let mut g = h.governor("");
    g.tick().expect("tick");
    {
        let st = h.tel.state();
        assert!(!st.cg_slot.contains_key(&4242) && !st.vm_of_if.contains_key(&99), "left by a governor before");
        assert_eq!(st.vm_of_if.get(&10), Some(&0), "the VM's own interface keeps its slot");
    }
    let child = h.root.join("sys/fs/cgroup/vm-a/vcpu0");
    std::fs::create_dir(&child).expect("child");
    let cid = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&child).expect("stat"));
    h.tel.state().cgroups.insert(cid, CgroupStats { on_cpu_ns: 500_000_000, ..Default::default() });
    assert_eq!(g.tick().expect("tick")[0].cpu_seconds_total, 0.5);
    assert_eq!(h.tel.state().cg_slot.get(&cid), Some(&0));
    std::fs::remove_dir(&child).expect("rmdir");
    // Removals are not told: the periodic look finds it.
    for _ in 0..SUBTREE_SAFETY_EVERY {
        assert_eq!(g.tick().expect("tick")[0].cpu_seconds_total, 0.5, "its time stays");
    }
    assert!(!h.tel.state().cg_slot.contains_key(&cid), "no longer counted into the slot");
    assert_eq!(h.tel.state().cg_slot.get(&h.id("vm-a")), Some(&0));
}

#[test]
fn police_limit_writes_the_bucket_and_clear_removes_it() {
    let h = Host::new("police");
    let mut g = h.governor("");
    g.set_limit("a", Direction::Egress, limit(Mode::Police, 8)).expect("set");
    let p = h.tel.state().qos[&qos_index(0, Direction::Egress)];
    assert_eq!((p.mode, p.rate_bytes_per_s), (QOS_POLICE, 1_000_000));
    assert_eq!(p.bucket.credit_ns(p.bucket.tat_ns), p.bucket.burst_ns as i64, "a new bucket starts full");
    assert_eq!(h.tel.state().vm_of_if.get(&10), Some(&0), "tap-a belongs to slot 0");
    assert_eq!(h.tel.state().slot_at_attach.get("tap-a"), Some(&Some(0)), "given before the programs were attached");
    let shown = g.limits().expect("limits");
    assert_eq!((shown.len(), shown[0].vm.as_str(), shown[0].tokens_bytes), (1, "a", Some(256 * 1024)));
    g.clear_limit("a", Direction::Egress).expect("clear");
    assert!(h.tel.state().qos.is_empty());
    assert!(g.limits().expect("limits").is_empty());
    g.clear_limit("a", Direction::Egress).expect("clearing no limit is fine");
    assert!(h.net.is_clean(), "policing makes no qdiscs");
}

#[test]
fn shaped_egress_shares_one_ifb_removed_with_the_last_class() {
    let h = Host::new("ifb");
    let mut g = h.governor("");
    g.set_limit("a", Direction::Egress, limit(Mode::Shape, 10)).expect("a");
    g.set_limit("b", Direction::Egress, limit(Mode::Shape, 20)).expect("b");
    let ifb = h.net.state().links["ifb-unit"];
    {
        let st = h.net.state();
        assert_eq!(st.roots.get(&ifb), Some(&HTB_MAJOR));
        assert_eq!(st.classes[&(ifb, HTB_MAJOR, 1)].rate_bps, 10_000_000);
        assert_eq!(st.classes[&(ifb, HTB_MAJOR, 2)].rate_bps, 20_000_000);
        let leaf = st.classes[&(ifb, HTB_MAJOR, 1)].leaf.expect("a leaf");
        // 10 Mbit/s: segments of two frames; a queue of 32 frames (5 ms
        // would be 6250 B, four segments 12112 B).
        assert_eq!((leaf.segment_bytes, leaf.limit_bytes), (3028, 32 * 1514));
    }
    let p = h.tel.state().qos[&qos_index(1, Direction::Egress)];
    assert_eq!((p.mode, p.classid, p.redirect_ifindex), (QOS_SHAPE, 0x7a_0002, ifb));
    g.clear_limit("a", Direction::Egress).expect("clear a");
    assert!(h.net.state().links.contains_key("ifb-unit"), "b still uses the IFB");
    g.set_limit("b", Direction::Egress, limit(Mode::Police, 20)).expect("b to police");
    assert!(h.net.is_clean(), "the last shaped VM took the IFB with it");
}

#[test]
fn shaped_ingress_has_a_root_per_interface() {
    let h = Host::new("ingress");
    let mut g = h.governor("");
    g.set_limit("b", Direction::Ingress, limit(Mode::Shape, 50)).expect("shape b");
    assert_eq!(h.net.state().roots.keys().copied().collect::<Vec<_>>(), vec![11, 12]);
    // GSO packets of at most 1 ms at the rate: 6250 B at 50 Mbit/s.
    assert_eq!(h.net.state().gso.get(&11), Some(&6250));
    g.set_limit("b", Direction::Ingress, limit(Mode::Shape, 40)).expect("change rate");
    assert_eq!(h.net.state().classes[&(12, HTB_MAJOR, 2)].rate_bps, 40_000_000);
    assert_eq!(h.net.state().gso.get(&12), Some(&5000));
    g.clear_limit("b", Direction::Ingress).expect("clear");
    assert!(h.net.is_clean(), "GSO sizes restored: {:?}", h.net.state().gso);
}

#[test]
fn a_failed_step_leaves_nothing_and_the_old_limit_holds() {
    let h = Host::new("fail");
    let mut g = h.governor("");
    g.set_limit("b", Direction::Ingress, limit(Mode::Police, 5)).expect("police");
    h.net.state().fail = Some(Op::SetLeaf);
    let e = g.set_limit("b", Direction::Ingress, limit(Mode::Shape, 50)).expect_err("leaf fails");
    assert!(e.to_string().contains("vm b ingress: shaping"), "{e}");
    assert!(h.net.is_clean(), "both roots made for the attempt are gone");
    let shown = g.limits().expect("limits");
    assert_eq!((shown[0].mode, shown[0].rate_bps), (Mode::Police, 5_000_000), "the old limit holds");
    // The map refusing the shape policer undoes the classes too.
    h.tel.state().fail_set_policer = true;
    assert!(g.set_limit("a", Direction::Egress, limit(Mode::Shape, 5)).is_err());
    assert!(h.net.is_clean(), "IFB removed again");
}

#[test]
fn a_recreated_interface_is_reattached_with_its_totals_and_shaping() {
    let h = Host::new("recreate");
    let mut g = h.governor("");
    g.set_limit("a", Direction::Ingress, limit(Mode::Shape, 30)).expect("shape");
    h.tel.state().net.insert(10, NetStats { tx_bytes: 5000, ..Default::default() });
    assert_eq!(g.tick().expect("tick")[0].rx_bytes_total, 5000);
    // The VMM deletes and re-creates the tap: new index, no qdisc, no counters.
    h.tel.add_link("tap-a", 20);
    h.net.state().roots.remove(&10);
    h.tel.state().net.insert(20, NetStats { tx_bytes: 100, ..Default::default() });
    assert_eq!(g.tick().expect("tick")[0].rx_bytes_total, 5100, "totals carry on");
    assert_eq!(h.tel.state().attached.get("tap-a"), Some(&20));
    assert_eq!(h.tel.state().vm_of_if.get(&20), Some(&0));
    assert!(!h.tel.state().vm_of_if.contains_key(&10));
    assert_eq!(h.net.state().classes[&(20, HTB_MAJOR, 1)].rate_bps, 30_000_000, "shaping re-applied");
}

#[test]
fn dropping_the_governor_removes_all_shaping_and_limits() {
    let h = Host::new("drop");
    let mut g = h.governor("[vm.qos.egress]\nmode = \"shape\"\nrate = \"10mbit\"\nburst = \"64kb\"\n");
    g.set_limit("b", Direction::Ingress, limit(Mode::Shape, 50)).expect("shape b");
    g.set_limit("b", Direction::Egress, limit(Mode::Police, 50)).expect("police b");
    assert!(!h.net.is_clean());
    assert_eq!(h.tel.state().qos.len(), 3);
    drop(g);
    assert!(h.net.is_clean(), "{:?}", h.net.state());
    assert!(h.tel.state().qos.is_empty());
}

#[test]
fn ooms_name_the_vm_whose_subtree_was_allocating() {
    let h = Host::new("oom");
    let mut g = h.governor("");
    let mut comm = [0u8; 16];
    comm[..5].copy_from_slice(b"touch");
    h.tel.state().ooms.push(OomEvent { pid: 42, cgroup_id: h.id("vm-b"), anon_rss_kb: 7, comm, ..Default::default() });
    h.tel.state().ooms.push(OomEvent { pid: 43, cgroup_id: 1, ..Default::default() });
    g.tick().expect("tick");
    let o = g.ooms();
    assert_eq!((o[0].pid, o[0].comm.as_str(), o[0].vm.as_deref()), (42, "touch", Some("b")));
    assert_eq!(o[1].vm, None, "outside every VM");
}

#[test]
fn refusals_name_the_vm_and_change_nothing() {
    let h = Host::new("refuse");
    let mut g = h.governor("");
    assert!(matches!(g.set_limit("nope", Direction::Egress, limit(Mode::Police, 1)), Err(GovernorError::UnknownVm(_))));
    h.tel.state().links.remove("tap-a");
    let e = g.set_limit("a", Direction::Egress, limit(Mode::Police, 1)).expect_err("tap gone");
    assert!(e.to_string().contains("interface tap-a is gone"), "{e}");
    assert!(h.tel.state().qos.is_empty());
    let bad = Config::parse("[[vm]]\nname = \"x\"\ncgroup = \"no-such\"\n").expect("parses");
    let e = Governor::with(&bad, h.tel.clone(), h.net.clone(), h.layout.clone()).err().expect("missing cgroup");
    assert!(matches!(e, GovernorError::Cgroup { ref vm, .. } if vm == "x"), "{e}");
}

#[test]
fn the_gso_cap_is_one_millisecond_at_the_rate_within_bounds() {
    use super::shaping::gso_cap;
    assert_eq!(gso_cap(100_000_000), 12_500);
    assert_eq!(gso_cap(1_000_000), 3028, "at least two full frames");
    assert_eq!(gso_cap(10_000_000_000), 65_536, "fast rates are not capped");
}
