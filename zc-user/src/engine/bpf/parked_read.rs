//! The adaptive path with parking at hand: a direction of small skbs is
//! taken out of `RELAY` (zc-ebpf `park`, asked for by user space) and read
//! as a plain socket, the way copy mode reads it: no verdict run and no
//! message per skb, and no map access per read. What it read is counted
//! once, as if the verdict had passed it, before the socket goes back
//! after its stay: the verdict's sequence cursor moves past it, so an skb
//! read only in part is cut where the reading stopped (`skip_handled`),
//! and what arrives later is taken by the verdict behind every byte
//! written. Without that cursor (no BTF offset for the skb's sequence
//! number) it goes back only at a read that finds the queue empty.
use std::{os::fd::AsFd, sync::atomic::Ordering, time::Duration};

use super::{
    Abort,
    ending::{all_accounted, failure},
    forward::{Backoff, Direction, wait_caught_up},
    switch::{Forwarded, allowance, held_rcvbuf, waiting},
};
use crate::{ebpf::Unparked, engine::copy, sys};

/// Reads a parked direction of small skbs until its stay is over.
pub(super) struct ParkedReader<'a> {
    pub(super) dir: Direction<'a>,
    /// Bytes to forward before the direction goes back to the kernel.
    pub(super) stay: u64,
    /// The source's receive buffer was fixed at pairing (`--park`).
    pub(super) fixed_rcvbuf: bool,
}

/// How long a park asked for reading may take before the reader gives up
/// on it (zc_park acts only while the source's receive queue is empty).
const PARK_WAIT: Duration = Duration::from_millis(100);

impl ParkedReader<'_> {
    pub(super) async fn run(self) -> Result<Forwarded, Abort> {
        if !self.parked().await? {
            return Ok(match self.back()? {
                Forwarded::BackToKernel => Forwarded::ParkFailed,
                other => other,
            });
        }
        let out = self.dir.out();
        let Direction {
            progs,
            key,
            src: (src, sbase),
            src_io,
            dst: (dst, dbase),
            dst_io,
            by_user,
            small_bytes,
            window,
            ..
        } = &self.dir;
        let (src, dst, window) = (*src, *dst, *window);
        // Out of `RELAY`, the verdict redirects nothing more: its total is
        // final until the socket goes back.
        let sent = wait_caught_up(progs, *key, dst, *dbase, by_user).await?;
        let started = by_user.load(Ordering::Relaxed);
        let stayed = || by_user.load(Ordering::Relaxed) - started >= self.stay;
        let cursor = progs.flow(key).ok_or(Abort(None))?.seq_known != 0;
        // Read and not yet counted in `FLOW`.
        let mut read = 0u64;
        let mut unlooked = 0u64;
        // It cannot go back: read on to the end.
        let mut stranded = false;
        // The source's receive buffer was cut to a held one's.
        let mut cut = false;
        let mut buf = vec![0u8; copy::DEFAULT_BUFFER];
        loop {
            match src_io.try_read(&mut buf) {
                Ok(0) => {
                    self.count(read)?;
                    // Not established any more, it stays out of `RELAY`;
                    // this only withdraws the entry.
                    let _ = progs.unpark(key, src.as_fd());
                    let received = sys::tcp_info(src.as_fd())?
                        .bytes_received
                        .saturating_sub(1 + sbase.read);
                    let f = progs.flow(key).ok_or(Abort(None))?;
                    let forwarded = by_user.load(Ordering::Relaxed);
                    if !all_accounted(received, f, forwarded) {
                        log::error!(
                            "a parked socket ended with {received} bytes received, {} redirected \
                             and {forwarded} forwarded; resetting the connection",
                            f.sent
                        );
                        return Err(Abort(None));
                    }
                    return Ok(Forwarded::Eof);
                }
                Ok(n) => {
                    dst_io.write_all(&buf[..n], by_user).await?;
                    small_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    read += n as u64;
                    // What waits for the destination's reader keeps within
                    // the window, looked at every eighth of it.
                    unlooked += n as u64;
                    if unlooked >= window / 8 {
                        unlooked = 0;
                        let allowed = allowance(window, dst.as_fd())?;
                        if waiting(sent, dst, *dbase, by_user)? > allowed {
                            // A lagging reader is the window's business:
                            // back in the kernel, the verdict's cap holds
                            // the sender, and a hold cuts the source's
                            // buffer. (Cut here, autotuning stopped for
                            // good: a fifth of the throughput at 16 KiB
                            // writes; BENCHMARKS.md, tuning log 34.)
                            if cursor && !stranded {
                                match self.go_back(&mut read)? {
                                    Some(how) => return Ok(how),
                                    None => stranded = true,
                                }
                            }
                            if !cut && (!self.fixed_rcvbuf || crate::pressure::under()) {
                                sys::set_rcvbuf(src.as_fd(), held_rcvbuf())?;
                                cut = true;
                            }
                            out.wait_drained(allowed.min(window) / 2, None).await?;
                        }
                    }
                    // With its cursor known, the verdict cuts off what
                    // was read of a half-read skb, as it does for a
                    // retransmission (`skip_handled`), so the direction
                    // may go back without waiting for an empty queue,
                    // which a sender that never pauses does not leave.
                    if cursor && !stranded && stayed() {
                        match self.go_back(&mut read)? {
                            Some(how) => return Ok(how),
                            None => stranded = true,
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !stranded && stayed() {
                        match self.go_back(&mut read)? {
                            Some(how) => return Ok(how),
                            None => stranded = true,
                        }
                    }
                    src_io.readable().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Counts what was `read` and puts the source back; `None` if it
    /// cannot go back (shut for writing meanwhile, as the other
    /// direction's FIN was passed on, or its own FIN came).
    fn go_back(&self, read: &mut u64) -> Result<Option<Forwarded>, Abort> {
        self.count(std::mem::take(read))?;
        Ok(match self.back()? {
            Forwarded::Stranded => None,
            how => Some(how),
        })
    }

    /// Asks for the park and waits until it is done; false if it was not
    /// done in [`PARK_WAIT`] (the caller withdraws the request).
    async fn parked(&self) -> Result<bool, Abort> {
        let src = self.dir.src.0;
        if !self.dir.progs.park_to_read(&self.dir.key)? {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let mut wait = Backoff::new();
        loop {
            match self.dir.progs.park_state(&self.dir.key) {
                zc_common::PARKED => return Ok(true),
                // With `--park` the verdict may have asked first; either
                // request ends as PARKED.
                zc_common::PARK_TO_READ | zc_common::PARK_ASKED
                    if started.elapsed() < PARK_WAIT => {}
                _ => return Ok(false),
            }
            if let Some(abort) = failure(src) {
                return Err(abort);
            }
            // zc_park acts when TCP calls it; make it call now.
            sys::nudge(src.as_fd())?;
            wait.sleep(|| {}).await;
        }
    }

    /// Counts `read` bytes as passed and forwarded, so that the verdict,
    /// once the socket is back, finds nothing left to forward.
    fn count(&self, read: u64) -> Result<(), Abort> {
        if read == 0 {
            return Ok(());
        }
        self.dir.progs.count_parked_read(&self.dir.key, read)?;
        self.dir
            .progs
            .set_forwarded(&self.dir.key, self.dir.by_user.load(Ordering::Relaxed))?;
        Ok(())
    }

    /// Puts the source back in `RELAY` (or withdraws the request).
    fn back(&self) -> Result<Forwarded, Abort> {
        Ok(
            match self
                .dir
                .progs
                .unpark(&self.dir.key, self.dir.src.0.as_fd())?
            {
                Unparked::Stranded => Forwarded::Stranded,
                Unparked::Back | Unparked::NotParked => Forwarded::BackToKernel,
            },
        )
    }
}
