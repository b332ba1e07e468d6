//! The verdict moves a direction's cap by what the reader acknowledged
//! since user space set it. User space moves the cap each half window, but
//! on a busy host its thread may wait for a CPU for milliseconds while a
//! bulk stream moves megabytes; with a fixed cap the verdict then held a
//! reader that had caught up (23 of 39 holds in a 5 s iperf3 run began
//! with nothing waiting), and a hold lasts until the sender pauses.
//!
//! Here user space sets the cap once and never moves it: a reader that
//! keeps up gets the whole stream through the kernel, and a reader that
//! stops still stops the verdict at the cap plus what it acknowledged.
mod common;

use std::{
    io::{Read, Write},
    os::fd::AsFd,
    sync::{Arc, Condvar, Mutex},
    time::Instant,
};

use common::*;
use zc_user::{ebpf::Cap, sys::tcp_info};

const CAP: u64 = 1 << 20;
const TOTAL: u64 = 64 << 20;

#[test]
fn a_cap_user_space_never_moves_holds_back_no_reader_that_keeps_up() {
    let progs = programs();
    // client -> near (the relay's end) ... far -> server
    let [mut client, near, far, mut server] = relay_sockets_blocking();
    server.set_read_timeout(Some(HANG)).expect("timeout");
    let pairing = progs
        .pair_relay(near.as_fd(), far.as_fd(), CAP)
        .expect("pairing");
    assert_eq!(pairing.in_relay, [true, true]);
    let key = pairing.keys[0];
    // The cap, set once, as the engine sets it: the redirected total the
    // verdict may reach, with the destination's acknowledged count then.
    let acked_at = tcp_info(far.as_fd()).expect("tcp_info").bytes_acked;
    progs
        .rearm(
            &key,
            u64::MAX,
            u64::MAX,
            Cap {
                total: CAP,
                acked_at,
            },
            false,
            0,
        )
        .expect("rearm");

    // A reader that keeps up: the writer stays within half the cap of
    // what the reader has read (the kernel's redirect has no backpressure,
    // so a writer free to run ahead would make any reader lag), and sends
    // 64 times the cap, all through the kernel.
    let progress = Arc::new((Mutex::new(0u64), Condvar::new()));
    let writer = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            let mut pattern = zc_user::traffic::Pattern::new(1);
            let mut sent = 0u64;
            while sent < TOTAL {
                let (read, moved) = &*progress;
                let ahead = sent.saturating_sub(CAP / 2);
                drop(
                    moved
                        .wait_while(read.lock().expect("lock"), |r| *r < ahead)
                        .expect("lock"),
                );
                let buf = pattern.next(64 << 10);
                client.write_all(buf).expect("write");
                h.update(buf);
                sent += buf.len() as u64;
            }
            (sent, h.digest(), client)
        })
    };
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    while got < TOTAL {
        let k = server.read(&mut buf).unwrap_or_else(|e| {
            let f = progs.flow(&key);
            panic!("stalled after {got} bytes ({e}); the verdict's flow: {f:?}")
        });
        assert!(k > 0, "EOF after {got} of {TOTAL} bytes");
        h.update(&buf[..k]);
        got += k as u64;
        let (read, moved) = &*progress;
        *read.lock().expect("lock") = got;
        moved.notify_one();
    }
    let (sent, hash, mut client) = writer.join().expect("writer");
    assert_eq!(got, sent, "the stream arrived short");
    assert_eq!(h.digest(), hash, "the stream arrived damaged");
    let f = progs.flow(&key).expect("flow");
    eprintln!(
        "reader keeping up: the verdict redirected {} and passed {} of {TOTAL} bytes",
        f.sent, f.passed
    );
    assert_eq!(
        f.passed, 0,
        "the verdict passed bytes at a cap the reader had long left behind"
    );
    assert_eq!(f.sent, TOTAL);

    // A reader that stops: the verdict still stops at the cap moved by
    // what the reader acknowledged, and passes the rest (which no one
    // forwards here, so the sender blocks).
    client
        .set_nonblocking(true)
        .expect("nonblocking for the push");
    let mut pattern = zc_user::traffic::Pattern::new(2);
    let started = Instant::now();
    loop {
        match client.write(pattern.next(64 << 10)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if progs.flow(&key).expect("flow").passed > 0 {
                    break;
                }
                assert!(
                    started.elapsed() < HANG,
                    "the verdict never passed a byte while the reader slept"
                );
                std::thread::yield_now();
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let f = progs.flow(&key).expect("flow");
    let acked = tcp_info(far.as_fd()).expect("tcp_info").bytes_acked;
    let moved_cap = CAP + (acked - acked_at);
    eprintln!(
        "reader stopped: the verdict redirected {} (cap moved to {moved_cap}) and passed {}",
        f.sent, f.passed
    );
    assert!(
        f.sent <= moved_cap,
        "the verdict redirected {} bytes, past the cap moved to {moved_cap}",
        f.sent
    );
    drop(server);
}
