use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST, sk_action},
    cty::c_void,
    helpers::{
        bpf_get_socket_cookie, bpf_probe_read_kernel,
        generated::{bpf_map_lookup_elem, bpf_sk_release},
    },
    macros::{classifier, map, sk_msg, sock_ops, stream_parser, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::debug;
use zc_common::{
    AF_INET, AF_INET6, Counters, EVENTS_BYTES, Flow, MAX_SOCKETS, PEER_LOCAL, PEER_RELAY, Peer,
    Recorded, SockKey, remote_port_from_ctx,
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

/// Paired sockets of another process, to the key of their peer: their
/// FIN waits for the peer's queue (see `zc_fin_hold`).
#[map]
static GUARDED: HashMap<SockKey, SockKey> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Set by the agent from the kernel's BTF, so no layout is compiled in:
/// [HOLD_USER_DATA] the offset of `sk_user_data` in `struct sock`,
/// [HOLD_QLEN] of `ingress_skb.qlen` in `struct sk_psock`.
#[map]
static HOLD_CONFIG: Array<u64> = Array::with_max_entries(2, 0);

/// Interfaces the FIN hold is attached to: ifindex -> the length of their
/// link-layer header.
#[map]
static HOLD_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// [HOLD_HELD] bare FINs dropped to wait, [HOLD_STRIPPED] FINs taken off
/// data segments.
#[map]
static HOLD_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// The agent's short-circuit: [SC_ON] non-zero when on; [SC_WRITE_SEQ],
/// [SC_COPIED_SEQ] the offsets of those members of `struct tcp_sock`
/// (from BTF).
#[map]
static SC_CONFIG: Array<u64> = Array::with_max_entries(3, 0);

/// Kernel addresses of short-circuited sockets (`struct sock`), for the
/// probe reads of `caught_up`. Removed when the socket closes.
#[map]
static SC_ADDRS: HashMap<SockKey, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// What the short-circuit carried: [SC_BYTES], [SC_MSGS], and
/// [SC_CONNECTIONS] short-circuited so far.
#[map]
static SC_TOTALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Offsets from the start of an skb, set by user space from BTF (0 leaves
/// the member unread): [SKB_STRP_OFFSET] of `strp_msg.offset` and
/// [SKB_TCP_SEQ] of `tcp_skb_cb.seq`, both inside its control buffer.
#[map]
static SKB_CONFIG: Array<u64> = Array::with_max_entries(2, 0);
const SKB_STRP_OFFSET: u32 = 0;
const SKB_TCP_SEQ: u32 = 1;

/// Established TCP sockets in the agent's cgroup, by 4-tuple, with their
/// cookie (so the agent can tell the socket it finds in a process is the
/// one that was recorded) and which side opened the connection.
#[map]
static RECORDED: HashMap<SockKey, Recorded> = HashMap::with_max_entries(MAX_SOCKETS, 0);

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
fn check_limit(key: &SockKey, peer: *mut Peer, sent: u64, msgs: u64) {
    // SAFETY: `peer` points at the live map element looked up by the
    // caller; a racing user-space update replaces the whole element, and
    // a write to the old one is lost harmlessly.
    unsafe {
        if sent > (*peer).limit || msgs > (*peer).msg_limit {
            report(key, peer);
        }
    }
}

/// Sends `key` to user space if its report is armed, and disarms it.
#[inline(always)]
fn report(key: &SockKey, peer: *mut Peer) {
    // SAFETY: as in `check_limit`.
    unsafe {
        if (*peer).armed != 0 {
            (*peer).armed = 0;
            let _ = EVENTS.output::<SockKey>(key, 0);
        }
    }
}

/// Bytes arriving on a paired relay socket leave through its peer.
#[stream_verdict]
pub fn zc_verdict(ctx: SkBuffContext) -> u32 {
    verdict(&ctx, false, 0)
}

/// The verdict for `FOREIGN`, whose sockets have a stream parser: there a
/// message starts `strp_offset` bytes into its skb.
#[stream_verdict]
pub fn zc_verdict_parsed(ctx: SkBuffContext) -> u32 {
    verdict(&ctx, true, strp_offset(&ctx))
}

/// Where the stream parser's message starts in the skb: past the bytes an
/// owner had already read when the socket was paired (0 otherwise). The
/// offset of `strp_msg.offset` from the skb comes from BTF (STRP_CONFIG).
#[inline(always)]
fn strp_offset(ctx: &SkBuffContext) -> u32 {
    skb_member(ctx, SKB_STRP_OFFSET).map_or(0, |off| off.min(ctx.len()))
}

/// A `u32` member of the skb behind `ctx`, at the offset user space found
/// in BTF (`SKB_CONFIG[which]`); `None` when unknown or unreadable.
#[inline(always)]
fn skb_member(ctx: &SkBuffContext, which: u32) -> Option<u32> {
    let at = SKB_CONFIG.get(which).copied().unwrap_or(0);
    if at == 0 {
        return None;
    }
    // SAFETY: the context's address is copied out through a probe read
    // (see `sock_addr`), then the member read from it.
    unsafe {
        let slot = [ctx.skb.skb as u64];
        match bpf_probe_read_kernel(slot.as_ptr()) {
            Ok(addr) if addr != 0 => bpf_probe_read_kernel((addr + at) as *const u32).ok(),
            _ => None,
        }
    }
}

/// The most `bpf_skb_adjust_room` removes from an sk_skb in one call
/// (net/core/filter.c, `sk_skb_adjust_room`: more is -EFAULT).
const ADJUST_ROOM_MAX: u32 = 0xfff;

/// Cuts off the front of a retransmitted skb what the verdict already
/// handled, and returns how many bytes are left (`None`: nothing new).
///
/// TCP queues a segment that starts before `rcv_nxt` whole, old bytes
/// included (tcp_data_queue, "partial packet"); `tcp_recvmsg` skips them
/// by sequence number, but `tcp_read_skb`, which feeds this verdict,
/// hands over the whole skb. Redirected or passed as it is, the old bytes
/// reach the peer twice: seen on 6.18 as one full skb delivered twice at
/// the end of a held stream (a spurious retransmission carrying old data
/// and the FIN), reproduced with a crafted segment. So the verdict keeps
/// its own cursor, the sequence number after the last byte it handled.
#[inline(always)]
fn skip_handled(ctx: &SkBuffContext, flow: *mut Flow, len: u32) -> Option<u32> {
    let Some(seq) = skb_member(ctx, SKB_TCP_SEQ) else {
        return Some(len);
    };
    // SAFETY: see FLOW; one writer per key at a time.
    let (known, cursor) = unsafe { ((*flow).seq_known != 0, (*flow).next_seq) };
    let end = seq.wrapping_add(len);
    // Sequence numbers wrap: compare as a signed distance (RFC 1982).
    let old = cursor.wrapping_sub(seq) as i32;
    if !known || old <= 0 {
        // SAFETY: as above.
        unsafe {
            (*flow).next_seq = end;
            (*flow).seq_known = 1;
        }
        return Some(len);
    }
    let old = old as u32;
    // SAFETY: as above.
    unsafe {
        if old >= len {
            // Only the FIN on it is new (TCP drops segments with nothing
            // new before they are queued).
            (*flow).trimmed += u64::from(len);
            return None;
        }
        (*flow).trimmed += u64::from(old);
        (*flow).next_seq = end;
    }
    // A retransmission is at most one GSO skb (64 KiB): 17 steps suffice.
    let mut left = old;
    for _ in 0..17 {
        if left == 0 {
            break;
        }
        let step = left.min(ADJUST_ROOM_MAX);
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
    }
    if left != 0 {
        debug!(
            ctx,
            "zc_verdict: could not cut {} old bytes off an skb", left
        );
    }
    Some(ctx.len())
}

#[inline(always)]
fn verdict(ctx: &SkBuffContext, parsed: bool, offset: u32) -> u32 {
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
            ctx,
            "zc_verdict: unpaired socket :{}, passing", key.local_port
        );
        return sk_action::SK_PASS;
    };
    let mut len = ctx.len() - offset;
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
    // With a stream parser the kernel reads by sequence number and hands
    // over no old bytes (`offset` marks bytes the owner read before).
    if !parsed {
        match skip_handled(ctx, flow, len) {
            Some(n) => len = n,
            None => return sk_action::SK_DROP,
        }
    }
    // SAFETY: the value is only read.
    let forwarded = unsafe { FORWARDED.get(&key) }.copied().unwrap_or(0);
    // SAFETY: see FLOW; one writer per key at a time.
    unsafe {
        // Held, or user space still has passed bytes to forward: keep
        // passing, so that every byte reaches the peer in arrival order.
        // Past the cap, the destination's reader lags by a whole window:
        // pass too, so the bytes count against this socket's receive
        // buffer and TCP flow control stops the sender, and tell user
        // space, which forwards them once the reader caught up.
        let capped = peer.cap != 0 && (*flow).sent + u64::from(len) > peer.cap;
        if peer.hold != 0 || (*flow).passed != forwarded || capped {
            (*flow).passed += u64::from(len);
            (*flow).passed_msgs += 1;
            if capped
                && peer.hold == 0
                && let Some(p) = peer_ptr
            {
                report(&key, p);
            }
            return sk_action::SK_PASS;
        }
    }
    let mut dst = peer.key;
    let verdict = TARGETS.redirect_skb(ctx, &mut dst, 0) as u32;
    let ok = verdict == sk_action::SK_PASS;
    count(&key, len, ok);
    if ok {
        // SAFETY: as above.
        let (sent, msgs) = unsafe {
            (*flow).sent += u64::from(len);
            (*flow).sent_msgs += 1;
            ((*flow).sent, (*flow).sent_msgs)
        };
        if let Some(p) = peer_ptr {
            check_limit(&key, p, sent, msgs);
        }
    } else {
        debug!(
            ctx,
            "zc_verdict: peer of :{} is gone, {} bytes dropped", key.local_port, len
        );
    }
    verdict
}

// The FIN hold (see `zc_fin_hold`).
const HOLD_USER_DATA: u32 = 0;
const HOLD_QLEN: u32 = 1;
const HOLD_HELD: u32 = 0;
const HOLD_STRIPPED: u32 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// `sk_user_data` carries flag bits below the psock pointer.
const SK_USER_DATA_FLAGS: u64 = 7;
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

/// An unmodified proxy that sees EOF on one paired socket shuts down the
/// other at once, while bytes redirected before that EOF may still wait in
/// the peer's psock queue (the kernel sends them from a worker): the
/// proxy's FIN would overtake them and the kernel would drop them. So on
/// ingress, before TCP sees it, a FIN for a paired socket waits until its
/// peer's queue is empty: a bare FIN is dropped (the sender retransmits
/// it), and a FIN riding on data is taken off that segment, so its bytes
/// go through the redirect first and the FIN comes back alone.
#[classifier]
pub fn zc_fin_hold(ctx: TcContext) -> i32 {
    let Some((key, flags, payload, flags_at)) = tcp_segment(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    if flags & TCP_FIN == 0 || flags & TCP_RST != 0 {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: copied out at once.
    let Some(peer) = (unsafe { GUARDED.get(&key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    if payload {
        // The word holding the flags starts one byte before them.
        let off = flags_at - 1;
        let Ok(old) = ctx.load::<u16>(off) else {
            return TC_ACT_UNSPEC;
        };
        let new = u16::from_be(old) & !u16::from(TCP_FIN);
        let new = new.to_be();
        // The TCP checksum sits 16 bytes into the header, 12 past the word.
        if ctx.store(off, &new, 0).is_err()
            || ctx
                .l4_csum_replace(off + 4, u64::from(old), u64::from(new), 2)
                .is_err()
        {
            return TC_ACT_SHOT;
        }
        bump(HOLD_STRIPPED);
        return TC_ACT_UNSPEC;
    }
    if peer_queue_len(&peer) > 0 {
        bump(HOLD_HELD);
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

/// The socket key a TCP segment is addressed to, its flags, whether it
/// carries bytes, and the offset of its flags byte from `skb->data`.
#[inline(always)]
fn tcp_segment(ctx: &TcContext) -> Option<(SockKey, u8, bool, usize)> {
    // tc sees the frame from its link-layer header, whose length depends
    // on the device; the agent tells it per interface.
    // SAFETY: the context is valid for this run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: copied out at once.
    let l2 = *unsafe { HOLD_IFACES.get(&ifindex) }? as usize;
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let mut key = SockKey::default();
    let (tcp_at, ip_payload) = if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(l2).ok()?;
        if ctx.load::<u8>(l2 + 9).ok()? != IPPROTO_TCP {
            return None;
        }
        let ihl = usize::from(vihl & 0xf) * 4;
        let total = usize::from(u16::from_be(ctx.load::<u16>(l2 + 2).ok()?));
        key.family = AF_INET;
        key.remote_ip[0] = ctx.load(l2 + 12).ok()?;
        key.local_ip[0] = ctx.load(l2 + 16).ok()?;
        // A GSO packet past 64 KiB says 0: count it as carrying bytes.
        (
            l2 + ihl,
            if total == 0 {
                usize::MAX
            } else {
                total.saturating_sub(ihl)
            },
        )
    } else if proto == ETH_P_IPV6 {
        if ctx.load::<u8>(l2 + 6).ok()? != IPPROTO_TCP {
            return None;
        }
        let plen = usize::from(u16::from_be(ctx.load::<u16>(l2 + 4).ok()?));
        key.family = AF_INET6;
        for i in 0..4 {
            key.remote_ip[i] = ctx.load(l2 + 8 + 4 * i).ok()?;
            key.local_ip[i] = ctx.load(l2 + 24 + 4 * i).ok()?;
        }
        (l2 + 40, if plen == 0 { usize::MAX } else { plen })
    } else {
        return None;
    };
    key.remote_port = u32::from(u16::from_be(ctx.load::<u16>(tcp_at).ok()?));
    key.local_port = u32::from(u16::from_be(ctx.load::<u16>(tcp_at + 2).ok()?));
    let doff = usize::from(ctx.load::<u8>(tcp_at + 12).ok()? >> 4) * 4;
    let flags: u8 = ctx.load(tcp_at + 13).ok()?;
    Some((key, flags, ip_payload > doff, tcp_at + 13))
}

/// How many skbs wait in the psock queue of the socket named `key` for
/// the kernel's worker to send them (0 when it is not in `FOREIGN`).
#[inline(always)]
fn peer_queue_len(key: &SockKey) -> u32 {
    let cfg = |i| HOLD_CONFIG.get(i).copied().unwrap_or(0);
    let (user_data_at, qlen_at) = (cfg(HOLD_USER_DATA), cfg(HOLD_QLEN));
    if user_data_at == 0 || qlen_at == 0 {
        return 0;
    }
    let Some(addr) = sock_addr(&raw const FOREIGN as *mut c_void, key) else {
        return 0;
    };
    // SAFETY: probe reads of kernel memory; a bad address yields an error.
    unsafe {
        let Ok(psock) = bpf_probe_read_kernel((addr + user_data_at) as *const u64) else {
            return 0;
        };
        let psock = psock & !SK_USER_DATA_FLAGS;
        if psock == 0 {
            return 0;
        }
        bpf_probe_read_kernel((psock + qlen_at) as *const u32).unwrap_or(0)
    }
}

/// The kernel address of the socket stored under `key` in the sockhash
/// `map`, to follow with probe reads at offsets taken from BTF.
#[inline(always)]
fn sock_addr(map: *mut c_void, key: &SockKey) -> Option<u64> {
    // SAFETY: a sockhash lookup yields a referenced socket or null; it is
    // released at once. Its address is copied out through a probe read
    // (the verifier forbids arithmetic on a socket pointer, and lets a
    // privileged program read its own stack this way).
    unsafe {
        let sk = bpf_map_lookup_elem(map, key as *const SockKey as *const c_void);
        if sk.is_null() {
            return None;
        }
        let slot = [sk as u64];
        let addr = bpf_probe_read_kernel(slot.as_ptr()).unwrap_or(0);
        bpf_sk_release(sk);
        (addr != 0).then_some(addr)
    }
}

#[inline(always)]
fn bump(i: u32) {
    if let Some(c) = HOLD_STATS.get_ptr_mut(i) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

// include/uapi/linux/bpf.h
const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: u32 = 5;
const SOCK_OPS_STATE: u32 = 10;
const SOCK_OPS_STATE_CB_FLAG: u32 = 1 << 2;
const TCP_CLOSE: u32 = 7;

/// Records each socket of the cgroup as it becomes established, and
/// forgets it when it closes (the state callback is asked for per socket).
/// With the short-circuit on, both ends of a same-host connection join
/// `LOCAL`: the client when it is established (its callback runs before
/// the server's, which needs the client's ACK), the server then, with the
/// `PEERS` entries that make `zc_msg` redirect.
#[sock_ops]
pub fn zc_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == SOCK_OPS_ACTIVE_ESTABLISHED || op == SOCK_OPS_PASSIVE_ESTABLISHED {
        let key = key_of!(ctx.ops);
        // SAFETY: sock_ops programs may ask for their socket's cookie.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
        let rec = Recorded {
            cookie,
            active: u64::from(op == SOCK_OPS_ACTIVE_ESTABLISHED),
        };
        let _ = RECORDED.insert(&key, &rec, 0);
        let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG) as i32);
        if short_circuit_on() && same_host(&key) {
            short_circuit(&ctx, key, op == SOCK_OPS_PASSIVE_ESTABLISHED);
        }
    } else if op == SOCK_OPS_STATE && ctx.arg(1) == TCP_CLOSE {
        let key = key_of!(ctx.ops);
        let _ = RECORDED.remove(&key);
        let _ = SC_ADDRS.remove(&key);
        // The kernel drops a closing socket from `LOCAL` by itself.
        if peer_of(&key, PEER_LOCAL).is_some() {
            let _ = PEERS.remove(&key);
            let _ = COUNTERS.remove(&key);
        }
    }
    1
}

const SC_ON: u32 = 0;
const SC_WRITE_SEQ: u32 = 1;
const SC_COPIED_SEQ: u32 = 2;
const SC_BYTES: u32 = 0;
const SC_MSGS: u32 = 1;
const SC_CONNECTIONS: u32 = 2;

#[inline(always)]
fn short_circuit_on() -> bool {
    SC_CONFIG.get(SC_ON).copied().unwrap_or(0) != 0
}

/// A connection to this host's own address, or over loopback.
#[inline(always)]
fn same_host(k: &SockKey) -> bool {
    let loopback = if k.family == AF_INET {
        // The first octet of a network-order address is its low byte.
        k.remote_ip[0] & 0xff == 127
    } else {
        k.remote_ip == [0, 0, 0, u32::from_be(1)]
    };
    loopback || k.remote_ip == k.local_ip
}

#[inline(always)]
fn short_circuit(ctx: &SockOpsContext, mut key: SockKey, server: bool) {
    // SAFETY: the context is this socket's, as the helper requires.
    if LOCAL
        .update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    // SAFETY: the context is valid for this run; its socket pointer is
    // copied out through a probe read (see `sock_addr`).
    let addr = unsafe {
        let slot = [read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk) as u64];
        bpf_probe_read_kernel(slot.as_ptr()).unwrap_or(0)
    };
    if addr == 0 || SC_ADDRS.insert(&key, &addr, 0).is_err() {
        return;
    }
    if !server {
        return;
    }
    let client = key.reversed();
    // The client must be in `LOCAL` already, or a redirect to it would
    // fail and drop what the server sends.
    // SAFETY: only checked for presence.
    if unsafe { SC_ADDRS.get(&client) }.is_none() {
        return;
    }
    let peer = |k| Peer {
        key: k,
        kind: PEER_LOCAL,
        ..Peer::default()
    };
    for (k, p) in [(&key, client), (&client, key)] {
        let _ = COUNTERS.insert(k, &Counters::default(), 0);
        let _ = PEERS.insert(k, &peer(p), 0);
    }
    sc_add(SC_CONNECTIONS, 1);
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

/// Every skb is one message: the verdict sees what TCP delivered, as it
/// does without a parser. A message runs to the end of its skb from where
/// it starts, which is past any bytes the owner read before pairing.
#[stream_parser]
pub fn zc_parser(ctx: SkBuffContext) -> u32 {
    ctx.len() - strp_offset(&ctx)
}

/// What a short-circuited local socket sends lands in its peer's receive
/// queue, skipping the loopback TCP path.
#[sk_msg]
pub fn zc_msg(ctx: SkMsgContext) -> u32 {
    let key = key_of!(ctx.msg);
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
