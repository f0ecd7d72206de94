//! card-sim's control socket: the ECS control service (service requests to
//! create and destroy management VMs), the load knob, and fault injection.
//! One JSON object per line in, one per line out; the protocol is in
//! `request`, the ops in ABI.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use card_link::mailbox::VmSpec;

use crate::costs::Owner;
use crate::device::{lock, SimCard};
use crate::error::ApplyError;
use crate::request::{self, CardStatus, EcsRequest, Fault, Reply, Request, DEFAULT_SLOW_MS};

/// Accept control connections until the listener fails; each is served on
/// its own thread.
pub fn serve(card: Arc<SimCard>, listener: UnixListener) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                continue;
            }
        };
        let c = card.clone();
        if let Err(e) = std::thread::Builder::new().name("control".into()).spawn(move || handle_conn(c, conn)) {
            tracing::warn!("control socket: cannot start a thread for a connection (dropped): {e}");
        }
    }
}

fn handle_conn(card: Arc<SimCard>, conn: UnixStream) {
    let mut out = match conn.try_clone() {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("control socket: cannot clone the connection (dropped): {e}");
            return;
        }
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return }; // the client went away
        if line.trim().is_empty() {
            continue;
        }
        let reply = match request::parse(&line) {
            Ok(req) => apply(&card, &req).unwrap_or_else(|e| Reply::refused(e.to_string())),
            Err(why) => Reply::refused(why.to_string()),
        };
        let text = match serde_json::to_string(&reply) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("control socket: cannot encode a reply: {e}");
                return;
            }
        };
        if writeln!(out, "{text}").is_err() {
            return; // the client went away
        }
    }
}

/// On whose behalf an engine works: VM `vm` (which must exist; `field`
/// names the request's field in the refusal), or the card for none or 0.
fn owner(card: &SimCard, field: &'static str, vm: Option<u32>) -> Result<Owner, ApplyError> {
    match vm {
        None | Some(0) => Ok(Weak::new()),
        Some(id) => card.vm_counters(id).map(|c| Arc::downgrade(&c)).ok_or(ApplyError::NoSuchVm { field, vm: id }),
    }
}

/// Apply one request, already checked whole by `request::parse`.
pub fn apply(card: &SimCard, req: &Request) -> Result<Reply, ApplyError> {
    match req {
        Request::Status {} => Ok(Reply {
            status: Some(CardStatus {
                pid: std::process::id(),
                heartbeat: card.heartbeat(),
                fpga_completed: card.fpga.completed(),
                net_bytes: card.net.bytes.load(Ordering::Relaxed),
                cgroup: card.cgroup_name(),
            }),
            ..Reply::ok()
        }),
        Request::Load(load) => {
            // Looked up first: a VM that is not there refuses the whole request.
            let net_owner = load.net_vm.map(|vm| owner(card, "net_vm", Some(vm))).transpose()?;
            if let Some(o) = net_owner {
                // 0: the card's own traffic again.
                card.net.set_owner((o.strong_count() > 0).then_some(o));
            }
            if let Some(c) = load.cpu {
                card.cpu.set(c, card.cfg.load_threads);
            }
            if let Some(m) = load.mem_mib {
                card.mem.set_mib(m);
            }
            if let Some(n) = load.net_bps {
                card.net.set(load.net_target, n);
            }
            if let Some(f) = load.fpga {
                card.fpga.set_offered(f);
            }
            Ok(Reply::ok())
        }
        Request::FpgaJobs { count, service_us, vm } => {
            let on_behalf = owner(card, "vm", *vm)?;
            let queued = card.fpga.submit(*count, Duration::from_micros(*service_us), &on_behalf);
            Ok(Reply { queued: Some(queued as u64), ..Reply::ok() })
        }
        Request::Agent { vm, request, arg } => match card.agent(*vm, *request, *arg) {
            None => Err(ApplyError::NoSuchVm { field: "vm", vm: *vm }),
            Some(Err(source)) => Err(ApplyError::Agent { vm: *vm, source }),
            Some(Ok(reply)) => Ok(Reply { agent: Some(reply), ..Reply::ok() }),
        },
        Request::Forward { listen, to } => {
            let port = card.forwards.add(*listen, *to, card.net.bytes.clone()).map_err(ApplyError::Forward)?;
            Ok(Reply { port: Some(port), ..Reply::ok() })
        }
        Request::Unforward { port } => {
            if card.forwards.remove(*port) {
                Ok(Reply::ok())
            } else {
                Err(ApplyError::NoForward(*port))
            }
        }
        Request::Fault { fault, on, slow_ms } => {
            let on = *on;
            match fault {
                Fault::Stall => card.faults.stall.store(on, Ordering::Relaxed),
                Fault::Silent => card.faults.silent.store(on, Ordering::Relaxed),
                Fault::Garbage => {
                    card.faults.garbage.store(on, Ordering::Relaxed);
                    // A mapped BAR0 is what the host reads: rewrite it now,
                    // not at the next heartbeat.
                    card.refresh();
                }
                Fault::Slow => {
                    let ms = slow_ms.unwrap_or(DEFAULT_SLOW_MS);
                    card.faults.slow_ms.store(if on { ms } else { 0 }, Ordering::Relaxed);
                }
                Fault::Crash => {
                    // Whatever ran on the card dies with it.
                    for pid in lock(&card.vms).pids() {
                        // SAFETY: kill(2) on our own VMM child; no memory is touched.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    }
                    crash()
                }
            }
            let state = if on { "injected" } else { "cleared" };
            card.log(0, 3, format!("fault {} {state}", fault.name()));
            Ok(Reply::ok())
        }
        Request::Ecs(EcsRequest::CreateVm { name, mem_mib }) => {
            let spec = VmSpec { name: name.clone(), mem_mib: *mem_mib, vcpus: 1 };
            let id = card.ecs_create(&spec).map_err(|source| ApplyError::Ecs { op: "create_vm", source })?;
            Ok(Reply { vm: Some(id), ..Reply::ok() })
        }
        Request::Ecs(EcsRequest::DestroyVm { vm }) => {
            card.ecs_destroy(*vm).map_err(|source| ApplyError::Ecs { op: "destroy_vm", source })?;
            Ok(Reply::ok())
        }
    }
}

/// Die the way crashed firmware does: no cleanup, no goodbye (SIGKILL rather
/// than abort, so no core file is left behind).
fn crash() -> ! {
    // SAFETY: signalling ourselves.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort();
}
