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
    Abort, Base,
    ending::failure,
    forward::Backoff,
    switch::{Forwarded, waiting},
};
use crate::ebpf::{Programs, Unparked};

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
}

impl Parker<'_> {
    /// Returns once the socket is back in `RELAY`: the reader caught up,
    /// or the verdict met its cap before the park came (its bytes passed
    /// need a forwarder, which [`super::Pair::forwarder_ended`] starts).
    pub(super) async fn run(self) -> Result<Forwarded, Abort> {
        let (dst, dbase) = self.dst;
        let mut wait = Backoff::new();
        let started = std::time::Instant::now();
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
            if self.progs.park_state(&self.key) == zc_common::PARK_ASKED {
                // zc_park acts when TCP calls it; make it call now.
                crate::sys::nudge(self.src.as_fd())?;
            }
            wait.sleep(|| debug!("parked: {now} bytes wait for a slow reader"))
                .await;
        }
    }
}
