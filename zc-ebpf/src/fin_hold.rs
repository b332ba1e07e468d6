//! The FIN hold: `zc_fin_hold`, on tc ingress, keeps a FIN for a socket
//! of the agent's pairs behind the bytes redirected before it.
use aya_ebpf::{
    bindings::BPF_F_INGRESS,
    cty::c_void,
    helpers::{bpf_probe_read_kernel, generated::bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use zc_common::{AF_INET, AF_INET6, MAX_SOCKETS, SockKey};

use crate::{
    maps::{FOREIGN, NO_PREALLOC},
    sock::sock_addr,
};

/// Paired sockets of another process, to the key of their peer: their
/// FIN waits for the peer's queue (see `zc_fin_hold`).
#[map]
static GUARDED: HashMap<SockKey, SockKey> = HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// Set by the agent from the kernel's BTF, so no layout is compiled in:
/// [HOLD_USER_DATA] the offset of `sk_user_data` in `struct sock`,
/// [HOLD_QLEN] of `ingress_skb.qlen` in `struct sk_psock`.
#[map]
static HOLD_CONFIG: Array<u64> = Array::with_max_entries(2, 0);

/// Interfaces the FIN hold is attached to: ifindex -> the length of their
/// link-layer header.
#[map]
static HOLD_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// [HOLD_HELD] FINs dropped to wait, [HOLD_STRIPPED] FINs taken off
/// data segments, [HOLD_REQUEUED] copies of a held FIN sent round the
/// device's backlog.
#[map]
static HOLD_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// When the hold began sending a socket's FIN round (see `requeue`).
#[map]
static HOLD_SINCE: LruHashMap<SockKey, u64> = LruHashMap::with_max_entries(MAX_SOCKETS, 0);

const HOLD_USER_DATA: u32 = 0;
const HOLD_QLEN: u32 = 1;
const HOLD_HELD: u32 = 0;
const HOLD_STRIPPED: u32 = 1;
const HOLD_REQUEUED: u32 = 2;
/// Marks the copies `requeue` makes (an ingress skb carries no mark of
/// ours otherwise; a mark survives a redirect within one namespace).
const REQUEUE_MARK: u32 = 0x7a63_f1a0;
/// How long a FIN goes round before the hold leaves it to TCP's
/// retransmission (a tail-loss probe about 200 ms after the FIN left).
const REQUEUE_NS: u64 = 20_000_000;
/// A start older than this belongs to an earlier FIN whose entry was not
/// removed (its pair ended first); a FIN seen now starts afresh.
const REQUEUE_STALE_NS: u64 = 1_000_000_000;
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
///
/// It comes back without waiting for the sender's retransmission (which
/// made every paired close take about 205 ms): a held FIN, and a copy of
/// a data segment whose FIN was taken off, go round the device's ingress
/// backlog again (`requeue`) until the queue is empty, for at most
/// `REQUEUE_NS`. The copy's bytes are old by the time it passes: TCP
/// queues such a segment, and the stream parser, which reads by sequence
/// number, skips them.
#[classifier]
pub fn zc_fin_hold(ctx: TcContext) -> i32 {
    let Some((key, flags, payload, flags_at)) = tcp_segment(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    if flags & TCP_FIN == 0 || flags & TCP_RST != 0 {
        return TC_ACT_UNSPEC;
    }
    // A copy made by `requeue`. Another agent's hold (each agent attaches
    // its own, with its own maps) passes it on untouched, mark included.
    // SAFETY: the context is valid for this run.
    let ours = unsafe { (*ctx.skb.skb).mark } == REQUEUE_MARK;
    // SAFETY: copied out at once.
    let Some(peer) = (unsafe { GUARDED.get(&key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    // An entry outlives its socket when no agent removed it (one killed
    // before the pair ended). The kernel takes a closing socket out of
    // every sockhash (sock_map_close), so only a socket still in FOREIGN
    // is the one paired; a later connection with the same 4-tuple is not.
    if sock_addr(&raw const FOREIGN as *mut c_void, &key).is_none() {
        return TC_ACT_UNSPEC;
    }
    // This hold's copy: it leaves without the mark, and a further copy
    // gets it again.
    if ours {
        ctx.set_mark(0);
    }
    if payload && !ours {
        // Before the FIN is taken off: the copy keeps it.
        requeue(&ctx, &key);
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
        requeue(&ctx, &key);
        return TC_ACT_SHOT;
    }
    let _ = HOLD_SINCE.remove(&key);
    TC_ACT_UNSPEC
}

/// Puts a marked copy of the segment at the back of its device's ingress
/// backlog (bpf_clone_redirect with BPF_F_INGRESS goes through netif_rx,
/// so this program sees it again in a later softirq round, after the
/// worker had a chance to send), unless the socket's FIN has gone round
/// for `REQUEUE_NS` already.
#[inline(always)]
fn requeue(ctx: &TcContext, key: &SockKey) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: copied out at once.
    let since = match unsafe { HOLD_SINCE.get(key) }.copied() {
        Some(t) if now.wrapping_sub(t) <= REQUEUE_STALE_NS => t,
        _ => {
            let _ = HOLD_SINCE.insert(key, &now, 0);
            now
        }
    };
    if now.wrapping_sub(since) > REQUEUE_NS {
        return;
    }
    // SAFETY: the context is valid for this run.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    ctx.set_mark(REQUEUE_MARK);
    if ctx
        .clone_redirect(ifindex, u64::from(BPF_F_INGRESS))
        .is_ok()
    {
        bump(HOLD_REQUEUED);
    }
    ctx.set_mark(mark);
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

#[inline(always)]
fn bump(i: u32) {
    if let Some(c) = HOLD_STATS.get_ptr_mut(i) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}
