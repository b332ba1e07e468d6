//! `zc agent --metrics`: what Prometheus scrapes from the agent, checked
//! by promtool and against a known transfer through a real pair.
mod common;

use std::net::{SocketAddr, TcpStream};

use common::{
    agent::{Agent, Holder, exchange},
    scrape::{get, promtool_accepts, value},
};
use zc_user::agent::{
    control,
    proto::{Request, Response},
};

const BYTES: u64 = 4 << 20;

/// The address the agent bound for `--metrics`, as it reports it.
pub fn metrics_addr(agent: &Agent) -> SocketAddr {
    match control::call(&agent.socket, &Request::Status).expect("asking the agent") {
        Response::Status(s) => s
            .metrics
            .expect("the agent reports its metrics address")
            .parse()
            .expect("an address"),
        other => panic!("not a status: {other:?}"),
    }
}

const KERNEL_UP: &str = "zc_agent_bytes_total{direction=\"first_to_second\",path=\"kernel\"}";
const KERNEL_DOWN: &str = "zc_agent_bytes_total{direction=\"second_to_first\",path=\"kernel\"}";

#[test]
fn agent_metrics_count_a_real_pair_and_its_bytes_and_promtool_accepts_them() {
    let agent = Agent::start_with("metrics", &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&agent);

    let (head, body) = get(addr, "/healthz");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok\n");

    let (_, before) = get(addr, "/metrics");
    promtool_accepts(&before);
    assert_eq!(value(&before, "zc_agent_pairs_open"), 0.0);
    assert_eq!(value(&before, KERNEL_UP), 0.0);
    assert_eq!(
        value(
            &before,
            "zc_agent_data_path_info{path=\"bpf\",reason=\"bpf_loaded\"}"
        ),
        1.0
    );

    let mut socat = Holder::socat(&[]);
    // A request the agent refuses is counted as such.
    let (ok, _, _) = agent.pair(socat.pid(), [socat.fds[0], 999]);
    assert!(!ok, "fd 999 of socat was paired");
    let (ok, out, err) = agent.pair(socat.pid(), socat.fds);
    assert!(ok, "pairing socat failed: {out}{err}");
    let [a, b] = &mut socat.ends;
    exchange(a, b, BYTES);

    let (head, text) = get(addr, "/metrics");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    promtool_accepts(&text);
    assert_eq!(value(&text, "zc_agent_pairs_open"), 1.0);
    assert_eq!(value(&text, "zc_agent_pairs_total{source=\"paired\"}"), 1.0);
    assert_eq!(
        value(&text, "zc_agent_pair_requests_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "zc_agent_pair_requests_total{result=\"refused\"}"),
        1.0
    );
    // Every byte went through the kernel, one way and the other.
    assert_eq!(value(&text, KERNEL_UP), BYTES as f64, "{text}");
    assert_eq!(value(&text, KERNEL_DOWN), BYTES as f64, "{text}");
    assert_eq!(value(&text, "zc_agent_redirect_failures_total"), 0.0);
    // Both readers took everything: nothing waits in the kernel.
    assert_eq!(value(&text, "zc_agent_kernel_backlog_bytes"), 0.0);
    // The pair's two sockets are in PEERS.
    assert_eq!(value(&text, "zc_agent_map_entries{map=\"PEERS\"}"), 2.0);
    assert!(value(&text, "zc_agent_map_capacity{map=\"PEERS\"}") >= 2.0);
    println!("{text}");

    // The pair ends (both ends close); its bytes stay counted.
    drop(socat);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let after = loop {
        let (_, t) = get(addr, "/metrics");
        if value(&t, "zc_agent_pairs_open") == 0.0 {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pair did not end:\n{t}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    promtool_accepts(&after);
    assert_eq!(value(&after, KERNEL_UP), BYTES as f64, "{after}");
    assert_eq!(value(&after, KERNEL_DOWN), BYTES as f64, "{after}");
}

/// A connected loopback TCP pair owned by this process.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    for x in [&c, &s] {
        x.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("timeout");
    }
    (c, s)
}

#[test]
fn a_splice_agent_counts_handed_over_bytes_as_spliced_and_says_why() {
    let agent = Agent::start_with(
        "metrics-splice",
        &["--data-path", "splice", "--metrics", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&agent);
    let (mut client, a) = tcp_pair();
    let (b, mut server) = tcp_pair();
    zc_user::agent::client::hand_off(&agent.socket, a, b).expect("the agent takes the sockets");
    exchange(&mut client, &mut server, BYTES);

    let (_, text) = get(addr, "/metrics");
    promtool_accepts(&text);
    for (series, v) in [
        (
            "zc_agent_data_path_info{path=\"splice\",reason=\"forced\"}",
            1.0,
        ),
        ("zc_agent_feature_enabled{feature=\"pid_pairing\"}", 0.0),
        ("zc_agent_pairs_open", 1.0),
        (
            "zc_agent_bytes_total{direction=\"first_to_second\",path=\"splice\"}",
            BYTES as f64,
        ),
        (
            "zc_agent_bytes_total{direction=\"second_to_first\",path=\"splice\"}",
            BYTES as f64,
        ),
        (KERNEL_UP, 0.0),
        ("zc_agent_pair_requests_total{result=\"ok\"}", 1.0),
    ] {
        assert_eq!(value(&text, series), v, "{series}:\n{text}");
    }
}
