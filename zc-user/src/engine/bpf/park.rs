//! The user-space side of a park (zc-ebpf `park`): the verdict asked for
//! it when the destination's reader fell behind, and `zc_park` took the
//! source out of `RELAY`, so TCP flow control holds the sender while the
//! bytes wait in the source's own receive queue. This puts the source
//! back once the reader has caught up; the verdict then takes the queue,
//! in order. No byte passes through user space.
use std::{
    net::TcpStream,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
};

use log::debug;
use zc_common::SockKey;

use super::{
    Abort, Base, Pair, Task,
    ending::failure,
    forward::Backoff,
    switch::{Forwarded, HELD_RCVBUF, waiting},
    unstick::Unstick,
};
use crate::{
    ebpf::{Programs, Unparked},
    sys,
};

/// Watches a direction the verdict asked to park, and puts it back.
pub(super) struct Parker<'a> {
    pub(super) progs: Programs,
    pub(super) key: SockKey,
    pub(super) src: &'a TcpStream,
    pub(super) dst: (&'a TcpStream, Base),
    pub(super) by_user: &'a AtomicU64,
    /// Back in `RELAY` once fewer than this many bytes wait for the
    /// destination's reader.
    pub(super) low: u64,
    /// Counts the destination's kicks ([`Unstick`]).
    pub(super) kicks: &'a AtomicU64,
}

impl Parker<'_> {
    /// Returns once the socket is back in `RELAY`: the reader caught up,
    /// or the verdict met its cap before the park came (its bytes passed
    /// need a forwarder, which [`super::Pair::forwarder_ended`] starts).
    pub(super) async fn run(self) -> Result<Forwarded, Abort> {
        let (dst, dbase) = self.dst;
        let mut wait = Backoff::new();
        let started = std::time::Instant::now();
        let mut deaf = Unstick::new(self.kicks);
        crate::sys::nudge(self.src.as_fd())?;
        loop {
            let f = self.progs.flow(&self.key).ok_or(Abort(None))?;
            if let Some(abort) = failure(dst) {
                let _ = self.progs.unpark(&self.key, self.src.as_fd());
                return Err(abort);
            }
            let now = waiting(f.sent, dst, dbase, self.by_user)?;
            let passed = f.passed > self.by_user.load(Ordering::Relaxed);
            if now < self.low || passed {
                let how = self.progs.unpark(&self.key, self.src.as_fd())?;
                debug!(
                    "park ends after {:?} ({how:?}, {now} bytes waiting{})",
                    started.elapsed(),
                    if passed { ", bytes passed" } else { "" }
                );
                return Ok(match how {
                    Unparked::Stranded => Forwarded::Stranded,
                    _ => Forwarded::BackToKernel,
                });
            }
            match self.progs.park_state(&self.key) {
                // zc_park acts when TCP calls it; make it call now.
                zc_common::PARK_ASKED => crate::sys::nudge(self.src.as_fd())?,
                // Out of `RELAY`, the source redirects nothing more into
                // the destination, so it may be kicked.
                zc_common::PARKED => {
                    let expected = f.sent + self.by_user.load(Ordering::Relaxed);
                    deaf.check(dst, dbase, expected, now)?
                }
                _ => {}
            }
            wait.sleep(|| debug!("parked: {now} bytes wait for a slow reader"))
                .await;
        }
    }
}

/// SO_RCVBUF of both sockets of a pair that parks (set at pairing, the
/// kernel doubles it): what a parked or held direction keeps in its own
/// queue. Fixed from the start, so its window never promised more than
/// it holds: cut at a hold after autotuning had grown it, the window
/// stood at 14 MB over a 2 MiB buffer, segments were pruned, and the
/// windows TCP offered afterwards stalled a BBR sender for 200 ms after
/// each put-back. A quarter of the window, 1-2 MiB: parked at 1 MiB, a
/// BBR stream moved 398 MB in 5 s against 7.3 GB at 2 MiB (BENCHMARKS.md,
/// tuning log 29).
pub fn park_rcvbuf(window: u64) -> usize {
    let quarter = usize::try_from(window / 4).unwrap_or(usize::MAX);
    quarter.clamp(HELD_RCVBUF, 2 * HELD_RCVBUF)
}

/// How close to its cap a direction may come before the verdict asks
/// for a park: parked once more than half a window waits for the
/// reader, it stays within the cap (and needs no hold) as long as the
/// park comes before the rest of the allowance is sent. 0 (no parking)
/// when the allowance leaves no room for that.
pub(super) fn park_gap(allowance: u64, window: u64) -> u32 {
    u32::try_from(allowance.saturating_sub(window / 2)).unwrap_or(u32::MAX)
}

impl<'a> Pair<'a> {
    /// Allows `src` no park until the next re-arm, and puts it back if it
    /// was parked (or notes it stranded).
    pub(super) fn stop_parking(&mut self, src: usize) -> Result<(), Abort> {
        if self.engine.park && !self.stranded[src] {
            self.engine.progs.no_park(&self.keys[src])?;
            // zc_park runs under the socket's lock: taking it once waits
            // out a run that read the old entry.
            sys::kick_data_ready(self.socks[src].as_fd())?;
            self.unpark(src)?;
        }
        Ok(())
    }

    /// Puts `src` back in `RELAY` if it was parked; notes it stranded if
    /// it cannot go back.
    pub(super) fn unpark(&mut self, src: usize) -> Result<(), Abort> {
        // A shut socket was put back before its shutdown and has not been
        // asked since; `RELAY` refuses it now whether it is there or not.
        // A socket parked to be read stays with its reader, which puts it
        // back itself (or reads on to the end once it cannot go back).
        if self.engine.park && !self.stranded[src] && !self.shut(src) && !self.reading_parked[src] {
            let how = self
                .engine
                .progs
                .unpark(&self.keys[src], self.socks[src].as_fd())?;
            if how == Unparked::Stranded {
                debug!("side {src}: no longer established after a park; forwarding the rest");
                self.stranded[src] = true;
            }
        }
        Ok(())
    }

    /// A forwarder for what a stranded source keeps (see
    /// [`Forwarded::Stranded`]): the verdict no longer sees it, so the
    /// forwarder reads it all, after every byte redirected before.
    pub(super) fn forward_stranded(&mut self, src: usize) -> Result<Task<'a, Forwarded>, Abort> {
        self.engine.progs.hold(&self.keys[src])?;
        self.forwarder(src, None)
    }
}
