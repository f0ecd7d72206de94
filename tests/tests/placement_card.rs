//! MC VMs moved between the card (card-sim, its VMM running real KVM
//! guests, over card-link) and the host (vmm processes in the MC subtree)
//! through the placement's move sequence, both ways and back, keeping the
//! agent's counters.

use governor::placement::mover::move_task;
use governor::placement::Side;
use integration_tests::placement::two_sites;
use integration_tests::*;
use vmm::host::api::AgentOp;

#[test]
fn a_vm_goes_from_card_to_host_and_back_keeping_its_counters() {
    require_root();
    require_kvm();
    let before = Inventory::take();
    {
        let mut two = two_sites("mc");
        let sites = &mut two.sites;
        sites.card.cold_start("qos", 32).expect("start on the card");

        let to_host = move_task(sites, "qos", Side::Card);
        eprintln!("card -> host: pause {:.2} ms, {:?}", to_host.pause_ms, to_host.steps);
        assert!(to_host.ok, "{to_host:?}");
        let vmm = sites.host.vmm("qos").expect("on the host");
        let mut last = vmm.request(AgentOp::Step, 10).expect("step");
        for _ in 0..2 {
            last = vmm.request(AgentOp::Step, 10).expect("step");
        }

        let to_card = move_task(sites, "qos", Side::Host);
        eprintln!("host -> card: pause {:.2} ms, {:?}", to_card.pause_ms, to_card.steps);
        assert!(to_card.ok, "{to_card:?}");
        assert!(sites.host.vmm("qos").is_none());
        assert!(sites.card.vm_id("qos").is_some());

        let again = move_task(sites, "qos", Side::Card);
        assert!(again.ok, "{again:?}");
        let vmm = sites.host.vmm("qos").expect("on the host again");
        let c = vmm.request(AgentOp::Counters, 0).expect("counters");
        assert_eq!((c.work, c.log_seq), (last.work, last.log_seq), "state kept through the card both ways");
        assert_eq!(vmm.request(AgentOp::Step, 10).expect("step").log_seq, last.log_seq + 1);
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}
