//! The FIN hold: `zc_fin_hold`, on tc ingress, keeps a FIN for a socket
//! of the agent's pairs behind the bytes redirected before it.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, bpf_sock_tuple},
    cty::c_void,
    helpers::{
        bpf_probe_read_kernel,
        generated::{
            bpf_ktime_get_ns, bpf_sk_release, bpf_skb_load_bytes_relative, bpf_skc_lookup_tcp,
        },
    },
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
/// [HOLD_QLEN] of `ingress_skb.qlen` in `struct sk_psock`, [HOLD_SKC_NET]
/// of `skc_net` in `struct sock_common`, [HOLD_NET_COOKIE] of
/// `net_cookie` in `struct net`.
#[map]
static HOLD_CONFIG: Array<u64> = Array::with_max_entries(4, 0);

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
const HOLD_SKC_NET: u32 = 2;
const HOLD_NET_COOKIE: u32 = 3;
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
/// include/uapi/linux/bpf.h: loads relative to the network header, and
/// socket lookups in the namespace of the device the packet came in on.
const BPF_HDR_START_NET: u32 = 1;
const BPF_F_CURRENT_NETNS: u64 = u64::MAX;
/// The link-layer header lengths of the devices the hold covers:
/// Ethernet and loopback, and none (tun, WireGuard).
const LINK_HEADERS: [usize; 2] = [14, 0];
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
    let Some(mut seg) = tcp_segment(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    if seg.flags & TCP_FIN == 0 || seg.flags & TCP_RST != 0 {
        return TC_ACT_UNSPEC;
    }
    // Keys name the socket's network namespace: that of the socket this
    // FIN is for, looked up where the packet came in.
    let Some(netns) = netns_of_socket(&ctx, &seg) else {
        return TC_ACT_UNSPEC;
    };
    seg.key.netns = netns;
    let key = seg.key;
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
    if seg.payload && !ours {
        let Some(l2) = link_header_len(&ctx, &seg) else {
            return TC_ACT_UNSPEC;
        };
        // Before the FIN is taken off: the copy keeps it.
        requeue(&ctx, &key);
        // The word holding the flags starts one byte before them.
        let off = l2 + seg.flags_at - 1;
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

/// A TCP segment as the hold reads it.
struct Segment {
    /// The key of the socket it is addressed to, but for `netns`.
    key: SockKey,
    flags: u8,
    /// Whether it carries bytes.
    payload: bool,
    /// Where its flags byte is, from the network header.
    flags_at: usize,
    /// The first word of its IP header and the first of its source
    /// address, at `saddr_at`: what finds the network header in the frame.
    first_word: u32,
    saddr_at: usize,
}

/// Reads a `T` at `off` bytes from the network header: no per-device
/// link-layer length is needed, so interfaces of every namespace (whose
/// indexes repeat from one namespace to the next) are read alike.
#[inline(always)]
fn load_net<T: Copy + Default>(ctx: &TcContext, off: usize) -> Option<T> {
    let mut v = T::default();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `v`.
    let r = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const c_void,
            off as u32,
            &mut v as *mut T as *mut c_void,
            size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    (r == 0).then_some(v)
}

/// The TCP segment in the packet, if it is one.
#[inline(always)]
fn tcp_segment(ctx: &TcContext) -> Option<Segment> {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let mut key = SockKey::default();
    let first_word: u32 = load_net(ctx, 0)?;
    let (tcp_at, ip_payload, saddr_at) = if proto == ETH_P_IP {
        let vihl: u8 = load_net(ctx, 0)?;
        if load_net::<u8>(ctx, 9)? != IPPROTO_TCP {
            return None;
        }
        let ihl = usize::from(vihl & 0xf) * 4;
        let total = usize::from(u16::from_be(load_net::<u16>(ctx, 2)?));
        key.family = AF_INET;
        key.remote_ip[0] = load_net(ctx, 12)?;
        key.local_ip[0] = load_net(ctx, 16)?;
        // A GSO packet past 64 KiB says 0: count it as carrying bytes.
        let payload = if total == 0 {
            usize::MAX
        } else {
            total.saturating_sub(ihl)
        };
        (ihl, payload, 12)
    } else if proto == ETH_P_IPV6 {
        if load_net::<u8>(ctx, 6)? != IPPROTO_TCP {
            return None;
        }
        let plen = usize::from(u16::from_be(load_net::<u16>(ctx, 4)?));
        key.family = AF_INET6;
        for i in 0..4 {
            key.remote_ip[i] = load_net(ctx, 8 + 4 * i)?;
            key.local_ip[i] = load_net(ctx, 24 + 4 * i)?;
        }
        (40, if plen == 0 { usize::MAX } else { plen }, 8)
    } else {
        return None;
    };
    key.remote_port = u32::from(u16::from_be(load_net::<u16>(ctx, tcp_at)?));
    key.local_port = u32::from(u16::from_be(load_net::<u16>(ctx, tcp_at + 2)?));
    let doff = usize::from(load_net::<u8>(ctx, tcp_at + 12)? >> 4) * 4;
    let flags: u8 = load_net(ctx, tcp_at + 13)?;
    Some(Segment {
        key,
        flags,
        payload: ip_payload > doff,
        flags_at: tcp_at + 13,
        first_word,
        saddr_at,
    })
}

/// Where the network header starts in the frame (tc sees it from its
/// link-layer header): the first of [`LINK_HEADERS`] at which the frame
/// holds the header's first word and source address.
#[inline(always)]
fn link_header_len(ctx: &TcContext, seg: &Segment) -> Option<usize> {
    let saddr = seg.key.remote_ip[0];
    LINK_HEADERS.into_iter().find(|&l2| {
        ctx.load::<u32>(l2).ok() == Some(seg.first_word)
            && ctx.load::<u32>(l2 + seg.saddr_at).ok() == Some(saddr)
    })
}

/// The network namespace cookie of the socket `seg` is addressed to, in
/// the namespace of the device it came in on; `None` when no socket has
/// its 4-tuple there.
#[inline(always)]
fn netns_of_socket(ctx: &TcContext, seg: &Segment) -> Option<u64> {
    let cfg = |i| HOLD_CONFIG.get(i).copied().unwrap_or(0);
    let (net_at, cookie_at) = (cfg(HOLD_SKC_NET), cfg(HOLD_NET_COOKIE));
    if net_at == 0 || cookie_at == 0 {
        return None;
    }
    let k = &seg.key;
    // Ports and addresses in network order, source first (the remote end).
    let (sport, dport) = (
        (k.remote_port as u16).to_be(),
        (k.local_port as u16).to_be(),
    );
    let skb = ctx.skb.skb as *mut c_void;
    let sk = if k.family == AF_INET {
        lookup_tcp(
            skb,
            &mut Tuple4 {
                saddr: k.remote_ip[0],
                daddr: k.local_ip[0],
                sport,
                dport,
            },
        )
    } else {
        lookup_tcp(
            skb,
            &mut Tuple6 {
                saddr: k.remote_ip,
                daddr: k.local_ip,
                sport,
                dport,
            },
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the socket's address is copied out through a probe read
    // (see `sock::sock_addr`) and the reference released at once; the
    // namespace outlives the packet's run.
    unsafe {
        let slot = [sk as u64];
        let addr = bpf_probe_read_kernel(slot.as_ptr()).unwrap_or(0);
        bpf_sk_release(sk as *mut c_void);
        if addr == 0 {
            return None;
        }
        let net = bpf_probe_read_kernel((addr + net_at) as *const u64).ok()?;
        bpf_probe_read_kernel((net + cookie_at) as *const u64).ok()
    }
}

/// `bpf_skc_lookup_tcp` with one of the tuple's shapes (its size a
/// constant, as the verifier wants), in the namespace of the device the
/// packet came in on.
#[inline(always)]
fn lookup_tcp<T>(skb: *mut c_void, tuple: &mut T) -> *mut aya_ebpf::bindings::bpf_sock {
    // SAFETY: the tuple lives on the stack for the call, with its size.
    unsafe {
        bpf_skc_lookup_tcp(
            skb,
            tuple as *mut T as *mut bpf_sock_tuple,
            size_of::<T>() as u32,
            BPF_F_CURRENT_NETNS,
            0,
        )
    }
}

/// `struct bpf_sock_tuple`'s two shapes.
#[repr(C)]
struct Tuple4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

#[repr(C)]
struct Tuple6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
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
