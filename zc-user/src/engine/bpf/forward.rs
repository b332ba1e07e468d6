//! The user-space side of a hold: a forwarder that lets the destination
//! take everything already redirected, then forwards what the verdict
//! passed, and hands the direction back to the kernel the moment nothing
//! passed is left.
use std::{
    net::TcpStream,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use log::debug;
use zc_common::SockKey;

use super::{
    Abort, Base,
    adaptive::ADAPT_SAMPLE,
    brake::Brake,
    ending::{all_accounted, duplicated, failure},
    switch::{Forwarded, allowance, cap, waiting, written},
    unstick::Unstick,
};
use crate::{ebpf::Programs, engine::copy, sys};

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

/// Forwards what the verdict passed to `src`'s own receive queue while
/// held. First lets the destination take everything already redirected
/// (so forwarded bytes follow them), then releases the hold: the verdict
/// keeps passing until user space has forwarded every passed byte, then
/// redirects again.
pub(super) struct Forwarder<'a> {
    pub(super) dir: Direction<'a>,
    /// The other direction (see [`Brake`]).
    pub(super) back: (SockKey, &'a AtomicU64),
    /// Set when the direction came for its small skbs: it stays in user
    /// space (held) while the skbs the verdict passes average less than
    /// the first, however idle it gets, and until it has forwarded the
    /// second ([`Dwell`]).
    pub(super) small_below: Option<(u64, u64)>,
    /// End the hold by peeking (see [`PeekRound`]).
    pub(super) peek: bool,
    /// The source's receive buffer was fixed at pairing (parking).
    pub(super) fixed_rcvbuf: bool,
}

/// One direction of a pair as user space forwards it: held ([`Forwarder`])
/// or parked for its small skbs (`parked_read`).
pub(super) struct Direction<'a> {
    pub(super) progs: Programs,
    pub(super) key: SockKey,
    pub(super) src: (&'a TcpStream, Base),
    pub(super) src_io: std::sync::Arc<super::io::SockIo>,
    pub(super) dst: (&'a TcpStream, Base),
    pub(super) dst_io: std::sync::Arc<super::io::SockIo>,
    pub(super) by_user: &'a AtomicU64,
    /// Of `by_user`, what was forwarded for small skbs.
    pub(super) small_bytes: &'a AtomicU64,
    /// A hold lasts until fewer than half this many bytes wait for the
    /// destination's reader, so a reader that keeps up only just does not
    /// flip the direction back and forth.
    pub(super) window: u64,
    /// Counts the destination's kicks ([`Unstick`]).
    pub(super) kicks: &'a AtomicU64,
}

impl<'a> Direction<'a> {
    /// Where this direction's forwarded bytes go.
    pub(super) fn out(&self) -> Out<'a, '_> {
        Out {
            progs: &self.progs,
            key: self.key,
            dst: (self.dst.0, self.dst.1, &self.dst_io),
            by_user: self.by_user,
            window: self.window,
            kicks: self.kicks,
        }
    }
}

impl Forwarder<'_> {
    pub(super) async fn run(self) -> Result<Forwarded, Abort> {
        let Forwarder {
            dir,
            back,
            mut small_below,
            peek,
            fixed_rcvbuf,
        } = self;
        let out = dir.out();
        let Direction {
            ref progs,
            key,
            src: (src_std, sbase),
            src_io: ref src,
            dst: (dst, dbase),
            by_user,
            small_bytes,
            window,
            ..
        } = dir;
        let mut brake = Brake::new((src_std, sbase), progs, back, fixed_rcvbuf);
        if small_below.is_none() {
            let below = allowance(window, dst.as_fd())?.min(window) / 2;
            out.wait_drained(below, Some(&mut brake)).await?;
        }
        // Held, the verdict redirects nothing, so this stays true until
        // the release below.
        let mut caught_up = wait_caught_up(progs, key, dst, dbase, by_user).await?;
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
        // A held queue filled to the brim drops arriving segments; a
        // window offered at half the buffer never fills it.
        let _clamp = if peek && small_below.is_none() {
            Some(Clamp::set(src_std, HELD_CLAMP)?)
        } else {
            None
        };
        let size = if peek {
            PEEK_BUFFER
        } else {
            copy::DEFAULT_BUFFER
        };
        let mut buf = vec![0u8; size];
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
            if peek && small_below.is_none() && eof_wait.is_none() {
                let round = PeekRound {
                    out: &out,
                    src: (src_std, src),
                };
                match round.run(&mut buf, &mut caught_up, &mut brake).await? {
                    Peeked::BackToKernel => return Ok(Forwarded::BackToKernel),
                    Peeked::More => continue,
                    Peeked::Nothing => {}
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
                    // The redirected total stays put from the read to the
                    // write: the verdict passes while bytes it passed are
                    // not yet forwarded.
                    let f = progs.flow(&key).ok_or(Abort(None))?;
                    let forwarded = by_user.load(Ordering::Relaxed);
                    brake.update(f.passed.saturating_sub(forwarded + n as u64))?;
                    out.pass_on(&buf[..n], f.sent, &mut caught_up, &mut brake)
                        .await?;
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
                    if out.all_forwarded(src_std, f)? {
                        return Ok(Forwarded::BackToKernel);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Where a held direction's forwarded bytes go, and how they are
/// accounted: shared by the reading and the peeking forwarder, and the
/// parked reader.
pub(super) struct Out<'a, 'b> {
    progs: &'b Programs,
    key: SockKey,
    dst: (&'a TcpStream, Base, &'b super::io::SockIo),
    by_user: &'a AtomicU64,
    window: u64,
    kicks: &'a AtomicU64,
}

impl Out<'_, '_> {
    /// Waits until fewer than `below` bytes of the direction from `src` wait
    /// in the kernel for `dst`'s reader: redirected or forwarded, and not yet
    /// acknowledged by `dst`'s remote end. Meanwhile the verdict may pass
    /// more, so the `brake` keeps looking (what the caller holds counts as
    /// unread here; a parked source has none).
    pub(super) async fn wait_drained(
        &self,
        below: u64,
        mut brake: Option<&mut Brake<'_>>,
    ) -> Result<(), Abort> {
        let (progs, src, by_user) = (self.progs, self.key, self.by_user);
        let (dst, dbase, _) = self.dst;
        let mut wait = Backoff::new();
        let mut deaf = Unstick::new(self.kicks);
        loop {
            let f = progs.flow(&src).ok_or(Abort(None))?;
            if let Some(b) = brake.as_deref_mut() {
                b.update(f.passed.saturating_sub(by_user.load(Ordering::Relaxed)))?;
            }
            let waiting = waiting(f.sent, dst, dbase, by_user)?;
            if waiting < below {
                return Ok(());
            }
            // Held, nothing but this forwarder moves `by_user` meanwhile.
            let expected = f.sent + by_user.load(Ordering::Relaxed);
            deaf.check(dst, dbase, expected, waiting)?;
            if let Some(abort) = failure(dst) {
                debug!("destination failed while its reader lagged");
                return Err(abort);
            }
            wait.sleep(|| debug!("{waiting} bytes wait for a slow reader"))
                .await;
        }
    }

    /// Writes `bytes` the verdict passed, the redirected total being
    /// `sent`, and publishes the forwarded count.
    ///
    /// What user space forwards waits for the reader too, so it keeps
    /// within the verdict's cap. Unbounded, a held direction whose reader
    /// lagged filled the destination's send buffer (32 MiB by default; 29
    /// MB seen both ways across namespaces; 15.4 MiB at a 4 MiB window in
    /// tests/slow_reader_bound.rs, whose bound is 9). At the cap it waits
    /// for half a window of room: one wait per half window, not one per
    /// read.
    ///
    /// Released, the verdict redirects again whenever everything passed
    /// has been forwarded, and passes again at its cap: these bytes may
    /// follow redirected ones that still wait in the kernel's queue for
    /// `dst`. Those go first (`caught_up` is the redirected total known
    /// taken). Forwarded at once, they overtook them: seen as a stream of
    /// the right length with a block of bytes 12 MB early.
    async fn pass_on(
        &self,
        bytes: &[u8],
        sent: u64,
        caught_up: &mut u64,
        brake: &mut Brake<'_>,
    ) -> Result<(), Abort> {
        let (progs, key, by_user, window) = (self.progs, self.key, self.by_user, self.window);
        let (dst, dbase, dst_io) = self.dst;
        let allowed = allowance(window, dst.as_fd())?;
        if waiting(sent, dst, dbase, by_user)? + bytes.len() as u64 > allowed {
            let below = allowed.min(window) / 2;
            self.wait_drained(below, Some(brake)).await?;
        }
        if sent != *caught_up {
            *caught_up = wait_caught_up(progs, key, dst, dbase, by_user).await?;
        }
        dst_io.write_all(bytes, by_user).await?;
        progs.set_forwarded(&key, by_user.load(Ordering::Relaxed))?;
        Ok(())
    }

    /// Whether everything the verdict passed (`f` as just read) is
    /// forwarded, so every later verdict run redirects. One already under
    /// way may have read the old forwarded count and still pass its skb;
    /// it runs under the source's lock, so taking the lock once waits it
    /// out, and a second look tells.
    fn all_forwarded(&self, src: &TcpStream, f: zc_common::Flow) -> Result<bool, Abort> {
        let done = |f: zc_common::Flow| f.passed == self.by_user.load(Ordering::Relaxed);
        if !done(f) {
            return Ok(false);
        }
        sys::kick_data_ready(src.as_fd())?;
        Ok(done(self.progs.flow(&self.key).ok_or(Abort(None))?))
    }
}

/// How often a forwarder looks at passed bytes it cannot read yet.
const BRAKE_LOOK: Duration = Duration::from_millis(2);

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

/// The window a held socket offers during a peeking hand-back: half its
/// buffer (`HELD_RCVBUF`, doubled by the kernel), so the queue the peek
/// waits on never overflows. With the whole buffer offered, segments
/// arriving at the full queue were dropped (`TCPZeroWindowDrop`) and the
/// sender waited 200 ms for its retransmission timer (tuning log 27).
const HELD_CLAMP: i32 = super::HELD_RCVBUF as i32;

/// Peek buffer: more than a held queue can hold, so one peek takes it all.
const PEEK_BUFFER: usize = 4 * super::HELD_RCVBUF;

/// How long the verdict must have passed nothing before a peek: the
/// sender has then used its window up (or paused), so nothing arrives
/// between the peek and the publish.
const QUIET: Duration = Duration::from_micros(100);

/// The longest wait for [`QUIET`]; a sender that never pauses that long
/// gets a round anyway (it then only forwards, as a read would).
const QUIET_AT_MOST: Duration = Duration::from_millis(5);

/// Restores a socket's TCP_WINDOW_CLAMP when dropped.
struct Clamp<'a> {
    s: &'a TcpStream,
    old: i32,
}

impl<'a> Clamp<'a> {
    fn set(s: &'a TcpStream, bytes: i32) -> std::io::Result<Self> {
        let old = sys::window_clamp(s.as_fd())?;
        sys::set_window_clamp(s.as_fd(), bytes)?;
        Ok(Self { s, old })
    }
}

impl Drop for Clamp<'_> {
    fn drop(&mut self) {
        let _ = sys::set_window_clamp(self.s.as_fd(), self.old);
    }
}

/// What a peeking round did.
enum Peeked {
    /// The socket held nothing to peek.
    Nothing,
    /// Forwarded what was there; the verdict passed more meanwhile.
    More,
    /// Forwarded everything passed: the verdict redirects again.
    BackToKernel,
}

/// One round of the peeking hand-back: wait until the verdict has passed
/// nothing for [`QUIET`], copy the held queue without taking it, write
/// it, publish the forwarded count (from then on the verdict redirects,
/// if nothing else was passed), and only then take the bytes from the
/// queue, which reopens the sender's window. Whatever the sender sends
/// next is redirected behind bytes already written, so order holds; a
/// plain read instead reopens the window before the write, and the
/// bytes that then arrive are passed again (a hold ends only when the
/// sender pauses).
struct PeekRound<'a, 'b> {
    out: &'b Out<'a, 'b>,
    src: (&'a TcpStream, &'b super::io::SockIo),
}

impl PeekRound<'_, '_> {
    async fn run(
        &self,
        buf: &mut [u8],
        caught_up: &mut u64,
        brake: &mut Brake<'_>,
    ) -> Result<Peeked, Abort> {
        let (progs, key) = (self.out.progs, self.out.key);
        let src_std = self.src.0;
        let passed = || progs.flow(&key).map(|f| f.passed).ok_or(Abort(None));
        let started = std::time::Instant::now();
        let (mut before, mut since) = (passed()?, started);
        while started.elapsed() < QUIET_AT_MOST && since.elapsed() < QUIET {
            tokio::task::yield_now().await;
            let now = passed()?;
            if now != before {
                (before, since) = (now, std::time::Instant::now());
            }
        }
        let n = match sys::peek(src_std.as_fd(), buf) {
            Ok(n) if n > 0 => n,
            Ok(_) => return Ok(Peeked::Nothing),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Peeked::Nothing),
            Err(e) => return Err(e.into()),
        };
        let sent = progs.flow(&key).ok_or(Abort(None))?.sent;
        self.out.pass_on(&buf[..n], sent, caught_up, brake).await?;
        self.consume(buf, n).await?;
        let f = progs.flow(&key).ok_or(Abort(None))?;
        if self.out.all_forwarded(src_std, f)? {
            debug!("peeking hand-back: {n} bytes; back to the kernel");
            return Ok(Peeked::BackToKernel);
        }
        Ok(Peeked::More)
    }

    /// Takes the `n` bytes peeked from the queue. The last byte is read
    /// on its own once the rest is freed: the window update TCP sends
    /// after a read is reckoned from the memory free at that moment, and
    /// one read of the whole queue left the sender without it now and
    /// then (tuning log 27).
    async fn consume(&self, buf: &mut [u8], n: usize) -> Result<(), Abort> {
        let (src_std, src) = self.src;
        let mut left = n;
        while left > 0 {
            if left == 1 && n > 1 {
                let started = std::time::Instant::now();
                while started.elapsed() < QUIET_AT_MOST
                    && sys::meminfo(src_std.as_fd())?.rmem_alloc >= FREED
                {
                    tokio::task::yield_now().await;
                }
            }
            let take = if left > 1 { left - 1 } else { left };
            match src.try_read(&mut buf[..take]) {
                // The bytes were peeked: an end here is a broken socket.
                Ok(0) => return Err(Abort(None)),
                Ok(k) => left -= k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => src.readable().await?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Receive memory under which a held queue counts as freed.
const FREED: u64 = 128 << 10;
