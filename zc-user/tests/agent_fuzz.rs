//! A live agent fed random, mutated, truncated, oversized and deeply
//! nested control messages, from root and from an unprivileged member of
//! its group, at once: it answers every one, never crashes, and what it
//! pairs (`zc list --json`) does not change; the pair it held keeps
//! moving bytes.
mod common;

use std::{
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use common::agent::{Agent, MEMBER_GROUP, Proxy, become_member, exchange, through_proxy};
use nix::sys::socket::{MsgFlags, recv, send};
use rand::{Rng, SeedableRng, rngs::StdRng};
use zc_user::agent::{
    control::{self, REPLY_CHUNK},
    proto::{self, MAX_REQUEST, Request},
};

/// Messages each sender sends.
const MESSAGES: usize = 1500;

#[test]
fn random_control_messages_change_nothing_and_crash_nothing() {
    common::init();
    let agent = Agent::start_with("fuzz", &["--group", MEMBER_GROUP]);
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (mut client, mut up, _) = through_proxy(&socat, &server);
    let tuple = |s: &TcpStream| {
        format!(
            "{}-{}",
            s.peer_addr().expect("peer"),
            s.local_addr().expect("local")
        )
    };
    let (ok, _, err) = agent.zc(&["pair", &tuple(&client), &tuple(&up)]);
    assert!(ok, "pairing by tuple failed: {err}");
    let before = list(&agent);
    assert!(before.contains("\"id\""), "no pair listed: {before}");

    let senders: Vec<_> = [false, true]
        .into_iter()
        .map(|member| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                if member {
                    become_member();
                }
                fuzz(&socket, member, if member { 11 } else { 12 })
            })
        })
        .collect();
    for s in senders {
        let answered = s.join().expect("a sender panicked");
        assert_eq!(answered, MESSAGES, "messages the agent answered");
    }

    assert_eq!(list(&agent), before, "the fuzzed agent's pairs changed");
    let pid = agent.child.as_ref().expect("agent running").id();
    assert!(
        common::agent::cpu_secs_if_alive(pid).is_some(),
        "the agent died"
    );
    // The pair still works, in the kernel.
    exchange(&mut client, &mut up, 4 << 20);
}

fn list(agent: &Agent) -> String {
    let (ok, out, err) = agent.zc(&["list", "--json"]);
    assert!(ok, "zc list failed: {err}");
    out
}

/// Sends [`MESSAGES`] bad messages, each on its own connection, and
/// returns how many got an answer (an error, for all of them).
fn fuzz(socket: &Path, member: bool, seed: u64) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut answered = 0;
    let mut sent = 0;
    while sent < MESSAGES {
        let msg = message(&mut rng);
        if msg.is_empty() {
            // A message of no bytes reads as the end of the connection
            // (recv returns 0): the agent closes it, with nothing to say.
            continue;
        }
        // Root sends nothing that is a valid request to change state (it
        // is allowed to); a member may send anything but a pairing by
        // pid, which could name a process of its own on this host.
        match proto::decode(&msg, false) {
            Ok(Request::List | Request::Stats | Request::Status) | Err(_) => {}
            Ok(Request::Unpair { .. }) if member => {}
            Ok(_) => continue,
        }
        sent += 1;
        let conn = connect(socket);
        if send(conn.as_raw_fd(), &msg, MsgFlags::empty()).is_err() {
            // Oversized past the socket's buffer: refused by the kernel,
            // which is the same as the agent never seeing it.
            answered += 1;
            continue;
        }
        if reply(&conn).is_some() {
            answered += 1;
        }
    }
    answered
}

/// One bad message: random bytes, a mutated or truncated request, an
/// oversized one, or deep nesting.
fn message(rng: &mut StdRng) -> Vec<u8> {
    let seeds: [&[u8]; 5] = [
        br#"{"op":"pair_pid","pid":42,"fds":[5,7]}"#,
        br#"{"op":"pair_tuple","sockets":["127.0.0.1:1-127.0.0.1:2","127.0.0.1:3-127.0.0.1:4"]}"#,
        br#"{"op":"unpair","id":1}"#,
        br#"{"op":"list"}"#,
        br#"{"op":"handoff"}"#,
    ];
    let seed = seeds[rng.random_range(0..seeds.len())];
    match rng.random_range(0..6) {
        0 => (0..rng.random_range(0..128))
            .map(|_| rng.random())
            .collect(),
        1 => seed[..rng.random_range(0..seed.len())].to_vec(),
        2 => {
            let mut m = seed.to_vec();
            m.resize(MAX_REQUEST + rng.random_range(1..3 * MAX_REQUEST), b' ');
            m
        }
        3 => {
            let depth = rng.random_range(100..20_000);
            let (open, close): (&[u8], &[u8]) = if rng.random() {
                (b"[", b"]")
            } else {
                (b"{\"op\":", b"}")
            };
            let mut m = open.repeat(depth);
            m.extend(close.repeat(depth));
            m
        }
        _ => {
            let mut m = seed.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..m.len());
                match rng.random_range(0..3) {
                    0 => m[at] = rng.random(),
                    1 => {
                        m.remove(at);
                    }
                    _ => m.insert(at, rng.random()),
                }
                if m.is_empty() {
                    break;
                }
            }
            m
        }
    }
}

fn connect(socket: &Path) -> OwnedFd {
    control::connect_control(socket).unwrap_or_else(|e| panic!("connecting: {e:#}"))
}

/// The agent's whole answer, or `None` if it closed without one.
fn reply(conn: &OwnedFd) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut buf = vec![0u8; REPLY_CHUNK + 1];
    loop {
        let n = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
        if n == 0 {
            return (!body.is_empty()).then_some(body);
        }
        body.extend_from_slice(&buf[..n]);
        if n < REPLY_CHUNK {
            return Some(body);
        }
    }
}
