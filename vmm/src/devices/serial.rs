//! A minimal 8250 UART on COM1, output only: the guest writes bytes to THR
//! and we report the transmitter as always empty. No interrupts, no input,
//! so there is no device state worth snapshotting.

use std::io::Write;

use crate::sink::Sink;

const THR: u16 = 0;
const LSR: u16 = 5;
/// LSR: transmit holding register empty | transmitter empty.
const LSR_IDLE: u8 = 0x60;

#[derive(Default)]
pub struct Serial {
    line: Vec<u8>,
    out: Option<Sink>,
    /// Complete lines seen so far (bounded, newest last).
    pub lines: Vec<String>,
}

impl Serial {
    pub fn new(out: Option<Box<dyn Write + Send>>) -> Self {
        Serial { line: Vec::new(), out: out.map(|o| Sink::new(o, "serial console")), lines: Vec::new() }
    }

    /// Handle a write at `offset` from the base port. Returns a completed
    /// line, if this byte ended one.
    pub fn write(&mut self, offset: u16, byte: u8) -> Option<String> {
        if offset != THR {
            return None;
        }
        if let Some(out) = self.out.as_mut() {
            // Console output is best effort; a full disk must not stop the VM.
            out.attempt(|w| {
                if byte == b'\n' {
                    w.write_all(&[byte]).and_then(|()| w.flush())
                } else {
                    w.write_all(&[byte])
                }
            });
        }
        if byte == b'\n' {
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            if self.lines.len() >= 256 {
                self.lines.remove(0);
            }
            self.lines.push(line.clone());
            return Some(line);
        }
        if self.line.len() < 4096 {
            self.line.push(byte);
        }
        None
    }

    pub fn read(&self, offset: u16) -> u8 {
        if offset == LSR {
            LSR_IDLE
        } else {
            0
        }
    }
}
