//! `zc relay`: a small TCP proxy. Accepts clients, connects each to the
//! upstream, and hands the two sockets to an engine.
//!
//! The relay sizes itself to its open-file limit: it takes only as many
//! connections at once as it has file descriptors for, and leaves further
//! clients in the listen backlog until others end, so no accepted
//! connection is ever reset or stalled for want of a descriptor.
use std::{
    fmt, io,
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use log::{debug, info, warn};
use nix::errno::Errno;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Semaphore, TryAcquireError},
    task::JoinSet,
};

use crate::{
    engine::{Engine, Summary},
    idle::Activity,
    sys,
};

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub connect_timeout: Duration,
    /// Most connections at once; the relay may take fewer (see
    /// [`Capacity`]).
    pub max_conns: usize,
    /// After a stop signal: how long open connections may finish.
    pub shutdown_grace: Duration,
    /// A connection that moves no byte either way for this long, with
    /// nothing in flight, is ended with a FIN to both ends (see
    /// [`crate::idle`]). None: never.
    pub idle_timeout: Option<Duration>,
    /// Longest retransmission timeout of the relay's own sockets
    /// (TCP_RTO_MAX_MS, Linux 6.15+); None keeps the kernel's 120 s.
    pub rto_max: Option<Duration>,
}

/// Totals over the relay's life.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub finished: AtomicU64,
    pub reset: AtomicU64,
    pub failed: AtomicU64,
    pub bytes: AtomicU64,
    /// Of `bytes`, those the relay moved itself: all of them in splice and
    /// copy mode, a held direction's in BPF mode.
    pub user_bytes: AtomicU64,
    /// BPF engine: times a direction was held back, and moved to user
    /// space for its small segments (see [`Summary`]).
    pub holds: AtomicU64,
    pub small_moves: AtomicU64,
    /// BPF engine: relay sockets made to announce their window (see
    /// [`Summary`]).
    pub kicks: AtomicU64,
    /// Connections ended by --idle-timeout (counted in `finished` too).
    pub idle: AtomicU64,
}

/// Descriptors kept free beyond those open when the relay binds (its
/// listener, BPF maps and programs, the runtime's own): the signal
/// handlers' pipe, /proc reads, log files a library might open.
const SPARE_FDS: u64 = 64;

/// A connection's two sockets.
const SOCKETS: usize = 2;

/// Slowest retry of accept() after a resource error, when no connection
/// ends to free one sooner.
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(1);

/// A limit is announced at info/warn level at most this often; repeats in
/// between are logged at debug level.
const NOTICE_EVERY: Duration = Duration::from_secs(600);

/// How many connections the relay takes at once, and what decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Connections relayed at once; further clients wait in the listen
    /// backlog until one ends.
    pub max_conns: usize,
    /// The open-file limit (soft RLIMIT_NOFILE) after raising it.
    pub fd_limit: u64,
    /// Descriptors one connection may hold at most, its sockets included.
    pub fds_per_conn: usize,
    /// Descriptors kept for everything else: those open at start, idle
    /// pipes, a margin.
    pub reserved: u64,
    pub bound: Bound,
}

/// What set [`Capacity::max_conns`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// `--max-conns`.
    Requested,
    /// The open-file limit.
    Fds,
    /// The splice pipe pool (`--max-pipes`): two pipes per connection.
    Pipes(usize),
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Requested => write!(f, "--max-conns"),
            Bound::Fds => write!(f, "the open-file limit"),
            Bound::Pipes(n) => write!(f, "--max-pipes {n}, two per connection"),
        }
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at most {} connections at once ({}; {} fds per connection, open-file limit {}, \
             {} fds reserved)",
            self.max_conns, self.bound, self.fds_per_conn, self.fd_limit, self.reserved
        )
    }
}

impl Capacity {
    /// Sizes a relay running `engine` to the open-file limit `fd_limit`,
    /// with `open_fds` descriptors already in use.
    pub fn of(engine: &Engine, requested: usize, fd_limit: u64, open_fds: u64) -> Result<Self> {
        let (fds_per_conn, idle_fds, pipes) = match engine {
            Engine::Copy(_) => (SOCKETS, 0, None),
            Engine::Splice(e) => {
                let pool = e.pool();
                // Idle pipes (two fds each) outlive connections, up to the
                // pool's idle cap.
                let idle = 2 * pool.idle_max().min(pool.max()) as u64;
                if pool.max() < 2 {
                    // No connection ever gets its two pipes: all are copied.
                    (SOCKETS, idle, None)
                } else {
                    (SOCKETS + e.fds_per_conn(), idle, Some(pool.max()))
                }
            }
            // Forwarding registers the sockets it moves under their own
            // descriptors (engine::bpf::io): no more are needed.
            Engine::Bpf(_) => (SOCKETS, 0, None),
        };
        let reserved = open_fds + SPARE_FDS + idle_fds;
        let by_fds = fd_limit.saturating_sub(reserved) / fds_per_conn as u64;
        let by_fds = usize::try_from(by_fds).unwrap_or(usize::MAX);
        let mut cap = (requested.max(1), Bound::Requested);
        if by_fds < cap.0 {
            cap = (by_fds, Bound::Fds);
        }
        // A connection that finds no free pipe would have to be copied;
        // the relay waits for pipes instead, as it waits for descriptors.
        if let Some(max) = pipes
            && max / 2 < cap.0
        {
            cap = (max / 2, Bound::Pipes(max));
        }
        if cap.0 == 0 {
            anyhow::bail!(
                "the open-file limit ({fd_limit}) leaves no room for a connection: \
                 {reserved} fds are reserved and one connection needs {fds_per_conn}; \
                 raise it (ulimit -n)"
            );
        }
        Ok(Self {
            max_conns: cap.0,
            fd_limit,
            fds_per_conn,
            reserved,
            bound: cap.1,
        })
    }
}

/// Raises the soft open-file limit to the hard limit (each relayed
/// connection holds at least two sockets) and returns the soft limit now
/// in force. The one place zc changes its limit.
pub fn raise_fd_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let target = fd_ceiling(soft, hard);
    if target <= soft {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)
        .with_context(|| format!("raising RLIMIT_NOFILE from {soft} to {target}"))?;
    Ok(target)
}

/// The most descriptors this process may raise its limit to: the hard
/// limit, or fs.nr_open when that is unlimited.
fn fd_ceiling(soft: u64, hard: u64) -> u64 {
    if hard == nix::sys::resource::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(soft)
    } else {
        hard
    }
}

/// How many sockets the BPF maps of a relay taking `max_conns`
/// connections at once must hold: two per connection, but no more than
/// the open-file limit lets it open (each socket is a descriptor), plus
/// the self-test's pair. Sized so, the maps never fill before the relay
/// stops accepting.
pub fn bpf_sockets(max_conns: usize) -> u32 {
    use nix::sys::resource::{Resource, getrlimit};
    let wanted = 2 * max_conns as u64;
    let fds = getrlimit(Resource::RLIMIT_NOFILE).map_or(wanted, |(s, h)| fd_ceiling(s, h));
    u32::try_from(wanted.min(fds) + 2).unwrap_or(u32::MAX)
}

/// Descriptors this process has open.
fn open_fds() -> io::Result<u64> {
    // The directory's own descriptor is among the entries.
    Ok((std::fs::read_dir("/proc/self/fd")?.count() as u64).saturating_sub(1))
}

/// Says a limit was reached: at info/warn level the first time and then at
/// most every [`NOTICE_EVERY`], at debug level otherwise, so a relay that
/// stays at a limit does not log once per connection.
#[derive(Default)]
struct Notice(Mutex<Option<Instant>>);

impl Notice {
    fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= NOTICE_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

/// One [`Notice`] per kind of limit.
#[derive(Default)]
struct Notices {
    conns: Notice,
    accept: Notice,
    upstream: Notice,
}

/// A bound relay, ready to serve.
pub struct Relay {
    listener: TcpListener,
    engine: Engine,
    config: Config,
    capacity: Capacity,
    notices: Arc<Notices>,
    pub stats: Arc<Stats>,
}

impl Relay {
    /// Raises the open-file limit, listens, and sizes the relay to the
    /// limit (see [`Capacity`]).
    pub async fn bind(config: Config, engine: Engine) -> Result<Self> {
        let fd_limit = raise_fd_limit().or_else(|e| {
            warn!("keeping the open-file limit: {e:#}");
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft)
                .context("reading RLIMIT_NOFILE")
        })?;
        let mut config = config;
        if let Some(max) = config.rto_max {
            match sys::probe_rto_max(max) {
                Ok(()) => info!(
                    "zc relay: retransmission timeout capped at {max:?}; TCP gives up on a \
                     peer that acknowledges nothing for about {:?}",
                    sys::give_up_after(max)
                ),
                Err(e) => {
                    warn!("--rto-max {max:?} is ignored: {e}");
                    config.rto_max = None;
                }
            }
        }
        let listener =
            listen(config.listen).with_context(|| format!("listening on {}", config.listen))?;
        if let Engine::Bpf(e) = &engine {
            e.park_ends(listener.local_addr()?, config.upstream)
                .context("naming the relay's sockets to the parking program")?;
        }
        // Counted after the listener, so it is in the reserve.
        let open = open_fds().context("counting open fds in /proc/self/fd")?;
        let capacity = Capacity::of(&engine, config.max_conns, fd_limit, open)?;
        Ok(Self {
            listener,
            engine,
            config,
            capacity,
            notices: Arc::default(),
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// How many connections the relay takes at once, and why.
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// What `/metrics` shows for this relay, rendered anew on each scrape.
    pub fn metrics(&self, mode: &'static str) -> crate::metrics::Render {
        let (stats, engine, max) = (
            self.stats.clone(),
            self.engine.clone(),
            self.capacity.max_conns,
        );
        Arc::new(move || render_metrics(&stats, &engine, mode, max))
    }

    /// Serves until `stop` resolves, then lets open connections finish for
    /// the grace period and resets the rest.
    pub async fn serve(self, stop: impl Future<Output = ()>) -> Result<()> {
        let limit = Arc::new(Semaphore::new(self.capacity.max_conns));
        let mut conns = JoinSet::new();
        tokio::pin!(stop);
        'serve: loop {
            while conns.try_join_next().is_some() {}
            // Take a connection's worth of descriptors before accepting, so
            // a client is only accepted when it can be relayed; the rest
            // wait in the listen backlog.
            let permit = match limit.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(TryAcquireError::Closed) => anyhow::bail!("connection limit closed"),
                Err(TryAcquireError::NoPermits) => {
                    let msg = format!(
                        "connection limit reached: {} connections open, the most {} allows; \
                         further clients wait in the listen backlog until connections end",
                        self.capacity.max_conns, self.capacity.bound
                    );
                    if self.notices.conns.due() {
                        info!("{msg}");
                    } else {
                        debug!("{msg}");
                    }
                    loop {
                        tokio::select! {
                            _ = &mut stop => break 'serve,
                            p = limit.clone().acquire_owned() => {
                                break p.context("connection limit closed")?;
                            }
                            // Reap ended connections while waiting.
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        }
                    }
                }
            };
            // The upstream socket is made before the client is accepted:
            // a client taken in must never be reset because its second
            // descriptor could not be had. Out of descriptors, the client
            // stays in the listen backlog instead.
            let mut retry = Duration::from_millis(10);
            let (client, peer, upstream) = loop {
                let r = match upstream_socket(self.config.upstream) {
                    Ok(up) => tokio::select! {
                        _ = &mut stop => break 'serve,
                        r = self.listener.accept() => r.map(|(c, p)| (c, p, up)),
                    },
                    Err(e) => Err(e),
                };
                match r {
                    Ok(c) => break c,
                    // This client's connection failed before it was
                    // accepted; the queue moved on, so try the next.
                    Err(e) if aborted_before_accept(&e) => debug!("accept: {e}"),
                    Err(e) => {
                        // EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once
                        // would spin; wait for a connection to end (freeing
                        // its descriptors) or a timer, whichever comes first.
                        let msg = format!(
                            "accept failed: {e} ({} connections open); not accepting until a \
                             connection ends or {retry:?} passed, further clients wait in the \
                             listen backlog",
                            conns.len()
                        );
                        if self.notices.accept.due() {
                            warn!("{msg}");
                        } else {
                            debug!("{msg}");
                        }
                        tokio::select! {
                            _ = &mut stop => break 'serve,
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                            _ = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(ACCEPT_RETRY_MAX);
                    }
                }
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let (engine, cfg, stats, notices) = (
                self.engine.clone(),
                self.config.clone(),
                self.stats.clone(),
                self.notices.clone(),
            );
            conns.spawn(async move {
                let _permit = permit;
                if let Err(e) =
                    serve_one(client, peer, upstream, &engine, &cfg, &stats, &notices).await
                {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    warn!("{peer}: {e:#}");
                }
            });
        }
        // Reap what already ended so the count below is of open ones.
        while conns.try_join_next().is_some() {}
        info!(
            "stopping: {} open connection(s), grace {:?}",
            conns.len(),
            self.config.shutdown_grace
        );
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                "resetting {} connection(s) still open after the grace period",
                conns.len()
            );
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        }
        Ok(())
    }
}

/// Errors accept(2) reports for one pending connection that failed, not
/// for the relay: the next accept takes the next client (accept(2), "Error
/// handling").
fn aborted_before_accept(e: &io::Error) -> bool {
    errno_in(
        e,
        &[
            Errno::ECONNABORTED,
            Errno::EPROTO,
            Errno::EPERM,
            Errno::ENETDOWN,
            Errno::ENOPROTOOPT,
            Errno::EHOSTDOWN,
            Errno::ENONET,
            Errno::EHOSTUNREACH,
            Errno::EOPNOTSUPP,
            Errno::ENETUNREACH,
        ],
    )
}

/// Out of descriptors, buffers or local ports: worth retrying once
/// something ends.
fn out_of_resources(e: &io::Error) -> bool {
    errno_in(
        e,
        &[
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOBUFS,
            Errno::ENOMEM,
            Errno::EADDRNOTAVAIL,
        ],
    )
}

fn errno_in(e: &io::Error, set: &[Errno]) -> bool {
    e.raw_os_error()
        .is_some_and(|code| set.iter().any(|&errno| errno as i32 == code))
}

/// [`sys::listen_deep`], registered with the runtime.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = sys::listen_deep(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// An unconnected socket of the upstream's address family.
fn upstream_socket(upstream: SocketAddr) -> io::Result<TcpSocket> {
    if upstream.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Connects `first` to the upstream. Running out of local ports (or, on a
/// retry, descriptors) is not the upstream's fault: retried until the
/// connect timeout rather than resetting the client at once.
async fn connect_upstream(first: TcpSocket, cfg: &Config, notices: &Notices) -> Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let mut retry = Duration::from_millis(10);
    let mut sock = Some(first);
    loop {
        let attempt = async {
            let s = match sock.take() {
                Some(s) => s,
                None => upstream_socket(cfg.upstream)?,
            };
            s.connect(cfg.upstream).await
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e))
                if out_of_resources(&e) && tokio::time::Instant::now() + retry < deadline =>
            {
                let msg = format!(
                    "connecting to upstream {}: {e}; retrying for up to {:?}",
                    cfg.upstream, cfg.connect_timeout
                );
                if notices.upstream.due() {
                    warn!("{msg}");
                } else {
                    debug!("{msg}");
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_millis(500));
            }
            Ok(Err(e)) => {
                return Err(e).with_context(|| format!("connecting to upstream {}", cfg.upstream));
            }
            Err(_) => anyhow::bail!(
                "connecting to upstream {} timed out after {:?}",
                cfg.upstream,
                cfg.connect_timeout
            ),
        }
    }
}

async fn serve_one(
    client: TcpStream,
    peer: SocketAddr,
    upstream: TcpSocket,
    engine: &Engine,
    cfg: &Config,
    stats: &Stats,
    notices: &Notices,
) -> Result<()> {
    let started = std::time::Instant::now();
    debug!("{peer}: accepted");
    let client = client
        .into_std()
        .context("taking the client socket from the runtime")?;
    let upstream = match connect_upstream(upstream, cfg, notices).await {
        Ok(s) => s
            .into_std()
            .context("taking the upstream socket from the runtime")?,
        Err(e) => {
            let _ = sys::set_reset_on_close(std::os::fd::AsFd::as_fd(&client));
            return Err(e);
        }
    };
    debug!("{peer}: connected upstream");
    if let Some(max) = cfg.rto_max {
        for s in [&client, &upstream] {
            if let Err(e) = sys::set_rto_max(std::os::fd::AsFd::as_fd(s), max) {
                debug!("{peer}: setting TCP_RTO_MAX_MS: {e}");
            }
        }
    }
    let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
    let counts = crate::engine::Counts::default();
    let (paired, keys) = tokio::sync::oneshot::channel();
    let mut activity = Activity::new(engine.clone(), counts.clone(), keys);
    let mut relay = ResetIfDropped {
        fds,
        done: false,
        relay: Box::pin(engine.relay_observed(client, upstream, counts.clone(), paired)),
    };
    let (summary, idle) = match cfg.idle_timeout {
        None => ((&mut relay).await?, false),
        Some(t) => tokio::select! {
            r = &mut relay => (r?, false),
            () = activity.idle_for(t, fds) => {
                // Read before the engine, dropped, takes the pair out of
                // the maps with its counts.
                let [a_to_b, b_to_a] = activity.moved();
                relay.end_cleanly();
                drop(relay);
                (Summary { a_to_b, b_to_a, ..Summary::default() }, true)
            }
        },
    };
    stats.finished.fetch_add(1, Ordering::Relaxed);
    if idle {
        stats.idle.fetch_add(1, Ordering::Relaxed);
    }
    stats
        .bytes
        .fetch_add(summary.a_to_b + summary.b_to_a, Ordering::Relaxed);
    let by_user: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    stats.user_bytes.fetch_add(by_user, Ordering::Relaxed);
    if summary.reset {
        stats.reset.fetch_add(1, Ordering::Relaxed);
    }
    stats.holds.fetch_add(summary.holds, Ordering::Relaxed);
    stats
        .small_moves
        .fetch_add(summary.small, Ordering::Relaxed);
    stats.kicks.fetch_add(summary.kicks, Ordering::Relaxed);
    info!(
        "{}",
        access_line(
            peer,
            cfg.upstream,
            engine,
            &summary,
            by_user,
            idle,
            started.elapsed()
        )
    );
    Ok(())
}

fn render_metrics(s: &Stats, engine: &Engine, mode: &str, max_conns: usize) -> String {
    use crate::metrics::Family;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let ended = get(&s.finished) + get(&s.failed);
    let mut out = String::new();
    Family::new(&mut out, "zc_relay_info", "gauge", "The relay's data path.")
        .sample(&[("mode", mode)], 1.0);
    Family::new(
        &mut out,
        "zc_relay_connections_open",
        "gauge",
        "Connections being relayed now.",
    )
    .sample(&[], (get(&s.accepted) - ended).max(0.0));
    Family::new(
        &mut out,
        "zc_relay_connections_max",
        "gauge",
        "Connections the relay takes at once (its descriptor limit).",
    )
    .sample(&[], max_conns as f64);
    let closed = get(&s.finished) - get(&s.reset) - get(&s.idle);
    Family::new(
        &mut out,
        "zc_relay_connections_total",
        "counter",
        "Connections that ended, by how: closed (every byte delivered), reset, idle_timeout (nothing moved for --idle-timeout; both ends got FIN), failed (upstream unreachable or an error).",
    )
    .sample(&[("result", "closed")], closed.max(0.0))
    .sample(&[("result", "idle_timeout")], get(&s.idle))
    .sample(&[("result", "reset")], get(&s.reset))
    .sample(&[("result", "failed")], get(&s.failed));
    Family::new(
        &mut out,
        "zc_relay_bytes_total",
        "counter",
        "Bytes both ways of connections that ended.",
    )
    .sample(&[], get(&s.bytes));
    Family::new(
        &mut out,
        "zc_relay_user_space_bytes_total",
        "counter",
        "Of zc_relay_bytes_total, the bytes the relay moved itself: all of them in splice and copy mode; in bpf mode those of directions held for a slow reader or moved for small segments.",
    )
    .sample(&[], get(&s.user_bytes));
    Family::new(
        &mut out,
        "zc_kernel_redirected_bytes_total",
        "counter",
        "Bytes the BPF programs redirected in the kernel, live (0 without the BPF path).",
    )
    .sample(&[], engine.kernel_bytes() as f64);
    Family::new(
        &mut out,
        "zc_relay_switches_total",
        "counter",
        "Times a direction moved to user space: held back for a slow reader (window), or for small segments.",
    )
    .sample(&[("reason", "window")], get(&s.holds))
    .sample(&[("reason", "small_segments")], get(&s.small_moves));
    Family::new(
        &mut out,
        "zc_relay_window_kicks_total",
        "counter",
        "Times a relay socket that heard no acknowledgment from its end for 250 ms while a held or parked direction waited for it, with bytes in flight and its own window shut or its memory past its buffer, was made to announce its window (TCP repair mode), so that acknowledgments its end stamped past that window count again.",
    )
    .sample(&[], get(&s.kicks));
    match crate::sock_diag::own_socket_memory() {
        Ok(bytes) => {
            Family::new(
                &mut out,
                "zc_relay_socket_memory_bytes",
                "gauge",
                "Kernel memory the relay's own TCP sockets hold now: bytes received and not yet taken, and bytes queued to send, with skb overhead (what `ss -tm` shows as r and w). Bytes waiting in the kernel's redirect queues are not in it.",
            )
            .sample(&[], bytes as f64);
        }
        // Left out rather than shown as 0.
        Err(e) => debug!("reading the relay's socket memory for the metrics: {e:#}"),
    }
    out
}

/// The access log's line for one connection: who, where to, bytes each
/// way, how long, which data path (for BPF, how much of the connection
/// went through user space, `by_user` bytes), how it ended.
fn access_line(
    peer: SocketAddr,
    upstream: SocketAddr,
    engine: &Engine,
    s: &Summary,
    by_user: u64,
    idle: bool,
    took: Duration,
) -> String {
    let path = match engine {
        Engine::Bpf(_) if s.holds + s.small > 0 || by_user > 0 => format!(
            "bpf ({}{} holds, {} moves for small segments; {by_user} bytes through user space, \
             {} of them for small segments)",
            if s.parks > 0 {
                format!("{} parks, ", s.parks)
            } else {
                String::new()
            },
            s.holds,
            s.small,
            s.small_bytes
        ),
        Engine::Bpf(_) if s.parks > 0 => format!("bpf ({} parks)", s.parks),
        Engine::Bpf(_) => "bpf".to_string(),
        Engine::Splice(_) => "splice".to_string(),
        Engine::Copy(_) => "copy".to_string(),
    };
    let path = match s.kicks {
        0 => path,
        1 => format!("{path}, 1 window kick"),
        n => format!("{path}, {n} window kicks"),
    };
    let end = match (s.reset, s.cause, idle) {
        (true, Some(cause), _) => format!("reset ({cause})"),
        (true, None, _) => "reset".to_string(),
        (false, _, true) => "idle timeout".to_string(),
        (false, _, false) => "closed".to_string(),
    };
    format!(
        "{peer} -> {upstream}: {} bytes up, {} down, {:.3} s, {path}, {end}",
        s.a_to_b,
        s.b_to_a,
        took.as_secs_f64()
    )
}

/// An engine relaying two sockets it owns. If dropped before it finishes
/// (a task aborted at shutdown), it first makes both closes abortive, so
/// neither end mistakes the cut for a clean end of stream.
///
/// It keeps the sockets' fd numbers rather than duplicates, which would
/// double what a connection costs in descriptors. That is sound because
/// the engine owns both sockets until its future completes: while `relay`
/// is alive the numbers still name these sockets, `drop` runs before the
/// fields (so before `relay` closes them), and once `relay` completed the
/// numbers are never used again.
struct ResetIfDropped<F> {
    fds: [RawFd; 2],
    done: bool,
    relay: Pin<Box<F>>,
}

impl<F: Future<Output = Result<Summary>>> Future for ResetIfDropped<F> {
    type Output = Result<Summary>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = self.relay.as_mut().poll(cx);
        if out.is_ready() {
            self.done = true;
        }
        out
    }
}

impl<F> ResetIfDropped<F> {
    /// The engine is about to be dropped with nothing in flight: both
    /// closes become graceful (a FIN each), as when the engine ends by
    /// itself. The kernel still resets a socket closed with unread bytes.
    fn end_cleanly(&mut self) {
        self.done = true;
        for &fd in &self.fds {
            // SAFETY: as in `drop`: `relay` has not completed.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = socket2::SockRef::from(&fd).set_linger(None);
        }
    }
}

impl<F> Drop for ResetIfDropped<F> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for &fd in &self.fds {
            // SAFETY: `relay` has not completed, so it still owns the
            // socket behind `fd` (see the type's comment).
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = sys::set_reset_on_close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::{
        copy::CopyEngine,
        splice::{PipePool, SpliceEngine},
    };

    fn splice(max_pipes: usize) -> Engine {
        Engine::Splice(SpliceEngine::new(Arc::new(PipePool::new(
            max_pipes,
            1 << 16,
        ))))
    }

    #[test]
    fn copy_costs_two_fds_per_connection() {
        let c =
            Capacity::of(&Engine::Copy(CopyEngine::default()), 10_000, 1024, 20).expect("capacity");
        assert_eq!(c.fds_per_conn, 2);
        assert_eq!(c.reserved, 20 + SPARE_FDS);
        assert_eq!(c.max_conns, (1024 - 20 - SPARE_FDS as usize) / 2);
        assert_eq!(c.bound, Bound::Fds);
    }

    #[test]
    fn splice_counts_pipes_and_idle_pipes() {
        let c = Capacity::of(&splice(4096), 10_000, 1024, 20).expect("capacity");
        assert_eq!(c.fds_per_conn, 6);
        let idle = 2 * crate::engine::splice::DEFAULT_IDLE_PIPES as u64;
        assert_eq!(c.reserved, 20 + SPARE_FDS + idle);
        assert_eq!(c.max_conns as u64, (1024 - c.reserved) / 6);
    }

    #[test]
    fn splice_waits_for_pipes_rather_than_copying() {
        let c = Capacity::of(&splice(100), 10_000, 20_000, 20).expect("capacity");
        assert_eq!((c.max_conns, c.bound), (50, Bound::Pipes(100)));
    }

    #[test]
    fn the_requested_cap_holds_when_fds_allow_more() {
        let c =
            Capacity::of(&Engine::Copy(CopyEngine::default()), 100, 20_000, 20).expect("capacity");
        assert_eq!((c.max_conns, c.bound), (100, Bound::Requested));
    }

    #[test]
    fn a_limit_without_room_for_one_connection_is_an_error() {
        let e =
            Capacity::of(&Engine::Copy(CopyEngine::default()), 100, 64, 20).expect_err("no room");
        assert!(format!("{e:#}").contains("open-file limit (64)"), "{e:#}");
    }
}
