//! The same-host short-circuit: both ends of one local TCP connection in
//! the `LOCAL` map, so what either end sends lands in the other's receive
//! queue without crossing the loopback TCP stack.
mod common;

use std::{os::fd::AsFd, time::Instant};

use common::*;
use tokio::net::{TcpListener, TcpStream};

async fn local_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (s, _) = l.accept().await.expect("accept");
    (c, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_circuited_bytes_arrive_intact_both_ways_and_skip_tcp() {
    let progs = programs();
    let (c, s) = local_pair().await;
    let keys = progs
        .pair_local(c.as_fd(), s.as_fd())
        .expect("short-circuit");
    const SIZE: u64 = 64 << 20;
    let (client, server) =
        tokio::join!(exchange(c, SIZE, 1 << 20, 1), exchange(s, SIZE, 1 << 20, 2));
    assert_eq!(client.0, server.1, "client->server stream differs");
    assert_eq!(server.0, client.1, "server->client stream differs");
    // Every byte went through sk_msg, none through TCP.
    for k in &keys {
        let c = progs.counters(k).expect("counters");
        assert_eq!(c.bytes, SIZE, "sk_msg carried {} of {SIZE} bytes", c.bytes);
        assert_eq!(c.failed, 0);
    }
    progs.unpair(&keys);
    assert_maps_empty(&progs).await;
}

/// Throughput of one bulk stream through the short-circuit and through
/// plain loopback TCP, in the same run. Printed, not asserted: speed
/// targets live in the benchmark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_circuit_and_loopback_throughput_are_reported() {
    let progs = programs();
    const SIZE: u64 = 1 << 30;
    let mut results = Vec::new();
    for short in [false, true] {
        let (mut c, mut s) = local_pair().await;
        let keys = short.then(|| {
            progs
                .pair_local(c.as_fd(), s.as_fd())
                .expect("short-circuit")
        });
        // Precomputed bytes and no hashing: the path, not the test, is
        // measured. The other test checks integrity.
        let t = Instant::now();
        let (_, got) = tokio::join!(
            async {
                use tokio::io::AsyncWriteExt as _;
                let mut pattern = zc_user::traffic::Pattern::new(3);
                let mut left = SIZE;
                while left > 0 {
                    let buf = pattern.next(64 << 10);
                    c.write_all(buf).await.expect("write");
                    left -= buf.len() as u64;
                }
                c.shutdown().await.expect("shutdown");
            },
            async {
                use tokio::io::AsyncReadExt as _;
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await.expect("read") {
                        0 => break n,
                        k => n += k as u64,
                    }
                }
            }
        );
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(got, SIZE);
        if let Some(keys) = keys {
            assert_eq!(progs.counters(&keys[0]).expect("counters").bytes, SIZE);
            progs.unpair(&keys);
        }
        results.push(SIZE as f64 / secs / 1e9);
    }
    eprintln!(
        "1 GiB one way: loopback TCP {:.2} GB/s, sk_msg short-circuit {:.2} GB/s (64 KiB writes)",
        results[0], results[1]
    );
    assert_maps_empty(&progs).await;
}
