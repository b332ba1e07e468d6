//! A dual-stack proxy: HAProxy listening on `[::]` with IPv6-only off
//! accepts IPv4 clients on IPv6 sockets with IPv4-mapped addresses
//! (`::ffff:127.0.0.1`), and reaches its IPv4 upstream with an IPv4
//! socket. The kernel redirects between the two like any two TCP sockets;
//! the agent pairs them (by pid/fd and by tuple as `ss` prints it), and
//! the FIN hold, which reads IPv4 headers, finds the mapped socket's key.
mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{
    HANG,
    agent::{Agent, Proxy, fd_of, read_n, send_n},
};
use zc_user::traffic::Digest;

/// A `[::]:0` listener that takes IPv4 connections too, for HAProxy to
/// inherit (`bind fd@3`): the kernel picks the port.
fn dual_stack_listener() -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
        .expect("IPv6 socket");
    s.set_only_v6(false).expect("IPV6_V6ONLY off");
    s.bind(&"[::]:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind [::]:0");
    s.listen(128).expect("listen");
    s.into()
}

/// A client through HAProxy to `server`: (client, server's end, HAProxy's
/// fd for the client (IPv4-mapped) and for the upstream (IPv4)).
fn connect(proxy: &Proxy, server: &TcpListener) -> (TcpStream, TcpStream, [i32; 2]) {
    let client = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect to HAProxy");
    let (up, _) = server.accept().expect("HAProxy connects upstream");
    for s in [&client, &up] {
        s.set_read_timeout(Some(HANG)).expect("timeout");
    }
    let pid = proxy.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // As the proxy sees them: local and remote swapped.
        let fd = |s: &TcpStream| {
            let ino = zc_user::agent::find::inode_of(s.peer_addr().ok()?, s.local_addr().ok()?)?;
            fd_of(pid, ino)
        };
        if let (Some(a), Some(b)) = (fd(&client), fd(&up)) {
            return (client, up, [a, b]);
        }
        assert!(Instant::now() < deadline, "HAProxy's sockets not found");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(agent: &Agent) -> serde_json::Value {
    let (ok, out, err) = agent.zc(&["status", "--json"]);
    assert!(ok, "zc status failed: {err}");
    serde_json::from_str(&out).expect("status json")
}

fn kernel_bytes(agent: &Agent) -> u64 {
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    v["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| p["bytes"][0].as_u64().unwrap_or(0) + p["bytes"][1].as_u64().unwrap_or(0))
        .sum()
}

/// Sends `n` bytes with its FIN on the last of them (TCP_CORK), then
/// waits for every byte back from `up` to EOF.
fn half_close(client: &mut TcpStream, up: &mut TcpStream, n: u64, seed: u64) -> (Digest, Digest) {
    common::set_cork(client, true);
    // The verdict takes everything the client sends (the redirect queue
    // has no bound), so the send ends, and the FIN leaves, while most
    // bytes still wait in the kernel for the server, which reads only
    // once the client is done.
    let sent = send_n(client, n, seed);
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("client shutdown");
    let got = read_n(up, n);
    let mut rest = [0u8; 1];
    let eof = std::io::Read::read(up, &mut rest).expect("read at the end");
    assert_eq!(eof, 0, "the server got more than was sent");
    (sent, got)
}

#[test]
fn a_dual_stack_haproxy_pairs_ipv4_mapped_clients_with_ipv4_upstreams_and_holds_their_fin() {
    let agent = Agent::start("dualstack");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = agent.dir.clone();
    let proxy = Proxy::haproxy_with(
        dual_stack_listener(),
        server.local_addr().expect("addr"),
        &dir,
        1,
        &[],
    );

    // By pid and fd.
    let (mut client, mut up, fds) = connect(&proxy, &server);
    let (ok, out, err) = agent.pair(proxy.child.id(), fds);
    assert!(
        ok,
        "pairing an IPv4-mapped socket with an IPv4 one failed: {err}"
    );
    eprintln!("{}", out.trim());
    const N: u64 = 64 << 20;
    let (sent, got) = half_close(&mut client, &mut up, N, 11);
    assert_eq!(sent, got, "client -> server through the mapped pair");
    let st = status(&agent);
    let (held, stripped) = (
        st["agent"]["fins_held"].as_u64().unwrap_or(0),
        st["agent"]["fins_stripped"].as_u64().unwrap_or(0),
    );
    eprintln!("FIN hold: {held} bare FINs held, {stripped} taken off data");
    assert!(
        held + stripped > 0,
        "the FIN hold never acted on the IPv4-mapped socket's FIN (its key did not match)"
    );
    // While the server's side is open the pair is listed still (it ends,
    // and leaves `zc stats`, once both ways have ended).
    assert!(
        kernel_bytes(&agent) >= N,
        "the kernel did not carry the bytes: {}",
        kernel_bytes(&agent)
    );
    let back = send_n(&mut up, 1 << 20, 12);
    up.shutdown(std::net::Shutdown::Write)
        .expect("server shutdown");
    assert_eq!(back, read_n(&mut client, 1 << 20), "server -> client");

    // By tuple, the mapped socket named as `ss -tn` prints it.
    let (mut client, mut up, _) = connect(&proxy, &server);
    let mapped = format!(
        "[::ffff:127.0.0.1]:{}-[::ffff:127.0.0.1]:{}",
        proxy.port,
        client.local_addr().expect("addr").port()
    );
    let upstream = format!(
        "{}-{}",
        up.peer_addr().expect("peer"),
        up.local_addr().expect("local")
    );
    let (ok, out, err) = agent.zc(&["pair", &mapped, &upstream]);
    assert!(
        ok,
        "pairing {mapped} with {upstream} by tuple failed: {err}"
    );
    eprintln!("{}", out.trim());
    let before = kernel_bytes(&agent);
    let sent = send_n(&mut client, 1 << 20, 13);
    assert_eq!(read_n(&mut up, 1 << 20), sent, "client -> server by tuple");
    assert!(
        kernel_bytes(&agent) >= before + (1 << 20),
        "the tuple pair did not carry the bytes in the kernel"
    );
}
