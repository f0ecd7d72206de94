//! `cargo xtask`: the project's set-up, build, run, test and bench entry points.
//!
//! Everything a fresh machine needs is installed here, idempotently: nothing
//! in this project depends on something installed by hand.

mod bench;
mod build;
mod leftovers;
mod run;
mod setup;
mod stats;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run, test and bench the governor")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install toolchains and tools (Debian packages, bpf-linker) and mount
    /// tracefs/bpffs; does nothing that is already done.
    Setup,
    /// Compile governor-ebpf for bpfel-unknown-none with BTF.
    BuildEbpf,
    /// Compile the freestanding management guest.
    BuildGuest,
    /// The main job: card-sim with the MC VMs, the governor and user VMs
    /// under ramped load; MC VMs move to the host and back, shown live.
    Run {
        /// Stop after this many seconds (default: run until Ctrl-C or q).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// The main job's scenario for a long time, judged: fails on any card
    /// death, any failed move, and growth of the governor's threads, fds
    /// or memory past the bounds `governor-demo --soak` states.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
    /// Run every test (unit and integration, as root against the real kernel).
    Test {
        /// Extra arguments passed to the test binaries (a filter, for example).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure and print a table; refreshes BENCHMARKS.md.
    Bench {
        /// overhead | qos | vmm | card | placement | tick | all
        #[arg(default_value = "all")]
        which: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf => build::ebpf().map(|_| ()),
        Cmd::BuildGuest => build::build_guest().map(|_| ()),
        Cmd::Run { seconds } => {
            setup::setup()?;
            run::run(seconds)
        }
        Cmd::Soak { minutes } => {
            setup::setup()?;
            run::soak(minutes)
        }
        Cmd::Test { args } => {
            setup::setup()?;
            test::test(&args)
        }
        Cmd::Bench { which } => {
            setup::setup()?;
            bench::bench(&which)
        }
    }
}
