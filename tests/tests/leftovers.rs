//! The demo and the daemon leave nothing on the host: the inventory of
//! cgroups, links, network namespaces, pins, lock files, temporary files
//! and processes is the same before and after. (`cargo xtask test` checks
//! the same inventory around the whole run.)

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::*;

fn governor_bin() -> PathBuf {
    let p = bin_dir().join("governor");
    assert!(p.exists(), "{} is missing: build it first (cargo xtask test does)", p.display());
    p
}

#[test]
fn the_demo_leaves_nothing_behind() {
    require_root();
    // The demo runs card-sim with real KVM MC VMs.
    require_kvm();
    require_tool("iperf3");
    require_tool("stress-ng");
    let before = Inventory::take();
    let demo = bin_dir().join("governor-demo");
    assert!(demo.exists(), "{} is missing: build it first (cargo xtask test does)", demo.display());
    let out = Command::new(demo).args(["--seconds", "4"]).stdout(Stdio::null()).output().expect("run governor-demo");
    assert!(out.status.success(), "demo failed: {}", String::from_utf8_lossy(&out.stderr));
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "the demo left: {left}");
}

#[test]
fn a_stopped_governor_leaves_nothing_behind() {
    require_root();
    let before = Inventory::take();
    {
        let net = VmNet::new(1);
        let cg = TestCgroup::new("left");
        let pins = PinDir::new();
        let dir = std::env::temp_dir();
        let (cfg_file, sock) = (TempPath::new("governor-test.toml"), dir.join(format!("{}.sock", unique("gsk"))));
        let cfg = cfg_file.path();
        std::fs::write(
            cfg,
            format!(
                "pin_dir = {:?}\nsocket = {sock:?}\nqos_ifb = {:?}\n[[vm]]\nname = \"vm\"\ncgroup = {:?}\ninterfaces = [{:?}]\n\
                 [vm.qos.egress]\nmode = \"shape\"\nrate = \"10mbit\"\nburst = \"64kb\"\n\
                 [vm.qos.ingress]\nmode = \"shape\"\nrate = \"10mbit\"\nburst = \"64kb\"\n",
                pins.0,
                unique("gifb"),
                cg.cg.rel().to_string_lossy(),
                net.ports[0].1.name
            ),
        )
        .expect("config");
        let mut gov = Guarded::new(
            Command::new(governor_bin()).args(["run", "--config"]).arg(cfg).spawn().expect("start governor"),
        );
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "governor did not come up");
            assert!(gov.child().try_wait().expect("wait").is_none(), "governor exited early");
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = gov.terminate(Duration::from_secs(10)).expect("governor stops on SIGTERM");
        assert!(st.success(), "{st}");
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "the governor and its test left: {left}");
}
