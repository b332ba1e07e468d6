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
//! The adaptive path ([`BpfEngine::with_adaptive`]) uses the same hold to
//! move a direction whose skbs are small to user space, where one read
//! takes many skbs, and back once the skbs it passes are bulk again.
use std::{
    net::TcpStream,
    os::fd::{AsFd, BorrowedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use log::debug;
use zc_common::SockKey;

use super::{
    Abort, Base, BpfEngine, Pair, Task, all_accounted, brake::Brake, broken, duplicated, failure,
};
use crate::{
    ebpf::{Cap, Programs},
    engine::copy,
    sys,
};

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
/// 0 of 20 at 1 MiB).
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
    let held = 2 * HELD_RCVBUF as u64;
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

/// Default size below which a direction's average skb counts as small and
/// the direction is moved to user space (`--mode auto`). Each skb the
/// kernel redirects costs a verdict run, a queue operation and a share of
/// a worker wake-up, and leaves as a segment of its own; user space reads
/// many small skbs at once and writes them as one. Measured in
/// BENCHMARKS.md ("adaptive path", tuning logs 16 and 21).
///
/// Not 32 KiB: writes larger than a segment arrive as full skbs
/// alternating with each write's remainder, so a bulk stream of 64 KiB
/// writes averages half a full skb, 32,514-32,768 bytes on loopback and
/// across namespaces, and at 32 KiB moved to user space and back many
/// times a second. 16 KiB writes average 19.8-24.6 KB (medians), 1 KiB
/// writes 1-17 KB.
pub const DEFAULT_SMALL_SKB: u64 = 28 << 10;

/// The average passed-skb size at which a direction moved to user space
/// for its small skbs goes back to the kernel: twice the threshold, but no
/// more than nearly full 64 KiB skbs, or a bulk stream could never return.
/// (Skbs a user-space reader leaves in the queue coalesce, so they come
/// out larger than the same traffic's skbs on the kernel path: a
/// threshold without this gap flips the direction back and forth.)
fn back_to_kernel_at(small_skb: u64) -> u64 {
    (2 * small_skb).min(60 << 10).max(small_skb)
}

/// How long a direction moved for its small skbs stays in user space,
/// in bytes forwarded, before the size of what the verdict passes may
/// send it back. Passed skbs coalesce while the reader lags (TCP merges
/// what waits for a busy socket), so 16 KiB writes looked like bulk in
/// user space (60-260 KB) and like small segments in the kernel (24.5
/// KB): 29 moves out and back in one second. So the stay doubles each
/// time a direction comes back for small skbs soon after it left, up to
/// [`MAX_DWELL`], and starts again at one sample once it stayed away.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dwell {
    /// Bytes to forward before a look at the passed skbs counts.
    bytes: u64,
    /// The direction's redirected total when it last came back from
    /// user space, if it did.
    back_at: Option<u64>,
    /// Whether the running forwarder came for small skbs.
    small: bool,
}

impl Default for Dwell {
    fn default() -> Self {
        Self {
            bytes: ADAPT_SAMPLE,
            back_at: None,
            small: false,
        }
    }
}

impl Dwell {
    /// The direction moves to user space for its small skbs, having
    /// redirected `sent` in all: returns how much it forwards first.
    fn leave(&mut self, sent: u64) -> u64 {
        self.small = true;
        self.bytes = match self.back_at {
            Some(at) if sent.saturating_sub(at) < FLAP => (2 * self.bytes).min(MAX_DWELL),
            _ => ADAPT_SAMPLE,
        };
        self.bytes
    }

    /// A forwarder ended, with the direction's redirected total at `sent`.
    fn ended(&mut self, sent: u64) {
        if std::mem::take(&mut self.small) {
            self.back_at = Some(sent);
        }
    }
}

/// Redirected bytes within which a direction that came back from user
/// space and leaves again for small skbs counts as flapping.
const FLAP: u64 = 64 << 20;

/// The longest stay in user space, in bytes forwarded, before a bulk
/// stream that had flapped may go back to the kernel.
const MAX_DWELL: u64 = 256 << 20;

impl BpfEngine {
    /// The redirected-skb total at which the verdict should next report a
    /// socket that has sent `f` so far: soon when adaptive, so a direction
    /// of small skbs is found long before a window of them has passed.
    fn msg_limit(&self, f: zc_common::Flow) -> u64 {
        if self.small_skb == 0 || self.window == 0 {
            u64::MAX
        } else {
            f.sent_msgs + ADAPT_MSGS
        }
    }
}

/// What a user-space forwarder ended with.
pub(super) enum Forwarded {
    /// The source reached EOF; the direction can be finished.
    Eof,
    /// Nothing passed is left and the verdict redirects again.
    BackToKernel,
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
            matches!(how, Forwarded::Eof)
                .then_some("EOF")
                .unwrap_or("back to the kernel"),
            self.by_user[src].load(Ordering::Relaxed)
        );
        let fin = match how {
            Forwarded::Eof => true,
            // Its FIN may have come while the forwarder owned the source.
            Forwarded::BackToKernel => sys::fin_received(&sys::tcp_info(self.socks[src].as_fd())?),
        };
        if fin && !self.done[src] {
            return self.finish_direction(src).await;
        }
        self.check_backlog(src).await
    }

    /// The verdict reported `src`: it passed its report limit, or its cap.
    /// Moves the cap to what the destination's reader has acknowledged
    /// plus the window, and re-arms. If the verdict had to pass bytes at
    /// the cap (or the direction's skbs are small), holds `src` and returns
    /// a forwarder for what the verdict passes meanwhile.
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
        self.engine.progs.rearm(
            &self.keys[src],
            f.sent + window / 2,
            self.engine.msg_limit(f),
            cap,
            !busy,
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
        // What the verdict passes while held waits in the receive queue,
        // and autotuning (user space reads now) would let the buffer grow
        // to tcp_rmem's maximum (32 MiB here). Fixed only from the first
        // hold: a fixed buffer on every relay socket made the kernel path
        // stall now and then (2 of 25 runs of tests/relay_modes.rs).
        sys::set_rcvbuf(self.socks[src].as_fd(), held_rcvbuf())?;
        self.engine.progs.hold(&self.keys[src])?;
        // A verdict run that read the old entry may still be redirecting.
        // It runs under the socket's lock, so taking that lock once (any
        // setsockopt does) waits it out; every later run sees the hold.
        sys::kick_data_ready(self.socks[src].as_fd())?;
        self.forwarding[src] = true;
        let stay = if small.is_some() {
            self.dwell[src].leave(f.sent)
        } else {
            0
        };
        let fwd = Forwarder {
            progs: self.engine.progs.clone(),
            key: self.keys[src],
            src: (self.socks[src], self.base[src]),
            src_io: self.io(src)?,
            dst: (self.socks[dst], self.base[dst]),
            dst_io: self.io(dst)?,
            by_user: &self.by_user[src],
            small_bytes: &self.small_bytes[src],
            back: (self.keys[dst], &self.by_user[dst]),
            window,
            small_below: small.map(|_| (back_to_kernel_at(self.engine.small_skb), stay)),
        };
        Ok(Some(Box::pin(fwd.run())))
    }

    /// The average size of the skbs the verdict redirected from `src`
    /// since its last report, when adaptive and below the threshold in
    /// this sample and the one before.
    ///
    /// One sample is not enough: the first after a hold, or after the
    /// start of a stream, can average a few KB for bulk traffic (3.3-4.5
    /// KB seen for 64 KiB writes both ways on a busy host), and moved
    /// such streams to user space and back. Small writes stay small for
    /// sample after sample.
    fn small_segments(&mut self, src: usize) -> Option<u64> {
        if self.engine.small_skb == 0 || self.engine.window == 0 {
            return None;
        }
        let now = self.engine.progs.flow(&self.keys[src])?;
        let now = (now.sent, now.sent_msgs);
        let last = std::mem::replace(&mut self.sampled[src], now);
        let (bytes, msgs) = (now.0 - last.0, now.1 - last.1);
        let avg = bytes.checked_div(msgs)?;
        let small = avg < self.engine.small_skb;
        let before = std::mem::replace(&mut self.small_before[src], small);
        (small && before).then_some(avg)
    }
}

/// Bytes written into `s` since pairing and acknowledged by its remote end.
fn acked(s: &TcpStream, base: Base) -> Result<u64, Abort> {
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
fn cap(dst: &TcpStream, dbase: Base, by_user: &AtomicU64, window: u64) -> Result<Cap, Abort> {
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

/// Waits until `dst` has taken every byte of the direction from `src`:
/// what the verdict redirected plus what user space wrote. Returns the
/// redirected total it saw taken. The kernel signals nothing when its
/// redirect backlog empties, so this polls.
pub(super) async fn wait_caught_up(
    progs: &Programs,
    src: SockKey,
    dst: &TcpStream,
    dbase: Base,
    by_user: &AtomicU64,
) -> Result<u64, Abort> {
    let mut wait = Backoff::new();
    loop {
        let sent = progs.flow(&src).ok_or(Abort(None))?.sent;
        let expected = sent + by_user.load(Ordering::Relaxed);
        let w = written(dst, dbase)?;
        if w >= expected {
            return Ok(sent);
        }
        if let Some(abort) = failure(dst) {
            debug!("destination failed while taking redirected bytes");
            return Err(abort);
        }
        wait.sleep(|| debug!("destination has taken {w} of {expected} bytes"))
            .await;
    }
}

/// Bytes of a direction that wait in the kernel for `dst`'s reader:
/// redirected (`sent`, the verdict's total) or forwarded, and not yet
/// acknowledged by `dst`'s remote end.
fn waiting(sent: u64, dst: &TcpStream, dbase: Base, by_user: &AtomicU64) -> Result<u64, Abort> {
    let moved = sent + by_user.load(Ordering::Relaxed);
    Ok(moved.saturating_sub(acked(dst, dbase)?))
}

/// Waits until fewer than `below` bytes of the direction from `src` wait
/// in the kernel for `dst`'s reader: redirected or forwarded, and not yet
/// acknowledged by `dst`'s remote end. Meanwhile the verdict may pass
/// more, so the `brake` keeps looking (what the caller holds counts as
/// unread here).
async fn wait_drained(
    progs: &Programs,
    src: SockKey,
    dst: &TcpStream,
    dbase: Base,
    by_user: &AtomicU64,
    below: u64,
    brake: &mut Brake<'_>,
) -> Result<(), Abort> {
    let mut wait = Backoff::new();
    loop {
        let f = progs.flow(&src).ok_or(Abort(None))?;
        brake.update(f.passed.saturating_sub(by_user.load(Ordering::Relaxed)))?;
        let sent = f.sent;
        let waiting = waiting(sent, dst, dbase, by_user)?;
        if waiting < below {
            return Ok(());
        }
        if let Some(abort) = failure(dst) {
            debug!("destination failed while its reader lagged");
            return Err(abort);
        }
        wait.sleep(|| debug!("{waiting} bytes wait for a slow reader"))
            .await;
    }
}

/// Forwards what the verdict passed to `src`'s own receive queue while
/// held. First lets the destination take everything already redirected
/// (so forwarded bytes follow them), then releases the hold: the verdict
/// keeps passing until user space has forwarded every passed byte, then
/// redirects again.
struct Forwarder<'a> {
    progs: Programs,
    key: SockKey,
    src: (&'a TcpStream, Base),
    src_io: std::sync::Arc<super::io::SockIo>,
    dst: (&'a TcpStream, Base),
    dst_io: std::sync::Arc<super::io::SockIo>,
    by_user: &'a AtomicU64,
    /// Of `by_user`, what was forwarded while `small_below` was set.
    small_bytes: &'a AtomicU64,
    /// The other direction (see [`Brake`]).
    back: (SockKey, &'a AtomicU64),
    /// The hold lasts until fewer than half this many bytes wait for the
    /// destination's reader, so a reader that keeps up only just does not
    /// flip the direction back and forth.
    window: u64,
    /// Set when the direction came for its small skbs: it stays in user
    /// space (held) while the skbs the verdict passes average less than
    /// the first, however idle it gets, and until it has forwarded the
    /// second ([`Dwell`]).
    small_below: Option<(u64, u64)>,
}

impl Forwarder<'_> {
    async fn run(self) -> Result<Forwarded, Abort> {
        let Forwarder {
            progs,
            key,
            src: (src_std, sbase),
            src_io: src,
            dst: (dst, dbase),
            dst_io,
            by_user,
            small_bytes,
            back,
            window,
            mut small_below,
        } = self;
        let mut brake = Brake::new((src_std, sbase), &progs, back);
        if small_below.is_none() {
            let below = allowance(window, dst.as_fd())?.min(window) / 2;
            wait_drained(&progs, key, dst, dbase, by_user, below, &mut brake).await?;
        }
        // Held, the verdict redirects nothing, so this stays true until
        // the release below.
        let mut caught_up = wait_caught_up(&progs, key, dst, dbase, by_user).await?;
        if small_below.is_none() {
            progs.release(&key, cap(dst, dbase, by_user, window)?)?;
        }
        let mut sample = progs.flow(&key).ok_or(Abort(None))?;
        let started_at = by_user.load(Ordering::Relaxed);
        log::trace!(
            "{}/{}: forwarder starts: sent {} passed {} by_user {}",
            key.local_port,
            key.remote_port,
            sample.sent,
            sample.passed,
            by_user.load(Ordering::Relaxed)
        );
        let mut buf = vec![0u8; copy::DEFAULT_BUFFER];
        let mut eof_wait: Option<Backoff> = None;
        let mut last = (0, zc_common::Flow::default());
        // The last read found nothing while passed bytes were missing.
        let mut unreadable = false;
        loop {
            match &mut eof_wait {
                // Passed bytes that are not readable wait in the psock
                // queue, uncounted: look again soon, for the brake.
                None if unreadable => {
                    tokio::select! {
                        r = src.readable() => r?,
                        () = tokio::time::sleep(BRAKE_LOOK) => {}
                    }
                }
                None => src.readable().await?,
                Some(w) => {
                    let (received, f) = last;
                    let fwd = by_user.load(Ordering::Relaxed);
                    w.sleep(|| {
                    debug!(
                        "after FIN: {received} received, {} redirected, {} passed, {fwd} forwarded",
                        f.sent, f.passed
                    )
                })
                .await
                }
            }
            match src.try_read(&mut buf) {
                // The socket says EOF as soon as the FIN is in and its message
                // queue is momentarily empty, though passed bytes may still
                // be on their way into it (the psock backlog). Only an EOF
                // with every received byte accounted for is the end.
                Ok(0) => {
                    let received = sys::tcp_info(src_std.as_fd())?
                        .bytes_received
                        .saturating_sub(1 + sbase.read);
                    let f = progs.flow(&key).ok_or(Abort(None))?;
                    duplicated(received, f)?;
                    if all_accounted(received, f, by_user.load(Ordering::Relaxed)) {
                        return Ok(Forwarded::Eof);
                    }
                    last = (received, f);
                    eof_wait.get_or_insert_with(Backoff::new);
                }
                Ok(n) => {
                    unreadable = false;
                    // What user space forwards waits for the reader too, so
                    // it keeps within the verdict's cap. Unbounded, a held
                    // direction whose reader lagged filled the destination's
                    // send buffer (32 MiB by default; 29 MB seen both ways
                    // across namespaces; 15.4 MiB at a 4 MiB window in
                    // tests/slow_reader_bound.rs, whose bound is 9). At the
                    // cap it waits for half a window of room: one wait per
                    // half window, not one per read.
                    // The redirected total stays put from the read to the
                    // write: the verdict passes while bytes it passed are
                    // not yet forwarded.
                    let f = progs.flow(&key).ok_or(Abort(None))?;
                    let sent = f.sent;
                    let forwarded = by_user.load(Ordering::Relaxed);
                    brake.update(f.passed.saturating_sub(forwarded + n as u64))?;
                    let allowed = allowance(window, dst.as_fd())?;
                    if waiting(sent, dst, dbase, by_user)? + n as u64 > allowed {
                        let below = allowed.min(window) / 2;
                        wait_drained(&progs, key, dst, dbase, by_user, below, &mut brake).await?;
                    }
                    // Released, the verdict redirects again whenever
                    // everything passed has been forwarded, and passes again
                    // at its cap: these bytes may follow redirected ones that
                    // still wait in the kernel's queue for `dst`. Those go
                    // first. (Forwarded at once, they overtook them: seen as
                    // a stream of the right length with a block of bytes
                    // 12 MB early.)
                    if sent != caught_up {
                        caught_up = wait_caught_up(&progs, key, dst, dbase, by_user).await?;
                    }
                    dst_io.write_all(&buf[..n], by_user).await?;
                    progs.set_forwarded(&key, by_user.load(Ordering::Relaxed))?;
                    if let Some((below, stay)) = small_below {
                        small_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        let f = progs.flow(&key).ok_or(Abort(None))?;
                        let (bytes, msgs) =
                            (f.passed - sample.passed, f.passed_msgs - sample.passed_msgs);
                        let stayed = by_user.load(Ordering::Relaxed) - started_at >= stay;
                        if bytes >= ADAPT_SAMPLE && stayed {
                            sample = f;
                            if bytes / msgs.max(1) >= below {
                                // Bulk again: release, and hand the
                                // direction back once the rest is forwarded.
                                debug!(
                                    "skbs average {} bytes again; back to the kernel",
                                    bytes / msgs.max(1)
                                );
                                small_below = None;
                                progs.release(&key, cap(dst, dbase, by_user, window)?)?;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let f = progs.flow(&key).ok_or(Abort(None))?;
                    let unread = f.passed.saturating_sub(by_user.load(Ordering::Relaxed));
                    brake.update(unread)?;
                    unreadable = unread > 0;
                    if small_below.is_some() {
                        continue;
                    }
                    // Everything passed is forwarded: every later verdict
                    // run redirects. One already under way may have read
                    // the old forwarded count and still pass its skb; it
                    // runs under the socket's lock, so taking the lock once
                    // waits it out, and a second look tells.
                    let done = |f: zc_common::Flow| f.passed == by_user.load(Ordering::Relaxed);
                    if done(f) {
                        sys::kick_data_ready(src_std.as_fd())?;
                        if done(progs.flow(&key).ok_or(Abort(None))?) {
                            return Ok(Forwarded::BackToKernel);
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// How often a forwarder looks at passed bytes it cannot read yet.
const BRAKE_LOOK: Duration = Duration::from_millis(2);

/// Redirected skbs between looks at a direction's average skb size.
pub(super) const ADAPT_MSGS: u64 = 512;

/// Bytes a small-skb direction forwards between looks at the size of what
/// the verdict passes.
const ADAPT_SAMPLE: u64 = 1 << 20;

/// Polling delay for waits the kernel gives no event for: starts at 50 µs
/// and doubles to 2 ms; says once, at debug level, when a wait is long.
pub(super) struct Backoff {
    wait: Duration,
    started: std::time::Instant,
    complained: bool,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Self {
            wait: Duration::from_micros(50),
            started: std::time::Instant::now(),
            complained: false,
        }
    }

    pub(super) async fn sleep(&mut self, complain: impl FnOnce()) {
        if !self.complained && self.started.elapsed() > Duration::from_secs(1) {
            self.complained = true;
            complain();
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Duration::from_millis(2));
    }
}
