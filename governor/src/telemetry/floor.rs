//! The benches' floor probes: the same object's empty programs, attached
//! alone where the governor attaches its own, so a bench can measure what
//! running any program there costs (`governor floor-probe`).

use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use super::load::{program, OBJECT};
use super::TelemetryError;
use crate::tracefs;

/// Attach only an empty program (for the benches' floors): `hook` is
/// `raw_tp` (`sched_switch_floor` on the raw tracepoint), `tp_btf`
/// (`sched_switch_floor_btf`) or `tc:<interface>` (`gov_tc_floor` on the
/// interface's egress, attached as the governor attaches its own). Detached
/// when the returned object drops.
pub fn attach_floor_probe(hook: &str) -> Result<Ebpf, TelemetryError> {
    tracefs::ensure_mounts()?;
    let mut ebpf = EbpfLoader::new().load(OBJECT)?;
    match hook {
        "raw_tp" => {
            let name = "sched_switch_floor";
            let p: &mut aya::programs::RawTracePoint = program(&mut ebpf, name)?;
            p.load().map_err(|source| TelemetryError::Program { name, source })?;
            p.attach("sched_switch").map_err(|source| TelemetryError::Program { name, source })?;
        }
        "tp_btf" => {
            let name = "sched_switch_floor_btf";
            let btf = aya::Btf::from_sys_fs()
                .map_err(|e| TelemetryError::Program { name, source: aya::programs::ProgramError::Btf(e) })?;
            let p: &mut aya::programs::BtfTracePoint = program(&mut ebpf, name)?;
            p.load("sched_switch", &btf).map_err(|source| TelemetryError::Program { name, source })?;
            p.attach().map_err(|source| TelemetryError::Program { name, source })?;
        }
        tc if tc.starts_with("tc:") => {
            let (name, iface) = ("gov_tc_floor", &tc[3..]);
            super::bpf::ensure_clsact(iface)?;
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load().map_err(|source| TelemetryError::Program { name, source })?;
            // Detached when `ebpf` drops (the probe exits on SIGTERM).
            p.attach_with_options(iface, TcAttachType::Egress, TcAttachOptions::Netlink(NlOptions::default()))
                .map_err(|e| TelemetryError::Interface { name: iface.into(), reason: format!("attach {name}: {e}") })?;
        }
        other => {
            return Err(TelemetryError::Interface {
                name: other.to_string(),
                reason: "--hook: expected raw_tp, tp_btf or tc:<interface>".to_string(),
            })
        }
    }
    Ok(ebpf)
}
