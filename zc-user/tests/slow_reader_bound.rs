//! A reader that reads, only slower than its sender, costs the kernel at
//! most two windows too, while zc forwards a held direction in user space.
//!
//! memory_bound.rs covers a reader that never reads: there the held
//! direction waits and zc forwards nothing. Here the reader keeps taking
//! bytes, so the direction stays held and zc keeps forwarding; each of
//! its writes must keep within the window like the verdict's redirects.
//! Before that rule, zc filled the destination's send buffer (32 MiB).
//!
//! Its own test binary, so no other test's traffic takes the CPU the
//! sampler needs.
mod common;

use std::{
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{sockmem::meminfo, *};
use tokio::io::AsyncReadExt;
use zc_user::{engine::bpf::BpfEngine, sys};

const WINDOW: u64 = 4 << 20;
const TOTAL: u64 = 64 << 20;
/// The reader takes this much, then pauses a millisecond: at most about
/// 64 MB/s, far below what the sender and the kernel path can do.
const SIP: usize = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_costs_at_most_two_windows_while_zc_forwards() {
    let progs = programs();
    let watcher = zc_user::watch::Watcher::start().expect("watcher");
    let engine = BpfEngine::new(progs.clone(), watcher).with_window(WINDOW);
    let (mut client, near, far, mut server) = relay_sockets().await;
    // Kept to read the relay sockets' memory while the engine owns them.
    let views = [
        near.try_clone().expect("dup"),
        far.try_clone().expect("dup"),
    ];
    let far_key = sys::sock_key(far.as_fd()).expect("key");
    let relay = tokio::spawn(async move { engine.relay(near, far).await.expect("relay") });

    // What the relay keeps for this direction, sampled every millisecond
    // until the stream is through: what waits for the reader (the near
    // socket's queues and the redirect backlog into it) and what the held
    // sender keeps (the far socket's queues).
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, progs) = (done.clone(), peak.clone(), progs.clone());
        std::thread::spawn(move || {
            let [near, far] = &views;
            while !done.load(Ordering::Relaxed) {
                let sent = progs.flow(&far_key).map(|f| f.sent).unwrap_or(0);
                let written = sys::bytes_written(near.as_fd()).unwrap_or(sent);
                let (n, f) = (meminfo(near.as_fd()), meminfo(far.as_fd()));
                let total = n.rmem_alloc
                    + n.wmem_queued
                    + sent.saturating_sub(written)
                    + f.rmem_alloc
                    + f.wmem_queued;
                peak.fetch_max(total, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
            views
        })
    };

    let writer = tokio::spawn(async move {
        let sent = send_random(&mut server, TOTAL, 1 << 20, 31).await;
        (sent, server)
    });
    let reader = tokio::spawn(async move {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; SIP];
        let mut bytes = 0u64;
        loop {
            let n = client.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            bytes += n as u64;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (
            Digest {
                bytes,
                hash: h.digest(),
            },
            client,
        )
    });
    let (sent, server) = tokio::time::timeout(HANG, writer)
        .await
        .expect("the writer stalled")
        .expect("join");
    let sent = sent.expect("send");
    drop(server);
    let (got, client) = tokio::time::timeout(HANG, reader)
        .await
        .expect("the stream stalled")
        .expect("join");
    done.store(true, Ordering::Relaxed);
    let views = sampler.join().expect("sampler");
    drop(client);
    let summary = tokio::time::timeout(HANG, relay)
        .await
        .expect("relay hung")
        .expect("join");
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "window {} MiB: peak {:.1} MiB kept for a slow reader; {} holds",
        WINDOW >> 20,
        peak as f64 / f64::from(1 << 20),
        summary.holds
    );
    assert_eq!(got, sent, "the stream arrived damaged");
    assert!(!summary.reset, "the relay reset an intact stream");
    assert!(
        summary.holds > 0,
        "the direction was never held: the reader did not lag"
    );
    let bound = 2 * WINDOW + (1 << 20);
    assert!(
        peak <= bound,
        "a slow reader cost {:.1} MiB of relay socket memory and backlog, more than two {} MiB \
         windows plus 1 MiB",
        peak as f64 / f64::from(1 << 20),
        WINDOW >> 20
    );
    drop(views);
    assert_maps_empty(&progs).await;
}
