//! User traffic through the card (claim 5): the card's network client
//! forwards TCP connections, as a DPU sits on the path of the host's user
//! VMs. A forward listens on a loopback port and relays each connection to
//! its target both ways; every byte relayed counts as card network use (the
//! same counter as the network client's own sends, BAR0's network entry)
//! and the relaying threads run in the card's cgroup, so their CPU is card
//! CPU. iperf3 between two endpoints through a forward is real user load
//! crossing the card.
//!
//! A relay's two threads end when its connection does: when one side ends
//! its stream, the end is passed on (a half close) and the other direction
//! gets `LINGER` to finish; after that, or at once when a side fails, both
//! connections are shut down, which ends the other thread's wait. Removing
//! a forward (or dropping the card's forwards) shuts its relays down too.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::device::spawn_thread;
use crate::error::SimError;

/// How long the other direction of a relay may go on after one side ended
/// its stream (iperf3's server, for one, keeps a test's data connection
/// open after its client is gone).
pub const LINGER: Duration = Duration::from_secs(2);

/// The card's forwards, by listening port.
#[derive(Default)]
pub struct Forwards {
    active: Mutex<Vec<Forward>>,
    /// Relay threads running, over every forward.
    threads: Arc<AtomicUsize>,
}

struct Forward {
    port: u16,
    stop: Arc<AtomicBool>,
    relays: Arc<Mutex<Vec<Arc<Relay>>>>,
}

/// One relayed connection: both sockets, and how many of its directions
/// are still copying.
struct Relay {
    client: TcpStream,
    server: TcpStream,
    running: Mutex<u8>,
    ended: Condvar,
}

impl Relay {
    /// Shut both connections down: every copy of them sees the end at once.
    fn shut(&self) {
        for s in [&self.client, &self.server] {
            // Already shut down or reset by the peer: nothing left to end.
            if let Err(e) = s.shutdown(Shutdown::Both) {
                if e.kind() != std::io::ErrorKind::NotConnected {
                    tracing::debug!("forward: shutting a relayed connection down: {e}");
                }
            }
        }
    }
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
        let relays = Arc::new(Mutex::new(Vec::new()));
        let (s, r, threads) = (stop.clone(), relays.clone(), self.threads.clone());
        spawn_thread(format!("fwd-{port}"), move || accept_loop(&listener, to, &bytes, &s, &r, &threads))?;
        lock(&self.active).push(Forward { port, stop, relays });
        Ok(port)
    }

    /// Stop listening on `port` and end the connections it relays.
    pub fn remove(&self, port: u16) -> bool {
        let mut a = lock(&self.active);
        match a.iter().position(|f| f.port == port) {
            Some(i) => {
                a.remove(i).stop();
                true
            }
            None => false,
        }
    }

    /// Relay threads running now (two per connection being relayed).
    pub fn relay_threads(&self) -> usize {
        self.threads.load(Ordering::Relaxed)
    }
}

impl Forward {
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for r in lock(&self.relays).drain(..) {
            r.shut();
        }
    }
}

impl Drop for Forwards {
    fn drop(&mut self) {
        for f in lock(&self.active).drain(..) {
            f.stop();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listener: &TcpListener,
    to: SocketAddr,
    bytes: &Arc<AtomicU64>,
    stop: &AtomicBool,
    relays: &Arc<Mutex<Vec<Arc<Relay>>>>,
    threads: &Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => match relay(client, to, bytes, threads) {
                Ok(r) => {
                    let mut list = lock(relays);
                    // Forget relays that ended; a forward stopped meanwhile ends this one too.
                    list.retain(|r| *lock(&r.running) > 0);
                    if stop.load(Ordering::Relaxed) {
                        r.shut();
                    } else {
                        list.push(r);
                    }
                }
                Err(e) => tracing::warn!(%to, "forward: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!("forward accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connect to the target and copy both ways on two threads.
fn relay(
    client: TcpStream,
    to: SocketAddr,
    bytes: &Arc<AtomicU64>,
    threads: &Arc<AtomicUsize>,
) -> std::io::Result<Arc<Relay>> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let r = Arc::new(Relay { client, server, running: Mutex::new(2), ended: Condvar::new() });
    let ways = [(r.client.try_clone()?, r.server.try_clone()?), (r.server.try_clone()?, r.client.try_clone()?)];
    for (i, (from, to_sock)) in ways.into_iter().enumerate() {
        let (b, rel, n) = (bytes.clone(), r.clone(), threads.clone());
        n.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new().name(format!("fwd-copy-{i}")).spawn(move || {
            copy(from, to_sock, &b, &rel);
            n.fetch_sub(1, Ordering::Relaxed);
        });
        if let Err(e) = spawned {
            threads.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("forward: cannot start a copy thread, dropping the connection: {e}");
            r.shut();
            let mut running = lock(&r.running);
            *running = running.saturating_sub(1);
            r.ended.notify_all();
        }
    }
    Ok(r)
}

/// Copy one direction until its source ends, then pass the end on; wait
/// up to `LINGER` for the other direction, and end the relay.
fn copy(mut from: TcpStream, mut to: TcpStream, bytes: &AtomicU64, relay: &Relay) {
    let mut buf = vec![0u8; 64 * 1024];
    let clean = loop {
        match from.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break false;
                }
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    let mut running = lock(&relay.running);
    *running = running.saturating_sub(1);
    relay.ended.notify_all();
    if !clean {
        // A side failed: the other direction has nothing to wait for.
        drop(running);
        relay.shut();
        return;
    }
    // Pass the end on; the peer may already be gone (then the other
    // direction ends by itself).
    if let Err(e) = to.shutdown(Shutdown::Write) {
        tracing::debug!("forward: passing the end on: {e}");
    }
    let deadline = Instant::now() + LINGER;
    while *running > 0 {
        let now = Instant::now();
        if now >= deadline {
            drop(running);
            relay.shut();
            return;
        }
        running = relay.ended.wait_timeout(running, deadline - now).map_or_else(|e| e.into_inner().0, |(g, _)| g);
    }
    // Both directions ended their streams: close for good.
    drop(running);
    relay.shut();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(what: &str, limit: Duration, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A target that accepts and holds each connection open, reading and
    /// discarding what comes (iperf3's server after its client is gone).
    fn holding_target() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = held.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                lock(&h).push(c.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut b = [0u8; 4096];
                    while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                });
            }
        });
        (addr, held)
    }

    #[test]
    fn relay_threads_end_when_the_client_goes_and_the_target_holds_on() {
        let (target, held) = holding_target();
        let f = Forwards::default();
        let port = f.add("127.0.0.1:0".parse().unwrap(), target, Arc::default()).unwrap();
        let mut clients = Vec::new();
        for _ in 0..5 {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(b"hello").unwrap();
            clients.push(c);
        }
        wait_for("ten relay threads", Duration::from_secs(5), || f.relay_threads() == 10);
        let t = Instant::now();
        drop(clients);
        wait_for("every relay thread ended", LINGER + Duration::from_secs(2), || f.relay_threads() == 0);
        assert!(t.elapsed() >= Duration::from_millis(100), "the target was given time to finish");
        // The target saw its connections end.
        for mut c in lock(&held).drain(..) {
            c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut b = [0u8; 16];
            assert!(matches!(c.read(&mut b), Ok(0) | Err(_)), "the target's connection is closed");
        }
    }

    #[test]
    fn relay_threads_end_when_the_target_goes_and_the_client_holds_on() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = l.local_addr().unwrap();
        let f = Forwards::default();
        let port = f.add("127.0.0.1:0".parse().unwrap(), target, Arc::default()).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut t, _) = l.accept().unwrap();
        t.write_all(b"from the target").unwrap();
        let mut b = [0u8; 15];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"from the target");
        wait_for("two relay threads", Duration::from_secs(5), || f.relay_threads() == 2);
        drop(t);
        wait_for("both relay threads ended", LINGER + Duration::from_secs(2), || f.relay_threads() == 0);
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)), "the client's connection is closed");
    }

    #[test]
    fn a_removed_forward_ends_the_connections_it_relays() {
        let (target, _held) = holding_target();
        let f = Forwards::default();
        let port = f.add("127.0.0.1:0".parse().unwrap(), target, Arc::default()).unwrap();
        let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        wait_for("two relay threads", Duration::from_secs(5), || f.relay_threads() == 2);
        assert!(f.remove(port));
        wait_for("both relay threads ended", Duration::from_secs(2), || f.relay_threads() == 0);
        assert!(!f.remove(port), "gone");
    }
}
