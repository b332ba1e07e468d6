//! Holding a direction back and handing it to the kernel again, over and
//! over under random traffic, delivers every byte once and in order.
//!
//! A small window and a reader that stops at random make the BPF engine
//! hold the sender (the verdict passes bytes to the socket's own queue,
//! zc forwards them) and release it (the verdict redirects again) hundreds
//! of times in one stream. Each switch is a place where a byte could be
//! lost, repeated or overtaken.
mod common;

use std::{os::fd::AsFd, time::Duration};

use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};
use zc_user::engine::bpf::BpfEngine;

const WINDOW: u64 = 4 << 20;
const TOTAL: u64 = 256 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_releases_at_random_moments_lose_nothing() {
    let progs = programs();
    let watcher = zc_user::watch::Watcher::start().expect("watcher");
    let engine = BpfEngine::new(progs.clone(), watcher).with_window(WINDOW);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let client = TcpStream::connect(addr).await.expect("connect");
    let (near, _) = l.accept().await.expect("accept");
    let far = TcpStream::connect(addr).await.expect("connect");
    let (server, _) = l.accept().await.expect("accept");
    let (near, far) = (near.into_std().expect("std"), far.into_std().expect("std"));
    let near_key = zc_user::sys::sock_key(near.as_fd()).expect("key");
    let relay = tokio::spawn(async move { engine.relay(near, far).await.expect("relay") });

    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Both ways at once, random write sizes; each write half is kept, not
    // dropped, until the counters are read (dropping it sends FIN).
    let up = tokio::spawn(async move { (send_in_bursts(&mut cw, TOTAL, 11).await, cw) });
    let down =
        tokio::spawn(async move { (send_random(&mut sw, TOTAL / 4, 256 << 10, 12).await, sw) });
    let slow = tokio::spawn(async move { read_with_pauses(&mut sr, TOTAL, 13).await });
    let back = tokio::spawn(async move { read_with_pauses(&mut cr, TOTAL / 4, 14).await });

    let got = tokio::time::timeout(HANG, slow)
        .await
        .expect("stalled")
        .expect("join");
    let got_back = tokio::time::timeout(HANG, back)
        .await
        .expect("stalled")
        .expect("join");
    let (sent, cw) = up.await.expect("join");
    let (sent_back, sw) = down.await.expect("join");
    let carried = progs.counters(&near_key).expect("counters").bytes;
    drop((cw, sw));
    let summary = tokio::time::timeout(HANG, relay)
        .await
        .expect("relay hung")
        .expect("join");
    eprintln!(
        "{} holds; client->server: the kernel redirected {carried} of {TOTAL} bytes",
        summary.holds
    );
    assert_eq!(got, sent.expect("send"), "client -> server stream damaged");
    assert_eq!(
        got_back,
        sent_back.expect("send"),
        "server -> client stream damaged"
    );
    assert!(!summary.reset, "the relay reset an intact stream");
    // Timing decides how many (18 to 86 seen); a handful already crosses
    // every switch point both ways.
    assert!(
        summary.holds >= 8,
        "only {} holds: the test did not exercise the switch",
        summary.holds
    );
    assert!(
        carried >= TOTAL / 8,
        "the kernel redirected only {carried} bytes: the stream ran in user space"
    );
}

/// Writes `total` random bytes in bursts of random length and write
/// sizes, pausing at random between bursts: a held direction goes back to
/// the kernel once the sender pauses and zc has forwarded what it passed.
async fn send_in_bursts(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    total: u64,
    seed: u64,
) -> std::io::Result<Digest> {
    use tokio::io::AsyncWriteExt;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = total;
    while left > 0 {
        let mut burst = rng.random_range(1..=(16 * WINDOW)).min(left);
        left -= burst;
        while burst > 0 {
            let bits = rng.random_range(0..=20u32);
            let n = (rng.random_range(1..=(1u64 << bits))).min(burst) as usize;
            rng.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            h.update(&buf[..n]);
            burst -= n as u64;
        }
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..2000))).await;
    }
    Ok(Digest {
        bytes: total,
        hash: h.digest(),
    })
}

/// Reads `total` bytes in bursts of random length, pausing at random.
async fn read_with_pauses(r: &mut tokio::net::tcp::OwnedReadHalf, total: u64, seed: u64) -> Digest {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut bytes = 0u64;
    while bytes < total {
        let mut burst = rng.random_range(1..=(4 * WINDOW));
        while burst > 0 && bytes < total {
            let want = (burst as usize).min(buf.len());
            let n = r.read(&mut buf[..want]).await.expect("read");
            assert!(n > 0, "EOF after {bytes} of {total} bytes");
            h.update(&buf[..n]);
            bytes += n as u64;
            burst = burst.saturating_sub(n as u64);
        }
        // Now and then the reader stops for a while: the relay holds the
        // sender, then hands the direction back to the kernel once the
        // reader has caught up. The pause is the randomness, not a wait
        // for anything.
        if rng.random_ratio(1, 8) {
            tokio::time::sleep(Duration::from_micros(rng.random_range(2000..8000))).await;
        }
    }
    Digest {
        bytes,
        hash: h.digest(),
    }
}

/// The adaptive path (`--mode auto`): a direction of small writes moves to
/// user space, and the same connection's later bulk goes back to the
/// kernel; every byte arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_move_to_user_space_and_bulk_returns_to_the_kernel() {
    use tokio::io::AsyncWriteExt;
    const SMALL: u64 = 4 << 20;
    const BULK: u64 = 256 << 20;
    let progs = programs();
    let watcher = zc_user::watch::Watcher::start().expect("watcher");
    let engine = BpfEngine::new(progs.clone(), watcher)
        .with_adaptive(zc_user::engine::bpf::DEFAULT_SMALL_SKB);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let client = TcpStream::connect(addr).await.expect("connect");
    // Small segments, as an interactive client sends them: Nagle would
    // merge the writes whenever an ACK is late.
    client.set_nodelay(true).expect("nodelay");
    let (near, _) = l.accept().await.expect("accept");
    let far = TcpStream::connect(addr).await.expect("connect");
    let (server, _) = l.accept().await.expect("accept");
    let (near, far) = (near.into_std().expect("std"), far.into_std().expect("std"));
    let relay = tokio::spawn(async move { engine.relay(near, far).await.expect("relay") });
    // The small phase keeps at most IN_FLIGHT bytes ahead of the reader:
    // a writer far ahead of the relay lets TCP merge its writes into large
    // skbs in the relay's receive queue, and then they are not small.
    const IN_FLIGHT: u64 = 4 << 10;
    let (read_tx, mut read_rx) = tokio::sync::watch::channel(0u64);
    let writer = tokio::spawn(async move {
        let mut client = client;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut pattern = zc_user::traffic::Pattern::new(21);
        for (total, size) in [(SMALL, 64), (BULK, 1 << 20)] {
            let mut done = 0;
            while done < total {
                if size == 64 && done % IN_FLIGHT == 0 {
                    let ahead = done.saturating_sub(IN_FLIGHT);
                    read_rx
                        .wait_for(|&r| r >= ahead)
                        .await
                        .expect("reader gone");
                }
                let buf = pattern.next(size);
                client.write_all(buf).await.expect("write");
                h.update(buf);
                done += buf.len() as u64;
            }
        }
        client.shutdown().await.expect("shutdown");
        (h.digest(), client)
    });
    let reader = async move {
        use tokio::io::AsyncReadExt;
        let mut server = server;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut bytes = 0u64;
        loop {
            let n = server.read(&mut buf).await?;
            if n == 0 {
                return std::io::Result::Ok((bytes, h.digest(), server));
            }
            h.update(&buf[..n]);
            bytes += n as u64;
            let _ = read_tx.send(bytes);
        }
    };
    let (got_bytes, got_hash, server) = tokio::time::timeout(HANG, reader)
        .await
        .expect("stalled")
        .expect("recv");
    let (hash, client) = writer.await.expect("writer");
    assert_eq!(got_bytes, SMALL + BULK);
    assert_eq!(got_hash, hash, "the stream arrived damaged");
    drop((client, server));
    let summary = tokio::time::timeout(HANG, relay)
        .await
        .expect("relay hung")
        .expect("join");
    let carried = progs.kernel_bytes();
    eprintln!(
        "{} moves to user space for small skbs; the kernel carried {carried} of {} bytes",
        summary.small,
        SMALL + BULK
    );
    assert!(
        summary.small >= 1,
        "64-byte writes never left the kernel path"
    );
    assert!(
        carried >= BULK / 2,
        "the bulk phase stayed in user space: the kernel carried only {carried} bytes"
    );
}
