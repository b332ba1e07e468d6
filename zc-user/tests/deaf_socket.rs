//! A socket that hears nothing from its peer, and the kick that ends it
//! (`sys::announce_window`, used by the relay's `Unstick`).
//!
//! After a memory squeeze TCP (6.15 on) answers with a window of exactly
//! zero. A Linux peer that already sent a little past it, less than one
//! window-scale unit, then stamps its acknowledgments with that sequence
//! number (`tcp_acceptable_seq`), and the squeezed socket drops every one
//! of them as out of window: it hears of the bytes it sent only when the
//! peer retransmits, on a timer that backs off to a minute. With both
//! directions of a relay pair waiting, that stalled
//! `hold_switch::both_ways_to_the_end_while_parking` (BENCHMARKS.md,
//! tuning logs 31 and 32). Plain sockets show it: no BPF is involved.
//! The second test makes a relay socket deaf the same way while the
//! direction into it is held, and checks that the relay kicks it.
mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsFd, BorrowedFd},
    time::Instant,
};

use common::HANG;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zc_user::{engine::bpf::BpfEngine, sys};

/// More than R's receive buffer will hold once cut.
const HELD: usize = 1 << 20;
/// Less than one window-scale unit (1 KiB at loopback's scale of 10).
const PAST: usize = 500;
/// What R sends while it cannot hear: within the window P starts with,
/// since R would not hear that window grow either.
const SENT: usize = 32_000;

#[test]
fn a_socket_with_its_window_shut_hears_its_peer_again_once_it_announces_one() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test puts a socket in TCP repair mode, which needs CAP_NET_ADMIN; run the suite as root: `cargo xtask test`"
    );
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut p = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (mut r, _) = l.accept().expect("accept");
    sys::set_rcvbuf(r.as_fd(), HELD).expect("SO_RCVBUF");

    // R holds a megabyte it does not read, then its buffer is cut under
    // it and its window shut, as TCP does after a squeeze.
    p.write_all(&vec![1; HELD]).expect("P writes");
    wait_for("R to receive what P wrote", || {
        sys::bytes_received(r.as_fd()).expect("tcp_info") >= HELD as u64
    });
    sys::set_rcvbuf(r.as_fd(), 0).expect("SO_RCVBUF");
    shut_window(r.as_fd());

    // P sends a little past the shut window: R drops it, and P's
    // acknowledgments carry a sequence number past R's window from now on.
    p.write_all(&[2; PAST]).expect("P writes past the window");
    wait_for("P to hear of the shut window", || snd_wnd(p.as_fd()) == 0);

    // R sends; P takes every byte, but R hears none of P's acknowledgments.
    r.write_all(&[3; SENT]).expect("R writes");
    let mut got = vec![0; SENT];
    p.read_exact(&mut got).expect("P reads what R sent");
    let deaf = acked(&r);
    assert!(
        deaf < SENT as u64,
        "R heard P's acknowledgments ({deaf} bytes acked) without help: the setup did not make it deaf"
    );

    sys::announce_window(r.as_fd(), 16 << 10).expect("announcing R's window");
    wait_for("R to hear P acknowledge what it sent", || {
        acked(&r) >= SENT as u64
    });
    // Heard thanks to the kick, not to a retransmission of P's (which
    // would also have let one acknowledgment through, 200 ms or more on).
    let retrans = sys::tcp_info(p.as_fd()).expect("tcp_info").total_retrans;
    assert_eq!(
        retrans, 0,
        "P retransmitted before R heard it: the kick did not end the deafness"
    );
}

/// The relay's side of it: a relay socket made deaf the same way while
/// the direction into it is held, waiting for its end to acknowledge.
/// Nothing but the kick (`Unstick`, in the hold's wait) can end it: the
/// socket's memory stays past its buffer (the other direction is held
/// too, its server never reading), so its own retransmissions announce a
/// window of zero and its end's acknowledgments stay outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_direction_whose_relay_socket_cannot_hear_its_end_is_unstuck() {
    let progs = common::programs();
    let watcher = zc_user::watch::Watcher::start().expect("watcher");
    let engine = BpfEngine::new(progs.clone(), watcher).with_window(1 << 20);
    let (mut client, near, far, mut server) = common::relay_sockets().await;
    let near_view = near.try_clone().expect("dup");
    let near_key = sys::sock_key(near.as_fd()).expect("key");
    let far_key = sys::sock_key(far.as_fd()).expect("key");
    let relay = tokio::spawn(async move { engine.relay(near, far).await.expect("relay") });

    // Client -> server is held: the server never reads, and the verdict
    // passes what it cannot redirect into near's own queue.
    let mut up = xxhash_rust::xxh3::Xxh3::new();
    let mut written = 0u64;
    let chunk = vec![4u8; 64 << 10];
    while progs.flow(&near_key).map_or(0, |f| f.passed) < UP_PASSED {
        client.write_all(&chunk).await.expect("client writes");
        up.update(&chunk);
        written += chunk.len() as u64;
        wait_async("near to take what the client wrote", || {
            sys::tcp_info(client.as_fd()).expect("tcp_info").bytes_acked > written
        })
        .await;
    }
    // Near is squeezed (its buffer cut under what it holds) and its
    // window shut; the client then sends a little past it.
    sys::set_rcvbuf(near_view.as_fd(), 0).expect("SO_RCVBUF");
    shut_window(near_view.as_fd());
    client
        .write_all(&[5; PAST])
        .await
        .expect("client writes past");
    up.update(&[5; PAST]);
    written += PAST as u64;
    wait_async("the client to hear of the shut window", || {
        snd_wnd(client.as_fd()) == 0
    })
    .await;

    // Server -> client: more than the window, so the direction is held
    // and its hold waits for near to hear the client acknowledge.
    let pusher = tokio::spawn(async move {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let chunk = vec![6u8; 64 << 10];
        for _ in 0..DOWN / chunk.len() as u64 {
            server.write_all(&chunk).await.expect("server writes");
            h.update(&chunk);
        }
        server.shutdown().await.expect("shutdown");
        (h.digest(), server)
    });
    let mut got = vec![0u8; DOWN as usize];
    tokio::time::timeout(HANG, client.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the client got stuck: near never heard its acknowledgments; flows (near, far): \
                 {:?}, {:?}",
                progs.flow(&near_key),
                progs.flow(&far_key)
            )
        })
        .expect("client reads");
    // The client's own retransmissions (of the bytes past the window)
    // also carry an acknowledgment near takes in, their sequence number
    // being near's next, but on a timer that doubles each time: without
    // the kick the stream took 54 s and 10 of them, with it 0.7 s and 3.
    let retrans = sys::tcp_info(client.as_fd())
        .expect("tcp_info")
        .total_retrans;
    assert!(
        retrans <= MOST_RETRANS,
        "the client retransmitted {retrans} times before it had every byte: near heard it \
         only on the client's timer, not thanks to a kick"
    );
    let (down, mut server) = pusher.await.expect("join");
    assert_eq!(
        xxhash_rust::xxh3::xxh3_64(&got),
        down,
        "the stream to the client arrived damaged"
    );

    // The server reads what the client sent; both ends close.
    client.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    tokio::time::timeout(HANG, server.read_to_end(&mut back))
        .await
        .expect("the server's stream stalled")
        .expect("server reads");
    assert_eq!(back.len() as u64, written, "client -> server lost bytes");
    assert_eq!(
        xxhash_rust::xxh3::xxh3_64(&back),
        up.digest(),
        "client -> server arrived damaged"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(HANG, client.read_to_end(&mut rest))
        .await
        .expect("the server's FIN never reached the client")
        .expect("client reads EOF");
    assert!(
        rest.is_empty(),
        "{} bytes more than the server sent reached the client",
        rest.len()
    );
    drop((client, server, near_view));
    let summary = tokio::time::timeout(HANG, relay)
        .await
        .expect("relay hung")
        .expect("join");
    assert!(!summary.reset, "the relay reset an intact stream");
    assert!(
        summary.kicks > 0,
        "near was never kicked, yet the stream ended: {summary:?}"
    );
    common::assert_maps_empty(&progs).await;
}

/// Passed bytes near holds (client -> server) before it is squeezed:
/// far past its cut buffer, under the brake's threshold.
const UP_PASSED: u64 = 512 << 10;
/// Bytes server -> client: past the relay's 1 MiB window.
const DOWN: u64 = 4 << 20;
/// The client's retransmissions allowed before it has every byte: the
/// sixth comes some 6 s in, nine times what the kick needs here.
const MOST_RETRANS: u32 = 5;

/// [`wait_for`] in a runtime.
async fn wait_async(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < HANG, "waited {HANG:?} for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Bytes R sent that its peer acknowledged (R accepted the connection,
/// so no SYN is counted).
fn acked(s: &TcpStream) -> u64 {
    sys::tcp_info(s.as_fd()).expect("tcp_info").bytes_acked
}

/// The window the peer last announced to `fd` (`tcpi_snd_wnd`).
fn snd_wnd(fd: BorrowedFd<'_>) -> u32 {
    let windows = sys::windows(fd).expect("tcp_info");
    windows
        .expect("this kernel's tcp_info has no windows (Linux 6.2 on)")
        .0
}

/// Sets the window `fd` announced to zero, in repair mode, leaving it
/// without a probe (`TCP_REPAIR_OFF_NO_WP`), so nothing tells the peer.
fn shut_window(fd: BorrowedFd<'_>) {
    const OFF_NO_WP: i32 = -1;
    sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1).expect("TCP_REPAIR on");
    let mut w = sys::repair_window(fd).expect("TCP_REPAIR_WINDOW");
    w.rcv_wnd = 0;
    sys::set_repair_window(fd, &w).expect("TCP_REPAIR_WINDOW");
    sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, OFF_NO_WP)
        .expect("TCP_REPAIR off");
}

/// Polls `done` until it holds; fails after [`HANG`].
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < HANG, "waited {HANG:?} for {what}");
        std::thread::yield_now();
    }
}
