//! The window and the switch: when and how a direction moves between the
//! kernel's redirect and user-space forwarding, and back.
//!
//! The kernel's redirect queue (the destination psock's backlog) has no
//! bound: a slow destination would let the source's sender fill kernel
//! memory. So the verdict has a cap per direction: it redirects no byte
//! that would leave more than two windows waiting for the destination's
//! reader (redirected and not yet acknowledged). Past the cap it passes
//! the bytes to the source's own receive queue, where they count against
//! its receive buffer, so TCP flow control stops the sender, and it tells
//! user space. User space moves the cap with every report (each half
//! window of redirected bytes); at the cap the verdict first moves it on
//! by what the reader acknowledged since, so a cap user space was late
//! to move holds back no reader that has caught up (on a busy host most
//! holds began that way). Once the verdict has passed bytes, user space
//! *holds* the source: once the destination has caught up, it forwards
//! what was passed, and the verdict redirects again as soon as nothing
//! passed is left, so every byte keeps its place. The bound holds however
//! late user space looks.
//!
//! Taking the source out of the verdict map instead would be simpler, but
//! the kernel drops an skb that is being dequeued while the program is
//! detached (sk_psock_verdict_recv finds no program: SK_DROP). Observed on
//! 6.18 as lost bytes in the middle of a stream.
//!
//! The adaptive path ([`BpfEngine::with_adaptive`], `adaptive`) moves a
//! direction whose skbs are small to user space, where one read takes
//! many skbs: parked and read as a plain socket where `zc_park` attaches
//! (`parked_read`), else with the same hold, back once the skbs it passes
//! are bulk again. The hold's user-space side is `forward`.
use std::{
    net::TcpStream,
    os::fd::{AsFd, BorrowedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use log::debug;

use super::{
    Abort, Base, Pair, Task,
    adaptive::back_to_kernel_at,
    ending::{broken, failure},
    forward::{Direction, Forwarder},
    park::{Parker, park_gap, park_rcvbuf},
    parked_read::ParkedReader,
};
use crate::{ebpf::Cap, sys};

/// Default window: per direction, a reader that never reads costs at most
/// two windows of kernel memory: redirected bytes waiting for the reader
/// (redirect backlog and send queue, until the reader's ACK; see
/// [`unacked_allowance`]) and a held sender's own queue (`HELD_RCVBUF`,
/// doubled by the kernel). 8 MiB: at most 16 MiB, and a bulk stream whose
/// reader keeps up is rarely held (1 MiB writes: relay CPU 0.04 s/GiB
/// against 0.09 at 4 MiB and 0.014 at 16 MiB; BENCHMARKS.md).
///
/// Holding used to be opt-in: on 6.18 a held stream sometimes got one skb
/// twice. The cause was a spurious TCP retransmission overlapping bytes
/// already handled, which `tcp_read_skb` hands to the verdict whole; the
/// verdict now skips those bytes (zc-ebpf, `skip_handled`; tested by
/// tests/retransmit_overlap.rs).
pub const DEFAULT_WINDOW: u64 = 8 << 20;

/// SO_RCVBUF of a relay socket from its first hold on (the kernel doubles
/// it): the most a held direction keeps in its own receive queue. Before
/// that the kernel's initial 128 KiB applies (autotuning only grows
/// buffers an application reads). 256 KiB made a held socket's recv fail
/// with EFAULT now and then on 6.18 (2 of 12 runs of tests/hold_switch.rs;
/// 0 of 20 at 1 MiB). With parking, see [`park_rcvbuf`] instead.
pub const HELD_RCVBUF: usize = 1 << 20;

/// SO_RCVBUF of a held socket while TCP's memory is under pressure (see
/// [`held_rcvbuf`]). The size at which a held socket's recv once failed
/// with EFAULT ([`HELD_RCVBUF`]), so it applies only under pressure, where
/// the host past tcp_mem's hard limit is the worse harm: 1,000 stalled
/// clients and a 64 MiB stream held the whole way at it were carried
/// whole in every run so far (BENCHMARKS.md, session 24).
pub const PRESSED_RCVBUF: usize = 256 << 10;

/// The receive buffer a held socket should have now: [`HELD_RCVBUF`], or
/// [`PRESSED_RCVBUF`] while TCP's memory is under pressure. A held
/// socket takes every segment its window promised even past tcp_mem's
/// hard limit (TCP charges a segment anyway when the receive queue is
/// empty, and a sockmap socket's always is: its bytes wait in the psock),
/// so 1,000 held sockets of 2 MiB kept the host past the limit, where
/// every other socket drops; a smaller buffer promises less.
pub fn held_rcvbuf() -> usize {
    if crate::pressure::under() {
        PRESSED_RCVBUF
    } else {
        HELD_RCVBUF
    }
}

/// What the kernel spends on skbs beyond their bytes, allowed for in the
/// bound, as a share of the window (a quarter: 2 MiB at the default):
/// each skb carries its sk_buff, shared info and page rounding. With the
/// bytes alone counted, a client that never read cost 17.6-18.9 MiB per
/// connection at the default window against a bound of 17 (`zc bench
/// --workloads stall`, 50 clients); with this, 15.2-15.7. A fixed 2 MiB
/// left a 4 MiB window only one window of room, and a stream with
/// random pauses then ran mostly in user space.
fn skb_overhead(window: u64) -> u64 {
    window / 4
}

/// How many redirected bytes may wait for a reader: two windows, less
/// what a held sender may keep in its own queue and what the skbs cost
/// beyond their bytes, so that all of it stays within two windows; a
/// window at least.
fn unacked_allowance(window: u64) -> u64 {
    // A parked pair's buffer (at least a held one's), doubled by the kernel.
    let held = 2 * park_rcvbuf(window) as u64;
    (2 * window)
        .saturating_sub(held + skb_overhead(window))
        .max(window)
}

/// How many bytes of the direction into `dst` may wait for its reader:
/// the window's [`unacked_allowance`], but no more than half of `dst`'s
/// send buffer as it is now (autotuned buffers grow).
///
/// A redirected skb the kernel's worker cannot send (the destination's
/// send buffer is full) blocks the destination's psock queue, and the
/// other direction's passes, which use the same queue, then wait behind
/// it uncharged, so TCP keeps the sender's window open: two ends that
/// both write and never read pushed 2.16 GB each through `--sndbuf 1m`
/// (`tests/both_ends_stalled.rs`). Kept under the send buffer, what waits
/// for the reader always fits, and the queue never stalls on it.
pub fn allowance(window: u64, dst: BorrowedFd<'_>) -> std::io::Result<u64> {
    if window == 0 {
        return Ok(0);
    }
    let room = sys::sndbuf(dst)? / 2;
    Ok(unacked_allowance(window).min(room).max(1))
}

/// What a user-space forwarder ended with.
pub(super) enum Forwarded {
    /// The source reached EOF; the direction can be finished.
    Eof,
    /// Nothing passed is left and the verdict redirects again.
    BackToKernel,
    /// A parker could not put the source back (see
    /// [`crate::ebpf::Unparked::Stranded`]): user space forwards the rest.
    Stranded,
    /// A park asked for reading did not happen (see `parked_read`): the
    /// direction is still in the kernel, and is held the next time its
    /// skbs are small.
    ParkFailed,
}

impl<'a> Pair<'a> {
    /// A forwarder ended; returns the next one if the verdict passed more
    /// bytes at its cap meanwhile (its report may have come while this
    /// one still ran, and no later skb need come to report again).
    pub(super) async fn forwarder_ended(
        &mut self,
        src: usize,
        how: Forwarded,
    ) -> Result<Task<'a, Forwarded>, Abort> {
        self.forwarding[src] = false;
        self.parking[src] = false;
        self.reading_parked[src] = false;
        // Neither direction needs the poller now (a direction the kernel
        // refused keeps its copy task's own registrations).
        if !self.forwarding[1 - src] {
            super::io::unregister(self.io);
        }
        // What the kernel redirects right after a hold is no sign of the
        // traffic (see `small_segments`).
        self.small_before[src] = false;
        self.dwell[src].ended(self.flow(src)?.sent);
        debug!(
            "side {src}: forwarder ended ({}), {} bytes forwarded",
            match how {
                Forwarded::Eof => "EOF",
                Forwarded::BackToKernel => "back to the kernel",
                Forwarded::Stranded => "stranded out of the kernel",
                Forwarded::ParkFailed => "not parked; held from now on",
            },
            self.by_user[src].load(Ordering::Relaxed)
        );
        let fin = match how {
            Forwarded::Eof => true,
            // Shut for writing meanwhile, the source was put back before
            // its shutdown (`finish_direction`); only the parker's own
            // try came too late.
            Forwarded::Stranded if self.shut(src) => self.fin_came(src)?,
            Forwarded::Stranded => {
                self.stranded[src] = true;
                return self.forward_stranded(src);
            }
            Forwarded::BackToKernel => self.fin_came(src)?,
            Forwarded::ParkFailed => {
                self.park_failed[src] = true;
                self.fin_came(src)?
            }
        };
        if fin && !self.done[src] {
            return self.finish_direction(src).await;
        }
        self.check_backlog(src).await
    }

    /// Whether `src`'s FIN came while a forwarder or parker owned it (its
    /// event was left to them). A source already shut for writing goes
    /// from FIN_WAIT2 to TCP_CLOSE as the FIN arrives, so that counts too;
    /// missed, the direction waited for an event that had come. A reset
    /// also ends in TCP_CLOSE: its error is taken first, and ends the pair.
    fn fin_came(&self, src: usize) -> Result<bool, Abort> {
        if let Some(abort) = failure(self.socks[src]) {
            return Err(abort);
        }
        Ok(sys::fin_arrived(&sys::tcp_info(self.socks[src].as_fd())?))
    }

    /// The verdict reported `src`: it passed its report limit, or its cap.
    /// Moves the cap to what the destination's reader has acknowledged
    /// plus the window, and re-arms. If the verdict had to pass bytes at
    /// the cap (or the direction's skbs are small), holds `src` and returns
    /// a forwarder for what the verdict passes meanwhile; small skbs are
    /// parked and read instead where that works (`parked_read`).
    pub(super) async fn check_backlog(&mut self, src: usize) -> Result<Task<'a, Forwarded>, Abort> {
        let dst = 1 - src;
        let window = self.engine.window;
        let f = self.flow(src)?;
        broken(f)?;
        let cap = cap(self.socks[dst], self.base[dst], &self.by_user[src], window)?;
        // While a forwarder runs the verdict reports every pass; nothing
        // needs those reports, since the forwarder's end checks again
        // (`forwarder_ended`), so the report stays disarmed until then.
        let busy = self.forwarding[src] || self.done[src];
        // The verdict may ask for a park only while no forwarder owns the
        // direction (a parker may run).
        let gap = if self.engine.park && (!busy || self.parking[src]) && !self.shut(src) {
            park_gap(allowance(window, self.socks[dst].as_fd())?, window)
        } else {
            0
        };
        self.engine.progs.rearm(
            &self.keys[src],
            f.sent + window / 2,
            self.engine.msg_limit(f),
            cap,
            !busy,
            gap,
        )?;
        log::trace!(
            "{}/{} side {src}: rearm limit {} cap {} armed {} (sent {} passed {} by_user {})",
            self.keys[src].local_port,
            self.keys[src].remote_port,
            f.sent + window / 2,
            cap.total,
            !busy,
            f.sent,
            f.passed,
            self.by_user[src].load(Ordering::Relaxed)
        );
        if busy {
            return Ok(None);
        }
        // Read after re-arming: a verdict run that passes at the cap from
        // now on reports again, so none is missed between the two.
        let f = self.flow(src)?;
        let capped = f.passed > self.by_user[src].load(Ordering::Relaxed);
        let small = self.small_segments(src);
        if !capped && small.is_none() {
            if self.engine.park && self.engine.progs.park_state(&self.keys[src]) != 0 {
                self.forwarding[src] = true;
                self.parking[src] = true;
                self.parks += 1;
                let parker = Parker {
                    progs: self.engine.progs.clone(),
                    key: self.keys[src],
                    src: self.socks[src],
                    dst: (self.socks[dst], self.base[dst]),
                    by_user: &self.by_user[src],
                    low: window / 8,
                    kicks: self.kicks,
                };
                return Ok(Some(Box::pin(parker.run())));
            }
            return Ok(None);
        }
        match small {
            Some(avg) => {
                debug!("side {src}: skbs average {avg} bytes; forwarding in user space");
                self.small += 1;
            }
            None => {
                // How much waits now, against the cap the verdict met:
                // far less means the reader had caught up by now, and the
                // cap the verdict met was an old one.
                let now = waiting(f.sent, self.socks[dst], self.base[dst], &self.by_user[src])?;
                debug!(
                    "holding side {src}: the verdict met its cap; {now} bytes wait in the \
                     kernel for side {dst} now (allowance {})",
                    allowance(window, self.socks[dst].as_fd())?
                );
                self.holds += 1;
            }
        }
        // Parked, the source is read as a plain socket: its skbs cost no
        // verdict run and no message each. Held instead: bytes the verdict
        // passed at its cap (`zc_park` parks nothing while passed bytes
        // wait), a source shut for writing (it could not rejoin `RELAY`),
        // and a direction whose park did not happen before.
        let parkable = self.engine.read_parked && !self.park_failed[src] && !self.shut(src);
        if small.is_some() && parkable && !capped {
            let stay = self.dwell[src].leave(f.sent);
            return self.parked_reader(src, stay);
        }
        // What the verdict passes while held waits in the receive queue,
        // and autotuning (user space reads now) would let the buffer grow
        // to tcp_rmem's maximum (32 MiB here). Fixed only from the first
        // hold: a fixed buffer on every relay socket made the kernel path
        // stall now and then (2 of 25 runs of tests/relay_modes.rs).
        // A parking pair's buffer is fixed from pairing; cutting it now
        // would strand the window it promised (see `park_rcvbuf`).
        if !self.engine.park || crate::pressure::under() {
            sys::set_rcvbuf(self.socks[src].as_fd(), held_rcvbuf())?;
        }
        self.engine.progs.hold(&self.keys[src])?;
        // A verdict run that read the old entry may still be redirecting.
        // It runs under the socket's lock, so taking that lock once (any
        // setsockopt does) waits it out; every later run sees the hold.
        sys::kick_data_ready(self.socks[src].as_fd())?;
        // The hold allows no park from here on (`Programs::hold`); one that
        // came before it is undone, for the forwarder reads what the
        // verdict passes.
        self.unpark(src)?;
        let small = small.map(|_| {
            (
                back_to_kernel_at(self.engine.small_skb),
                self.dwell[src].leave(f.sent),
            )
        });
        self.forwarder(src, small)
    }

    /// Starts the forwarder of held `src` (`small`: see
    /// [`Forwarder::small_below`]).
    pub(super) fn forwarder(
        &mut self,
        src: usize,
        small: Option<(u64, u64)>,
    ) -> Result<Task<'a, Forwarded>, Abort> {
        let dst = 1 - src;
        self.forwarding[src] = true;
        let fwd = Forwarder {
            dir: self.direction(src)?,
            back: (self.keys[dst], &self.by_user[dst]),
            small_below: small,
            peek: self.engine.peek_hand_back,
            fixed_rcvbuf: self.engine.park,
        };
        Ok(Some(Box::pin(fwd.run())))
    }

    /// Starts the reader of `src`, parked for its small skbs, for `stay`
    /// bytes (see `parked_read`).
    fn parked_reader(&mut self, src: usize, stay: u64) -> Result<Task<'a, Forwarded>, Abort> {
        self.forwarding[src] = true;
        self.reading_parked[src] = true;
        self.parks += 1;
        let reader = ParkedReader {
            dir: self.direction(src)?,
            stay,
            fixed_rcvbuf: self.engine.park,
        };
        Ok(Some(Box::pin(reader.run())))
    }

    /// What a forwarder of `src` works with.
    fn direction(&self, src: usize) -> Result<Direction<'a>, Abort> {
        let dst = 1 - src;
        Ok(Direction {
            progs: self.engine.progs.clone(),
            key: self.keys[src],
            src: (self.socks[src], self.base[src]),
            src_io: self.io(src)?,
            dst: (self.socks[dst], self.base[dst]),
            dst_io: self.io(dst)?,
            by_user: &self.by_user[src],
            small_bytes: &self.small_bytes[src],
            window: self.engine.window,
            kicks: self.kicks,
        })
    }
}

/// Bytes written into `s` since pairing and acknowledged by its remote end.
pub(super) fn acked(s: &TcpStream, base: Base) -> Result<u64, Abort> {
    Ok(sys::tcp_info(s.as_fd())?
        .bytes_acked
        .saturating_sub(base.written))
}

/// The verdict's cap for the direction into `dst` (see `Peer::cap`): the
/// redirected total at which [`allowance`] bytes wait for `dst`'s
/// remote end to acknowledge them, counting what user space wrote into
/// `dst` too. Reports come every half window, and the cap moves with
/// each, so a reader that keeps within a window never meets it.
///
/// With it goes the destination's acknowledged count it was reckoned
/// from, so the verdict can move it on while user space runs late.
pub(super) fn cap(
    dst: &TcpStream,
    dbase: Base,
    by_user: &AtomicU64,
    window: u64,
) -> Result<Cap, Abort> {
    if window == 0 {
        return Ok(Cap::fixed(0));
    }
    let acked_at = sys::tcp_info(dst.as_fd())?.bytes_acked;
    let taken = acked_at
        .saturating_sub(dbase.written)
        .saturating_sub(by_user.load(Ordering::Relaxed));
    Ok(Cap {
        total: taken + allowance(window, dst.as_fd())?,
        acked_at,
    })
}

/// Bytes written into `s` since pairing.
pub(super) fn written(s: &TcpStream, base: Base) -> Result<u64, Abort> {
    Ok(sys::bytes_written(s.as_fd())?.saturating_sub(base.written))
}

/// Bytes of a direction that wait in the kernel for `dst`'s reader:
/// redirected (`sent`, the verdict's total) or forwarded, and not yet
/// acknowledged by `dst`'s remote end.
pub(super) fn waiting(
    sent: u64,
    dst: &TcpStream,
    dbase: Base,
    by_user: &AtomicU64,
) -> Result<u64, Abort> {
    let moved = sent + by_user.load(Ordering::Relaxed);
    Ok(moved.saturating_sub(acked(dst, dbase)?))
}
