//! The governor's HTTP API on its UNIX socket (issue 11), spoken with curl
//! the way an operator would: every resource, a bad input for each (a 4xx
//! whose message names the field, and nothing changed), and the socket's
//! mode 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use integration_tests::placement::{System, SystemOptions};
use integration_tests::*;
use serde_json::Value;

/// One request with curl: the status and the JSON body.
fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-X", method, "--unix-socket"]).arg(sock);
    c.args(["-w", "\n%{http_code}", &format!("http://governor{path}")]);
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = c.output().expect("curl");
    assert!(out.status.success(), "curl {method} {path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').expect("status line");
    let code: u16 = code.trim().parse().expect("status code");
    let v = if json.trim().is_empty() { Value::Null } else { serde_json::from_str(json).expect(json) };
    (code, v)
}

/// The request is refused with `code` and a message containing `names`.
fn refused(sock: &Path, method: &str, path: &str, body: Option<&str>, code: u16, names: &str) {
    let (c, v) = curl(sock, method, path, body);
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(c, code, "{method} {path}: {v}");
    assert!(msg.contains(names), "{method} {path}: the message names {names:?}: {msg}");
    eprintln!("{method} {path} -> {c} {msg}");
}

#[test]
fn every_resource_answers_and_bad_input_gets_a_4xx_naming_the_field() {
    require_root();
    require_kvm();
    require_tool("curl");
    let pair = VethPair::new();
    let web = TestCgroup::new("api-web");
    let _w = web.spawn(&["sh", "-c", "while :; do sleep 0.1; done"]);
    let mut s = System::start(&SystemOptions {
        mcs: vec![("log", None), ("monitor", None)],
        thresholds: "fpga = 1.0, cpu = 1.0, memory = 1.0, network = 1.0".into(),
        dwell_s: 60,
        user_vms: vec![("web".into(), web.cg.rel().to_string_lossy().into_owned())],
        vm_logs: true,
        vm_extra: vec![("web".into(), format!("interfaces = [{:?}]\n", pair.host.name))],
        ..SystemOptions::default()
    });
    let sock = s.socket.clone();
    let mode = std::fs::metadata(&sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket is 0600");
    s.wait("a first sample", std::time::Duration::from_secs(10), |s| {
        curl(&s.socket, "GET", "/v1/vms", None).1.as_array().is_some_and(|a| !a.is_empty())
    });

    // Status, VMs, health.
    let (c, st) = curl(&sock, "GET", "/v1/status", None);
    assert_eq!(c, 200);
    assert!(st["vms"].as_array().expect("vms").iter().any(|v| v["name"] == "web"), "{st}");
    let (c, vms) = curl(&sock, "GET", "/v1/vms", None);
    assert_eq!(c, 200);
    assert!(vms.as_array().expect("list").iter().any(|v| v["name"] == "mc"), "the MC subtree is watched: {vms}");
    let (c, v) = curl(&sock, "GET", "/v1/vms/web", None);
    assert_eq!((c, v["name"].as_str()), (200, Some("web")));
    refused(&sock, "GET", "/v1/vms/nope", None, 404, "vm");
    s.wait("a health verdict", std::time::Duration::from_secs(20), |s| {
        curl(&s.socket, "GET", "/v1/health", None).1["health"].as_array().is_some_and(|a| !a.is_empty())
    });

    // Limits: set, see, change, clear; bad inputs change nothing.
    let (c, l) = curl(&sock, "GET", "/v1/limits", None);
    assert_eq!((c, l.as_array().map(Vec::len)), (200, Some(0)));
    let limit = r#"{"mode":"police","rate":"100mbit","burst":"3mb"}"#;
    let (c, _) = curl(&sock, "PUT", "/v1/vms/web/limits/egress", Some(limit));
    assert_eq!(c, 200);
    let (_, l) = curl(&sock, "GET", "/v1/limits", None);
    let set = l.as_array().expect("limits");
    assert_eq!(set.len(), 1, "{l}");
    assert_eq!((set[0]["vm"].as_str(), set[0]["rate_bps"].as_u64()), (Some("web"), Some(100_000_000)));
    refused(&sock, "PUT", "/v1/vms/web/limits/sideways", Some(limit), 400, "direction");
    // A police burst too small for TCP: refused, naming the burst it needs.
    refused(
        &sock,
        "PUT",
        "/v1/vms/web/limits/egress",
        Some(r#"{"mode":"police","rate":"100mbit","burst":"64kb"}"#),
        400,
        "limit.egress.burst",
    );
    refused(&sock, "PUT", "/v1/vms/web/limits/egress", Some(r#"{"mode":"police","burst":"64kb"}"#), 400, "rate");
    refused(
        &sock,
        "PUT",
        "/v1/vms/web/limits/egress",
        Some(r#"{"mode":"police","rate":"fast","burst":"64kb"}"#),
        400,
        "rate",
    );
    refused(
        &sock,
        "PUT",
        "/v1/vms/web/limits/egress",
        Some(r#"{"mode":"police","rate":"1mbit","burst":"1kb","x":1}"#),
        400,
        "x",
    );
    refused(&sock, "PUT", "/v1/vms/web/limits/egress", Some("not json"), 400, "body");
    refused(&sock, "PUT", "/v1/vms/web/limits/egress", None, 400, "body");
    refused(&sock, "PUT", "/v1/vms/nope/limits/egress", Some(limit), 404, "vm");
    let (_, l) = curl(&sock, "GET", "/v1/limits", None);
    assert_eq!(l.as_array().expect("limits")[0]["rate_bps"].as_u64(), Some(100_000_000), "nothing changed: {l}");
    refused(&sock, "DELETE", "/v1/vms/web/limits/up", None, 400, "direction");
    let (c, _) = curl(&sock, "DELETE", "/v1/vms/web/limits/egress", None);
    assert_eq!(c, 200);
    let (_, l) = curl(&sock, "GET", "/v1/limits", None);
    assert_eq!(l.as_array().map(Vec::len), Some(0), "cleared: {l}");

    // Placement: where, move, pin; decisions.
    let (c, p) = curl(&sock, "GET", "/v1/placement", None);
    assert_eq!(c, 200);
    assert!(p["tasks"].as_array().expect("tasks").iter().any(|t| t["task"] == "log" && t["side"] == "card"), "{p}");
    refused(&sock, "POST", "/v1/placement/log/move", Some(r#"{"to":"moon"}"#), 400, "body");
    refused(&sock, "POST", "/v1/placement/log/move", Some(r#"{}"#), 400, "to");
    refused(&sock, "POST", "/v1/placement/nope/move", Some(r#"{"to":"host"}"#), 404, "task");
    refused(&sock, "POST", "/v1/placement/log/move", Some(r#"{"to":"card"}"#), 409, "already");
    let (c, rec) = curl(&sock, "POST", "/v1/placement/log/move", Some(r#"{"to":"host"}"#));
    assert_eq!(c, 200, "{rec}");
    assert_eq!(rec["reason"], "manual", "{rec}");
    assert_eq!(rec["reports"][0]["ok"], true, "{rec}");
    let (c, _) = curl(&sock, "PUT", "/v1/placement/log/pin", None);
    assert_eq!(c, 200);
    refused(&sock, "POST", "/v1/placement/log/move", Some(r#"{"to":"card"}"#), 409, "pinned");
    refused(&sock, "PUT", "/v1/placement/nope/pin", None, 404, "task");
    let (c, _) = curl(&sock, "DELETE", "/v1/placement/log/pin", None);
    assert_eq!(c, 200);
    let (c, d) = curl(&sock, "GET", "/v1/decisions?after_tick=0", None);
    assert_eq!(c, 200);
    assert!(d.as_array().expect("decisions").iter().any(|r| r["reason"] == "manual"), "{d}");
    refused(&sock, "GET", "/v1/decisions?after_tick=soon", None, 400, "after_tick");
    refused(&sock, "GET", "/v1/decisions?before=1", None, 400, "before");

    // Logs: what the log VM numbered.
    std::fs::write(s.vm_log_in("web"), "hello\nworld\n").expect("write lines");
    s.wait("two log lines", std::time::Duration::from_secs(20), |s| {
        curl(&s.socket, "GET", "/v1/vms/web/logs", None).1.as_array().is_some_and(|a| a.len() == 2)
    });
    let (c, lines) = curl(&sock, "GET", "/v1/vms/web/logs?since=2", None);
    assert_eq!(c, 200);
    assert_eq!(lines, serde_json::json!([{"seq": 2, "text": "world"}]));
    refused(&sock, "GET", "/v1/vms/web/logs?since=-1", None, 400, "since");
    refused(&sock, "GET", "/v1/vms/nope/logs", None, 404, "vm");

    // Anything else.
    refused(&sock, "GET", "/v1/nothing", None, 404, "path");
    refused(&sock, "DELETE", "/v1/status", None, 405, "method");
    // The CLI is a client of the same API.
    let out = Command::new(bin_dir().join("governor"))
        .args(["placement", "--socket"])
        .arg(&sock)
        .output()
        .expect("governor placement");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("log"), "{}", String::from_utf8_lossy(&out.stdout));
    let out =
        Command::new(bin_dir().join("governor")).args(["logs", "web", "--socket"]).arg(&sock).output().expect("logs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\thello\n2\tworld\n");
}

/// What a person meets first: a client command with no governor behind its
/// socket says that no governor is listening there and how to start one or
/// point --socket elsewhere (a socket file left behind says nobody answers
/// it); a config whose card socket does not exist is refused naming
/// `card.socket` and saying that no card listens there.
#[test]
fn no_governor_and_no_card_are_said_plainly() {
    let dir = TempDir::new("governor-test-nogov").expect("dir");
    let missing = dir.path().join("governor.sock");
    for cmd in [&["status"][..], &["placement"], &["limit", "show"]] {
        let out = Command::new(bin_dir().join("governor"))
            .args(cmd)
            .arg("--socket")
            .arg(&missing)
            .output()
            .expect("governor client");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("no governor is listening at {}", missing.display()))
                && err.contains("the socket does not exist")
                && err.contains("governor run --config")
                && err.contains("--socket"),
            "{cmd:?}: {err}"
        );
    }
    // A socket file nobody accepts on (a governor that died without removing it).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = Command::new(bin_dir().join("governor"))
        .args(["status", "--socket"])
        .arg(&stale)
        .output()
        .expect("governor status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no governor is listening at") && err.contains("nobody answers"), "{err}");

    // A config naming a card socket that does not exist.
    require_root();
    let card = dir.path().join("no-card.sock");
    let pins = PinDir::new();
    let cfg = dir.path().join("governor.toml");
    std::fs::write(
        &cfg,
        format!(
            "pin_dir = {:?}\nsocket = {:?}\n[placement]\nreserve = {{ cpus = 1.0, memory = \"256mb\" }}\nagent = {:?}\n\
             vmm = {:?}\nmc_cgroup = {:?}\nrun_dir = {:?}\n\
             [card]\nsocket = {card:?}\n[[mc]]\ntask = \"log\"\n",
            pins.0,
            dir.path().join("gov.sock"),
            guest_elf(),
            bin_dir().join("vmm"),
            unique_long("governor-test-nocard"),
            dir.path().join("mc"),
        ),
    )
    .expect("config");
    let out =
        Command::new(bin_dir().join("governor")).args(["run", "--config"]).arg(&cfg).output().expect("governor run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("card.socket {}", card.display()))
            && err.contains(&format!("no card is listening at {}: the socket does not exist", card.display())),
        "{err}"
    );
}
