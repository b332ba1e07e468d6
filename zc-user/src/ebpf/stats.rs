//! What the programs carried: the per-socket `COUNTERS` the relay verdict
//! and `zc_msg` both keep, the total over ended pairs too, and how full
//! the maps are.
use zc_common::{Counters, SockKey};

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
