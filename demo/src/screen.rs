//! Where the view goes: the terminal (alternate screen, raw mode, restored
//! on every way out, panics included) or, when stdout is not a terminal
//! (tests, CI, a pipe), a text frame of the same widgets every few seconds.
//! Also the process's stop requests: SIGINT, SIGTERM, SIGHUP, and q or
//! Ctrl-C on the terminal (raw mode turns Ctrl-C into a key).

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::{DefaultTerminal, Terminal};

use crate::ramp::RampState;
use crate::view::{self, Header};
use crate::watch::Watch;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Catch the stop signals from now on (before anything is started, so a
/// stop during start-up also ends in a clean stop).
pub fn catch_signals() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only stores to an atomic.
        let old = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if old == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error()).context("install a signal handler");
        }
    }
    Ok(())
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// What a key asked of the card: kill it, or start it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardKey {
    Kill,
    Restart,
}

/// Text frames: this size, one every `TEXT_EVERY`.
const TEXT_SIZE: (u16, u16) = (132, 36);
const TEXT_EVERY: Duration = Duration::from_secs(5);

pub enum Screen {
    Tty { term: DefaultTerminal },
    Text { last: Option<Instant> },
}

impl Screen {
    /// The terminal when `stderr` says stderr was sent away from it (the
    /// children's messages would tear the view), else text frames.
    pub fn open(stderr: Option<&StderrTo>) -> Result<Screen> {
        let Some(stderr) = stderr else { return Ok(Screen::Text { last: None }) };
        // ratatui's init installs a panic hook that restores the terminal
        // before the panic is printed; the hook below first puts stderr
        // back, so that message reaches the user.
        let term = ratatui::try_init().context("set up the terminal (raw mode, alternate screen)")?;
        let saved = stderr.saved;
        let restore_terminal = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // SAFETY: dup2 of a descriptor we keep open onto stderr.
            unsafe { libc::dup2(saved, 2) };
            restore_terminal(info);
        }));
        Ok(Screen::Tty { term })
    }

    /// Draw now (terminal) or when a frame is due (text; `force` prints one
    /// regardless). Then wait up to `wait` for a key or the next round.
    /// Returns what a key asked of the card (`k`: kill it, `r`: start it again).
    pub fn show(
        &mut self,
        w: &Watch,
        ramp: &RampState,
        h: &Header,
        force: bool,
        wait: Duration,
    ) -> Result<Option<CardKey>> {
        let mut asked = None;
        match self {
            Screen::Tty { term, .. } => {
                term.draw(|f| view::draw(f, w, ramp, h)).context("draw the view")?;
                if event::poll(wait).context("read the terminal")? {
                    if let Event::Key(k) = event::read().context("read a key")? {
                        let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                        if k.kind == KeyEventKind::Press {
                            match k.code {
                                _ if ctrl_c => STOP.store(true, Ordering::SeqCst),
                                KeyCode::Char('q') => STOP.store(true, Ordering::SeqCst),
                                KeyCode::Char('k') => asked = Some(CardKey::Kill),
                                KeyCode::Char('r') => asked = Some(CardKey::Restart),
                                _ => {}
                            }
                        }
                    }
                }
            }
            Screen::Text { last } => {
                if force || last.is_none_or(|t| t.elapsed() >= TEXT_EVERY) {
                    println!("{}", frame_text(w, ramp, h)?);
                    *last = Some(Instant::now());
                }
                std::thread::sleep(wait);
            }
        }
        Ok(asked)
    }
}

/// One frame of the view as text.
pub fn frame_text(w: &Watch, ramp: &RampState, h: &Header) -> Result<String> {
    let mut t = Terminal::new(TestBackend::new(TEXT_SIZE.0, TEXT_SIZE.1)).context("a text backend")?;
    let frame = t.draw(|f| view::draw(f, w, ramp, h)).context("draw the text frame")?;
    Ok(view::to_text(frame.buffer))
}

impl Drop for Screen {
    fn drop(&mut self) {
        if let Screen::Tty { .. } = self {
            ratatui::restore();
        }
    }
}

/// stderr sent to a file while it lives (children started meanwhile keep
/// writing there); restored on drop.
pub struct StderrTo {
    saved: RawFd,
}

impl StderrTo {
    pub fn file(path: &std::path::Path) -> Result<StderrTo> {
        let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let _ = std::io::stderr().flush();
        // SAFETY: dup of our own stderr, then dup2 of an open file onto 2.
        let saved = unsafe { libc::dup(2) };
        if saved < 0 {
            return Err(std::io::Error::last_os_error()).context("save stderr");
        }
        if unsafe { libc::dup2(f.as_raw_fd(), 2) } < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closing the duplicate made above.
            unsafe { libc::close(saved) };
            return Err(e).context("send stderr to the log");
        }
        Ok(StderrTo { saved })
    }
}

impl Drop for StderrTo {
    fn drop(&mut self) {
        // SAFETY: putting back the stderr saved in `file` and closing the copy.
        unsafe {
            libc::dup2(self.saved, 2);
            libc::close(self.saved);
        }
    }
}
