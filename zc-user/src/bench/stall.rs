//! The stall workload: clients connect through the system and never read;
//! the server pushes into each connection until its writes block. The
//! bench measures what the kernel holds at that moment, then the clients
//! read everything, and each connection's bytes are checked against what
//! the server says it pushed (a 16-byte count-and-hash trailer after the
//! stream).
use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsFd as _,
    sync::{
        Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use xxhash_rust::xxh3::Xxh3;
use zc_user::traffic::{Digest, Pattern};

use super::{kmem::meminfo_kib, load::connect, topology::Topology};

/// A write that waits this long for buffer space means the connection is
/// stalled: every buffer between the server and the sleeping client is
/// full, or the kernel refuses TCP more memory.
const BLOCKED: Duration = Duration::from_secs(1);
/// Far past any bound: a connection that takes this much met no
/// backpressure.
const CAP_PER_CONN: u64 = 4 << 30;
const CHUNK: usize = 256 << 10;
const TRAILER: usize = 16;
/// How long all pushers may take to block, and the clients to drain
/// without any progress.
const PUSH_DEADLINE: Duration = Duration::from_secs(120);
const DRAIN_IDLE: Duration = Duration::from_secs(30);

/// How the server's pushers (threads of this process) stopped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Connections that reached the server.
    pub started: usize,
    pub blocked: usize,
    /// Reached the per-connection cap or the run's budget.
    pub capped: usize,
    pub failed: usize,
    pub pushed: u64,
}

impl Tally {
    fn stopped(&self) -> usize {
        self.blocked + self.capped + self.failed
    }
}

/// Where pushers report to the bench.
pub struct Board {
    tally: Mutex<Tally>,
    changed: Condvar,
    /// Bytes pushed since the current run began, against `budget`.
    wave: AtomicU64,
    /// A relay that buffers without bound must not take the host with it:
    /// one run pushes at most a quarter of what was available at the start.
    budget: u64,
    /// Set when the pushers took too long to block: they stop as capped.
    halt: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl Board {
    pub fn new() -> Result<Self> {
        Ok(Self {
            tally: Mutex::default(),
            changed: Condvar::new(),
            wave: AtomicU64::new(0),
            budget: meminfo_kib("MemAvailable")? << 10 >> 2,
            halt: AtomicBool::new(false),
            first_error: Mutex::default(),
        })
    }

    fn tally(&self) -> Tally {
        self.tally.lock().map(|t| *t).unwrap_or_default()
    }

    fn report(&self, f: impl FnOnce(&mut Tally)) {
        if let Ok(mut t) = self.tally.lock() {
            f(&mut t);
        }
        self.changed.notify_all();
    }

    /// Waits until `n` pushers beyond those counted in `since` stopped.
    /// Those still pushing at the deadline are stopped, and said so.
    fn wait_stopped(&self, since: Tally, n: usize) -> Result<(Tally, Option<String>)> {
        let mut late = None;
        let mut deadline = Instant::now() + PUSH_DEADLINE;
        let mut t = self
            .tally
            .lock()
            .map_err(|_| anyhow!("stall board poisoned"))?;
        while t.stopped() - since.stopped() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let started = t.started - since.started;
                let msg = format!(
                    "{} of {n} connections still took bytes after {} s: the system never blocked \
                     ({} never reached the server; {} MiB pushed by then)",
                    started.saturating_sub(t.stopped() - since.stopped()),
                    PUSH_DEADLINE.as_secs(),
                    n.saturating_sub(started),
                    self.wave.load(Ordering::Relaxed) >> 20
                );
                if late.is_some() {
                    bail!("{msg}, and kept pushing when told to stop");
                }
                // Stop them, then measure and drain what was pushed.
                self.halt.store(true, Ordering::Relaxed);
                late = Some(msg);
                deadline = Instant::now() + 2 * BLOCKED;
                continue;
            }
            t = self
                .changed
                .wait_timeout(t, left)
                .map_err(|_| anyhow!("stall board poisoned"))?
                .0;
        }
        Ok((*t, late))
    }
}

/// One 1 MiB block of the bench's pattern, shared by every pusher (a
/// pattern each would cost 1 GiB for 1,000 connections).
fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| Pattern::new(11).next(1 << 20).to_vec())
}

/// The server's side of one stalled connection: push until a write
/// blocks, then the trailer (which goes once the client reads), FIN, and
/// wait for the client to close.
pub fn push(mut s: TcpStream, board: &Board) -> io::Result<()> {
    board.report(|t| t.started += 1);
    let block = block();
    let mut h = Xxh3::new();
    let (mut pos, mut laps, mut pushed) = (0usize, 0usize, 0u64);
    s.set_write_timeout(Some(BLOCKED))?;
    let capped = loop {
        if pushed >= CAP_PER_CONN
            || board.wave.load(Ordering::Relaxed) >= board.budget
            || board.halt.load(Ordering::Relaxed)
        {
            break true;
        }
        if pos == block.len() {
            // Start each lap elsewhere, so a chunk reordered across laps
            // changes the hash.
            laps += 1;
            pos = laps * 4099 % (block.len() / 2);
        }
        let chunk = &block[pos..(pos + CHUNK).min(block.len())];
        match s.write(chunk) {
            Ok(n) => {
                h.update(&chunk[..n]);
                pos += n;
                pushed += n as u64;
                board.wave.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break false;
            }
            Err(e) => {
                if let Ok(mut first) = board.first_error.lock() {
                    first.get_or_insert_with(|| format!("a server write failed: {e}"));
                }
                board.report(|t| t.failed += 1);
                return Err(e);
            }
        }
    };
    board.report(|t| {
        t.pushed += pushed;
        if capped {
            t.capped += 1;
        } else {
            t.blocked += 1;
        }
    });
    s.set_write_timeout(Some(PUSH_DEADLINE + DRAIN_IDLE))?;
    s.write_all(
        &Digest {
            bytes: pushed,
            hash: h.digest(),
        }
        .to_bytes(),
    )?;
    s.shutdown(Shutdown::Write)?;
    // Closing now would leave an orphan with the stream still queued, and
    // under TCP memory pressure the kernel kills orphans (tcp_check_oom),
    // sometimes without a reset: the stream would end short or hang. So
    // the socket stays open until the client, having read it all, closes.
    s.set_read_timeout(Some(PUSH_DEADLINE + DRAIN_IDLE))?;
    let mut rest = [0u8; 64];
    while s.read(&mut rest)? > 0 {}
    Ok(())
}

pub struct Stall<M> {
    /// What `measure` returned, at the moment every pusher had stopped.
    pub measured: M,
    pub pushed: u64,
    /// Connections whose bytes did not match the server's trailer, with
    /// the first few explained.
    pub mismatched: usize,
    pub problems: Vec<String>,
}

/// Opens `n` connections that never read, waits until the server's
/// pushers all blocked, runs `measure`, then drains every connection and
/// checks it.
pub fn run<M>(
    topo: &Topology,
    addr: SocketAddr,
    n: usize,
    board: &Board,
    measure: impl FnOnce() -> Result<M>,
) -> Result<Stall<M>> {
    let since = board.tally();
    board.wave.store(0, Ordering::Relaxed);
    board.halt.store(false, Ordering::Relaxed);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = connect(topo.client.as_ref(), addr)
            .with_context(|| format!("opening stalled connection {} of {n}", i + 1))?;
        s.write_all(b"S")?;
        conns.push(s);
    }
    let (stopped, late) = board.wait_stopped(since, n)?;
    let measured = measure()?;
    let mut problems: Vec<String> = late.into_iter().collect();
    let (capped, failed) = (stopped.capped - since.capped, stopped.failed - since.failed);
    if capped > 0 {
        problems.push(format!(
            "{capped} connection(s) stopped by the bench without blocking (cap: {} GiB each, {} \
             MiB per run, {} s): no backpressure",
            CAP_PER_CONN >> 30,
            board.budget >> 20,
            PUSH_DEADLINE.as_secs()
        ));
    }
    if failed > 0 {
        let first = board.first_error.lock().ok().and_then(|e| e.clone());
        problems.push(format!(
            "{failed} server write(s) failed ({})",
            first.unwrap_or_default()
        ));
    }
    let got = drain(&mut conns)?;
    let mut mismatched = 0;
    for (i, r) in got.iter().enumerate() {
        if let Err(e) = r.check() {
            mismatched += 1;
            if mismatched <= 3 {
                problems.push(format!("connection {}: {e}", i + 1));
            }
        }
    }
    if mismatched > 3 {
        problems.push(format!("{} more connections differ", mismatched - 3));
    }
    Ok(Stall {
        measured,
        pushed: stopped.pushed - since.pushed,
        mismatched,
        problems,
    })
}

/// What one connection received: everything but the last 16 bytes is
/// hashed, those are the server's trailer.
#[derive(Default)]
struct Received {
    bytes: u64,
    hash: Xxh3,
    tail: [u8; TRAILER],
    tail_len: usize,
    eof: bool,
    error: Option<String>,
}

impl Received {
    fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        if data.len() >= TRAILER {
            self.hash.update(&self.tail[..self.tail_len]);
            let cut = data.len() - TRAILER;
            self.hash.update(&data[..cut]);
            self.tail.copy_from_slice(&data[cut..]);
            self.tail_len = TRAILER;
            return;
        }
        let len = self.tail_len + data.len();
        let mut both = [0u8; 2 * TRAILER];
        both[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        both[self.tail_len..len].copy_from_slice(data);
        let cut = len.saturating_sub(TRAILER);
        self.hash.update(&both[..cut]);
        self.tail[..len - cut].copy_from_slice(&both[cut..len]);
        self.tail_len = len - cut;
    }

    fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.tail_len < TRAILER {
            return Err(format!(
                "{} bytes arrived, fewer than the server's trailer",
                self.bytes
            ));
        }
        let sent = Digest::from_bytes(self.tail);
        let got = self.bytes - TRAILER as u64;
        if got != sent.bytes {
            return Err(format!(
                "received {got} bytes, the server pushed {}",
                sent.bytes
            ));
        }
        if self.hash.digest() != sent.hash {
            return Err(format!("{got} bytes arrived, but not the bytes pushed"));
        }
        Ok(())
    }
}

/// Reads every connection to EOF at once (one poll loop), as if all the
/// sleeping clients woke together.
fn drain(conns: &mut [TcpStream]) -> Result<Vec<Received>> {
    let mut got: Vec<Received> = conns.iter().map(|_| Received::default()).collect();
    for s in conns.iter() {
        s.set_nonblocking(true)?;
    }
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let open: Vec<usize> = (0..conns.len()).filter(|&i| !got[i].eof).collect();
        if open.is_empty() {
            return Ok(got);
        }
        let mut fds: Vec<PollFd<'_>> = open
            .iter()
            .map(|&i| PollFd::new(conns[i].as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(DRAIN_IDLE).unwrap_or(PollTimeout::MAX);
        let ready = match poll(&mut fds, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("polling the stalled connections"),
        };
        if ready == 0 {
            let stuck: Vec<String> = open
                .iter()
                .take(3)
                .map(|&i| format!("connection {} after {} bytes", i + 1, got[i].bytes))
                .collect();
            bail!(
                "{} of {} connections made no progress for {} s while draining ({})",
                open.len(),
                conns.len(),
                DRAIN_IDLE.as_secs(),
                stuck.join(", ")
            );
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for (k, &i) in open.iter().enumerate() {
            if !ready[k] {
                continue;
            }
            let r = &mut got[i];
            // A few reads each round, so no connection starves the rest.
            for _ in 0..8 {
                match conns[i].read(&mut buf) {
                    Ok(0) => {
                        r.eof = true;
                        break;
                    }
                    Ok(n) => r.feed(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        r.error = Some(format!("reading failed after {} bytes: {e}", r.bytes));
                        r.eof = true;
                        break;
                    }
                }
            }
        }
    }
}
