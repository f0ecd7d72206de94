use std::time::{Duration, Instant};
fn main() {
    let t0 = Instant::now();
    let img = std::env::args().nth(1).unwrap();
    let vm = vmm::Vm::create(
        &vmm::VmConfig::new(img, 64),
        vmm::Sinks { serial: Some(Box::new(std::io::stdout())), log: None },
    )
    .unwrap();
    let t1 = Instant::now();
    vm.start(false).unwrap();
    let r = vm.wait_ready(Duration::from_secs(5));
    println!("create {:?} ready {:?} -> {:?}", t1 - t0, t0.elapsed(), r.map(|_| ()));
    println!("state {}", vm.state());
    let t = Instant::now();
    for _ in 0..100 {
        vm.request(vmm::proto::op::PING, 0, Duration::from_secs(2)).unwrap();
    }
    println!("ping rtt avg {:?}", t.elapsed() / 100);
    let r = vm.request(vmm::proto::op::STEP, 1000, Duration::from_secs(2));
    println!("step {:?}", r);
    println!("{:?}", vm.shutdown());
}
