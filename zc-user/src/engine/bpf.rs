//! The BPF engine: both sockets join the kernel's sockmap pair and user
//! space only watches for the ends of the stream.
//!
//! The kernel redirects bytes but not FIN or RST. So each direction is
//! closed by hand: when the source's remote end shuts down, wait until
//! every byte that arrived on the source has been written into the
//! destination (the verdict counter against the destination's TCP byte
//! counts), and only then shut the destination's write side. A reset on
//! either side resets the other.
use std::{
    net::{Shutdown, TcpStream},
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    os::fd::{AsFd, BorrowedFd},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use log::debug;
use socket2::SockRef;
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

#[derive(Clone)]
pub struct BpfEngine {
    progs: Programs,
    watcher: Watcher,
    sndbuf: usize,
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

impl BpfEngine {
    pub fn new(progs: Programs, watcher: Watcher) -> Self {
        Self { progs, watcher, sndbuf: DEFAULT_SNDBUF }
    }

    /// Send buffer given to both sockets of each pair (0: kernel default).
    pub fn with_sndbuf(mut self, bytes: usize) -> Self {
        self.sndbuf = bytes;
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
        let pairing = match self.progs.pair_relay(a.as_fd(), b.as_fd()) {
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
        let keys = pairing.keys;
        let paired = Paired { progs: &self.progs, keys };
        let counts = [AtomicU64::new(0), AtomicU64::new(0)];
        let [mut pump_a, mut pump_b]: [Option<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>>>; 2] = [None, None];
        for src in 0..2 {
            if !pairing.in_relay[src] {
                // Its remote end finished before the kernel would take the
                // socket: what it sent waits in its receive queue, and only
                // this copy writes into the destination.
                let (r, w) = (to_tokio(socks[src].try_clone()?)?, to_tokio(socks[1 - src].try_clone()?)?);
                let count = &counts[src];
                let slot = if src == 0 { &mut pump_a } else { &mut pump_b };
                *slot = Some(Box::pin(async move {
                    let (mut r, mut w) = (r, w);
                    pump(&mut r, &mut w, copy::DEFAULT_BUFFER, count).await
                }));
            }
        }
        let mut done = [false, false];
        let mut summary = Summary::default();
        while !(done[0] && done[1]) {
            let ev = tokio::select! {
                ev = events.next() => ev.ok_or_else(|| anyhow!("socket watcher stopped"))?,
                r = poll_slot(&mut pump_a) => { done[0] = true; if r.is_err() { summary.reset = true; reset(&socks); break; } continue }
                r = poll_slot(&mut pump_b) => { done[1] = true; if r.is_err() { summary.reset = true; reset(&socks); break; } continue }
            };
            let (src, dst) = (ev.side, 1 - ev.side);
            if failed(socks[src]) {
                debug!("side {src} failed; resetting the other");
                reset(&socks);
                summary.reset = true;
                break;
            }
            if ev.read_closed && !done[src] && pairing.in_relay[src] {
                match self.drain(socks[src], keys[src], base[src], socks[dst], base[dst]).await {
                    Ok(n) => counts[src].store(n, Ordering::Relaxed),
                    Err(e) => {
                        debug!("direction {src}->{dst} cannot finish: {e:#}");
                        reset(&socks);
                        summary.reset = true;
                        break;
                    }
                }
                // EPIPE/ENOTCONN here means dst already failed; its own
                // event reports that.
                let _ = socks[dst].shutdown(Shutdown::Write);
                done[src] = true;
            }
        }
        for i in 0..2 {
            let n = if pairing.in_relay[i] && !done[i] {
                self.progs.counters(&keys[i]).map_or(0, |c| c.bytes)
            } else {
                counts[i].load(Ordering::Relaxed)
            };
            if i == 0 { summary.a_to_b = n } else { summary.b_to_a = n }
        }
        // Leave the maps before the sockets close (the drop order below).
        drop((pump_a, pump_b));
        drop(paired);
        drop(events);
        Ok(summary)
    }

    /// Waits until every byte received on `src` has been redirected and
    /// written into `dst`; returns how many bytes that is.
    ///
    /// The kernel signals neither, so this polls the verdict counter and
    /// the two sockets' TCP byte counts, backing off to 2 ms. It only runs
    /// once per direction, at its end.
    async fn drain(&self, src: &TcpStream, key: SockKey, sbase: Base, dst: &TcpStream, dbase: Base) -> Result<u64> {
        let mut wait = Duration::from_micros(50);
        loop {
            let c = self.progs.counters(&key).ok_or_else(|| anyhow!("pair counters vanished"))?;
            if c.failed > 0 {
                bail!("the kernel dropped {} redirects: the destination left the map", c.failed);
            }
            // Only called once src's FIN arrived, which tcpi_bytes_received
            // counts as one more byte.
            let received = sys::tcp_info(src.as_fd())?.bytes_received.saturating_sub(1 + sbase.read);
            let written = sys::bytes_written(dst.as_fd())?.saturating_sub(dbase.written);
            if received == c.bytes && written == c.bytes {
                return Ok(c.bytes);
            }
            if failed(dst) {
                bail!("destination failed with {} of {} bytes written", written, c.bytes);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(2));
        }
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
