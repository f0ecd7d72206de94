//! card-sim as its own crate builds it (CARGO_BIN_EXE_card-sim): connect over
//! vfio-user without a cgroup and run a few commands. The full suite lives in
//! the integration-tests crate (tests/tests/card_link.rs).

use std::time::Duration;

use card_link::sim::process::{SimOptions, SimProcess};
use card_link::CardOptions;

#[test]
fn card_sim_binary_answers_over_vfio_user() {
    std::env::set_var("CARD_SIM_BIN", env!("CARGO_BIN_EXE_card-sim"));
    let sim = SimProcess::spawn(&SimOptions { cgroup: false, ..Default::default() }).expect("spawn card-sim");
    let mut card = card_link::connect_vfio_user(sim.socket_path(), Duration::from_millis(500), CardOptions::default())
        .expect("connect");
    assert_eq!(card.identity().model, "card-sim mc-board");
    for i in 0..10 {
        assert_eq!(card.echo(i, b"ping").expect("echo").arg0, i);
    }
    card.check_health().expect("healthy");
}
