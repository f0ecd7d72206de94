//! A broken or hostile guest stops only its own VM, with a typed reason;
//! the host process and the other VMs carry on. The agent has self-test
//! requests that misbehave on purpose.

mod vmm_support;

use std::time::Duration;

use vmm::host::api::{AgentOp, ErrorKind};
use vmm::proto::{op, PONG, UNMAPPED_MMIO};
use vmm::{Error, RunState, Sinks, StopReason, Vm, VmConfig};
use vmm_support::*;

const T: Duration = Duration::from_secs(10);

fn boot() -> Vm {
    require_kvm();
    let vm = Vm::create(&VmConfig::new(guest_elf(), 16), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    vm
}

/// Make `victim` misbehave with `opcode`; return why it stopped, after
/// checking that a bystander VM in the same process still answers.
fn misbehave(opcode: u64) -> StopReason {
    let bystander = boot();
    let victim = boot();
    match victim.request(opcode, 0, T) {
        Err(Error::Stopped(_)) => {}
        other => panic!("expected the VM to stop, got {other:?}"),
    }
    let reason = victim.wait_stopped(T).expect("victim stopped");
    assert!(matches!(victim.state(), RunState::Stopped(_)));
    assert!(victim.request(op::PING, 0, T).is_err(), "a stopped VM refuses requests");
    let r = bystander.request(op::PING, 0, T).expect("bystander still answers");
    assert_eq!(r.value, PONG);
    reason
}

#[test]
fn unknown_mmio_access_stops_that_vm() {
    let r = misbehave(op::BAD_MMIO);
    assert!(matches!(&r, StopReason::UnknownMmio { addr, .. } if *addr == UNMAPPED_MMIO), "reason: {r:?}");
    assert!(r.to_string().contains("0xe0000000"), "message names the address: {r}");
}

#[test]
fn descriptor_outside_guest_memory_stops_that_vm() {
    let r = misbehave(op::BAD_DESCRIPTOR);
    match &r {
        StopReason::Device(msg) => assert!(msg.contains("outside guest memory"), "message: {msg}"),
        other => panic!("reason: {other:?}"),
    }
}

#[test]
fn triple_fault_stops_that_vm() {
    let r = misbehave(op::TRIPLE_FAULT);
    assert!(matches!(r, StopReason::TripleFault { .. }), "reason: {r:?}");
}

#[test]
fn wrong_register_width_stops_that_vm() {
    let r = misbehave(op::BAD_WIDTH);
    match &r {
        StopReason::Device(msg) => assert!(msg.contains("width 8"), "message: {msg}"),
        other => panic!("reason: {other:?}"),
    }
}

#[test]
fn a_vmm_process_with_a_crashed_guest_keeps_serving() {
    require_kvm();
    use serde_json::json;
    let elf = guest_elf();
    let mut p = VmmProc::spawn(&["--guest", elf.to_str().expect("utf-8"), "--mem-mib", "16"]);
    let err = p.client.request(AgentOp::TripleFault, 0).expect_err("the VM stops");
    assert!(err.kind() == ErrorKind::Stopped && err.to_string().contains("triple fault"), "{err}");
    let s = p.call(json!({"cmd": "state"}));
    assert!(s["state"]["Stopped"]["TripleFault"].is_object(), "state names the reason: {s}");
    let again = p.client.call_json(&json!({"cmd": "request", "op": "ping"})).expect_err("a stopped VM refuses");
    assert!(again.to_string().contains("stopped"), "{again}");
    assert!(p.child.child().try_wait().expect("wait").is_none(), "the process is still up");
    p.call(json!({"cmd": "shutdown"}));
}
