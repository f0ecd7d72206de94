//! Taking over after a governor was killed (issue 11): the MC VMs it left
//! running are adopted where they are, and the log pipe reads on from
//! where the lines already written left off.

use std::path::PathBuf;

use super::mover::Site;
use super::runtime::{Runtime, RuntimeOptions};
use super::Side;

/// In the run directory: removed by a clean stop, left by a kill.
pub(super) fn log_resume_path(opts: &RuntimeOptions) -> PathBuf {
    opts.host.run_dir.join("logs-resume.json")
}

impl Runtime {
    /// Save where the log pipe left off (a governor taking over after a
    /// kill reads on from there) when it changed.
    pub(super) fn save_log_resume(&mut self) {
        let Some(pipe) = &self.log_pipe else { return };
        let r = pipe.resume();
        if self.log_resume.as_ref() == Some(&r) {
            return;
        }
        let path = log_resume_path(&self.opts);
        match r.save(&path) {
            Ok(()) => self.log_resume = Some(r),
            Err(e) => tracing::warn!(state = %path.display(), "saving the log positions: {e}"),
        }
    }

    /// The MC VMs a killed governor left running, on the card and on the
    /// host, taken over where they are (a VM running on both sides, after
    /// a kill mid-move, keeps the card's copy).
    pub(super) fn adopt_all(&mut self) -> Vec<(String, Side)> {
        let tasks: Vec<String> = self.opts.specs.iter().map(|s| s.task.clone()).collect();
        let on_card = self.sites.card.adopt(&tasks);
        let mut out: Vec<(String, Side)> = on_card.iter().map(|t| (t.clone(), Side::Card)).collect();
        for t in &tasks {
            if !self.sites.host.adopt(t) {
                continue;
            }
            if on_card.contains(t) {
                if let Err(e) = self.sites.host.release(t) {
                    tracing::warn!(task = t, "stopping the host's second copy: {e}");
                }
            } else {
                out.push((t.clone(), Side::Host));
            }
        }
        out
    }
}
