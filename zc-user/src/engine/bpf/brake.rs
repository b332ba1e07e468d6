//! The brake: stops a held direction's sender while the bytes the verdict
//! passed pile up where no receive buffer counts them.
//!
//! A pass goes straight to the socket's message queue, charged to its
//! receive buffer, only while the socket's psock queue is empty. That
//! queue also carries the other direction's redirected skbs, so with both
//! directions busy a pass often waits there for the kernel's worker,
//! charged to nothing, and TCP keeps the sender's window open for as long
//! as the worker lags (84-618 MB seen on one relay socket across
//! namespaces; BENCHMARKS.md, "Both ways at once"). No program or socket
//! option makes such a pass count, but the window can be shut: with the
//! receive buffer at its minimum, TCP offers nothing beyond what it
//! already promised, and the sender stops there. (TCP_WINDOW_CLAMP shuts
//! it too, but lowering it also lowers the threshold TCP grows its window
//! from, and raising it back does not restore that: the window stayed shut
//! after the release until the sender's zero-window probe, some 0.8 s
//! per brake on loopback.)
use std::{
    net::TcpStream,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use log::debug;
use zc_common::SockKey;

use super::{
    Base, HELD_RCVBUF,
    switch::{held_rcvbuf, written},
};
use crate::{ebpf::Programs, sys};

/// Passed bytes beyond what the socket's receive memory holds past which
/// the sender is stopped (looked at only past [`RESERVE`]).
const ON: u64 = 256 << 10;

/// Passed bytes the window's bound sets aside for a held socket (its
/// receive buffer, doubled by the kernel): under this many the brake does
/// not look at the socket's memory, so a one-way hold costs no extra call.
const RESERVE: u64 = 2 * HELD_RCVBUF as u64;

/// Passed bytes not yet read under which the sender may go on. Above the
/// forwarder's read size, so that a read follows the release: TCP sends
/// the window update on a read, not on the buffer's change.
const OFF: u64 = HELD_RCVBUF as u64;

/// The brake of a held direction's source socket.
pub(super) struct Brake<'a> {
    src: (&'a TcpStream, Base),
    progs: &'a Programs,
    /// The other direction, whose skbs share the source's psock queue:
    /// its source's key and what user space forwarded of it.
    back: (SockKey, &'a AtomicU64),
    /// The receive buffer to restore (as SO_RCVBUF reports it, doubled)
    /// and when the brake engaged, while engaged.
    saved: Option<(u64, Instant)>,
    /// Bytes written into the source at the last look (they only grow).
    taken: u64,
    /// The held receive buffer last set ([`held_rcvbuf`]), while released;
    /// 0 until the first look sets it.
    held: usize,
    /// The buffer was fixed at pairing (a parking pair): left as it is
    /// but under memory pressure, and restored as it was.
    fixed: bool,
}

impl<'a> Brake<'a> {
    pub(super) fn new(
        src: (&'a TcpStream, Base),
        progs: &'a Programs,
        back: (SockKey, &'a AtomicU64),
        fixed: bool,
    ) -> Self {
        Brake {
            src,
            progs,
            back,
            saved: None,
            taken: 0,
            held: if fixed { held_rcvbuf() } else { 0 },
            fixed,
        }
    }

    /// Engages or releases for `unread` bytes passed and not yet read.
    pub(super) fn update(&mut self, unread: u64) -> std::io::Result<()> {
        let sock = self.src.0;
        match self.saved {
            None => {
                // TCP's memory pressure came or went: what the socket may
                // promise follows it.
                let held = held_rcvbuf();
                if held != self.held {
                    sys::set_rcvbuf(sock.as_fd(), held)?;
                    self.held = held;
                }
                // Passes made while the other direction's skbs wait in the
                // queue all wait behind them, so those stop the sender at
                // OFF already (not below: a release needs a read after it).
                let stop = unread > OFF
                    && (self.queued_ahead()? > 0
                        || (unread > RESERVE && self.uncounted(unread)?));
                if stop {
                    let fd = sock.as_fd();
                    self.saved = Some((sys::rcvbuf(fd)?, Instant::now()));
                    sys::set_rcvbuf(fd, 0)?;
                    debug!("{unread} passed bytes wait, not all counted: stopping the sender");
                }
            }
            Some((rcvbuf, since)) if unread < OFF => {
                self.saved = None;
                restore(sock, self.restored(rcvbuf))?;
                debug!(
                    "passed bytes down to {unread} after {:?}: the sender may go on",
                    since.elapsed()
                );
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Bytes of the other direction not yet written into the source
    /// socket: redirected skbs in its psock queue (or forwarded bytes
    /// about to be written).
    fn queued_ahead(&mut self) -> std::io::Result<u64> {
        let (key, by_user) = self.back;
        let Some(f) = self.progs.flow(&key) else {
            return Ok(0);
        };
        let moved = f.sent + by_user.load(Ordering::Relaxed);
        if moved > self.taken {
            self.taken = written(self.src.0, self.src.1)
                .map_err(|_| std::io::Error::other("reading the source's TCP_INFO"))?;
        }
        Ok(moved.saturating_sub(self.taken))
    }

    /// The buffer to restore after the brake, as SO_RCVBUF reports it.
    fn restored(&self, saved: u64) -> u64 {
        if self.fixed {
            saved
        } else {
            saved.min(2 * held_rcvbuf() as u64)
        }
    }

    /// More passed bytes wait than the socket's receive memory accounts
    /// for.
    fn uncounted(&self, unread: u64) -> std::io::Result<bool> {
        Ok(unread > sys::meminfo(self.src.0.as_fd())?.rmem_alloc + ON)
    }
}

impl Drop for Brake<'_> {
    fn drop(&mut self) {
        if let Some((rcvbuf, _)) = self.saved.take()
            && let Err(e) = restore(self.src.0, self.restored(rcvbuf))
        {
            debug!("restoring the receive buffer: {e}");
        }
    }
}

/// Sets the receive buffer back to `doubled`, as SO_RCVBUF reported it.
fn restore(sock: &TcpStream, doubled: u64) -> std::io::Result<()> {
    sys::set_rcvbuf(
        sock.as_fd(),
        usize::try_from(doubled / 2).unwrap_or(usize::MAX),
    )
}
