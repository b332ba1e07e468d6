//! The relay's promises, checked with real sockets through the real
//! kernel path: every byte once and in order, half-close and reset carried
//! across, backpressure without loss. One definition per behaviour,
//! instantiated for every mode.
mod common;

use std::time::Duration;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use zc_user::{ebpf::Programs, engine::Engine};

/// A data path under test, with whatever it must check afterwards.
struct Subject {
    engine: Engine,
    progs: Option<Programs>,
}

impl Subject {
    /// Checks what the mode must leave behind, and in BPF mode that the
    /// kernel carried at least `kernel_min` bytes: digests alone cannot
    /// tell the kernel path from a silent fallback to user space.
    async fn finish(self, kernel_min: u64) {
        if let Some(p) = &self.progs {
            assert_maps_empty(p).await;
            let carried = p.kernel_bytes();
            assert!(
                carried >= kernel_min,
                "the kernel carried {carried} bytes, expected at least {kernel_min}: \
                 the stream went through user space"
            );
        }
    }
}

fn splice() -> Subject {
    init();
    let pool = std::sync::Arc::new(zc_user::engine::splice::PipePool::new(4096, 1 << 20));
    Subject {
        engine: Engine::Splice(zc_user::engine::splice::SpliceEngine::new(pool)),
        progs: None,
    }
}

fn copy() -> Subject {
    init();
    Subject {
        engine: Engine::Copy(zc_user::engine::copy::CopyEngine::default()),
        progs: None,
    }
}

fn bpf() -> Subject {
    let progs = programs();
    Subject {
        engine: bpf_engine(&progs),
        progs: Some(progs),
    }
}

/// Accepts one connection on a fresh listener after `connect` ran.
async fn socket_pair(addr: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(addr).await.expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (s, _) = l.accept().await.expect("accept");
    (c, s)
}

/// client <-> [a relay b] <-> server, relayed by `engine` in a task.
/// Returns the client and server ends and the relay task.
async fn relayed(
    engine: &Engine,
    addr: &str,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<zc_user::engine::Summary>,
) {
    let (client, a) = socket_pair(addr).await;
    let (b, server) = socket_pair(addr).await;
    let engine = engine.clone();
    let (a, b) = (a.into_std().expect("std"), b.into_std().expect("std"));
    let task = tokio::spawn(async move { engine.relay(a, b).await.expect("relay failed") });
    (client, server, task)
}

async fn random_sizes_both_ways(subject: Subject) {
    let (server_addr, mut reports) = exchange_server("127.0.0.1:0", 24 << 20, 4 << 20).await;
    let relay = TestRelay::start(subject.engine.clone(), server_addr).await;
    let s = TcpStream::connect(relay.addr).await.expect("connect");
    let (sent, got) = exchange(s, 24 << 20, 4 << 20, 7).await;
    let (srv_sent, srv_got) = reports.recv().await.expect("server report");
    assert_eq!(srv_got, sent, "client->server stream differs");
    assert_eq!(got, srv_sent, "server->client stream differs");
    relay.stop().await;
    subject.finish(24 << 20 /* of 48 MiB */).await;
}

async fn tiny_writes_both_ways(subject: Subject) {
    let (server_addr, mut reports) = exchange_server("127.0.0.1:0", 64 << 10, 16).await;
    let relay = TestRelay::start(subject.engine.clone(), server_addr).await;
    let s = TcpStream::connect(relay.addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let (sent, got) = exchange(s, 64 << 10, 16, 8).await;
    let (srv_sent, srv_got) = reports.recv().await.expect("server report");
    assert_eq!(srv_got, sent);
    assert_eq!(got, srv_sent);
    relay.stop().await;
    subject.finish(64 << 10 /* of 128 KiB */).await;
}

async fn ipv6_both_ways(subject: Subject) {
    let (server_addr, mut reports) = exchange_server("[::1]:0", 8 << 20, 1 << 20).await;
    let relay = TestRelay::start(subject.engine.clone(), server_addr).await;
    assert!(relay.addr.is_ipv6());
    let s = TcpStream::connect(relay.addr).await.expect("connect");
    let (sent, got) = exchange(s, 8 << 20, 1 << 20, 9).await;
    let (srv_sent, srv_got) = reports.recv().await.expect("server report");
    assert_eq!(srv_got, sent);
    assert_eq!(got, srv_sent);
    relay.stop().await;
    subject.finish(8 << 20 /* of 16 MiB */).await;
}

/// Both ends talk before the relay has joined the sockets: those bytes
/// wait in the receive queues and must still arrive first, in order.
async fn bytes_sent_before_pairing_arrive_first(subject: Subject) {
    let (mut client, a) = socket_pair("127.0.0.1:0").await;
    let (b, mut server) = socket_pair("127.0.0.1:0").await;
    client
        .write_all(b"client speaks first;")
        .await
        .expect("write");
    server.write_all(b"server banner;").await.expect("write");
    // Let the bytes land in the relay sockets' receive queues.
    wait_inq(&a, 20).await;
    wait_inq(&b, 14).await;
    let engine = subject.engine.clone();
    let (a, b) = (a.into_std().expect("std"), b.into_std().expect("std"));
    let task = tokio::spawn(async move { engine.relay(a, b).await.expect("relay") });
    if let Some(p) = &subject.progs {
        // A FIN before pairing sends the connection to user space (the
        // kernel refuses a socket whose peer finished); wait for the pair.
        let deadline = tokio::time::Instant::now() + HANG;
        while p.entry_counts()[1] < 2 {
            assert!(tokio::time::Instant::now() < deadline, "never paired");
            tokio::task::yield_now().await;
        }
    }
    client.write_all(b" then more").await.expect("write");
    server.write_all(b" then more").await.expect("write");
    client.shutdown().await.expect("shutdown");
    server.shutdown().await.expect("shutdown");
    let mut at_server = String::new();
    let mut at_client = String::new();
    tokio::time::timeout(HANG, server.read_to_string(&mut at_server))
        .await
        .expect("hang")
        .expect("read");
    tokio::time::timeout(HANG, client.read_to_string(&mut at_client))
        .await
        .expect("hang")
        .expect("read");
    assert_eq!(at_server, "client speaks first; then more");
    assert_eq!(at_client, "server banner; then more");
    let summary = task.await.expect("relay task");
    assert!(!summary.reset);
    subject.finish(10 /* " then more", both ways */).await;
}

async fn wait_inq(s: &TcpStream, n: u64) {
    use std::os::fd::AsFd;
    let deadline = tokio::time::Instant::now() + HANG;
    while zc_user::sys::inq(s.as_fd()).expect("inq") < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bytes never arrived"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `from` sends `total` random bytes and shuts its write side while `to`
/// reads to EOF, together: no relay is obliged to buffer the whole stream.
/// Returns (sent, received).
async fn send_while_receiving(
    from: &mut TcpStream,
    to: &mut TcpStream,
    total: u64,
    max_write: usize,
    seed: u64,
) -> (Digest, Digest) {
    tokio::join!(
        async {
            let d = send_random(from, total, max_write, seed)
                .await
                .expect("send");
            from.shutdown().await.expect("shutdown");
            d
        },
        async {
            tokio::time::timeout(HANG, recv_all(to))
                .await
                .expect("EOF never arrived")
                .expect("recv")
        }
    )
}

/// One side sends everything and shuts down its write side. The other
/// must see EOF only after every byte, and can still answer afterwards.
async fn half_close_arrives_after_all_bytes(subject: Subject, client_first: bool) {
    let (client, server, task) = relayed(&subject.engine, "127.0.0.1:0").await;
    let (mut first, mut second) = if client_first {
        (client, server)
    } else {
        (server, client)
    };
    let (sent, got) = send_while_receiving(&mut first, &mut second, 16 << 20, 1 << 20, 11).await;
    assert_eq!(got, sent, "EOF arrived before every byte");
    // The other direction still works after the half-close.
    let (reply, got) = send_while_receiving(&mut second, &mut first, 4 << 20, 64 << 10, 12).await;
    assert_eq!(got, reply);
    let summary = task.await.expect("relay task");
    let (up, down) = if client_first {
        (16 << 20, 4 << 20)
    } else {
        (4 << 20, 16 << 20)
    };
    assert_eq!(
        (summary.a_to_b, summary.b_to_a, summary.reset),
        (up, down, false)
    );
    subject.finish(4 << 20 /* of 20 MiB */).await;
}

/// A reset on one side reaches the other as an error, not as EOF.
async fn reset_reaches_the_other_side(subject: Subject, client_resets: bool) {
    let (mut client, mut server, task) = relayed(&subject.engine, "127.0.0.1:0").await;
    client.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(HANG, server.read_exact(&mut buf))
        .await
        .expect("hang")
        .expect("read");
    let (resetter, mut victim) = if client_resets {
        (client, server)
    } else {
        (server, client)
    };
    set_linger_zero(&resetter);
    drop(resetter);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(HANG, victim.read_to_end(&mut rest))
        .await
        .expect("the reset never arrived");
    let err = r.expect_err("the other side saw a clean EOF instead of a reset");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "unexpected error {err}"
    );
    let summary = task.await.expect("relay task");
    assert!(summary.reset);
    // The access line names it.
    assert_eq!(
        summary.cause,
        Some(std::io::ErrorKind::ConnectionReset),
        "the relay's summary of a reset"
    );
    subject.finish(4 /* "ping" */).await;
}

/// The server reads nothing for a while: the client must be held back
/// (its writes stop being accepted) rather than the kernel queueing
/// without bound, and once the server reads, everything arrives.
async fn slow_reader_gets_backpressure_without_loss(subject: Subject) {
    let (client, mut server, task) = relayed(&subject.engine, "127.0.0.1:0").await;
    let total: u64 = 512 << 20;
    let (accepted_tx, accepted_rx) = tokio::sync::watch::channel(0u64);
    let writer = tokio::spawn(async move {
        let mut client = client;
        let mut pattern = zc_user::traffic::Pattern::new(5);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut done = 0u64;
        while done < total {
            let buf = pattern.next(64 << 10);
            client.write_all(buf).await.expect("write");
            h.update(buf);
            done += buf.len() as u64;
            let _ = accepted_tx.send(done);
        }
        client.shutdown().await.expect("shutdown");
        (
            Digest {
                bytes: total,
                hash: h.digest(),
            },
            client,
        )
    });
    // Reader asleep: the accepted count must level off well below total.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        last = *accepted_rx.borrow();
    }
    eprintln!(
        "writer got {} MiB into the relay while the reader slept",
        last >> 20
    );
    // What a sleeping reader may cost: socket buffers, a pipe, and in BPF
    // mode up to two windows (8 MiB default) between what waits for the
    // reader and what the held sender keeps, beside the endpoints' own
    // buffers.
    // Measured 7-9 MiB for copy, 14 for splice; without a window bpf took
    // all 512.
    assert!(
        last < 80 << 20,
        "the writer pushed {} MiB into a relay whose reader sleeps: no backpressure",
        last >> 20
    );
    let got = tokio::time::timeout(HANG, recv_all(&mut server))
        .await
        .expect("the stream stalled after the reader woke")
        .expect("recv");
    let (sent, client) = writer.await.expect("writer");
    assert_eq!(got, sent);
    drop(client);
    drop(server);
    let _ = task.await;
    subject.finish(64 << 20 /* of 512 MiB */).await;
}

/// 1,000 connections open at once, each verified in both directions.
/// All are established (and, in BPF mode, paired) before any data moves,
/// so the relay really holds 1,000 live pairs.
async fn thousand_concurrent_connections(subject: Subject) {
    // ZC_TEST_CONNS overrides the count when chasing a failure.
    let n: usize = std::env::var("ZC_TEST_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    const SIZE: u64 = 64 << 10;
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let (server_addr, mut reports) = exchange_server_gated("127.0.0.1:0", SIZE, 16 << 10, go).await;
    let relay = TestRelay::start(subject.engine.clone(), server_addr).await;
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(TcpStream::connect(relay.addr).await.expect("connect"));
    }
    if let Some(p) = &subject.progs {
        let deadline = tokio::time::Instant::now() + HANG;
        while p.entry_counts()[1] < 2 * n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {} sockets were paired",
                p.entry_counts()[1],
                2 * n
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // What holding n connections costs this process: threads stay those
    // of the runtime (no thread per connection), pipes two per
    // connection at most (splice mode).
    let (threads, pipes) = process_threads_and_pipes();
    eprintln!(
        "{n} connections open: {threads} threads, {pipes} pipe fds in this process (test clients and servers included)"
    );
    assert!(threads < 64, "{threads} threads for {n} connections");
    // Two pipes (four fds) per spliced connection, plus a few of the runtime.
    assert!(pipes <= 4 * n + 16, "{pipes} pipe fds for {n} connections");
    go_tx.send(true).expect("servers gone");
    let mut clients = tokio::task::JoinSet::new();
    for (i, s) in streams.into_iter().enumerate() {
        clients.spawn(async move { exchange(s, SIZE, 16 << 10, 50_000 + i as u64).await });
    }
    let mut client_results = Vec::new();
    while let Some(r) = clients.join_next().await {
        client_results.push(r.expect("client task"));
    }
    let mut server_results = std::collections::HashMap::new();
    for _ in 0..n {
        let (srv_sent, srv_got) = tokio::time::timeout(HANG, reports.recv())
            .await
            .expect("hang")
            .expect("report");
        server_results.insert(srv_got, srv_sent);
    }
    for (sent, got) in client_results {
        let srv_sent = server_results
            .get(&sent)
            .expect("a client stream arrived damaged or not at all");
        assert_eq!(*srv_sent, got, "a server stream arrived damaged");
    }
    relay.stop().await;
    subject.finish(64 << 20 /* of 1,000 x 128 KiB */).await;
}

fn process_threads_and_pipes() -> (usize, usize) {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    let pipes = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0);
    (threads, pipes)
}

/// `$mode` builds the subject; `$bounded` the one for the slow-reader
/// test, which needs a bound on what the relay may queue.
macro_rules! mode_tests {
    ($mode:ident, $bounded:ident) => {
        mod $mode {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn random_write_sizes_arrive_intact_both_ways() {
                random_sizes_both_ways(super::$mode()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tiny_writes_arrive_intact_both_ways() {
                tiny_writes_both_ways(super::$mode()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ipv6_connections_are_relayed() {
                ipv6_both_ways(super::$mode()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bytes_sent_before_pairing_arrive_first_and_in_order() {
                bytes_sent_before_pairing_arrive_first(super::$mode()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn client_half_close_reaches_server_after_every_byte() {
                half_close_arrives_after_all_bytes(super::$mode(), true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn server_half_close_reaches_client_after_every_byte() {
                half_close_arrives_after_all_bytes(super::$mode(), false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn client_reset_reaches_server_as_reset() {
                reset_reaches_the_other_side(super::$mode(), true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn server_reset_reaches_client_as_reset() {
                reset_reaches_the_other_side(super::$mode(), false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn slow_reader_gets_backpressure_and_loses_nothing() {
                slow_reader_gets_backpressure_without_loss(super::$bounded()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn thousand_concurrent_connections_each_arrive_intact() {
                thousand_concurrent_connections(super::$mode()).await;
            }
        }
    };
}

// BPF mode bounds its redirect backlog by default (`--window`).
mode_tests!(bpf, bpf);
mode_tests!(splice, splice);
mode_tests!(copy, copy);
