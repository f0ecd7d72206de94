//! The audit log of placement decisions: one JSON object per line, with
//! everything the decision saw (each resource's use and threshold, each MC
//! VM's side, costs and pin), what it decided, a bounded reason code, a
//! human sentence, and for moves the measured duration of every step and
//! the pause. Appended by the governor, read by `governor decisions`.
//! Capped in size: past the cap the file is rotated once (`.1`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Decision, HostCost, Inputs, Move, Reason, Resource, Side};

/// A resource's use and threshold when the decision was taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceView {
    pub resource: Resource,
    pub used: f64,
    pub threshold: f64,
}

/// An MC VM as the decision saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task: String,
    pub side: Side,
    /// Per resource (fpga, cpu, memory, network), fraction of the card.
    pub card_cost: [f64; 4],
    pub host_cost: HostCost,
    pub pinned: Option<Side>,
}

/// One step of a move and how long it took.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: String,
    pub ms: f64,
}

/// How a move went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveReport {
    pub task: String,
    pub to: Side,
    pub ok: bool,
    pub steps: Vec<StepTiming>,
    /// How long the VM was paused (its downtime).
    pub pause_ms: f64,
    /// What failed, when a step did (the VM then runs where it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// ms since the Unix epoch: for decisions, the wall time at the
    /// governor's start plus the monotonic time since (so intervals are
    /// the ones the engine decided on; a clock step does not show in them).
    pub time_ms: u64,
    pub tick: u64,
    /// Decided and logged, not acted on (`governor run --dry-run`).
    pub dry_run: bool,
    pub card: Vec<ResourceView>,
    pub tasks: Vec<TaskView>,
    pub reason: Reason,
    pub explain: String,
    pub moves: Vec<Move>,
    /// Filled in once the moves ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<MoveReport>,
}

impl AuditRecord {
    /// The record of a decision on its inputs (moves not run yet).
    pub fn of(i: &Inputs<'_>, d: &Decision, tick: u64, time_ms: u64, dry_run: bool) -> AuditRecord {
        AuditRecord {
            time_ms,
            tick,
            dry_run,
            card: Resource::ALL
                .iter()
                .map(|r| ResourceView {
                    resource: *r,
                    used: i.card[r.index()],
                    threshold: i.policy.thresholds[r.index()],
                })
                .collect(),
            tasks: i
                .tasks
                .iter()
                .map(|t| TaskView {
                    task: t.name.clone(),
                    side: t.side,
                    card_cost: t.card_cost,
                    host_cost: t.host_cost,
                    pinned: t.pin,
                })
                .collect(),
            reason: d.reason,
            explain: d.explain.clone(),
            moves: d.moves.clone(),
            reports: Vec::new(),
        }
    }
}

/// The audit log file, appended line by line.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
}

/// Default cap before the log is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

impl AuditLog {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(AuditLog { path: path.to_path_buf(), file, size, max_bytes })
    }

    /// Append one record (a whole line, flushed).
    pub fn append(&mut self, r: &AuditRecord) -> io::Result<()> {
        self.append_json(r)
    }

    /// Append any record as one JSON line (the health log uses this too).
    pub fn append_json<T: Serialize>(&mut self, r: &T) -> io::Result<()> {
        let mut line = serde_json::to_string(r).map_err(io::Error::other)?;
        line.push('\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let old = rotated(&self.path);
        std::fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Where the previous file goes when the log rotates.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// A user VM's health changed, as the monitor MC VM decided (claim 14):
/// in the same audit log as the placement decisions, `"kind": "health"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthEvent {
    /// Always "health" (what tells these lines from placement records).
    pub kind: String,
    pub time_ms: u64,
    pub vm: String,
    pub health: String,
    pub reason: String,
    pub detail: u32,
    /// Where the monitor VM ran when it decided.
    pub monitor: Side,
}

/// Wall-clock ms since the epoch (the audit log's time).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A limit change the qos MC VM decided (claim 14), as the governor
/// applied it: `"kind": "qos"`, in the same audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QosEvent {
    /// Always "qos".
    pub kind: String,
    pub time_ms: u64,
    pub vm: String,
    /// egress | ingress
    pub direction: String,
    /// card-network | noisy-neighbour | calm
    pub reason: String,
    /// The number behind the reason (card use in basis points, a victim's
    /// delay in µs, calm ticks).
    pub detail: u32,
    /// The limit now in force (bit/s); None: no limit.
    pub rate_bps: Option<u64>,
    /// The limit before (bit/s); None: none.
    pub before_bps: Option<u64>,
    /// Where the qos VM ran when it decided.
    pub qos_vm: Side,
    pub applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An MC VM stopped for what its agent answered (a malformed or lying
/// answer) or a fault: `"kind": "mc_stopped"`. It stays stopped; the
/// other MC VMs and the governor go on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct McStoppedEvent {
    /// Always "mc_stopped".
    pub kind: String,
    pub time_ms: u64,
    pub task: String,
    pub side: Side,
    pub reason: String,
}

/// The `"kind"` of an audit line (placement records have none).
fn kind_of(line: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(line).ok()?.get("kind")?.as_str().map(str::to_string)
}

/// The lines of one kind (None: placement records) of a log, parsed,
/// oldest first (the rotated file first); a line that does not parse is an
/// error naming its file and line number.
fn read_kind<T: serde::de::DeserializeOwned>(path: &Path, kind: Option<&str>) -> io::Result<Vec<T>> {
    let mut out = Vec::new();
    for p in [rotated(path), path.to_path_buf()] {
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        for (n, line) in lines.filter(|(_, l)| kind_of(l).as_deref() == kind) {
            let r = serde_json::from_str(line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}:{}: {e}", p.display(), n + 1)))?;
            out.push(r);
        }
    }
    Ok(out)
}

/// The health events of a log, oldest first.
pub fn read_health(path: &Path) -> io::Result<Vec<HealthEvent>> {
    read_kind(path, Some("health"))
}

/// The QoS limit changes of a log, oldest first.
pub fn read_qos(path: &Path) -> io::Result<Vec<QosEvent>> {
    read_kind(path, Some("qos"))
}

/// The MC VMs stopped for their answers, oldest first.
pub fn read_mc_stopped(path: &Path) -> io::Result<Vec<McStoppedEvent>> {
    read_kind(path, Some("mc_stopped"))
}

/// The placement records of a log, oldest first (health and QoS events
/// are skipped).
pub fn read(path: &Path) -> io::Result<Vec<AuditRecord>> {
    read_kind(path, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{decide, Policy, Task};

    #[test]
    fn records_round_trip_through_a_rotating_file() {
        let p = Policy {
            thresholds: [0.8, 0.7, 0.8, 0.6],
            hysteresis: 0.1,
            dwell_ms: 1000,
            reserve: HostCost { cpus: 1.0, memory_bytes: 1 << 30 },
        };
        let tasks = vec![Task {
            name: "log".into(),
            side: Side::Card,
            card_cost: [0.0, 0.2, 0.01, 0.0],
            host_cost: HostCost { cpus: 0.1, memory_bytes: 64 << 20 },
            pin: None,
            order: 0,
            last_move_ms: None,
        }];
        let i = Inputs {
            now_ms: 10_000,
            card: [0.1, 0.8, 0.3, 0.1],
            tasks: &tasks,
            host_used: HostCost::default(),
            calm_since_ms: None,
            policy: &p,
        };
        let d = decide(&i);
        let mut r = AuditRecord::of(&i, &d, 7, 1_700_000_000_000, false);
        assert_eq!(r.reason, Reason::Relieve);
        assert_eq!(r.card[1], ResourceView { resource: Resource::Cpu, used: 0.8, threshold: 0.7 });
        r.reports.push(MoveReport {
            task: "log".into(),
            to: Side::Host,
            ok: true,
            steps: vec![StepTiming { step: "pause".into(), ms: 0.4 }],
            pause_ms: 3.2,
            error: None,
        });
        let dir = std::env::temp_dir().join(format!("governor-audit-{}", std::process::id()));
        let path = dir.join("decisions.jsonl");
        let line_len = serde_json::to_string(&r).expect("json").len() as u64 + 1;
        let mut log = AuditLog::open(&path, line_len * 2).expect("open");
        for tick in 0..5 {
            r.tick = tick;
            log.append(&r).expect("append");
        }
        let back = read(&path).expect("read");
        let ticks: Vec<u64> = back.iter().map(|r| r.tick).collect();
        assert_eq!(ticks, vec![2, 3, 4], "one rotation kept; older records dropped past the cap");
        assert_eq!(back[2].reports[0].pause_ms, 3.2);
        // Health events share the file; each reader takes its own lines.
        let h = HealthEvent {
            kind: "health".into(),
            time_ms: 1,
            vm: "web".into(),
            health: "stalled".into(),
            reason: "no-progress".into(),
            detail: 12_000,
            monitor: Side::Card,
        };
        log.append_json(&h).expect("append health");
        assert_eq!(read(&path).expect("read").len(), 3, "decisions only");
        assert_eq!(read_health(&path).expect("health"), vec![h]);
        std::fs::write(&path, "{\"nope\":1}\n").expect("corrupt");
        let e = read(&path).expect_err("bad line");
        assert!(e.to_string().contains("decisions.jsonl:1"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
