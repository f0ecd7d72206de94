//! Kernel programs of the governor.
//!
//! A VM is a cgroup (its cgroup v2 id) plus its network interfaces. The
//! scheduler and memory programs charge to `bpf_get_current_cgroup_id()`,
//! the tc programs to the interface's ifindex. This kernel has tracepoints
//! and raw tracepoints (also BTF-typed ones, `tp_btf`) but no
//! kprobes/fentry.
//!
//! The hot scheduler event (sched_switch) uses a BTF-typed raw tracepoint:
//! the kernel passes the `TP_PROTO` arguments as they are, without building
//! the perf record a classic tracepoint fills for every event (that record
//! was most of the cost per context switch), and the program reads the
//! task_struct fields it needs with plain loads, at offsets the loader
//! takes from the kernel's BTF. Rare events (page faults, OOM) use classic
//! tracepoints, whose field offsets the loader reads from tracefs. Both are
//! patched in as read-only globals, so another kernel layout still works.
#![no_std]
#![no_main]
// The two atomic instructions the policer needs (see police.rs).
#![feature(asm_experimental_arch)]

mod police;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{btf_map, btf_tracepoint, classifier, perf_event, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, PerfEventContext, RawTracePointContext, TcContext, TracePointContext},
    EbpfContext,
};
use governor_common::{
    delay_bucket, CgroupStats, CpuState, NetEntry, OomEvent, Policer, QosStats, VmCounters, DIR_FROM_VM, DIR_TO_VM,
    MAX_CGROUPS, MAX_IFACES, MAX_QOS_VMS, QOS_POLICE, QOS_SHAPE,
};

#[btf_map]
/// Per-CPU counters by cgroup id. Not preallocated: per-CPU values cost
/// MAX_CGROUPS x 304 B x CPUs up front otherwise (1.2 GB on 256 CPUs); an
/// entry is allocated the first time a cgroup runs. User space prunes the
/// ids that belong to no VM when the map fills up.
static CGROUPS: PerCpuHashMap<u64, CgroupStats, MAX_CGROUPS, { BPF_F_NO_PREALLOC as usize }> = PerCpuHashMap::new();
#[btf_map]
static NET: PerCpuHashMap<u32, NetEntry, MAX_IFACES> = PerCpuHashMap::new();
/// Each VM's counters on each CPU, at `slot * NR_CPUS + cpu` (see
/// `VmCounters`): a plain array user space maps and reads in place. The
/// loader sets its size to MAX_QOS_VMS x the possible CPUs.
#[btf_map]
static VM_STATS: Array<VmCounters, 1, { BPF_F_MMAPABLE as usize }> = Array::new();
/// The VM slot of each cgroup the governor watches (a VM's own cgroup and
/// its children), written by user space: the programs count these
/// cgroups' events into `VM_STATS`, every other cgroup's into `CGROUPS`.
#[btf_map]
static CG_SLOT: HashMap<u64, u32, MAX_CGROUPS> = HashMap::new();
/// One past the highest possible CPU id (the stride of `VM_STATS`), set
/// by the loader.
#[no_mangle]
static NR_CPUS: u32 = 1;
#[btf_map]
static CPU_STATE: PerCpuArray<CpuState, 1> = PerCpuArray::new();
#[btf_map]
static OOM_EVENTS: RingBuf<OomEvent, { 64 * 1024 }> = RingBuf::new();

/// Offset of `sched_info.run_delay` in `struct task_struct` (the kernel's
/// own running total of the time the task waited runnable), from BTF.
#[no_mangle]
static TASK_RUN_DELAY: u32 = 0;
/// Offset of `se.sum_exec_runtime` in `struct task_struct` (the kernel's
/// own running total of the task's CPU time, what cpuacct adds up), from BTF.
#[no_mangle]
static TASK_SUM_EXEC: u32 = 0;
/// Offset of `se.prev_sum_exec_runtime` (the sum when CFS last picked the
/// task: its slice's start) and of `policy` in `struct task_struct`.
#[no_mangle]
static TASK_PREV_SUM_EXEC: u32 = 0;
#[no_mangle]
static TASK_POLICY: u32 = 0;
/// Offset of `pid` in `struct task_struct`, from BTF.
#[no_mangle]
static TASK_PID: u32 = 0;
/// The path from a task to its cgroup v2 id, as the kernel's
/// `task_dfl_cgroup(task)->kn->id` (what bpf_get_current_cgroup_id
/// returns): offsets of `task_struct.cgroups`, `css_set.dfl_cgrp`,
/// `cgroup.kn` and `kernfs_node.id`, from BTF.
#[no_mangle]
static TASK_CGROUPS: u32 = 0;
#[no_mangle]
static CSS_SET_DFL_CGRP: u32 = 0;
#[no_mangle]
static CGROUP_KN: u32 = 0;
#[no_mangle]
static KERNFS_NODE_ID: u32 = 0;
/// Limits, slot `vm * 2 + direction`; mode QOS_OFF passes everything.
#[btf_map]
static QOS: Array<Policer, { MAX_QOS_VMS * 2 }> = Array::new();
#[btf_map]
static QOS_STATS: PerCpuArray<QosStats, { MAX_QOS_VMS * 2 }> = PerCpuArray::new();

// Tracepoint field offsets (defaults: Linux 6.x); the loader overwrites them
// with the offsets it reads from tracefs `format` files.
#[no_mangle]
static VICTIM_PID: u32 = 8;
#[no_mangle]
static VICTIM_COMM: u32 = 12;
#[no_mangle]
static VICTIM_TOTAL_VM: u32 = 16;
#[no_mangle]
static VICTIM_ANON_RSS: u32 = 24;

#[inline(always)]
fn offset(global: &'static u32) -> usize {
    // SAFETY: reading our own read-only global; volatile so the compiler
    // does not fold the default value in before the loader patches it.
    unsafe { core::ptr::read_volatile(global) as usize }
}

/// Add this CPU's gathered scheduler counters into its cgroup's entry and
/// start afresh. Only the fields gathered here are touched: the page-fault
/// program updates the same entry from task context.
#[inline(always)]
fn flush(state: &mut CpuState) {
    if state.acc_cgroup == 0 || (state.acc.switches == 0 && state.acc.on_cpu_ns == 0) {
        return;
    }
    if let Some(v) = vm_counters(state.acc_cgroup) {
        // SAFETY: this CPU's copy of the VM's counters.
        unsafe { (*v).cpu.add_sched(&state.acc) };
        state.acc = CgroupStats::default();
    } else if let Some(s) = cgroup_stats(state.acc_cgroup) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*s).add_sched(&state.acc) };
        state.acc = CgroupStats::default();
    } else {
        // Dropped and counted: kept, they would go to the next cgroup.
        state.acc = CgroupStats::default();
        state.failed_flushes += 1;
    }
}

/// This CPU's copy of the counters of the VM at `slot`.
#[inline(always)]
fn slot_counters(slot: u32) -> Option<*mut VmCounters> {
    // SAFETY: plain helper call (inlined by the verifier).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let stride = offset(&NR_CPUS) as u32;
    if cpu >= stride {
        return None;
    }
    VM_STATS.get_ptr_mut(slot.wrapping_mul(stride).wrapping_add(cpu))
}

/// This CPU's copy of the counters of the VM cgroup `id` belongs to, if
/// it belongs to one.
#[inline(always)]
fn vm_counters(id: u64) -> Option<*mut VmCounters> {
    // SAFETY: a u32 value of the map, read once.
    let slot = unsafe { *CG_SLOT.get(id)? };
    slot_counters(slot)
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

/// A field of a kernel struct the program holds a BTF-typed pointer to (a
/// `struct task_struct` the kernel passed to the `tp_btf` program, or a
/// pointer read from one), read directly (a plain load, no helper call).
///
/// The verifier allows it because `task` is a BTF-typed pointer and the
/// offset is a known constant to it: the loader writes the field's offset
/// from the kernel's BTF into a global of the read-only, frozen `.rodata`
/// map, and the verifier reads such globals at load time. It then checks
/// that the offset and size name a real field of task_struct, and JITs the
/// load with an exception entry (a bad pointer reads 0, it cannot fault).
///
/// SAFETY: `task` must be a BTF-typed pointer (a tp_btf argument or a
/// pointer field read from one) and `global` the offset of a field of
/// type `T` in its struct.
#[inline(always)]
unsafe fn btf_field<T: Copy>(task: *const u8, global: &'static u32) -> T {
    core::ptr::read_volatile(task.add(offset(global)) as *const T)
}

/// The cgroup v2 id of `task`, read along the pointers the kernel's own
/// `task_dfl_cgroup(task)->kn->id` follows (no helper call). The program
/// runs under RCU (all non-sleepable BPF programs do), which keeps the
/// css_set and cgroup alive while they are read.
///
/// SAFETY: `task` must be a BTF-typed task_struct pointer.
#[inline(always)]
unsafe fn task_cgroup_id(task: *const u8) -> u64 {
    let css_set: *const u8 = btf_field(task, &TASK_CGROUPS);
    let cgroup: *const u8 = btf_field(css_set, &CSS_SET_DFL_CGRP);
    let kn: *const u8 = btf_field(cgroup, &CGROUP_KN);
    btf_field(kn, &KERNFS_NODE_ID)
}

/// The slice `task` (on this CPU now, or leaving it) has run since the
/// scheduler last picked it, by the scheduler's own mark: CFS notes
/// `se.sum_exec_runtime` in `se.prev_sum_exec_runtime` when it picks a
/// task. Used only for a task whose switch-in this CPU did not see (which
/// this kernel was measured to do a few times a second on a busy CPU,
/// without counting a missed run); only CFS tasks (policy normal, batch or
/// idle) keep that mark, others are charged nothing here.
///
/// SAFETY: `task` must be a BTF-typed task_struct pointer.
#[inline(always)]
unsafe fn unseen_slice(task: *const u8) -> u64 {
    const SCHED_NORMAL: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    const SCHED_IDLE: u32 = 5;
    let policy: u32 = btf_field(task, &TASK_POLICY);
    if !matches!(policy, SCHED_NORMAL | SCHED_BATCH | SCHED_IDLE) {
        return 0;
    }
    let exec: u64 = btf_field(task, &TASK_SUM_EXEC);
    let start: u64 = btf_field(task, &TASK_PREV_SUM_EXEC);
    exec.saturating_sub(start)
}

/// sched_switch(bool preempt, task_struct *prev, task_struct *next,
/// unsigned int prev_state), as a BTF-typed tracepoint (`tp_btf`): the same
/// kernel path as a raw tracepoint (no trampoline, which this kernel lacks),
/// but `prev` and `next` are typed pointers whose fields the program reads
/// with plain loads instead of bpf_probe_read_kernel calls.
///
/// Run-queue delay comes from the kernel's own accounting
/// (`task->sched_info.run_delay`, CONFIG_SCHED_INFO): at this tracepoint
/// `next` has not yet been charged the wait that ends now, so we note its
/// total here and take the difference when it leaves the CPU again, when it
/// is `current` and its cgroup is known. That needs no wakeup hooks at all,
/// which halves the events per context switch.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    // Nothing to report to from here: a missing per-CPU slot means no counting.
    let _ = on_switch(prev, next);
    0
}

/// On-CPU time is the kernel's own accounting too: at this tracepoint
/// `prev->se.sum_exec_runtime` already holds the slice that ends now (the
/// scheduler updated it when it put `prev` back), so the slice is the
/// difference from the value noted when `prev` came onto the CPU. That is
/// the figure cpuacct adds up, and it spares a clock read per switch.
/// (`CpuState::slice_start_ns` holds that noted value: the slice's start
/// on the task's own CPU-time clock.)
#[inline(always)]
fn on_switch(prev: *const u8, next: *const u8) -> Result<(), i32> {
    let state = CPU_STATE.get_ptr_mut(0).ok_or(-1)?;
    // SAFETY: per-CPU slot, only this CPU touches it, with preemption off.
    let state = unsafe { &mut *state };

    // The task leaving the CPU is still `current` here: charge its slice and
    // the wait that brought it onto this CPU to its cgroup. The idle task
    // (pid 0) is not charged.
    // SAFETY: prev is the tracepoint's task_struct argument; TASK_PID is
    // the offset of its `pid_t pid`.
    if unsafe { btf_field::<i32>(prev, &TASK_PID) } != 0 {
        // SAFETY: prev is the tracepoint's task_struct argument (and is
        // `current`: the same id bpf_get_current_cgroup_id would return).
        let cg = unsafe { task_cgroup_id(prev) };
        if cg != state.acc_cgroup {
            flush(state);
            state.acc_cgroup = cg;
        }
        let s = &mut state.acc;
        s.switches += 1;
        // Tasks are told apart by their task_struct address: the task we
        // noted at its switch-in is the one leaving now (not so for the
        // first switch on each CPU after the programs attach, and for the
        // switch-ins this kernel now and then runs unseen: see below).
        if state.task_at_switch_in == prev as u64 {
            // SAFETY: as above, at the offsets of two u64 fields.
            let (exec, total): (u64, u64) =
                unsafe { (btf_field(prev, &TASK_SUM_EXEC), btf_field(prev, &TASK_RUN_DELAY)) };
            if exec > state.slice_start_ns {
                s.on_cpu_ns += exec - state.slice_start_ns;
            }
            if total > state.run_delay_at_switch_in {
                let d = total - state.run_delay_at_switch_in;
                s.runq_delay_ns += d;
                s.runq_count += 1;
                let b = delay_bucket(d);
                if let Some(slot) = s.runq_hist.get_mut(b) {
                    *slot += 1;
                }
            }
        } else {
            // We did not see it come in: charge the slice from the
            // scheduler's own mark of its start.
            state.unseen_switch_ins += 1;
            // SAFETY: prev is BTF-typed.
            s.on_cpu_ns += unsafe { unseen_slice(prev) };
        }
    }

    state.task_at_switch_in = next as u64;
    // SAFETY: next is the tracepoint's other task_struct argument.
    unsafe {
        state.run_delay_at_switch_in = btf_field(next, &TASK_RUN_DELAY);
        state.slice_start_ns = btf_field(next, &TASK_SUM_EXEC);
    }
    Ok(())
}

/// An empty program on the same hook, used only by `cargo xtask bench
/// overhead` to measure what attaching anything to sched_switch costs on
/// this host (the floor under `sched_switch`'s own cost).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_floor(_ctx: RawTracePointContext) -> i32 {
    0
}

/// The same empty program as a BTF-typed tracepoint (`tp_btf`): the floor
/// of the `tp_btf` hook, which runs through the same kernel path as the raw
/// tracepoint (no trampoline) but lets the program read task fields directly.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_floor_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// A per-CPU timer (perf cpu-clock, 100 Hz) that charges the slice running
/// now up to now. Without it a task that never leaves its CPU (a vCPU
/// thread on a quiet or dedicated CPU) would show no CPU time until it
/// does, then all of it at once. It runs in interrupt context, which
/// sched_switch (interrupts off, run-queue lock held) never overlaps on the
/// same CPU, so the per-CPU slice state needs no lock. "Now" is the task's
/// `se.sum_exec_runtime`, which the scheduler's own tick brings up to date
/// (so the charge lags at most one jiffy; the next switch or timer charges
/// the rest, and the total stays exact).
#[perf_event]
pub fn cpu_tick(_ctx: PerfEventContext) -> u32 {
    let Some(state) = CPU_STATE.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU slot of this CPU.
    let state = unsafe { &mut *state };
    // SAFETY: the helper returns `current` as a BTF-typed pointer, never null.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    // The task sched_switch noted as coming onto this CPU (its run-time
    // mark is in `state`), or one it did not see, taken over here; the
    // idle task (pid 0) is not charged.
    // SAFETY: task is BTF-typed; the offsets are of its u64/pid_t fields.
    if unsafe { btf_field::<i32>(task, &TASK_PID) } != 0 {
        let exec: u64 = unsafe { btf_field(task, &TASK_SUM_EXEC) };
        if state.task_at_switch_in != task as u64 {
            // A task sched_switch did not see come in: take it over from
            // here, charging what it ran so far by the scheduler's mark.
            state.unseen_switch_ins += 1;
            state.task_at_switch_in = task as u64;
            state.slice_start_ns = exec.saturating_sub(unsafe { unseen_slice(task) });
            state.run_delay_at_switch_in = unsafe { btf_field(task, &TASK_RUN_DELAY) };
        }
        if exec > state.slice_start_ns {
            // SAFETY: task is BTF-typed.
            let cg = unsafe { task_cgroup_id(task) };
            if cg != state.acc_cgroup {
                flush(state);
                state.acc_cgroup = cg;
            }
            state.acc.on_cpu_ns += exec - state.slice_start_ns;
            state.slice_start_ns = exec;
        }
    }
    flush(state);
    0
}

#[tracepoint(category = "exceptions", name = "page_fault_user")]
pub fn page_fault_user(_ctx: TracePointContext) -> u32 {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    if let Some(v) = vm_counters(cg) {
        // SAFETY: this CPU's copy of the VM's counters.
        unsafe { (*v).cpu.page_faults += 1 };
    } else if let Some(s) = cgroup_stats(cg) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*s).page_faults += 1 };
    }
    0
}

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    if let Some(v) = vm_counters(cg) {
        // SAFETY: this CPU's copy of the VM's counters.
        unsafe { (*v).cpu.oom_kills += 1 };
    } else if let Some(s) = cgroup_stats(cg) {
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
            // An unreadable name stays empty; the event is still worth sending.
            let _ = bpf_probe_read_kernel_str_bytes(src, &mut ev.comm);
        }
    }
    // A full ring buffer loses the event; the per-cgroup count above stays.
    let _ = OOM_EVENTS.output(ev, 0);
    0
}

/// What the interface receives (tc ingress) is what the VM sends.
#[classifier]
pub fn gov_tc_ingress(ctx: TcContext) -> i32 {
    let slot = count(&ctx, true);
    qos(&ctx, slot, DIR_FROM_VM)
}

/// What the interface sends (tc egress) is what the VM receives.
#[classifier]
pub fn gov_tc_egress(ctx: TcContext) -> i32 {
    let slot = count(&ctx, false);
    qos(&ctx, slot, DIR_TO_VM)
}

/// An empty classifier, used only by `cargo xtask bench qos` to measure
/// what running any tc-BPF program per packet costs on this host (the floor
/// under the counting and policing costs), attached as the governor
/// attaches its own (clsact, direct action).
#[classifier]
pub fn gov_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Count the packet in its VM's counters, or on its interface when it is
/// no VM's; returns the VM's slot + 1 (0: no VM's).
#[inline(always)]
fn count(ctx: &TcContext, ingress: bool) -> u32 {
    // SAFETY: the context pointer is the kernel's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len() as u64;
    let p = match NET.get_ptr_mut(ifindex) {
        Some(p) => p,
        None => {
            // User space creates a VM's entry (with its slot) before it
            // attaches; an entry made here is an interface it did not set
            // up (a filter an earlier governor left on an interface no
            // longer watched, or a test run): slot 0, counting only. A
            // concurrent insert on another CPU is fine: NOEXIST fails, we
            // look up.
            let _ = NET.insert(ifindex, NetEntry::default(), BPF_NOEXIST as u64);
            match NET.get_ptr_mut(ifindex) {
                Some(p) => p,
                None => return 0,
            }
        }
    };
    // SAFETY: per-CPU value of this CPU.
    let n = unsafe { &mut *p };
    let vm_plus_one = n.qos_slot;
    if vm_plus_one != 0 {
        if let Some(v) = slot_counters(vm_plus_one - 1) {
            // SAFETY: this CPU's copy of the VM's counters.
            unsafe { (*v).net.count(ingress, len) };
            return vm_plus_one;
        }
    }
    n.stats.count(ingress, len);
    n.qos_slot
}

/// Apply the VM's limit for this direction: police (pass or drop by token
/// bucket) or shape (choose the HTB class, redirect to the IFB for traffic
/// from the VM).
#[inline(always)]
fn qos(ctx: &TcContext, vm_plus_one: u32, dir: u32) -> i32 {
    if vm_plus_one == 0 {
        return TC_ACT_OK;
    }
    let slot = (vm_plus_one - 1) * 2 + dir;
    let p = match QOS.get_ptr_mut(slot) {
        Some(p) => p,
        None => return TC_ACT_OK,
    };
    // SAFETY: array value; user space replaces it whole per update, and
    // each field is read with one aligned load (u32/u64 loads do not tear).
    let mode = unsafe { (*p).mode };
    if mode == QOS_SHAPE {
        let (classid, redirect) = unsafe { ((*p).classid, (*p).redirect_ifindex) };
        // SAFETY: priority is writable from tc programs.
        unsafe { (*ctx.skb.skb).priority = classid };
        account(slot, ctx.len() as u64, true);
        if redirect != 0 {
            // SAFETY: plain helper call; returns TC_ACT_REDIRECT on success.
            return unsafe { aya_ebpf::helpers::bpf_redirect(redirect, 0) } as i32;
        }
        return TC_ACT_OK;
    }
    if mode != QOS_POLICE {
        return TC_ACT_OK;
    }
    let len = ctx.len() as u64;
    // A GSO packet is many packets on the wire: charge each segment.
    let segs = unsafe { (*ctx.skb.skb).gso_segs }.max(1) as u64;
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a live QOS value (array values live as long as the map).
    let pass = unsafe { police::police(p, len, segs, now) };
    account(slot, len, pass);
    if pass {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[inline(always)]
fn account(slot: u32, len: u64, passed: bool) {
    if let Some(s) = QOS_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value of this CPU.
        let s = unsafe { &mut *s };
        if passed {
            s.passed_bytes += len;
            s.passed_packets += 1;
        } else {
            s.dropped_bytes += len;
            s.dropped_packets += 1;
        }
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
