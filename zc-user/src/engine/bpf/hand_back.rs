//! Giving a foreign pair's sockets back to their owner (`zc unpair`, an
//! agent stopping with `--unpin-on-exit`), with every byte the kernel
//! accepted delivered, or both connections reset: never a stream that
//! silently lost its middle.
//!
//! The owner is stopped (ptrace) by the caller, so only the kernel moves
//! bytes meanwhile. The sockets first leave the program maps: no verdict
//! runs any more, and what arrives stays in their receive queues for the
//! owner. `TARGETS` still holds them, so their psocks go on sending what
//! was redirected before; once that has reached the destinations' send
//! queues, the sockets leave every map. Deleting a psock drops what it
//! still queues, so the counts decide afterwards: each destination must
//! have taken every redirected byte, and each source must have given up
//! no byte that the verdict did not redirect (a stream parser may hold
//! bytes it took from the receive queue). Otherwise both connections are
//! reset, while the owner is still stopped.
use std::{os::fd::AsFd, time::Duration};

use log::debug;

use super::{Pair, forward::Backoff, switch::written};
use crate::sys;

/// How long the psocks may take to send what they queue before the
/// sockets leave the maps anyway (the owner is stopped meanwhile).
const DRAIN: Duration = Duration::from_millis(500);

/// How a foreign pair went back to its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandedBack {
    /// Every byte the kernel accepted reached the other socket or waits
    /// in the receive queue for the owner.
    Intact,
    /// Some could not be delivered (why); both connections were reset.
    Reset(String),
}

/// Asks a foreign pair to give its sockets back, with where to say how it
/// went.
pub type HandBack = tokio::sync::oneshot::Sender<HandedBack>;

impl Pair<'_> {
    pub(super) async fn hand_back(&mut self) -> HandedBack {
        match self.try_hand_back().await {
            Ok(()) => HandedBack::Intact,
            Err(why) => {
                for s in self.socks {
                    if let Err(e) = sys::reset_now(s.as_fd()) {
                        debug!("resetting a handed-back socket: {e}");
                    }
                }
                HandedBack::Reset(why)
            }
        }
    }

    async fn try_hand_back(&mut self) -> Result<(), String> {
        let progs = &self.engine.progs;
        progs.stop_verdicts(&self.keys);
        // A verdict run under way finishes under the socket's lock; taking
        // the lock once waits it out.
        for s in self.socks {
            sys::kick_data_ready(s.as_fd()).map_err(|e| format!("locking a socket: {e}"))?;
        }
        let mut sent = [0u64; 2];
        for (src, n) in sent.iter_mut().enumerate() {
            *n = progs
                .flow(&self.keys[src])
                .ok_or("the pair's counters are gone")?
                .sent;
        }
        let behind = |me: &Self| -> Result<u64, String> {
            (0..2).try_fold(0, |acc, src| {
                let taken = written(me.socks[1 - src], me.base[1 - src])
                    .map_err(|_| "a socket failed".to_string())?;
                Ok(acc + sent[src].saturating_sub(taken))
            })
        };
        let started = std::time::Instant::now();
        let mut wait = Backoff::new();
        while behind(self)? > 0 && started.elapsed() < DRAIN {
            wait.sleep(|| {}).await;
        }
        progs.unpair(&self.keys);
        for (src, &sent) in sent.iter().enumerate() {
            let dst = 1 - src;
            let taken = written(self.socks[dst], self.base[dst])
                .map_err(|_| "a socket failed".to_string())?;
            if taken < sent {
                return Err(format!(
                    "{} bytes were still queued in the kernel for a slow reader",
                    sent - taken
                ));
            }
            let fd = self.socks[src].as_fd();
            let io = |e: std::io::Error| format!("reading a socket's counts: {e}");
            let left = sys::bytes_received(fd).map_err(io)? - sys::inq(fd).map_err(io)?;
            let consumed = left.saturating_sub(self.base[src].read);
            // More would mean bytes taken from the queue that never reached
            // the other side; fewer, bytes the verdict redirected that TCP
            // still counts as unread, which the owner would read again
            // (seen now and then with HAProxy both ways; the stream
            // parser's accounting of the receive queue, not understood yet).
            if consumed != sent {
                return Err(format!(
                    "side {src}: {consumed} bytes left its receive queue, {sent} went through the \
                     verdict"
                ));
            }
        }
        Ok(())
    }
}
