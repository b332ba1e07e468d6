//! `zc relay --idle-timeout`: in every mode, a connection that moves
//! nothing for the timeout ends with a FIN to both ends (the access log
//! and the metrics say "idle timeout"), and one that keeps trickling
//! bytes more often than that lives on with every byte intact.
mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::process::{RelayProcess, accept_upstream};

const TIMEOUT: Duration = Duration::from_secs(1);
const MODES: [&str; 3] = ["bpf", "splice", "copy"];

fn relay(mode: &str, server: &TcpListener) -> (RelayProcess, SocketAddr) {
    assert!(
        mode != "bpf" || nix::unistd::geteuid().is_root(),
        "bpf mode loads BPF programs and needs root; run `cargo xtask test` as root"
    );
    let mut relay = RelayProcess::start(
        server.local_addr().expect("addr"),
        &[
            "--mode",
            mode,
            "--idle-timeout",
            "1s",
            "--metrics",
            "127.0.0.1:0",
        ],
        &[],
        false,
    );
    let line = relay.wait_for_log("metrics on http://");
    let metrics = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"));
    (relay, metrics)
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connecting to the metrics port");
    write!(s, "GET /metrics HTTP/1.1\r\n\r\n").expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    reply
}

/// `n` patterned bytes from `from`, read whole and checked at `to`.
fn send_checked(from: &mut TcpStream, to: &mut TcpStream, n: usize, seed: u8) {
    let data: Vec<u8> = (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut writer = from.try_clone().expect("clone");
    let sent = data.clone();
    let w = std::thread::spawn(move || writer.write_all(&sent).expect("write"));
    let mut got = vec![0u8; n];
    to.read_exact(&mut got).expect("the bytes arrive");
    w.join().expect("writer");
    assert!(got == data, "{n} bytes arrived damaged");
}

/// Reads until EOF; panics on a reset or on bytes.
fn expect_fin(s: &mut TcpStream, who: &str) {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{who} got {n} bytes instead of EOF"),
        Err(e) => panic!("{who} got {e} instead of a clean EOF"),
    }
}

#[test]
fn an_idle_connection_is_closed_with_fin_after_the_timeout_in_every_mode() {
    for mode in MODES {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (mut relay, metrics) = relay(mode, &server);
        let mut client = relay.connect();
        let mut up = accept_upstream(&server);
        up.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        send_checked(&mut client, &mut up, 256 << 10, 1);
        send_checked(&mut up, &mut client, 256 << 10, 2);
        let last_byte = Instant::now();
        // Nobody sends again: both ends see the relay's FIN.
        expect_fin(&mut client, &format!("{mode}: the client"));
        let waited = last_byte.elapsed();
        expect_fin(&mut up, &format!("{mode}: the upstream"));
        assert!(
            waited >= TIMEOUT,
            "{mode}: closed {waited:?} after the last byte, before the timeout"
        );
        let line = relay.wait_for_log("idle timeout");
        assert!(
            line.contains(&format!("{} bytes up, {} down", 256 << 10, 256 << 10)),
            "{mode}: {line}"
        );
        let text = scrape(metrics);
        assert!(
            text.contains("zc_relay_connections_total{result=\"idle_timeout\"} 1\n"),
            "{mode}: {text}"
        );
        let (ok, log) = relay.stop();
        assert!(ok, "{mode}: zc relay did not exit cleanly: {log}");
    }
}

#[test]
fn a_connection_that_trickles_more_often_than_the_timeout_lives_on_intact_in_every_mode() {
    for mode in MODES {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (mut relay, _) = relay(mode, &server);
        let mut client = relay.connect();
        let mut up = accept_upstream(&server);
        up.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        // One byte every 300 ms for three timeouts, alternating direction;
        // each read also proves the connection was still open.
        let started = Instant::now();
        let mut i = 0u8;
        while started.elapsed() < 3 * TIMEOUT {
            std::thread::sleep(TIMEOUT * 3 / 10);
            let (from, to) = if i.is_multiple_of(2) {
                (&mut client, &mut up)
            } else {
                (&mut up, &mut client)
            };
            from.write_all(&[i]).expect("write");
            let mut got = [0u8; 1];
            to.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{mode}: byte {i} after {:?}: {e}", started.elapsed()));
            assert_eq!(got[0], i, "{mode}: byte {i} damaged");
            i += 1;
        }
        // Still a whole connection: a bulk transfer, then a clean end.
        send_checked(&mut client, &mut up, 1 << 20, 3);
        client.shutdown(Shutdown::Write).expect("shutdown");
        expect_fin(&mut up, &format!("{mode}: the upstream"));
        drop(up);
        expect_fin(&mut client, &format!("{mode}: the client"));
        let line = relay.wait_for_log(" bytes up, ");
        assert!(line.ends_with(", closed"), "{mode}: {line}");
        let (ok, log) = relay.stop();
        assert!(ok, "{mode}: zc relay did not exit cleanly: {log}");
        assert!(!log.contains("idle timeout"), "{mode}: {log}");
    }
}

#[test]
fn a_stalled_reader_with_bytes_queued_is_not_idle_in_every_mode() {
    const N: usize = 4 << 20;
    for mode in MODES {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (mut relay, _) = relay(mode, &server);
        let client = relay.connect();
        let mut up = accept_upstream(&server);
        up.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        // The upstream reads nothing for three timeouts: the bytes wait
        // in the sockets' queues and nothing moves, yet nothing is idle.
        let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let mut writer = client.try_clone().expect("clone");
        let w = std::thread::spawn(move || {
            writer.write_all(&sent).expect("write");
            writer.shutdown(Shutdown::Write).expect("shutdown");
        });
        // Proving an absence takes the time it covers.
        std::thread::sleep(3 * TIMEOUT);
        let mut got = Vec::with_capacity(N);
        up.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{mode}: after {} bytes: {e}", got.len()));
        w.join().expect("writer");
        assert!(
            got == data,
            "{mode}: {} of {N} bytes, or damaged",
            got.len()
        );
        drop(up);
        let mut client = client;
        expect_fin(&mut client, &format!("{mode}: the client"));
        let line = relay.wait_for_log(" bytes up, ");
        assert!(line.ends_with(", closed"), "{mode}: {line}");
        relay.stop();
    }
}
