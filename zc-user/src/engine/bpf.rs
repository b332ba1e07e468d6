//! The BPF engine: both sockets join the kernel's sockmap pair and user
//! space only watches for the ends of the stream and for backlog.
//!
//! The kernel redirects bytes but not FIN or RST. So each direction is
//! closed by hand: when the source's remote end shuts down, wait until
//! every byte that arrived on the source has been written into the
//! destination (the verdict's running total against the destination's TCP
//! byte counts), and only then shut the destination's write side. A reset
//! on either side resets the other.
//!
//! The kernel's redirect queue (the destination psock's backlog) has no
//! bound: a slow destination would let the source's sender fill kernel
//! memory. So the verdict has a cap per direction: it redirects no byte
//! that would leave more than two windows waiting for the destination's
//! reader (redirected and not yet acknowledged). Past the cap it passes
//! the bytes to the source's own receive queue, where they count against
//! its receive buffer, so TCP flow control stops the sender, and it tells
//! user space. User space moves the cap with every report (each half
//! window of redirected bytes) and, once the verdict has passed bytes,
//! *holds* the source: once the destination has caught up, it forwards
//! what was passed, and the verdict redirects again as soon as nothing
//! passed is left, so every byte keeps its place. The bound holds however
//! late user space looks.
//!
//! Taking the source out of the verdict map instead would be simpler, but
//! the kernel drops an skb that is being dequeued while the program is
//! detached (sk_psock_verdict_recv finds no program: SK_DROP). Observed on
//! 6.18 as lost bytes in the middle of a stream.
use std::{
    net::{Shutdown, TcpStream},
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::debug;
use socket2::SockRef;
use tokio::sync::mpsc::UnboundedReceiver;
use zc_common::SockKey;

use super::{
    Summary,
    copy::{self, CopyEngine, pump, to_tokio},
};
use crate::{
    ebpf::{PairError, Programs},
    sys,
    watch::Watcher,
};

/// Default send buffer for paired sockets. The redirect path retries a
/// full destination only after a timer tick, so a destination that can
/// absorb a burst keeps the path from stalling (measured in BENCHMARKS.md).
pub const DEFAULT_SNDBUF: usize = 16 << 20;

/// Default window: per direction, the verdict keeps at most two windows
/// of redirected bytes waiting for the destination's reader (redirect
/// backlog and send queue, until the reader's ACK), and a held sender at
/// most `HELD_RCVBUF` twice over in its own queue. 8 MiB: a reader that
/// never reads costs at most 17 MiB per direction, and a bulk stream whose
/// reader keeps up is rarely held (1 MiB writes: relay CPU 0.04 s/GiB
/// against 0.09 at 4 MiB and 0.014 at 16 MiB; BENCHMARKS.md).
///
/// Holding used to be opt-in: on 6.18 a held stream sometimes got one skb
/// twice. The cause was a spurious TCP retransmission overlapping bytes
/// already handled, which `tcp_read_skb` hands to the verdict whole; the
/// verdict now skips those bytes (zc-ebpf, `skip_handled`; tested by
/// tests/retransmit_overlap.rs).
pub const DEFAULT_WINDOW: u64 = 8 << 20;

/// SO_RCVBUF of relay sockets when a window is set (the kernel doubles
/// it): the most a held direction keeps in its own receive queue, beside
/// the two windows the cap allows. The kernel path drains the queue as
/// skbs arrive, so it only limits the advertised TCP window to about this
/// much (512 KiB per round trip; 128 KiB without it, autotuning only
/// grows buffers that an application reads).
pub const HELD_RCVBUF: usize = 256 << 10;

/// Default size below which a direction's average skb counts as small and
/// the direction is moved to user space (`--mode auto`). Each skb the
/// kernel redirects costs a verdict run, a queue operation and a share of
/// a worker wake-up, and leaves as a segment of its own; user space reads
/// many small skbs at once and writes them as one. Measured in
/// BENCHMARKS.md ("adaptive path").
pub const DEFAULT_SMALL_SKB: u64 = 32 << 10;

/// The average passed-skb size at which a direction moved to user space
/// for its small skbs goes back to the kernel: twice the threshold, but no
/// more than nearly full 64 KiB skbs, or a bulk stream could never return.
/// (Skbs a user-space reader leaves in the queue coalesce, so they come
/// out larger than the same traffic's skbs on the kernel path: a
/// threshold without this gap flips the direction back and forth.)
fn back_to_kernel_at(small_skb: u64) -> u64 {
    (2 * small_skb).min(60 << 10).max(small_skb)
}

#[derive(Clone)]
pub struct BpfEngine {
    progs: Programs,
    watcher: Watcher,
    sndbuf: usize,
    window: u64,
    /// Average skb size below which a direction is forwarded in user
    /// space (0: never, the pure kernel path).
    small_skb: u64,
    /// The sockets belong to another process (the agent pairing a proxy's
    /// sockets): zc must never read or write them itself, or it would race
    /// the owner's own reads and writes.
    foreign: bool,
}

/// Told once the pair is in the kernel, or why it could not be.
pub type PairedReport = tokio::sync::oneshot::Sender<Result<[SockKey; 2], String>>;

/// Byte counts of one socket at pairing time, so that traffic from before
/// the pairing is not mistaken for redirected bytes.
#[derive(Clone, Copy)]
struct Base {
    /// Bytes the application consumed from the socket before pairing.
    read: u64,
    /// Bytes the application wrote into the socket before pairing.
    written: u64,
}

impl Base {
    fn of(fd: BorrowedFd<'_>) -> std::io::Result<Self> {
        let received = sys::bytes_received(fd)?;
        Ok(Self {
            read: received.saturating_sub(sys::inq(fd)?),
            written: sys::bytes_written(fd)?,
        })
    }
}

/// Removes the pair's map entries however the relay ends.
struct Paired<'a> {
    progs: &'a Programs,
    keys: [SockKey; 2],
}

impl Drop for Paired<'_> {
    fn drop(&mut self) {
        self.progs.unpair_ended(&self.keys);
    }
}

/// One relayed connection while it lives.
struct Pair<'a> {
    engine: &'a BpfEngine,
    socks: [&'a TcpStream; 2],
    keys: [SockKey; 2],
    base: [Base; 2],
    /// Whether the kernel redirects what arrives on each socket; `false`
    /// when the kernel refused it at pairing and it is copied instead.
    in_relay: [bool; 2],
    /// A user-space forwarder drains this socket's passed bytes.
    forwarding: [bool; 2],
    done: [bool; 2],
    /// Bytes of each direction moved by user space: copied (not in relay)
    /// or forwarded (passed by the verdict while held).
    by_user: &'a [AtomicU64; 2],
    /// Times a direction was held back (moved to user space).
    holds: u64,
    /// Times a direction of small skbs was moved to user space.
    small: u64,
    /// Each direction's redirected bytes and skbs at its last report, to
    /// tell the average skb size since.
    sampled: [(u64, u64); 2],
}

/// The pair must be reset.
struct Abort;

impl From<std::io::Error> for Abort {
    fn from(e: std::io::Error) -> Self {
        debug!("relay aborted: {e}");
        Abort
    }
}

impl From<PairError> for Abort {
    fn from(e: PairError) -> Self {
        debug!("relay aborted: {e}");
        Abort
    }
}

/// What a user-space forwarder ended with.
enum Forwarded {
    /// The source reached EOF; the direction can be finished.
    Eof,
    /// Nothing passed is left and the verdict redirects again.
    BackToKernel,
}

type Task<'a, T> = Option<Pin<Box<dyn Future<Output = Result<T, Abort>> + Send + 'a>>>;

impl BpfEngine {
    pub fn new(progs: Programs, watcher: Watcher) -> Self {
        Self {
            progs,
            watcher,
            sndbuf: DEFAULT_SNDBUF,
            window: DEFAULT_WINDOW,
            small_skb: 0,
            foreign: false,
        }
    }

    /// For sockets another process owns: no user-space copy or forwarding
    /// ever (a pair the kernel refuses fails instead), and no holding back,
    /// which would need user space to forward.
    pub fn for_foreign_sockets(mut self) -> Self {
        self.foreign = true;
        self.window = 0;
        self
    }

    /// Send buffer given to both sockets of each pair (0: kernel default).
    pub fn with_sndbuf(mut self, bytes: usize) -> Self {
        self.sndbuf = bytes;
        self
    }

    /// Moves a direction whose skbs average less than `bytes` to user
    /// space, and back once they average twice that (0: never). Needs a
    /// window: the verdict's reports drive the check.
    pub fn with_adaptive(mut self, bytes: u64) -> Self {
        self.small_skb = bytes;
        self
    }

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

    /// Backlog bound per direction (0: unbounded, as the kernel does).
    pub fn with_window(mut self, bytes: u64) -> Self {
        self.window = bytes;
        self
    }

    pub async fn relay(&self, a: TcpStream, b: TcpStream) -> Result<Summary> {
        self.relay_reporting(a, b, None, super::Counts::default())
            .await
    }

    /// [`Self::relay`], telling `report` as soon as the pair is in the
    /// kernel (or why not), and keeping `by_user` up to date with the bytes
    /// user space moved (held directions; the kernel's share is in the
    /// verdict's counters).
    pub async fn relay_reporting(
        &self,
        a: TcpStream,
        b: TcpStream,
        report: Option<PairedReport>,
        by_user: super::Counts,
    ) -> Result<Summary> {
        let fail = |report: Option<PairedReport>, e: &anyhow::Error| {
            if let Some(r) = report {
                let _ = r.send(Err(format!("{e:#}")));
            }
        };
        let socks = [&a, &b];
        for s in socks {
            s.set_nodelay(true).context("setting TCP_NODELAY")?;
            if self.sndbuf > 0 {
                sys::set_sndbuf(s.as_fd(), self.sndbuf).context("setting SO_SNDBUF")?;
            }
            if self.window > 0 && !self.foreign {
                // What the verdict passes while a direction is held waits
                // here, and autotuning would let it grow to tcp_rmem's
                // maximum (32 MiB here).
                sys::set_rcvbuf(s.as_fd(), HELD_RCVBUF).context("setting SO_RCVBUF")?;
            }
        }
        let base = [Base::of(a.as_fd())?, Base::of(b.as_fd())?];
        let mut events = self
            .watcher
            .watch(&[a.as_fd(), b.as_fd()])
            .context("watching the pair")?;
        let pair = if self.foreign {
            self.progs.pair_foreign(a.as_fd(), b.as_fd(), self.window)
        } else {
            self.progs.pair_relay(a.as_fd(), b.as_fd(), self.window)
        };
        let pairing = match pair {
            Ok(p) if self.foreign && p.in_relay != [true, true] => {
                self.progs.unpair(&p.keys);
                let e = anyhow::anyhow!(
                    "a socket's remote end finished while it was being paired; left to its owner"
                );
                fail(report, &e);
                return Err(e);
            }
            Ok(p) => p,
            Err(e) if self.foreign => {
                let e = anyhow::Error::new(e).context("pairing the sockets in the kernel");
                fail(report, &e);
                return Err(e);
            }
            Err(PairError::NotEstablished(k)) => {
                // Nothing moved yet; a socket that already finished (say a
                // client that sent its request and shut down at once) is
                // relayed in user space instead.
                debug!("{k:?} finished before pairing; copying this connection");
                drop(events);
                return CopyEngine::default().relay(a, b).await;
            }
            Err(e) => {
                reset(&socks);
                return Err(e).context("pairing the sockets in the kernel");
            }
        };
        let paired = Paired {
            progs: &self.progs,
            keys: pairing.keys,
        };
        // Should this process die mid-stream (kill -9), the kernel closes
        // these sockets and frees the maps; armed this way the close sends
        // RST, so neither end takes a cut stream for a complete one.
        // Disarmed once both directions have ended cleanly.
        if !self.foreign {
            reset(&socks);
        }
        if let Some(r) = report {
            let _ = r.send(Ok(pairing.keys));
        }
        let mut limits = [
            self.progs.limit_events(pairing.keys[0]),
            self.progs.limit_events(pairing.keys[1]),
        ];
        if self.window > 0 && self.small_skb > 0 {
            for k in &pairing.keys {
                if let Err(e) = self
                    .progs
                    .rearm(k, self.window / 2, ADAPT_MSGS, 2 * self.window)
                {
                    reset(&socks);
                    return Err(e).context("arming the adaptive path");
                }
            }
        }
        let by_user: &[AtomicU64; 2] = &by_user;
        let mut pair = Pair {
            engine: self,
            socks,
            keys: pairing.keys,
            base,
            in_relay: pairing.in_relay,
            forwarding: [false; 2],
            done: [false; 2],
            by_user,
            holds: 0,
            small: 0,
            sampled: Default::default(),
        };
        let outcome = pair.run(&mut events, &mut limits).await;
        let reset_happened = outcome.is_err();
        if reset_happened {
            reset(&socks);
        } else if !self.foreign {
            for s in socks {
                let _ = SockRef::from(s).set_linger(None);
            }
        }
        let mut moved = [0u64; 2];
        for (i, m) in moved.iter_mut().enumerate() {
            let sent = self.progs.flow(&pair.keys[i]).map_or(0, |f| f.sent);
            *m = sent + by_user[i].load(Ordering::Relaxed);
        }
        // Leave the maps before the sockets close (the drop order below).
        drop(paired);
        drop(events);
        Ok(Summary {
            a_to_b: moved[0],
            b_to_a: moved[1],
            reset: reset_happened,
            holds: pair.holds,
            small: pair.small,
        })
    }
}

impl<'a> Pair<'a> {
    async fn run(
        &mut self,
        events: &mut crate::watch::Subscription,
        limits: &mut [UnboundedReceiver<SockKey>; 2],
    ) -> Result<(), Abort> {
        let mut copies: [Task<'a, ()>; 2] = [None, None];
        for (src, slot) in copies.iter_mut().enumerate() {
            if !self.in_relay[src] {
                *slot = self.copy_direction(src)?;
            }
        }
        let mut forwarders: [Task<'a, Forwarded>; 2] = [None, None];
        let [copy_a, copy_b] = &mut copies;
        let [fwd_a, fwd_b] = &mut forwarders;
        let [limit_a, limit_b] = limits;
        while !(self.done[0] && self.done[1]) {
            tokio::select! {
                ev = events.next() => {
                    let Some(ev) = ev else {
                        debug!("socket watcher stopped");
                        return Err(Abort);
                    };
                    if failed(self.socks[ev.side]) {
                        debug!("side {} failed; resetting the other", ev.side);
                        return Err(Abort);
                    }
                    let src = ev.side;
                    // A forwarder sees the EOF itself.
                    if ev.read_closed && !self.done[src] && self.in_relay[src] && !self.forwarding[src]
                        && let Some(f) = self.finish_direction(src).await?
                    {
                        if src == 0 { *fwd_a = Some(f) } else { *fwd_b = Some(f) }
                    }
                }
                Some(_) = limit_a.recv() => {
                    if let Some(f) = self.check_backlog(0).await? { *fwd_a = Some(f) }
                }
                Some(_) = limit_b.recv() => {
                    if let Some(f) = self.check_backlog(1).await? { *fwd_b = Some(f) }
                }
                r = poll_slot(fwd_a) => {
                    if let Some(f) = self.forwarder_ended(0, r?).await? { *fwd_a = Some(f) }
                }
                r = poll_slot(fwd_b) => {
                    if let Some(f) = self.forwarder_ended(1, r?).await? { *fwd_b = Some(f) }
                }
                r = poll_slot(copy_a) => { r?; self.done[0] = true }
                r = poll_slot(copy_b) => { r?; self.done[1] = true }
            }
        }
        Ok(())
    }

    /// A forwarder ended; returns the next one if the verdict passed more
    /// bytes at its cap meanwhile (its report may have come while this
    /// one still ran, and no later skb need come to report again).
    async fn forwarder_ended(
        &mut self,
        src: usize,
        how: Forwarded,
    ) -> Result<Task<'a, Forwarded>, Abort> {
        self.forwarding[src] = false;
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

    fn flow(&self, src: usize) -> Result<zc_common::Flow, Abort> {
        self.engine.progs.flow(&self.keys[src]).ok_or(Abort)
    }

    /// The source's remote end sent FIN: once every byte it sent before
    /// has reached the destination, pass the FIN on.
    /// Returns a forwarder instead if the verdict passed bytes at its cap
    /// on the way (that forwarder then sees the EOF and comes back here).
    async fn finish_direction(&mut self, src: usize) -> Result<Task<'a, Forwarded>, Abort> {
        let dst = 1 - src;
        // Every byte before the FIN has been through the verdict once the
        // source's received count equals what the verdict redirected or
        // passed. tcpi_bytes_received counts the FIN as one byte.
        let mut wait = Backoff::new();
        loop {
            let info = sys::tcp_info(self.socks[src].as_fd())?;
            let received = info.bytes_received.saturating_sub(1 + self.base[src].read);
            let f = self.flow(src)?;
            duplicated(received, f)?;
            let forwarded = self.by_user[src].load(Ordering::Relaxed);
            if all_accounted(received, f, forwarded) {
                break;
            }
            if f.passed > forwarded {
                return self.check_backlog(src).await;
            }
            wait.sleep(|| {
                debug!(
                    "side {src}: {received} bytes received, {} through the verdict",
                    f.sent + f.passed
                )
            })
            .await;
        }
        if let Some(c) = self.engine.progs.counters(&self.keys[src])
            && c.failed > 0
        {
            debug!("the kernel dropped {} redirects from side {src}", c.failed);
            return Err(Abort);
        }
        wait_caught_up(
            &self.engine.progs,
            self.keys[src],
            self.socks[dst],
            self.base[dst],
            &self.by_user[src],
        )
        .await?;
        // EPIPE/ENOTCONN here means dst already failed; its own event
        // reports that.
        let _ = self.socks[dst].shutdown(Shutdown::Write);
        debug!("side {src}: FIN passed on");
        self.done[src] = true;
        Ok(None)
    }

    /// The verdict reported `src`: it passed its report limit, or its cap.
    /// Moves the cap to what the destination's reader has acknowledged
    /// plus the window, and re-arms. If the verdict had to pass bytes at
    /// the cap (or the direction's skbs are small), holds `src` and returns
    /// a forwarder for what the verdict passes meanwhile.
    async fn check_backlog(&mut self, src: usize) -> Result<Task<'a, Forwarded>, Abort> {
        let dst = 1 - src;
        let window = self.engine.window;
        let f = self.flow(src)?;
        let cap = cap(self.socks[dst], self.base[dst], &self.by_user[src], window)?;
        self.engine.progs.rearm(
            &self.keys[src],
            f.sent + window / 2,
            self.engine.msg_limit(f),
            cap,
        )?;
        if self.forwarding[src] || self.done[src] {
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
                debug!("holding side {src}: a window of bytes waits in the kernel for side {dst}");
                self.holds += 1;
            }
        }
        self.engine.progs.hold(&self.keys[src])?;
        // A verdict run that read the old entry may still be redirecting.
        // It runs under the socket's lock, so taking that lock once (any
        // setsockopt does) waits it out; every later run sees the hold.
        sys::kick_data_ready(self.socks[src].as_fd())?;
        self.forwarding[src] = true;
        let fwd = Forwarder {
            progs: self.engine.progs.clone(),
            key: self.keys[src],
            src: (self.socks[src], self.base[src]),
            src_io: to_tokio(self.socks[src].try_clone()?).map_err(|_| Abort)?,
            dst: (self.socks[dst], self.base[dst]),
            dst_io: to_tokio(self.socks[dst].try_clone()?).map_err(|_| Abort)?,
            by_user: &self.by_user[src],
            window,
            small_below: small.map(|_| back_to_kernel_at(self.engine.small_skb)),
        };
        Ok(Some(Box::pin(fwd.run())))
    }

    /// The average size of the skbs the verdict redirected from `src`
    /// since its last report, when adaptive and below the threshold.
    fn small_segments(&mut self, src: usize) -> Option<u64> {
        if self.engine.small_skb == 0 || self.engine.window == 0 {
            return None;
        }
        let now = self.engine.progs.flow(&self.keys[src])?;
        let now = (now.sent, now.sent_msgs);
        let last = std::mem::replace(&mut self.sampled[src], now);
        let (bytes, msgs) = (now.0 - last.0, now.1 - last.1);
        let avg = bytes.checked_div(msgs)?;
        (avg < self.engine.small_skb).then_some(avg)
    }

    /// Copies what arrives on `src` to the other socket in user space.
    /// Only used when the kernel refused `src` at pairing, so nothing of
    /// that direction is in the kernel's redirect path.
    fn copy_direction(&self, src: usize) -> Result<Task<'a, ()>, Abort> {
        let r = to_tokio(self.socks[src].try_clone()?).map_err(|_| Abort)?;
        let w = to_tokio(self.socks[1 - src].try_clone()?).map_err(|_| Abort)?;
        let count = &self.by_user[src];
        Ok(Some(Box::pin(async move {
            pump(&r, &w, copy::DEFAULT_BUFFER, count)
                .await
                .map_err(Abort::from)
        })))
    }
}

/// Has every byte received on a source left it, either redirected by the
/// kernel or read by user space (`read`)? User space must also have read
/// everything the verdict passed. `read` may exceed `passed`: at the end
/// of a held stream the socket can hand user space bytes the verdict never
/// saw (seen on 6.18 after FIN), which are still in order.
fn all_accounted(received: u64, f: zc_common::Flow, read: u64) -> bool {
    f.passed <= read && received <= f.sent + read
}

/// The verdict saw more bytes than TCP received. It skips retransmitted
/// bytes it already handled, so this should never happen; if it does, the
/// destination may have got bytes twice, and the caller resets both sides
/// so nobody takes the stream as complete.
fn duplicated(received: u64, f: zc_common::Flow) -> Result<(), Abort> {
    let seen = f.sent + f.passed;
    if seen > received {
        log::error!(
            "the verdict handled {} bytes more than TCP received; resetting the connection",
            seen - received
        );
        return Err(Abort);
    }
    Ok(())
}

/// Bytes written into `s` since pairing and acknowledged by its remote end.
fn acked(s: &TcpStream, base: Base) -> Result<u64, Abort> {
    Ok(sys::tcp_info(s.as_fd())?
        .bytes_acked
        .saturating_sub(base.written))
}

/// The verdict's cap for the direction into `dst` (see `Peer::cap`): the
/// redirected total at which two windows wait for `dst`'s remote end to
/// acknowledge them, counting what user space wrote into `dst` too.
/// Reports come every half window, and the cap moves with each, so a
/// reader that keeps within a window and a half never meets it.
fn cap(dst: &TcpStream, dbase: Base, by_user: &AtomicU64, window: u64) -> Result<u64, Abort> {
    if window == 0 {
        return Ok(0);
    }
    let taken = acked(dst, dbase)?.saturating_sub(by_user.load(Ordering::Relaxed));
    Ok(taken + 2 * window)
}

/// Bytes written into `s` since pairing.
fn written(s: &TcpStream, base: Base) -> Result<u64, Abort> {
    Ok(sys::bytes_written(s.as_fd())?.saturating_sub(base.written))
}

/// Waits until `dst` has taken every byte of the direction from `src`:
/// what the verdict redirected plus what user space wrote. The kernel
/// signals nothing when its redirect backlog empties, so this polls.
async fn wait_caught_up(
    progs: &Programs,
    src: SockKey,
    dst: &TcpStream,
    dbase: Base,
    by_user: &AtomicU64,
) -> Result<(), Abort> {
    let mut wait = Backoff::new();
    loop {
        let sent = progs.flow(&src).ok_or(Abort)?.sent;
        let expected = sent + by_user.load(Ordering::Relaxed);
        let w = written(dst, dbase)?;
        if w >= expected {
            return Ok(());
        }
        if failed(dst) {
            debug!("destination failed while taking redirected bytes");
            return Err(Abort);
        }
        wait.sleep(|| debug!("destination has taken {w} of {expected} bytes"))
            .await;
    }
}

/// Waits until fewer than `below` bytes of the direction from `src` wait
/// in the kernel for `dst`'s reader: redirected or forwarded, and not yet
/// acknowledged by `dst`'s remote end.
async fn wait_drained(
    progs: &Programs,
    src: SockKey,
    dst: &TcpStream,
    dbase: Base,
    by_user: &AtomicU64,
    below: u64,
) -> Result<(), Abort> {
    let mut wait = Backoff::new();
    loop {
        let moved = progs.flow(&src).ok_or(Abort)?.sent + by_user.load(Ordering::Relaxed);
        let waiting = moved.saturating_sub(acked(dst, dbase)?);
        if waiting < below {
            return Ok(());
        }
        if failed(dst) {
            debug!("destination failed while its reader lagged");
            return Err(Abort);
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
    src_io: tokio::net::TcpStream,
    dst: (&'a TcpStream, Base),
    dst_io: tokio::net::TcpStream,
    by_user: &'a AtomicU64,
    /// The hold lasts until fewer than half this many bytes wait for the
    /// destination's reader, so a reader that keeps up only just does not
    /// flip the direction back and forth.
    window: u64,
    /// Set when the direction came for its small skbs: it stays in user
    /// space (held) while the skbs the verdict passes average less than
    /// this, however idle it gets.
    small_below: Option<u64>,
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
            window,
            mut small_below,
        } = self;
        if small_below.is_none() {
            wait_drained(&progs, key, dst, dbase, by_user, window / 2).await?;
        }
        wait_caught_up(&progs, key, dst, dbase, by_user).await?;
        if small_below.is_none() {
            progs.release(&key, cap(dst, dbase, by_user, window)?)?;
        }
        let mut sample = progs.flow(&key).ok_or(Abort)?;
        let mut buf = vec![0u8; copy::DEFAULT_BUFFER];
        let mut eof_wait: Option<Backoff> = None;
        let mut last = (0, zc_common::Flow::default());
        loop {
            match &mut eof_wait {
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
                    let f = progs.flow(&key).ok_or(Abort)?;
                    duplicated(received, f)?;
                    if all_accounted(received, f, by_user.load(Ordering::Relaxed)) {
                        return Ok(Forwarded::Eof);
                    }
                    last = (received, f);
                    eof_wait.get_or_insert_with(Backoff::new);
                }
                Ok(n) => {
                    copy::write_all(&dst_io, &buf[..n], by_user).await?;
                    progs.set_forwarded(&key, by_user.load(Ordering::Relaxed))?;
                    if let Some(below) = small_below {
                        // Forwarding for good: the window bounds what waits
                        // for the destination's reader here too.
                        wait_drained(&progs, key, dst, dbase, by_user, window).await?;
                        let f = progs.flow(&key).ok_or(Abort)?;
                        let (bytes, msgs) =
                            (f.passed - sample.passed, f.passed_msgs - sample.passed_msgs);
                        if bytes >= ADAPT_SAMPLE {
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
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && small_below.is_some() => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Everything passed is forwarded: every later verdict
                    // run redirects. One already under way may have read
                    // the old forwarded count and still pass its skb; it
                    // runs under the socket's lock, so taking the lock once
                    // waits it out, and a second look tells.
                    let done = |f: zc_common::Flow| f.passed == by_user.load(Ordering::Relaxed);
                    if done(progs.flow(&key).ok_or(Abort)?) {
                        sys::kick_data_ready(src_std.as_fd())?;
                        if done(progs.flow(&key).ok_or(Abort)?) {
                            return Ok(Forwarded::BackToKernel);
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Redirected skbs between looks at a direction's average skb size.
const ADAPT_MSGS: u64 = 512;

/// Bytes a small-skb direction forwards between looks at the size of what
/// the verdict passes.
const ADAPT_SAMPLE: u64 = 1 << 20;

/// Polling delay for waits the kernel gives no event for: starts at 50 µs
/// and doubles to 2 ms; says once, at debug level, when a wait is long.
struct Backoff {
    wait: Duration,
    started: std::time::Instant,
    complained: bool,
}

impl Backoff {
    fn new() -> Self {
        Self {
            wait: Duration::from_micros(50),
            started: std::time::Instant::now(),
            complained: false,
        }
    }

    async fn sleep(&mut self, complain: impl FnOnce()) {
        if !self.complained && self.started.elapsed() > Duration::from_secs(1) {
            self.complained = true;
            complain();
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Duration::from_millis(2));
    }
}

/// Has this socket been reset, or otherwise failed for good? A reset
/// leaves its errno in SO_ERROR. The TCP state alone cannot tell: a socket
/// that closed gracefully in both directions also ends in TCP_CLOSE (the
/// kernel hands TIME_WAIT to a separate timewait socket).
fn failed(s: &TcpStream) -> bool {
    match SockRef::from(s).take_error() {
        Ok(Some(e)) => {
            debug!("socket error: {e}");
            true
        }
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Aborts both connections: their close() will send RST.
fn reset(socks: &[&TcpStream]) {
    for s in socks {
        let _ = sys::set_reset_on_close(s.as_fd());
    }
}

/// Resolves when the future in `slot` does, then empties the slot; never
/// resolves for an empty slot.
async fn poll_slot<T>(slot: &mut Option<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> T {
    match slot {
        Some(f) => {
            let out = f.await;
            *slot = None;
            out
        }
        None => std::future::pending().await,
    }
}
