//! Unsticking a destination that hears nothing from its remote end.
//!
//! A relay socket whose receive memory ran past its buffer answers its
//! remote end with a window of exactly zero (TCP, 6.15 on). A Linux peer
//! that had already sent a little past it, less than one window-scale
//! unit, keeps stamping its acknowledgments with that sequence number
//! (`tcp_acceptable_seq`), and the relay socket drops each of them as out
//! of window: it hears of the bytes it sent only when the peer
//! retransmits, on a timer that backs off to a minute. A relay socket is
//! the source of one direction and the destination of the other, so
//! with both directions waiting for their destinations neither heard
//! anything (BENCHMARKS.md, tuning logs 31 and 32; tests/deaf_socket.rs
//! shows it on plain sockets, and in a held relay pair). TCP announces
//! its window only with a segment, and a socket waiting for
//! acknowledgments sends none; leaving repair mode makes it send one at
//! once, with its window opened a little if its memory would allow none,
//! and the peer's next acknowledgment lies inside it.
//!
//! Repair mode refuses sends (EINVAL), so the kick happens only while
//! nothing may send into the socket: every redirected byte of the
//! direction has been written into it (the kernel's worker has nothing
//! left to send) and the caller, its only other writer, is waiting. (A
//! parker's nudge of the same socket takes the EINVAL as a miss.)
use std::{
    net::TcpStream,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use log::debug;

use super::{Abort, Base, switch::written};
use crate::sys;

/// How long a destination with bytes in flight may hear nothing before
/// it is made to announce its window: past the 200 ms of TCP's least
/// retransmission timeout, so ordinary recovery comes first.
const AFTER: Duration = Duration::from_millis(250);

/// The window opened for a socket past its buffer: past the edge, a peer
/// stamps at most one unit of its window scale (14 at most: 16 KiB), so
/// this much takes its acknowledgments in, and admits little data.
const OPEN: u32 = 16 << 10;

/// Watches one destination while a forwarder or parker waits for it.
pub(super) struct Unstick<'a> {
    acked: u64,
    since: Instant,
    /// Repair mode is not allowed here (no CAP_NET_ADMIN).
    off: bool,
    /// The pair's count of kicks (the access log's).
    kicks: &'a AtomicU64,
}

impl<'a> Unstick<'a> {
    pub(super) fn new(kicks: &'a AtomicU64) -> Self {
        Unstick {
            acked: 0,
            since: Instant::now(),
            off: false,
            kicks,
        }
    }

    /// Looks at `dst` once more: `expected` is every byte of the direction
    /// handed to it so far (redirected plus forwarded), `waiting` those of
    /// them not yet acknowledged (the caller has just read both).
    pub(super) fn check(
        &mut self,
        dst: &TcpStream,
        dbase: Base,
        expected: u64,
        waiting: u64,
    ) -> Result<(), Abort> {
        let now = expected.saturating_sub(waiting);
        if now != self.acked {
            self.acked = now;
            self.since = Instant::now();
            return Ok(());
        }
        if self.off || self.since.elapsed() < AFTER || waiting == 0 {
            return Ok(());
        }
        // The kernel's worker may still be sending redirected bytes.
        if written(dst, dbase)? < expected {
            return Ok(());
        }
        self.since = Instant::now();
        // Deaf only with segments sent and never acknowledged, and its own
        // window shut: a destination whose end merely stopped reading has
        // its segments acknowledged, then waits with nothing in flight.
        let fd = dst.as_fd();
        if sys::tcp_info(fd)?.unacked == 0 {
            return Ok(());
        }
        let over = sys::meminfo(fd)?.rmem_alloc >= sys::rcvbuf(fd)?;
        if !over && sys::windows(fd)?.map(|(_, rcv)| rcv) != Some(0) {
            return Ok(());
        }
        // Past its buffer, the socket would announce no window: open a
        // little of one, enough for its remote end's acknowledgments to
        // count again (TCP charges a segment that finds no room anyway
        // when nothing waits in the receive queue, and shuts the window
        // once more after it).
        match sys::announce_window(fd, if over { OPEN } else { 0 }) {
            Ok(()) => {
                self.kicks.fetch_add(1, Ordering::Relaxed);
                debug!(
                    "destination heard nothing for {AFTER:?} with {} bytes in flight: \
                     made it announce its window{}",
                    waiting,
                    if over {
                        " (opened: its memory was past its buffer)"
                    } else {
                        ""
                    }
                );
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                debug!("no repair mode here ({e}): a deaf destination waits for its timers");
                self.off = true;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}
