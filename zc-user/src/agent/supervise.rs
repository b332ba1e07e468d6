//! Pairs the kernel can no longer finish. Once paired, every byte that
//! arrives on a proxy's socket should leave its receive queue through the
//! verdict. Some never can: urgent data stops the verdict at its mark
//! (tcp_read_sock in net/ipv4/tcp.c reads no further), and SIOCINQ then
//! counts only the bytes before the mark, so the rest looks taken though
//! nothing took it; bytes the owner read itself would look the same. At
//! the stream's end the engine waits for those bytes forever
//! (engine::bpf's `finish_direction` polls every 2 ms, about 1.7% of a CPU
//! per such pair) and the pair stays listed. So the agent looks at each
//! of its proxies' pairs once a second and ends one with bytes the verdict
//! will never take, as `zc unpair` would: a relay stuck in that wait does
//! not answer the hand-back, and is then dropped, which takes the pair out
//! of the maps; the proxy reads what is left itself.
use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use log::{debug, warn};
use zc_common::SockKey;

use super::{
    Agent,
    quiesce::{self, Progress},
    sockopts::Saved,
};

const EVERY: Duration = Duration::from_secs(1);

/// Watches pair `id` until it ends; `before` is each socket's progress
/// when it was paired.
pub(super) async fn watch(
    agent: Weak<Agent>,
    id: u64,
    keys: [SockKey; 2],
    socks: Arc<Saved>,
    before: [Progress; 2],
) {
    // Bytes the verdict missed at the last look, per socket: a pair is
    // ended only when the same count is seen twice, so that one reading
    // taken mid-update cannot end it.
    let mut seen = [0u64; 2];
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(agent) = agent.upgrade() else { return };
        if !agent.pairs().contains_key(&id) {
            return;
        }
        let Some(progs) = &agent.progs else { return };
        let mut missed = [0u64; 2];
        for i in 0..2 {
            let Ok(left) = quiesce::consumed(&socks.socks()[i]) else {
                // A failed socket: the relay sees that itself.
                return;
            };
            let Some(f) = progs.flow(&keys[i]) else {
                return;
            };
            missed[i] = left
                .saturating_sub(before[i].read)
                .saturating_sub(f.sent + f.passed);
        }
        if missed == [0, 0] || missed != seen {
            seen = missed;
            continue;
        }
        let e = agent.pairs().remove(&id);
        if let Some(e) = e {
            let how = agent.end(e).await;
            warn!(
                "pair {id}: {} and {} bytes left its sockets' receive queues (or wait behind urgent \
                 data) without the verdict, so the kernel could never finish the pair; ended: \
                 {how}",
                missed[0], missed[1]
            );
        }
        return;
    }
}

/// Starts watching a pair just made.
pub(super) fn start(
    agent: &Arc<Agent>,
    id: u64,
    keys: [SockKey; 2],
    socks: Arc<Saved>,
    before: [Progress; 2],
) {
    debug!("watching pair {id} for bytes the verdict misses");
    tokio::spawn(watch(Arc::downgrade(agent), id, keys, socks, before));
}
