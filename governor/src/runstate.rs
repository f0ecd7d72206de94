//! What a running governor changed at run time and a restarted one must
//! take over: the limits in force (set over the API or by the qos MC VM).
//! Written (atomically: a temporary file renamed over it) whenever they
//! change, to `/run/governor/state-<pin dir>.json`; removed by a clean stop,
//! so a file found at start means the governor before was killed, and its
//! limits, not the config's, are the ones in force.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::governor::LimitStatus;
use crate::qos::{Direction, LimitSpec, Mode, Quantity};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// Every limit in force; a VM direction absent here has none.
    pub limits: Vec<SavedLimit>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLimit {
    pub vm: String,
    pub direction: Direction,
    pub mode: Mode,
    pub rate_bps: u64,
    pub burst_bytes: u64,
    #[serde(default)]
    pub packet_rate: Option<u64>,
}

/// The state file of the governor whose pins are in `pin_dir` (one
/// governor per pin directory: it holds that lock).
pub fn path_for(pin_dir: &Path) -> PathBuf {
    let safe: String =
        pin_dir.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    Path::new("/run/governor").join(format!("state-{safe}.json"))
}

impl RunState {
    pub fn of(limits: &[LimitStatus]) -> RunState {
        RunState {
            limits: limits
                .iter()
                .map(|l| SavedLimit {
                    vm: l.vm.clone(),
                    direction: l.direction,
                    mode: l.mode,
                    rate_bps: l.rate_bps,
                    burst_bytes: l.burst_bytes,
                    packet_rate: l.packet_rate,
                })
                .collect(),
        }
    }

    /// The state a killed governor left, if any. A file that does not
    /// parse is reported and ignored (the config's limits apply).
    pub fn load(path: &Path) -> Option<RunState> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(state = %path.display(), "reading the state a governor before left: {e}");
                return None;
            }
        };
        match serde_json::from_str(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(state = %path.display(), "ignoring the state a governor before left: {e}");
                None
            }
        }
    }

    /// Write it atomically (a reader or a restart never sees half).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// The config with these limits in force instead of its own, for every
    /// VM it still has (a VM no longer configured is not watched).
    pub fn apply(&self, cfg: &mut Config) {
        for vm in &mut cfg.vms {
            for dir in [Direction::Egress, Direction::Ingress] {
                let saved = self.limits.iter().find(|l| l.vm == vm.name && l.direction == dir);
                let spec = saved.map(|l| LimitSpec {
                    mode: l.mode,
                    rate: Quantity::Number(l.rate_bps),
                    burst: Quantity::Number(l.burst_bytes),
                    packet_rate: l.packet_rate,
                });
                match dir {
                    Direction::Egress => vm.qos.egress = spec,
                    Direction::Ingress => vm.qos.ingress = spec,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_limits_replace_the_configs_and_round_trip() {
        let mut cfg = Config::parse(
            "[[vm]]\nname = \"a\"\ncgroup = \"a\"\ninterfaces = [\"a0\"]\n[vm.qos.egress]\nrate = \"10mbit\"\nburst = \"1mb\"\n\
             [[vm]]\nname = \"b\"\ncgroup = \"b\"\ninterfaces = [\"b0\"]\n",
        )
        .expect("config");
        let st = RunState {
            limits: vec![SavedLimit {
                vm: "b".into(),
                direction: Direction::Ingress,
                mode: Mode::Shape,
                rate_bps: 5_000_000,
                burst_bytes: 100_000,
                packet_rate: None,
            }],
        };
        st.apply(&mut cfg);
        assert_eq!(cfg.vms[0].qos.egress, None, "a's config limit was cleared at run time");
        let b = cfg.vms[1].qos.ingress.as_ref().expect("b's run-time limit");
        assert_eq!(
            (b.mode, &b.rate, &b.burst),
            (Mode::Shape, &Quantity::Number(5_000_000), &Quantity::Number(100_000))
        );
        let l = b.check("x").expect("a valid limit");
        assert_eq!((l.rate_bps, l.burst_bytes), (5_000_000, 100_000));
        let dir = std::env::temp_dir().join(format!("governor-runstate-{}", std::process::id()));
        let path = dir.join("s.json");
        st.save(&path).expect("save");
        assert_eq!(RunState::load(&path), Some(st));
        std::fs::write(&path, "{").expect("garbage");
        assert_eq!(RunState::load(&path), None);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
