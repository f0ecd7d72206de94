//! Prometheus exposition of the governor's view, KubeVirt-style names
//! (`governor_vm_*{vm,role}`), served on `metrics_addr` at `/metrics`.
//! Base units (seconds, bytes, ratios), `_total` on counters, help on every
//! family.
//!
//! Readings (the kernel's totals, the card's use, where each MC VM runs,
//! health) are rendered from the latest sample into a fresh registry each
//! tick (prometheus-client's encoder); events (moves, decisions, QoS
//! changes, tick durations) are counted as they happen in [`Live`]'s
//! families, which that registry also carries.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::Status;
use crate::governor::LimitStatus;
use crate::placement::runtime::PlacementStatus;
use crate::placement::Side;
use crate::telemetry::{ProgramStat, SchedFallbacks};

mod live;
#[cfg(test)]
mod tests;
pub use live::Live;

/// What one rendering shows.
pub struct Snapshot<'a> {
    pub status: &'a Status,
    pub limits: &'a [LimitStatus],
    pub placement: Option<&'a PlacementStatus>,
    pub programs: &'a [ProgramStat],
    pub sched: SchedFallbacks,
    pub live: &'a Live,
}

/// What the sampling loop hands to the metrics server each tick: the
/// readings, owned. Rendering them (a few ms at 1,000 VMs) happens when a
/// scraper asks, not every tick.
#[derive(Clone, Debug, Default)]
pub struct Readings {
    pub status: Status,
    pub limits: Vec<LimitStatus>,
    pub placement: Option<PlacementStatus>,
    pub programs: Vec<ProgramStat>,
    pub sched: SchedFallbacks,
}

impl Readings {
    pub fn render(&self, live: &Live) -> String {
        render(&Snapshot {
            status: &self.status,
            limits: &self.limits,
            placement: self.placement.as_ref(),
            programs: &self.programs,
            sched: self.sched,
            live,
        })
    }
}

/// The health states the monitor decides, each a label value of
/// `governor_vm_health` (1 for the VM's state, 0 for the others).
const HEALTH_STATES: [&str; 5] = ["starting", "running", "degraded", "stalled", "stopped"];

type Labels = Vec<(&'static str, String)>;
type C = Family<Labels, Counter<f64, AtomicU64>>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;

fn counter(reg: &mut Registry, name: &str, help: &str) -> C {
    let f = C::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str) -> G {
    let f = G::default();
    reg.register(name, help, f.clone());
    f
}

/// The exposition text for one sample.
pub fn render(snap: &Snapshot<'_>) -> String {
    let (status, limits) = (snap.status, snap.limits);
    let mut reg = Registry::with_prefix("governor");
    snap.live.register(&mut reg);
    let cpu = counter(&mut reg, "vm_cpu_usage_seconds", "CPU time of the VM's cgroup, from sched_switch");
    let delay = counter(&mut reg, "vm_vcpu_delay_seconds", "Time the VM's tasks waited runnable in a run queue");
    let ws = gauge(&mut reg, "vm_memory_working_set_bytes", "Memory usage minus inactive file pages");
    let rss = gauge(&mut reg, "vm_memory_resident_bytes", "Anonymous memory of the VM's cgroup");
    let faults = counter(&mut reg, "vm_page_faults", "User-mode page faults");
    let ooms = counter(&mut reg, "vm_oom_kills", "OOM kills while the VM was allocating");
    let rx = counter(&mut reg, "vm_network_receive_bytes", "Bytes the VM received");
    let tx = counter(&mut reg, "vm_network_transmit_bytes", "Bytes the VM sent");
    let cpu_pct = gauge(&mut reg, "vm_cpu_usage_ratio", "CPU use over the last tick (1 = one CPU)");
    for v in &status.vms {
        let l: Labels = vec![("vm", v.name.clone()), ("role", v.role.clone())];
        cpu.get_or_create(&l).inc_by(v.cpu_seconds_total);
        delay.get_or_create(&l).inc_by(v.runq_delay_seconds_total);
        if let Some(b) = v.memory_working_set_bytes {
            ws.get_or_create(&l).set(b as f64);
        }
        if let Some(b) = v.memory_resident_bytes {
            rss.get_or_create(&l).set(b as f64);
        }
        faults.get_or_create(&l).inc_by(v.page_faults_total as f64);
        ooms.get_or_create(&l).inc_by(v.oom_kills_total as f64);
        rx.get_or_create(&l).inc_by(v.rx_bytes_total as f64);
        tx.get_or_create(&l).inc_by(v.tx_bytes_total as f64);
        cpu_pct.get_or_create(&l).set(v.cpu_percent / 100.0);
    }
    let passed_b = counter(&mut reg, "vm_qos_passed_bytes", "Bytes the VM's limit let through");
    let passed_p = counter(&mut reg, "vm_qos_passed_packets", "Packets the VM's limit let through");
    let dropped_b = counter(&mut reg, "vm_qos_dropped_bytes", "Bytes the VM's policer dropped");
    let dropped_p = counter(&mut reg, "vm_qos_dropped_packets", "Packets the VM's policer dropped");
    let tokens = gauge(&mut reg, "vm_qos_tokens_bytes", "Bytes left in the VM's token bucket");
    let rate = gauge(&mut reg, "vm_qos_rate_bytes_per_second", "Rate of the VM's limit in force");
    for q in limits {
        let l: Labels = vec![
            ("vm", q.vm.clone()),
            ("direction", q.direction.as_str().to_string()),
            ("mode", format!("{:?}", q.mode).to_lowercase()),
        ];
        passed_b.get_or_create(&l).inc_by(q.passed_bytes as f64);
        passed_p.get_or_create(&l).inc_by(q.passed_packets as f64);
        dropped_b.get_or_create(&l).inc_by(q.dropped_bytes as f64);
        dropped_p.get_or_create(&l).inc_by(q.dropped_packets as f64);
        if let Some(t) = q.tokens_bytes {
            tokens.get_or_create(&l).set(t as f64);
        }
        rate.get_or_create(&l).set(q.rate_bps as f64 / 8.0);
    }
    health(&mut reg, status);
    if let Some(p) = snap.placement {
        placement(&mut reg, p);
    }
    let run_s = counter(&mut reg, "bpf_program_run_seconds", "Time the kernel ran the program (bpf_stats_enabled)");
    let runs = counter(&mut reg, "bpf_program_runs", "Times the kernel ran the program (bpf_stats_enabled)");
    for p in snap.programs {
        let l: Labels = vec![("program", p.name.clone())];
        run_s.get_or_create(&l).inc_by(p.run_time.as_secs_f64());
        runs.get_or_create(&l).inc_by(p.runs as f64);
    }
    let unseen = counter(
        &mut reg,
        "bpf_sched_unseen_switch_ins",
        "Tasks found on a CPU whose switch-in sched_switch did not see, charged from the scheduler's own slice mark",
    );
    unseen.get_or_create(&Vec::new()).inc_by(snap.sched.unseen_switch_ins as f64);
    let failed = counter(
        &mut reg,
        "bpf_sched_failed_flushes",
        "Gathered scheduler counters dropped because the cgroup map refused an entry (it is full)",
    );
    failed.get_or_create(&Vec::new()).inc_by(snap.sched.failed_flushes as f64);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

fn health(reg: &mut Registry, status: &Status) {
    let h = gauge(reg, "vm_health", "The VM's health as the monitor MC VM decided it (1 = in this state)");
    for v in &status.health {
        for state in HEALTH_STATES {
            let l: Labels = vec![("vm", v.vm.clone()), ("state", state.to_string())];
            h.get_or_create(&l).set(if v.health == state { 1.0 } else { 0.0 });
        }
    }
    let d = gauge(reg, "management_degraded", "1 while an MC VM cannot do its management work");
    d.get_or_create(&Vec::new()).set(if status.management_degraded.is_some() { 1.0 } else { 0.0 });
    let pending = gauge(reg, "vm_log_pending_lines", "Log lines waiting for the log MC VM");
    let written = counter(reg, "vm_log_written_lines", "Log lines the log MC VM numbered and the host wrote");
    let dropped = counter(reg, "vm_log_dropped_lines", "Log lines dropped while the log MC VM could not take them");
    for l in &status.logs {
        let lab: Labels = vec![("vm", l.vm.clone())];
        pending.get_or_create(&lab).set(l.pending as f64);
        written.get_or_create(&lab).inc_by(l.written_log_seq as f64);
        dropped.get_or_create(&lab).inc_by(l.dropped as f64);
    }
}

fn placement(reg: &mut Registry, p: &PlacementStatus) {
    let used = gauge(reg, "card_utilization_ratio", "The card's use of a resource (1 = all of it)");
    let thr = gauge(reg, "card_threshold_ratio", "The threshold the placement keeps the card's use under");
    for r in &p.card.resources {
        let l: Labels = vec![("resource", r.resource.name().to_string())];
        used.get_or_create(&l).set(r.used);
        thr.get_or_create(&l).set(r.threshold);
    }
    let healthy = gauge(reg, "card_healthy", "1 while the card answers and is healthy");
    healthy.get_or_create(&Vec::new()).set(if p.card.healthy { 1.0 } else { 0.0 });
    let side = gauge(reg, "mc_placement", "Where each MC VM runs (1 = on this side)");
    let stopped = gauge(reg, "mc_stopped", "1 when the MC VM was stopped (a hostile answer, a fault)");
    let pause = gauge(reg, "mc_last_move_pause_seconds", "The pause of the MC VM's latest move");
    for t in &p.tasks {
        for (s, name) in [(Side::Card, "card"), (Side::Host, "host")] {
            let l: Labels = vec![("task", t.task.clone()), ("side", name.to_string())];
            side.get_or_create(&l).set(if t.side == s { 1.0 } else { 0.0 });
        }
        let l: Labels = vec![("task", t.task.clone())];
        stopped.get_or_create(&l).set(if t.stopped.is_some() { 1.0 } else { 0.0 });
        if let Some(m) = &t.last_move {
            pause.get_or_create(&l).set(m.pause_ms / 1000.0);
        }
    }
}

/// The same exposition in the Prometheus text format 0.0.4 (what curl,
/// promtool and older scrapers read): a counter family's HELP and TYPE name
/// its `_total` samples; no UNIT lines and no EOF marker.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) { format!("{name}_total") } else { name.to_string() };
                out.push_str(&format!("{p}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Serve the latest rendering at `/metrics` (axum, as the API): OpenMetrics
/// to a scraper that asks for it (Prometheus does), the text format 0.0.4
/// to anything else.
pub async fn serve(addr: SocketAddr, latest: watch::Receiver<std::sync::Arc<Readings>>, live: Live) -> Result<()> {
    use axum::http::header::{ACCEPT, CONTENT_TYPE};
    use axum::http::HeaderMap;
    use axum::routing::get;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("bind metrics on {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let readings = latest.borrow().clone();
            let live = live.clone();
            let open = headers
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            async move {
                // Rendering is CPU work of a few ms at 1,000 VMs: off the runtime's threads.
                let body = tokio::task::spawn_blocking(move || readings.render(&live)).await.unwrap_or_default();
                if open {
                    ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
                } else {
                    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], to_text_format(&body))
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod render_tests {
    use super::*;
    use crate::qos::{Direction, Mode};
    use crate::sampler::VmStatus;

    #[test]
    fn names_and_labels() {
        let status = Status {
            vms: vec![VmStatus {
                name: "web".into(),
                role: "user".into(),
                cpu_seconds_total: 1.5,
                rx_bytes_total: 42,
                ..Default::default()
            }],
            ..Default::default()
        };
        let limits = vec![LimitStatus {
            vm: "web".into(),
            direction: Direction::Egress,
            mode: Mode::Police,
            rate_bps: 1000,
            burst_bytes: 2000,
            packet_rate: None,
            tokens_bytes: Some(7),
            passed_bytes: 1,
            passed_packets: 1,
            dropped_bytes: 3,
            dropped_packets: 2,
        }];
        let live = Live::default();
        let programs =
            vec![ProgramStat { name: "sched_switch".into(), run_time: std::time::Duration::from_millis(3), runs: 9 }];
        let t = render(&Snapshot {
            status: &status,
            limits: &limits,
            placement: None,
            programs: &programs,
            sched: SchedFallbacks { unseen_switch_ins: 4, failed_flushes: 0 },
            live: &live,
        });
        assert!(t.contains(r#"governor_vm_cpu_usage_seconds_total{vm="web",role="user"} 1.5"#), "{t}");
        assert!(t.contains(r#"governor_vm_network_receive_bytes_total{vm="web",role="user"} 42"#), "{t}");
        assert!(
            t.contains(r#"governor_vm_qos_dropped_packets_total{vm="web",direction="egress",mode="police"} 2"#),
            "{t}"
        );
        assert!(t.contains(r#"governor_vm_qos_tokens_bytes{vm="web",direction="egress",mode="police"} 7"#), "{t}");
        assert!(
            t.contains(r#"governor_vm_qos_rate_bytes_per_second{vm="web",direction="egress",mode="police"} 125"#),
            "{t}"
        );
        assert!(t.contains(r#"governor_bpf_program_run_seconds_total{program="sched_switch"} 0.003"#), "{t}");
        assert!(t.contains(r#"governor_bpf_program_runs_total{program="sched_switch"} 9"#), "{t}");
        assert!(t.contains("governor_bpf_sched_unseen_switch_ins_total 4"), "{t}");
        assert!(t.contains("governor_bpf_sched_failed_flushes_total 0"), "{t}");
        assert!(t.ends_with("# EOF\n"));
        let text = to_text_format(&t);
        assert!(text.contains("# HELP governor_vm_cpu_usage_seconds_total CPU time"), "{text}");
        assert!(text.contains("# TYPE governor_vm_cpu_usage_seconds_total counter"), "{text}");
        assert!(text.contains("# TYPE governor_vm_cpu_usage_ratio gauge"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    }
}
