//! Shared test support: a relay in this process, traffic with digests,
//! and loud failures when BPF is not available.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod agent;
pub mod netns;
pub mod process;
pub mod scrape;
pub mod sockmem;

use std::{net::SocketAddr, os::fd::AsFd, sync::Once, time::Duration};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use xxhash_rust::xxh3::Xxh3;
use zc_user::{
    ebpf::Programs,
    engine::{Engine, bpf::BpfEngine},
    relay::{Config, Relay},
    watch::Watcher,
};

/// Generous bound for anything that must finish; hitting it means a hang
/// (a missed EOF, a stalled redirect), never a slow machine.
pub const HANG: Duration = Duration::from_secs(60);

pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Warnings, and each relayed connection's access line (which says
        // how it ended), so that a failed test shows what the relay saw;
        // the harness prints them only for a test that fails.
        let _ = env_logger::Builder::from_env(
            env_logger::Env::default().default_filter_or("warn,zc_user::relay=info"),
        )
        .is_test(true)
        .try_init();
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    });
}

/// Loads the programs or fails the test saying why.
pub fn programs() -> Programs {
    init();
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test loads BPF programs into the kernel and needs root (or CAP_BPF + CAP_NET_ADMIN); run the suite as root: `cargo xtask test`"
        );
    }
    Programs::load().unwrap_or_else(|e| {
        panic!("this test needs zc's BPF programs, and loading them failed: {e}")
    })
}

pub fn bpf_engine(progs: &Programs) -> Engine {
    let watcher = Watcher::start().expect("starting the socket watcher");
    Engine::Bpf(BpfEngine::new(progs.clone(), watcher))
}

/// A relay served by this process until the handle is stopped.
pub struct TestRelay {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestRelay {
    pub async fn start(engine: Engine, upstream: SocketAddr) -> Self {
        let listen: SocketAddr = if upstream.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        }
        .parse()
        .expect("addr");
        let config = Config {
            listen,
            upstream,
            connect_timeout: Duration::from_secs(5),
            max_conns: 10_000,
            shutdown_grace: Duration::from_secs(5),
            idle_timeout: None,
            rto_max: None,
        };
        let relay = Relay::bind(config, engine)
            .await
            .expect("binding the relay");
        let addr = relay.local_addr().expect("relay address");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            relay
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .expect("relay failed");
        });
        Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("relay task panicked");
        }
    }
}

/// Count and digest of one direction of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest {
    pub bytes: u64,
    pub hash: u64,
}

/// The sizes a sender writes in.
#[derive(Clone, Copy, Debug)]
pub enum Writes {
    /// Random sizes from 1 byte to this (log-uniform, so both tiny and
    /// huge writes occur).
    UpTo(usize),
    /// Always this many bytes (the last write may be shorter).
    Exactly(usize),
}

/// Random bytes from `seed`, written in random sizes from 1 byte to
/// `max_write` (see [`Writes::UpTo`]).
pub async fn send_random<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    total: u64,
    max_write: usize,
    seed: u64,
) -> std::io::Result<Digest> {
    send_sized(w, total, Writes::UpTo(max_write), seed).await
}

/// Bytes from `seed`, written in `writes`. Random sizes get random bytes;
/// fixed sizes come from [`zc_user::traffic::Pattern`], cheap enough that
/// the sender outruns the relay (filling 16 KiB from the RNG per write
/// slowed the sender until its reader never lagged).
pub async fn send_sized<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    total: u64,
    writes: Writes,
    seed: u64,
) -> std::io::Result<Digest> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pattern = zc_user::traffic::Pattern::new(seed);
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; if let Writes::UpTo(n) = writes { n } else { 0 }];
    let mut left = total;
    while left > 0 {
        let chunk = match writes {
            Writes::UpTo(max) => {
                let bits = rng.random_range(0..=max.ilog2());
                let n = (rng.random_range(1..=(1usize << bits)) as u64).min(left) as usize;
                rng.fill(&mut buf[..n]);
                &buf[..n]
            }
            Writes::Exactly(n) => pattern.next((n as u64).min(left) as usize),
        };
        w.write_all(chunk).await?;
        h.update(chunk);
        left -= chunk.len() as u64;
    }
    Ok(Digest {
        bytes: total,
        hash: h.digest(),
    })
}

/// Reads to EOF.
pub async fn recv_all<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Digest> {
    recv_all_telling(r, |_| {}).await
}

/// [`recv_all`], telling `seen` the bytes received so far after each read.
pub async fn recv_all_telling<R: AsyncReadExt + Unpin>(
    r: &mut R,
    mut seen: impl FnMut(u64),
) -> std::io::Result<Digest> {
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut bytes = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(Digest {
                bytes,
                hash: h.digest(),
            });
        }
        h.update(&buf[..n]);
        bytes += n as u64;
        seen(bytes);
    }
}

/// Sends `total` random bytes and shuts down the write side while
/// reading everything the other side sends; returns (sent, received).
pub async fn exchange(s: TcpStream, total: u64, max_write: usize, seed: u64) -> (Digest, Digest) {
    exchange_sized(s, total, Writes::UpTo(max_write), seed).await
}

/// [`exchange`] with the write sizes given.
pub async fn exchange_sized(
    s: TcpStream,
    total: u64,
    writes: Writes,
    seed: u64,
) -> (Digest, Digest) {
    let (mut r, mut w) = s.into_split();
    let send = async move {
        let d = send_sized(&mut w, total, writes, seed)
            .await
            .expect("sending");
        w.shutdown().await.expect("shutting down the write side");
        d
    };
    let recv = async move { recv_all(&mut r).await.expect("receiving") };
    let (sent, got) = tokio::time::timeout(HANG, async { tokio::join!(send, recv) })
        .await
        .expect("exchange hung");
    (sent, got)
}

/// A server that runs `exchange` on every connection with its own seed
/// and reports both digests of each.
pub async fn exchange_server(
    addr: &str,
    total: u64,
    max_write: usize,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(Digest, Digest)>,
) {
    let (_, go) = tokio::sync::watch::channel(true);
    exchange_server_gated(addr, total, max_write, go).await
}

/// A listener whose backlog takes a thousand connections at once, as
/// `zc relay`'s does (`sys::listen_deep`). tokio's takes 128: when a relay
/// connected upstream hundreds of times at once, the queue overflowed
/// into SYN cookies, some failed (TcpExtSyncookiesFailed), and the server
/// reset connections the relay had already relayed bytes into (CI failed
/// `copy::thousand_concurrent...` that way).
pub fn listen_deep(addr: SocketAddr) -> TcpListener {
    let l = zc_user::sys::listen_deep(addr).expect("binding the server");
    l.set_nonblocking(true).expect("nonblocking");
    TcpListener::from_std(l).expect("registering the listener")
}

/// Like [`exchange_server`], but each connection waits until `go` turns
/// true before sending anything.
pub async fn exchange_server_gated(
    addr: &str,
    total: u64,
    max_write: usize,
    go: tokio::sync::watch::Receiver<bool>,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(Digest, Digest)>,
) {
    let l = listen_deep(addr.parse().expect("an address"));
    let local = l.local_addr().expect("server address");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            let mut go = go.clone();
            n += 1;
            tokio::spawn(async move {
                let _ = go.wait_for(|v| *v).await;
                let r = exchange(s, total, max_write, 1_000_000 + n).await;
                let _ = tx.send(r);
            });
        }
    });
    (local, rx)
}

/// Two loopback connections for an engine to relay, in-process: the
/// client's end, the relay's two sockets (near the client, far towards
/// the server, as std sockets an engine takes), and the server's end.
pub async fn relay_sockets() -> (
    TcpStream,
    std::net::TcpStream,
    std::net::TcpStream,
    TcpStream,
) {
    relay_sockets_with(|_| {}).await
}

/// [`relay_sockets`], named to `progs`' parking program before they
/// connect (it asks TCP for its per-segment call as a socket is
/// established), so the relay's two ends can be parked.
pub async fn relay_sockets_parked(
    progs: &Programs,
) -> (
    TcpStream,
    std::net::TcpStream,
    std::net::TcpStream,
    TcpStream,
) {
    relay_sockets_with(|addr| {
        progs
            .park_ends(addr, addr)
            .expect("naming the ends to zc_park")
    })
    .await
}

/// [`relay_sockets`], calling `before` with the listener's address
/// before anything connects.
async fn relay_sockets_with(
    before: impl FnOnce(std::net::SocketAddr),
) -> (
    TcpStream,
    std::net::TcpStream,
    std::net::TcpStream,
    TcpStream,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    before(addr);
    let client = TcpStream::connect(addr).await.expect("connect");
    let (near, _) = l.accept().await.expect("accept");
    let far = TcpStream::connect(addr).await.expect("connect");
    let (server, _) = l.accept().await.expect("accept");
    (
        client,
        near.into_std().expect("std"),
        far.into_std().expect("std"),
        server,
    )
}

/// [`relay_sockets`] as blocking std sockets, for tests without a
/// runtime: client, near (the relay's end), far, server.
pub fn relay_sockets_blocking() -> [std::net::TcpStream; 4] {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let client = std::net::TcpStream::connect(addr).expect("connect");
    let (near, _) = l.accept().expect("accept");
    let far = std::net::TcpStream::connect(addr).expect("connect");
    let (server, _) = l.accept().expect("accept");
    [client, near, far, server]
}

/// Waits until every map of the programs is empty.
pub async fn assert_maps_empty(progs: &Programs) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = progs.entry_counts();
        if counts == [0; 7] {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "map entries left behind after every pair ended: TARGETS, RELAY, LOCAL, PEERS, FLOW, FORWARDED, COUNTERS = {counts:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn set_linger_zero(s: &impl AsFd) {
    zc_user::sys::set_reset_on_close(s.as_fd()).expect("SO_LINGER");
}

/// Turns TCP_CORK on or off: with it on, the last bytes and the FIN of a
/// shutdown leave in one segment.
pub fn set_cork(s: &impl AsFd, on: bool) {
    zc_user::sys::setsockopt_int(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_CORK, on.into())
        .expect("TCP_CORK");
}
