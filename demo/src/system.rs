//! The demo host: card-sim (the card, real KVM MC VMs in its cgroup), three
//! user VMs with real load, and `governor run` placing the MC VMs.
//!
//! The user VMs are cgroups with a routed veth into their own network
//! namespace (a /30 of 198.18.0.0/15 unique to this process, the range
//! card-sim forwards to). Each runs
//! iperf3 servers that the ramp's clients reach *through the card* (a
//! card-sim forward per server): that traffic is the user load on the
//! card's network and CPU. Traffic never leaves namespaces the demo made
//! or loopback.
//!
//! The governor runs as its own `governor run` process on a config written
//! here: a stop is then exactly the tested SIGTERM path (it stops its MC
//! VMs on both sides and removes its pins, qdiscs, socket and MC subtree),
//! and the demo's own failure cannot leave it half stopped.
//!
//! Every object is held by a `fixtures` guard with a unique name, so it is
//! removed when the demo ends, also on Ctrl-C, an error half way or a panic,
//! and two demos on one host never collide.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use card_sim::{Request as CardRequest, SimOptions, SimProcess};
use cgroupfs::Limits;
use fixtures::{unique, unique_long, CgroupGuard, Guarded, PinDir, ScopedCgroup, TempDir, VethPair};
use governor::api::{self, Request};

/// Card network (of its 1 Gbit/s) above which MC VMs leave the card. The
/// ramp's peak puts the user traffic alone just under it, so moving the
/// MC VM whose own traffic tips it over is enough (see `ramp.rs`).
pub const NETWORK_THRESHOLD: f64 = 0.5;
/// Short, so a one-minute run sees both directions (the default is 60 s).
pub const DWELL_S: u64 = 6;
/// iperf3 servers (so parallel streams) per user VM: the ramp's levels.
pub const STREAMS: usize = 3;
const FIRST_PORT: u16 = 5201;

/// One user VM: its cgroup (whose load is started in it), its network.
pub struct UserVm {
    pub name: &'static str,
    /// (card forward port on 127.0.0.1) per iperf3 server in the VM.
    pub forwards: Vec<u16>,
    /// Where each forward leads (the iperf3 server in the VM's namespace).
    pub targets: Vec<SocketAddr>,
}

/// The user VMs: name, CPU quota, the load that runs in them besides the
/// iperf3 servers. A whole CPU each: a receiver throttled by its quota
/// stalls its senders, and iperf3 then catches up in bursts that read as
/// the card's link over 100% for a tick.
const VMS: [(&str, f64, &[&str]); 3] = [
    ("web", 1.0, &[]),
    ("batch", 1.0, &["stress-ng", "--cpu", "1", "--cpu-load", "20", "--quiet"]),
    (
        "db",
        1.0,
        // 48 MiB held (hang 0: touched once, then kept without CPU).
        &[
            "stress-ng",
            "--vm",
            "1",
            "--vm-bytes",
            "48M",
            "--vm-keep",
            "--vm-hang",
            "0",
            "--cpu",
            "1",
            "--cpu-load",
            "10",
            "--quiet",
        ],
    ),
];

pub struct System {
    pub socket: PathBuf,
    pub metrics: SocketAddr,
    pub vms: Vec<UserVm>,
    pub sim_control: PathBuf,
    // Field order is drop order: the governor first (it stops its MC VMs
    // on the card while the card still answers), then the card, the load,
    // the cgroups, the network, the pins and the run directory.
    gov: Option<Guarded>,
    /// The MC subtree, removed if a governor that died left it.
    _mc: CgroupGuard,
    sim: Option<SimProcess>,
    load: Vec<Guarded>,
    cgroups: Vec<ScopedCgroup>,
    nets: Vec<VethPair>,
    _pins: PinDir,
    pub run: TempDir,
}

/// Where the binaries and the guest are: next to this executable (the
/// workspace's target profile), overridable as the tests do.
pub struct Paths {
    pub governor: PathBuf,
    pub vmm: PathBuf,
    pub card_sim: PathBuf,
    pub guest: PathBuf,
}

impl Paths {
    pub fn find() -> Result<Paths> {
        let exe = std::env::current_exe().context("where governor-demo runs from")?;
        let dir = exe.parent().context("the executable's directory")?.to_path_buf();
        let env_or = |var: &str, p: PathBuf| std::env::var_os(var).map(PathBuf::from).unwrap_or(p);
        let guest_default = dir.join("../vmm-guest/x86_64-unknown-linux-gnu/release/mc-guest");
        let p = Paths {
            governor: env_or("GOVERNOR_BIN", dir.join("governor")),
            vmm: env_or("VMM_BIN", dir.join("vmm")),
            card_sim: env_or("CARD_SIM_BIN", dir.join("card-sim")),
            guest: env_or("VMM_GUEST_ELF", guest_default),
        };
        for (what, path, how) in [
            ("governor", &p.governor, "cargo build --release -p governor"),
            ("vmm", &p.vmm, "cargo build --release -p vmm"),
            ("card-sim", &p.card_sim, "cargo build --release -p card-sim"),
            ("the MC guest ELF", &p.guest, "cargo xtask build-guest"),
        ] {
            if !path.is_file() {
                bail!("{what} is missing at {}: build it with `{how}` (cargo xtask run does)", path.display());
            }
        }
        Ok(p)
    }
}

/// 127.0.0.1:9477 when free (the README's scrape config), else any free port.
fn metrics_addr() -> Result<SocketAddr> {
    let preferred: SocketAddr = ([127, 0, 0, 1], 9477).into();
    if TcpListener::bind(preferred).is_ok() {
        return Ok(preferred);
    }
    let l = TcpListener::bind(("127.0.0.1", 0)).context("a free port for the metrics")?;
    l.local_addr().context("the free port's address")
}

impl System {
    /// Start everything; `stop` is polled while waiting so Ctrl-C during
    /// start-up ends it too (what was made so far is dropped).
    pub fn start(paths: &Paths, stop: &dyn Fn() -> bool) -> Result<System> {
        let run = TempDir::new("governor-demo").context("the demo's run directory")?;
        let pins = PinDir::new();
        let nets = (0..VMS.len()).map(|_| VethPair::create()).collect::<Result<Vec<_>, _>>();
        let nets = nets.context("the user VMs' network")?;
        let mut s = System {
            socket: run.path().join("governor.sock"),
            metrics: metrics_addr()?,
            vms: Vec::new(),
            sim_control: PathBuf::new(),
            gov: None,
            _mc: CgroupGuard(unique_long("governor-demo-mc")),
            sim: None,
            load: Vec::new(),
            cgroups: Vec::new(),
            nets,
            _pins: pins,
            run,
        };
        let sim = SimProcess::spawn(&SimOptions {
            guest: Some(paths.guest.clone()),
            vmm: Some(paths.vmm.clone()),
            binary: Some(paths.card_sim.clone()),
            ..SimOptions::default()
        })
        .context("start card-sim (the card)")?;
        s.sim_control = sim.control_path().to_path_buf();
        s.sim = Some(sim);
        s.start_user_vms()?;
        s.start_governor(paths)?;
        s.wait_ready(stop)?;
        Ok(s)
    }

    fn start_user_vms(&mut self) -> Result<()> {
        for (i, (name, cpus, extra)) in VMS.iter().enumerate() {
            let cg = ScopedCgroup::create(&format!("demo-{name}"), &Limits::cpus(*cpus))
                .with_context(|| format!("cgroup of user VM {name}"))?;
            self.cgroups.push(cg);
            let addr = self.nets[i].peer_addr.clone();
            let log = self.vm_log(name);
            let (mut forwards, mut targets) = (Vec::new(), Vec::new());
            for k in 0..STREAMS {
                let port = FIRST_PORT + k as u16;
                // Its one-line-per-second reports are the VM's log, which
                // the log MC VM collects.
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .with_context(|| format!("{name}'s log {}", log.display()))?;
                let mut cmd =
                    self.nets[i].ns.cmd(&["iperf3", "-s", "-B", &addr, "-p", &port.to_string(), "--forceflush"]);
                cmd.stdout(out).stderr(Stdio::null());
                self.spawn_in(i, &mut cmd)?;
                let to: SocketAddr =
                    format!("{addr}:{port}").parse().with_context(|| format!("forward target {addr}:{port}"))?;
                forwards.push(self.forward(0, to)?);
                targets.push(to);
            }
            if !extra.is_empty() {
                let mut cmd = Command::new(extra[0]);
                cmd.args(&extra[1..]).stdout(Stdio::null()).stderr(Stdio::null());
                self.spawn_in(i, &mut cmd)?;
            }
            self.vms.push(UserVm { name, forwards, targets });
        }
        Ok(())
    }

    fn vm_log(&self, name: &str) -> PathBuf {
        self.run.path().join(format!("{name}.out"))
    }

    /// Start `cmd` in user VM `i`'s cgroup. The cgroup is joined before
    /// the exec: `ip netns exec` remounts /sys, hiding the hierarchies.
    fn spawn_in(&mut self, i: usize, cmd: &mut Command) -> Result<()> {
        cmd.stdin(Stdio::null());
        let child = self.cgroups[i].spawn_cmd(cmd).with_context(|| format!("start {cmd:?}"))?;
        self.load.push(child);
        Ok(())
    }

    /// A card-sim forward from loopback `port` (0: any) to `to`: traffic
    /// to that port crosses the card.
    fn forward(&self, port: u16, to: SocketAddr) -> Result<u16> {
        let req = CardRequest::Forward { listen: ([127, 0, 0, 1], port).into(), to };
        let reply = card_sim::process::control_at(&self.sim_control, &req).context("a card forward")?;
        reply.port.context("card-sim answered a forward without its port")
    }

    /// Kill the card (SIGKILL to card-sim and the VMs on it), as a card
    /// dies: the governor is left to notice.
    pub fn kill_card(&mut self) {
        if let Some(sim) = self.sim.as_mut() {
            sim.kill();
        }
    }

    /// Start the card again after it died: a new card-sim on the same
    /// socket, with nothing on it; the user traffic's forwards are made
    /// again on the ports the load generator uses.
    pub fn restart_card(&mut self) -> Result<()> {
        let sim = self.sim.as_mut().context("card-sim")?;
        sim.restart().context("start card-sim again")?;
        for vm in &self.vms {
            for (port, to) in vm.forwards.iter().zip(&vm.targets) {
                self.forward(*port, *to).with_context(|| format!("forward 127.0.0.1:{port} again"))?;
            }
        }
        Ok(())
    }

    /// Whether card-sim runs (it may have been killed, or died).
    pub fn card_running(&mut self) -> bool {
        self.sim.as_mut().is_some_and(|s| !s.exited())
    }

    fn start_governor(&mut self, paths: &Paths) -> Result<()> {
        let run = self.run.path();
        let mut vms = String::new();
        for (i, vm) in self.vms.iter().enumerate() {
            vms.push_str(&format!(
                "[[vm]]\nname = {:?}\ncgroup = {:?}\ninterfaces = [{:?}]\nrole = \"user\"\nlogs = [{:?}]\n",
                vm.name,
                self.cgroups[i].cg.rel().to_string_lossy(),
                self.nets[i].host.name,
                self.vm_log(vm.name),
            ));
        }
        for task in ["monitor", "log", "qos"] {
            vms.push_str(&format!("[[mc]]\ntask = {task:?}\nmemory = \"32mb\"\n"));
        }
        let sim = self.sim.as_ref().context("card-sim")?;
        let cfg = format!(
            "tick_ms = 500\npin_dir = {pins:?}\nsocket = {sock:?}\nqos_ifb = {ifb:?}\nmetrics_addr = \"{metrics}\"\n\
             [placement]\nthresholds = {{ fpga = 0.8, cpu = 0.9, memory = 0.9, network = {net} }}\n\
             hysteresis = 0.1\ndwell_s = {dwell}\ncheckpoint_s = 10\n\
             reserve = {{ cpus = 1.0, memory = \"512mb\" }}\nmc_cgroup = {mcg:?}\naudit_log = {audit:?}\n\
             agent = {agent:?}\nvmm = {vmm:?}\nrun_dir = {rd:?}\nprecopy = true\nlogs_dir = {ld:?}\n\
             [card]\nsocket = {card:?}\ncommand_timeout_ms = 3000\n{vms}",
            pins = self._pins.0,
            sock = self.socket,
            ifb = unique("gdif"),
            metrics = self.metrics,
            net = NETWORK_THRESHOLD,
            dwell = DWELL_S,
            mcg = self._mc.0,
            audit = run.join("decisions.jsonl"),
            agent = paths.guest,
            vmm = paths.vmm,
            rd = run.join("mc"),
            ld = run.join("vmlogs"),
            card = sim.socket_path(),
        );
        let cfg_path = run.join("governor.toml");
        std::fs::write(&cfg_path, cfg).with_context(|| format!("write {}", cfg_path.display()))?;
        let mut cmd = Command::new(&paths.governor);
        cmd.args(["run", "--config"]).arg(&cfg_path).stdin(Stdio::null()).stdout(Stdio::null());
        // Warnings and errors only: what it decides is read over its API.
        cmd.env("RUST_LOG", "warn");
        let child = cmd.spawn().with_context(|| format!("start {}", paths.governor.display()))?;
        self.gov = Some(Guarded::new(child));
        Ok(())
    }

    /// Until the placement API answers with every MC VM placed.
    fn wait_ready(&mut self, stop: &dyn Fn() -> bool) -> Result<()> {
        let t0 = Instant::now();
        loop {
            self.check_alive()?;
            if let Ok(r) = api::call(&self.socket, &Request::Placement) {
                if r.placement.is_some_and(|p| p.tasks.len() == 3) {
                    return Ok(());
                }
            }
            if stop() {
                bail!("stopped while starting");
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the governor's placement API did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The governor's and card-sim's process ids (while they run).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (self.gov.as_ref().map(|g| g.id()), self.sim.as_ref().map(|s| s.pid()))
    }

    /// Fail when the governor exited on its own. A card that died is not
    /// the demo's end: the governor brings its MC VMs up on the host, and
    /// the view shows it.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(g) = self.gov.as_mut() {
            if let Ok(Some(st)) = g.child().try_wait() {
                bail!("the governor exited: {st}");
            }
        }
        Ok(())
    }

    /// Stop in order, saying what failed (Drop does the same silently).
    pub fn stop(mut self) -> Result<()> {
        let mut problems = Vec::new();
        if let Some(mut g) = self.gov.take() {
            match g.terminate(Duration::from_secs(20)) {
                Some(st) if st.success() => {}
                Some(st) => problems.push(format!("the governor ended with {st}")),
                None => problems.push("the governor did not stop on SIGTERM within 20 s (killed)".to_string()),
            }
        }
        drop(self.sim.take());
        drop(self);
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }
}

impl Drop for System {
    fn drop(&mut self) {
        // The governor before the card: it stops the MC VMs it runs there.
        if let Some(mut g) = self.gov.take() {
            g.terminate(Duration::from_secs(20));
        }
        drop(self.sim.take());
    }
}
