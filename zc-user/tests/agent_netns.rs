//! A proxy in a network namespace of its own (a container, a pod), paired
//! by pid and fd by an agent in the host's: the kernel carries its bytes,
//! and the FIN hold, attached in the proxy's namespace for the purpose,
//! keeps a FIN behind the bytes queued before it.
mod common;

use std::{
    io::Read,
    net::{Shutdown, TcpListener, TcpStream},
};

use common::agent::{
    Agent, Proxy, exchange, read_n, read_to_eof, send_n, through_proxy, through_proxy_from,
};
use common::netns::Netns;

impl Netns {
    /// HAProxy in the namespace, relaying a client there to a server
    /// there: (proxy, client, server side, the proxy's two fds).
    fn proxy(&self, agent: &Agent) -> (Proxy, TcpStream, TcpStream, [i32; 2]) {
        self.run(|| {
            let server = TcpListener::bind("127.0.0.1:0").expect("bind the server");
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
            let proxy =
                Proxy::haproxy_on(listener, server.local_addr().expect("addr"), &agent.dir, 1);
            let (client, up, fds) = through_proxy(&proxy, &server);
            (proxy, client, up, fds)
        })
    }
}

impl Netns {
    /// HAProxy in the namespace between a client and a server there, all
    /// on `ports` (server, proxy, proxy's source, client's source) or, for
    /// `None`, on ports the namespace's kernel picks (returned).
    fn twin_proxy(
        &self,
        agent: &Agent,
        ports: Option<[u16; 4]>,
    ) -> (Proxy, TcpStream, TcpStream, [i32; 2], [u16; 4]) {
        self.run(|| {
            let port = |i: usize| ports.map_or(0, |p| p[i]);
            let bind = |p: u16| {
                TcpListener::bind(("127.0.0.1", p))
                    .unwrap_or_else(|e| panic!("binding 127.0.0.1:{p}: {e}"))
            };
            // A small receive buffer (the host's tcp_rmem lets one grow to
            // 32 MiB): what the server does not read stays in the kernel,
            // and the last phase's FIN comes while bytes still wait.
            let server = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            server.set_recv_buffer_size(1 << 20).expect("SO_RCVBUF");
            server
                .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port(0))).into())
                .expect("binding the server");
            server.listen(8).expect("listen");
            let server: TcpListener = server.into();
            let listener = bind(port(1));
            // Source ports: picked by binding and closing at once; nothing
            // else runs in this namespace to take them meanwhile.
            let free = |i: usize| match ports {
                Some(p) => p[i],
                None => bind(0).local_addr().expect("addr").port(),
            };
            let (source, client_port) = (free(2), free(3));
            let picked = [
                server.local_addr().expect("addr").port(),
                listener.local_addr().expect("addr").port(),
                source,
                client_port,
            ];
            let proxy = Proxy::haproxy_with(
                listener,
                server.local_addr().expect("addr"),
                &agent.dir,
                1,
                &[&format!("source 127.0.0.1:{source}")],
            );
            let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            client.set_reuse_address(true).expect("SO_REUSEADDR");
            let at =
                |p: u16| socket2::SockAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], p)));
            client.bind(&at(client_port)).expect("binding the client");
            client
                .connect(&at(picked[1]))
                .expect("connecting to the proxy");
            let (client, up, fds) = through_proxy_from(&proxy, &server, client.into());
            (proxy, client, up, fds, picked)
        })
    }
}

/// Sends `n` bytes of pattern `seed` and shuts the write side (its FIN
/// follows the last bytes), on a thread of its own so that the reader
/// may start only after.
fn send_then_fin(client: &TcpStream, n: u64, seed: u64) -> zc_user::traffic::Digest {
    let mut c = client.try_clone().expect("clone");
    std::thread::spawn(move || {
        let d = send_n(&mut c, n, seed);
        c.shutdown(Shutdown::Write).expect("client shutdown");
        d
    })
    .join()
    .expect("sender")
}

#[test]
fn a_proxy_in_another_network_namespace_is_paired_and_its_fin_held() {
    common::init();
    let pod = Netns::new("pod");
    let agent = Agent::start("netns");
    let (proxy, mut client, mut up, fds) = pod.proxy(&agent);
    let (ok, _, err) = agent.pair(proxy.child.id(), fds);
    assert!(ok, "pairing the proxy's sockets failed: {err}");

    // The client writes everything and shuts down while the server reads
    // nothing: its bytes wait in the kernel's redirect queue when its FIN
    // reaches the proxy, which passes the FIN on at once.
    const N: u64 = 64 << 20;
    const M: u64 = 8 << 20;
    let sent = send_then_fin(&client, N, 7);
    assert_eq!(
        read_to_eof(&mut up),
        sent,
        "client -> server through the pod's proxy"
    );

    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    assert_eq!(
        stats["pairs"][0]["bytes"][0], N,
        "the kernel did not carry the client's bytes: {stats}"
    );
    let (ok, out, err) = agent.zc(&["status", "--json"]);
    assert!(ok, "zc status failed: {err}");
    let st: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let count = |k: &str| st["agent"][k].as_u64().unwrap_or(0);
    assert!(
        count("fins_held") + count("fins_stripped") > 0,
        "the FIN hold never acted in the proxy's namespace: {st}"
    );

    let back = send_n(&mut up, M, 8);
    up.shutdown(Shutdown::Write).expect("server shutdown");
    assert_eq!(read_n(&mut client, M), back, "server -> client");
    let mut rest = [0u8; 1];
    assert_eq!(
        client.read(&mut rest).expect("read"),
        0,
        "EOF after the answer"
    );
}

/// Pairing by 4-tuple names the proxy's namespace, by a pid in it or by
/// its file: the tuples are not connections in the agent's namespace
/// (refused, nothing changed), and with `--netns` they are found and the
/// kernel carries the bytes.
#[test]
fn a_pod_proxy_is_paired_by_tuple_naming_its_namespace() {
    common::init();
    let pod = Netns::new("tuple");
    let agent = Agent::start("netns-tuple");
    let (proxy, mut client, mut up, _) = pod.proxy(&agent);
    // The proxy's sockets, as `ss -tn` in the pod prints them.
    let tuple = |s: &TcpStream| {
        format!(
            "{}-{}",
            s.peer_addr().expect("peer"),
            s.local_addr().expect("local")
        )
    };
    let (a, b) = (tuple(&client), tuple(&up));
    let (ok, _, err) = agent.zc(&["pair", &a, &b]);
    assert!(
        !ok && err.contains("not an established connection in the agent's network namespace"),
        "pairing without --netns: {err}"
    );
    assert!(agent.pairs().is_empty(), "a refused pairing left a pair");

    let pid = proxy.child.id().to_string();
    let path = pod.path().display().to_string();
    const N: u64 = 16 << 20;
    for (id, netns) in [(1, path.as_str()), (2, pid.as_str())] {
        let (ok, _, err) = agent.zc(&["pair", "--netns", netns, &a, &b]);
        assert!(ok, "pairing by tuple with --netns {netns} failed: {err}");
        exchange(&mut client, &mut up, N);
        let (ok, out, err) = agent.zc(&["stats", "--json"]);
        assert!(ok, "zc stats failed: {err}");
        let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
        assert_eq!(stats["pairs"][0]["id"], id, "{stats}");
        assert_eq!(
            stats["pairs"][0]["bytes"],
            serde_json::json!([N, N]),
            "the kernel did not carry the bytes (--netns {netns}): {stats}"
        );
        let (ok, _, err) = agent.zc(&["unpair", &id.to_string()]);
        assert!(ok, "unpair failed: {err}");
    }
}

/// An agent holding only the capabilities of zc-agent.service (no
/// CAP_SYS_ADMIN) cannot enter the pod's namespace to attach the hold:
/// it refuses the pairing, saying so, rather than pair the proxy without
/// the hold, and the proxy keeps relaying on its own.
#[test]
fn without_cap_sys_admin_a_pod_proxy_is_refused_not_paired_unguarded() {
    common::init();
    let pod = Netns::new("nosysadmin");
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/zc-agent.service"),
    )
    .expect("reading zc-agent.service");
    let caps: Vec<String> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .flat_map(|v| v.split_whitespace())
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(
        !caps.is_empty() && !caps.iter().any(|c| c == ",+sys_admin"),
        "zc-agent.service: expected a bounding set without CAP_SYS_ADMIN, found {caps:?}"
    );
    let bounding = format!("--bounding-set=-all{}", caps.concat());
    let agent = Agent::start_wrapped(
        "nosysadmin",
        &["setpriv", "--inh-caps=-all", &bounding, "--no-new-privs"],
        &[],
    );
    let (proxy, mut client, mut up, fds) = pod.proxy(&agent);
    let (ok, _, err) = agent.pair(proxy.child.id(), fds);
    assert!(
        !ok,
        "the agent paired a pod's proxy without being able to hold its FIN"
    );
    assert!(
        err.contains("CAP_SYS_ADMIN") && err.contains("network namespace"),
        "the refusal does not say why: {err}"
    );
    assert!(agent.pairs().is_empty(), "a refused pairing left a pair");
    // The proxy still has its sockets and relays.
    let sent = send_n(&mut client, 1 << 20, 9);
    assert_eq!(
        read_n(&mut up, 1 << 20),
        sent,
        "the proxy relays after the refusal"
    );
}

/// Two pods hold connections with the very same 4-tuples: proxy, server
/// and client on the same ports of their own loopbacks, a sidecar's usual
/// lot. Keys name the namespace, so both pairs live side by side, one
/// paired by pid and fd and the other by tuple: the kernel carries each
/// pod's bytes to its own server, every byte ahead of its client's FIN.
#[test]
fn two_pods_with_the_same_four_tuples_are_paired_side_by_side() {
    common::init();
    let agent = Agent::start("netns-twins");
    let pods = [Netns::new("twin-a"), Netns::new("twin-b")];
    let (proxy_a, client_a, up_a, fds_a, ports) = pods[0].twin_proxy(&agent, None);
    let (proxy_b, client_b, up_b, _, same) = pods[1].twin_proxy(&agent, Some(ports));
    assert_eq!(ports, same);
    let tuple = |s: &TcpStream| {
        format!(
            "{}-{}",
            s.peer_addr().expect("peer"),
            s.local_addr().expect("local")
        )
    };
    assert_eq!(
        (tuple(&client_a), tuple(&up_a)),
        (tuple(&client_b), tuple(&up_b)),
        "the pods' connections differ"
    );
    let (ok, _, err) = agent.pair(proxy_a.child.id(), fds_a);
    assert!(ok, "pairing pod a's proxy by pid and fd failed: {err}");
    let path_b = pods[1].path().display().to_string();
    let (ok, _, err) = agent.zc(&["pair", "--netns", &path_b, &tuple(&client_b), &tuple(&up_b)]);
    assert!(ok, "pairing pod b's proxy by the same tuples failed: {err}");

    // Each pod's own bytes, told apart by their seeds, both ways and both
    // pods at once; then each client ends while its server has read
    // nothing, and every byte must arrive before the EOF.
    const N: u64 = 16 << 20;
    const M: u64 = 32 << 20;
    let run = |mut client: TcpStream, mut up: TcpStream, seed: u64| {
        std::thread::spawn(move || {
            let mut c = client.try_clone().expect("clone");
            let mut u = up.try_clone().expect("clone");
            let sent_up = std::thread::spawn(move || send_n(&mut c, N, seed));
            let sent_down = std::thread::spawn(move || send_n(&mut u, N, seed + 1));
            assert_eq!(
                read_n(&mut up, N),
                sent_up.join().expect("sender"),
                "seed {seed}: up"
            );
            assert_eq!(
                read_n(&mut client, N),
                sent_down.join().expect("sender"),
                "seed {seed}: down"
            );
            (client, up)
        })
    };
    let (a, b) = (run(client_a, up_a, 10), run(client_b, up_b, 20));
    let ends = [a.join().expect("pod a"), b.join().expect("pod b")];
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    for i in 0..2 {
        assert_eq!(
            stats["pairs"][i]["bytes"],
            serde_json::json!([N, N]),
            "the kernel did not carry pair {}'s bytes: {stats}",
            i + 1
        );
    }
    let held = || {
        let (ok, out, err) = agent.zc(&["status", "--json"]);
        assert!(ok, "zc status failed: {err}");
        let st: serde_json::Value = serde_json::from_str(&out).expect("status json");
        let count = |k: &str| st["agent"][k].as_u64().unwrap_or(0);
        count("fins_held") + count("fins_stripped")
    };
    for (i, (client, mut up)) in ends.into_iter().enumerate() {
        let before = held();
        let sent = send_then_fin(&client, M, 30 + i as u64);
        assert_eq!(
            read_to_eof(&mut up),
            sent,
            "pod {i}: the last bytes before the FIN"
        );
        // Whether the FIN had to wait depends on where the bytes were when
        // it came: the kernel may have moved them all into the upstream
        // socket's TCP write queue already (seen: 31 MB there, ahead of
        // the proxy's FIN), where nothing can overtake them.
        eprintln!("pod {i}: FIN hold acted {} time(s)", held() - before);
        drop(client.shutdown(Shutdown::Both));
    }
    drop((proxy_a, proxy_b));
}
