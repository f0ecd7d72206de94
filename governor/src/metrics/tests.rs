//! Every family the Grafana dashboard queries is rendered, with its help,
//! once each kind of event has happened.

use super::*;
use crate::qos::{Direction, Mode};
use crate::sampler::VmStatus;

/// The `governor_*` names the dashboard's queries use (a histogram's
/// `_bucket` series by its family), as the text format names them.
fn dashboard_families() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards/governor.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("governor_") {
                let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                out.push(name.strip_suffix("_bucket").map_or(name.clone(), str::to_string));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn every_family_the_dashboard_queries_is_rendered_with_help() {
    let status = Status {
        vms: vec![VmStatus {
            name: "web".into(),
            role: "user".into(),
            cpu_seconds_total: 1.0,
            memory_working_set_bytes: Some(1 << 20),
            ..Default::default()
        }],
        health: vec![crate::manage::board::VmHealth {
            vm: "web".into(),
            health: "running".into(),
            reason: "healthy".into(),
            since_ms: 0,
            detail: 0,
        }],
        logs: vec![crate::manage::logs::LogStat { vm: "web".into(), pending: 3, written_log_seq: 9, dropped: 0 }],
        ..Default::default()
    };
    let limits = vec![LimitStatus {
        vm: "web".into(),
        direction: Direction::Ingress,
        mode: Mode::Police,
        rate_bps: 8_000_000,
        burst_bytes: 1 << 20,
        packet_rate: None,
        tokens_bytes: Some(0),
        passed_bytes: 10,
        passed_packets: 1,
        dropped_bytes: 0,
        dropped_packets: 0,
    }];
    let placement: PlacementStatus = serde_json::from_value(serde_json::json!({
        "dry_run": false, "tick": 4,
        "card": {"healthy": true, "resources": [{"resource": "cpu", "used": 0.5, "threshold": 0.7}]},
        "tasks": [{"task": "log", "side": "host", "since_ms": 1, "card_cost": [0.0, 0.1, 0.0, 0.0],
                   "host_cost": {"cpus": 0.1, "memory_bytes": 1}, "pinned": null,
                   "last_move": {"task": "log", "to": "host", "ok": true, "steps": [], "pause_ms": 2.0}}]
    }))
    .expect("placement status");
    let record: crate::placement::audit::AuditRecord = serde_json::from_value(serde_json::json!({
        "time_ms": 1, "tick": 4, "dry_run": false, "card": [], "tasks": [], "reason": "relieve",
        "explain": "x", "moves": [{"task": "log", "to": "host"}],
        "reports": [{"task": "log", "to": "host", "ok": true,
                     "steps": [{"step": "pause", "ms": 1.0}, {"step": "restore", "ms": 3.0}], "pause_ms": 2.0}]
    }))
    .expect("record");
    let live = Live::default();
    live.decision(&record);
    live.tick(0.001);
    live.qos_change(&crate::placement::audit::QosEvent {
        kind: "qos".into(),
        time_ms: 1,
        vm: "web".into(),
        direction: "ingress".into(),
        reason: "card-network".into(),
        detail: 9000,
        rate_bps: Some(1),
        before_bps: None,
        qos_vm: Side::Card,
        applied: true,
        error: None,
    });
    let programs =
        vec![ProgramStat { name: "sched_switch".into(), run_time: std::time::Duration::from_millis(1), runs: 3 }];
    let snap = Snapshot {
        status: &status,
        limits: &limits,
        placement: Some(&placement),
        programs: &programs,
        sched: Default::default(),
        live: &live,
    };
    let text = to_text_format(&render(&snap));
    let families = dashboard_families();
    assert!(families.len() >= 15, "{families:?}");
    for f in &families {
        assert!(text.contains(&format!("# TYPE {f} ")), "{f} is not rendered:\n{text}");
        assert!(text.contains(&format!("# HELP {f} ")), "{f} has no help");
    }
    assert!(text.contains(r#"governor_mc_move_pause_seconds_count{direction="to_host"} 1"#), "{text}");
    assert!(text.contains(r#"governor_mc_moves_total{task="log",direction="to_host",reason="relieve",result="ok"} 1"#));
    assert!(text.contains(r#"governor_vm_health{vm="web",state="running"} 1"#));
    assert!(text.contains(r#"governor_vm_health{vm="web",state="stalled"} 0"#));
    assert!(text.contains(r#"governor_mc_placement{task="log",side="host"} 1"#));
}
