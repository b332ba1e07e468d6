//! `zc relay --idle-timeout`: when a connection has moved no byte either
//! way for that long, with nothing in flight, it is ended with a FIN to
//! both ends.
//!
//! Progress is what the data path itself counts: user space's byte
//! counts (copy, splice, and held BPF directions) and, on the BPF path,
//! what the verdict handled (the relay never reads a paired socket, so
//! its own reads would say nothing); and what TCP counts on both sockets
//! (received, acknowledged), which moves when a reader drains bytes
//! queued before. A connection whose counts stood
//! still is idle only if neither socket holds bytes: none received and
//! unread, none sent and unacknowledged. A direction whose reader stopped
//! reading keeps bytes in its send queue (or, on the BPF path, in the
//! kernel's redirect queue behind a full send queue), so a stalled
//! transfer is never taken for an idle one.
use std::{
    os::fd::{BorrowedFd, RawFd},
    sync::atomic::Ordering,
    time::Duration,
};

use tokio::sync::oneshot;
use zc_common::SockKey;

use crate::{
    engine::{Counts, Engine},
    sys,
};

/// What tells whether a relayed connection moves.
pub struct Activity {
    engine: Engine,
    counts: Counts,
    /// The pair's map keys, from the BPF engine once paired.
    paired: Option<oneshot::Receiver<Result<[SockKey; 2], String>>>,
    keys: Option<[SockKey; 2]>,
}

impl Activity {
    /// For a connection relayed by `engine` with `counts`; `paired` hears
    /// the BPF engine's keys (see [`Engine::relay_observed`]).
    pub fn new(
        engine: Engine,
        counts: Counts,
        paired: oneshot::Receiver<Result<[SockKey; 2], String>>,
    ) -> Self {
        Self {
            engine,
            counts,
            paired: Some(paired),
            keys: None,
        }
    }

    /// Bytes moved so far, each way: redirected by the kernel or written
    /// by user space (as the engines' summaries count them).
    pub fn moved(&mut self) -> [u64; 2] {
        let ([sent, _], user) = self.counts();
        [0, 1].map(|i| user[i] + sent[i])
    }

    /// Whatever moved, each way: also bytes the verdict passed to user
    /// space and user space has not written yet.
    fn progress(&mut self) -> [u64; 2] {
        let ([sent, passed], user) = self.counts();
        [0, 1].map(|i| user[i] + sent[i] + passed[i])
    }

    /// ([redirected, passed] by the verdict, written by user space), each
    /// indexed by direction.
    fn counts(&mut self) -> ([[u64; 2]; 2], [u64; 2]) {
        if let Some(rx) = &mut self.paired {
            match rx.try_recv() {
                Ok(Ok(k)) => {
                    self.keys = Some(k);
                    self.paired = None;
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => self.paired = None,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        let user = [0, 1].map(|i| self.counts[i].load(Ordering::Relaxed));
        let verdict = match (&self.engine, &self.keys) {
            (Engine::Bpf(e), Some(k)) => {
                let h = e.handled(k);
                [[h[0].0, h[1].0], [h[0].1, h[1].1]]
            }
            _ => [[0, 0], [0, 0]],
        };
        (verdict, user)
    }

    /// Resolves once nothing has moved for `timeout` and nothing is in
    /// flight on `fds` (the connection's two sockets, open for as long as
    /// this future is polled).
    pub async fn idle_for(&mut self, timeout: Duration, fds: [RawFd; 2]) {
        // Looked at a few times per period: the connection ends between
        // `timeout` and 1.25 x `timeout` after its last byte.
        let every = (timeout / 4).max(Duration::from_millis(10));
        let mut last = (self.progress(), on_the_wire(fds));
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            let now = (self.progress(), on_the_wire(fds));
            if now != last {
                (last, since) = (now, tokio::time::Instant::now());
                continue;
            }
            if since.elapsed() >= timeout && !in_flight(fds) {
                return;
            }
        }
    }
}

/// What each socket has received and had acknowledged: a reader taking
/// bytes queued earlier moves these while the relay's own counts stand
/// still (a stalled reader catching up is not idle).
fn on_the_wire(fds: [RawFd; 2]) -> [(u64, u64); 2] {
    fds.map(|fd| {
        // SAFETY: the caller keeps both sockets open (see `idle_for`).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        sys::tcp_info(fd).map_or((0, 0), |i| (i.bytes_received, i.bytes_acked))
    })
}

/// Whether either socket holds bytes received and unread, or sent and
/// unacknowledged. A socket that cannot be asked counts as busy: its
/// engine sees what happened to it.
fn in_flight(fds: [RawFd; 2]) -> bool {
    fds.iter().any(|&fd| {
        // SAFETY: the caller keeps both sockets open (see `idle_for`).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        !matches!((sys::inq(fd), sys::outq(fd)), (Ok(0), Ok(0)))
    })
}
