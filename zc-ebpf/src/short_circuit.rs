//! The same-host short-circuit: `zc_msg`, an sk_msg program on `LOCAL`,
//! puts what one end of a local TCP connection sends straight into the
//! other end's receive queue. `zc_sockops` (see `recording`) enrols both
//! ends as they are established.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_probe_read_kernel},
    macros::{map, sk_msg},
    maps::{Array, HashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use zc_common::{AF_INET, AF_INET6, Counters, MAX_SOCKETS, PEER_LOCAL, Peer, SockKey};

use crate::{
    maps::{COUNTERS, NO_PREALLOC, PEERS, count},
    sock::key_of,
};

#[map]
static LOCAL: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// The agent's short-circuit: [SC_ON] non-zero when on; [SC_WRITE_SEQ],
/// [SC_COPIED_SEQ] the offsets of those members of `struct tcp_sock`
/// (from BTF).
#[map]
static SC_CONFIG: Array<u64> = Array::with_max_entries(3, 0);

/// Kernel addresses of short-circuited sockets (`struct sock`), for the
/// probe reads of `caught_up`. Removed when the socket closes.
#[map]
static SC_ADDRS: HashMap<SockKey, u64> = HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// Listening sockets of the cgroup, by family, address and port (the rest
/// of the key zero): a client is enrolled only when its server's listener
/// is here, so its peer will be enrolled too (see `enrol`). Removed when
/// the listener closes.
#[map]
static SC_LISTENERS: HashMap<SockKey, u8> = HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// What the short-circuit carried: [SC_BYTES], [SC_MSGS], and
/// [SC_CONNECTIONS] short-circuited so far.
#[map]
static SC_TOTALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

const SC_ON: u32 = 0;
const SC_WRITE_SEQ: u32 = 1;
const SC_COPIED_SEQ: u32 = 2;
const SC_BYTES: u32 = 0;
const SC_MSGS: u32 = 1;
const SC_CONNECTIONS: u32 = 2;

#[inline(always)]
fn peer_of(key: &SockKey, kind: u32) -> Option<Peer> {
    // SAFETY: the value is only read, and copied out at once.
    let peer = unsafe { PEERS.get(key) }?;
    (peer.kind == kind).then_some(*peer)
}

#[inline(always)]
pub(crate) fn on() -> bool {
    SC_CONFIG.get(SC_ON).copied().unwrap_or(0) != 0
}

/// A connection to this host's own address, or over loopback.
#[inline(always)]
pub(crate) fn same_host(k: &SockKey) -> bool {
    let loopback = if k.family == AF_INET {
        // The first octet of a network-order address is its low byte.
        k.remote_ip[0] & 0xff == 127
    } else {
        k.remote_ip == [0, 0, 0, u32::from_be(1)]
    };
    loopback || k.remote_ip == k.local_ip
}

/// Notes a listening socket of the cgroup (see `SC_LISTENERS`).
#[inline(always)]
pub(crate) fn listening(key: &SockKey) {
    let _ = SC_LISTENERS.insert(
        &listener_key(key.netns, key.family, key.local_ip, key.local_port),
        &1,
        0,
    );
}

#[inline(always)]
fn listener_key(netns: u64, family: u32, ip: [u32; 4], port: u32) -> SockKey {
    SockKey {
        netns,
        family,
        local_port: port,
        remote_port: 0,
        local_ip: ip,
        remote_ip: [0; 4],
        pad: 0,
    }
}

/// Whether the server `client` connected to listens in the cgroup: on its
/// address, on the wildcard of its family, or on the IPv6 wildcard (a
/// dual-stack listener takes IPv4 connections too).
#[inline(always)]
fn server_in_cgroup(client: &SockKey) -> bool {
    let port = client.remote_port;
    let known = |k: SockKey| {
        // SAFETY: only checked for presence.
        unsafe { SC_LISTENERS.get(&k) }.is_some()
    };
    let ns = client.netns;
    known(listener_key(ns, client.family, client.remote_ip, port))
        || known(listener_key(ns, client.family, [0; 4], port))
        || known(listener_key(ns, AF_INET6, [0; 4], port))
}

/// Puts the established socket of `ctx` in `LOCAL` when both ends of its
/// connection are in the cgroup, and for the server's end pairs it with
/// the client's (see `zc_sockops`). A socket alone in a sockhash breaks
/// splice(2) and FIONREAD for its owner, so neither end joins unless the
/// other will: the client (whose callback runs first, and which only its
/// own callback can insert) when its server listens in the cgroup, the
/// server when its client is enrolled already.
#[inline(always)]
pub(crate) fn enrol(ctx: &SockOpsContext, mut key: SockKey, server: bool) {
    let client = key.reversed();
    // SAFETY: only checked for presence.
    if server && unsafe { SC_ADDRS.get(&client) }.is_none() {
        return;
    }
    if !server && !server_in_cgroup(&key) {
        return;
    }
    // SAFETY: the context is valid for this run; its socket pointer is
    // copied out through a probe read (see `sock::sock_addr`).
    let addr = unsafe {
        let slot = [read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk) as u64];
        bpf_probe_read_kernel(slot.as_ptr()).unwrap_or(0)
    };
    if addr == 0 {
        return;
    }
    // SAFETY: the context is this socket's, as the helper requires.
    if LOCAL
        .update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST))
        .is_err()
        || SC_ADDRS.insert(&key, &addr, 0).is_err()
    {
        return;
    }
    if !server {
        return;
    }
    // One value on the stack, its key swapped between the two inserts:
    // sockops has little stack to spare.
    let mut peer = Peer {
        key: client,
        kind: PEER_LOCAL,
        ..Peer::default()
    };
    let _ = COUNTERS.insert(&key, &Counters::default(), 0);
    let _ = PEERS.insert(&key, &peer, 0);
    peer.key = key;
    let _ = COUNTERS.insert(&client, &Counters::default(), 0);
    let _ = PEERS.insert(&client, &peer, 0);
    sc_add(SC_CONNECTIONS, 1);
}

/// Forgets a closing socket (see `zc_sockops`).
#[inline(always)]
pub(crate) fn forget(key: &SockKey) {
    let _ = SC_ADDRS.remove(key);
    // A listener's key has no remote end; no other key matches one.
    let _ = SC_LISTENERS.remove(key);
    // The kernel drops a closing socket from `LOCAL` by itself.
    if peer_of(key, PEER_LOCAL).is_some() {
        let _ = PEERS.remove(key);
        let _ = COUNTERS.remove(key);
    }
}

#[inline(always)]
fn sc_add(i: u32, n: u64) {
    if let Some(c) = SC_TOTALS.get_ptr_mut(i) {
        // SAFETY: per-CPU slot.
        unsafe { *c += n };
    }
}

/// Whether the peer has read every byte this socket sent through TCP:
/// bytes sent before the pair existed arrive in the peer's TCP receive
/// queue, which its reader drains only after the redirected ones, so
/// redirecting earlier would reorder the stream. A pair made by user space
/// (no offsets configured) is taken as caught up: it pairs idle sockets.
#[inline(always)]
fn caught_up(key: &SockKey, peer: &SockKey) -> bool {
    let cfg = |i| SC_CONFIG.get(i).copied().unwrap_or(0);
    let (write_at, copied_at) = (cfg(SC_WRITE_SEQ), cfg(SC_COPIED_SEQ));
    if write_at == 0 || copied_at == 0 {
        return true;
    }
    // sk_msg programs may not look sockets up in a sockhash (they could
    // not release them), so the addresses come from `SC_ADDRS`.
    // SAFETY: copied out at once.
    let (Some(&me), Some(&them)) = (unsafe { SC_ADDRS.get(key) }, unsafe { SC_ADDRS.get(peer) })
    else {
        return false;
    };
    // SAFETY: probe reads of kernel memory; a bad address yields an error.
    unsafe {
        match (
            bpf_probe_read_kernel((me + write_at) as *const u32),
            bpf_probe_read_kernel((them + copied_at) as *const u32),
        ) {
            (Ok(w), Ok(c)) => w == c,
            _ => false,
        }
    }
}

/// What a short-circuited local socket sends lands in its peer's receive
/// queue, skipping the loopback TCP path.
#[sk_msg]
pub fn zc_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: sk_msg programs may ask for their socket's namespace.
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg as *mut _) };
    let key = key_of!(ctx.msg, netns);
    let Some(peer) = peer_of(&key, PEER_LOCAL) else {
        return sk_action::SK_PASS;
    };
    if !caught_up(&key, &peer.key) {
        // Through TCP until the peer has read what TCP carried so far.
        return sk_action::SK_PASS;
    }
    let len = ctx.size();
    let mut dst = peer.key;
    let verdict = LOCAL.redirect_msg(&ctx, &mut dst, u64::from(BPF_F_INGRESS)) as u32;
    let ok = verdict == sk_action::SK_PASS;
    count(&key, len, ok);
    if ok {
        sc_add(SC_BYTES, u64::from(len));
        sc_add(SC_MSGS, 1);
    }
    if !ok {
        debug!(&ctx, "zc_msg: peer of :{} is gone", key.local_port);
    }
    verdict
}
