//! Prometheus exposition of the governor's view, KubeVirt-style names
//! (`governor_vm_*{vm,role}`), served on `metrics_addr` at `/metrics`.
//!
//! The counters are totals kept by the kernel programs, so each scrape's
//! text is rendered from the latest sample into a fresh registry (with
//! prometheus-client's encoder) rather than mirrored into live metrics.
//! The HTTP side is a few lines on a tokio listener: one GET, one answer;
//! a web framework would add nothing but build time.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::Status;
use crate::governor::LimitStatus;

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
pub fn render(status: &Status, limits: &[LimitStatus]) -> String {
    let mut reg = Registry::with_prefix("governor");
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
    let rate = gauge(&mut reg, "vm_qos_rate_bits_per_second", "Configured rate of the VM's limit");
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
        rate.get_or_create(&l).set(q.rate_bps as f64);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Serve the latest rendering at any GET (Prometheus scrapes `/metrics`).
pub async fn serve(addr: SocketAddr, latest: watch::Receiver<String>) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("bind metrics on {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            let body = latest.borrow().clone();
            tokio::spawn(async move {
                let mut req = [0u8; 1024];
                // Any GET is answered; a scraper that sends nothing or hangs up
                // early only loses its own answer.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut req)).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                // A scraper that hung up early only loses its own answer.
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
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
        let t = render(&status, &limits);
        assert!(t.contains(r#"governor_vm_cpu_usage_seconds_total{vm="web",role="user"} 1.5"#), "{t}");
        assert!(t.contains(r#"governor_vm_network_receive_bytes_total{vm="web",role="user"} 42"#), "{t}");
        assert!(
            t.contains(r#"governor_vm_qos_dropped_packets_total{vm="web",direction="egress",mode="police"} 2"#),
            "{t}"
        );
        assert!(t.contains(r#"governor_vm_qos_tokens_bytes{vm="web",direction="egress",mode="police"} 7"#), "{t}");
        assert!(t.ends_with("# EOF\n"));
    }
}
