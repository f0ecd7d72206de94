//! A move of an MC VM between card and host (claim 5), keeping its state:
//! pause on the source, snapshot, restore on the destination (a VMM made
//! ready ahead of time, so its spawn is off the critical path), resume
//! there, then release the source's copy. Every step is timed; if one
//! fails, the destination's copy is discarded and the VM resumes where it
//! was, so the task never runs twice and is never lost.
//!
//! The sides are behind the [`Actuator`] trait (card: card-link mailbox;
//! host: vmm processes), with an in-memory fake in the tests; the order of
//! steps and the recovery are here, once.

use std::time::Instant;

use super::audit::{MoveReport, StepTiming};
use super::Side;

/// What went wrong in one step, as the actuator says it.
#[derive(Debug, thiserror::Error)]
#[error("{step} on the {side:?} side: {reason}")]
pub struct StepError {
    pub step: &'static str,
    pub side: Side,
    pub reason: String,
}

/// The operations a move needs on one side (card: card-link mailbox; host:
/// vmm processes). Each one bounds its own time (card-link and the vmm
/// client have timeouts) and says what failed.
pub trait Site {
    /// Make this side ready to take the task (e.g. spawn an empty VMM);
    /// idempotent.
    fn prepare(&mut self, task: &str) -> Result<(), String>;
    fn pause(&mut self, task: &str) -> Result<(), String>;
    fn resume(&mut self, task: &str) -> Result<(), String>;
    /// The paused VM's snapshot.
    fn snapshot(&mut self, task: &str) -> Result<Vec<u8>, String>;
    /// Restore the task from `image`, paused.
    fn restore(&mut self, task: &str, image: &[u8]) -> Result<(), String>;
    /// Stop and release the task's copy on this side.
    fn release(&mut self, task: &str) -> Result<(), String>;

    /// Pre-copy, source side: a base of the *running* VM (None: this side
    /// cannot take one; the move then copies everything while paused).
    fn snapshot_live(&mut self, _task: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    /// Pre-copy round, source side: the *running* VM's changes since the
    /// last snapshot (None: this side takes no such rounds).
    fn snapshot_live_diff(&mut self, _task: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    /// Pre-copy round, destination side: apply a round's diff to the staged
    /// VM, which stays staged.
    fn apply_live_diff(&mut self, task: &str, _diff: &[u8]) -> Result<(), String> {
        Err(format!("{task}: this side applies no pre-copy rounds"))
    }
    /// Pre-copy, source side: the paused VM's changes since the base.
    fn snapshot_diff(&mut self, task: &str) -> Result<Vec<u8>, String> {
        Err(format!("{task}: this side takes no diff snapshots"))
    }
    /// Pre-copy, destination side: restore the base into the prepared VMM,
    /// paused, while the source still runs (false: this side cannot).
    fn stage(&mut self, _task: &str, _base: &[u8]) -> Result<bool, String> {
        Ok(false)
    }
    /// Pre-copy, destination side: apply the diff to the staged VM, which
    /// then holds the task (paused, until `resume`).
    fn apply_diff(&mut self, task: &str, _diff: &[u8]) -> Result<(), String> {
        Err(format!("{task}: this side applies no diffs"))
    }
}

/// Both sides, addressed by [`Side`].
pub trait Actuator {
    fn site(&mut self, side: Side) -> &mut dyn Site;
}

/// The card and the host as one actuator.
pub struct Sites<C, H> {
    pub card: C,
    pub host: H,
}

impl<C: Site, H: Site> Actuator for Sites<C, H> {
    fn site(&mut self, side: Side) -> &mut dyn Site {
        match side {
            Side::Card => &mut self.card,
            Side::Host => &mut self.host,
        }
    }
}

struct Timer {
    steps: Vec<StepTiming>,
}

impl Timer {
    fn step<T>(
        &mut self,
        step: &'static str,
        side: Side,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, StepError> {
        let t = Instant::now();
        let r = f();
        self.steps
            .push(StepTiming { step: format!("{step} ({})", side_name(side)), ms: t.elapsed().as_secs_f64() * 1e3 });
        r.map_err(|reason| StepError { step, side, reason })
    }
}

fn side_name(s: Side) -> &'static str {
    match s {
        Side::Card => "card",
        Side::Host => "host",
    }
}

/// Move `task` from `from` to the other side. The report says how every
/// step went and how long the VM was paused.
///
/// With pre-copy (`precopy`, and both sides able), the source's memory is
/// copied while the VM still runs and staged on the destination; the pause
/// then covers only the diff (what the VM wrote since) and its apply.
/// Otherwise, or when a side cannot, the whole image moves while paused.
pub fn move_task(act: &mut impl Actuator, task: &str, from: Side) -> MoveReport {
    move_task_with(act, task, from, false)
}

pub fn move_task_with(act: &mut impl Actuator, task: &str, from: Side, precopy: bool) -> MoveReport {
    let to = from.other();
    let mut timer = Timer { steps: Vec::new() };
    let mut paused_at = None;
    let mut restored = false;
    let result = (|| -> Result<(), StepError> {
        timer.step("prepare", to, || act.site(to).prepare(task))?;
        let mut staged = false;
        if precopy {
            if let Some(base) = timer.step("pre-copy base", from, || act.site(from).snapshot_live(task))? {
                staged = timer.step("stage base", to, || act.site(to).stage(task, &base))?;
                // A staged copy is paused and never ran: discarded like a
                // restored one if a later step fails.
                restored = staged;
                // One more round while it runs: what it wrote during the
                // base's copy, so the pause covers only the last few ms.
                if staged {
                    let round = timer.step("pre-copy round", from, || act.site(from).snapshot_live_diff(task))?;
                    if let Some(d) = round {
                        timer.step("stage round", to, || act.site(to).apply_live_diff(task, &d))?;
                    }
                }
            }
        }
        paused_at = Some(Instant::now());
        timer.step("pause", from, || act.site(from).pause(task))?;
        if staged {
            let diff = timer.step("diff snapshot", from, || act.site(from).snapshot_diff(task))?;
            timer.step("apply diff", to, || act.site(to).apply_diff(task, &diff))?;
        } else {
            let image = timer.step("snapshot", from, || act.site(from).snapshot(task))?;
            timer.step("restore", to, || act.site(to).restore(task, &image))?;
            restored = true;
        }
        timer.step("resume", to, || act.site(to).resume(task))?;
        Ok(())
    })();
    let pause_ms = paused_at.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    match result {
        Ok(()) => {
            // The task runs on the destination; the source's copy is paused
            // and goes now. A failed release leaves a paused copy behind,
            // which is logged but does not undo the move.
            let released = timer.step("release", from, || act.site(from).release(task));
            let error = released.err().map(|e| format!("moved, but the old copy stays: {e}"));
            if let Some(e) = &error {
                tracing::warn!(task, "{e}");
            }
            MoveReport { task: task.into(), to, ok: true, steps: timer.steps, pause_ms, error }
        }
        Err(e) => {
            // Back to where it was: discard the destination's copy first,
            // then resume the source (it may not even have been paused).
            let mut error = e.to_string();
            if restored {
                if let Err(d) = timer.step("discard", to, || act.site(to).release(task)) {
                    error.push_str(&format!("; {d}"));
                }
            }
            if paused_at.is_some() {
                if let Err(r) = timer.step("resume", from, || act.site(from).resume(task)) {
                    error.push_str(&format!("; {r}"));
                }
            }
            tracing::warn!(task, "move to the {} failed: {error}", side_name(to));
            MoveReport { task: task.into(), to, ok: false, steps: timer.steps, pause_ms, error: Some(error) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::fake::{Fake, State};

    #[test]
    fn a_move_keeps_the_state_and_releases_the_source() {
        let mut f = Fake::with("log", Side::Card, 41);
        let r = move_task(&mut f, "log", Side::Card);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.error, None);
        assert_eq!(f.state(Side::Host, "log"), Some((State::Running, 41)), "state carried over");
        assert_eq!(f.state(Side::Card, "log"), None, "the card's copy is released");
        let steps: Vec<&str> = r.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(
            steps,
            ["prepare (host)", "pause (card)", "snapshot (card)", "restore (host)", "resume (host)", "release (card)"]
        );
        assert!(r.pause_ms >= 0.0 && r.pause_ms <= r.steps.iter().map(|s| s.ms).sum::<f64>() + 1.0);
    }

    #[test]
    fn a_failed_step_leaves_the_vm_running_where_it_was() {
        for (step, side) in [
            ("prepare", Side::Host),
            ("pause", Side::Card),
            ("snapshot", Side::Card),
            ("restore", Side::Host),
            ("resume", Side::Host),
        ] {
            let mut f = Fake::with("qos", Side::Card, 7);
            f.fail = Some((step, side));
            let r = move_task(&mut f, "qos", Side::Card);
            assert!(!r.ok, "{step}");
            assert!(r.error.as_deref().is_some_and(|e| e.contains(step)), "{step}: {:?}", r.error);
            assert_eq!(f.state(Side::Card, "qos"), Some((State::Running, 7)), "{step}: back on the card, running");
            assert_eq!(f.state(Side::Host, "qos"), None, "{step}: no copy left on the host");
        }
    }

    #[test]
    fn a_pre_copy_move_pauses_only_for_the_diff_and_fails_back_cleanly() {
        let mut f = Fake::with("log", Side::Card, 41);
        f.precopy = true;
        let r = move_task_with(&mut f, "log", Side::Card, true);
        assert!(r.ok, "{r:?}");
        let steps: Vec<&str> = r.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(
            steps,
            [
                "prepare (host)",
                "pre-copy base (card)",
                "stage base (host)",
                "pre-copy round (card)",
                "stage round (host)",
                "pause (card)",
                "diff snapshot (card)",
                "apply diff (host)",
                "resume (host)",
                "release (card)"
            ]
        );
        assert_eq!(f.state(Side::Host, "log"), Some((State::Running, 41)));
        for (step, side) in [
            ("pre-copy base", Side::Card),
            ("stage base", Side::Host),
            ("pre-copy round", Side::Card),
            ("stage round", Side::Host),
            ("diff snapshot", Side::Card),
            ("apply diff", Side::Host),
            ("resume", Side::Host),
        ] {
            let mut f = Fake::with("qos", Side::Card, 7);
            f.precopy = true;
            f.fail = Some((step, side));
            let r = move_task_with(&mut f, "qos", Side::Card, true);
            assert!(!r.ok, "{step}");
            assert_eq!(f.state(Side::Card, "qos"), Some((State::Running, 7)), "{step}: back on the card, running");
            assert_eq!(f.state(Side::Host, "qos"), None, "{step}: no copy left on the host");
            assert!(f.staged.is_empty(), "{step}: nothing staged left: {:?}", f.staged);
        }
        // A side without pre-copy: the whole image moves while paused.
        let mut f = Fake::with("log", Side::Card, 5);
        let r = move_task_with(&mut f, "log", Side::Card, true);
        assert!(r.ok && r.steps.iter().any(|s| s.step == "snapshot (card)"), "{:?}", r.steps);
    }

    #[test]
    fn a_failed_release_keeps_the_move_and_says_so() {
        let mut f = Fake::with("monitor", Side::Host, 3);
        f.fail = Some(("release", Side::Host));
        let r = move_task(&mut f, "monitor", Side::Host);
        assert!(r.ok);
        assert!(r.error.as_deref().is_some_and(|e| e.contains("old copy stays")));
        assert_eq!(f.state(Side::Card, "monitor"), Some((State::Running, 3)));
        assert_eq!(f.state(Side::Host, "monitor"), Some((State::Paused, 3)), "paused, never running twice");
    }
}
