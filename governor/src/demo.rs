//! `governor demo`: a live demo host for `cargo xtask run`.
//!
//! Three "VMs", each a cgroup running real load, two of them with a veth
//! into their own network namespace, joined by a bridge in the root
//! namespace (traffic never leaves namespaces the demo created):
//!
//! - `web` (user VM): an iperf3 server;
//! - `batch` (user VM, 80% CPU quota): two CPU hogs and the iperf3 client
//!   offering 200 Mbit/s, its egress policed to 100 Mbit/s;
//! - `mc-log` (management VM): holds 64 MiB and does a little work.
//!
//! Everything is removed when the demo ends, also on Ctrl-C.

use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::config::{Config, Role, VmConfig};
use cgroupfs::{Cgroup, Layout, Limits};

pub struct Demo {
    pub config: Config,
    cgroups: Vec<Cgroup>,
    netns: Vec<String>,
    links: Vec<String>,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<()> {
    let st = Command::new("ip").args(args).stderr(Stdio::inherit()).status().context("run ip")?;
    if !st.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

impl Demo {
    pub fn start() -> Result<Demo> {
        let tag = std::process::id() % 10_000;
        let layout = Layout::detect()?;
        let mut d = Demo {
            config: Config::parse("")?,
            cgroups: Vec::new(),
            netns: Vec::new(),
            links: Vec::new(),
            children: Vec::new(),
        };
        d.config.socket = format!("/run/governor/demo-{tag}.sock").into();
        d.config.pin_dir = format!("/sys/fs/bpf/governor-demo-{tag}").into();
        let bridge = format!("gdbr{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        d.links.push(bridge.clone());
        ip(&["link", "set", &bridge, "up"])?;

        let vms = [("web", Role::User, true), ("batch", Role::User, true), ("mc-log", Role::Mc, false)];
        for (i, (name, role, with_net)) in vms.iter().enumerate() {
            let cg = layout.create(&format!("governor-demo-{tag}/{name}"), &Limits::default())?;
            let mut interfaces = Vec::new();
            if *with_net {
                let ns = format!("gd-{name}-{tag}");
                let host = format!("gdh{i}-{tag}");
                let peer = format!("gdp{i}-{tag}");
                ip(&["netns", "add", &ns])?;
                d.netns.push(ns.clone());
                ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
                d.links.push(host.clone());
                ip(&["link", "set", &peer, "netns", &ns])?;
                ip(&["link", "set", &host, "master", &bridge, "up"])?;
                ip(&["-n", &ns, "addr", "add", &format!("198.18.0.{}/24", i + 1), "dev", &peer])?;
                ip(&["-n", &ns, "link", "set", &peer, "up"])?;
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                interfaces.push(host);
            }
            d.config.vms.push(VmConfig {
                name: name.to_string(),
                cgroup: cg.rel().to_string_lossy().into_owned(),
                interfaces,
                role: *role,
                qos: Default::default(),
            });
            d.cgroups.push(cg);
        }
        d.cgroups[1].set_cpu_quota(80_000, 100_000)?;
        // batch sends 200 Mbit/s; its egress is policed to 100 Mbit/s.
        d.config.vms[1].qos.egress = Some(crate::qos::LimitSpec {
            mode: crate::qos::Mode::Police,
            rate: crate::qos::Quantity::Text("100mbit".into()),
            burst: crate::qos::Quantity::Text("3mb".into()),
            packet_rate: None,
        });
        d.config.metrics_addr = "127.0.0.1:9477".parse().ok();
        d.config.qos_ifb = format!("gdifb{tag}");

        let web_ns = d.netns[0].clone();
        let batch_ns = d.netns[1].clone();
        d.spawn(0, Some(&web_ns), "iperf3 -s -B 198.18.0.1 -p 5201")?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        d.spawn(1, None, "stress-ng --cpu 2 --quiet")?;
        d.spawn(1, Some(&batch_ns), "iperf3 -c 198.18.0.1 -p 5201 -b 200M -t 86400")?;
        d.spawn(2, None, "stress-ng --vm 1 --vm-bytes 64M --vm-keep --vm-hang 1 --cpu 1 --cpu-load 5 --quiet")?;
        d.config.check_host()?;
        Ok(d)
    }

    /// Start a shell command inside VM `i`'s cgroup (and network namespace).
    fn spawn(&mut self, i: usize, ns: Option<&str>, cmd: &str) -> Result<()> {
        // Join the cgroup first: `ip netns exec` remounts /sys, hiding the
        // cgroup hierarchies from what runs inside it.
        let mut script = String::from("exec ");
        if let Some(ns) = ns {
            script.push_str(&format!("ip netns exec {ns} "));
        }
        script.push_str(cmd);
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        self.cgroups[i].join_on_exec(&mut c)?;
        let child = c.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().with_context(|| format!("start {cmd}"))?;
        self.children.push(child);
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Last made first: the first cgroup made the shared parent and
        // removes it once the others are gone.
        for cg in self.cgroups.iter_mut().rev() {
            cg.kill_all(std::time::Duration::from_secs(5));
            if let Err(e) = cg.remove() {
                tracing::warn!("demo: removing cgroup {}: {e}", cg.rel().display());
            }
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).stderr(Stdio::null()).status();
        }
    }
}
