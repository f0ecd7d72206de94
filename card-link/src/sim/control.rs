//! card-sim's control socket: the ECS control service (service requests to
//! create and destroy management VMs), the load knob, and fault injection.
//! One JSON object per line in, one per line out; see ABI.md for the ops.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::device::SimCard;
use crate::mailbox::VmSpec;

pub fn serve(card: Arc<SimCard>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let c = card.clone();
        let _ = std::thread::Builder::new().name("control".into()).spawn(move || handle_conn(c, conn));
    }
}

fn handle_conn(card: Arc<SimCard>, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(v) => match apply(&card, &v) {
                Ok(mut r) => {
                    r["ok"] = json!(true);
                    r
                }
                Err(e) => json!({"ok": false, "error": e}),
            },
            Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

fn num(v: &Value, field: &str) -> Result<Option<f64>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(Some)
            .ok_or_else(|| format!("field {field}: must be a non-negative number")),
    }
}

/// Apply one control request. Requests are checked whole before anything is applied.
pub fn apply(card: &SimCard, v: &Value) -> Result<Value, String> {
    let op = v.get("op").and_then(Value::as_str).ok_or("field op: missing")?;
    match op {
        "status" => Ok(json!({
            "pid": std::process::id(),
            "heartbeat": card.heartbeat(),
            "fpga_completed": card.fpga.completed(),
            "net_bytes": card.net.bytes.load(Ordering::Relaxed),
            "cgroup": card.cfg.cgroup,
        })),
        "load" => {
            let cpu = num(v, "cpu")?;
            let mem = num(v, "mem_mib")?;
            let net = num(v, "net_bps")?;
            let fpga = num(v, "fpga")?;
            let target: Option<SocketAddr> = match v.get("net_target").and_then(Value::as_str) {
                Some(s) => Some(s.parse().map_err(|e| format!("field net_target: {e}"))?),
                None => None,
            };
            if let Some(t) = target {
                if !t.ip().is_loopback() {
                    return Err("field net_target: only loopback peers are allowed".into());
                }
            }
            if cpu.is_some_and(|c| c > 64.0) || mem.is_some_and(|m| m > 65536.0) || fpga.is_some_and(|f| f > 1.0) {
                return Err("load out of range: cpu <= 64 cores, mem_mib <= 65536, fpga <= 1".into());
            }
            if let Some(c) = cpu {
                card.cpu.set(c, card.cfg.load_threads);
            }
            if let Some(m) = mem {
                card.mem.set_mib(m as u64);
            }
            if let Some(n) = net {
                card.net.set(target, n as u64);
            }
            if let Some(f) = fpga {
                card.fpga.set_offered(f);
            }
            Ok(json!({}))
        }
        "fpga_jobs" => {
            let count = num(v, "count")?.unwrap_or(1.0).min(10_000.0) as u32;
            let us = num(v, "service_us")?.unwrap_or(1000.0).min(1e6) as u64;
            let queued = card.fpga.submit(count, Duration::from_micros(us));
            Ok(json!({"queued": queued}))
        }
        "fault" => {
            let kind = v.get("fault").and_then(Value::as_str).ok_or("field fault: missing")?;
            let on = v.get("on").and_then(Value::as_bool).unwrap_or(true);
            match kind {
                "stall" => card.faults.stall.store(on, Ordering::Relaxed),
                "garbage" => card.faults.garbage.store(on, Ordering::Relaxed),
                "slow" => {
                    let ms = num(v, "slow_ms")?.unwrap_or(1000.0).min(600_000.0) as u64;
                    card.faults.slow_ms.store(if on { ms } else { 0 }, Ordering::Relaxed);
                }
                "crash" => {
                    // Die the way crashed firmware does: no cleanup, no goodbye
                    // (SIGKILL rather than abort, so no core file is left behind).
                    // SAFETY: signalling ourselves.
                    unsafe {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                    std::process::abort();
                }
                other => return Err(format!("field fault: unknown fault {other:?} (stall, garbage, slow, crash)")),
            }
            card.log(0, 3, format!("fault {kind} {}", if on { "injected" } else { "cleared" }));
            Ok(json!({}))
        }
        "ecs" => {
            let req = v.get("request").and_then(Value::as_str).ok_or("field request: missing")?;
            match req {
                "create_vm" => {
                    let name = v.get("name").and_then(Value::as_str).ok_or("field name: missing")?;
                    let mem_mib = num(v, "mem_mib")?.unwrap_or(16.0) as u32;
                    let spec = VmSpec { name: name.to_string(), mem_mib, vcpus: 1 };
                    let id = card.ecs_create(&spec)?;
                    Ok(json!({"vm": id}))
                }
                "destroy_vm" => {
                    let id = num(v, "vm")?.ok_or("field vm: missing")? as u32;
                    card.ecs_destroy(id)?;
                    Ok(json!({}))
                }
                other => Err(format!("field request: unknown service request {other:?} (create_vm, destroy_vm)")),
            }
        }
        other => Err(format!("field op: unknown op {other:?} (status, load, fpga_jobs, fault, ecs)")),
    }
}
