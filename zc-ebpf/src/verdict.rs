//! The relay: `zc_verdict` redirects what arrives on a paired socket to
//! its peer's egress, or passes it to the socket's own receive queue while
//! user space holds the direction (the window's cap, the adaptive path).
//! `zc_verdict_parsed` and `zc_parser` do the same for `FOREIGN`, the
//! sockets of another process.
use aya_ebpf::{
    bindings::sk_action,
    cty::c_void,
    helpers::{bpf_probe_read_kernel, generated::bpf_get_socket_cookie},
    macros::{map, stream_parser, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use zc_common::{ACKED_UNKNOWN, EVENTS_BYTES, Flow, MAX_SOCKETS, PEER_RELAY, Peer, SockKey};

use crate::{
    maps::{NO_PREALLOC, PEERS, count},
    sock::sock_addr,
};

#[map]
static TARGETS: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub(crate) static RELAY: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// What the verdict did with each relay socket's bytes. Only the verdict
/// writes it (and user space, for a socket it parked to read, which no
/// verdict runs for), and TCP runs a socket's data-ready hook under that
/// socket's lock, so the plain read-modify-write is never concurrent for
/// one key.
#[map]
pub(crate) static FLOW: HashMap<SockKey, Flow> =
    HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// Every paired socket's key, by its cookie: the verdict's only way to
/// its key. An sk_skb program cannot ask for its socket's network
/// namespace, which the key holds, and the 4-tuple may not read right
/// either: when a socket's FIN arrives after it has sent its own, TCP
/// closes it (time-wait) and clears its local port before handing the
/// last bytes to the verdict (tcp_data_queue: tcp_fin, then the data-ready
/// hook); looked up by that tuple they went unpaired to the socket's own
/// queue, uncounted, and the relay waited for them forever (seen in the
/// bench's both-ways workload, 1 run in 15 across namespaces).
#[map]
pub(crate) static BY_COOKIE: HashMap<u64, SockKey> =
    HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// Bytes user space has read from a held (or parked) socket and written
/// to its peer. Only user space writes it.
#[map]
pub(crate) static FORWARDED: HashMap<SockKey, u64> =
    HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// Keys of sockets whose `Flow::sent` passed their `Peer::limit`.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Taken off every pair's cap while the host's TCP memory is under
/// pressure (user space sets it, zc-user `pressure.rs`): a byte waiting in
/// a redirect queue is charged to no socket, so TCP's host-wide limit
/// (tcp_mem) cannot see it. With the caps shrunk, every direction is held:
/// TCP stops its sender, and what zc forwards is charged where that limit
/// applies.
#[map]
static CAP_SHRINK: Array<u64> = Array::with_max_entries(1, 0);

/// Offsets from the start of an skb, set by user space from BTF (0 leaves
/// the member unread): [SKB_STRP_OFFSET] of `strp_msg.offset` and
/// [SKB_TCP_SEQ] of `tcp_skb_cb.seq`, both inside its control buffer.
#[map]
static SKB_CONFIG: Array<u64> = Array::with_max_entries(2, 0);
const SKB_STRP_OFFSET: u32 = 0;
const SKB_TCP_SEQ: u32 = 1;

/// The offset of `tcp_sock.bytes_acked`, set by user space from BTF (0:
/// unknown, and the cap stays where user space last put it).
#[map]
static BYTES_ACKED_AT: Array<u64> = Array::with_max_entries(1, 0);

/// Whether redirecting `len` more bytes would take the direction past its
/// cap. User space moves the cap each half window, but it may run late
/// (a busy host leaves its thread waiting for a CPU for milliseconds,
/// while a bulk stream moves megabytes): a reader that had caught up was
/// then held, and a hold lasts until the sender pauses. So past the cap
/// the verdict reads what the destination's reader has acknowledged
/// since and moves the cap by that, as user space would. Under memory
/// pressure the shrunk cap applies as it is.
#[inline(always)]
fn over_cap(peer: &Peer, sent: u64, len: u32) -> bool {
    if peer.cap == 0 {
        return false;
    }
    let shrink = CAP_SHRINK.get(0).copied().unwrap_or(0);
    let want = sent + u64::from(len);
    let cap = peer.cap.saturating_sub(shrink);
    if want <= cap {
        return false;
    }
    if shrink != 0 || peer.acked_at == ACKED_UNKNOWN {
        return true;
    }
    match dst_bytes_acked(&peer.key) {
        Some(now) if now >= peer.acked_at => want > cap + (now - peer.acked_at),
        _ => true,
    }
}

/// Whether redirecting up to `want` leaves less than `park_gap` bytes
/// under the cap, moved as `over_cap` moves it.
#[inline(always)]
fn past_park_line(peer: &Peer, want: u64) -> bool {
    if peer.cap == 0 {
        return false;
    }
    let line = peer.cap.saturating_sub(u64::from(peer.park_gap));
    if want <= line {
        return false;
    }
    if peer.acked_at == ACKED_UNKNOWN {
        return true;
    }
    match dst_bytes_acked(&peer.key) {
        Some(now) if now >= peer.acked_at => want > line + (now - peer.acked_at),
        _ => true,
    }
}

/// The destination's `tcp_sock.bytes_acked`, read through BTF's offset.
#[inline(always)]
fn dst_bytes_acked(dst: &SockKey) -> Option<u64> {
    let at = BYTES_ACKED_AT.get(0).copied().unwrap_or(0);
    if at == 0 {
        return None;
    }
    let addr = sock_addr(&raw const TARGETS as *mut c_void, dst)?;
    // SAFETY: a probe read of kernel memory; a bad address is an error.
    unsafe { bpf_probe_read_kernel((addr + at) as *const u64).ok() }
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
pub(crate) fn report(key: &SockKey, peer: *mut Peer) {
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

/// Every skb is one message: the verdict sees what TCP delivered, as it
/// does without a parser. A message runs to the end of its skb from where
/// it starts, which is past any bytes the owner read before pairing.
#[stream_parser]
pub fn zc_parser(ctx: SkBuffContext) -> u32 {
    ctx.len() - strp_offset(&ctx)
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
    // (see `sock::sock_addr`), then the member read from it.
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

/// Calls of `bpf_skb_adjust_room` that cut up to 4 MiB, more than any skb
/// TCP builds.
const MAX_CUT_STEPS: u32 = 1024;

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
    // The old part is not bounded by a segment: TCP coalesces what waits
    // in a queue, and overlaps of two full 64 KiB segments were seen on
    // 6.18 (a bound of 17 steps left 61,351 bytes uncut: delivered twice).
    // So the bound covers any skb, MAX_CUT_STEPS steps of ADJUST_ROOM_MAX.
    let mut left = old;
    for _ in 0..MAX_CUT_STEPS {
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
        // Passing it on would deliver old bytes twice, so drop it and let
        // user space see the broken stream and reset the connection.
        // SAFETY: as above.
        unsafe { (*flow).uncut += u64::from(left) };
        debug!(
            ctx,
            "zc_verdict: could not cut {} old bytes off an skb", left
        );
        return None;
    }
    Some(ctx.len())
}

#[inline(always)]
fn verdict(ctx: &SkBuffContext, parsed: bool, offset: u32) -> u32 {
    // SAFETY: the helper only reads the skb's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    // SAFETY: the key is copied out at once.
    let Some(key) = (unsafe { BY_COOKIE.get(&cookie) }).copied() else {
        debug!(ctx, "zc_verdict: unpaired socket {}, passing", cookie);
        return sk_action::SK_PASS;
    };
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
            None => {
                // A broken stream: tell user space at once.
                // SAFETY: see FLOW.
                if unsafe { (*flow).uncut } != 0 {
                    let _ = EVENTS.output::<SockKey>(&key, 0);
                }
                return sk_action::SK_DROP;
            }
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
        if peer.hold != 0 || (*flow).passed != forwarded || over_cap(&peer, (*flow).sent, len) {
            (*flow).passed += u64::from(len);
            (*flow).passed_msgs += 1;
            // Not held: user space may not know that passed bytes wait
            // for it. A pass at the cap reports, but its report can be
            // lost to a re-arm that replaced this entry meanwhile, and the
            // skbs after it pass only to keep their order (no longer
            // capped), so every pass while not held reports. User space
            // leaves the report disarmed while a forwarder runs.
            if peer.hold == 0
                && let Some(p) = peer_ptr
            {
                report(&key, p);
            }
            return sk_action::SK_PASS;
        }
    }
    if peer.park_gap != 0 {
        // SAFETY: see FLOW.
        let want = unsafe { (*flow).sent } + u64::from(len);
        if past_park_line(&peer, want) {
            crate::park::ask(&key, peer_ptr);
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
