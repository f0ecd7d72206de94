//! Kernel programs of the governor.
//!
//! A VM is a cgroup (its cgroup v2 id) plus its network interfaces. The
//! scheduler and memory programs charge to `bpf_get_current_cgroup_id()`,
//! the tc programs to the interface's ifindex. This kernel has tracepoints
//! and raw tracepoints but no kprobes/fentry, so everything hangs off
//! tracepoints; their field offsets are read from tracefs by the loader and
//! patched in as read-only globals, so a kernel with another layout still
//! works.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    btf_maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::{btf_map, classifier, tracepoint},
    programs::{TcContext, TracePointContext},
    EbpfContext,
};
use governor_common::{
    delay_bucket, CgroupStats, CpuState, NetStats, OomEvent, MAX_CGROUPS, MAX_IFACES,
    MAX_WAITING_TASKS,
};

#[btf_map]
static CGROUPS: PerCpuHashMap<u64, CgroupStats, MAX_CGROUPS> = PerCpuHashMap::new();
#[btf_map]
static NET: PerCpuHashMap<u32, NetStats, MAX_IFACES> = PerCpuHashMap::new();
/// pid -> when it became runnable (woken, or preempted while runnable).
/// LRU so that tasks that die before running cannot fill it.
#[btf_map]
static WAKEUPS: LruHashMap<u32, u64, MAX_WAITING_TASKS> = LruHashMap::new();
#[btf_map]
static CPU_STATE: PerCpuArray<CpuState, 1> = PerCpuArray::new();
#[btf_map]
static OOM_EVENTS: RingBuf<OomEvent, { 64 * 1024 }> = RingBuf::new();

// Tracepoint field offsets (defaults: Linux 6.x); the loader overwrites them
// with the offsets it reads from tracefs `format` files.
#[no_mangle]
static SWITCH_PREV_PID: u32 = 24;
#[no_mangle]
static SWITCH_PREV_STATE: u32 = 32;
#[no_mangle]
static SWITCH_NEXT_PID: u32 = 56;
#[no_mangle]
static WAKEUP_PID: u32 = 24;
#[no_mangle]
static VICTIM_PID: u32 = 8;
#[no_mangle]
static VICTIM_COMM: u32 = 12;
#[no_mangle]
static VICTIM_TOTAL_VM: u32 = 16;
#[no_mangle]
static VICTIM_ANON_RSS: u32 = 24;

/// `prev_state` low byte: the task state bits (S, D, T, ...). Zero means the
/// task was still runnable (preempted, flagged with bit 8, or yielding).
const TASK_STATE_MASK: i64 = 0xff;

#[inline(always)]
fn offset(global: &'static u32) -> usize {
    // SAFETY: reading our own read-only global; volatile so the compiler
    // does not fold the default value in before the loader patches it.
    unsafe { core::ptr::read_volatile(global) as usize }
}

/// The stats of a cgroup on this CPU, created on first use.
#[inline(always)]
fn cgroup_stats(id: u64) -> Option<*mut CgroupStats> {
    if let Some(p) = CGROUPS.get_ptr_mut(id) {
        return Some(p);
    }
    let zero = CgroupStats::default();
    // A concurrent insert on another CPU is fine: NOEXIST fails, we look up.
    let _ = CGROUPS.insert(id, zero, BPF_NOEXIST as u64);
    CGROUPS.get_ptr_mut(id)
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let _ = try_sched_switch(&ctx);
    0
}

#[inline(always)]
fn try_sched_switch(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets come from this kernel's tracepoint format.
    let prev_pid: i32 = unsafe { ctx.read_at(offset(&SWITCH_PREV_PID))? };
    let prev_state: i64 = unsafe { ctx.read_at(offset(&SWITCH_PREV_STATE))? };
    let next_pid: i32 = unsafe { ctx.read_at(offset(&SWITCH_NEXT_PID))? };
    let now = unsafe { bpf_ktime_get_ns() };
    let state = CPU_STATE.get_ptr_mut(0).ok_or(-1)?;
    // SAFETY: per-CPU slot, only this CPU touches it, with preemption off.
    let state = unsafe { &mut *state };

    // The task leaving the CPU is still `current` here: charge its slice and
    // its pending run-queue delay to its cgroup. The idle task (pid 0) is
    // not charged.
    if prev_pid != 0 {
        let cg = unsafe { bpf_get_current_cgroup_id() };
        if let Some(s) = cgroup_stats(cg) {
            // SAFETY: per-CPU value of this CPU.
            let s = unsafe { &mut *s };
            if state.slice_start_ns != 0 && now > state.slice_start_ns {
                s.on_cpu_ns += now - state.slice_start_ns;
            }
            s.switches += 1;
            if state.pending_pid == prev_pid as u32 && state.pending_delay_ns != 0 {
                let d = state.pending_delay_ns;
                s.runq_delay_ns += d;
                s.runq_count += 1;
                let b = delay_bucket(d);
                if let Some(slot) = s.runq_hist.get_mut(b) {
                    *slot += 1;
                }
            }
        }
        // Preempted (or yielding) while runnable: it waits in the run queue
        // from now on.
        if prev_state & TASK_STATE_MASK == 0 {
            let _ = WAKEUPS.insert(prev_pid as u32, now, 0);
        }
    }

    state.pending_pid = next_pid as u32;
    state.pending_delay_ns = 0;
    if next_pid != 0 {
        let key = next_pid as u32;
        // SAFETY: the value is a plain u64 copied out at once.
        if let Some(t) = unsafe { WAKEUPS.get(key) } {
            let t = *t;
            if now > t {
                state.pending_delay_ns = now - t;
            }
            let _ = WAKEUPS.remove(key);
        }
    }
    state.slice_start_ns = now;
    Ok(())
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    record_wakeup(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
    record_wakeup(&ctx);
    0
}

#[inline(always)]
fn record_wakeup(ctx: &TracePointContext) {
    // SAFETY: offset from the tracepoint format.
    if let Ok(pid) = unsafe { ctx.read_at::<i32>(offset(&WAKEUP_PID)) } {
        if pid != 0 {
            let now = unsafe { bpf_ktime_get_ns() };
            let _ = WAKEUPS.insert(pid as u32, now, 0);
        }
    }
}

#[tracepoint(category = "exceptions", name = "page_fault_user")]
pub fn page_fault_user(_ctx: TracePointContext) -> u32 {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    if let Some(s) = cgroup_stats(cg) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*s).page_faults += 1 };
    }
    0
}

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    if let Some(s) = cgroup_stats(cg) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*s).oom_kills += 1 };
    }
    let mut ev = OomEvent { cgroup_id: cg, ..OomEvent::default() };
    // SAFETY: offsets from the tracepoint format.
    unsafe {
        ev.pid = ctx.read_at::<i32>(offset(&VICTIM_PID)).unwrap_or(0) as u32;
        ev.total_vm_kb = ctx.read_at::<u64>(offset(&VICTIM_TOTAL_VM)).unwrap_or(0);
        ev.anon_rss_kb = ctx.read_at::<u64>(offset(&VICTIM_ANON_RSS)).unwrap_or(0);
        // `comm` is a __data_loc string: low 16 bits offset, high 16 length.
        if let Ok(loc) = ctx.read_at::<u32>(offset(&VICTIM_COMM)) {
            let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
            let _ = bpf_probe_read_kernel_str_bytes(src, &mut ev.comm);
        }
    }
    let _ = OOM_EVENTS.output(ev, 0);
    0
}

/// Counts what the interface receives (tc ingress).
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    count(&ctx, true);
    TC_ACT_OK
}

/// Counts what the interface sends (tc egress).
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    count(&ctx, false);
    TC_ACT_OK
}

#[inline(always)]
fn count(ctx: &TcContext, ingress: bool) {
    // SAFETY: the context pointer is the kernel's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len() as u64;
    let p = match NET.get_ptr_mut(ifindex) {
        Some(p) => p,
        None => {
            let _ = NET.insert(ifindex, NetStats::default(), BPF_NOEXIST as u64);
            match NET.get_ptr_mut(ifindex) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value of this CPU.
    let n = unsafe { &mut *p };
    if ingress {
        n.rx_bytes += len;
        n.rx_packets += 1;
    } else {
        n.tx_bytes += len;
        n.tx_packets += 1;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
