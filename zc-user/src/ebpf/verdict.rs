//! The relay verdict (`zc_verdict`, `zc_verdict_parsed`, `zc_parser`):
//! pairing two sockets so that what arrives on one leaves through the
//! other, and the controls user space holds over each direction: the
//! hold, the cap, the limit reports.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf, SockHash},
    programs::SkSkb,
};
use log::{debug, warn};
use zc_common::{Flow, PEER_RELAY, Peer, SockKey};

use super::{
    LoadError, Programs,
    pairs::{PairError, map_insert_error, remove_locked},
    rings::drain_when_readable,
};

pub(super) type Listeners =
    std::collections::HashMap<SockKey, tokio::sync::mpsc::UnboundedSender<SockKey>>;

/// What [`Programs::pair_relay`] set up.
#[derive(Clone, Copy, Debug)]
pub struct RelayPairing {
    pub keys: [SockKey; 2],
    /// Whether each socket's arriving bytes are redirected by the kernel.
    /// `false` when its remote end finished sending (or failed) between
    /// joining `TARGETS` and joining `RELAY`: TCP then leaves the
    /// established state and the kernel refuses the socket. The caller
    /// copies that direction itself; the other still runs in the kernel.
    pub in_relay: [bool; 2],
}

/// A direction's cap ([`Peer::cap`]) and the destination's acknowledged
/// count it was reckoned from ([`Peer::acked_at`]), which lets the verdict
/// move it on by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub total: u64,
    pub acked_at: u64,
}

impl Cap {
    /// A cap the verdict keeps where it is.
    pub fn fixed(total: u64) -> Self {
        Self {
            total,
            acked_at: zc_common::ACKED_UNKNOWN,
        }
    }
}

impl Programs {
    /// Joins two connected TCP sockets so that what arrives on one leaves
    /// through the other, in the kernel.
    ///
    /// Order matters. Both sockets first join `TARGETS` (no programs, so
    /// nothing changes for them) and get their `PEERS` entries; only then
    /// does each join `RELAY`, whose verdict program redirects into
    /// `TARGETS`. So a redirect never finds its peer missing, and bytes
    /// that arrive meanwhile simply wait in the receive queue. Joining
    /// `RELAY` does not process bytes already queued, so each socket is
    /// then kicked (see [`crate::sys::kick_data_ready`]).
    ///
    /// The kernel only accepts established sockets. If one is refused at
    /// the `TARGETS` step nothing has moved yet: everything is undone and
    /// [`PairError::NotEstablished`] returned. A refusal at the `RELAY`
    /// step is reported in [`RelayPairing::in_relay`].
    ///
    /// With a non-zero `window`, the verdict program reports each socket
    /// on [`Programs::limit_events`] once it has redirected `window` bytes
    /// (see [`Programs::rearm`]).
    pub fn pair_relay(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        window: u64,
    ) -> Result<RelayPairing, PairError> {
        self.pair_in(false, a, b, window)
    }

    /// [`Self::pair_relay`] for sockets another process owns and reads:
    /// they join `FOREIGN`, where a stream parser keeps the kernel from
    /// waking the owner's reads after each redirect.
    pub fn pair_foreign(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        window: u64,
    ) -> Result<RelayPairing, PairError> {
        // An interface may have appeared since the last pairing, or the
        // sockets live in another network namespace (a container's).
        self.fin_hold_for(a).map_err(PairError::Hold)?;
        self.pair_in(true, a, b, window)
    }

    fn pair_in(
        &self,
        foreign: bool,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        window: u64,
    ) -> Result<RelayPairing, PairError> {
        let keys = [
            crate::sys::sock_key(a).map_err(PairError::Socket)?,
            crate::sys::sock_key(b).map_err(PairError::Socket)?,
        ];
        let fds = [a, b];
        let cookies = [
            crate::sys::socket_cookie(a).map_err(PairError::Socket)?,
            crate::sys::socket_cookie(b).map_err(PairError::Socket)?,
        ];
        // Each direction's cap keeps within its destination's send buffer.
        let cap = |dst| crate::engine::bpf::allowance(window, dst).map_err(PairError::Socket);
        let caps = [cap(b)?, cap(a)?];
        let mut m = self.prepare(PEER_RELAY, keys, cookies, window, caps)?;
        for i in 0..2 {
            if let Err(e) = m.targets.insert(keys[i], fds[i].as_raw_fd(), 0) {
                remove_locked(&mut m, &keys);
                return Err(map_insert_error("TARGETS", keys[i], e));
            }
        }
        let mut in_relay = [false; 2];
        let name = if foreign { "FOREIGN" } else { "RELAY" };
        for i in 0..2 {
            let map = if foreign {
                &mut m.foreign
            } else {
                &mut m.relay
            };
            match map.insert(keys[i], fds[i].as_raw_fd(), 0) {
                Ok(()) => in_relay[i] = true,
                Err(e) => match map_insert_error(name, keys[i], e) {
                    PairError::NotEstablished(_) => {}
                    other => {
                        remove_locked(&mut m, &keys);
                        return Err(other);
                    }
                },
            }
        }
        if foreign {
            // Hold FINs before the kick: from here on the proxy may see EOF.
            for i in 0..2 {
                if let Err(e) = m.guarded.insert(keys[i], keys[1 - i], 0) {
                    remove_locked(&mut m, &keys);
                    return Err(PairError::map("GUARDED", e));
                }
            }
        }
        drop(m);
        for i in 0..2 {
            if in_relay[i]
                && let Err(e) = crate::sys::kick_data_ready(fds[i])
            {
                warn!("kicking a newly paired socket failed: {e}");
            }
        }
        debug!(
            "paired {:?} <-> {:?} (in kernel: {in_relay:?})",
            keys[0], keys[1]
        );
        Ok(RelayPairing { keys, in_relay })
    }

    /// Takes `bytes` off every pair's cap (0: none; `u64::MAX` holds every
    /// direction that has a window), for the host's TCP memory pressure
    /// (`crate::pressure`).
    pub fn set_cap_shrink(&self, bytes: u64) -> anyhow::Result<()> {
        let mut ebpf = self.ebpf();
        let map = ebpf
            .map_mut("CAP_SHRINK")
            .ok_or_else(|| anyhow::anyhow!("no CAP_SHRINK map"))?;
        aya::maps::Array::<_, u64>::try_from(map)?.set(0, bytes, 0)?;
        Ok(())
    }

    /// What the verdict program did with `key`'s bytes so far.
    pub fn flow(&self, key: &SockKey) -> Option<Flow> {
        self.maps().flow.get(key, 0).ok()
    }

    /// Records how many passed bytes user space has forwarded; the verdict
    /// resumes redirecting once this equals [`Flow::passed`].
    pub fn set_forwarded(&self, key: &SockKey, bytes: u64) -> Result<(), PairError> {
        self.maps()
            .forwarded
            .insert(key, bytes, 0)
            .map_err(|e| PairError::map("FORWARDED", e))
    }

    fn update_peer(&self, key: &SockKey, f: impl FnOnce(&mut Peer)) -> Result<(), PairError> {
        let mut m = self.maps();
        let mut peer = m
            .peers
            .get(key, 0)
            .map_err(|e| PairError::map("PEERS", e))?;
        f(&mut peer);
        m.peers
            .insert(key, peer, 0)
            .map_err(|e| PairError::map("PEERS", e))
    }

    /// Sets the next redirected-byte and skb totals at which `key` is
    /// reported, moves its cap (see [`Peer::cap`]), and arms the report
    /// if `arm`.
    pub fn rearm(
        &self,
        key: &SockKey,
        limit: u64,
        msg_limit: u64,
        cap: Cap,
        arm: bool,
        park_gap: u32,
    ) -> Result<(), PairError> {
        self.update_peer(key, |p| {
            p.limit = limit;
            p.msg_limit = msg_limit;
            (p.cap, p.acked_at) = (cap.total, cap.acked_at);
            p.armed = u32::from(arm);
            p.park_gap = park_gap;
        })
    }

    /// Asks the verdict to pass what arrives on `key`'s socket (see
    /// [`Peer::hold`]), and allows no park until the next re-arm.
    pub fn hold(&self, key: &SockKey) -> Result<(), PairError> {
        self.update_peer(key, |p| {
            p.hold = 1;
            p.park_gap = 0;
        })
    }

    /// Allows no park of `key`'s socket until the next re-arm.
    pub fn no_park(&self, key: &SockKey) -> Result<(), PairError> {
        self.update_peer(key, |p| p.park_gap = 0)
    }

    /// Lets the verdict redirect again (once every passed byte has been
    /// forwarded), up to a new cap.
    pub fn release(&self, key: &SockKey, cap: Cap) -> Result<(), PairError> {
        self.update_peer(key, |p| {
            p.hold = 0;
            (p.cap, p.acked_at) = (cap.total, cap.acked_at);
        })
    }

    /// Receives the key of `key`'s socket each time it passes its armed
    /// limit. Replaces any earlier listener for the key. Listen before
    /// pairing: the report is armed from the start, and one that finds no
    /// listener is lost, leaving the direction unwatched.
    ///
    /// The listener goes with the pair's map entries
    /// ([`Programs::unpair_ended`]) or with [`Programs::stop_listening`].
    pub fn limit_events(&self, key: SockKey) -> tokio::sync::mpsc::UnboundedReceiver<SockKey> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, tx);
        rx
    }

    /// Drops the listeners of `keys` (a pairing that failed).
    pub fn stop_listening(&self, keys: &[SockKey]) {
        let mut l = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            l.remove(k);
        }
    }

    /// Raw access for tests that need a socket in `RELAY` without a peer.
    #[doc(hidden)]
    pub fn insert_unpaired_relay(&self, fd: impl AsFd) -> Result<SockKey, PairError> {
        let fd = fd.as_fd();
        let k = crate::sys::sock_key(fd).map_err(PairError::Socket)?;
        self.maps()
            .relay
            .insert(k, fd.as_raw_fd(), 0)
            .map_err(|e| PairError::map("RELAY", e))?;
        Ok(k)
    }
}

/// Loads the relay's programs: `zc_verdict` on `RELAY`, `zc_verdict_parsed`
/// and `zc_parser` on `FOREIGN`; and tells them the skb offsets from BTF.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    relay: &SockHash<MapData, SockKey>,
    foreign: &SockHash<MapData, SockKey>,
) -> Result<(), LoadError> {
    attach_skb(ebpf, "zc_verdict", relay)?;
    attach_skb(ebpf, "zc_verdict_parsed", foreign)?;
    attach_skb(ebpf, "zc_parser", foreign)?;
    configure_offsets(ebpf);
    Ok(())
}

/// Loads the sk_skb program `name` and attaches it to `map`.
fn attach_skb(
    ebpf: &mut Ebpf,
    name: &'static str,
    map: &SockHash<MapData, SockKey>,
) -> Result<(), LoadError> {
    let prog: &mut SkSkb = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|e| LoadError::Program(name, e))?;
    prog.load().map_err(|e| LoadError::Program(name, e))?;
    prog.attach(map.fd())
        .map_err(|e| LoadError::Program(name, e))?;
    Ok(())
}

/// Tells the verdict where kernel structs keep what it reads (from BTF):
/// in an skb (`SKB_CONFIG`), the stream parser's offset into a partly
/// read skb (without it, offset 0, which holds for sockets paired with
/// nothing read from a partly consumed skb) and the TCP sequence number
/// it uses to skip retransmitted bytes it already handled; in a TCP
/// socket, `bytes_acked` (`BYTES_ACKED_AT`), to move a cap user space has
/// not moved yet.
fn configure_offsets(ebpf: &mut Ebpf) {
    let offsets = crate::btf::Offsets::of_running_kernel(&[
        ("sk_buff", "cb"),
        ("sk_skb_cb", "strp"),
        ("_strp_msg", "strp"),
        ("strp_msg", "offset"),
        ("tcp_skb_cb", "seq"),
        ("tcp_sock", "bytes_acked"),
    ]);
    let strp = offsets
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|o| {
            Ok(o.get("sk_buff", "cb")?
                + o.get("sk_skb_cb", "strp")?
                + o.get("_strp_msg", "strp")?
                + o.get("strp_msg", "offset")?)
        });
    let seq = offsets
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|o| Ok(o.get("sk_buff", "cb")? + o.get("tcp_skb_cb", "seq")?));
    let acked = offsets
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|o| o.get("tcp_sock", "bytes_acked"));
    let mut set = |name: &str, slot: u32, at: u32| -> anyhow::Result<()> {
        let map = ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow::anyhow!("no {name} map"))?;
        aya::maps::Array::<_, u64>::try_from(map)?.set(slot, u64::from(at), 0)?;
        Ok(())
    };
    if let Err(e) = acked.and_then(|at| set("BYTES_ACKED_AT", 0, at)) {
        warn!(
            "where a TCP socket counts acknowledged bytes is unknown ({e:#}); a relay whose \
             thread runs late holds directions whose reader has caught up"
        );
    }
    if let Err(e) = strp.and_then(|at| set("SKB_CONFIG", 0, at)) {
        warn!("the stream parser's offset is unknown ({e:#}); pair only idle sockets");
    }
    if let Err(e) = seq.and_then(|at| set("SKB_CONFIG", 1, at)) {
        warn!(
            "the TCP sequence number of an skb is unknown ({e:#}); a retransmission that \
             overlaps bytes already relayed would deliver them twice"
        );
    }
}

/// Hands each key the verdict puts on `EVENTS` to its listener.
pub(super) fn start_event_forwarding(
    events: RingBuf<MapData>,
    listeners: Arc<Mutex<Listeners>>,
) -> Option<RingBuf<MapData>> {
    drain_when_readable("limit events", events, move |ring| {
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<SockKey>() {
                continue;
            }
            // SAFETY: the program writes whole SockKeys; read unaligned
            // because the ring gives no alignment promise to Rust.
            let key = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SockKey>()) };
            drop(item);
            if let Some(tx) = listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
            {
                let _ = tx.send(key);
            }
        }
    })
}
