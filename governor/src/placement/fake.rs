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
}

impl Fake {
    pub fn with(task: &str, side: Side, counter: u64) -> Fake {
        let mut f =
            Fake { copies: HashMap::new(), ready: Vec::new(), fail: None, log: Vec::new(), current: Side::Card };
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
        self.copies.remove(&(side, task.into())).map(drop).ok_or_else(|| "no such copy".into())
    }
}
