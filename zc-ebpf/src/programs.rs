use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action},
    helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::{lsm, map, sk_msg, sock_ops, stream_parser, stream_verdict},
    maps::{Array, HashMap, PerCpuHashMap, RingBuf, SockHash},
    programs::{LsmContext, SkBuffContext, SkMsgContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use zc_common::{
    AF_INET, Counters, EVENTS_BYTES, Flow, MAX_SOCKETS, PEER_LOCAL, PEER_RELAY, Peer, SockKey,
    remote_port_from_ctx,
};

#[map]
static TARGETS: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static RELAY: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Relay sockets another process owns (the agent's pairs). Besides the
/// verdict, a stream parser is attached here: in parser mode the kernel
/// does not wake the owner's reader after each redirected skb. Without it
/// every redirect wakes a reader blocked in read(2), which then returns
/// EAGAIN, and proxies such as socat treat that as a fatal error.
#[map]
static FOREIGN: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static LOCAL: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static PEERS: HashMap<SockKey, Peer> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// What the verdict did with each relay socket's bytes. Only the verdict
/// writes it, and TCP runs a socket's data-ready hook under that socket's
/// lock, so the plain read-modify-write is never concurrent for one key.
#[map]
static FLOW: HashMap<SockKey, Flow> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Bytes user space has read from a held socket and written to its peer.
/// Only user space writes it.
#[map]
static FORWARDED: HashMap<SockKey, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Keys of sockets whose `Flow::sent` passed their `Peer::limit`.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Cookies (SO_COOKIE) of sockets whose stream end the agent carries:
/// their owner may not shut them down (see `zc_shutdown`).
#[map]
static GUARDED: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Set by the agent: [GUARD_AGENT] its tgid, [GUARD_SK] the offset of
/// `sk` in `struct socket`, [GUARD_COOKIE] of `skc_cookie` in `struct
/// sock_common` (both read from the kernel's BTF, so no layout is
/// compiled in).
#[map]
static GUARD_CONFIG: Array<u64> = Array::with_max_entries(3, 0);

/// Established TCP sockets in the agent's cgroup, by 4-tuple: the value
/// is the socket's cookie, so the agent can tell the socket it finds in a
/// process is the one that was recorded.
#[map]
static RECORDED: HashMap<SockKey, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static COUNTERS: PerCpuHashMap<SockKey, Counters> = PerCpuHashMap::with_max_entries(MAX_SOCKETS, 0);

/// Builds a key from a socket context (`__sk_buff` or `sk_msg_md`, which
/// name these fields alike). Every field is loaded on its own, volatile:
/// the verifier rejects a load through a context pointer the compiler has
/// offset ("dereference of modified ctx ptr"), which copying the IPv6
/// arrays as a whole produces.
macro_rules! key_of {
    ($ctx:expr) => {{
        let c = $ctx;
        // SAFETY: the kernel hands the program a valid context for its run.
        unsafe {
            let family = read_volatile(&raw const (*c).family);
            let mut key = SockKey {
                family,
                local_port: read_volatile(&raw const (*c).local_port),
                remote_port: remote_port_from_ctx(read_volatile(&raw const (*c).remote_port)),
                local_ip: [0; 4],
                remote_ip: [0; 4],
            };
            if family == AF_INET {
                key.local_ip[0] = read_volatile(&raw const (*c).local_ip4);
                key.remote_ip[0] = read_volatile(&raw const (*c).remote_ip4);
            } else {
                key.local_ip[0] = read_volatile(&raw const (*c).local_ip6[0]);
                key.local_ip[1] = read_volatile(&raw const (*c).local_ip6[1]);
                key.local_ip[2] = read_volatile(&raw const (*c).local_ip6[2]);
                key.local_ip[3] = read_volatile(&raw const (*c).local_ip6[3]);
                key.remote_ip[0] = read_volatile(&raw const (*c).remote_ip6[0]);
                key.remote_ip[1] = read_volatile(&raw const (*c).remote_ip6[1]);
                key.remote_ip[2] = read_volatile(&raw const (*c).remote_ip6[2]);
                key.remote_ip[3] = read_volatile(&raw const (*c).remote_ip6[3]);
            }
            key
        }
    }};
}

#[inline(always)]
fn peer_of(key: &SockKey, kind: u32) -> Option<Peer> {
    // SAFETY: the value is only read, and copied out at once.
    let peer = unsafe { PEERS.get(key) }?;
    (peer.kind == kind).then_some(*peer)
}

#[inline(always)]
fn count(key: &SockKey, len: u32, ok: bool) {
    // User space creates the entry when it pairs, so the hot path never
    // allocates.
    if let Some(c) = COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, so no other CPU writes it concurrently.
        unsafe {
            if ok {
                (*c).bytes += u64::from(len);
                (*c).msgs += 1;
            } else {
                (*c).failed += 1;
            }
        }
    }
}

/// Tells user space once when the socket's redirected total passes the
/// armed limit, so it can compare with what the destination has taken:
/// the kernel's redirect queue has no bound of its own.
#[inline(always)]
fn check_limit(key: &SockKey, peer: *mut Peer, sent: u64) {
    // SAFETY: `peer` points at the live map element looked up by the
    // caller; a racing user-space update replaces the whole element, and
    // a write to the old one is lost harmlessly.
    unsafe {
        if (*peer).armed != 0 && sent > (*peer).limit {
            (*peer).armed = 0;
            let _ = EVENTS.output::<SockKey>(key, 0);
        }
    }
}

/// Bytes arriving on a paired relay socket leave through its peer.
#[stream_verdict]
pub fn zc_verdict(ctx: SkBuffContext) -> u32 {
    let key = key_of!(ctx.skb.skb);
    // One lookup serves the whole run: the destination, the hold flag
    // and the limit all live in this entry.
    let peer_ptr = PEERS.get_ptr_mut(&key);
    // SAFETY: the value is copied out at once.
    let Some(peer) = peer_ptr
        .map(|p| unsafe { *p })
        .filter(|p| p.kind == PEER_RELAY)
    else {
        debug!(
            &ctx,
            "zc_verdict: unpaired socket :{}, passing", key.local_port
        );
        return sk_action::SK_PASS;
    };
    let len = ctx.len();
    if len == 0 {
        // A bare FIN. TCP has already recorded the shutdown; redirecting
        // an empty skb makes the peer's psock backlog send 0 bytes, which
        // it treats as a hard error (EPIPE on the peer, transmit stopped;
        // net/core/skmsg.c sk_psock_backlog, seen on 6.18). Nothing to
        // deliver, so drop it; zc carries the FIN itself.
        return sk_action::SK_DROP;
    }
    let Some(flow) = FLOW.get_ptr_mut(&key) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: the value is only read.
    let forwarded = unsafe { FORWARDED.get(&key) }.copied().unwrap_or(0);
    // SAFETY: see FLOW; one writer per key at a time.
    unsafe {
        // Held, or user space still has passed bytes to forward: keep
        // passing, so that every byte reaches the peer in arrival order.
        if peer.hold != 0 || (*flow).passed != forwarded {
            (*flow).passed += u64::from(len);
            return sk_action::SK_PASS;
        }
    }
    let mut dst = peer.key;
    let verdict = TARGETS.redirect_skb(&ctx, &mut dst, 0) as u32;
    let ok = verdict == sk_action::SK_PASS;
    count(&key, len, ok);
    if ok {
        // SAFETY: as above.
        let sent = unsafe {
            (*flow).sent += u64::from(len);
            (*flow).sent
        };
        if let Some(p) = peer_ptr {
            check_limit(&key, p, sent);
        }
    } else {
        debug!(
            &ctx,
            "zc_verdict: peer of :{} is gone, {} bytes dropped", key.local_port, len
        );
    }
    verdict
}

const GUARD_AGENT: u32 = 0;
const GUARD_SK: u32 = 1;
const GUARD_COOKIE: u32 = 2;
const EPERM: i32 = 1;

/// An unmodified proxy that sees EOF on one paired socket shuts down the
/// other at once, while bytes redirected before the EOF may still wait in
/// the kernel's queue for that socket: its FIN would overtake them and
/// they would be lost. So shutdown(2) of a guarded socket is refused to
/// everyone but the agent, which shuts it down itself once every byte has
/// left (a close(2) by the owner stays harmless: the agent holds its own
/// reference).
#[lsm(hook = "socket_shutdown")]
pub fn zc_shutdown(ctx: LsmContext) -> i32 {
    // Another LSM program may already have refused.
    let earlier: i32 = ctx.arg(2);
    if earlier != 0 {
        return earlier;
    }
    let cfg = |i| GUARD_CONFIG.get(i).copied().unwrap_or(0);
    let (agent, sk_off, cookie_off) = (cfg(GUARD_AGENT), cfg(GUARD_SK), cfg(GUARD_COOKIE));
    if agent == 0 || sk_off == 0 || cookie_off == 0 {
        return 0;
    }
    if bpf_get_current_pid_tgid() >> 32 == agent {
        return 0;
    }
    let sock: *const u8 = ctx.arg(0);
    // SAFETY: probe reads of kernel memory; a bad address yields an error.
    let cookie = unsafe {
        let Ok(sk) = bpf_probe_read_kernel(sock.add(sk_off as usize) as *const *const u8) else {
            return 0;
        };
        if sk.is_null() {
            return 0;
        }
        let Ok(c) = bpf_probe_read_kernel(sk.add(cookie_off as usize) as *const u64) else {
            return 0;
        };
        c
    };
    // SAFETY: only checked for presence.
    if cookie != 0 && unsafe { GUARDED.get(&cookie) }.is_some() {
        return -EPERM;
    }
    0
}

// include/uapi/linux/bpf.h
const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: u32 = 5;
const SOCK_OPS_STATE: u32 = 10;
const SOCK_OPS_STATE_CB_FLAG: u32 = 1 << 2;
const TCP_CLOSE: u32 = 7;

/// Records each socket of the cgroup as it becomes established, and
/// forgets it when it closes (the state callback is asked for per socket).
#[sock_ops]
pub fn zc_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == SOCK_OPS_ACTIVE_ESTABLISHED || op == SOCK_OPS_PASSIVE_ESTABLISHED {
        let key = key_of!(ctx.ops);
        // SAFETY: sock_ops programs may ask for their socket's cookie.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
        let _ = RECORDED.insert(&key, &cookie, 0);
        let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if op == SOCK_OPS_STATE && ctx.arg(1) == TCP_CLOSE {
        let key = key_of!(ctx.ops);
        let _ = RECORDED.remove(&key);
    }
    1
}

/// Every skb is one message: the verdict sees what TCP delivered, as it
/// does without a parser.
#[stream_parser]
pub fn zc_parser(ctx: SkBuffContext) -> u32 {
    ctx.len()
}

/// What a short-circuited local socket sends lands in its peer's receive
/// queue, skipping the loopback TCP path.
#[sk_msg]
pub fn zc_msg(ctx: SkMsgContext) -> u32 {
    let key = key_of!(ctx.msg);
    let Some(peer) = peer_of(&key, PEER_LOCAL) else {
        return sk_action::SK_PASS;
    };
    let len = ctx.size();
    let mut dst = peer.key;
    let verdict = LOCAL.redirect_msg(&ctx, &mut dst, u64::from(BPF_F_INGRESS)) as u32;
    let ok = verdict == sk_action::SK_PASS;
    count(&key, len, ok);
    if !ok {
        debug!(&ctx, "zc_msg: peer of :{} is gone", key.local_port);
    }
    verdict
}
