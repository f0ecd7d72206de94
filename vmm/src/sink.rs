//! Best-effort output: console bytes and agent log records go to a writer
//! the caller chose (stdout, a file, nothing). A failing writer (a full
//! disk, a closed pipe) must not stop the VM, and must not go unnoticed
//! either: the first failure of a run of failures is logged once, and the
//! recovery too, so a writer that keeps failing does not flood the log from
//! the vCPU thread.

use std::io::{self, Write};

pub(crate) struct Sink {
    out: Box<dyn Write + Send>,
    /// What the output is, for the log ("serial console", "agent log").
    what: &'static str,
    failing: bool,
}

impl Sink {
    pub(crate) fn new(out: Box<dyn Write + Send>, what: &'static str) -> Sink {
        Sink { out, what, failing: false }
    }

    /// Run one write on the writer; its failure is dropped after logging.
    pub(crate) fn attempt(&mut self, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) {
        match write(&mut *self.out) {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::warn!("writing the {} works again", self.what);
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(error = %e, "cannot write the {}; its output is dropped until writing works again", self.what);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails while `fail` is set, counts the bytes it took otherwise.
    struct Flaky {
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
        took: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::other("disk full"));
            }
            self.took.fetch_add(buf.len(), std::sync::atomic::Ordering::Relaxed);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_writer_is_remembered_and_recovers() {
        use std::sync::atomic::Ordering::Relaxed;
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let took = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut s = Sink::new(Box::new(Flaky { fail: fail.clone(), took: took.clone() }), "test output");
        s.attempt(|w| w.write_all(b"lost"));
        assert!(s.failing, "the failure is noted");
        s.attempt(|w| w.write_all(b"lost too"));
        assert!(s.failing);
        fail.store(false, Relaxed);
        s.attempt(|w| w.write_all(b"kept"));
        assert!(!s.failing, "a write that works ends the failure");
        assert_eq!(took.load(Relaxed), 4);
    }
}
