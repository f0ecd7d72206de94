//! `[placement]` and `[[mc]]` in the governor's config: the thresholds and
//! rules of the board-card condition and the management VMs to place, with
//! defaults chosen below. Checked whole, like the rest of the config: a
//! wrong value is refused naming the field.
//!
//! ```toml
//! [placement]
//! thresholds = { fpga = 0.8, cpu = 0.7, memory = 0.8, network = 0.6 }
//! hysteresis = 0.1          # come back only at threshold - 0.1 or below
//! dwell_s = 60              # no direction change within; calm this long before coming back
//! checkpoint_s = 10         # diff snapshots of card-side MC VMs streamed to the host
//! reserve = { cpus = 2.0, memory = "2gb" }   # host CPU and memory for MC VMs
//! mc_cgroup = "governor-mc" # the host-side MC VMs' cgroup subtree
//! audit_log = "/var/log/governor/decisions.jsonl"
//! agent = "/usr/lib/governor/mc-guest"   # the MC VMs' agent ELF (host side)
//! vmm = "/usr/lib/governor/vmm"          # default: `vmm` next to the governor
//! run_dir = "/run/governor/mc"           # host-side MC VMs' sockets and images
//! precopy = true            # copy memory while the VM runs; pause only for the rest
//!
//! [card]
//! socket = "/run/card-sim/card.sock"     # a vfio-user card (card-sim)
//! command_timeout_ms = 2000              # one mailbox command, at most
//! probe_timeout_ms = 300                 # a health check's link round trip, at most
//!
//! [[mc]]
//! task = "log"              # monitor | log | qos | net-agent | storage-agent
//! memory = "64mb"           # guest RAM
//! pin = "card"              # optional: card | host (never moved)
//! order = 0                 # optional: lower = preferred to stay on the card
//! ```

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::{HostCost, PerResource, Policy, Resource, Side};
use crate::qos::{parse_bytes, Quantity};

/// The management tasks of claim 14 and the data path (one MC VM each).
pub const TASKS: &[&str] = &["monitor", "log", "qos", "net-agent", "storage-agent"];

/// Defaults, and why:
/// - thresholds: what is left above them is the card's headroom for user
///   load peaks between two ticks (a network at 60% of line rate still
///   takes a burst without queueing; CPU at 70% keeps the card's own
///   services responsive);
/// - hysteresis 0.1: a VM comes back only when the card has room for it
///   and then some, so a load hovering at a threshold does not bounce it;
/// - dwell 60 s: Kubernetes' HPA waits 300 s before scaling down because a
///   scale-down costs pod restarts; a move here pauses a VM for
///   milliseconds, so a shorter window is enough, but it spans many ticks
///   and card heartbeats, so one noisy reading cannot flap a VM;
/// - checkpoints every 10 s: on card death a VM loses at most that much.
pub const DEFAULT_THRESHOLDS: PerResource = [0.8, 0.7, 0.8, 0.6];
pub const DEFAULT_HYSTERESIS: f64 = 0.1;
pub const DEFAULT_DWELL_S: u64 = 60;
pub const DEFAULT_CHECKPOINT_S: u64 = 10;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub fpga: Option<f64>,
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
    pub network: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    pub cpus: f64,
    pub memory: Quantity,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    #[serde(default)]
    pub thresholds: Thresholds,
    #[serde(default = "default_hysteresis")]
    pub hysteresis: f64,
    #[serde(default = "default_dwell")]
    pub dwell_s: u64,
    #[serde(default = "default_checkpoint")]
    pub checkpoint_s: u64,
    pub reserve: Reserve,
    #[serde(default = "default_mc_cgroup")]
    pub mc_cgroup: String,
    pub audit_log: Option<PathBuf>,
    /// The management agent ELF that host-side MC VMs boot (cold starts).
    pub agent: Option<PathBuf>,
    /// The `vmm` binary for host-side MC VMs; default: next to the governor.
    pub vmm: Option<PathBuf>,
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Moves copy the VM's memory while it runs and pause it only for what
    /// it wrote since (where both sides can).
    #[serde(default = "default_precopy")]
    pub precopy: bool,
    /// Where the log MC VM's output goes: `<logs_dir>/<vm>.log`.
    #[serde(default = "default_logs_dir")]
    pub logs_dir: PathBuf,
    /// Size of a VM's log file before it is rotated (one `.1` kept).
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
}

fn default_logs_dir() -> PathBuf {
    PathBuf::from("/var/log/governor/vms")
}

fn default_log_max_bytes() -> u64 {
    16 << 20
}

fn default_precopy() -> bool {
    true
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/governor/mc")
}

/// `[card]`: how to reach the card.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CardConfig {
    /// A vfio-user socket (card-sim, or any vfio-user card).
    pub socket: PathBuf,
    /// Upper bound of one mailbox command (ms).
    #[serde(default = "default_command_timeout")]
    pub command_timeout_ms: u64,
    /// Upper bound of the link round trip of a health check, and of a
    /// reconnect (ms): a card silent this long is taken for dead.
    #[serde(default = "default_probe_timeout")]
    pub probe_timeout_ms: u64,
}

fn default_command_timeout() -> u64 {
    2000
}

fn default_probe_timeout() -> u64 {
    card_link::card::DEFAULT_PROBE_TIMEOUT.as_millis() as u64
}

impl CardConfig {
    pub fn check(&self) -> Result<(), PlacementConfigError> {
        if !self.socket.is_absolute() {
            return Err(err("card.socket", "must be an absolute path"));
        }
        if !(10..=600_000).contains(&self.command_timeout_ms) {
            return Err(err("card.command_timeout_ms", format!("{} is outside 10..=600000", self.command_timeout_ms)));
        }
        if !(10..=60_000).contains(&self.probe_timeout_ms) {
            return Err(err("card.probe_timeout_ms", format!("{} is outside 10..=60000", self.probe_timeout_ms)));
        }
        Ok(())
    }
}

fn default_hysteresis() -> f64 {
    DEFAULT_HYSTERESIS
}
fn default_dwell() -> u64 {
    DEFAULT_DWELL_S
}
fn default_checkpoint() -> u64 {
    DEFAULT_CHECKPOINT_S
}
fn default_mc_cgroup() -> String {
    "governor-mc".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct McConfig {
    pub task: String,
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    pub pin: Option<Side>,
    #[serde(default)]
    pub order: u32,
}

fn default_memory() -> Quantity {
    Quantity::Text("64mb".into())
}

/// A refusal: the field and the reason.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PlacementConfigError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> PlacementConfigError {
    PlacementConfigError { field: field.into(), reason: reason.into() }
}

/// An MC VM as configured and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct McSpec {
    pub task: String,
    pub mem_mib: u64,
    pub pin: Option<Side>,
    pub order: u32,
}

impl PlacementConfig {
    /// The decision's policy, with every value checked.
    pub fn policy(&self) -> Result<Policy, PlacementConfigError> {
        let t = &self.thresholds;
        let mut thresholds = DEFAULT_THRESHOLDS;
        for (r, v) in [
            (Resource::Fpga, t.fpga),
            (Resource::Cpu, t.cpu),
            (Resource::Memory, t.memory),
            (Resource::Network, t.network),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                    return Err(err(format!("placement.thresholds.{}", r.name()), format!("{v} is not within (0, 1]")));
                }
                thresholds[r.index()] = v;
            }
        }
        let h = self.hysteresis;
        let lowest = thresholds.iter().copied().fold(1.0, f64::min);
        if !(h.is_finite() && (0.0..0.5).contains(&h)) {
            return Err(err("placement.hysteresis", format!("{h} is not within [0, 0.5)")));
        }
        if h >= lowest {
            return Err(err("placement.hysteresis", format!("{h} leaves no room under the lowest threshold {lowest}")));
        }
        if !(1..=3600).contains(&self.dwell_s) {
            return Err(err("placement.dwell_s", format!("{} is outside 1..=3600", self.dwell_s)));
        }
        if !(1..=3600).contains(&self.checkpoint_s) {
            return Err(err("placement.checkpoint_s", format!("{} is outside 1..=3600", self.checkpoint_s)));
        }
        let cpus = self.reserve.cpus;
        if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
            return Err(err("placement.reserve.cpus", format!("{cpus} is not within (0, 1024]")));
        }
        let memory_bytes = parse_bytes(&self.reserve.memory).map_err(|r| err("placement.reserve.memory", r))?;
        if memory_bytes < 16 << 20 {
            return Err(err("placement.reserve.memory", format!("{memory_bytes} bytes is less than 16 MiB")));
        }
        let cg = &self.mc_cgroup;
        let cg_ok = !cg.is_empty()
            && std::path::Path::new(cg).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !cg_ok {
            return Err(err(
                "placement.mc_cgroup",
                format!("{cg:?} must be a relative cgroup path without '.' or '..'"),
            ));
        }
        for (f, p) in [("audit_log", &self.audit_log), ("agent", &self.agent), ("vmm", &self.vmm)] {
            if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(err(format!("placement.{f}"), "must be an absolute path"));
            }
        }
        if !self.run_dir.is_absolute() {
            return Err(err("placement.run_dir", "must be an absolute path"));
        }
        if !self.logs_dir.is_absolute() {
            return Err(err("placement.logs_dir", "must be an absolute path"));
        }
        if !(4096..=1 << 40).contains(&self.log_max_bytes) {
            return Err(err("placement.log_max_bytes", format!("{} is outside 4096..=1 TiB", self.log_max_bytes)));
        }
        Ok(Policy {
            thresholds,
            hysteresis: h,
            dwell_ms: self.dwell_s * 1000,
            reserve: HostCost { cpus, memory_bytes },
        })
    }
}

/// Check the `[[mc]]` entries: known, unique tasks and sane sizes.
pub fn check_mcs(mcs: &[McConfig]) -> Result<Vec<McSpec>, PlacementConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, m) in mcs.iter().enumerate() {
        let at = |f: &str| format!("mc[{i}].{f}");
        if !TASKS.contains(&m.task.as_str()) {
            return Err(err(at("task"), format!("{:?} is not one of {}", m.task, TASKS.join(", "))));
        }
        if !seen.insert(m.task.as_str()) {
            return Err(err(at("task"), format!("{:?} has another MC VM already (one per task)", m.task)));
        }
        let bytes = parse_bytes(&m.memory).map_err(|r| err(at("memory"), r))?;
        let mem_mib = bytes >> 20;
        if bytes % (1 << 20) != 0 || !(4..=3072).contains(&mem_mib) {
            return Err(err(at("memory"), format!("{bytes} bytes is not a whole number of MiB within 4..=3072 MiB")));
        }
        out.push(McSpec { task: m.task.clone(), mem_mib, pin: m.pin, order: m.order });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(text: &str) -> Result<Policy, PlacementConfigError> {
        let p: PlacementConfig = toml::from_str(text).map_err(|e| err("toml", e.to_string()))?;
        p.policy()
    }

    #[test]
    fn defaults_and_overrides() {
        let p = placement("reserve = { cpus = 2.0, memory = \"2gb\" }\n").expect("defaults");
        assert_eq!(p.thresholds, DEFAULT_THRESHOLDS);
        assert_eq!((p.hysteresis, p.dwell_ms), (0.1, 60_000));
        assert_eq!(p.reserve, HostCost { cpus: 2.0, memory_bytes: 2 << 30 });
        let p = placement("thresholds = { network = 0.5 }\ndwell_s = 5\nreserve = { cpus = 1, memory = 1073741824 }\n")
            .expect("overrides");
        assert_eq!(p.thresholds[Resource::Network.index()], 0.5);
        assert_eq!(p.thresholds[Resource::Cpu.index()], 0.7, "others keep their default");
        assert_eq!(p.dwell_ms, 5000);
    }

    #[test]
    fn refusals_name_the_field() {
        let field = |t: &str| placement(t).expect_err(t).field;
        let r = "reserve = { cpus = 2.0, memory = \"2gb\" }\n";
        assert_eq!(field(&format!("{r}thresholds = {{ cpu = 1.5 }}\n")), "placement.thresholds.cpu");
        assert_eq!(field(&format!("{r}thresholds = {{ fpga = 0 }}\n")), "placement.thresholds.fpga");
        assert_eq!(field(&format!("{r}hysteresis = 0.7\n")), "placement.hysteresis");
        assert_eq!(field(&format!("{r}thresholds = {{ cpu = 0.1 }}\nhysteresis = 0.2\n")), "placement.hysteresis");
        assert_eq!(field(&format!("{r}dwell_s = 0\n")), "placement.dwell_s");
        assert_eq!(field(&format!("{r}mc_cgroup = \"../x\"\n")), "placement.mc_cgroup");
        assert_eq!(field(&format!("{r}audit_log = \"rel.jsonl\"\n")), "placement.audit_log");
        assert_eq!(field(&format!("{r}agent = \"mc-guest\"\n")), "placement.agent");
        assert_eq!(field(&format!("{r}run_dir = \"run\"\n")), "placement.run_dir");
        assert_eq!(field("reserve = { cpus = 0, memory = \"1gb\" }\n"), "placement.reserve.cpus");
        assert_eq!(field("reserve = { cpus = 1, memory = \"1kb\" }\n"), "placement.reserve.memory");
        assert_eq!(field("reserve = { cpus = 1, memory = \"lots\" }\n"), "placement.reserve.memory");
    }

    #[test]
    fn mc_entries_are_checked() {
        let mcs = |t: &str| -> Vec<McConfig> {
            #[derive(Deserialize)]
            struct W {
                mc: Vec<McConfig>,
            }
            toml::from_str::<W>(t).expect("toml").mc
        };
        let ok = check_mcs(&mcs(
            "[[mc]]\ntask = \"log\"\npin = \"card\"\n[[mc]]\ntask = \"qos\"\nmemory = \"32mb\"\norder = 2\n",
        ))
        .expect("valid");
        assert_eq!(ok[0], McSpec { task: "log".into(), mem_mib: 64, pin: Some(Side::Card), order: 0 });
        assert_eq!((ok[1].mem_mib, ok[1].order), (32, 2));
        let field = |t: &str| check_mcs(&mcs(t)).expect_err(t).field;
        assert_eq!(field("[[mc]]\ntask = \"backup\"\n"), "mc[0].task");
        assert_eq!(field("[[mc]]\ntask = \"log\"\n[[mc]]\ntask = \"log\"\n"), "mc[1].task");
        assert_eq!(
            field("[[mc]]\ntask = \"log\"\nmemory = \"1gb\"\n[[mc]]\ntask = \"qos\"\nmemory = \"100kb\"\n"),
            "mc[1].memory"
        );
    }
}
