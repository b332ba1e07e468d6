//! What the programs carried: the per-socket `COUNTERS` the relay verdict
//! and `zc_msg` both keep, the total over ended pairs too, and how full
//! the maps are.
use aya::maps::{HashMap, SockHash};
use zc_common::{Counters, Peer, Recorded, SockKey};

use super::Programs;

impl Programs {
    /// Every byte these programs redirected (sk_skb and sk_msg), for pairs
    /// alive now and pairs since removed: what the kernel path carried, as
    /// opposed to what zc moved in user space.
    pub fn kernel_bytes(&self) -> u64 {
        let live: u64 = {
            let m = self.maps();
            m.counters
                .iter()
                .filter_map(Result::ok)
                .map(|(_, per_cpu)| per_cpu.iter().map(|c| c.bytes).sum::<u64>())
                .sum()
        };
        live + self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the programs redirected away from `key`, summed over CPUs.
    pub fn counters(&self, key: &SockKey) -> Option<Counters> {
        let m = self.maps();
        let per_cpu = m.counters.get(key, 0).ok()?;
        Some(per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
            bytes: acc.bytes + c.bytes,
            msgs: acc.msgs + c.msgs,
            failed: acc.failed + c.failed,
        }))
    }

    /// Redirects the kernel refused, for pairs since removed (see
    /// [`Self::counters`] for live ones).
    pub fn retired_failures(&self) -> u64 {
        self.retired_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How full the maps that hold pairs and recorded sockets are:
    /// (name, entries, capacity). The lock on the shared handles is held
    /// only to read each map's id; the entries are counted through handles
    /// of this call's own, so a scrape never holds up the data path while
    /// it walks tens of thousands of keys.
    pub fn map_fill(&self) -> Vec<(&'static str, usize, u32)> {
        use aya::maps::{IterableMap as _, Map, MapData};
        let ids = {
            let m = self.maps();
            [
                ("TARGETS", m.targets.map().info()),
                ("PEERS", m.peers.map().info()),
                ("RECORDED", m.recorded.map().info()),
            ]
            .map(|(name, info)| (name, info.map(|i| (i.id(), i.max_entries()))))
        };
        let mut out = Vec::with_capacity(ids.len());
        for (name, info) in ids {
            let Ok((id, capacity)) = info else { continue };
            let Ok(data) = MapData::from_id(id) else {
                continue;
            };
            let used = match name {
                "TARGETS" => SockHash::<_, SockKey>::try_from(Map::SockHash(data))
                    .map(|m| m.keys().filter(Result::is_ok).count()),
                "PEERS" => HashMap::<_, SockKey, Peer>::try_from(Map::HashMap(data))
                    .map(|m| m.keys().filter(Result::is_ok).count()),
                _ => HashMap::<_, SockKey, Recorded>::try_from(Map::HashMap(data))
                    .map(|m| m.keys().filter(Result::is_ok).count()),
            };
            if let Ok(used) = used {
                out.push((name, used, capacity));
            }
        }
        out
    }

    /// Number of entries in each map: (TARGETS, RELAY, LOCAL, PEERS,
    /// FLOW, FORWARDED, COUNTERS).
    pub fn entry_counts(&self) -> [usize; 7] {
        let m = self.maps();
        [
            m.targets.keys().count(),
            m.relay.keys().count(),
            m.local.keys().count(),
            m.peers.keys().count(),
            m.flow.keys().count(),
            m.forwarded.keys().count(),
            m.counters.keys().count(),
        ]
    }
}
