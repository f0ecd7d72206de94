//! An in-memory [`Shaper`] that behaves like the kernel where the governor
//! depends on it (a class needs its qdisc, a deleted root takes its classes,
//! a second IFB of one name is refused) and can be told to fail an
//! operation. Clones share one state, so a test keeps a handle to inspect
//! after giving one to the governor.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Op, ShapeError, Shaper};

/// A class: rate (bit/s), burst (bytes) and its leaf FIFO's limit, if set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeClass {
    pub rate_bps: u64,
    pub burst_bytes: u32,
    pub leaf: Option<super::Leaf>,
}

#[derive(Debug, Default)]
pub struct FakeNet {
    /// Links by name (IFB devices the shaper made, or ones a test added).
    pub links: HashMap<String, u32>,
    /// HTB root qdiscs: ifindex -> major.
    pub roots: BTreeMap<u32, u16>,
    /// Classes: (ifindex, major, minor).
    pub classes: BTreeMap<(u32, u16, u16), FakeClass>,
    /// gso_max_size by ifindex (absent: the kernel's 65536).
    pub gso: BTreeMap<u32, u32>,
    /// The next operation of this kind fails with an errno-like error.
    pub fail: Option<Op>,
    next_ifindex: u32,
}

#[derive(Clone, Default)]
pub struct FakeShaper(Arc<Mutex<FakeNet>>);

impl FakeShaper {
    pub fn new() -> FakeShaper {
        let s = FakeShaper::default();
        s.state().next_ifindex = 1000;
        s
    }

    pub fn state(&self) -> MutexGuard<'_, FakeNet> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nothing made by the shaper is left (and every GSO size is back).
    pub fn is_clean(&self) -> bool {
        let st = self.state();
        st.roots.is_empty() && st.classes.is_empty() && st.links.is_empty() && st.gso.is_empty()
    }

    fn check(&self, op: Op, target: String) -> Result<MutexGuard<'_, FakeNet>, ShapeError> {
        let mut st = self.state();
        if st.fail == Some(op) {
            st.fail = None;
            return Err(ShapeError::Kernel {
                op,
                target,
                errno: libc::EIO,
                extack: Some("injected failure".into()),
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(st)
    }
}

fn not_found(op: Op, target: String) -> ShapeError {
    ShapeError::NotFound { op, target, extack: None }
}

impl Shaper for FakeShaper {
    fn add_htb(&mut self, ifindex: u32, major: u16) -> Result<(), ShapeError> {
        let mut st = self.check(Op::AddHtb, format!("ifindex {ifindex}"))?;
        if st.roots.insert(ifindex, major) != Some(major) {
            st.classes.retain(|(i, _, _), _| *i != ifindex);
        }
        Ok(())
    }

    fn set_class(
        &mut self,
        ifindex: u32,
        major: u16,
        minor: u16,
        rate_bps: u64,
        burst_bytes: u32,
    ) -> Result<(), ShapeError> {
        let target = format!("class {major:x}:{minor:x} on ifindex {ifindex}");
        let mut st = self.check(Op::SetClass, target.clone())?;
        if st.roots.get(&ifindex) != Some(&major) {
            return Err(not_found(Op::SetClass, target));
        }
        let c = st.classes.entry((ifindex, major, minor)).or_insert(FakeClass { rate_bps, burst_bytes, leaf: None });
        c.rate_bps = rate_bps;
        c.burst_bytes = burst_bytes;
        Ok(())
    }

    fn set_leaf(&mut self, ifindex: u32, major: u16, minor: u16, leaf: super::Leaf) -> Result<(), ShapeError> {
        let target = format!("class {major:x}:{minor:x} on ifindex {ifindex}");
        let mut st = self.check(Op::SetLeaf, target.clone())?;
        let c = st.classes.get_mut(&(ifindex, major, minor)).ok_or_else(|| not_found(Op::SetLeaf, target))?;
        c.leaf = Some(leaf);
        Ok(())
    }

    fn delete_class(&mut self, ifindex: u32, major: u16, minor: u16) -> Result<(), ShapeError> {
        let target = format!("class {major:x}:{minor:x} on ifindex {ifindex}");
        let mut st = self.check(Op::DeleteClass, target.clone())?;
        st.classes.remove(&(ifindex, major, minor)).map(drop).ok_or_else(|| not_found(Op::DeleteClass, target))
    }

    fn delete_root(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        let mut st = self.check(Op::DeleteRoot, format!("ifindex {ifindex}"))?;
        st.roots.remove(&ifindex);
        st.classes.retain(|(i, _, _), _| *i != ifindex);
        Ok(())
    }

    fn add_ifb(&mut self, name: &str) -> Result<u32, ShapeError> {
        let target = format!("device {name:?}");
        let mut st = self.check(Op::AddIfb, target.clone())?;
        if st.links.contains_key(name) {
            return Err(ShapeError::Exists { op: Op::AddIfb, target, extack: None });
        }
        st.next_ifindex += 1;
        let idx = st.next_ifindex;
        st.links.insert(name.to_string(), idx);
        Ok(idx)
    }

    fn link_index(&mut self, name: &str) -> Result<u32, ShapeError> {
        let target = format!("device {name:?}");
        let st = self.check(Op::LookupLink, target.clone())?;
        st.links.get(name).copied().ok_or(ShapeError::NoDevice { op: Op::LookupLink, target, extack: None })
    }

    fn delete_link(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        let target = format!("ifindex {ifindex}");
        let mut st = self.check(Op::DeleteLink, target.clone())?;
        let Some(name) = st.links.iter().find(|(_, i)| **i == ifindex).map(|(n, _)| n.clone()) else {
            return Err(ShapeError::NoDevice { op: Op::DeleteLink, target, extack: None });
        };
        st.links.remove(&name);
        st.roots.remove(&ifindex);
        st.classes.retain(|(i, _, _), _| *i != ifindex);
        Ok(())
    }

    fn gso_max_size(&mut self, ifindex: u32) -> Result<u32, ShapeError> {
        let st = self.check(Op::LookupLink, format!("ifindex {ifindex}"))?;
        Ok(st.gso.get(&ifindex).copied().unwrap_or(65_536))
    }

    fn set_gso_max_size(&mut self, ifindex: u32, bytes: u32) -> Result<(), ShapeError> {
        let mut st = self.check(Op::SetGso, format!("ifindex {ifindex}"))?;
        if bytes == 65_536 {
            st.gso.remove(&ifindex);
        } else {
            st.gso.insert(ifindex, bytes);
        }
        Ok(())
    }
}
