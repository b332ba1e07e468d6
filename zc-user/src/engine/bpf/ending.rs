//! How a direction of a bpf pair ends: the FIN passed on once every byte
//! before it has arrived, and the checks that reset both sides instead
//! when a byte could have been lost or doubled.
use std::{
    net::{Shutdown, TcpStream},
    os::fd::AsFd,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use log::debug;
use socket2::SockRef;

use super::{
    Abort, Pair, Task,
    forward::{Backoff, wait_caught_up},
    switch::Forwarded,
};
use crate::sys;

impl<'a> Pair<'a> {
    /// The source's remote end sent FIN: once every byte it sent before
    /// has reached the destination, pass the FIN on.
    /// Returns a forwarder instead if the verdict passed bytes at its cap
    /// on the way (that forwarder then sees the EOF and comes back here).
    pub(super) async fn finish_direction(
        &mut self,
        src: usize,
    ) -> Result<Task<'a, Forwarded>, Abort> {
        let dst = 1 - src;
        // A read side can be shut without a FIN: the owner's shutdown
        // (socat shuts both sockets down as it exits) does it too, and
        // bytes keep arriving and being redirected. Counting a FIN that
        // never came made the counts look one byte short, and the
        // connection was reset as if the verdict had doubled a byte. The
        // FIN's own arrival reports the socket again (a state change wakes
        // every watcher, edge-triggered or not).
        if !sys::fin_arrived(&sys::tcp_info(self.socks[src].as_fd())?) {
            debug!("side {src}: read side shut without a FIN from its remote end; relaying on");
            return Ok(None);
        }
        // Nothing more arrives: a parked socket must give up what it
        // keeps, and none may be parked again.
        self.stop_parking(src)?;
        // Every byte before the FIN has been through the verdict once the
        // source's received count equals what the verdict redirected or
        // passed. tcpi_bytes_received counts the FIN as one byte.
        let mut wait = Backoff::new();
        loop {
            let info = sys::tcp_info(self.socks[src].as_fd())?;
            let received = info.bytes_received.saturating_sub(1 + self.base[src].read);
            let f = self.flow(src)?;
            duplicated(received, f)?;
            broken(f)?;
            let forwarded = self.by_user[src].load(Ordering::Relaxed);
            if all_accounted(received, f, forwarded) {
                break;
            }
            if f.passed > forwarded {
                return self.check_backlog(src).await;
            }
            if self.stranded[src] {
                return self.forward_stranded(src);
            }
            wait.sleep(|| {
                // Bytes in the socket's own queue that the verdict never
                // counted show here (FIONREAD counts that queue on a
                // sockmap socket).
                let inq = sys::inq(self.socks[src].as_fd()).unwrap_or(u64::MAX);
                debug!(
                    "side {src}: {received} bytes received, {} through the verdict ({} redirected, {} passed), {forwarded} forwarded, {inq} in its own queue",
                    f.sent + f.passed,
                    f.sent,
                    f.passed
                )
            })
            .await;
        }
        if let Some(c) = self.engine.progs.counters(&self.keys[src])
            && c.failed > 0
        {
            debug!("the kernel dropped {} redirects from side {src}", c.failed);
            return Err(Abort(None));
        }
        wait_caught_up(
            &self.engine.progs,
            self.keys[src],
            self.socks[dst],
            self.base[dst],
            &self.by_user[src],
        )
        .await?;
        // Once shut for writing, dst could not go back to `RELAY` after a
        // park: put it back now; `Pair::shut` keeps it out of parks after.
        self.stop_parking(dst)?;
        if self.engine.foreign && owner_passed_fin(self.socks[dst]).await {
            debug!("side {src}: the owner passed the FIN on itself");
        } else {
            // EPIPE/ENOTCONN here means dst already failed; its own event
            // reports that.
            let _ = self.socks[dst].shutdown(Shutdown::Write);
            debug!("side {src}: FIN passed on");
        }
        self.done[src] = true;
        Ok(None)
    }
}

/// Has every byte received on a source left it, either redirected by the
/// kernel or read by user space (`read`)? User space must also have read
/// everything the verdict passed. `read` may exceed `passed`: at the end
/// of a held stream the socket can hand user space bytes the verdict never
/// saw (seen on 6.18 after FIN), which are still in order.
pub(super) fn all_accounted(received: u64, f: zc_common::Flow, read: u64) -> bool {
    f.passed <= read && received <= f.sent + read
}

/// The verdict saw more bytes than TCP received. It skips retransmitted
/// bytes it already handled, so this should never happen; if it does, the
/// destination may have got bytes twice, and the caller resets both sides
/// so nobody takes the stream as complete.
pub(super) fn duplicated(received: u64, f: zc_common::Flow) -> Result<(), Abort> {
    let seen = f.sent + f.passed;
    if seen > received {
        log::error!(
            "the verdict handled {} bytes more than TCP received; resetting the connection",
            seen - received
        );
        return Err(Abort(None));
    }
    Ok(())
}

/// The verdict dropped an skb whose old bytes it could not cut (see
/// `Flow::uncut`): bytes are missing, so the caller resets both sides.
pub(super) fn broken(f: zc_common::Flow) -> Result<(), Abort> {
    if f.uncut > 0 {
        log::error!(
            "the kernel could not cut {} retransmitted bytes; resetting the connection",
            f.uncut
        );
        return Err(Abort(None));
    }
    Ok(())
}

/// How long the owner of a foreign pair has to pass a FIN on itself
/// before zc does it.
const OWNER_FIN_GRACE: Duration = Duration::from_millis(200);

/// Waits, up to [`OWNER_FIN_GRACE`], for the owner of a foreign pair to
/// shut `dst` for writing as it saw the FIN (socat and HAProxy do); true
/// if it did. zc must not shut it too: a shutdown locks the socket and
/// wakes every poller on it (inet_shutdown's sk_state_change). If the
/// peer's answer to the FIN is arriving meanwhile, its skbs wait for the
/// stream parser's work item, poll reports them readable to the woken
/// owner, and its read meets EAGAIN, which socat takes as fatal. Measured
/// with zc's shutdown 2 ms after the owner's: socat exited in 3 of 10
/// half-closes. When zc shuts first, nothing is in flight yet.
pub(super) async fn owner_passed_fin(dst: &TcpStream) -> bool {
    let started = Instant::now();
    let mut wait = Backoff::new();
    while started.elapsed() < OWNER_FIN_GRACE {
        match sys::tcp_info(dst.as_fd()) {
            Ok(info) if sys::fin_sent(&info) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        wait.sleep(|| {}).await;
    }
    false
}

/// Has this socket been reset, or otherwise failed for good, and with
/// what? A reset leaves its errno in SO_ERROR. The TCP state alone cannot
/// tell: a socket that closed gracefully in both directions also ends in
/// TCP_CLOSE (the kernel hands TIME_WAIT to a separate timewait socket).
pub(super) fn failure(s: &TcpStream) -> Option<Abort> {
    match SockRef::from(s).take_error() {
        Ok(Some(e)) => {
            debug!("socket error: {e}");
            Some(Abort(Some(e.kind())))
        }
        Ok(None) => None,
        Err(e) => Some(e.into()),
    }
}

/// Aborts both connections: their close() will send RST.
pub(super) fn reset(socks: &[&TcpStream]) {
    for s in socks {
        let _ = sys::set_reset_on_close(s.as_fd());
    }
}
