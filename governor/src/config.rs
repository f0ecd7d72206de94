//! The governor's configuration file (TOML), checked whole before anything
//! is applied: a wrong config is refused with the field and the reason.
//!
//! ```toml
//! tick_ms = 1000                       # 100 ..= 60000
//! pin_dir = "/sys/fs/bpf/governor"
//! socket = "/run/governor/governor.sock"
//!
//! [[vm]]
//! name = "web1"                        # [A-Za-z0-9_.-], unique
//! cgroup = "machine/web1"              # relative to the cgroup roots
//! interfaces = ["tap-web1"]            # host-side ends of the VM's NICs
//! role = "user"                        # user | mc (management VM)
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::placement::config::{check_mcs, CardConfig, McConfig, PlacementConfig};
use crate::qos::{Direction, LimitSpec};
use cgroupfs::Layout;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/governor";
pub const DEFAULT_SOCKET: &str = "/run/governor/governor.sock";
pub const MIN_TICK_MS: u64 = 100;
pub const MAX_TICK_MS: u64 = 60_000;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Syntax(String),
    #[error("config: {field}: {reason}")]
    Field { field: String, reason: String },
    #[error("config: {field}: {source}")]
    Cgroup {
        field: String,
        #[source]
        source: cgroupfs::CgroupError,
    },
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field { field: field.into(), reason: reason.into() }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    User,
    /// A management-and-control VM.
    Mc,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Mc => "mc",
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    pub cgroup: String,
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub qos: QosConfig,
    /// Files the VM's log lines are written to (a process's redirected
    /// output, a VMM's serial console file); followed, and managed by the
    /// log MC VM.
    #[serde(default)]
    pub logs: Vec<std::path::PathBuf>,
}

/// `[vm.qos]`: limits per direction, as the VM sees it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QosConfig {
    pub egress: Option<LimitSpec>,
    pub ingress: Option<LimitSpec>,
    /// The qos MC VM may narrow this VM's limits (down to `min`) when its
    /// traffic fills the card's network or it is the noisy neighbour, and
    /// restores them when calm.
    pub adaptive: Option<AdaptiveSpec>,
}

/// `[vm.qos.adaptive]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSpec {
    /// The narrowest limit (a rate, e.g. "20mbit").
    pub min: crate::qos::Quantity,
}

impl AdaptiveSpec {
    /// The floor in bit/s, checked against the VM's configured limits.
    pub fn min_bps(&self, qos: &QosConfig, at: &str) -> Result<u64, ConfigError> {
        let f = format!("{at}.min");
        let min = crate::qos::parse_rate(&self.min).map_err(|r| field(&f, r))?;
        if !(crate::qos::MIN_RATE_BPS..=crate::qos::MAX_RATE_BPS).contains(&min) {
            return Err(field(
                &f,
                format!("{min} bit/s is outside {}..={}", crate::qos::MIN_RATE_BPS, crate::qos::MAX_RATE_BPS),
            ));
        }
        for (dir, spec) in [("egress", &qos.egress), ("ingress", &qos.ingress)] {
            let Some(rate) = spec.as_ref().and_then(|s| crate::qos::parse_rate(&s.rate).ok()) else { continue };
            if min > rate {
                return Err(field(&f, format!("{min} bit/s is above the {dir} limit of {rate} bit/s")));
            }
        }
        Ok(min)
    }
}

impl VmConfig {
    pub fn qos_specs(&self) -> Vec<(Direction, &LimitSpec)> {
        let mut v = Vec::new();
        if let Some(s) = &self.qos.egress {
            v.push((Direction::Egress, s));
        }
        if let Some(s) = &self.qos.ingress {
            v.push((Direction::Ingress, s));
        }
        v
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Where to serve Prometheus metrics (e.g. "127.0.0.1:9477"); none when absent.
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// IFB device created for shaping traffic from VMs.
    #[serde(default = "default_ifb")]
    pub qos_ifb: String,
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
    /// The board-card condition and its rules (see `placement::config`).
    #[serde(default)]
    pub placement: Option<PlacementConfig>,
    /// The management VMs to place, one per task.
    #[serde(default)]
    pub mc: Vec<McConfig>,
    /// How to reach the card (needed by [[mc]]).
    #[serde(default)]
    pub card: Option<CardConfig>,
    /// `governor run --dry-run`: decide and log placements, move nothing.
    #[serde(skip)]
    pub dry_run: bool,
}

fn default_ifb() -> String {
    "gov-ifb0".into()
}

fn default_tick() -> u64 {
    1000
}
fn default_pin_dir() -> PathBuf {
    DEFAULT_PIN_DIR.into()
}
fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

/// The name under which host-side MC VMs (their whole cgroup subtree) are
/// watched, with role `mc`.
pub const MC_VM_NAME: &str = "mc";

impl Config {
    /// Read, parse and check a config against this host's cgroups and
    /// interfaces.
    pub fn load(path: &Path, layout: &Layout) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let cfg = Config::parse(&text)?;
        cfg.check_host(layout)?;
        Ok(cfg)
    }

    /// Parse and check what can be checked without looking at the host.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !(MIN_TICK_MS..=MAX_TICK_MS).contains(&self.tick_ms) {
            return Err(field("tick_ms", format!("{} is outside {MIN_TICK_MS}..={MAX_TICK_MS}", self.tick_ms)));
        }
        // A directory of our own below bpffs: the governor removes what it
        // pinned there on exit, so it must never be bpffs itself.
        let pin_ok = self.pin_dir.is_absolute()
            && self.pin_dir.starts_with(crate::tracefs::BPFFS)
            && self.pin_dir.components().count() > Path::new(crate::tracefs::BPFFS).components().count()
            && self.pin_dir.components().all(|c| !matches!(c, std::path::Component::ParentDir));
        if !pin_ok {
            return Err(field(
                "pin_dir",
                format!("{} is not a directory below {}", self.pin_dir.display(), crate::tracefs::BPFFS),
            ));
        }
        if !self.socket.is_absolute() {
            return Err(field("socket", "must be an absolute path"));
        }
        if self.qos_ifb.is_empty() || self.qos_ifb.len() >= libc::IF_NAMESIZE || self.qos_ifb.contains(['/', ' ']) {
            return Err(field("qos_ifb", format!("{:?} is not an interface name", self.qos_ifb)));
        }
        let mut names = HashSet::new();
        let mut ifaces = HashSet::new();
        let mut cgroups = HashSet::new();
        for (i, vm) in self.vms.iter().enumerate() {
            let at = |f: &str| format!("vm[{i}].{f}");
            let ok_char = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
            if vm.name.is_empty() || vm.name.len() > 64 || !vm.name.chars().all(ok_char) {
                return Err(field(at("name"), format!("{:?} must be 1-64 of [A-Za-z0-9_.-]", vm.name)));
            }
            if !names.insert(vm.name.as_str()) {
                return Err(field(at("name"), format!("{:?} is used by another vm", vm.name)));
            }
            let rel = Path::new(&vm.cgroup);
            let rel_ok =
                !vm.cgroup.is_empty() && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !rel_ok {
                return Err(field(
                    at("cgroup"),
                    format!("{:?} must be a relative path without '.' or '..'", vm.cgroup),
                ));
            }
            if !cgroups.insert(vm.cgroup.as_str()) {
                return Err(field(at("cgroup"), format!("{:?} belongs to another vm", vm.cgroup)));
            }
            for (j, ifname) in vm.interfaces.iter().enumerate() {
                if ifname.is_empty() || ifname.len() >= libc::IF_NAMESIZE || ifname.contains(['/', ' ']) {
                    return Err(field(at(&format!("interfaces[{j}]")), format!("{ifname:?} is not an interface name")));
                }
                if !ifaces.insert(ifname.as_str()) {
                    return Err(field(at(&format!("interfaces[{j}]")), format!("{ifname:?} belongs to another vm")));
                }
            }
            for (j, p) in vm.logs.iter().enumerate() {
                if !p.is_absolute() {
                    return Err(field(at(&format!("logs[{j}]")), "must be an absolute path"));
                }
            }
            for (dir, spec) in vm.qos_specs() {
                let at_dir = at(&format!("qos.{}", dir.as_str()));
                spec.check(&at_dir).map_err(|e| field(e.field, e.reason))?;
                if vm.interfaces.is_empty() {
                    return Err(field(at_dir, "a limit needs the vm to have interfaces"));
                }
            }
            if let Some(a) = &vm.qos.adaptive {
                let at_a = at("qos.adaptive");
                a.min_bps(&vm.qos, &at_a)?;
                if vm.interfaces.is_empty() {
                    return Err(field(at_a, "an adaptive limit needs the vm to have interfaces"));
                }
            }
        }
        if let Some(p) = &self.placement {
            p.policy().map_err(|e| field(e.field, e.reason))?;
        }
        check_mcs(&self.mc).map_err(|e| field(e.field, e.reason))?;
        if !self.mc.is_empty() && self.placement.is_none() {
            return Err(field(
                "placement",
                "management VMs ([[mc]]) need a [placement] section (at least its reserve)",
            ));
        }
        if let Some(c) = &self.card {
            c.check().map_err(|e| field(e.field, e.reason))?;
        }
        if !self.mc.is_empty() {
            if self.card.is_none() {
                return Err(field("card", "management VMs ([[mc]]) need a [card] section (its socket)"));
            }
            if self.placement.as_ref().is_some_and(|p| p.agent.is_none()) {
                return Err(field("placement.agent", "management VMs ([[mc]]) need the agent ELF they boot"));
            }
            if self.vms.iter().any(|v| v.name == MC_VM_NAME) {
                return Err(field(
                    "vm",
                    format!("the name {MC_VM_NAME:?} is the governor's own (its MC VMs' subtree)"),
                ));
            }
        }
        Ok(())
    }

    /// Check that every cgroup and interface named exists on this host.
    pub fn check_host(&self, layout: &Layout) -> Result<(), ConfigError> {
        for (i, vm) in self.vms.iter().enumerate() {
            layout
                .open(&vm.cgroup)
                .map_err(|source| ConfigError::Cgroup { field: format!("vm[{i}].cgroup"), source })?;
            for (j, ifname) in vm.interfaces.iter().enumerate() {
                crate::netdev::ifindex(ifname)
                    .map_err(|e| field(format!("vm[{i}].interfaces[{j}]"), format!("{ifname:?}: {e}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn defaults() {
        let c = Config::parse("").expect("empty is valid");
        assert_eq!(c.tick_ms, 1000);
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(c.vms.is_empty());
    }

    #[test]
    fn full() {
        let c = Config::parse(
            "tick_ms = 100\n[[vm]]\nname = \"a\"\ncgroup = \"x/a\"\ninterfaces = [\"veth0\"]\nrole = \"mc\"\n",
        )
        .expect("valid");
        assert_eq!(c.vms.len(), 1);
        assert_eq!(c.vms[0].role, Role::Mc);
    }

    #[test]
    fn refusals_name_the_field() {
        assert!(err("tick_ms = 50").contains("tick_ms"));
        assert!(err("tick_ms = 100000").contains("tick_ms"));
        assert!(err("pin_dir = \"/tmp/x\"").contains("pin_dir"));
        assert!(err("pin_dir = \"/sys/fs/bpf\"").contains("pin_dir"));
        assert!(err("pin_dir = \"/sys/fs/bpf/\"").contains("pin_dir"));
        assert!(err("pin_dir = \"/sys/fs/bpf/../x\"").contains("pin_dir"));
        let q = "[[vm]]\nname = \"a\"\ncgroup = \"a\"\ninterfaces = [\"v\"]\n[vm.qos.egress]\nmode = \"shape\"\nrate = \"fast\"\nburst = 1\n";
        assert!(err(q).contains("vm[0].qos.egress.rate"), "{}", err(q));
        let q = "[[vm]]\nname = \"a\"\ncgroup = \"a\"\ninterfaces = [\"v\"]\n[vm.qos.ingress]\nrate = \"10mbit\"\nburst = \"1mb\"\n[vm.qos.adaptive]\nmin = \"20mbit\"\n";
        assert!(err(q).contains("vm[0].qos.adaptive.min") && err(q).contains("above the ingress limit"), "{}", err(q));
        let q = "[[vm]]\nname = \"a\"\ncgroup = \"a\"\n[vm.qos.adaptive]\nmin = \"20mbit\"\n";
        assert!(err(q).contains("vm[0].qos.adaptive") && err(q).contains("interfaces"), "{}", err(q));
        let q = "[[vm]]\nname = \"a\"\ncgroup = \"a\"\ninterfaces = [\"v\"]\n[vm.qos.adaptive]\nmin = \"slow\"\n";
        assert!(err(q).contains("vm[0].qos.adaptive.min"), "{}", err(q));
        let q = "[[vm]]\nname = \"a\"\ncgroup = \"a\"\n[vm.qos.ingress]\nrate = \"10mbit\"\nburst = \"1mb\"\n";
        assert!(err(q).contains("vm[0].qos.ingress"), "{}", err(q));
        assert!(err("[[vm]]\nname = \"\"\ncgroup = \"a\"").contains("vm[0].name"));
        assert!(err("[[vm]]\nname = \"a b\"\ncgroup = \"a\"").contains("vm[0].name"));
        assert!(err("[[vm]]\nname = \"a\"\ncgroup = \"../a\"").contains("vm[0].cgroup"));
        assert!(err("[[vm]]\nname = \"a\"\ncgroup = \"/a\"").contains("vm[0].cgroup"));
        let dup = "[[vm]]\nname = \"a\"\ncgroup = \"a\"\n[[vm]]\nname = \"a\"\ncgroup = \"b\"";
        assert!(err(dup).contains("vm[1].name"));
        let shared = "[[vm]]\nname = \"a\"\ncgroup = \"a\"\ninterfaces=[\"v\"]\n[[vm]]\nname = \"b\"\ncgroup = \"b\"\ninterfaces=[\"v\"]";
        assert!(err(shared).contains("vm[1].interfaces[0]"));
        assert!(err("[[vm]]\nname = \"a\"\ncgroup = \"a\"\nrole = \"boss\"").contains("role"));
        assert!(err("bogus = 1").contains("bogus"));
    }

    #[test]
    fn host_check_names_missing_things() {
        let c = Config::parse("[[vm]]\nname = \"a\"\ncgroup = \"no-such-cgroup-xyz\"").expect("parses");
        assert!(c
            .check_host(&Layout::detect().expect("layout"))
            .expect_err("missing cgroup")
            .to_string()
            .contains("vm[0].cgroup"));
        let c = Config::parse("[[vm]]\nname = \"a\"\ncgroup = \".\"").err();
        assert!(c.is_some());
    }
}
