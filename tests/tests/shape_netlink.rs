//! `governor::shape` against the real kernel: the HTB qdisc, classes and IFB
//! devices it creates over rtnetlink are checked with `tc`/`ip` as ground
//! truth, and a veth into a namespace of our own carries real TCP traffic to
//! show a class holds a flow to its rate. `tc` and `ip` are used here only to
//! set up and to look; the module under test never runs them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::shape::{NetlinkShaper, ShapeError, Shaper};
use integration_tests::*;

/// A routed veth pair on this host (the fixtures' `VethPair`), after the
/// requirements of these tests are checked.
fn pair() -> VethPair {
    require_root();
    require_tool("ip");
    require_tool("tc");
    VethPair::new()
}

fn tc(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(Command::new("tc").args(args)).stdout).into_owned()
}

/// tc's rate notation ("20Mbit", "40Gbit", "800bit") in bit/s.
fn parse_rate(s: &str) -> f64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("Gbit") {
        (n, 1e9)
    } else if let Some(n) = s.strip_suffix("Mbit") {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix("Kbit") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix("bit") {
        (n, 1.0)
    } else {
        panic!("not a tc rate: {s:?}")
    };
    num.parse::<f64>().unwrap_or_else(|e| panic!("rate {s:?}: {e}")) * mult
}

/// tc's size notation ("30000b", "29Kb", "1Mb") in bytes.
fn parse_size(s: &str) -> f64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("Mb") {
        (n, 1024.0 * 1024.0)
    } else if let Some(n) = s.strip_suffix("Kb") {
        (n, 1024.0)
    } else if let Some(n) = s.strip_suffix('b') {
        (n, 1.0)
    } else {
        panic!("not a tc size: {s:?}")
    };
    num.parse::<f64>().unwrap_or_else(|e| panic!("size {s:?}: {e}")) * mult
}

#[derive(Debug)]
struct ClassView {
    rate: f64,
    ceil: f64,
    burst: f64,
    cburst: f64,
}

/// `tc class show dev X` for HTB class `id` ("1:10"), None if absent.
fn class_view(dev: &str, id: &str) -> Option<ClassView> {
    let out = tc(&["class", "show", "dev", dev]);
    let line = out.lines().find(|l| l.starts_with(&format!("class htb {id} ")))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| -> &str {
        let i = words.iter().position(|w| *w == key).unwrap_or_else(|| panic!("no {key} in {line:?}"));
        words.get(i + 1).unwrap_or_else(|| panic!("nothing after {key} in {line:?}"))
    };
    Some(ClassView {
        rate: parse_rate(after("rate")),
        ceil: parse_rate(after("ceil")),
        burst: parse_size(after("burst")),
        cburst: parse_size(after("cburst")),
    })
}

fn assert_class(dev: &str, id: &str, rate_bps: f64, burst: f64) {
    let v = class_view(dev, id)
        .unwrap_or_else(|| panic!("class {id} missing on {dev}:\n{}", tc(&["class", "show", "dev", dev])));
    assert!(rel_err(v.rate, rate_bps) < 1e-3, "{id} rate {v:?} want {rate_bps}");
    assert!(rel_err(v.ceil, rate_bps) < 1e-3, "{id} ceil {v:?} want {rate_bps}");
    // tc recomputes the size from the tick count and rounds for display.
    assert!(rel_err(v.burst, burst) < 0.01, "{id} burst {v:?} want {burst}");
    assert!(rel_err(v.cburst, burst) < 0.01, "{id} cburst {v:?} want {burst}");
}

fn htb_roots(dev: &str) -> Vec<String> {
    tc(&["qdisc", "show", "dev", dev])
        .lines()
        .filter(|l| l.starts_with("qdisc htb ") && l.contains(" root "))
        .map(str::to_string)
        .collect()
}

#[test]
fn htb_root_and_classes_as_tc_sees_them() {
    let pair = pair();
    let dev = pair.host.name.as_str();
    let mut s = NetlinkShaper::new().expect("open rtnetlink");

    s.add_htb(pair.ifindex, 1).expect("add htb");
    let roots = htb_roots(dev);
    assert_eq!(roots.len(), 1, "{roots:?}");
    assert!(roots[0].starts_with("qdisc htb 1: root"), "{roots:?}");
    assert!(roots[0].contains("default 0"), "defcls 0 = direct queue: {roots:?}");
    assert!(roots[0].contains("r2q 10"), "{roots:?}");

    s.set_class(pair.ifindex, 1, 0x10, 20_000_000, 30_000).expect("class 1:10");
    // 40 Gbit/s = 5e9 bytes/s needs TCA_HTB_RATE64/CEIL64.
    s.set_class(pair.ifindex, 1, 0x20, 40_000_000_000, 1_000_000).expect("class 1:20 (64-bit rate)");
    assert_class(dev, "1:10", 20e6, 30_000.0);
    assert_class(dev, "1:20", 40e9, 1_000_000.0);

    // Idempotent: the root stays (with its classes) when added again.
    s.add_htb(pair.ifindex, 1).expect("add htb again");
    assert_eq!(htb_roots(dev).len(), 1);
    assert_class(dev, "1:10", 20e6, 30_000.0);

    // set_class changes an existing class in place.
    s.set_class(pair.ifindex, 1, 0x10, 10_000_000, 15_000).expect("change 1:10");
    assert_class(dev, "1:10", 10e6, 15_000.0);

    s.delete_class(pair.ifindex, 1, 0x20).expect("delete 1:20");
    assert!(class_view(dev, "1:20").is_none(), "1:20 still there");
    let err = s.delete_class(pair.ifindex, 1, 0x20).expect_err("deleting a missing class must fail");
    assert!(matches!(err, ShapeError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("delete HTB class") && msg.contains("1:20") && msg.contains(dev),
        "error should name operation, class and interface: {msg}"
    );

    s.delete_root(pair.ifindex).expect("delete root");
    assert!(htb_roots(dev).is_empty(), "{:?}", htb_roots(dev));
    assert!(class_view(dev, "1:10").is_none());
    // NotFound is Ok for delete_root.
    s.delete_root(pair.ifindex).expect("delete root again");

    // Without a qdisc there is nothing to hang a class on.
    let err = s.set_class(pair.ifindex, 1, 0x10, 1_000_000, 10_000).expect_err("class without qdisc");
    assert!(err.errno().is_some(), "kernel error expected: {err:?}");
    assert!(err.to_string().contains("set HTB class") && err.to_string().contains(dev), "{err}");

    // A different root qdisc is replaced by add_htb.
    tc(&[
        "qdisc", "add", "dev", dev, "root", "handle", "5:", "tbf", "rate", "1mbit", "burst", "10k", "latency", "50ms",
    ]);
    s.add_htb(pair.ifindex, 1).expect("replace tbf root with htb");
    let roots = htb_roots(dev);
    assert_eq!(roots.len(), 1, "{}", tc(&["qdisc", "show", "dev", dev]));
    assert!(!tc(&["qdisc", "show", "dev", dev]).contains("tbf"));
    s.delete_root(pair.ifindex).expect("cleanup root");
}

#[test]
fn errors_name_the_operation_and_interface() {
    require_root();
    let mut s = NetlinkShaper::new().expect("open rtnetlink");
    let bogus = 0x7fff_fff0;
    let err = s.add_htb(bogus, 1).expect_err("no such device");
    assert!(matches!(err, ShapeError::NoDevice { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("add HTB root qdisc") && msg.contains(&format!("ifindex {bogus}")), "{msg}");
    let err = s.delete_link(bogus).expect_err("no such link");
    assert!(matches!(err, ShapeError::NoDevice { .. }), "{err:?}");
    assert!(err.to_string().contains("delete link"), "{err}");

    let pair = pair();
    let err = s.set_class(pair.ifindex, 1, 0x10, 7, 1000).expect_err("rate below 1 byte/s");
    assert!(matches!(err, ShapeError::InvalidArgument { .. }), "{err:?}");
    let err = s.set_class(pair.ifindex, 1, 0x10, 1_000_000, 0).expect_err("zero burst");
    assert!(matches!(err, ShapeError::InvalidArgument { .. }), "{err:?}");
    let err = s.add_ifb("this-name-is-too-long").expect_err("long name");
    assert!(matches!(err, ShapeError::InvalidArgument { .. }), "{err:?}");
}

#[test]
fn ifb_created_up_refused_twice_and_deleted() {
    require_root();
    let mut s = NetlinkShaper::new().expect("open rtnetlink");
    let name = unique("shi");
    // Deletes the IFB if the test fails before delete_link does.
    let guard = Link { name: name.clone() };
    let ifindex = s.add_ifb(&name).expect("add ifb");
    let sys: u32 = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .expect("ifb exists in sysfs")
        .trim()
        .parse()
        .expect("number");
    assert_eq!(ifindex, sys);
    let show = String::from_utf8_lossy(&run(Command::new("ip").args(["-d", "link", "show", "dev", &name])).stdout)
        .into_owned();
    assert!(show.contains("ifb"), "not an ifb: {show}");
    let flags =
        show.split_once('<').and_then(|(_, r)| r.split_once('>')).map(|(f, _)| f.to_string()).unwrap_or_default();
    assert!(flags.split(',').any(|f| f == "UP"), "ifb not up: {show}");

    let err = s.add_ifb(&name).expect_err("second add must fail");
    assert!(matches!(err, ShapeError::Exists { .. }), "{err:?}");
    assert!(err.to_string().contains(&name) && err.to_string().contains("add IFB device"), "{err}");

    // Shaping works on it like on any device, and the direct queue is not
    // the IFB's 32-packet tx_queue_len.
    s.add_htb(ifindex, 2).expect("htb on ifb");
    let q = tc(&["qdisc", "show", "dev", &name]);
    assert!(q.contains("qdisc htb 2: root") && q.contains("direct_qlen 1000"), "{q}");
    s.set_class(ifindex, 2, 1, 100_000_000, 64_000).expect("class on ifb");
    assert_class(&name, "2:1", 100e6, 64_000.0);

    s.delete_link(ifindex).expect("delete ifb");
    assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists(), "ifb still present");
    let err = s.delete_link(ifindex).expect_err("already gone");
    assert!(matches!(err, ShapeError::NoDevice { .. }), "{err:?}");
    drop(guard);
}

/// Goodput an HTB class at `rate_bps` allows a TCP flow: HTB charges whole
/// frames (MSS 1448 + TCP 32 with timestamps + IP 20 + Ethernet 14).
fn goodput_at(rate_bps: f64) -> f64 {
    rate_bps * 1448.0 / 1514.0
}

/// One iperf3 run from the root namespace to the server in the namespace;
/// receiver goodput in bit/s.
fn iperf(pair: &VethPair, port: &str, secs: u32) -> f64 {
    let mut last = String::new();
    for _ in 0..50 {
        let out = Command::new("iperf3")
            .args(["-c", &pair.peer_addr, "-B", &pair.host_addr, "-p", port, "-t", &secs.to_string(), "-J"])
            .output()
            .expect("run iperf3");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // iperf3 -J may exit 0 with only an "error" in the JSON, e.g. when
        // the server is not listening yet: retry those.
        let v: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        if let Some(v) = v.filter(|v| out.status.success() && v.get("error").is_none()) {
            return v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in {text}"));
        }
        // The server may not be listening yet.
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("iperf3 client never succeeded: {last}");
}

#[test]
fn htb_class_holds_iperf3_to_its_rate() {
    require_tool("iperf3");
    let pair = pair();
    let dev = pair.host.name.clone();
    let port = (20_000 + std::process::id() % 20_000).to_string();
    let _server = Guarded(Some(
        pair.ns
            .cmd(&["iperf3", "-s", "-B", &pair.peer_addr, "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 server in the namespace"),
    ));
    let mut s = NetlinkShaper::new().expect("open rtnetlink");
    let rate = 20_000_000u64;
    s.add_htb(pair.ifindex, 1).expect("add htb");
    s.set_class(pair.ifindex, 1, 0x10, rate, 30_000).expect("class 1:10");

    // Unclassified traffic takes the direct queue: not held to the class.
    let free = iperf(&pair, &port, 2);
    assert!(
        free > 3.0 * rate as f64,
        "unclassified traffic should be unshaped (defcls 0), got {:.1} Mbit/s",
        free / 1e6
    );

    // Classify everything to 1:10 (the governor's BPF program does this with
    // skb->priority; here a u32 filter stands in).
    tc(&[
        "filter",
        "add",
        "dev",
        &dev,
        "parent",
        "1:",
        "protocol",
        "ip",
        "prio",
        "1",
        "u32",
        "match",
        "ip",
        "dst",
        &format!("{}/32", pair.peer_addr),
        "flowid",
        "1:10",
    ]);
    let got = iperf(&pair, &port, 3);
    let want = goodput_at(rate as f64);
    eprintln!(
        "unshaped {:.1} Mbit/s; class at {} Mbit/s: goodput {:.2} Mbit/s (expected {:.2})",
        free / 1e6,
        rate / 1_000_000,
        got / 1e6,
        want / 1e6
    );
    assert!(
        rel_err(got, want) < 0.05,
        "goodput {:.2} Mbit/s not within 5% of {:.2} Mbit/s ({} Mbit/s on the wire)",
        got / 1e6,
        want / 1e6,
        rate / 1_000_000
    );
    let stats = tc(&["-s", "class", "show", "dev", &dev]);
    assert!(stats.contains("class htb 1:10"), "{stats}");
}

/// A TCP sink inside the namespace: a thread that enters it (setns affects
/// only the calling thread) and counts bytes per accepted connection.
fn sink(ns: &str, addr: &str, port: u16, conns: usize) -> Vec<Arc<AtomicU64>> {
    let counters: Vec<Arc<AtomicU64>> = (0..conns).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let ns_path = format!("/run/netns/{ns}");
    let addr = format!("{addr}:{port}");
    let cs = counters.clone();
    std::thread::spawn(move || {
        let setup = (|| -> Result<TcpListener, String> {
            let f = std::fs::File::open(&ns_path).map_err(|e| format!("{ns_path}: {e}"))?;
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            TcpListener::bind(&addr).map_err(|e| format!("bind {addr}: {e}"))
        })();
        let listener = match setup {
            // The test waits on rx until it has this answer.
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for c in cs {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("sink thread started").expect("sink listening in the namespace");
    counters
}

/// The mechanism the governor relies on: HTB picks the class whose id equals
/// skb->priority (major matching the qdisc). SO_PRIORITY sets it per socket,
/// so two flows with priorities 1:10 and 1:20 must each be held to their own
/// class's rate with no filter at all.
#[test]
fn skb_priority_selects_the_class() {
    let pair = pair();
    let port = (40_000 + std::process::id() % 20_000) as u16;
    let counters = sink(&pair.ns.name, &pair.peer_addr, port, 2);
    let mut s = NetlinkShaper::new().expect("open rtnetlink");
    s.add_htb(pair.ifindex, 1).expect("add htb");
    let rates = [(0x10u16, 10_000_000u64), (0x20u16, 30_000_000u64)];
    for (minor, rate) in rates {
        s.set_class(pair.ifindex, 1, minor, rate, 30_000).expect("class");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for (minor, _) in rates {
        let mut stream = TcpStream::connect((pair.peer_addr.as_str(), port)).expect("connect to sink");
        socket2::SockRef::from(&stream).set_priority((1 << 16) | u32::from(minor)).expect("SO_PRIORITY");
        handles.push(stream.try_clone().expect("clone stream"));
        let stop = stop.clone();
        senders.push(std::thread::spawn(move || {
            let buf = vec![0x5au8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                if stream.write_all(&buf).is_err() {
                    break;
                }
            }
        }));
    }
    // Measure the steady state, after slow start and the initial burst.
    std::thread::sleep(Duration::from_millis(700));
    let t0 = Instant::now();
    let b0: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    std::thread::sleep(Duration::from_secs(3));
    let dt = t0.elapsed().as_secs_f64();
    let b1: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    stop.store(true, Ordering::Relaxed);
    // Shutdown wakes a sender blocked in write on a full socket buffer.
    for h in &handles {
        // A sender that already stopped closed its socket: nothing to wake.
        let _ = h.shutdown(std::net::Shutdown::Both);
    }
    for t in senders {
        t.join().expect("sender thread");
    }
    let mut got: Vec<f64> = b0.iter().zip(&b1).map(|(a, b)| (b - a) as f64 * 8.0 / dt).collect();
    // Accept order is connection order: 1:10 first, then 1:20.
    got.truncate(2);
    let stats = tc(&["-s", "class", "show", "dev", &pair.host.name]);
    for (i, (minor, rate)) in rates.iter().enumerate() {
        let want = goodput_at(*rate as f64);
        eprintln!(
            "class 1:{minor:x} at {} Mbit/s: goodput {:.2} Mbit/s (expected {:.2})",
            rate / 1_000_000,
            got[i] / 1e6,
            want / 1e6
        );
        assert!(
            rel_err(got[i], want) < 0.05,
            "class 1:{minor:x}: goodput {:.2} Mbit/s not within 5% of {:.2}\n{stats}",
            got[i] / 1e6,
            want / 1e6
        );
    }
}

/// Connect to the sink with skb->priority = `class` (SO_PRIORITY).
fn connect_with_priority(addr: &str, port: u16, class: u32) -> TcpStream {
    let stream = TcpStream::connect((addr, port)).expect("connect to sink");
    socket2::SockRef::from(&stream).set_priority(class).expect("SO_PRIORITY");
    stream
}

/// The burst is honoured: a class idle long enough to hold a full bucket
/// passes `burst` bytes at line speed before settling to its rate, so after
/// T seconds about burst + rate*T wire bytes have arrived (and only rate*T
/// with a wrong tick conversion).
#[test]
fn burst_passes_at_line_speed_then_rate() {
    let pair = pair();
    let port = (45_000 + std::process::id() % 15_000) as u16;
    let counters = sink(&pair.ns.name, &pair.peer_addr, port, 1);
    let mut s = NetlinkShaper::new().expect("open rtnetlink");
    s.add_htb(pair.ifindex, 1).expect("add htb");
    let rate = 8_000_000u64; // 1 MB/s
    let burst = 1_000_000u32; // one second's worth
    s.set_class(pair.ifindex, 1, 0x30, rate, burst).expect("class 1:30");
    let mut stream = connect_with_priority(&pair.peer_addr, port, (1 << 16) | 0x30);
    let handle = stream.try_clone().expect("clone stream");
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let buf = vec![0xa5u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                if stream.write_all(&buf).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(250));
    let early = counters[0].load(Ordering::Relaxed) as f64;
    let t_early = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1750));
    let late = counters[0].load(Ordering::Relaxed) as f64;
    let t_late = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // A sender that already stopped closed its socket: nothing to wake.
    let _ = handle.shutdown(std::net::Shutdown::Both);
    sender.join().expect("sender thread");

    let payload = 1448.0 / 1514.0;
    let rate_bytes = rate as f64 / 8.0;
    let want = |t: f64| (f64::from(burst) + rate_bytes * t) * payload;
    eprintln!(
        "after {t_early:.2}s: {early:.0} B (want {:.0}); after {t_late:.2}s: {late:.0} B (want {:.0})",
        want(t_early),
        want(t_late)
    );
    // Within a quarter second the whole burst (and a little more) is through;
    // without it only ~250 KB would be.
    assert!(rel_err(early, want(t_early)) < 0.10, "early bytes {early:.0} vs {:.0}", want(t_early));
    assert!(rel_err(late, want(t_late)) < 0.05, "late bytes {late:.0} vs {:.0}", want(t_late));
}
