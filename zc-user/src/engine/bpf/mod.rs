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
//! Backpressure and the adaptive path, both of which move a direction
//! between the kernel and user space, live in `switch`.
mod adaptive;
mod brake;
mod ending;
mod forward;
mod hand_back;
mod io;
mod park;
mod parked_read;
mod switch;
mod unstick;

use std::{
    net::{Shutdown, TcpStream},
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use log::{debug, warn};
use socket2::SockRef;
use tokio::sync::mpsc::UnboundedReceiver;
use zc_common::SockKey;

use self::{
    adaptive::ADAPT_MSGS,
    ending::{failure, reset},
    switch::Forwarded,
};
pub use self::{
    adaptive::DEFAULT_SMALL_SKB,
    hand_back::{HandBack, HandedBack},
    switch::{DEFAULT_WINDOW, HELD_RCVBUF, PRESSED_RCVBUF, allowance},
};
use super::{
    Summary,
    copy::{self, CopyEngine},
};
use crate::{
    ebpf::{Cap, PairError, Programs},
    sys,
    watch::Watcher,
};

/// Default send buffer for paired sockets. The redirect path retries a
/// full destination only after a timer tick, so a destination that can
/// absorb a burst keeps the path from stalling (measured in BENCHMARKS.md).
pub const DEFAULT_SNDBUF: usize = 16 << 20;

#[derive(Clone)]
pub struct BpfEngine {
    progs: Programs,
    watcher: Watcher,
    sndbuf: usize,
    window: u64,
    /// Average skb size below which a direction is forwarded in user
    /// space (0: never, the pure kernel path).
    small_skb: u64,
    /// End holds with a peeking hand-back (see `forward::peek_round`).
    peek_hand_back: bool,
    /// Park a direction whose reader lags (see `park`) before it needs
    /// holding: the programs' `zc_park` is attached.
    park: bool,
    /// Park a direction of small skbs and read it as a plain socket
    /// (`zc_park` is attached), rather than hold it and read what the
    /// verdict passes.
    read_parked: bool,
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

/// Drops the limit listeners of a pairing however it ends (a failed
/// pairing has no map entries to take them along).
struct Listening<'a> {
    progs: &'a Programs,
    keys: [SockKey; 2],
}

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.progs.stop_listening(&self.keys);
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
    /// Registrations with the runtime, for directions moved in user space.
    io: &'a io::Registrations,
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
    /// Of `by_user`, the bytes forwarded while a direction was in user
    /// space for its small skbs.
    small_bytes: &'a [AtomicU64; 2],
    /// Times a direction was held back (moved to user space).
    holds: u64,
    /// Times a direction of small skbs was moved to user space.
    small: u64,
    /// Times a direction was parked (asked to be, at least).
    parks: u64,
    /// Times a destination was made to announce its window (`unstick`).
    kicks: &'a AtomicU64,
    /// The task in `forwarding` is a parker, not a forwarder.
    parking: [bool; 2],
    /// The task in `forwarding` reads a socket parked for its small skbs
    /// (`parked_read`).
    reading_parked: [bool; 2],
    /// A park asked for reading did not happen: small skbs are held.
    park_failed: [bool; 2],
    /// Out of `RELAY` for good: parked when its remote end's FIN came
    /// (see `switch::Forwarded::Stranded`).
    stranded: [bool; 2],
    /// Each direction's redirected bytes and skbs at its last report, to
    /// tell the average skb size since.
    sampled: [(u64, u64); 2],
    /// Whether each direction's last sample averaged small skbs: a
    /// direction moves only after two in a row (see `small_segments`).
    small_before: [bool; 2],
    /// Per direction, while forwarded for its small skbs, or how it last
    /// came back from that (see [`adaptive::Dwell`]).
    dwell: [adaptive::Dwell; 2],
    /// Set once the sockets went back to their owner (foreign pairs).
    handed_back: Option<HandedBack>,
}

/// The pair must be reset; what failed, when a socket call said so (the
/// access log names it).
struct Abort(Option<std::io::ErrorKind>);

impl From<std::io::Error> for Abort {
    fn from(e: std::io::Error) -> Self {
        debug!("relay aborted: {e}");
        Abort(Some(e.kind()))
    }
}

/// Whether to say again that the maps are full: at most every 10 s, so
/// a relay at the limit does not log once per connection.
fn full_notice_due() -> bool {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    (last == 0 || now >= last + 10)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

impl From<PairError> for Abort {
    fn from(e: PairError) -> Self {
        debug!("relay aborted: {e}");
        Abort(None)
    }
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
            peek_hand_back: false,
            park: false,
            read_parked: false,
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

    /// Bytes the kernel redirected for this engine's pairs, live and ended.
    pub fn kernel_bytes(&self) -> u64 {
        self.progs.kernel_bytes()
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

    /// What the verdict has done with the bytes arriving on each socket
    /// of a pair: (redirected, passed to user space), for whoever watches
    /// a pair for progress: the relay itself never reads in this mode.
    pub fn handled(&self, keys: &[SockKey; 2]) -> [(u64, u64); 2] {
        keys.map(|k| self.progs.flow(&k).map_or((0, 0), |f| (f.sent, f.passed)))
    }

    /// Backlog bound per direction (0: unbounded, as the kernel does).
    pub fn with_window(mut self, bytes: u64) -> Self {
        self.window = bytes;
        self
    }

    /// Hand held directions back by peeking (`zc relay --peek-hand-back`).
    pub fn with_peek_hand_back(mut self, on: bool) -> Self {
        self.peek_hand_back = on;
        self
    }

    /// Park lagging directions (`zc_park` must be attached:
    /// [`Programs::enable_parking`]; without it this does nothing).
    pub fn with_park(mut self, on: bool) -> Self {
        self.park = on && self.progs.parking();
        self
    }

    /// Park directions of small skbs to read them (`zc_park` must be
    /// attached; without it they are held, and what the verdict passes is
    /// read).
    pub fn with_parked_reads(mut self, on: bool) -> Self {
        self.read_parked = on && self.progs.parking();
        self
    }

    /// Whether directions of small skbs are parked to be read
    /// ([`Self::with_parked_reads`]).
    pub fn reads_parked(&self) -> bool {
        self.read_parked
    }

    /// Whether lagging directions are parked ([`Self::with_park`]).
    pub fn parks(&self) -> bool {
        self.park
    }

    /// Tells the parking program which sockets are this relay's: those
    /// accepted on `listen`'s port and those connected to `upstream`
    /// (nothing without parking).
    pub fn park_ends(
        &self,
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
    ) -> Result<()> {
        if self.park || self.read_parked {
            self.progs.park_ends(listen, upstream)?;
        }
        Ok(())
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
        self.relay_inner(a, b, report, by_user, None).await
    }

    /// [`Self::relay_reporting`] for another process's sockets (see
    /// [`Self::for_foreign_sockets`]); a request on `hand_back` gives them
    /// back to that process (see [`HandedBack`]).
    pub async fn relay_foreign(
        &self,
        a: TcpStream,
        b: TcpStream,
        report: PairedReport,
        hand_back: tokio::sync::oneshot::Receiver<HandBack>,
    ) -> Result<Summary> {
        self.relay_inner(
            a,
            b,
            Some(report),
            super::Counts::default(),
            Some(hand_back),
        )
        .await
    }

    async fn relay_inner(
        &self,
        a: TcpStream,
        b: TcpStream,
        report: Option<PairedReport>,
        by_user: super::Counts,
        mut hand_back: Option<tokio::sync::oneshot::Receiver<HandBack>>,
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
        }
        if self.park && self.window > 0 {
            // See `park::park_rcvbuf`.
            for s in socks {
                sys::set_rcvbuf(s.as_fd(), park::park_rcvbuf(self.window))
                    .context("setting SO_RCVBUF")?;
            }
        }
        let base = [Base::of(a.as_fd())?, Base::of(b.as_fd())?];
        let mut events = self
            .watcher
            .watch(&[a.as_fd(), b.as_fd()])
            .context("watching the pair")?;
        // Listen before the sockets join the maps: the verdict may report
        // within microseconds of pairing, and a report nobody hears is
        // never repeated (seen as a direction passing forever, unwatched).
        let keys = [sys::sock_key(a.as_fd())?, sys::sock_key(b.as_fd())?];
        let mut limits = keys.map(|k| self.progs.limit_events(k));
        let listening = Listening {
            progs: &self.progs,
            keys,
        };
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
                // Counted like a held direction: whoever watches the
                // relay's progress (--idle-timeout) sees these bytes move.
                return CopyEngine::default().relay_counted(a, b, by_user).await;
            }
            Err(PairError::Full(map)) => {
                // More pairs than the maps were sized for (the relay sizes
                // them to --max-conns, so another user of the programs
                // took entries): this connection is still served, by copy.
                if full_notice_due() {
                    warn!(
                        "map `{map}` is full; relaying new connections in user space (copy) \
                         until pairs end"
                    );
                }
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
        if pairing.keys != keys {
            limits = pairing.keys.map(|k| self.progs.limit_events(k));
        }
        if self.window > 0 && self.small_skb > 0 {
            for (i, k) in pairing.keys.iter().enumerate() {
                let armed = (|| -> Result<()> {
                    let cap = switch::allowance(self.window, socks[1 - i].as_fd())?;
                    Ok(self.progs.rearm(
                        k,
                        self.window / 2,
                        ADAPT_MSGS,
                        Cap::fixed(cap),
                        true,
                        0,
                    )?)
                })();
                if let Err(e) = armed {
                    reset(&socks);
                    return Err(e).context("arming the adaptive path");
                }
            }
        }
        let by_user: &[AtomicU64; 2] = &by_user;
        let small_bytes: [AtomicU64; 2] = Default::default();
        let kicks = AtomicU64::new(0);
        // Dropped (deregistered) before `a` and `b`, which close last.
        let io = io::Registrations::default();
        let mut pair = Pair {
            engine: self,
            socks,
            io: &io,
            keys: pairing.keys,
            base,
            in_relay: pairing.in_relay,
            forwarding: [false; 2],
            done: [false; 2],
            by_user,
            small_bytes: &small_bytes,
            holds: 0,
            small: 0,
            parks: 0,
            kicks: &kicks,
            parking: [false; 2],
            reading_parked: [false; 2],
            park_failed: [false; 2],
            stranded: [false; 2],
            sampled: Default::default(),
            small_before: [false; 2],
            dwell: Default::default(),
            handed_back: None,
        };
        let outcome = pair.run(&mut events, &mut limits, &mut hand_back).await;
        let cause = outcome.as_ref().err().and_then(|a| a.0);
        let reset_happened =
            outcome.is_err() || matches!(pair.handed_back, Some(HandedBack::Reset(_)));
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
        drop(listening);
        drop(events);
        Ok(Summary {
            a_to_b: moved[0],
            b_to_a: moved[1],
            reset: reset_happened,
            cause,
            holds: pair.holds,
            parks: pair.parks,
            small: pair.small,
            small_bytes: small_bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum(),
            kicks: kicks.load(Ordering::Relaxed),
        })
    }
}

impl<'a> Pair<'a> {
    async fn run(
        &mut self,
        events: &mut crate::watch::Subscription,
        limits: &mut [UnboundedReceiver<SockKey>; 2],
        hand_back: &mut Option<tokio::sync::oneshot::Receiver<HandBack>>,
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
                        return Err(Abort(None));
                    };
                    if let Some(abort) = failure(self.socks[ev.side]) {
                        debug!("side {} failed; resetting the other", ev.side);
                        return Err(abort);
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
                answer = asked(hand_back) => {
                    let how = self.hand_back().await;
                    debug!("handed back: {how:?}");
                    self.handed_back = Some(how.clone());
                    let _ = answer.send(how);
                    return Ok(());
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

    /// Whether zc has shut socket `i` for writing: the other direction
    /// ended and its FIN was passed on. A socket rejoins a sockmap only
    /// while established, so `i`'s own direction parks no more.
    fn shut(&self, i: usize) -> bool {
        self.done[1 - i]
    }

    fn flow(&self, src: usize) -> Result<zc_common::Flow, Abort> {
        self.engine.progs.flow(&self.keys[src]).ok_or(Abort(None))
    }

    /// Copies what arrives on `src` to the other socket in user space.
    /// Only used when the kernel refused `src` at pairing, so nothing of
    /// that direction is in the kernel's redirect path.
    fn copy_direction(&self, src: usize) -> Result<Task<'a, ()>, Abort> {
        let (r, w) = (self.io(src)?, self.io(1 - src)?);
        let dst = self.socks[1 - src];
        let count = &self.by_user[src];
        Ok(Some(Box::pin(async move {
            let mut buf = vec![0u8; copy::DEFAULT_BUFFER];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n], count).await?;
            }
            dst.shutdown(Shutdown::Write)?;
            Ok(())
        })))
    }

    /// Socket `i`'s registration with the runtime, made on first use.
    fn io(&self, i: usize) -> Result<std::sync::Arc<io::SockIo>, Abort> {
        // SAFETY: the registrations are a local of `relay_inner`, which
        // owns both sockets, and so are the tasks that hold clones of
        // them, so all are dropped before either socket closes.
        Ok(unsafe { io::registered(&self.io[i], self.socks[i]) }?)
    }
}

/// The next hand-back request; never resolves without a request channel,
/// or once its sender is gone.
async fn asked(rx: &mut Option<tokio::sync::oneshot::Receiver<HandBack>>) -> HandBack {
    if let Some(r) = rx {
        match r.await {
            Ok(answer) => return answer,
            // A finished receiver must not be polled again.
            Err(_) => *rx = None,
        }
    }
    std::future::pending().await
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
