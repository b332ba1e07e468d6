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
//! memory. The verdict reports a source each time it has redirected
//! another `window` bytes; if the destination is then more than `window`
//! behind, the source leaves the verdict map until the destination has
//! caught up, so TCP flow control holds its sender back.
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
pub const DEFAULT_SNDBUF: usize = 4 << 20;

/// Default bytes a direction may have queued in the kernel's redirect
/// backlog before its source is held back.
pub const DEFAULT_WINDOW: u64 = 4 << 20;

#[derive(Clone)]
pub struct BpfEngine {
    progs: Programs,
    watcher: Watcher,
    sndbuf: usize,
    window: u64,
}

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
        Ok(Self { read: received.saturating_sub(sys::inq(fd)?), written: sys::bytes_written(fd)? })
    }
}

/// Removes the pair's map entries however the relay ends.
struct Paired<'a> {
    progs: &'a Programs,
    keys: [SockKey; 2],
}

impl Drop for Paired<'_> {
    fn drop(&mut self) {
        self.progs.unpair(&self.keys);
    }
}

type Pump<'a> = Option<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>>>;

/// One relayed connection while it lives.
struct Pair<'a> {
    engine: &'a BpfEngine,
    socks: [&'a TcpStream; 2],
    keys: [SockKey; 2],
    base: [Base; 2],
    /// Whether the kernel redirects what arrives on each socket; `false`
    /// once a direction is copied in user space instead.
    in_relay: [bool; 2],
    done: [bool; 2],
    /// Bytes moved by the user-space copy of a direction, if any.
    copied: &'a [AtomicU64; 2],
}

/// Why a direction could not finish normally.
enum Abort {
    Reset,
}

impl BpfEngine {
    pub fn new(progs: Programs, watcher: Watcher) -> Self {
        Self { progs, watcher, sndbuf: DEFAULT_SNDBUF, window: DEFAULT_WINDOW }
    }

    /// Send buffer given to both sockets of each pair (0: kernel default).
    pub fn with_sndbuf(mut self, bytes: usize) -> Self {
        self.sndbuf = bytes;
        self
    }

    /// Backlog bound per direction (0: unbounded, as the kernel does).
    pub fn with_window(mut self, bytes: u64) -> Self {
        self.window = bytes;
        self
    }

    pub fn programs(&self) -> &Programs {
        &self.progs
    }

    pub async fn relay(&self, a: TcpStream, b: TcpStream) -> Result<Summary> {
        let socks = [&a, &b];
        for s in socks {
            s.set_nodelay(true).context("setting TCP_NODELAY")?;
            if self.sndbuf > 0 {
                sys::set_sndbuf(s.as_fd(), self.sndbuf).context("setting SO_SNDBUF")?;
            }
        }
        let base = [Base::of(a.as_fd())?, Base::of(b.as_fd())?];
        let mut events = self.watcher.watch(&[a.as_fd(), b.as_fd()]).context("watching the pair")?;
        let pairing = match self.progs.pair_relay(a.as_fd(), b.as_fd(), self.window) {
            Ok(p) => p,
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
        let paired = Paired { progs: &self.progs, keys: pairing.keys };
        let mut limits = [self.progs.limit_events(pairing.keys[0]), self.progs.limit_events(pairing.keys[1])];
        let copied = [AtomicU64::new(0), AtomicU64::new(0)];
        let mut pair = Pair {
            engine: self,
            socks,
            keys: pairing.keys,
            base,
            in_relay: pairing.in_relay,
            done: [false; 2],
            copied: &copied,
        };
        let mut pumps: [Pump<'_>; 2] = [None, None];
        for src in 0..2 {
            if !pair.in_relay[src] {
                pumps[src] = Some(pair.copy_direction(src)?);
            }
        }
        let outcome = pair.run(&mut events, &mut limits, &mut pumps).await;
        let reset_happened = matches!(outcome, Err(Abort::Reset));
        if reset_happened {
            reset(&socks);
        }
        let mut moved = [0u64; 2];
        for (i, m) in moved.iter_mut().enumerate() {
            *m = self.progs.sent(&pair.keys[i]).unwrap_or(0) + copied[i].load(Ordering::Relaxed);
        }
        // Leave the maps before the sockets close (the drop order below).
        drop(pumps);
        drop(paired);
        drop(events);
        Ok(Summary { a_to_b: moved[0], b_to_a: moved[1], reset: reset_happened })
    }
}

impl<'a> Pair<'a> {
    async fn run(
        &mut self,
        events: &mut crate::watch::Subscription,
        limits: &mut [UnboundedReceiver<SockKey>; 2],
        pumps: &mut [Pump<'a>; 2],
    ) -> Result<(), Abort> {
        let [pump_a, pump_b] = pumps;
        let [limit_a, limit_b] = limits;
        while !(self.done[0] && self.done[1]) {
            tokio::select! {
                ev = events.next() => {
                    let Some(ev) = ev else {
                        debug!("socket watcher stopped");
                        return Err(Abort::Reset);
                    };
                    if failed(self.socks[ev.side]) {
                        debug!("side {} failed; resetting the other", ev.side);
                        return Err(Abort::Reset);
                    }
                    if ev.read_closed && !self.done[ev.side] && self.in_relay[ev.side] {
                        self.finish_direction(ev.side).await?;
                    }
                }
                Some(_) = limit_a.recv() => {
                    if let Some(p) = self.hold_back(0).await? { *pump_a = Some(p) }
                }
                Some(_) = limit_b.recv() => {
                    if let Some(p) = self.hold_back(1).await? { *pump_b = Some(p) }
                }
                r = poll_slot(pump_a) => { self.done[0] = true; r.map_err(|_| Abort::Reset)? }
                r = poll_slot(pump_b) => { self.done[1] = true; r.map_err(|_| Abort::Reset)? }
            }
        }
        Ok(())
    }

    /// Bytes written into socket `i` since pairing.
    fn written(&self, i: usize) -> Result<u64, Abort> {
        let w = sys::bytes_written(self.socks[i].as_fd()).map_err(|_| Abort::Reset)?;
        Ok(w.saturating_sub(self.base[i].written))
    }

    fn sent(&self, src: usize) -> Result<u64, Abort> {
        self.engine.progs.sent(&self.keys[src]).ok_or(Abort::Reset)
    }

    /// Waits until `dst` has taken every byte redirected from the other
    /// socket. The kernel signals nothing when its redirect backlog
    /// empties, so this polls, backing off to 2 ms.
    async fn wait_caught_up(&self, dst: usize) -> Result<u64, Abort> {
        let src = 1 - dst;
        let mut wait = Duration::from_micros(50);
        let started = std::time::Instant::now();
        let mut complained = false;
        loop {
            let sent = self.sent(src)?;
            let written = self.written(dst)?;
            if written >= sent {
                return Ok(sent);
            }
            if !complained && started.elapsed() > Duration::from_secs(1) {
                complained = true;
                debug!("side {dst} has taken {written} of {sent} redirected bytes after 1 s");
            }
            if failed(self.socks[dst]) {
                debug!("side {dst} failed while taking redirected bytes");
                return Err(Abort::Reset);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(2));
        }
    }

    /// The source's remote end sent FIN: once every byte it sent before
    /// has reached the destination, pass the FIN on.
    async fn finish_direction(&mut self, src: usize) -> Result<(), Abort> {
        let dst = 1 - src;
        // All bytes before the FIN have been handed to the verdict once
        // the source's received count equals its redirected total.
        // tcpi_bytes_received counts the FIN as one byte.
        let mut wait = Duration::from_micros(50);
        loop {
            let info = sys::tcp_info(self.socks[src].as_fd()).map_err(|_| Abort::Reset)?;
            let received = info.bytes_received.saturating_sub(1 + self.base[src].read);
            let sent = self.sent(src)?;
            if received <= sent {
                break;
            }
            if wait == Duration::from_millis(2) {
                debug!("side {src}: {received} bytes received, {sent} redirected");
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(2));
        }
        if let Some(c) = self.engine.progs.counters(&self.keys[src]) {
            if c.failed > 0 {
                debug!("the kernel dropped {} redirects from side {src}", c.failed);
                return Err(Abort::Reset);
            }
        }
        self.wait_caught_up(dst).await?;
        // EPIPE/ENOTCONN here means dst already failed; its own event
        // reports that.
        let _ = self.socks[dst].shutdown(Shutdown::Write);
        self.done[src] = true;
        Ok(())
    }

    /// The verdict reported that `src` passed its limit. If the
    /// destination lags by more than the window, stop redirecting from
    /// `src` until it has caught up. Returns a copy task if `src`'s remote
    /// end finished meanwhile and the kernel will no longer take it.
    async fn hold_back(&mut self, src: usize) -> Result<Pump<'a>, Abort> {
        let dst = 1 - src;
        let window = self.engine.window;
        let mut pump = None;
        let (sent, written) = (self.sent(src)?, self.written(dst)?);
        log::trace!("side {src} passed its limit: sent {sent}, written {written}");
        if self.in_relay[src] && sent.saturating_sub(written) > window {
            debug!("holding side {src} back: {} bytes queued for side {dst}", sent - written);
            self.engine.progs.pause(&self.keys[src]).map_err(|_| Abort::Reset)?;
            self.wait_caught_up(dst).await?;
            debug!("resuming side {src}");
            match self.engine.progs.resume(&self.keys[src], self.socks[src].as_fd()) {
                Ok(()) => {}
                Err(PairError::NotEstablished(_)) => {
                    debug!("side {src} finished while held back; copying the rest");
                    self.in_relay[src] = false;
                    pump = Some(self.copy_direction(src).map_err(|_| Abort::Reset)?);
                }
                Err(e) => {
                    debug!("resuming side {src} failed: {e}");
                    return Err(Abort::Reset);
                }
            }
        }
        let limit = self.sent(src)? + window;
        self.engine.progs.rearm(&self.keys[src], limit).map_err(|_| Abort::Reset)?;
        Ok(pump)
    }

    /// Copies what arrives on `src` to the other socket in user space.
    /// Only used once nothing of that direction is left in the kernel's
    /// redirect path, so the copied bytes follow the redirected ones.
    fn copy_direction(&self, src: usize) -> Result<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>>> {
        let r = to_tokio(self.socks[src].try_clone()?)?;
        let w = to_tokio(self.socks[1 - src].try_clone()?)?;
        let count = &self.copied[src];
        Ok(Box::pin(async move {
            let (mut r, mut w) = (r, w);
            pump(&mut r, &mut w, copy::DEFAULT_BUFFER, count).await
        }))
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

