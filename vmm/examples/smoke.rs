//! Boot the management guest, time it, and ping it: `cargo run --example smoke -- GUEST_ELF`.
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let img = std::env::args().nth(1).ok_or("usage: smoke GUEST_ELF")?;
    let vm = vmm::Vm::create(
        &vmm::VmConfig::new(img, 64),
        vmm::Sinks { serial: Some(Box::new(std::io::stdout())), log: None },
    )?;
    let t1 = Instant::now();
    vm.start(false)?;
    let r = vm.wait_ready(Duration::from_secs(5));
    println!("create {:?} ready {:?} -> {:?}", t1 - t0, t0.elapsed(), r.map(|_| ()));
    println!("state {}", vm.state());
    let t = Instant::now();
    for _ in 0..100 {
        vm.request(vmm::proto::op::PING, 0, Duration::from_secs(2))?;
    }
    println!("ping rtt avg {:?}", t.elapsed() / 100);
    let r = vm.request(vmm::proto::op::STEP, 1000, Duration::from_secs(2));
    println!("step {:?}", r);
    println!("{:?}", vm.shutdown());
    Ok(())
}
