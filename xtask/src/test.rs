//! `cargo xtask test`: every unit and integration test, as root, against the
//! real kernel. Integration tests run one at a time because they measure CPU
//! time and traffic on a small machine. After them, the host's inventory
//! (cgroups, links, namespaces, pins, lock files, temporary files,
//! processes) is compared with the one taken before, as one more test. The
//! last line is the runner's total.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::build::{self, cargo};
use crate::leftovers::Leftovers;

pub fn test(args: &[String]) -> Result<()> {
    build::all()?;
    let watch = Leftovers::watch();
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--release", "--no-fail-fast", "--"])
        .arg("--test-threads=1")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("start cargo test")?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(out).lines() {
        let line = line.context("read cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, "passed");
            failed += count(rest, "failed");
            ignored += count(rest, "ignored");
        }
    }
    let status = child.wait().context("wait for cargo test")?;
    match watch.check("the tests") {
        Ok(()) => {
            println!("test host_holds_nothing_of_the_run ... ok");
            passed += 1;
        }
        Err(e) => {
            println!("test host_holds_nothing_of_the_run ... FAILED\n{e:#}");
            failed += 1;
        }
    }
    let mut summary = format!("{passed} passed, {failed} failed");
    if ignored > 0 {
        summary.push_str(&format!(", {ignored} skipped"));
    }
    println!("{summary}");
    if !status.success() || failed > 0 {
        bail!("tests failed: {summary}");
    }
    Ok(())
}

/// "ok. 3 passed; 0 failed; ..." -> the number before `what`.
fn count(s: &str, what: &str) -> u64 {
    s.split(';')
        .filter_map(|part| {
            let mut w = part.split_whitespace().rev();
            let name = w.next()?;
            let n = w.next()?;
            if name == what {
                n.parse::<u64>().ok()
            } else {
                None
            }
        })
        .sum()
}
