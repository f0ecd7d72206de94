//! Prometheus and Grafana (issue 11): the whole system (card-sim, MC VMs,
//! a user VM with a limit under iperf3 load, a move) scraped by Debian's
//! Prometheus on loopback. `promtool check metrics` finds nothing to say
//! about a scrape, every family the dashboard uses is exported, and every
//! query of every panel of `deploy/grafana/dashboards/governor.json`
//! returns data.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use governor::api::Request;
use governor::placement::Side;
use governor::qos::{Direction, LimitSpec, Mode, Quantity};
use integration_tests::placement::{System, SystemOptions};
use integration_tests::*;
use serde_json::Value;

/// Every (panel title, expression) of the dashboard, Grafana's variables
/// replaced the way Grafana would for "All" and a 1 s scrape.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards/governor.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr").replace("$__rate_interval", "5s").replace("$vm", ".*");
            out.push((p["title"].as_str().unwrap_or_default().to_string(), expr));
        }
    }
    assert!(out.len() >= 20, "the dashboard has its panels: {}", out.len());
    out
}

/// The metric families an expression uses (`governor_*`; a histogram's
/// `_bucket` series by its family), as the text format names them.
fn families(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("governor_") {
        let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        out.push(name.strip_suffix("_bucket").map_or(name.clone(), str::to_string));
    }
    out
}

fn prom_query(port: u16, expr: &str) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "-G", &format!("http://127.0.0.1:{port}/api/v1/query"), "--data-urlencode"])
        .arg(format!("query={expr}"))
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn prometheus_and_every_dashboard_query_see_the_whole_system() {
    require_root();
    require_kvm();
    for t in ["prometheus", "promtool", "curl", "iperf3"] {
        require_tool(t);
    }
    let pair = VethPair::new();
    let web = TestCgroup::new("obs-web");
    let _w = web.spawn(&["sh", "-c", "while :; do sleep 0.05; done"]);
    let base = 30000 + (std::process::id() % 15000) as u16 * 2;
    let (metrics_port, prom_port) = (base + 7, base + 8);
    let s = System::start(&SystemOptions {
        mcs: vec![("monitor", None), ("log", None)],
        thresholds: "fpga = 1.0, cpu = 1.0, memory = 1.0, network = 1.0".into(),
        dwell_s: 60,
        tick_ms: 500,
        user_vms: vec![("web".into(), web.cg.rel().to_string_lossy().into_owned())],
        vm_extra: vec![("web".into(), format!("interfaces = [{:?}]\n", pair.host.name))],
        metrics_port: Some(metrics_port),
        vm_logs: true,
        ..SystemOptions::default()
    });
    // A limit at run time, under more load than it lets through.
    let limit = LimitSpec {
        mode: Mode::Police,
        rate: Quantity::Text("100mbit".into()),
        burst: Quantity::Text("3mb".into()),
        packet_rate: None,
    };
    let r = s.call(&Request::SetLimit { vm: "web".into(), direction: Direction::Ingress, limit });
    assert!(r.ok, "{r:?}");
    let tmp = fixtures::TempDir::new("governor-test-obs").expect("prometheus dir");
    let dir = tmp.path().to_path_buf();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: governor\n    static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n"),
    )
    .expect("prometheus.yml");
    let _prom = Guarded(Some(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    ));
    let port = 20000 + (std::process::id() % 20000) as u16;
    let _server = Guarded(Some(
        pair.ns
            .cmd(&["iperf3", "-s", "-1", "-B", &pair.peer_addr, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 server"),
    ));
    std::thread::sleep(Duration::from_millis(300));
    let mut client = Guarded(Some(
        Command::new("iperf3")
            .args(["-c", &pair.peer_addr, "-p", &port.to_string(), "-b", "300M", "-t", "12"])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 client"),
    ));
    std::thread::sleep(Duration::from_secs(3));
    let r = s.call(&Request::Move { task: "log".into(), to: Side::Host });
    assert!(r.ok, "{r:?}");

    // promtool on a scrape of the text exposition.
    std::thread::sleep(Duration::from_secs(2));
    let scrape = Command::new("curl")
        .args(["-sS", &format!("http://127.0.0.1:{metrics_port}/metrics")])
        .output()
        .expect("scrape");
    let text = String::from_utf8_lossy(&scrape.stdout).into_owned();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        promtool.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    }
    let out = promtool.wait_with_output().expect("promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
    let queries = dashboard_queries();
    for (title, expr) in &queries {
        // A panel of rare events shows 0 until the first one (the metrics
        // unit test renders every family the dashboard names).
        if expr.ends_with("or vector(0)") {
            continue;
        }
        for f in families(expr) {
            assert!(text.contains(&format!("# TYPE {f} ")), "{title}: {f} is not exported");
        }
    }
    client.wait_timeout(Duration::from_secs(30)).expect("iperf3 ends");

    // Every panel's every query returns data from Prometheus.
    let t0 = Instant::now();
    let mut missing = queries.clone();
    while !missing.is_empty() {
        missing.retain(|(_, expr)| {
            let v = prom_query(prom_port, expr);
            v["status"] != "success" || v["data"]["result"].as_array().is_none_or(|a| a.is_empty())
        });
        if missing.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "queries without data: {missing:#?}");
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("{} dashboard queries return data (after {:?})", queries.len(), t0.elapsed());
    // A few values that must be right, not just present.
    let v = prom_query(prom_port, "governor_mc_placement{task=\"log\",side=\"host\"}");
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "log runs on the host: {v}");
    let v = prom_query(prom_port, "sum(governor_mc_moves_total{task=\"log\",direction=\"to_host\",result=\"ok\"})");
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "one move to the host: {v}");
    let v = prom_query(prom_port, "governor_vm_qos_rate_bytes_per_second{vm=\"web\",direction=\"ingress\"}");
    assert_eq!(v["data"]["result"][0]["value"][1], "12500000", "100 Mbit/s in bytes: {v}");
    let v = prom_query(prom_port, "sum(governor_bpf_program_runs_total)");
    let runs: f64 = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    assert!(runs > 1000.0, "the kernel counted our programs' runs: {v}");
}
