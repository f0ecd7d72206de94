//! `governor run` end to end: status over the socket, pins inspectable with
//! bpftool, clean shutdown, and refusal of wrong configs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use governor::api::{self, Request};
use integration_tests::*;

fn governor_bin() -> PathBuf {
    let p = bin_dir().join("governor");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo xtask test does, or cargo build --release -p governor)",
        p.display()
    );
    p
}

/// A config file, removed on drop.
struct Cfg {
    path: PathBuf,
    _file: TempPath,
}

impl Cfg {
    fn write(text: &str) -> Cfg {
        let file = TempPath::new("governor-test.toml");
        std::fs::write(file.path(), text).expect("write config");
        Cfg { path: file.path().to_path_buf(), _file: file }
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_status_and_clean_shutdown() {
    require_root();
    require_tool("bpftool");
    let cg = TestCgroup::new("dmn");
    let net = VmNet::new(2);
    let pins = PinDir::new();
    let socket = std::env::temp_dir().join(format!("{}.sock", unique("gsock")));
    let rel = cg.cg.rel().to_string_lossy().into_owned();
    let metrics_port = 30000 + (std::process::id() % 20000);
    let cfg = Cfg::write(&format!(
        "tick_ms = 200\npin_dir = {:?}\nsocket = {:?}\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\nqos_ifb = {:?}\n[[vm]]\nname = \"busy\"\ncgroup = {:?}\ninterfaces = [{:?}]\nrole = \"mc\"\n[vm.qos.ingress]\nmode = \"shape\"\nrate = \"50mbit\"\nburst = \"64kb\"\n",
        pins.0,
        socket,
        unique("gifb"),
        rel,
        net.ports[0].1.name
    ));
    let _hog = cg.spawn(&["sh", "-c", "while :; do :; done"]);
    let mut gov = Guarded(Some(
        Command::new(governor_bin())
            .args(["run", "--config"])
            .arg(&cfg.path)
            .stdout(Stdio::null())
            .spawn()
            .expect("start governor"),
    ));
    wait_for("the control socket", Duration::from_secs(10), || socket.exists());
    // Some traffic through the VM's interface.
    net.ports[0].0.exec(&["ping", "-c", "5", "-i", "0.05", "-q", &net.ports[1].2]);
    std::thread::sleep(Duration::from_millis(600));

    let status = api::call(&socket, &Request::Status).expect("status").status.expect("ok");
    assert_eq!(status.tick_ms, 200);
    assert!(status.tick >= 2, "ticks: {}", status.tick);
    let vm = status.vms.iter().find(|v| v.name == "busy").expect("vm busy listed");
    assert_eq!(vm.role, "mc");
    assert_eq!(vm.cgroup_id, cg.cg.id().expect("id"));
    assert!(vm.cpu_percent > 50.0 && vm.cpu_percent < 110.0, "a busy loop shows {}% CPU", vm.cpu_percent);
    assert!(vm.tx_bytes_total > 0 && vm.rx_bytes_total > 0, "ping went both ways: {vm:?}");
    assert!(vm.memory_working_set_bytes.is_some());

    // The CLI prints the table.
    let out = run(Command::new(governor_bin()).args(["status", "--socket"]).arg(&socket));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("busy ")), "table:\n{table}");

    // Limits at run time through the CLI: set, show, clear; refusals name
    // the field.
    let gb = governor_bin();
    let sock = socket.to_str().expect("utf8");
    run(Command::new(&gb)
        .args(["limit", "set", "--socket", sock, "--vm", "busy", "--direction", "egress"])
        .args(["--rate", "20mbit", "--burst", "1mb"]));
    let shown = run(Command::new(&gb).args(["limit", "show", "--socket", sock]));
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("busy") && shown.contains("egress") && shown.contains("police"), "limit show:\n{shown}");
    assert!(shown.contains("ingress") && shown.contains("shape"), "the config's shape limit is listed:\n{shown}");
    let bad = Command::new(&gb)
        .args([
            "limit",
            "set",
            "--socket",
            sock,
            "--vm",
            "busy",
            "--direction",
            "egress",
            "--rate",
            "0",
            "--burst",
            "1kb",
        ])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("limit.egress.rate"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // The trap a new user fell into: a police burst too small for TCP is
    // refused through the CLI (and so the API) with the burst it needs;
    // that burst is taken.
    let small = Command::new(&gb)
        .args(["limit", "set", "--socket", sock, "--vm", "busy", "--direction", "ingress"])
        .args(["--rate", "50mbit", "--burst", "64kb"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(!small.status.success());
    assert!(
        err.contains("limit.ingress.burst")
            && err.contains("too small to police TCP")
            && err.contains("at least 1526kb"),
        "{err}"
    );
    run(Command::new(&gb)
        .args(["limit", "set", "--socket", sock, "--vm", "busy", "--direction", "ingress"])
        .args(["--rate", "50mbit", "--burst", "1526kb"]));
    // Shaping queues instead, and takes the small burst (the config's limit again).
    run(Command::new(&gb)
        .args(["limit", "set", "--socket", sock, "--vm", "busy", "--direction", "ingress"])
        .args(["--rate", "50mbit", "--burst", "64kb", "--mode", "shape"]));
    let help = run(Command::new(&gb).args(["limit", "set", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--burst 3mb") && help.contains("250 ms of the rate"), "the help's example:\n{help}");
    run(Command::new(&gb).args(["limit", "clear", "--socket", sock, "--vm", "busy", "--direction", "egress"]));

    // Prometheus exposition.
    std::thread::sleep(Duration::from_millis(400));
    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port as u16)).expect("metrics port");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body
    };
    assert!(metrics.contains("governor_vm_cpu_usage_seconds_total{vm=\"busy\",role=\"mc\"}"), "metrics:\n{metrics}");
    assert!(
        metrics.contains(
            "governor_vm_qos_rate_bytes_per_second{vm=\"busy\",direction=\"ingress\",mode=\"shape\"} 6250000"
        ),
        "metrics:\n{metrics}"
    );

    // Pinned maps carry BTF: bpftool prints field names.
    let dump = run(Command::new("bpftool").args(["map", "dump", "pinned"]).arg(pins.0.join("CGROUPS")));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("\"on_cpu_ns\"") && dump.contains("\"runq_hist\""), "bpftool dump lacks field names");
    // The VMs' counters: slot 0 on CPU 0 names its owner, the VM's cgroup.
    let slot0 = run(Command::new("bpftool")
        .args(["map", "lookup", "pinned"])
        .arg(pins.0.join("VM_STATS"))
        .args(["key", "0", "0", "0", "0"]));
    let slot0 = String::from_utf8_lossy(&slot0.stdout);
    assert!(slot0.contains("\"owner\"") && slot0.contains("\"on_cpu_ns\""), "VM_STATS lookup: {slot0}");

    // A second governor on the same socket refuses to start and leaves the
    // first one's pins alone.
    let second =
        Command::new(governor_bin()).args(["run", "--config"]).arg(&cfg.path).output().expect("second governor");
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another governor"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(pins.0.join("CGROUPS").exists(), "the first governor's pins are intact");
    assert!(api::call(&socket, &Request::Status).expect("status").ok);

    // SIGTERM: exits cleanly, detaches, unpins, removes its socket.
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(gov.child().id() as i32, libc::SIGTERM) };
    let st = gov.wait_timeout(Duration::from_secs(10)).expect("governor exits on SIGTERM");
    assert!(st.success(), "exit status {st}");
    assert!(!pins.0.exists(), "pins left behind in {}", pins.0.display());
    assert!(!socket.exists(), "socket left behind");
    let filters = run(Command::new("tc").args(["filter", "show", "dev", &net.ports[0].1.name, "ingress"]));
    assert!(!String::from_utf8_lossy(&filters.stdout).contains("gov_tc_ingress"), "tc filter left attached");
    let qdisc = run(Command::new("tc").args(["qdisc", "show", "dev", &net.ports[0].1.name]));
    assert!(!String::from_utf8_lossy(&qdisc.stdout).contains("htb"), "HTB left after shutdown");
}

fn refused(cfg_text: &str, field: &str) {
    let cfg = Cfg::write(cfg_text);
    let out = Command::new(governor_bin()).args(["run", "--config"]).arg(&cfg.path).output().expect("run governor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "config was accepted:\n{cfg_text}");
    assert!(err.contains(field), "error does not name {field}: {err}");
}

#[test]
fn wrong_configs_are_refused_whole() {
    require_root();
    let cg = TestCgroup::new("cfg");
    let cg2 = TestCgroup::new("cfg");
    let rel = cg.cg.rel().to_string_lossy().into_owned();
    let rel2 = cg2.cg.rel().to_string_lossy().into_owned();
    let pins = PinDir::new();
    let base = format!("pin_dir = {:?}\n", pins.0);
    refused(&format!("{base}tick_ms = 10\n"), "tick_ms");
    refused(
        &format!("{base}[[vm]]\nname = \"a\"\ncgroup = \"governor-test/none-{}\"\n", std::process::id()),
        "vm[0].cgroup",
    );
    // The first VM is fine, the second names an interface that does not
    // exist: nothing may be attached or pinned.
    refused(
        &format!("{base}[[vm]]\nname = \"a\"\ncgroup = {rel:?}\ninterfaces = [\"lo\"]\n[[vm]]\nname = \"b\"\ncgroup = {rel2:?}\ninterfaces = [\"nope0\"]\n"),
        "vm[1].interfaces[0]",
    );
    assert!(!Path::new(&pins.0).exists(), "a refused config left pins");
    let filters = run(Command::new("tc").args(["filter", "show", "dev", "lo", "ingress"]));
    assert!(
        !String::from_utf8_lossy(&filters.stdout).contains("gov_tc_ingress"),
        "a refused config left a filter on lo"
    );
}

/// Debian's Prometheus scrapes the governor's exposition and can query it.
#[test]
fn prometheus_scrapes_the_governor() {
    require_root();
    require_tool("prometheus");
    require_tool("curl");
    let cg = TestCgroup::new("prom");
    let pins = PinDir::new();
    let socket = std::env::temp_dir().join(format!("{}.sock", unique("gsock")));
    let metrics_port = 30000 + (std::process::id() % 20000) + 1;
    let prom_port = metrics_port + 1;
    let cfg = Cfg::write(&format!(
        "tick_ms = 200\npin_dir = {:?}\nsocket = {:?}\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\n[[vm]]\nname = \"promvm\"\ncgroup = {:?}\n",
        pins.0,
        socket,
        cg.cg.rel().to_string_lossy()
    ));
    let _hog = cg.spawn(&["sh", "-c", "while :; do :; done"]);
    let _gov = Guarded(Some(
        Command::new(governor_bin())
            .args(["run", "--config"])
            .arg(&cfg.path)
            .stderr(Stdio::null())
            .spawn()
            .expect("governor"),
    ));
    let tmp = TempDir::new("governor-test-prom").expect("prometheus dir");
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
    let url = format!("http://127.0.0.1:{prom_port}/api/v1/query?query=rate(governor_vm_cpu_usage_seconds_total%7Bvm%3D%22promvm%22%7D%5B5s%5D)");
    let start = Instant::now();
    let value = loop {
        assert!(start.elapsed() < Duration::from_secs(40), "Prometheus never returned the governor's series");
        std::thread::sleep(Duration::from_secs(1));
        let Ok(out) = Command::new("curl").args(["-s", &url]).output() else { continue };
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        // {"status":"success","data":{"result":[{"metric":{...},"value":[t,"0.98"]}]}}
        if let Some(v) = body.split("\"value\":[").nth(1).and_then(|r| r.split('"').nth(1)) {
            if let Ok(v) = v.parse::<f64>() {
                break v;
            }
        }
    };
    eprintln!("Prometheus: rate(governor_vm_cpu_usage_seconds_total{{vm=\"promvm\"}}[5s]) = {value:.3}");
    // A busy loop uses at most one CPU (less on a loaded host); what matters
    // is that the series is scraped, parsed and rising.
    assert!(value > 0.05 && value < 1.1, "a busy loop's CPU rate, as Prometheus computes it: {value}");
}
