//! A relayed direction the kernel carries again after a hold must not wake
//! the relay. A socket registered with the runtime's poller wakes it for
//! every skb the verdict takes (the psock calls the socket's data-ready
//! hook afterwards), so a relay that kept its registrations from the first
//! hold to the end woke about 12,000 times a second in a bulk stream. The
//! relay drops them when no direction needs user space.
//!
//! The relay runs as its own process so its context switches are its own.
mod common;

use std::{
    io::{Read, Write},
    net::TcpListener,
    time::{Duration, Instant},
};

use common::{
    agent::{fd_of, inode_of, read_n, send_n, switches_but, wait_idle},
    process::{RelayProcess, accept_upstream},
};

/// Pushed while the server does not read: far past the cap, so the
/// verdict stops redirecting and the relay forwards in user space.
const HELD: u64 = 48 << 20;
/// Writes in the quiet phase, one at a time: each waits for the server to
/// read the one before, so each is an skb of its own for the verdict.
const WRITES: usize = 300;
const WRITE: usize = 4096;
const EPOLLIN: u32 = 0x1;
/// The relay's thread that samples TCP's memory every 100 ms: a tick of
/// its own, however long the writes take on a loaded host.
const SAMPLER: &str = "zc-tcp-mem";

#[test]
fn a_direction_back_in_the_kernel_does_not_wake_the_relay() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs through zc relay and needs root; run `cargo xtask test` as root"
    );
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut relay = RelayProcess::start(
        server.local_addr().expect("addr"),
        &["--mode", "bpf", "--window", "1m"],
        &[("RUST_LOG", "info,zc_user::engine::bpf::switch=debug")],
        false,
    );
    let mut client = relay.connect();
    let mut up = accept_upstream(&server);
    let pid = relay.child.id();
    let pair = [
        (client.peer_addr(), client.local_addr()),
        (up.peer_addr(), up.local_addr()),
    ]
    .map(|(local, remote)| {
        let (local, remote) = (local.expect("addr"), remote.expect("addr"));
        let inode = inode_of(local, remote).expect("the relay's socket in /proc/net/tcp");
        fd_of(pid, inode).expect("the relay's descriptor for its socket")
    });

    // A hold: the client pushes while the server reads nothing, and the
    // relay waits on the pair's sockets.
    let mut writer = client.try_clone().expect("clone");
    let pusher = std::thread::spawn(move || send_n(&mut writer, HELD, 7));
    relay.wait_for_log("holding side 0");
    wait_for(pid, "the pair's sockets in the relay's poller", |polled| {
        pair.iter().all(|fd| polled.contains(fd))
    });
    let got = read_n(&mut up, HELD);
    let sent = pusher.join().expect("pusher");
    assert_eq!(got, sent, "the held phase arrived damaged");
    // The client has stopped, so the forwarder finds the queue empty and
    // hands the direction back (the reader's pace may have made more than
    // one hold): then the sockets leave the poller.
    wait_for(
        pid,
        "the pair's sockets out of the relay's poller",
        |polled| pair.iter().all(|fd| !polled.contains(fd)),
    );

    // Each write waits for the one before to arrive: forwarded in user
    // space, every one would need the relay awake.
    wait_idle(pid);
    let before = switches_but(pid, &[SAMPLER]);
    let mut buf = [0u8; WRITE];
    for i in 0..WRITES {
        let fill = (i % 251) as u8;
        client.write_all(&[fill; WRITE]).expect("write");
        up.read_exact(&mut buf).expect("the server's read");
        assert!(buf.iter().all(|&b| b == fill), "write {i} arrived damaged");
    }
    let woke = switches_but(pid, &[SAMPLER]) - before;

    drop(client);
    let mut rest = Vec::new();
    up.read_to_end(&mut rest).expect("EOF from the relay");
    assert!(rest.is_empty(), "{} bytes after the last write", rest.len());
    drop(up);
    let line = relay.wait_for_log("bytes up");
    assert!(
        line.contains("closed"),
        "the connection ended badly: {line}"
    );
    // Unregistered, the relay sleeps through it; registered, it wakes for
    // about every write.
    assert!(
        woke < (WRITES / 10) as u64,
        "the relay woke {woke} times while the kernel carried {WRITES} writes: \
         its sockets are still with the poller"
    );
    eprintln!("the relay woke {woke} times over {WRITES} writes the kernel carried");
}

/// The descriptors `pid`'s epoll instances watch for arriving bytes (the
/// `tfd` lines of /proc/PID/fdinfo whose interest includes EPOLLIN; the
/// relay's watcher of ends asks for EPOLLRDHUP alone).
fn polled(pid: u32) -> Vec<i32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy() == "anon_inode:[eventpoll]")
        })
        .filter_map(|e| {
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_str()?)).ok()
        })
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| {
                    let mut f = l.strip_prefix("tfd:")?.split_whitespace();
                    let fd = f.next()?.parse().ok()?;
                    let events = u32::from_str_radix(f.nth(1)?, 16).ok()?;
                    (events & EPOLLIN != 0).then_some(fd)
                })
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Waits (up to 20 s) until `done` holds for what `pid` polls.
fn wait_for(pid: u32, what: &str, done: impl Fn(&[i32]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&polled(pid)) {
        assert!(
            Instant::now() < deadline,
            "no {what} in 20 s: it polls {:?}; its descriptors: {}",
            polled(pid),
            descriptors(pid)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `pid`'s descriptors and what they are, for a failure message.
fn descriptors(pid: u32) -> String {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return String::new();
    };
    fds.flatten()
        .map(|e| {
            let to = std::fs::read_link(e.path()).unwrap_or_default();
            format!("{} -> {}", e.file_name().to_string_lossy(), to.display())
        })
        .collect::<Vec<_>>()
        .join(", ")
}
