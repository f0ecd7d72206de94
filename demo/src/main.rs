//! `governor-demo`: the live demo of `cargo xtask run`. Three VMs with
//! real CPU, memory and network load (see `demo.rs`), watched by the
//! governor, the per-VM table printed every tick; all removed at the end.
//! A binary of its own, so the governor's binary carries no test fixtures.

mod demo;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(name = "governor-demo", about = "The governor on a live demo host (everything removed at the end)")]
struct Cli {
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        // Caught from here on: Ctrl-C while the demo is being set up still
        // ends in a clean stop that removes all of it.
        let signals = governor::daemon::Signals::install()?;
        let layout = cgroupfs::Layout::detect()?;
        let demo = demo::Demo::start(&layout)?;
        eprintln!(
            "demo: {} VMs; status also via `governor status --socket {}`",
            demo.config.vms.len(),
            demo.config.socket.display()
        );
        let stop = cli.seconds.map(std::time::Duration::from_secs);
        let r = governor::daemon::run_with(demo.config.clone(), layout, true, stop, signals).await;
        drop(demo);
        r
    })
}
