//! An in-memory pair of sites for the placement tests: copies of tasks
//! with a counter as their state, a step that can be made to fail, and a
//! check after every resume that no task runs twice.

use std::collections::HashMap;

use super::mover::{Actuator, Site};
use super::Side;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
}

/// Two sides holding copies of tasks, with a counter as the VM's state,
/// checking after every step that a task never runs twice.
pub struct Fake {
    pub copies: HashMap<(Side, String), (State, u64)>,
    pub ready: Vec<Side>,
    pub fail: Option<(&'static str, Side)>,
    pub log: Vec<String>,
    pub current: Side,
    /// Both sides take pre-copy (live base, stage, diff, apply).
    pub precopy: bool,
    /// Staged bases by side and task.
    pub staged: HashMap<(Side, String), u64>,
}

impl Fake {
    pub fn with(task: &str, side: Side, counter: u64) -> Fake {
        let mut f = Fake {
            copies: HashMap::new(),
            ready: Vec::new(),
            fail: None,
            log: Vec::new(),
            current: Side::Card,
            precopy: false,
            staged: HashMap::new(),
        };
        f.copies.insert((side, task.into()), (State::Running, counter));
        f
    }
    pub fn check(&mut self, op: &'static str, side: Side, task: &str) -> Result<(), String> {
        self.log.push(format!("{op} {side:?} {task}"));
        if self.fail == Some((op, side)) {
            return Err(format!("injected failure of {op}"));
        }
        Ok(())
    }
    pub fn invariant(&self, task: &str) {
        let running = self.copies.iter().filter(|((_, t), (s, _))| t == task && *s == State::Running).count();
        assert!(running <= 1, "{task} runs twice: {:?}", self.copies);
    }
    pub fn state(&self, side: Side, task: &str) -> Option<(State, u64)> {
        self.copies.get(&(side, task.to_string())).copied()
    }
}

impl Actuator for Fake {
    fn site(&mut self, side: Side) -> &mut dyn Site {
        // The mover uses one side at a time; the fake keeps which.
        self.current = side;
        self
    }
}

impl Site for Fake {
    fn prepare(&mut self, task: &str) -> Result<(), String> {
        let side = self.current;
        self.check("prepare", side, task)?;
        self.ready.push(side);
        Ok(())
    }
    fn pause(&mut self, task: &str) -> Result<(), String> {
        let side = self.current;
        self.check("pause", side, task)?;
        let c = self.copies.get_mut(&(side, task.into())).ok_or("no such copy")?;
        c.0 = State::Paused;
        Ok(())
    }
    fn resume(&mut self, task: &str) -> Result<(), String> {
        let side = self.current;
        self.check("resume", side, task)?;
        let c = self.copies.get_mut(&(side, task.into())).ok_or("no such copy")?;
        c.0 = State::Running;
        self.invariant(task);
        Ok(())
    }
    fn snapshot(&mut self, task: &str) -> Result<Vec<u8>, String> {
        let side = self.current;
        self.check("snapshot", side, task)?;
        let c = self.copies.get(&(side, task.into())).ok_or("no such copy")?;
        assert_eq!(c.0, State::Paused, "snapshots are of paused VMs");
        Ok(c.1.to_le_bytes().to_vec())
    }
    fn restore(&mut self, task: &str, image: &[u8]) -> Result<(), String> {
        let side = self.current;
        self.check("restore", side, task)?;
        assert!(self.ready.contains(&side), "restore on a side that was not prepared");
        let n = u64::from_le_bytes(image.try_into().map_err(|_| "bad image")?);
        self.copies.insert((side, task.into()), (State::Paused, n));
        Ok(())
    }
    fn release(&mut self, task: &str) -> Result<(), String> {
        let side = self.current;
        self.check("release", side, task)?;
        if self.staged.remove(&(side, task.into())).is_some() {
            return Ok(());
        }
        self.copies.remove(&(side, task.into())).map(drop).ok_or_else(|| "no such copy".into())
    }
    fn snapshot_live(&mut self, task: &str) -> Result<Option<Vec<u8>>, String> {
        if !self.precopy {
            return Ok(None);
        }
        let side = self.current;
        self.check("pre-copy base", side, task)?;
        let c = self.copies.get(&(side, task.into())).ok_or("no such copy")?;
        assert_eq!(c.0, State::Running, "a live base is of a running VM");
        Ok(Some(c.1.to_le_bytes().to_vec()))
    }
    fn stage(&mut self, task: &str, base: &[u8]) -> Result<bool, String> {
        if !self.precopy {
            return Ok(false);
        }
        let side = self.current;
        self.check("stage base", side, task)?;
        assert!(self.ready.contains(&side), "staged on a side that was not prepared");
        let n = u64::from_le_bytes(base.try_into().map_err(|_| "bad base")?);
        self.staged.insert((side, task.into()), n);
        Ok(true)
    }
    fn snapshot_live_diff(&mut self, task: &str) -> Result<Option<Vec<u8>>, String> {
        let side = self.current;
        self.check("pre-copy round", side, task)?;
        let c = self.copies.get(&(side, task.into())).ok_or("no such copy")?;
        assert_eq!(c.0, State::Running, "a round is of a running VM");
        Ok(Some(c.1.to_le_bytes().to_vec()))
    }
    fn apply_live_diff(&mut self, task: &str, diff: &[u8]) -> Result<(), String> {
        let side = self.current;
        self.check("stage round", side, task)?;
        let n = u64::from_le_bytes(diff.try_into().map_err(|_| "bad diff")?);
        *self.staged.get_mut(&(side, task.into())).ok_or("nothing staged")? = n;
        Ok(())
    }
    fn snapshot_diff(&mut self, task: &str) -> Result<Vec<u8>, String> {
        let side = self.current;
        self.check("diff snapshot", side, task)?;
        let c = self.copies.get(&(side, task.into())).ok_or("no such copy")?;
        assert_eq!(c.0, State::Paused, "a diff is of a paused VM");
        Ok(c.1.to_le_bytes().to_vec())
    }
    fn apply_diff(&mut self, task: &str, diff: &[u8]) -> Result<(), String> {
        let side = self.current;
        self.check("apply diff", side, task)?;
        self.staged.remove(&(side, task.into())).ok_or("nothing staged")?;
        let n = u64::from_le_bytes(diff.try_into().map_err(|_| "bad diff")?);
        self.copies.insert((side, task.into()), (State::Paused, n));
        Ok(())
    }
}
