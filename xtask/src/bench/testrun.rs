//! BPF_PROG_TEST_RUN of tc programs through bpftool, cold and warm, for
//! `bench qos`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use fixtures::{testrun, TempDir};

use crate::stats::percentile;

/// A tc program's cost per packet without the loaded runs' noise:
/// `bpftool prog run` (BPF_PROG_TEST_RUN) on a 1514-byte frame on a given
/// interface. One run after writing 64 MiB is cold, as a packet every few
/// milliseconds finds everything; a million in a row are warm, what the
/// instructions cost. [`TestRunner::medians`] alternates the programs
/// round by round.
pub struct TestRunner {
    dir: TempDir,
    scratch: Vec<u8>,
}

impl TestRunner {
    pub fn new() -> Result<TestRunner> {
        let dir = TempDir::new("gov-bench-testrun").context("create the test-run directory")?;
        std::fs::write(dir.path().join("frame"), testrun::frame()).context("write the test frame")?;
        Ok(TestRunner { dir, scratch: vec![0u8; 64 << 20] })
    }

    /// The test context of a frame passing interface `ifindex`, as a file.
    fn ctx(&self, ifindex: u32) -> Result<std::path::PathBuf> {
        let path = self.dir.path().join(format!("ctx-{ifindex}"));
        std::fs::write(&path, testrun::skb_ctx(ifindex)).context("write the test context")?;
        Ok(path)
    }

    /// ns per run of `repeat` runs in a row; a single run starts cold.
    fn run(&mut self, prog: &[String], ctx: &Path, repeat: u32) -> Result<f64> {
        if repeat == 1 {
            for i in (0..self.scratch.len()).step_by(64) {
                self.scratch[i] = self.scratch[i].wrapping_add(1);
            }
            std::hint::black_box(&self.scratch);
        }
        let out = Command::new("bpftool")
            .args(["prog", "run"])
            .args(prog)
            .arg("data_in")
            .arg(self.dir.path().join("frame"))
            .arg("ctx_in")
            .arg(ctx)
            .args(["repeat", &repeat.to_string()])
            .output()
            .context("run bpftool prog run")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("bpftool prog run {}: {}", prog.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        testrun::duration_ns(&text).with_context(|| format!("no duration in bpftool's output: {text:?}"))
    }

    /// Median ns per run of each (bpftool program spec, e.g. `["id",
    /// "42"]`, and the interface the frame passes) over `rounds` rounds of
    /// `repeat` runs in a row (1: cold, see `run`), each program once per
    /// round, so drifts of the host reach all of them alike.
    pub fn medians(&mut self, progs: &[(Vec<String>, u32)], rounds: usize, repeat: u32) -> Result<Vec<f64>> {
        let ctxs = progs.iter().map(|(_, ifindex)| self.ctx(*ifindex)).collect::<Result<Vec<_>>>()?;
        // This thread and the bpftool it starts on one CPU, so the 64 MiB
        // written here leave nothing in the caches the run meets.
        let _pinned = PinnedCpu::to(0)?;
        let mut all = vec![Vec::with_capacity(rounds); progs.len()];
        for _ in 0..rounds {
            for (i, (p, _)) in progs.iter().enumerate() {
                all[i].push(self.run(p, &ctxs[i], repeat)?);
            }
        }
        Ok(all.iter_mut().map(|v| percentile(v, 0.5)).collect())
    }
}

/// The calling thread on one CPU until dropped (children inherit it).
struct PinnedCpu(libc::cpu_set_t);

impl PinnedCpu {
    fn to(cpu: usize) -> Result<PinnedCpu> {
        // SAFETY: plain sched_getaffinity/sched_setaffinity on this thread
        // with cpu_set_t values on our stack.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut before) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
                bail!("sched_setaffinity to CPU {cpu}: {}", std::io::Error::last_os_error());
            }
            Ok(PinnedCpu(before))
        }
    }
}

impl Drop for PinnedCpu {
    fn drop(&mut self) {
        // SAFETY: restoring the mask read in `to`.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) } != 0 {
            eprintln!("warning: restoring the CPU affinity: {}", std::io::Error::last_os_error());
        }
    }
}
