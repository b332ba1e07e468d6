//! Map keys and values shared by the eBPF programs and user space.
//!
//! Every type is `#[repr(C)]`, made only of fixed-width integers, and laid
//! out without padding, so both sides agree on its bytes.
#![no_std]

/// `AF_INET`, as the kernel reports it in socket contexts.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as the kernel reports it in socket contexts.
pub const AF_INET6: u32 = 10;

/// Capacity of every socket map. A relay pair holds two entries.
pub const MAX_SOCKETS: u32 = 65_536;

/// One TCP socket, named by its network namespace and its 4-tuple as
/// seen from that socket.
///
/// Addresses are the kernel's network-byte-order 32-bit words (an IPv4
/// address fills `local_ip[0]`, the rest stay zero); ports are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    /// The cookie of the socket's network namespace (SO_NETNS_COOKIE,
    /// `bpf_get_netns_cookie`): two containers may each hold a connection
    /// with the same 4-tuple (a sidecar's to 127.0.0.1, say).
    pub netns: u64,
    pub family: u32,
    pub local_port: u32,
    pub remote_port: u32,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Always 0: makes the size a multiple of 8 without hidden padding,
    /// whose bytes a hash map would read as part of the key.
    pub pad: u32,
}

impl SockKey {
    /// The key of an IPv4 connection held by an IPv6 socket (an
    /// IPv4-mapped address, `::ffff:a.b.c.d`, as a dual-stack `[::]`
    /// listener accepts) written as the IPv4 key it is on the wire, so
    /// that the FIN hold, which reads IPv4 headers, and an IPv4 peer
    /// socket name it alike. Both sides build every key through this. A
    /// listener's remote address is all zeros and stays so.
    #[inline(always)]
    pub const fn normalised(self) -> Self {
        if self.family != AF_INET6
            || !is_v4_mapped(&self.local_ip)
            || !(is_v4_mapped(&self.remote_ip) || is_zero(&self.remote_ip))
        {
            return self;
        }
        Self {
            netns: self.netns,
            family: AF_INET,
            local_port: self.local_port,
            remote_port: self.remote_port,
            local_ip: [self.local_ip[3], 0, 0, 0],
            remote_ip: [self.remote_ip[3], 0, 0, 0],
            pad: 0,
        }
    }

    /// The same connection seen from its other end (the same-host case).
    pub const fn reversed(&self) -> Self {
        Self {
            netns: self.netns,
            family: self.family,
            local_port: self.remote_port,
            remote_port: self.local_port,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            pad: 0,
        }
    }
}

/// `::ffff:0:0/96`: the third network-order word is 00 00 ff ff.
#[inline(always)]
const fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[inline(always)]
const fn is_zero(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 0
}

/// Normalises the `remote_port` field of `__sk_buff`, `sk_msg_md` and
/// `bpf_sock_ops`: the kernel stores the big-endian port in the upper half
/// of the word on little-endian hosts (net/core/filter.c, `BPF_LSH 16`),
/// and older kernels in the lower half. Returns the port in host order.
#[inline(always)]
pub const fn remote_port_from_ctx(raw: u32) -> u32 {
    let be = if raw & 0xffff == 0 {
        raw >> 16
    } else {
        raw & 0xffff
    };
    u16::from_be(be as u16) as u32
}

/// Where a paired socket's bytes go, and when to tell user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The socket that receives what this one's remote end sends.
    pub key: SockKey,
    /// One of the `PEER_*` constants.
    pub kind: u32,
    /// Non-zero: when this socket's [`Flow::sent`] passes `limit`, send
    /// its key on `EVENTS` once and clear this flag (user space re-arms).
    pub armed: u32,
    /// Non-zero: user space asks the verdict to stop redirecting and pass
    /// arriving bytes to the socket's own receive queue, where they count
    /// against its receive buffer, so TCP flow control holds the sender.
    pub hold: u32,
    /// Non-zero: parking is allowed, and the verdict asks for it (see
    /// `PARK` in zc-ebpf) once [`Flow::sent`] comes within this many
    /// bytes of `cap` (moved as the cap is). 0 while user space forwards
    /// the direction, so that no park can come under a forwarder.
    pub park_gap: u32,
    /// Byte total beyond which user space wants to look at the
    /// destination's backlog.
    pub limit: u64,
    /// Redirected-skb total ([`Flow::sent_msgs`]) beyond which user space
    /// wants a report too (it watches the average skb size).
    pub msg_limit: u64,
    /// Non-zero: the verdict redirects no skb that would take
    /// [`Flow::sent`] past this total; it passes it instead, as if held,
    /// and reports. User space keeps it at what the destination's reader
    /// has acknowledged plus the window, so the bound holds however late
    /// user space looks.
    pub cap: u64,
    /// The socket's cookie (SO_COOKIE) when user space entered it in
    /// `BY_COOKIE`, else 0: the verdict finds a socket by its cookie once
    /// its key no longer reads right (see `zc_verdict`).
    pub cookie: u64,
    /// The destination's `bytes_acked` (TCP_INFO) when user space set
    /// `cap`, or [`ACKED_UNKNOWN`]. At the cap the verdict reads the
    /// destination's count now and moves the cap by what was acknowledged
    /// since, so a cap user space has not moved yet holds nothing back
    /// from a reader that has caught up.
    pub acked_at: u64,
}

/// `PARK` states (zc-ebpf `park`): the verdict asked for a park; the
/// socket is out of `RELAY`; user space asked for a park to read the
/// socket itself (the adaptive path's small segments, no cap involved).
pub const PARK_ASKED: u64 = 1;
pub const PARKED: u64 = 2;
pub const PARK_TO_READ: u64 = 3;

/// [`Peer::acked_at`] when the cap was not set from an acknowledged count.
pub const ACKED_UNKNOWN: u64 = u64::MAX;

/// What the verdict program did with a relay socket's bytes. Written only
/// by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Bytes redirected to the peer's egress.
    pub sent: u64,
    /// Bytes passed to the socket's own receive queue for user space to
    /// forward (while held, and until user space has forwarded them all).
    pub passed: u64,
    /// Bytes the verdict cut off the front of retransmitted skbs because
    /// it had already handled them (see `zc_verdict`).
    pub trimmed: u64,
    /// Skbs redirected (see `sent`).
    pub sent_msgs: u64,
    /// Skbs passed (see `passed`), so user space can tell small segments
    /// from bulk while it forwards a direction.
    pub passed_msgs: u64,
    /// TCP sequence number just past the last byte the verdict handled.
    pub next_seq: u32,
    /// Non-zero once `next_seq` is set (by the first skb after pairing).
    pub seq_known: u32,
    /// Old bytes the verdict could not cut off a retransmitted skb; it
    /// dropped that skb, so the stream is broken and user space resets
    /// the connection (never seen once the cut covered whole skbs).
    pub uncut: u64,
}

/// Relay pair: bytes arriving on this socket leave through the peer
/// (sk_skb stream verdict, redirect to the peer's egress).
pub const PEER_RELAY: u32 = 1;
/// Same-host short-circuit: what this socket sends is put straight into the
/// peer's receive queue (sk_msg, redirect to the peer's ingress).
pub const PEER_LOCAL: u32 = 2;

/// Capacity of the ring buffer carrying [`SockKey`]s of sockets whose
/// `Flow::sent` passed their limit.
pub const EVENTS_BYTES: u32 = 256 << 10;

/// An established socket as sock_ops recorded it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Its cookie (SO_COOKIE), so a socket found later under the same
    /// 4-tuple can be told apart from a newer one.
    pub cookie: u64,
    /// Non-zero when it connected (active open) rather than was accepted:
    /// the kernel counts a connecting socket's SYN in its acknowledged
    /// bytes.
    pub active: u64,
}

/// Per-socket, per-CPU counters of what the programs redirected away from
/// a socket. User space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: u64,
    pub msgs: u64,
    /// Redirects the kernel refused (peer gone); never expected in a
    /// healthy pair, and each one means lost bytes.
    pub failed: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain integers, no padding, any bit pattern is valid.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Recorded {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<SockKey>(), 8 + 4 * 3 + 16 * 2 + 4);
        assert_eq!(
            core::mem::size_of::<Peer>(),
            core::mem::size_of::<SockKey>() + 4 * 4 + 8 * 5
        );
        assert_eq!(core::mem::offset_of!(Peer, limit) % 8, 0);
        assert_eq!(core::mem::size_of::<Counters>(), 24);
        assert_eq!(core::mem::size_of::<Flow>(), 8 * 6 + 4 * 2);
    }

    #[test]
    fn remote_port_is_read_from_either_half() {
        let port: u16 = 8080;
        let be = u16::to_be(port) as u32;
        assert_eq!(remote_port_from_ctx(be << 16), 8080);
        assert_eq!(remote_port_from_ctx(be), 8080);
    }

    #[test]
    fn ipv4_mapped_keys_become_ipv4_keys() {
        let w = |o: [u8; 4]| u32::from_ne_bytes(o);
        let mapped = SockKey {
            family: AF_INET6,
            local_port: 80,
            remote_port: 5000,
            local_ip: [0, 0, w([0, 0, 0xff, 0xff]), w([127, 0, 0, 1])],
            remote_ip: [0, 0, w([0, 0, 0xff, 0xff]), w([10, 0, 0, 9])],
            netns: 4096,
            pad: 0,
        };
        let v4 = SockKey {
            family: AF_INET,
            local_port: 80,
            remote_port: 5000,
            local_ip: [w([127, 0, 0, 1]), 0, 0, 0],
            remote_ip: [w([10, 0, 0, 9]), 0, 0, 0],
            netns: 4096,
            pad: 0,
        };
        assert_eq!(mapped.normalised(), v4);
        assert_eq!(v4.normalised(), v4);
        // A real IPv6 key (::1) and the IPv6 wildcard stay as they are.
        let v6 = SockKey {
            family: AF_INET6,
            local_ip: [0, 0, 0, w([0, 0, 0, 1])],
            remote_ip: [0, 0, 0, w([0, 0, 0, 1])],
            ..v4
        };
        assert_eq!(v6.normalised(), v6);
        let wildcard = SockKey {
            family: AF_INET6,
            ..SockKey::default()
        };
        assert_eq!(wildcard.normalised(), wildcard);
    }

    #[test]
    fn reversing_twice_is_identity() {
        let k = SockKey {
            family: AF_INET,
            local_port: 1,
            remote_port: 2,
            local_ip: [3, 0, 0, 0],
            remote_ip: [4, 0, 0, 0],
            netns: 7,
            pad: 0,
        };
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().local_port, 2);
    }
}
