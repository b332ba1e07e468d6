//! Parking: `zc_park`, a sock_ops program on the relay's cgroup, takes a
//! relay socket out of `RELAY` once the verdict has asked for it (its
//! destination's reader lags), so what arrives waits in the socket's own
//! receive queue and TCP flow control stops the sender, with no byte
//! leaving the kernel. User space puts the socket back once the reader
//! has caught up, and the verdict takes the queue from there, in order.
//!
//! User space cannot take a socket out itself: a map delete does not
//! take the socket's lock, and an skb the verdict loop had already taken
//! off the queue then found no program and was dropped. This program runs
//! with the socket locked (TCP calls it as the socket builds a segment),
//! so no verdict run of the socket is under way on another CPU. One may
//! be under way on this CPU (a redirect's ACK is sent from inside the
//! loop), so it parks only when the receive queue is empty: that loop then
//! ends with the skb in hand, whose program already ran.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG},
    cty::c_void,
    helpers::{
        bpf_get_netns_cookie, bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_map_delete_elem},
    },
    macros::{map, sock_ops},
    maps::{Array, HashMap},
    programs::SockOpsContext,
};
use zc_common::{MAX_SOCKETS, PARK_ASKED, PARK_TO_READ, PARKED, Peer, SockKey};

use crate::{
    maps::{NO_PREALLOC, PEERS},
    sock::key_of,
    verdict::{BY_COOKIE, FLOW, FORWARDED, RELAY, report},
};

/// Per relay socket: [PARK_ASKED] once the verdict asked for a park,
/// [PARK_TO_READ] once user space asked for one to read the socket
/// itself (the adaptive path's small skbs), [PARKED] once the socket is
/// out of `RELAY`. User space removes the entry when it puts the socket
/// back.
#[map]
static PARK: HashMap<SockKey, u64> = HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// The relay's ends, set by user space: a listening port (key with only
/// `family` and `local_port`) for the sockets it accepts, and its
/// upstream (only `family`, `remote_ip` and `remote_port`) for those it
/// connects. Only these sockets ask TCP for the per-segment call, so the
/// other sockets of the cgroup pay nothing.
#[map]
static PARK_ENDS: HashMap<SockKey, u8> = HashMap::with_max_entries(64, 0);

/// [0]: offset of `sock.sk_receive_queue.qlen` (from BTF; 0: unknown,
/// and nothing is parked).
#[map]
static PARK_CONFIG: Array<u64> = Array::with_max_entries(1, 0);

// include/uapi/linux/bpf.h
const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: u32 = 5;

/// The verdict asks for a park of `key`'s socket, and tells user space
/// (its report, if armed), which will put the socket back.
#[inline(always)]
pub(crate) fn ask(key: &SockKey, peer: Option<*mut Peer>) {
    // SAFETY: the value is only read.
    if unsafe { PARK.get(key) }.is_some() {
        return;
    }
    if PARK
        .insert(key, &PARK_ASKED, u64::from(BPF_NOEXIST))
        .is_ok()
        && let Some(p) = peer
    {
        report(key, p);
    }
}

/// Whether an established socket is one of the relay's (`PARK_ENDS`).
#[inline(always)]
fn relay_end(key: &SockKey, active: bool) -> bool {
    let mut end = SockKey {
        netns: 0,
        family: key.family,
        local_port: 0,
        remote_port: 0,
        local_ip: [0; 4],
        remote_ip: [0; 4],
        pad: 0,
    };
    if active {
        end.remote_port = key.remote_port;
        end.remote_ip = key.remote_ip;
    } else {
        end.local_port = key.local_port;
    }
    // SAFETY: the value is only read.
    unsafe { PARK_ENDS.get(&end) }.is_some()
}

#[sock_ops]
pub fn zc_park(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == SOCK_OPS_ACTIVE_ESTABLISHED || op == SOCK_OPS_PASSIVE_ESTABLISHED {
        // SAFETY: sock_ops programs may ask for their socket's namespace.
        let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut _) };
        let key = key_of!(ctx.ops, netns);
        if relay_end(&key, op == SOCK_OPS_ACTIVE_ESTABLISHED) {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        return 1;
    }
    if op == BPF_SOCK_OPS_HDR_OPT_LEN_CB {
        park(&ctx);
    }
    1
}

#[inline(always)]
fn park(ctx: &SockOpsContext) {
    // SAFETY: sock_ops programs may ask for their socket's cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    // SAFETY: copied out at once.
    let Some(key) = (unsafe { BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let Some(state) = PARK.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: a live map element; user space only removes it.
    let to_read = match unsafe { *state } {
        PARK_ASKED => false,
        PARK_TO_READ => true,
        _ => return,
    };
    // Held, or forwarded by user space (which clears the gap first): a
    // park now would take bytes from under the forwarder. A park user
    // space asked for to read the socket needs no gap.
    // SAFETY: copied out at once.
    match unsafe { PEERS.get(&key) } {
        Some(p) if p.hold == 0 && (to_read || p.park_gap != 0) => {}
        _ => return,
    }
    // SAFETY: values copied out at once.
    let passed = unsafe { FLOW.get(&key) }.map_or(0, |f| f.passed);
    // SAFETY: as above.
    let forwarded = unsafe { FORWARDED.get(&key) }.copied().unwrap_or(0);
    if passed != forwarded {
        return;
    }
    let at = PARK_CONFIG.get(0).copied().unwrap_or(0);
    if at == 0 {
        return;
    }
    // SAFETY: the socket's address is copied out through a probe read,
    // then the queue's length read from it.
    let qlen = unsafe {
        let slot = [core::ptr::read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk) as u64];
        match bpf_probe_read_kernel(slot.as_ptr()) {
            Ok(addr) if addr != 0 => bpf_probe_read_kernel((addr + at) as *const u32).ok(),
            _ => None,
        }
    };
    if qlen != Some(0) {
        return;
    }
    // SAFETY: the helper takes the map and a key on this stack.
    let gone = unsafe {
        bpf_map_delete_elem(
            &raw const RELAY as *mut c_void,
            &key as *const SockKey as *const c_void,
        )
    };
    if gone == 0 {
        // SAFETY: as above.
        unsafe { *state = PARKED };
    }
}
