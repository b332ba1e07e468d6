//! Two ends that both write and never read stay within the bound.
//!
//! The kernel's worker sends a socket's redirected skbs and moves the
//! bytes the verdict passed to that same socket from one queue, in order.
//! When the reader stops, that worker stalls on the first redirected skb
//! it cannot send; the other direction's passes then wait behind it,
//! charged to no socket, so TCP keeps that sender's window open and
//! nothing stops it. Two ways to get there: a send buffer smaller than the
//! window lets, and `tcp_notsent_lowat` makes the worker stop long before
//! the buffer is full. Before the fixes (the cap kept within the send
//! buffer; the brake), each end pushed 2.16 GB through `zc relay` in
//! either case while MemAvailable fell by about 4 GB.
//!
//! Its own test binary: the bound is in bytes, but nothing else should
//! compete for the relay's CPU while it is measured.
mod common;

use std::{os::fd::AsFd, time::Duration};

use common::{netns::Netns, sockmem::meminfo, *};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use xxhash_rust::xxh3::Xxh3;
use zc_user::{engine::bpf::BpfEngine, sys};

const WINDOW: u64 = 4 << 20;
const SNDBUF: usize = 1 << 20;
const CHUNK: usize = 256 << 10;
/// Far past any bound: a writer that gets this far met no backpressure.
const GIVE_UP: u64 = 1 << 30;

/// Writes random bytes until a write makes no progress for a second.
struct Pusher {
    rng: StdRng,
    hash: Xxh3,
    buf: Vec<u8>,
    /// How much of `buf` is written (and hashed).
    off: usize,
    pushed: u64,
}

impl Pusher {
    fn new(seed: u64) -> Self {
        Pusher {
            rng: StdRng::seed_from_u64(seed),
            hash: Xxh3::new(),
            buf: vec![0u8; CHUNK],
            off: CHUNK,
            pushed: 0,
        }
    }

    async fn until_blocked(&mut self, s: &mut TcpStream, who: &str) {
        loop {
            assert!(
                self.pushed < GIVE_UP,
                "the {who} pushed {} MiB while nobody read: no backpressure",
                self.pushed >> 20
            );
            if self.off == CHUNK {
                self.rng.fill(&mut self.buf[..]);
                self.off = 0;
            }
            // A write cut short by the timeout has written nothing.
            match tokio::time::timeout(Duration::from_secs(1), s.write(&self.buf[self.off..])).await
            {
                Ok(r) => {
                    let n = r.expect("write");
                    self.hash.update(&self.buf[self.off..self.off + n]);
                    self.off += n;
                    self.pushed += n as u64;
                }
                Err(_) => return,
            }
        }
    }
}

/// The two tests take turns: each measures how fast zc reacts.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_that_never_read_stay_within_the_window_with_a_small_send_buffer() {
    let _turn = TURN.lock().await;
    let sockets = relay_sockets().await;
    // The cap keeps this case within the bound from the kernel side.
    both_push_then_read(sockets, Some(SNDBUF), 2 * WINDOW + (1 << 20)).await;
}

/// With `net.ipv4.tcp_notsent_lowat` set (a common tuning for HTTP/2
/// servers), the kernel's worker stops sending a socket's redirected skbs
/// once 16 KiB wait unsent, far below the send buffer, and the passes
/// behind them wait uncounted: before the brake, each end pushed 2.16 GB.
///
/// The brake that stops the sender here is zc's, from user space: bytes
/// keep arriving until it acts (6.0-8.5 MiB held in a direction at a
/// 4 MiB window, 11-13 MiB with both CPUs busy elsewhere), so this allows
/// twice the bound where the unbraked relay took gigabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_that_never_read_stay_within_the_window_with_notsent_lowat() {
    let _turn = TURN.lock().await;
    let ns = Netns::new("lowat");
    let sysctl = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
        .arg("net.ipv4.tcp_notsent_lowat=16384")
        .status()
        .expect("running sysctl");
    assert!(
        sysctl.success(),
        "setting tcp_notsent_lowat in the test's namespace failed"
    );
    let [client, near, far, server] = ns.run(relay_sockets_blocking);
    let tokio = |s: std::net::TcpStream| {
        s.set_nonblocking(true).expect("nonblocking");
        TcpStream::from_std(s).expect("tokio")
    };
    let bound = 2 * (2 * WINDOW + (1 << 20));
    both_push_then_read((tokio(client), near, far, tokio(server)), None, bound).await;
    drop(ns);
}

/// Pairs `near` and `far` through the engine (its window, and `sndbuf`
/// if given), has `client` and `server` both push until blocked without
/// reading, checks that the relay holds at most `bound` bytes of either
/// direction, then has both read everything.
async fn both_push_then_read(
    (mut client, near, far, mut server): (
        TcpStream,
        std::net::TcpStream,
        std::net::TcpStream,
        TcpStream,
    ),
    sndbuf: Option<usize>,
    bound: u64,
) {
    let progs = programs();
    let watcher = zc_user::watch::Watcher::start().expect("watcher");
    let mut engine = BpfEngine::new(progs.clone(), watcher).with_window(WINDOW);
    if let Some(bytes) = sndbuf {
        engine = engine.with_sndbuf(bytes);
    }
    let (near_view, far_view) = (
        near.try_clone().expect("dup"),
        far.try_clone().expect("dup"),
    );
    let keys = [
        sys::sock_key(near.as_fd()).expect("key"),
        sys::sock_key(far.as_fd()).expect("key"),
    ];
    let relay = tokio::spawn(async move { engine.relay(near, far).await.expect("relay") });

    // Both push at once, and neither reads.
    let (mut up, mut down) = (Pusher::new(1), Pusher::new(2));
    tokio::join!(
        up.until_blocked(&mut client, "client"),
        down.until_blocked(&mut server, "server")
    );
    // What the relay holds of a direction: acknowledged to its writer,
    // not yet received by its reader, wherever it waits in between.
    let inside = |from: &TcpStream, to: &TcpStream| {
        let acked = sys::tcp_info(from.as_fd()).expect("tcp_info").bytes_acked;
        let got = sys::tcp_info(to.as_fd()).expect("tcp_info").bytes_received;
        acked.saturating_sub(got)
    };
    let (held_up, held_down) = (inside(&client, &server), inside(&server, &client));
    let carried = keys.map(|k| progs.counters(&k).expect("counters").bytes);
    let (near_mem, far_mem) = (meminfo(near_view.as_fd()), meminfo(far_view.as_fd()));
    eprintln!(
        "window {} MiB, send buffer {:?}: client pushed {:.1} MiB, server {:.1} MiB before \
         blocking; inside the relay {:.1} MiB up, {:.1} MiB down; the kernel carried {:.1} MiB \
         up, {:.1} MiB down; relay sockets rmem {} / {} wmem {} / {}",
        WINDOW >> 20,
        sndbuf,
        mib(up.pushed),
        mib(down.pushed),
        mib(held_up),
        mib(held_down),
        mib(carried[0]),
        mib(carried[1]),
        near_mem.rmem_alloc,
        far_mem.rmem_alloc,
        near_mem.wmem_queued,
        far_mem.wmem_queued,
    );
    for (dir, held) in [("up", held_up), ("down", held_down)] {
        assert!(
            held <= bound,
            "the relay holds {:.1} MiB {dir} for a reader that does not read, more than {:.1} MiB \
             ({} MiB window)",
            mib(held),
            mib(bound),
            WINDOW >> 20
        );
    }
    assert!(
        carried.iter().all(|&c| c > 0),
        "the kernel carried {carried:?} bytes: a direction never took the kernel path"
    );

    // Both read again: every byte arrives once and in order, both ways.
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let readers = tokio::spawn(async move {
        let (a, b) = tokio::join!(recv_all(&mut client_r), recv_all(&mut server_r));
        (a.expect("client read"), b.expect("server read"))
    });
    let (sent_up, sent_down) = tokio::join!(finish(up, &mut client_w), finish(down, &mut server_w));
    let (got_down, got_up) = tokio::time::timeout(HANG, readers)
        .await
        .expect("a direction stalled once both ends read again")
        .expect("join");
    assert_eq!(
        (got_up.bytes, got_up.hash),
        sent_up,
        "client to server: stream damaged"
    );
    assert_eq!(
        (got_down.bytes, got_down.hash),
        sent_down,
        "server to client: stream damaged"
    );
    drop((client_w, server_w));
    let summary = tokio::time::timeout(HANG, relay)
        .await
        .expect("relay hung")
        .expect("join");
    assert!(!summary.reset, "the relay reset intact streams");
    drop((near_view, far_view));
    assert_maps_empty(&progs).await;
}

/// Writes the rest of the pusher's current chunk and ends the stream;
/// returns what was written in all and its digest.
async fn finish(p: Pusher, w: &mut tokio::net::tcp::OwnedWriteHalf) -> (u64, u64) {
    let Pusher {
        mut hash,
        buf,
        off,
        pushed,
        ..
    } = p;
    w.write_all(&buf[off..]).await.expect("write");
    hash.update(&buf[off..]);
    w.shutdown().await.expect("shutdown");
    (pushed + (buf.len() - off) as u64, hash.digest())
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}
