//! The whole placement system for tests and benchmarks: card-sim (real
//! KVM MC VMs in its cgroup), `governor run` with `[placement]`, `[[mc]]`
//! and `[card]`, and helpers to read placement and decisions and to talk
//! to each MC VM's agent wherever it runs. Everything it starts is removed
//! on drop, also when a test fails.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use card_sim::{Request as CardRequest, SimOptions, SimProcess};
use fixtures::{unique, unique_long, Guarded, PinDir, TempDir};
use governor::api::{self, Request, Response};
use governor::placement::audit::AuditRecord;
use governor::placement::runtime::{PlacementStatus, TaskStatus};
use governor::placement::Side;
use vmm::host::api::AgentOp;
use vmm::host::client::Client;
use vmm::Reply;

use crate::{bin_dir, guest_elf};

/// What to start.
pub struct SystemOptions {
    /// `thresholds = {...}` inline table contents, e.g. `cpu = 0.7`.
    pub thresholds: String,
    pub dwell_s: u64,
    pub hysteresis: f64,
    pub checkpoint_s: u64,
    pub reserve_cpus: f64,
    pub reserve_mib: u64,
    /// (task, pin)
    pub mcs: Vec<(&'static str, Option<&'static str>)>,
    pub mc_mib: u64,
    pub tick_ms: u64,
    pub dry_run: bool,
    /// The card's heartbeat period.
    pub period_ms: u32,
    /// One mailbox command at most (the governor's `[card]`).
    pub command_timeout_ms: u64,
    /// `[placement] precopy`.
    pub precopy: bool,
    /// User VMs to watch: (name, cgroup relative to the roots).
    pub user_vms: Vec<(String, String)>,
    /// Give each user VM a log file (`System::vm_log_in`) for the log VM.
    pub vm_logs: bool,
    /// `[placement] log_max_bytes`.
    pub log_max_bytes: u64,
    /// TOML added at the end of a user VM's `[[vm]]` block: (name, text).
    pub vm_extra: Vec<(String, String)>,
    /// Serve Prometheus metrics on 127.0.0.1:this port.
    pub metrics_port: Option<u16>,
}

impl Default for SystemOptions {
    fn default() -> Self {
        SystemOptions {
            thresholds: String::new(),
            dwell_s: 3,
            hysteresis: 0.1,
            checkpoint_s: 10,
            reserve_cpus: 1.0,
            reserve_mib: 512,
            mcs: vec![("monitor", None), ("log", None), ("qos", None)],
            mc_mib: 32,
            tick_ms: 200,
            dry_run: false,
            period_ms: 100,
            command_timeout_ms: 3000,
            precopy: true,
            user_vms: Vec::new(),
            vm_logs: false,
            log_max_bytes: 16 << 20,
            vm_extra: Vec::new(),
            metrics_port: None,
        }
    }
}

/// card-sim + governor, stopped and removed on drop (governor first: it
/// stops its MC VMs on the card while the card still answers).
pub struct System {
    pub gov: Guarded,
    pub sim: SimProcess,
    pub socket: PathBuf,
    pub run: TempDir,
    pub mc_cgroup: String,
    cfg_path: PathBuf,
    dry_run: bool,
    _pins: PinDir,
}

impl System {
    pub fn start(o: &SystemOptions) -> System {
        let sim = SimProcess::spawn(&SimOptions {
            guest: Some(guest_elf()),
            period_ms: o.period_ms,
            ..SimOptions::default()
        })
        .expect("card-sim with the vmm backend");
        let run = TempDir::new("governor-test-pl").expect("run dir");
        let pins = PinDir::new();
        let socket = run.path().join("governor.sock");
        let mc_cgroup = unique_long("governor-test-mc");
        let mut mcs = String::new();
        for (name, cg) in &o.user_vms {
            mcs.push_str(&format!("[[vm]]\nname = {name:?}\ncgroup = {cg:?}\nrole = \"user\"\n"));
            if o.vm_logs {
                let f = run.path().join(format!("{name}.out"));
                std::fs::write(&f, "").expect("VM log file");
                mcs.push_str(&format!("logs = [{f:?}]\n"));
            }
            for (_, extra) in o.vm_extra.iter().filter(|(n, _)| n == name) {
                mcs.push_str(extra);
            }
        }
        for (task, pin) in &o.mcs {
            mcs.push_str(&format!("[[mc]]\ntask = {task:?}\nmemory = \"{}mb\"\n", o.mc_mib));
            if let Some(p) = pin {
                mcs.push_str(&format!("pin = {p:?}\n"));
            }
        }
        let cfg = format!(
            "tick_ms = {tick}\npin_dir = {pins:?}\nsocket = {socket:?}\nqos_ifb = {ifb:?}\n{metrics}\
             [placement]\nthresholds = {{ {th} }}\nhysteresis = {hy}\ndwell_s = {dw}\ncheckpoint_s = {ck}\n\
             reserve = {{ cpus = {rc}, memory = \"{rm}mb\" }}\nmc_cgroup = {mcg:?}\naudit_log = {audit:?}\n\
             agent = {agent:?}\nvmm = {vmm:?}\nrun_dir = {rd:?}\nprecopy = {pc}\n\
             logs_dir = {ld:?}\nlog_max_bytes = {lm}\n\
             [card]\nsocket = {card:?}\ncommand_timeout_ms = {cto}\n{mcs}",
            metrics = o.metrics_port.map(|p| format!("metrics_addr = \"127.0.0.1:{p}\"\n")).unwrap_or_default(),
            cto = o.command_timeout_ms,
            pc = o.precopy,
            ld = run.path().join("vmlogs"),
            lm = o.log_max_bytes,
            tick = o.tick_ms,
            pins = pins.0,
            ifb = unique("gifb"),
            th = o.thresholds,
            hy = o.hysteresis,
            dw = o.dwell_s,
            ck = o.checkpoint_s,
            rc = o.reserve_cpus,
            rm = o.reserve_mib,
            mcg = mc_cgroup,
            audit = run.path().join("decisions.jsonl"),
            agent = guest_elf(),
            vmm = bin_dir().join("vmm"),
            rd = run.path().join("mc"),
            card = sim.socket_path(),
        );
        let cfg_path = run.path().join("governor.toml");
        std::fs::write(&cfg_path, cfg).expect("write config");
        let gov = spawn_governor(&cfg_path, o.dry_run);
        let mut s = System { gov, sim, socket, run, mc_cgroup, cfg_path, dry_run: o.dry_run, _pins: pins };
        s.wait("the placement API", Duration::from_secs(20), |s| s.try_placement().is_some());
        s
    }

    /// `kill -9` the governor (nothing of its cleanup runs).
    pub fn kill9(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.gov.child().id() as i32, libc::SIGKILL) };
        self.gov.wait_timeout(Duration::from_secs(5)).expect("the governor died");
    }

    /// Start the governor again on the same config (after [`System::kill9`]).
    pub fn restart(&mut self) {
        self.gov = spawn_governor(&self.cfg_path, self.dry_run);
        self.wait("the placement API after a restart", Duration::from_secs(20), |s| s.try_placement().is_some());
    }

    /// The governor's Prometheus exposition (needs `metrics_port`).
    pub fn metrics(&self, port: u16) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body
    }

    /// The governor process's thread and open fd counts.
    pub fn governor_threads_and_fds(&self) -> (usize, usize) {
        let pid = self.gov.id();
        let count = |d: &str| std::fs::read_dir(format!("/proc/{pid}/{d}")).map_or(0, |r| r.count());
        (count("task"), count("fd"))
    }

    pub fn call(&self, req: &Request) -> Response {
        api::call(&self.socket, req).unwrap_or_else(|e| panic!("{req:?}: {e:#}"))
    }

    pub fn try_placement(&mut self) -> Option<PlacementStatus> {
        if let Some(st) = self.gov.child().try_wait().ok().flatten() {
            panic!("the governor exited: {st}");
        }
        api::call(&self.socket, &Request::Placement).ok()?.placement
    }

    pub fn placement(&mut self) -> PlacementStatus {
        self.try_placement().expect("placement status")
    }

    pub fn task(&mut self, task: &str) -> TaskStatus {
        let p = self.placement();
        p.tasks.into_iter().find(|t| t.task == task).unwrap_or_else(|| panic!("no task {task}"))
    }

    pub fn side(&mut self, task: &str) -> Side {
        self.task(task).side
    }

    pub fn decisions(&self, after_tick: u64) -> Vec<AuditRecord> {
        self.call(&Request::Decisions { after_tick }).decisions.unwrap_or_default()
    }

    /// Poll until `f` holds; panics naming `what` after `limit`.
    pub fn wait(&mut self, what: &str, limit: Duration, mut f: impl FnMut(&mut System) -> bool) -> Duration {
        let start = Instant::now();
        while !f(self) {
            assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(25));
        }
        start.elapsed()
    }

    /// One request to a task's agent, on whichever side it runs.
    pub fn agent(&mut self, task: &str, op: AgentOp, arg: u64) -> Reply {
        let t = self.task(task);
        match t.side {
            Side::Card => {
                let vm = t.card_vm.expect("card VM id");
                self.sim
                    .control(&CardRequest::Agent { vm, request: op, arg })
                    .unwrap_or_else(|e| panic!("{task} agent on the card: {e}"))
                    .agent
                    .expect("agent reply")
            }
            Side::Host => {
                let sock = t.host_socket.expect("host socket");
                let mut c = Client::connect(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
                c.request(op, arg).unwrap_or_else(|e| panic!("{task} agent on the host: {e}")).reply
            }
        }
    }

    /// The file a user VM's log lines are written to (with `vm_logs`).
    pub fn vm_log_in(&self, vm: &str) -> PathBuf {
        self.run.path().join(format!("{vm}.out"))
    }

    /// Where the log VM's output goes.
    pub fn logs_dir(&self) -> PathBuf {
        self.run.path().join("vmlogs")
    }

    /// The card's use of `resource` (fpga, cpu, memory, network) now.
    pub fn card_use(&mut self, resource: &str) -> f64 {
        let p = self.placement();
        p.card.resources.iter().find(|r| r.resource.name() == resource).map_or(0.0, |r| r.used)
    }
}

fn spawn_governor(cfg: &std::path::Path, dry_run: bool) -> Guarded {
    let mut cmd = Command::new(bin_dir().join("governor"));
    cmd.args(["run", "--config"]).arg(cfg).stdout(Stdio::null());
    // Warnings and errors only: the decisions are read over the socket.
    cmd.env("RUST_LOG", "warn");
    if dry_run {
        cmd.arg("--dry-run");
    }
    Guarded::new(cmd.spawn().expect("start governor"))
}

impl Drop for System {
    fn drop(&mut self) {
        // SIGTERM: the governor stops its MC VMs (card and host), removes
        // the MC subtree, its pins and its socket.
        if self.gov.terminate(Duration::from_secs(15)).is_none() {
            eprintln!("the governor did not stop on SIGTERM");
        }
        // A governor that died without its cleanup leaves its host MC VMs:
        // stop them and remove the subtree here.
        if let Ok(layout) = cgroupfs::Layout::detect() {
            if layout.unified().join(&self.mc_cgroup).is_dir() {
                eprintln!("the MC subtree {} outlived the governor; removing it", self.mc_cgroup);
                if let Ok(mut cg) = layout.open(&self.mc_cgroup) {
                    cg.kill_all(Duration::from_secs(5));
                    if let Err(e) = cg.remove() {
                        eprintln!("removing {}: {e}", self.mc_cgroup);
                    }
                }
            }
        }
    }
}

/// The two sites of a move without the governor: card-sim with real KVM
/// MC VMs over card-link, and a host site (vmm processes in an MC subtree
/// of its own). Dropped in order: the host's VMs, its run directory, then
/// card-sim.
pub struct TwoSites {
    pub sites:
        governor::placement::mover::Sites<governor::placement::card::CardSite, governor::placement::host::HostSite>,
    _run: TempDir,
    _sim: SimProcess,
}

/// [`TwoSites`] named for `purpose` (its run directory and MC subtree).
pub fn two_sites(purpose: &str) -> TwoSites {
    use governor::placement::host::{HostSite, HostSiteOptions};
    let sim = SimProcess::spawn(&SimOptions { guest: Some(guest_elf()), ..SimOptions::default() }).expect("card-sim");
    let card =
        card_link::connect_vfio_user(sim.socket_path(), Duration::from_secs(2), card_link::CardOptions::default())
            .expect("card link");
    let name = format!("governor-test-{purpose}");
    let run = TempDir::new(&name).expect("run dir");
    let host = HostSite::new(
        HostSiteOptions {
            vmm_bin: bin_dir().join("vmm"),
            guest: guest_elf(),
            run_dir: run.path().join("host"),
            subtree: unique_long(&name),
            reserve: governor::placement::HostCost { cpus: 1.0, memory_bytes: 512 << 20 },
        },
        &cgroupfs::Layout::detect().expect("layout"),
    )
    .expect("host site");
    let sites = governor::placement::mover::Sites { card: governor::placement::card::CardSite::new(card), host };
    TwoSites { sites, _run: run, _sim: sim }
}
