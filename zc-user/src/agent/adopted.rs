//! Pairs adopted from pinned maps, made by an agent that is gone. This
//! agent holds no descriptor for their sockets, so no relay notices when
//! they end; their entries in the hash maps would stay forever: listed,
//! refusing a later connection with the same 4-tuple as "already paired",
//! and naming that connection's socket to the FIN hold. The kernel takes
//! a closing socket out of every sockhash itself (sock_map_close,
//! sock_map_unhash), so a pair of which a socket has left `TARGETS` has
//! ended, and is forgotten: at adoption, before each pairing and listing,
//! and once a second.
use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use log::info;

use super::{Agent, Entry, proto::PairInfo};

/// How adopted pairs are listed (`zc list`'s source column).
pub(super) const ADOPTED: &str = "adopted";

const EVERY: Duration = Duration::from_secs(1);

impl Entry {
    fn is_adopted(&self) -> bool {
        self.task.is_none() && self.owners.is_empty() && self.info.source == ADOPTED
    }
}

impl Agent {
    /// Lists the pairs an earlier agent left in the pinned maps, and
    /// forgets those that ended while no agent ran.
    pub(super) fn adopt(&self) {
        let Some(progs) = &self.progs else { return };
        let present = progs.present_sockets();
        let mut pairs = self.pairs();
        for keys in progs.relay_pairs() {
            let sockets = keys.map(|k| {
                let (l, r) = crate::sys::addrs_of_key(&k);
                format!("{l}-{r}")
            });
            if !keys.iter().all(|k| present.contains(k)) {
                progs.forget(&keys);
                info!(
                    "forgot a pair that ended while no agent ran: {} <-> {}",
                    sockets[0], sockets[1]
                );
                continue;
            }
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            info!("adopted pair {id}: {} <-> {}", sockets[0], sockets[1]);
            self.tally.adopted();
            pairs.insert(
                id,
                Entry {
                    info: PairInfo {
                        id,
                        source: ADOPTED.into(),
                        sockets,
                    },
                    keys,
                    inodes: [0; 2],
                    owner_uid: 0,
                    task: None,
                    counts: None,
                    owners: Vec::new(),
                    hand_back: None,
                    saved: None,
                    before: None,
                },
            );
        }
    }

    /// Forgets every adopted pair of which a socket has closed; returns
    /// whether adopted pairs are left.
    pub(super) fn prune_adopted(&self) -> bool {
        let Some(progs) = &self.progs else {
            return false;
        };
        let mut pairs = self.pairs();
        if !pairs.values().any(Entry::is_adopted) {
            return false;
        }
        let present = progs.present_sockets();
        let ended: Vec<u64> = pairs
            .iter()
            .filter(|(_, e)| e.is_adopted() && !e.keys.iter().all(|k| present.contains(k)))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(e) = pairs.remove(&id) {
                // What it carried stays in the agent's byte counts.
                let sent = e.keys.map(|k| progs.flow(&k).map_or(0, |f| f.sent));
                let carried = crate::engine::Summary {
                    a_to_b: sent[0],
                    b_to_a: sent[1],
                    ..Default::default()
                };
                self.tally.pair_ended(&carried, [0, 0]);
                progs.forget(&e.keys);
                info!("adopted pair {id} ended (a socket of it closed); forgotten");
            }
        }
        pairs.values().any(Entry::is_adopted)
    }
}

/// Looks at the adopted pairs once a second until none is left (no pair
/// is adopted later) or the agent ends.
pub(super) async fn watch(agent: Weak<Agent>) {
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(agent): Option<Arc<Agent>> = agent.upgrade() else {
            return;
        };
        if !agent.prune_adopted() {
            return;
        }
    }
}
