//! A shaper opened on first use: a governor with no `shape` limit never
//! needs rtnetlink or /proc/net/psched, so a host where those fail can still
//! run it for telemetry and policing.

use super::{ShapeError, Shaper};

type Open<S> = Box<dyn FnMut() -> Result<S, ShapeError> + Send>;

pub struct LazyShaper<S> {
    shaper: Option<S>,
    open: Open<S>,
}

impl<S: Shaper> LazyShaper<S> {
    /// A shaper made by `open` the first time one is needed.
    pub fn opening(open: impl FnMut() -> Result<S, ShapeError> + Send + 'static) -> LazyShaper<S> {
        LazyShaper { shaper: None, open: Box::new(open) }
    }

    /// A shaper that is there already (tests give a fake).
    pub fn ready(shaper: S) -> LazyShaper<S> {
        LazyShaper { shaper: Some(shaper), open: Box::new(|| unreachable_open()) }
    }

    fn get(&mut self) -> Result<&mut S, ShapeError> {
        if self.shaper.is_none() {
            self.shaper = Some((self.open)()?);
        }
        // Set just above when it was missing.
        self.shaper.as_mut().ok_or(ShapeError::Socket(std::io::Error::other("shaper not opened")))
    }
}

/// `ready` never calls its opener; an error (not a panic) if it ever did.
fn unreachable_open<S>() -> Result<S, ShapeError> {
    Err(ShapeError::Socket(std::io::Error::other("shaper already given")))
}

impl<S: Shaper> Shaper for LazyShaper<S> {
    fn add_htb(&mut self, ifindex: u32, major: u16) -> Result<(), ShapeError> {
        self.get()?.add_htb(ifindex, major)
    }
    fn set_class(
        &mut self,
        ifindex: u32,
        major: u16,
        minor: u16,
        rate_bps: u64,
        burst_bytes: u32,
    ) -> Result<(), ShapeError> {
        self.get()?.set_class(ifindex, major, minor, rate_bps, burst_bytes)
    }
    fn set_leaf(&mut self, ifindex: u32, major: u16, minor: u16, leaf: super::Leaf) -> Result<(), ShapeError> {
        self.get()?.set_leaf(ifindex, major, minor, leaf)
    }
    fn delete_class(&mut self, ifindex: u32, major: u16, minor: u16) -> Result<(), ShapeError> {
        self.get()?.delete_class(ifindex, major, minor)
    }
    fn delete_root(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        self.get()?.delete_root(ifindex)
    }
    fn add_ifb(&mut self, name: &str) -> Result<u32, ShapeError> {
        self.get()?.add_ifb(name)
    }
    fn link_index(&mut self, name: &str) -> Result<u32, ShapeError> {
        self.get()?.link_index(name)
    }
    fn delete_link(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        self.get()?.delete_link(ifindex)
    }
    fn gso_max_size(&mut self, ifindex: u32) -> Result<u32, ShapeError> {
        self.get()?.gso_max_size(ifindex)
    }
    fn set_gso_max_size(&mut self, ifindex: u32, bytes: u32) -> Result<(), ShapeError> {
        self.get()?.set_gso_max_size(ifindex, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::FakeShaper;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn opened_once_on_first_use() {
        let opened = Arc::new(AtomicU32::new(0));
        let o = opened.clone();
        let fake = FakeShaper::new();
        let f = fake.clone();
        let mut s = LazyShaper::opening(move || {
            o.fetch_add(1, Ordering::Relaxed);
            Ok(f.clone())
        });
        assert_eq!(opened.load(Ordering::Relaxed), 0, "nothing opened before use");
        s.add_htb(5, 0x7a).expect("htb");
        s.delete_root(5).expect("root");
        assert_eq!(opened.load(Ordering::Relaxed), 1);
        assert!(fake.is_clean());
    }

    #[test]
    fn a_failing_open_is_the_operations_error() {
        let mut s: LazyShaper<FakeShaper> =
            LazyShaper::opening(|| Err(ShapeError::PschedRead(std::io::Error::other("no psched"))));
        assert!(matches!(s.add_ifb("x"), Err(ShapeError::PschedRead(_))));
    }
}
