//! The pair table (`PEERS`) both redirecting families write: the checks
//! and entries every pairing starts with, undoing a pairing, removing and
//! listing pairs.
use std::sync::MutexGuard;

use zc_common::{Counters, Flow, PEER_LOCAL, PEER_RELAY, Peer, SockKey};

use super::{Maps, Programs};

/// Failure of one pairing operation.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("socket {0:?} is already paired")]
    AlreadyPaired(SockKey),
    #[error("both ends are the same socket")]
    SameSocket,
    #[error(
        "socket {0:?} is short-circuited (the agent's --short-circuit): what its peer sends \
         arrives without TCP, where no redirect sees it"
    )]
    ShortCircuited(SockKey),
    #[error(
        "socket {0:?} is not an established TCP connection (it closed, or its remote end finished, before pairing)"
    )]
    NotEstablished(SockKey),
    #[error("reading the socket's addresses failed: {0}")]
    Socket(#[source] std::io::Error),
    #[error("updating map `{0}` failed: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    /// Every entry of the map is taken: more sockets are paired than it
    /// was sized for. Nothing was changed.
    #[error("map `{0}` is full: every entry is taken by a paired socket")]
    Full(&'static str),
    /// The FIN hold cannot cover the sockets (their network namespace is
    /// out of reach). Nothing was changed.
    #[error("{0}")]
    Hold(String),
}

impl PairError {
    /// A failed insert into `map`: [`PairError::Full`] when the kernel
    /// says the map has no free entry (E2BIG, kernel/bpf/hashtab.c and
    /// net/core/sock_map.c), else [`PairError::Map`].
    pub fn map(map: &'static str, e: aya::maps::MapError) -> Self {
        if let aya::maps::MapError::SyscallError(s) = &e
            && s.io_error.raw_os_error() == Some(libc::E2BIG)
        {
            return PairError::Full(map);
        }
        PairError::Map(map, e)
    }
}

impl Programs {
    /// Checks the keys and writes the `COUNTERS` and `PEERS` entries;
    /// returns the locked maps for the socket inserts.
    /// `cookies` (SO_COOKIE, or 0 for none) go into `BY_COOKIE`; `caps`
    /// are the verdict's first caps, each key's (see `Peer::cap`).
    pub(super) fn prepare(
        &self,
        kind: u32,
        [ka, kb]: [SockKey; 2],
        cookies: [u64; 2],
        window: u64,
        caps: [u64; 2],
    ) -> Result<MutexGuard<'_, Maps>, PairError> {
        if ka == kb {
            return Err(PairError::SameSocket);
        }
        let mut m = self.maps();
        for k in [&ka, &kb] {
            if let Ok(p) = m.peers.get(k, 0) {
                if p.kind == PEER_LOCAL && kind != PEER_LOCAL {
                    return Err(PairError::ShortCircuited(*k));
                }
                return Err(PairError::AlreadyPaired(*k));
            }
        }
        let result = (|| {
            for k in [&ka, &kb] {
                let zero = aya::maps::PerCpuValues::try_from(vec![Counters::default(); nr_cpus()])
                    .map_err(PairError::Socket)?;
                m.counters
                    .insert(k, zero, 0)
                    .map_err(|e| PairError::map("COUNTERS", e))?;
            }
            for k in [&ka, &kb] {
                m.flow
                    .insert(k, Flow::default(), 0)
                    .map_err(|e| PairError::map("FLOW", e))?;
                m.forwarded
                    .insert(k, 0, 0)
                    .map_err(|e| PairError::map("FORWARDED", e))?;
            }
            for (k, cookie) in [(ka, cookies[0]), (kb, cookies[1])] {
                if cookie != 0 {
                    m.by_cookie
                        .insert(cookie, k, 0)
                        .map_err(|e| PairError::map("BY_COOKIE", e))?;
                }
            }
            let peer = |key, cookie, cap| Peer {
                key,
                kind,
                armed: u32::from(window > 0),
                hold: 0,
                park_gap: 0,
                limit: window / 2,
                msg_limit: u64::MAX,
                cap,
                cookie,
                // No count yet: the first report sets one (half a window in).
                acked_at: zc_common::ACKED_UNKNOWN,
            };
            m.peers
                .insert(ka, peer(kb, cookies[0], caps[0]), 0)
                .map_err(|e| PairError::map("PEERS", e))?;
            m.peers
                .insert(kb, peer(ka, cookies[1], caps[1]), 0)
                .map_err(|e| PairError::map("PEERS", e))
        })();
        if let Err(e) = result {
            remove_locked(&mut m, &[ka, kb]);
            for c in cookies.into_iter().filter(|&c| c != 0) {
                let _ = m.by_cookie.remove(&c);
            }
            return Err(e);
        }
        Ok(m)
    }

    /// From now on, relays that end leave their pairs in the maps (see
    /// [`Self::unpair_ended`]).
    pub fn retain_pairs(&self) {
        self.retain
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// For a relay that ended: removes its pair unless pairs are retained.
    pub fn unpair_ended(&self, keys: &[SockKey]) {
        if !self.retain.load(std::sync::atomic::Ordering::Relaxed) {
            self.unpair(keys);
        }
    }

    /// Relay pairs present in the maps, each once, in key order: also
    /// those made by an earlier process on the same pinned maps.
    pub fn relay_pairs(&self) -> Vec<[SockKey; 2]> {
        let m = self.maps();
        let mut out: Vec<[SockKey; 2]> = m
            .peers
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, p)| p.kind == PEER_RELAY && key_bytes(k) < key_bytes(&p.key))
            .map(|(k, p)| [k, p.key])
            .collect();
        out.sort_by_key(|p| key_bytes(&p[0]));
        out
    }

    /// The sockets in `TARGETS`, where every pair's sockets are until
    /// they close: the kernel takes a closing socket out of every
    /// sockhash itself (sock_map_close, sock_map_unhash). Read by walking
    /// the keys: a lookup from user space cannot tell a present socket
    /// from an absent one (ENOSPC for both, sock_hash_lookup_sys).
    pub fn present_sockets(&self) -> std::collections::HashSet<SockKey> {
        self.maps().targets.keys().filter_map(Result::ok).collect()
    }

    /// Forgets a pair whose socket has closed: its entries in the hash
    /// maps go, its counters join the retired total. A socket of it still
    /// open stays in the sockhashes, unpaired (the verdict passes what
    /// arrives), until it closes: taking it out would drop what the
    /// kernel still queues for it.
    pub fn forget(&self, keys: &[SockKey]) {
        let failed = self.retire_carried(keys);
        let mut m = self.maps();
        for k in keys {
            let _ = m.peers.remove(k);
            let _ = m.guarded.remove(k);
            let _ = m.flow.remove(k);
            let _ = m.forwarded.remove(k);
            let _ = m.counters.remove(k);
        }
        drop(m);
        self.forget_parks(keys);
        self.retire_failed(failed);
    }

    /// Takes both sockets of a pair out of the program maps only: no
    /// verdict runs for them any more, and what arrives stays in their
    /// receive queues, while their psocks (kept alive by `TARGETS`) go on
    /// sending what was already redirected. [`Self::unpair`] finishes.
    pub fn stop_verdicts(&self, keys: &[SockKey]) {
        let mut m = self.maps();
        for k in keys {
            let _ = m.relay.remove(k);
            let _ = m.foreign.remove(k);
            let _ = m.local.remove(k);
        }
    }

    /// Removes both sockets of a pair from every map. Sockets leave the
    /// program maps before `TARGETS`, so no redirect targets a socket that
    /// is half removed.
    pub fn unpair(&self, keys: &[SockKey]) {
        let failed = self.retire_carried(keys);
        remove_locked(&mut self.maps(), keys);
        self.forget_parks(keys);
        self.retire_failed(failed);
        let mut l = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            l.remove(k);
        }
    }
}

impl Programs {
    /// Adds what the sockets of `keys` carried to the retired total, and
    /// returns their failed redirects for [`Self::retire_failed`].
    fn retire_carried(&self, keys: &[SockKey]) -> u64 {
        let (carried, failed) = keys
            .iter()
            .filter_map(|k| self.counters(k))
            .fold((0, 0), |(b, f), c| (b + c.bytes, f + c.failed));
        self.retired
            .fetch_add(carried, std::sync::atomic::Ordering::Relaxed);
        failed
    }

    /// Added once the counters are gone, so that a scrape in between
    /// sees a count too low for a moment rather than one counted twice.
    fn retire_failed(&self, failed: u64) {
        self.retired_failed
            .fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The kernel answers EOPNOTSUPP when a socket is not established
/// (net/core/sock_map.c, sock_map_sk_state_allowed).
pub(super) fn map_insert_error(
    map: &'static str,
    key: SockKey,
    e: aya::maps::MapError,
) -> PairError {
    if let aya::maps::MapError::SyscallError(s) = &e
        && s.io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
    {
        return PairError::NotEstablished(key);
    }
    PairError::map(map, e)
}

pub(super) fn remove_locked(m: &mut Maps, keys: &[SockKey]) {
    // Missing entries are expected when undoing a partial pairing.
    for k in keys {
        let _ = m.relay.remove(k);
        let _ = m.foreign.remove(k);
        let _ = m.local.remove(k);
    }
    for k in keys {
        if let Ok(p) = m.peers.get(k, 0)
            && p.cookie != 0
        {
            let _ = m.by_cookie.remove(&p.cookie);
        }
    }
    for k in keys {
        let _ = m.targets.remove(k);
        let _ = m.peers.remove(k);
        let _ = m.flow.remove(k);
        let _ = m.forwarded.remove(k);
        let _ = m.counters.remove(k);
        let _ = m.guarded.remove(k);
    }
}

fn key_bytes(k: &SockKey) -> [u32; 11] {
    let mut b = [0u32; 11];
    b[0] = k.family;
    b[1] = k.local_port;
    b[2] = k.remote_port;
    b[3..7].copy_from_slice(&k.local_ip);
    b[7..11].copy_from_slice(&k.remote_ip);
    b
}

fn nr_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}
