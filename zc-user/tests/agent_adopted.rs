//! Pairs adopted by a restarted agent end cleanly. An agent killed with
//! `kill -9` leaves its pairs in the pinned maps; the connection may end
//! while no agent runs, or after a new agent adopted the pair. Either way
//! the pair must leave the list and the maps: a stale entry would refuse
//! a later connection with the same 4-tuple ("already paired") and would
//! hold, or take off a data segment, that connection's FIN.
//!
//! The proxy is HAProxy, which keeps listening; the client binds its port
//! once (the kernel picks it) and reuses it, so the later connection has
//! the very 4-tuple of the first. The server ends first, so the TIME-WAIT
//! lands on HAProxy's side, which takes a new SYN for the tuple at once.
mod common;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{
    HANG,
    agent::{Agent, Proxy, fd_of, inode_of, read_n, send_n},
};

/// A client from `port` (0: the kernel picks) through HAProxy to
/// `server`: (client, server's end, HAProxy's two fds).
fn connect_from(
    port: u16,
    proxy: &Proxy,
    server: &TcpListener,
) -> (TcpStream, TcpStream, [i32; 2]) {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("bind the client's port");
    s.connect(&SocketAddr::from(([127, 0, 0, 1], proxy.port)).into())
        .expect("connect to HAProxy");
    let client: TcpStream = s.into();
    let (up, _) = server.accept().expect("HAProxy connects upstream");
    for s in [&client, &up] {
        s.set_read_timeout(Some(HANG)).expect("timeout");
    }
    let pid = proxy.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fd = |s: &TcpStream| fd_of(pid, inode_of(s.peer_addr().ok()?, s.local_addr().ok()?)?);
        if let (Some(a), Some(b)) = (fd(&client), fd(&up)) {
            return (client, up, [a, b]);
        }
        assert!(Instant::now() < deadline, "HAProxy's sockets not found");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends the connection as HAProxy passes it on: the server first, then
/// the client, each reading to EOF; returns once HAProxy has closed both
/// of its sockets and the client's has gone (none is in /proc/net/tcp but
/// in TIME-WAIT).
fn end(mut client: TcpStream, mut up: TcpStream) {
    // HAProxy's two sockets, and the client's own (its port is reused).
    let ends = [
        (
            client.peer_addr().expect("a"),
            client.local_addr().expect("b"),
        ),
        (up.peer_addr().expect("a"), up.local_addr().expect("b")),
        (
            client.local_addr().expect("a"),
            client.peer_addr().expect("b"),
        ),
    ];
    up.shutdown(std::net::Shutdown::Write)
        .expect("server shutdown");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("client reads to EOF");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("client shutdown");
    up.read_to_end(&mut rest).expect("server reads to EOF");
    assert!(rest.is_empty(), "bytes after the end: {}", rest.len());
    drop((client, up));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ends.iter().any(|&(l, r)| open(l, r)) {
        assert!(
            Instant::now() < deadline,
            "HAProxy did not close its sockets {ends:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a socket local -> remote exists in a state other than
/// TIME-WAIT (06).
fn open(local: SocketAddr, remote: SocketAddr) -> bool {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("IPv4 only here"),
    };
    let (l, r) = (hex(local), hex(remote));
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.get(1) == Some(&l.as_str())
                && f.get(2) == Some(&r.as_str())
                && f.get(3) != Some(&"06")
        })
}

/// A little each way, by digest.
fn exchange(client: &mut TcpStream, up: &mut TcpStream) {
    let sent = send_n(client, 1 << 20, 21);
    assert_eq!(read_n(up, 1 << 20), sent, "client -> server");
    let sent = send_n(up, 1 << 20, 22);
    assert_eq!(read_n(client, 1 << 20), sent, "server -> client");
}

/// (bare FINs held, FINs taken off data) by this agent's hold.
fn hold_counts(agent: &Agent) -> (u64, u64) {
    let (ok, out, err) = agent.zc(&["status", "--json"]);
    assert!(ok, "zc status failed: {err}");
    let st: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let n = |k: &str| st["agent"][k].as_u64().unwrap_or(0);
    (n("fins_held"), n("fins_stripped"))
}

fn setup(tag: &str) -> (Agent, TcpListener, Proxy) {
    let agent = Agent::start(tag);
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = Proxy::haproxy_on(listener, server.local_addr().expect("addr"), &agent.dir, 1);
    (agent, server, proxy)
}

#[test]
fn a_pair_that_ended_while_no_agent_ran_is_not_adopted_and_its_tuple_pairs_again() {
    let (mut agent, server, proxy) = setup("adopt-gone");
    let (mut client, mut up, fds) = connect_from(0, &proxy, &server);
    let port = client.local_addr().expect("addr").port();
    let (ok, _, err) = agent.pair(proxy.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");
    exchange(&mut client, &mut up);
    agent.kill9();
    end(client, up);

    agent.spawn();
    let pairs = agent.pairs();
    assert!(
        pairs.is_empty(),
        "the restarted agent lists a pair whose connection had ended: {pairs:?}"
    );
    let (mut client, mut up, fds) = connect_from(port, &proxy, &server);
    let (ok, _, err) = agent.pair(proxy.child.id(), fds);
    assert!(
        ok,
        "a new connection with the ended pair's 4-tuple could not be paired: {err}"
    );
    exchange(&mut client, &mut up);
    assert_eq!(agent.pairs().len(), 1);
}

#[test]
fn an_adopted_pair_that_ends_leaves_the_list_and_the_fin_hold() {
    let (mut agent, server, proxy) = setup("adopt-end");
    let (mut client, mut up, fds) = connect_from(0, &proxy, &server);
    let port = client.local_addr().expect("addr").port();
    let (ok, _, err) = agent.pair(proxy.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");
    agent.kill9();
    agent.spawn();
    let pairs = agent.pairs();
    assert_eq!(
        pairs.len(),
        1,
        "the restarted agent adopts the pair: {pairs:?}"
    );
    assert_eq!(pairs[0]["source"], "adopted");
    exchange(&mut client, &mut up);
    end(client, up);
    // `zc list` looks at the adopted pairs before it answers.
    let pairs = agent.pairs();
    assert!(
        pairs.is_empty(),
        "an adopted pair whose connection ended is still listed: {pairs:?}"
    );

    // The same 4-tuple again, unpaired: its FIN, riding on its last bytes
    // (TCP_CORK), must reach HAProxy untouched.
    let before = hold_counts(&agent);
    let (mut client, mut up, _) = connect_from(port, &proxy, &server);
    common::set_cork(&client, true);
    let sent = send_n(&mut client, 1000, 23);
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("client shutdown");
    assert_eq!(read_n(&mut up, 1000), sent);
    let mut rest = [0u8; 1];
    assert_eq!(up.read(&mut rest).expect("EOF"), 0);
    assert_eq!(
        hold_counts(&agent),
        before,
        "the FIN hold acted on an unpaired connection that reuses an ended pair's 4-tuple"
    );
    // Its other direction still works as HAProxy relays it.
    let back = send_n(&mut up, 1000, 24);
    assert_eq!(read_n(&mut client, 1000), back);
}
