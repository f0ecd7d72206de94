//! Status monitoring done by the monitor MC VM wherever it runs (claim
//! 14): on the card (its agent reached through the card's `agent-bulk`
//! op) and on the host (its vmm process), moved live between them; the
//! health states it decided stay with it across the moves.

use std::time::Duration;

use card_sim::process::{SimOptions, SimProcess};
use governor::placement::card::CardSite;
use governor::placement::host::{HostSite, HostSiteOptions};
use governor::placement::mover::{move_task_with, Sites};
use governor::placement::{HostCost, Side};
use integration_tests::*;
use vmm::proto::signals::{Health, HealthChange, Reason, VmSignals, FLAG_EXISTS, FLAG_MEM_LIMIT};

fn fleet() -> Vec<VmSignals> {
    (0..200)
        .map(|slot| VmSignals {
            slot,
            flags: FLAG_EXISTS | FLAG_MEM_LIMIT,
            cpu_ns_total: 1_000 + slot as u64,
            working_set: 16 << 20,
            mem_limit: 64 << 20,
            ..VmSignals::default()
        })
        .collect()
}

fn of(changes: &[HealthChange], slot: u32) -> Option<(Health, Reason)> {
    changes.iter().find(|c| c.slot == slot).map(|c| (c.health, c.reason))
}

#[test]
fn the_monitor_vm_keeps_its_health_states_across_moves_between_card_and_host() {
    require_root();
    require_kvm();
    let before = Inventory::take();
    {
        let sim =
            SimProcess::spawn(&SimOptions { guest: Some(guest_elf()), ..SimOptions::default() }).expect("card-sim");
        let card =
            card_link::connect_vfio_user(sim.socket_path(), Duration::from_secs(2), card_link::CardOptions::default())
                .expect("card link");
        let run = TempDir::new("governor-test-mon").expect("run dir");
        let host = HostSite::new(
            HostSiteOptions {
                vmm_bin: bin_dir().join("vmm"),
                guest: guest_elf(),
                run_dir: run.path().join("host"),
                subtree: unique_long("governor-test-mon"),
                reserve: HostCost { cpus: 1.0, memory_bytes: 512 << 20 },
            },
            &cgroupfs::Layout::detect().expect("layout"),
        )
        .expect("host site");
        let mut sites = Sites { card: CardSite::new(card), host };
        sites.card.cold_start("monitor", 32).expect("monitor on the card");

        // On the card: every VM new; a stalled one, an OOM on tick 2.
        let mut batch = fleet();
        batch[3].quiet_ms = 30_000;
        let first = sites.card.monitor_tick("monitor", 1, &batch).expect("tick on the card");
        assert_eq!(first.len(), 200);
        assert_eq!(of(&first, 3), Some((Health::Stalled, Reason::NoProgress)));
        batch[8].oom_kills_total = 2;
        let second = sites.card.monitor_tick("monitor", 2, &batch).expect("tick 2 on the card");
        assert_eq!(second.iter().map(|c| (c.slot, c.health, c.reason)).collect::<Vec<_>>(), vec![(
            8,
            Health::Degraded,
            Reason::OomKilled
        )]);

        // Moved to the host (pre-copy): the same states, nothing new.
        let r = move_task_with(&mut sites, "monitor", Side::Card, true);
        assert!(r.ok, "{r:?}");
        let third = sites.host.monitor_tick("monitor", 3, &batch).expect("tick on the host");
        assert!(third.is_empty(), "the states moved with the VM: {third:?}");
        batch[3].quiet_ms = 0;
        let fourth = sites.host.monitor_tick("monitor", 4, &batch).expect("tick 4 on the host");
        assert_eq!(of(&fourth, 3), Some((Health::Running, Reason::Healthy)));

        // And back to the card: still the same memory.
        let r = move_task_with(&mut sites, "monitor", Side::Host, true);
        assert!(r.ok, "{r:?}");
        let fifth = sites.card.monitor_tick("monitor", 5, &batch).expect("tick on the card again");
        assert!(fifth.is_empty(), "{fifth:?}");
        // The card's relay checks the host's message too: an oversize batch
        // is refused before it reaches the agent.
        let too_many: Vec<VmSignals> = (0..1025).map(|slot| VmSignals { slot, ..batch[0] }).collect();
        assert!(sites.card.monitor_tick("monitor", 6, &too_many).is_err());
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}
