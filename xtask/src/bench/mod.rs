//! `cargo xtask bench`: measurements, not tests. Each bench returns rows; the
//! table is printed and its section of BENCHMARKS.md is replaced.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};

use crate::build::root;
use crate::leftovers::Leftovers;

mod card;
mod daemon;
mod overhead;
mod placement;
mod qos;
mod testrun;
mod tick;
mod vmm;

/// One measured figure, optionally compared with a peer measured in the same run.
pub struct Row {
    pub metric: String,
    pub value: String,
    pub peer: String,
    pub note: String,
}

impl Row {
    pub fn new(metric: impl Into<String>, value: impl Into<String>) -> Self {
        Row { metric: metric.into(), value: value.into(), peer: String::new(), note: String::new() }
    }
    pub fn peer(mut self, peer: impl Into<String>) -> Self {
        self.peer = peer.into();
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

pub fn bench(which: &str) -> Result<()> {
    let all = ["overhead", "qos", "vmm", "card", "placement", "tick"];
    let selected: Vec<&str> = match which {
        "all" => all.to_vec(),
        w if all.contains(&w) => vec![w],
        w => bail!("unknown bench {w:?}: expected one of overhead, qos, vmm, card, placement, tick, all"),
    };
    crate::build::all()?;
    let watch = Leftovers::watch();
    for name in selected {
        let rows = match name {
            "overhead" => overhead::bench(),
            "qos" => qos::bench(),
            "vmm" => vmm::bench(),
            "card" => card::bench(),
            "placement" => placement::bench(),
            "tick" => tick::bench(),
            _ => unreachable!("checked above"),
        };
        match rows {
            Ok(rows) => {
                let table = table(name, &rows);
                println!("{table}");
                write_section(name, &table)?;
            }
            Err(e) => eprintln!("bench {name}: {e:#}"),
        }
    }
    watch.check("the benchmarks")
}

fn table(name: &str, rows: &[Row]) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "### {name}\n");
    let _ = writeln!(t, "| metric | value | peer (same run) | note |");
    let _ = writeln!(t, "|---|---|---|---|");
    for r in rows {
        let _ = writeln!(t, "| {} | {} | {} | {} |", r.metric, r.value, r.peer, r.note);
    }
    t
}

/// Replace (or append) the section of BENCHMARKS.md that belongs to `name`.
fn write_section(name: &str, table: &str) -> Result<()> {
    let path = root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nWritten by `cargo xtask bench`; each section is replaced by its own bench.\n".into()
    });
    let begin = format!("<!-- bench:{name} -->");
    let end = format!("<!-- /bench:{name} -->");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let section = format!(
        "{begin}\n{table}\nMeasured on kernel {} with {} CPUs.\n{end}",
        host.trim(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], section, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), section),
    };
    std::fs::write(&path, new).with_context(|| format!("write {}", path.display()))
}
