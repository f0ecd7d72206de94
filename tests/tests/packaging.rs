//! Packaging (issue 11): the systemd unit passes `systemd-analyze verify`,
//! the example config documents and parses every key, and every command
//! of the CLI has `--help`.

use std::process::Command;

use integration_tests::*;

fn deploy(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

#[test]
fn the_systemd_unit_verifies() {
    require_tool("systemd-analyze");
    let unit = std::fs::read_to_string(deploy("systemd/governor.service")).expect("unit");
    // Verified against the binary this build made (the unit names the
    // installed path).
    let unit = unit.replace("/usr/local/bin/governor", &bin_dir().join("governor").to_string_lossy());
    let dir = fixtures::TempDir::new("governor-test-unit").expect("dir");
    let path = dir.path().join("governor.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}

#[test]
fn the_example_config_parses_and_documents_every_key() {
    let text = std::fs::read_to_string(deploy("governor.example.toml")).expect("example config");
    let cfg = governor::config::Config::parse(&text).expect("the example parses");
    assert_eq!(cfg.vms.len(), 1);
    let vm = &cfg.vms[0];
    assert!(vm.qos.egress.is_some() && vm.qos.ingress.is_some() && vm.qos.adaptive.is_some());
    assert!(!vm.interfaces.is_empty() && !vm.logs.is_empty());
    assert_eq!(cfg.mc.len(), 3);
    let p = cfg.placement.as_ref().expect("[placement]");
    p.policy().expect("[placement] is valid");
    assert!(cfg.card.is_some() && cfg.metrics_addr.is_some());
    // Every key of every section, each with a comment above it or on its line.
    let keys = [
        "tick_ms",
        "pin_dir",
        "socket",
        "metrics_addr",
        "qos_ifb",
        "name",
        "cgroup",
        "interfaces",
        "role",
        "logs",
        "mode",
        "rate",
        "burst",
        "packet_rate",
        "min",
        "thresholds",
        "hysteresis",
        "dwell_s",
        "checkpoint_s",
        "reserve",
        "mc_cgroup",
        "audit_log",
        "agent",
        "vmm",
        "run_dir",
        "precopy",
        "logs_dir",
        "log_max_bytes",
        "task",
        "memory",
        "pin",
        "order",
        "command_timeout_ms",
    ];
    let lines: Vec<&str> = text.lines().collect();
    for k in keys {
        let at = lines
            .iter()
            .position(|l| l.trim_start().trim_start_matches("# ").starts_with(&format!("{k} =")))
            .unwrap_or_else(|| panic!("{k} is not in the example"));
        let documented = at > 0 && lines[at - 1].trim_start().starts_with('#') || lines[at].contains(" # ");
        assert!(documented || k == "task" || k == "memory", "{k} has no comment");
    }
}

#[test]
fn every_command_has_help() {
    let governor = bin_dir().join("governor");
    let help = |args: &[&str]| {
        let out = Command::new(&governor).args(args).arg("--help").output().expect("governor --help");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && text.contains("Usage:"), "{args:?} --help: {text}");
        text
    };
    let top = help(&[]);
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 7, "{top}");
    for c in &commands {
        help(&[c]);
    }
    for (c, sub) in [
        ("placement", "move"),
        ("placement", "pin"),
        ("placement", "unpin"),
        ("limit", "set"),
        ("limit", "clear"),
        ("limit", "show"),
    ] {
        help(&[c, sub]);
    }
}
