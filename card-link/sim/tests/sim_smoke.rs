//! card-sim as its own crate builds it (CARGO_BIN_EXE_card-sim, handed to
//! the launcher as `SimOptions::binary`, not through the environment: tests
//! run on parallel threads): connect over vfio-user without a cgroup, run a
//! few commands, and drive the control socket with typed requests. The full
//! suite lives in the integration-tests crate (tests/tests/card_link.rs).

use std::time::Duration;

use card_link::CardOptions;
use card_sim::{EcsRequest, Request, SimError, SimOptions, SimProcess};

fn spawn() -> SimProcess {
    let binary = Some(env!("CARGO_BIN_EXE_card-sim").into());
    SimProcess::spawn(&SimOptions { cgroup: false, binary, ..Default::default() }).expect("spawn card-sim")
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
