//! iperf3 through an unmodified proxy (socat from Debian, one process per
//! connection; HAProxy, one process), with the test's data connection
//! paired while iperf3 is running: by pid and fd beside socat, by tuple
//! beside HAProxy. iperf3's own counts must agree, the kernel must have
//! carried gigabytes, and the proxy must stop spending CPU on them.
mod common;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{agent::*, netns::Veth};

/// Seconds iperf3 sends for; the pairing happens about one second in.
const SECONDS: u32 = 4;

/// Bytes the kernel must carry in the 2 s the test watches, and iperf3's
/// server receive in all. Across the server's veth pair: 3.3-4.1 GB alone,
/// 1.57-2.26 GB beside two busy loops; a fallback to user space carries 0.
const FLOOR: u64 = 512 << 20;

#[test]
fn iperf3_through_socat_paired_by_pid_and_fd_while_running() {
    let agent = Agent::start("iperf3-socat");
    let server = Iperf3Server::start();
    let socat = Command::new("socat")
        .arg("TCP-LISTEN:0,bind=127.0.0.1,reuseaddr,fork")
        .arg(format!("TCP:{}", server.addr))
        .stdin(Stdio::null())
        .spawn()
        .expect("socat must be installed (cargo xtask test installs it)");
    let port = listening_port(socat.id(), "socat");
    let socat = Proxy {
        child: socat,
        port,
        log: None,
    };
    through_proxy_while_running(&agent, port, server.addr, |data, upstream| {
        // socat serves each connection in a child of its own.
        let hold = |local: SocketAddr, remote: SocketAddr| {
            let inode = inode_of(local, remote).expect("socket in /proc/net/tcp");
            zc_user::agent::find::holder_of(inode).expect("a process holds it")
        };
        let (pid, fd_a) = hold(data.0, data.1);
        let (pid_b, fd_b) = hold(upstream.0, upstream.1);
        assert_eq!(pid, pid_b, "one socat child holds both sockets");
        assert_ne!(
            pid as u32,
            socat.child.id(),
            "a forked child, not the listener"
        );
        let (ok, out, err) = agent.pair(pid as u32, [fd_a, fd_b]);
        assert!(ok, "zc pair --pid {pid} failed: {err}");
        (out, pid as u32)
    });
}

#[test]
fn iperf3_through_haproxy_paired_by_tuple_while_running() {
    let agent = Agent::start("iperf3-haproxy");
    let server = Iperf3Server::start();
    let haproxy = Proxy::haproxy(server.addr, &agent.dir);
    through_proxy_while_running(&agent, haproxy.port, server.addr, |data, upstream| {
        let tuple = |(l, r): (SocketAddr, SocketAddr)| format!("{l}-{r}");
        let (ok, out, err) = agent.zc(&["pair", &tuple(data), &tuple(upstream)]);
        assert!(ok, "zc pair by tuple failed: {err}");
        (out, haproxy.child.id())
    });
}

/// Runs iperf3's client through the proxy on `port`; about a second in,
/// `pair` is given the proxy's two sockets of the data connection (each
/// as local, remote) and returns what `zc pair` printed and the pid whose
/// CPU time must then stay flat.
fn through_proxy_while_running(
    agent: &Agent,
    port: u16,
    server: SocketAddr,
    pair: impl FnOnce((SocketAddr, SocketAddr), (SocketAddr, SocketAddr)) -> (String, u32),
) {
    // One iperf3 at a time: two would share this machine's CPUs.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let client = Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", &SECONDS.to_string(), "-J"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3 must be installed (cargo xtask test installs it)");
    let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    // The proxy's socket facing iperf3's data stream: of the two iperf3
    // connects (control, then data), the one whose bytes flow.
    let deadline = Instant::now() + Duration::from_secs(10);
    let data = loop {
        if let Some((received, client)) = busiest(&format!("sport = :{port}"), "bytes_received:", 3)
            && received > 1 << 20
        {
            break (lo(port), client);
        }
        assert!(
            Instant::now() < deadline,
            "iperf3's data connection never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_secs(1));
    let upstream = (busiest_to(server), server);
    let (out, proxy_pid) = pair(data, upstream);
    eprintln!("{}", out.trim());
    let cpu_paired = cpu_secs(proxy_pid);
    // While the pair lives, the kernel's counts for it.
    std::thread::sleep(Duration::from_secs(u64::from(SECONDS) - 2));
    let (ok, stats, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats json");
    let carried = stats["pairs"][0]["bytes"][0].as_u64().unwrap_or(0);
    let cpu_used = cpu_secs(proxy_pid) - cpu_paired;

    let out = client.wait_with_output().expect("iperf3 client");
    assert!(
        out.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J");
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "iperf3: sent {sent} bytes, the server received {received}; zc carried {carried} \
         by then; the proxy used {cpu_used:.2} s of CPU after pairing"
    );
    // Bytes still queued in the kernel when iperf3 stops counting are not
    // in `received` (a paired stream has no bound on that queue: see
    // README); the digest tests check every byte.
    assert!(
        received <= sent && received > FLOOR,
        "iperf3's server received {received} of {sent} bytes"
    );
    assert!(
        carried > FLOOR,
        "the pair carried only {carried} bytes in {} s: {stats}",
        SECONDS - 2
    );
    assert!(
        cpu_used < 0.2,
        "the proxy used {cpu_used:.2} s of CPU while the kernel carried {carried} bytes"
    );
}

/// `iperf3 -s` for one test, alone in a network namespace behind a veth
/// pair: iperf3 refuses port 0, and there its default port cannot be
/// anyone else's.
struct Iperf3Server {
    child: Child,
    addr: SocketAddr,
    _veth: Veth,
}

impl Iperf3Server {
    fn start() -> Self {
        let veth = Veth::new("iperf");
        let addr = SocketAddr::from((veth.ns_ip, 5201));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &veth.ns.name])
            .args(["iperf3", "-s", "-1", "-B", &veth.ns_ip.to_string()])
            .args(["-p", &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 must be installed (cargo xtask test installs it)");
        // `ip netns exec` execs iperf3 in its own process.
        let deadline = Instant::now() + Duration::from_secs(10);
        while common::process::listen_port_of(child.id()) != Some(addr.port()) {
            if let Some(status) = child.try_wait().expect("iperf3 -s status") {
                panic!("iperf3 -s exited ({status}) before listening on {addr}");
            }
            assert!(
                Instant::now() < deadline,
                "iperf3 -s did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            addr,
            _veth: veth,
        }
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The local address of the established socket to `server` that has sent
/// the most (from `ss -ti`): the proxy's upstream for the data stream,
/// not for iperf3's control connection.
fn busiest_to(server: SocketAddr) -> SocketAddr {
    busiest(&format!("dst {server}"), "bytes_acked:", 2)
        .map(|(_, local)| local)
        .unwrap_or_else(|| panic!("no established socket to {server}"))
}

/// Of the established sockets `ss` selects with `filter`, the one whose
/// `counter` (an `ss -i` field) is highest: that count and its address in
/// `column` (2 local, 3 remote).
fn busiest(filter: &str, counter: &str, column: usize) -> Option<(u64, SocketAddr)> {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(filter)
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut best: Option<(u64, SocketAddr)> = None;
    let mut addr = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            addr = line
                .split_whitespace()
                .nth(column)
                .and_then(|a| a.parse::<SocketAddr>().ok());
            continue;
        }
        let count = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(counter))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if let Some(a) = addr.take()
            && best.is_none_or(|(b, _)| count > b)
        {
            best = Some((count, a));
        }
    }
    best
}
