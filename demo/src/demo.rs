//! The demo host of `cargo xtask run`.
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
//! Everything is made through the `fixtures` crate's guards, so it is
//! removed when the demo ends, also on Ctrl-C or an error half way.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use cgroupfs::Limits;
use fixtures::{unique, Guarded, ScopedCgroup, VmNet};

use governor::config::{Config, Role, VmConfig};
use governor::qos::{LimitSpec, Mode, Quantity};

pub struct Demo {
    pub config: Config,
    // Field order is drop order: load first, then cgroups, then the network.
    children: Vec<Guarded>,
    cgroups: Vec<ScopedCgroup>,
    net: VmNet,
}

impl Demo {
    pub fn start(layout: &cgroupfs::Layout) -> Result<Demo> {
        let tag = unique("d");
        let net = VmNet::create(2).context("demo network")?;
        let mut config = Config::parse("")?;
        config.socket = format!("/run/governor/demo-{tag}.sock").into();
        config.pin_dir = format!("/sys/fs/bpf/governor-demo-{tag}").into();
        config.metrics_addr = "127.0.0.1:9477".parse().ok();
        config.qos_ifb = unique("gdif");
        let mut d = Demo { config, children: Vec::new(), cgroups: Vec::new(), net };

        let vms = [("web", Role::User, Some(0)), ("batch", Role::User, Some(1)), ("mc-log", Role::Mc, None)];
        for (name, role, port) in vms {
            let limits = if name == "batch" { Limits::cpus(0.8) } else { Limits::default() };
            let cg = ScopedCgroup::create(&format!("demo-{name}"), &limits)?;
            d.config.vms.push(VmConfig {
                name: name.to_string(),
                cgroup: cg.cg.rel().to_string_lossy().into_owned(),
                interfaces: port.map(|p: usize| d.net.ports[p].1.name.clone()).into_iter().collect(),
                role,
                qos: Default::default(),
                logs: Vec::new(),
            });
            d.cgroups.push(cg);
        }
        // batch sends 200 Mbit/s; its egress is policed to 100 Mbit/s.
        d.config.vms[1].qos.egress = Some(LimitSpec {
            mode: Mode::Police,
            rate: Quantity::Text("100mbit".into()),
            burst: Quantity::Text("3mb".into()),
            packet_rate: None,
        });

        let web_addr = d.net.ports[0].2.clone();
        d.spawn(0, Some(0), &["iperf3", "-s", "-B", &web_addr, "-p", "5201"])?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        d.spawn(1, None, &["stress-ng", "--cpu", "2", "--quiet"])?;
        d.spawn(1, Some(1), &["iperf3", "-c", &web_addr, "-p", "5201", "-b", "200M", "-t", "86400"])?;
        d.spawn(
            2,
            None,
            &[
                "stress-ng",
                "--vm",
                "1",
                "--vm-bytes",
                "64M",
                "--vm-keep",
                "--vm-hang",
                "1",
                "--cpu",
                "1",
                "--cpu-load",
                "5",
                "--quiet",
            ],
        )?;
        d.config.check_host(layout)?;
        Ok(d)
    }

    /// Start a command inside VM `i`'s cgroup and, when given, the network
    /// namespace of port `ns`. The cgroup is joined first: `ip netns exec`
    /// remounts /sys, hiding the cgroup hierarchies from what runs inside.
    fn spawn(&mut self, i: usize, ns: Option<usize>, argv: &[&str]) -> Result<()> {
        let mut cmd = match ns {
            Some(p) => self.net.ports[p].0.cmd(argv),
            None => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = self.cgroups[i].spawn_cmd(&mut cmd).with_context(|| format!("start {}", argv.join(" ")))?;
        self.children.push(child);
        Ok(())
    }
}
