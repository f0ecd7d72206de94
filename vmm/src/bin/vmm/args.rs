//! Command line of the `vmm` binary.

use std::path::PathBuf;

use vmm::cgroupfs::Limits;

pub const USAGE: &str = "\
usage: vmm [--guest ELF | --kernel VMLINUX|BZIMAGE [--cmdline S] | --restore SNAPSHOT]
           [--mem-mib N] [--paused] [--socket PATH] [--serial PATH|-] [--log PATH|-]
           [--cgroup NAME [--cpu-quota-us N] [--cpu-period-us N] [--cpuset LIST] [--memory-mib N]]
Without --socket the process runs until the VM stops; with it, it serves the
JSON-lines control protocol and may start empty. Log level: RUST_LOG (default warn).";

#[derive(Default)]
pub struct Args {
    pub guest: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub restore: Option<PathBuf>,
    pub paused: bool,
    pub socket: Option<PathBuf>,
    pub serial: Option<String>,
    pub log: Option<String>,
    pub cgroup: Option<String>,
    pub limits: Limits,
}

/// Parse `args` (without the program name); the error is the message to print.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { mem_mib: 64, cmdline: "console=ttyS0 panic=1".into(), ..Default::default() };
    let mut it = args.into_iter();
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--guest" => a.guest = Some(val()?.into()),
            "--kernel" => a.kernel = Some(val()?.into()),
            "--cmdline" => a.cmdline = val()?,
            "--mem-mib" => a.mem_mib = num(val()?)?,
            "--restore" => a.restore = Some(val()?.into()),
            "--paused" => a.paused = true,
            "--socket" => a.socket = Some(val()?.into()),
            "--serial" => a.serial = Some(val()?),
            "--log" => a.log = Some(val()?),
            "--cgroup" => a.cgroup = Some(val()?),
            "--cpu-quota-us" => a.limits.cpu_quota_us = Some(num(val()?)?),
            "--cpu-period-us" => a.limits.cpu_period_us = Some(num(val()?)?),
            "--cpuset" => a.limits.cpuset = Some(val()?),
            // A shift would drop the high bits and set a small, wrong limit.
            "--memory-mib" => {
                let mib = num(val()?)?;
                a.limits.memory_bytes =
                    Some(mib.checked_mul(1 << 20).ok_or(format!("{k}: {mib} MiB overflows u64 bytes"))?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let sources = [a.guest.is_some(), a.kernel.is_some(), a.restore.is_some()];
    if sources.iter().filter(|x| **x).count() > 1 {
        return Err("--guest, --kernel and --restore exclude each other".into());
    }
    if !sources.contains(&true) && a.socket.is_none() {
        return Err("give --guest, --kernel, --restore or --socket".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn sources_and_limits() {
        let a = args("--guest g --mem-mib 32 --cgroup mc/x --cpu-quota-us 20000 --memory-mib 256").expect("valid");
        assert_eq!((a.guest, a.mem_mib), (Some(PathBuf::from("g")), 32));
        assert_eq!((a.limits.cpu_quota_us, a.limits.memory_bytes), (Some(20_000), Some(256 << 20)));
        assert!(args("--socket s").is_ok(), "an empty VMM with a socket");
        assert!(args("--guest g --restore s").is_err_and(|e| e.contains("exclude")));
        assert!(args("").is_err_and(|e| e.contains("--socket")));
        assert!(args("--mem-mib x --guest g").is_err_and(|e| e.starts_with("--mem-mib")));
        assert!(args("--guest").is_err_and(|e| e.contains("needs a value")));
        assert!(args("--guest g --memory-mib 17592186044416").is_err_and(|e| e.starts_with("--memory-mib")));
        assert!(args("--bogus").is_err_and(|e| e.contains("\"--bogus\"")));
    }
}
