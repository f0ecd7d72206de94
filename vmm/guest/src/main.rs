//! The management agent: a freestanding 64-bit guest that runs entirely at
//! CPL3 (the VMM starts it there with user page tables and IOPL=3), because on
//! the PVM-backed KVM of our hosts CPL0 code is emulated and slow while CPL3
//! code runs natively. It takes no interrupts: it polls the used ring of the
//! virtio-console receive queue and parks itself through the idle port when
//! there is nothing to do.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use mc_proto as proto;
use proto::{op, word};

mod tasks;

const N: usize = proto::QUEUE_SIZE as usize;
const VRING_DESC_F_WRITE: u16 = 2;

global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "  and rsp, -16",
    "  call {main}",
    "  ud2",
    main = sym agent_main,
);

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(16))]
struct DescTable([Desc; N]);

#[repr(C, align(2))]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; N],
    avail_event: u16,
}

/// One split virtqueue with its buffers, all in the guest's own .bss.
#[repr(C, align(4096))]
struct Vq {
    desc: DescTable,
    avail: Avail,
    used: Used,
    bufs: [[u8; proto::FRAME_LEN]; N],
    /// Driver-side shadow indices.
    avail_idx: u16,
    last_used: u16,
}

const EMPTY_DESC: Desc = Desc { addr: 0, len: 0, flags: 0, next: 0 };
const EMPTY_VQ: Vq = Vq {
    desc: DescTable([EMPTY_DESC; N]),
    avail: Avail { flags: 0, idx: 0, ring: [0; N], used_event: 0 },
    used: Used { flags: 0, idx: 0, ring: [UsedElem { id: 0, len: 0 }; N], avail_event: 0 },
    bufs: [[0; proto::FRAME_LEN]; N],
    avail_idx: 0,
    last_used: 0,
};

static mut RXQ: Vq = EMPTY_VQ;
static mut TXQ: Vq = EMPTY_VQ;

/// The agent's state. It lives in guest memory, so a snapshot carries it.
struct State {
    work: u64,
    log_seq: u64,
    steps: u64,
    requests: u64,
    auto_units: u64,
    acc: u64,
}

static mut STATE: State =
    State { work: 0, log_seq: 0, steps: 0, requests: 0, auto_units: 0, acc: 0x9e37_79b9_7f4a_7c15 };

fn outb(port: u16, val: u8) {
    // SAFETY: port I/O is allowed at CPL3 because the VMM sets IOPL=3.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack)) };
}

fn serial_write(s: &str) {
    for b in s.bytes() {
        outb(proto::SERIAL_PORT, b);
    }
}

fn mmio_read(off: u64) -> u32 {
    // SAFETY: identity-mapped device window, every access traps to the VMM.
    unsafe { read_volatile((proto::VIRTIO_MMIO_BASE + off) as *const u32) }
}

fn mmio_write(off: u64, val: u32) {
    // SAFETY: as above.
    unsafe { write_volatile((proto::VIRTIO_MMIO_BASE + off) as *mut u32, val) }
}

fn fail(msg: &str) -> ! {
    serial_write("mc-agent error: ");
    serial_write(msg);
    serial_write("\n");
    outb(proto::EXIT_PORT, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}

/// Bring up the virtio-mmio console (virtio 1.x, modern registers).
fn virtio_init() {
    if mmio_read(0x000) != 0x7472_6976 || mmio_read(0x004) != 2 || mmio_read(0x008) != 3 {
        fail("no virtio-mmio console");
    }
    mmio_write(0x070, 0); // reset
    mmio_write(0x070, 1 | 2); // ACKNOWLEDGE | DRIVER
    mmio_write(0x024, 1); // driver features, high word
    mmio_write(0x020, 1); // VIRTIO_F_VERSION_1
    mmio_write(0x024, 0);
    mmio_write(0x020, 0);
    mmio_write(0x070, 1 | 2 | 8); // FEATURES_OK
    if mmio_read(0x070) & 8 == 0 {
        fail("features refused");
    }
    // SAFETY: single-threaded guest; the queues are only shared with the device.
    unsafe {
        for (i, q) in [addr_of_mut!(RXQ), addr_of_mut!(TXQ)].into_iter().enumerate() {
            mmio_write(0x030, i as u32);
            if (mmio_read(0x034) as usize) < N {
                fail("queue too small");
            }
            mmio_write(0x038, N as u32);
            let d = addr_of!((*q).desc) as u64;
            let a = addr_of!((*q).avail) as u64;
            let u = addr_of!((*q).used) as u64;
            mmio_write(0x080, d as u32);
            mmio_write(0x084, (d >> 32) as u32);
            mmio_write(0x090, a as u32);
            mmio_write(0x094, (a >> 32) as u32);
            mmio_write(0x0a0, u as u32);
            mmio_write(0x0a4, (u >> 32) as u32);
            mmio_write(0x044, 1);
        }
        // Offer every receive buffer to the device.
        let rx = &mut *addr_of_mut!(RXQ);
        for i in 0..N {
            rx.desc.0[i] = Desc {
                addr: addr_of!(rx.bufs[i]) as u64,
                len: proto::FRAME_LEN as u32,
                flags: VRING_DESC_F_WRITE,
                next: 0,
            };
            rx.avail.ring[i] = i as u16;
        }
        rx.avail_idx = N as u16;
        fence(Ordering::SeqCst);
        write_volatile(addr_of_mut!(rx.avail.idx), rx.avail_idx);
    }
    mmio_write(0x070, 1 | 2 | 8 | 4); // DRIVER_OK
}

/// Next request from the VMM, if one is in the receive queue.
fn poll_request() -> Option<[u64; 8]> {
    // SAFETY: see virtio_init.
    unsafe {
        let rx = &mut *addr_of_mut!(RXQ);
        let used = read_volatile(addr_of!(rx.used.idx));
        if used == rx.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let elem = read_volatile(addr_of!(rx.used.ring[rx.last_used as usize % N]));
        rx.last_used = rx.last_used.wrapping_add(1);
        let id = elem.id as usize % N;
        let frame = proto::decode(&*addr_of!(rx.bufs[id]));
        // Give the buffer back before handling, so the VMM can always queue.
        write_volatile(addr_of_mut!(rx.avail.ring[rx.avail_idx as usize % N]), id as u16);
        rx.avail_idx = rx.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        write_volatile(addr_of_mut!(rx.avail.idx), rx.avail_idx);
        Some(frame)
    }
}

/// Put one frame on the transmit queue and notify the device. The VMM
/// consumes it synchronously during the notify exit.
fn send(words: &[u64; 8], addr_override: Option<u64>) {
    // SAFETY: see virtio_init.
    unsafe {
        let tx = &mut *addr_of_mut!(TXQ);
        // Wait until a slot is free (the device normally returns it at once).
        while tx.avail_idx.wrapping_sub(read_volatile(addr_of!(tx.used.idx))) as usize >= N {
            outb(proto::IDLE_PORT, 0);
        }
        let slot = tx.avail_idx as usize % N;
        tx.bufs[slot] = proto::encode(words);
        tx.desc.0[slot] = Desc {
            addr: addr_override.unwrap_or(addr_of!(tx.bufs[slot]) as u64),
            len: proto::FRAME_LEN as u32,
            flags: 0,
            next: 0,
        };
        write_volatile(addr_of_mut!(tx.avail.ring[slot]), slot as u16);
        tx.avail_idx = tx.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        write_volatile(addr_of_mut!(tx.avail.idx), tx.avail_idx);
        fence(Ordering::SeqCst);
    }
    mmio_write(0x050, proto::TX_QUEUE as u32);
}

fn counters(kind: u64, opcode: u64, id: u64, value: u64) -> [u64; 8] {
    // SAFETY: single-threaded guest.
    let s = unsafe { &*addr_of!(STATE) };
    let mut w = [0u64; 8];
    w[word::KIND] = kind;
    w[word::OP] = opcode;
    w[word::ID] = id;
    w[word::WORK] = s.work;
    w[word::LOG_SEQ] = s.log_seq;
    w[word::STEPS] = s.steps;
    w[word::VALUE] = value;
    w[word::REQUESTS] = s.requests;
    w
}

/// One management task step: `units` units of work (a xorshift chain stands
/// in for the real task), then one log record with the next sequence number.
fn step(units: u64) -> u64 {
    // SAFETY: single-threaded guest.
    let s = unsafe { &mut *addr_of_mut!(STATE) };
    let mut x = s.acc;
    for _ in 0..units {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Count each unit as it is done, so the counter is exact at any
        // instant a snapshot may be taken.
        s.work += 1;
        s.acc = x;
    }
    s.steps += 1;
    s.log_seq += 1;
    let rec = counters(proto::KIND_LOG, op::STEP, 0, x);
    send(&rec, None);
    x
}

fn handle(req: [u64; 8]) {
    if req[word::KIND] != proto::KIND_REQUEST {
        return;
    }
    // SAFETY: single-threaded guest.
    unsafe { (*addr_of_mut!(STATE)).requests += 1 };
    let (opcode, id, arg) = (req[word::OP], req[word::ID], req[word::ARG]);
    let value = match opcode {
        op::PING => proto::PONG,
        op::STEP => step(arg),
        op::COUNTERS => 0,
        op::AUTO => {
            // SAFETY: single-threaded guest.
            unsafe { (*addr_of_mut!(STATE)).auto_units = arg };
            arg
        }
        op::TOUCH => {
            // One word per 4 KiB page, pages `first..first + count` with
            // arg = count | first << 32; the VMM's memory size bounds them
            // (a page beyond RAM is an MMIO access and stops the VM).
            let (count, first) = (arg & 0xffff_ffff, arg >> 32);
            for i in first..first + count {
                let p = (proto::SCRATCH_BASE + i * 4096) as *mut u64;
                // SAFETY: identity-mapped guest RAM above the image.
                unsafe { write_volatile(p, i) };
            }
            arg
        }
        op::CHECKSUM => {
            let mut sum = 0u64;
            for i in 0..arg {
                // SAFETY: as for TOUCH.
                sum = sum.wrapping_add(unsafe { read_volatile((proto::SCRATCH_BASE + i * 4096) as *const u64) });
            }
            sum
        }
        op::MONITOR_TICK => tasks::monitor_tick(arg),
        op::LOG_TAKE => tasks::log_take(arg),
        op::QOS_TICK => tasks::qos_tick(arg),
        op::HOSTILE => tasks::set_hostile(arg),
        op::BAD_BULK => {
            // A Health message whose count its length does not carry.
            let r = tasks::monitor_tick(arg);
            // SAFETY: the out-window is guest RAM the VMM reads after the reply.
            unsafe { write_volatile((proto::BULK_OUT_ADDR + 16) as *mut u32, 0xffff) };
            r
        }
        op::BAD_MMIO => {
            // SAFETY: deliberately touches an address with no device.
            unsafe { read_volatile(proto::UNMAPPED_MMIO as *const u32) as u64 }
        }
        op::BAD_DESCRIPTOR => {
            send(&counters(proto::KIND_RESPONSE, opcode, id, 0), Some(0xffff_ffff_f000));
            return;
        }
        op::BAD_WIDTH => {
            // SAFETY: deliberately the wrong width for the device window.
            unsafe { read_volatile(proto::VIRTIO_MMIO_BASE as *const u64) }
        }
        op::TRIPLE_FAULT => {
            // No IDT: the #UD escalates to a triple fault (a shutdown exit).
            // SAFETY: deliberate.
            unsafe { asm!("ud2", options(nomem, nostack)) };
            0
        }
        op::SHUTDOWN => {
            send(&counters(proto::KIND_RESPONSE, opcode, id, 0), None);
            outb(proto::EXIT_PORT, 0);
            return;
        }
        _ => u64::MAX,
    };
    send(&counters(proto::KIND_RESPONSE, opcode, id, value), None);
}

extern "C" fn agent_main() -> ! {
    virtio_init();
    serial_write(proto::BANNER);
    serial_write("\n");
    loop {
        if let Some(req) = poll_request() {
            handle(req);
            continue;
        }
        // SAFETY: single-threaded guest.
        let auto = unsafe { (*addr_of!(STATE)).auto_units };
        if auto > 0 {
            step(auto);
        } else {
            outb(proto::IDLE_PORT, 0);
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail("panic")
}

// The freestanding link has no libc: provide the few memory routines the
// compiler may call. `rep movsb/stosb` keeps them from being lowered back
// into calls to themselves.

/// # Safety
/// Standard `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack));
    dst
}

/// # Safety
/// Standard `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        return memcpy(dst, src, n);
    }
    asm!(
        "std", "rep movsb", "cld",
        inout("rcx") n => _,
        inout("rdi") dst.add(n - 1) => _,
        inout("rsi") src.add(n - 1) => _,
        options(nostack)
    );
    dst
}

/// # Safety
/// Standard `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, val: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") val as u8, options(nostack));
    dst
}

/// # Safety
/// Standard `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (read_volatile(a.add(i)), read_volatile(b.add(i)));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
