//! User traffic through the card (claim 5): the card's network client
//! forwards TCP connections, as a DPU sits on the path of the host's user
//! VMs. A forward listens on a loopback port and relays each connection to
//! its target both ways; every byte relayed counts as card network use (the
//! same counter as the network client's own sends, BAR0's network entry)
//! and the relaying threads run in the card's cgroup, so their CPU is card
//! CPU. iperf3 between two endpoints through a forward is real user load
//! crossing the card.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::device::spawn_thread;
use crate::error::SimError;

/// The card's forwards, by listening port.
#[derive(Default)]
pub struct Forwards {
    active: Mutex<Vec<Forward>>,
}

struct Forward {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Forwards {
    /// Listen on `listen` (loopback; port 0 picks one) and relay every
    /// connection to `to`, counting relayed bytes into `bytes`. Returns the
    /// port it listens on.
    pub fn add(&self, listen: SocketAddr, to: SocketAddr, bytes: Arc<AtomicU64>) -> Result<u16, SimError> {
        let listener = TcpListener::bind(listen).map_err(|source| SimError::Forward { addr: listen, source })?;
        let port = listener.local_addr().map_err(|source| SimError::Forward { addr: listen, source })?.port();
        listener.set_nonblocking(true).map_err(|source| SimError::Forward { addr: listen, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        spawn_thread(format!("fwd-{port}"), move || accept_loop(&listener, to, &bytes, &s))?;
        self.active.lock().unwrap_or_else(|e| e.into_inner()).push(Forward { port, stop });
        Ok(port)
    }

    /// Stop listening on `port` (connections in flight end with their peers).
    pub fn remove(&self, port: u16) -> bool {
        let mut a = self.active.lock().unwrap_or_else(|e| e.into_inner());
        match a.iter().position(|f| f.port == port) {
            Some(i) => {
                a.remove(i).stop.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

impl Drop for Forwards {
    fn drop(&mut self) {
        for f in self.active.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            f.stop.store(true, Ordering::Relaxed);
        }
    }
}

fn accept_loop(listener: &TcpListener, to: SocketAddr, bytes: &Arc<AtomicU64>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = relay(client, to, bytes) {
                    tracing::warn!(%to, "forward: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!("forward accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connect to the target and copy both ways on two threads.
fn relay(client: TcpStream, to: SocketAddr, bytes: &Arc<AtomicU64>) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let pairs = [(client.try_clone()?, server.try_clone()?), (server, client)];
    for (i, (from, to_sock)) in pairs.into_iter().enumerate() {
        let b = bytes.clone();
        let spawned = std::thread::Builder::new().name(format!("fwd-copy-{i}")).spawn(move || copy(from, to_sock, &b));
        if let Err(e) = spawned {
            tracing::warn!("forward: cannot start a copy thread: {e}");
        }
    }
    Ok(())
}

fn copy(mut from: TcpStream, mut to: TcpStream, bytes: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    // Pass the end on; the peer may already be gone (nothing to report).
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
