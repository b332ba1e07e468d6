//! `zc relay --rto-max`: when segments to a client are lost, the relay's
//! socket retransmits with an exponential backoff that stops at the cap
//! instead of TCP's 120 s, so a client whose path comes back waits at
//! most that long before bytes move again. Seen without it: 1,000
//! clients that never read pushed the host past tcp_mem, their sockets
//! dropped segments, and after they resumed reading some waited for a
//! 52 s timer (`zc bench --workloads stall`). Off by default: a cap also
//! makes TCP give up on a silent peer sooner.
//!
//! The client lives in a network namespace behind a veth pair; taking
//! the namespace's end down makes the host end drop what the relay sends.
//! Its own test binary: it adds a veth pair to the host.
mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use common::{
    agent::{fd_of, inode_in, read_n, read_to_eof, send_n, take_fd},
    netns::{Veth, ip},
    process::RelayProcess,
};

const FIRST: u64 = 4 << 20;
const SECOND: u64 = 16 << 20;
/// Timeouts in a row before the relay's retransmission timeout is read:
/// uncapped it is 16 times the first by then (3.2 s or more).
const BACKOFFS: u8 = 4;

#[test]
fn the_relays_retransmissions_back_off_no_further_than_rto_max() {
    let veth = Veth::new("rto");
    let (ns, ns_if, host_ip) = (&veth.ns, &veth.ns_if, veth.host_ip);

    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream = server.local_addr().expect("addr").to_string();
    for (extra, capped) in [(&["--rto-max", "1s"][..], true), (&[][..], false)] {
        let mut args = vec!["--mode", "copy"];
        args.extend_from_slice(extra);
        let relay = RelayProcess::start_at("0.0.0.0:0", &upstream, &args, &[], false);
        let relay_addr = SocketAddr::from((host_ip, relay.listen.port()));
        let mut client = ns.run(|| TcpStream::connect(relay_addr).expect("connect to the relay"));
        client
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let (mut up, _) = server.accept().expect("the relay connects upstream");
        let (go_tx, go) = std::sync::mpsc::channel::<()>();
        let sender = std::thread::spawn(move || {
            let first = send_n(&mut up, FIRST, 1);
            go.recv().expect("go");
            (first, send_n(&mut up, SECOND, 2))
        });
        let got_first = read_n(&mut client, FIRST);

        // Cut the client off, then let the server send the rest.
        ip(&["-n", &ns.name, "link", "set", ns_if, "down"]);
        go_tx.send(()).expect("sender gone");
        let toward_client = relay_socket(
            relay.child.id(),
            relay_addr,
            client.local_addr().expect("addr"),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let info = loop {
            let info = zc_user::sys::tcp_info(toward_client.as_fd()).expect("tcp_info");
            if info.backoff >= BACKOFFS {
                break info;
            }
            assert!(
                Instant::now() < deadline,
                "the relay's socket never backed off: {info:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!(
            "{}: after {} timeouts in a row the relay's retransmission timeout is {} ms",
            if capped {
                "--rto-max 1s"
            } else {
                "default (no cap)"
            },
            info.backoff,
            info.rto / 1000
        );
        if capped {
            assert!(
                info.rto <= 1_000_000,
                "the relay's socket backed off to {} ms despite --rto-max 1s",
                info.rto / 1000
            );
        } else {
            // What the cap prevents, so this test fails without it.
            assert!(
                info.rto > 1_000_000,
                "uncapped, the timeout stayed at {} ms: the test did not make TCP back off",
                info.rto / 1000
            );
        }

        ip(&["-n", &ns.name, "link", "set", ns_if, "up"]);
        let got_second = read_to_eof(&mut client);
        let (sent_first, sent_second) = sender.join().expect("sender");
        assert_eq!(got_first, sent_first, "the first part");
        assert_eq!(
            got_second, sent_second,
            "the part sent while the client was cut off"
        );
    }
}

/// The relay process's socket from `local` to `remote`, taken with
/// pidfd_getfd.
fn relay_socket(pid: u32, local: SocketAddr, remote: SocketAddr) -> TcpStream {
    let table = format!("/proc/{pid}/net/tcp");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(fd) = inode_in(&table, local, remote).and_then(|i| fd_of(pid, i)) {
            return TcpStream::from(take_fd(pid, fd));
        }
        assert!(
            Instant::now() < deadline,
            "the relay's socket {local} -> {remote} not found"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
