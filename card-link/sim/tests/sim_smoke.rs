//! card-sim as its own crate builds it (CARGO_BIN_EXE_card-sim, handed to
//! the launcher as `SimOptions::binary`, not through the environment: tests
//! run on parallel threads): connect over vfio-user without a cgroup, run a
//! few commands, and drive the control socket with typed requests. The full
//! suite lives in the integration-tests crate (tests/tests/card_link.rs).

use std::time::Duration;

use card_link::card::Access;
use card_link::mailbox::VmSpec;
use card_link::CardOptions;
use card_sim::{EcsRequest, Fault, Request, SimError, SimOptions, SimProcess};

fn spawn() -> SimProcess {
    spawn_with(true)
}

fn spawn_with(mmap: bool) -> SimProcess {
    let binary = Some(env!("CARGO_BIN_EXE_card-sim").into());
    SimProcess::spawn(&SimOptions { cgroup: false, binary, mmap, ..Default::default() }).expect("spawn card-sim")
}

/// A card VM's snapshot, streamed to the host, checked, streamed back and
/// restored; returns whether the streams went by DMA.
fn snapshot_round_trip(card: &mut card_link::Card) -> bool {
    let vm = card.start_vm(&VmSpec { name: "mc-stream".into(), mem_mib: 8, vcpus: 1 }).expect("start");
    let info = card.snapshot_vm(vm).expect("snapshot");
    assert!(info.size > 4 << 20, "a dense 8 MiB image spans several DMA chunks: {}", info.size);
    let mut image = Vec::new();
    assert_eq!(card.read_snapshot(vm, &info, &mut image).expect("stream out"), info.size);
    assert_eq!(crc32fast::hash(&image), info.crc);
    let out_dma = card.last_stream().expect("stats").dma;
    card.stop_vm(vm).expect("stop");
    let spec = VmSpec { name: "mc-stream-back".into(), mem_mib: 8, vcpus: 1 };
    let back = card.restore_vm(&spec, image.len() as u64, &mut image.as_slice()).expect("stream in");
    let in_dma = card.last_stream().expect("stats").dma;
    assert_eq!(out_dma, in_dma);
    // The card checked the image whole (its CRC at restore-commit); the
    // restored VM is in its table.
    let vms = card.list_vms().expect("list");
    assert!(vms.iter().any(|v| v.id == back && v.name == "mc-stream-back"), "{vms:?}");
    card.stop_vm(back).expect("stop restored");
    out_dma
}

#[test]
fn mapped_bars_futex_doorbell_and_dma_streams() {
    let sim = spawn();
    let mut card = card_link::connect_vfio_user(sim.socket_path(), Duration::from_millis(500), CardOptions::default())
        .expect("connect");
    let info = card.transport_info();
    assert_eq!(info.access, Access::Mapped, "{info}");
    assert!(info.dma_streams, "{info}");
    for i in 0..2000 {
        assert_eq!(card.echo(i, &i.to_le_bytes()).expect("echo").arg0, i);
        if i % 400 == 0 {
            // Let the card fall asleep on its futex between some commands.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let r = card.registers().expect("mapped registers");
    assert_eq!(r.serial, card.identity().serial);
    assert!(snapshot_round_trip(&mut card), "streams went by mailbox: {}", card.transport_info());
    card.check_health().expect("healthy");
    // Garbage registers in mapped memory are refused like any others.
    sim.control(&Request::fault(Fault::Garbage, true)).expect("garbage on");
    assert!(card.registers().is_err(), "garbage accepted");
    sim.control(&Request::fault(Fault::Garbage, false)).expect("garbage off");
    card.check_health().expect("healthy again");
}

#[test]
fn a_card_without_mmap_is_reached_by_messages() {
    let sim = spawn_with(false);
    let mut card = card_link::connect_vfio_user(sim.socket_path(), Duration::from_millis(500), CardOptions::default())
        .expect("connect");
    let info = card.transport_info();
    assert!(matches!(info.access, Access::Messages { .. }), "{info}");
    assert!(!info.dma_streams, "{info}");
    assert!(info.to_string().contains("does not offer mapped BARs"), "{info}");
    for i in 0..100 {
        assert_eq!(card.echo(i, b"ping").expect("echo").arg0, i);
    }
    assert!(!snapshot_round_trip(&mut card), "no DMA on a card without mmap");
    card.check_health().expect("healthy");
}

#[test]
fn messages_can_be_asked_for_on_a_mapped_card() {
    let sim = spawn();
    let t = card_link::VfioUserTransport::connect(sim.socket_path(), Duration::from_millis(500)).expect("connect");
    let mut card = card_link::Card::open_with(Box::new(t), CardOptions::default(), card_link::card::LinkMode::Messages)
        .expect("open");
    assert_eq!(card.transport_info().access, Access::Messages { why: "messages asked for" });
    for i in 0..100 {
        assert_eq!(card.echo(i, b"ping").expect("echo").arg0, i);
    }
    card.registers().expect("registers by message");
}

#[test]
fn card_sim_binary_answers_over_vfio_user() {
    let sim = spawn();
    let mut card = card_link::connect_vfio_user(sim.socket_path(), Duration::from_millis(500), CardOptions::default())
        .expect("connect");
    assert_eq!(card.identity().model, "card-sim mc-board");
    for i in 0..10 {
        assert_eq!(card.echo(i, b"ping").expect("echo").arg0, i);
    }
    card.check_health().expect("healthy");
}

#[test]
fn control_socket_takes_typed_requests_and_refuses_whole() {
    let sim = spawn();
    let status = sim.control(&Request::Status {}).expect("status").status.expect("status fields");
    assert_eq!(status.pid, sim.pid());
    assert_eq!(status.cgroup, None, "launched without a cgroup");
    let create = Request::Ecs(EcsRequest::CreateVm { name: "mc-smoke".into(), mem_mib: 4 });
    let vm = sim.control(&create).expect("ecs create").vm.expect("vm id");
    // The same name again is refused by the card, with its reason.
    match sim.control(&create) {
        Err(SimError::Refused(why)) => assert!(why.contains("exists"), "{why}"),
        other => panic!("second create_vm: {other:?}"),
    }
    sim.control(&Request::Ecs(EcsRequest::DestroyVm { vm })).expect("ecs destroy");
    // A raw line with a wrongly typed field: refused, naming the field.
    let bad = serde_json::json!({"op": "load", "cpu": 0.5, "mem_mib": "lots"});
    match sim.control(&bad) {
        Err(SimError::Refused(why)) => assert!(why.starts_with("field mem_mib:"), "{why}"),
        other => panic!("bad load: {other:?}"),
    }
    // status has no fields: one it does not have is refused too.
    match sim.control(&serde_json::json!({"op": "status", "bogus": 1})) {
        Err(SimError::Refused(why)) => assert!(why.contains("unknown field `bogus`"), "{why}"),
        other => panic!("status with a bogus field: {other:?}"),
    }
}

#[test]
fn a_second_host_connection_maps_again() {
    let sim = spawn();
    for round in 0..3u64 {
        let mut raw =
            card_link::VfioUserTransport::connect(sim.socket_path(), Duration::from_millis(500)).expect("raw");
        let mut w = [0u8; 4];
        for _ in 0..1000 {
            card_link::Transport::read(&mut raw, 0, 0, &mut w).expect("raw read");
        }
        drop(raw);
        let mut card =
            card_link::connect_vfio_user(sim.socket_path(), Duration::from_millis(500), CardOptions::default())
                .unwrap_or_else(|e| panic!("connect {round}: {e}"));
        assert_eq!(card.transport_info().access, Access::Mapped);
        assert_eq!(card.echo(round, b"again").expect("echo").arg0, round);
    }
}
