//! A TCP retransmission that overlaps bytes already relayed must not
//! deliver them twice.
//!
//! TCP queues a segment that starts before `rcv_nxt` whole, old bytes
//! included, and `tcp_read_skb` hands the whole skb to the stream verdict
//! (6.18). Unchecked, the old bytes are redirected to the peer again. The
//! test makes such a segment on purpose: it sends bytes through a pair,
//! then injects, with a raw socket, a segment carrying those same bytes
//! again followed by new ones, exactly as a spurious retransmission would.
//! It runs in a network namespace of its own, where TCP timestamps are off
//! so the crafted segment needs no options.
mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    os::fd::{AsFd, AsRawFd},
    process::Command,
};

use common::*;
use zc_user::ebpf::Programs;

const OLD: usize = 1000;
const NEW: usize = 10;

#[test]
fn a_retransmission_overlapping_relayed_bytes_delivers_only_the_new_ones() {
    in_own_netns(|p| check(p, false));
}

#[test]
fn a_retransmission_of_relayed_bytes_with_fin_delivers_nothing_twice() {
    in_own_netns(|p| check(p, true));
}

fn check(progs: Programs, with_fin: bool) {
    // client -> near (the relay's end) ... far -> server
    let [mut client, near, far, mut server] = relay_sockets_blocking();
    let pairing = progs
        .pair_relay(near.as_fd(), far.as_fd(), 0)
        .expect("pairing");
    assert_eq!(pairing.in_relay, [true, true]);

    client.write_all(&[b'A'; OLD]).expect("send");
    let first = read_exactly(&mut server, OLD);
    assert_eq!(first, vec![b'A'; OLD]);

    // The client's next sequence number and what it acknowledges, read
    // in repair mode (which also keeps it from answering our segment).
    let (snd_nxt, rcv_nxt) = repair_seqs(&client);
    let mut payload = vec![b'A'; OLD];
    if !with_fin {
        payload.extend_from_slice(&[b'B'; NEW]);
    }
    let (client_addr, near_addr) = (
        v4(client.local_addr().expect("addr")),
        v4(client.peer_addr().expect("addr")),
    );
    inject(
        client_addr,
        near_addr,
        snd_nxt.wrapping_sub(OLD as u32),
        rcv_nxt,
        with_fin,
        &payload,
    );

    let key = pairing.keys[0];
    if with_fin {
        // Nothing new to deliver: wait until the verdict has handled the
        // segment (cut, or sent again), then check nothing was sent.
        let deadline = std::time::Instant::now() + HANG;
        let handled = |f: zc_common::Flow| f.sent + f.trimmed >= 2 * OLD as u64;
        while !handled(progs.flow(&key).expect("flow")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the segment never reached the verdict"
            );
            std::thread::yield_now();
        }
        server.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 4096];
        let extra = match server.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("reading the server: {e}"),
        };
        let sent = progs.flow(&key).expect("flow").sent;
        assert_eq!(
            (extra, sent),
            (0, OLD as u64),
            "the retransmitted bytes were relayed again"
        );
    } else {
        let second = read_exactly(&mut server, NEW);
        assert_eq!(
            second,
            vec![b'B'; NEW],
            "the server got old bytes again instead of the new ones"
        );
    }
    let flow = progs.flow(&key).expect("flow");
    let carried = progs.counters(&key).expect("counters").bytes;
    eprintln!("flow after the retransmission: {flow:?}; the kernel carried {carried} bytes");
    assert_eq!(flow.trimmed, OLD as u64, "the verdict cut the old bytes");
    let expected = (OLD + if with_fin { 0 } else { NEW }) as u64;
    assert_eq!(flow.sent, expected);
    assert_eq!(
        carried, expected,
        "the BPF counters saw the bytes go through the kernel"
    );
    progs.unpair(&pairing.keys);
}

fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(HANG)).expect("timeout");
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)
        .expect("reading what the relay delivered");
    buf
}

fn v4(a: std::net::SocketAddr) -> SocketAddrV4 {
    match a {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("expected IPv4, got {other}"),
    }
}

/// The send and receive sequence numbers of a socket, put in TCP repair
/// mode for good (it sends nothing more).
fn repair_seqs(s: &TcpStream) -> (u32, u32) {
    let fd = s.as_raw_fd();
    let set = |opt, val: i32| {
        // SAFETY: a valid fd and a 4-byte value.
        let rc =
            unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, opt, (&raw const val).cast(), 4) };
        assert_eq!(
            rc,
            0,
            "setsockopt {opt}: {}",
            std::io::Error::last_os_error()
        );
    };
    let get_seq = |queue: i32| {
        set(libc::TCP_REPAIR_QUEUE, queue);
        let mut v = 0u32;
        let mut len = 4 as libc::socklen_t;
        // SAFETY: as above, with room for the value.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_QUEUE_SEQ,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
        v
    };
    set(libc::TCP_REPAIR, 1);
    // linux/tcp.h: TCP_RECV_QUEUE = 1, TCP_SEND_QUEUE = 2.
    (get_seq(2), get_seq(1))
}

/// Sends one TCP segment from `src` to `dst` through a raw socket.
fn inject(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, ack: u32, fin: bool, payload: &[u8]) {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4);
    tcp.push(0x18 | u8::from(fin)); // PSH, ACK (, FIN)
    tcp.extend_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    ip.extend_from_slice(&tcp);
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("raw socket");
    let to = std::net::SocketAddr::V4(SocketAddrV4::new(*dst.ip(), 0));
    let n = raw.send_to(&ip, &to.into()).expect("sending the segment");
    assert_eq!(n, ip.len());
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Runs `f` on a thread in a new network namespace with loopback up and
/// TCP timestamps off; the namespace goes when the thread ends.
fn in_own_netns(f: fn(Programs)) {
    // Loaded outside any tokio runtime, as a plain program would.
    let progs = programs();
    let host = tcp_timestamps_here();
    let t = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET) (needs root)");
        // A child forked from this thread starts in its namespace.
        let ok = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("running ip");
        assert!(ok.success(), "ip link set lo up failed");
        // net.* sysctls belong to the writer's network namespace.
        std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", "0")
            .expect("turning TCP timestamps off in the test namespace");
        f(progs);
    });
    let outcome = t.join();
    assert_eq!(
        tcp_timestamps_here(),
        host,
        "the host's tcp_timestamps changed: the sysctl did not stay in the test namespace"
    );
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

fn tcp_timestamps_here() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_timestamps")
        .expect("reading tcp_timestamps")
        .trim()
        .to_string()
}
