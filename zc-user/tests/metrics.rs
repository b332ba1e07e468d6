//! `zc relay --metrics`: what Prometheus scrapes, checked by promtool and
//! by the numbers a known transfer must show.
mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener},
    process::{Command, Stdio},
};

use common::{
    process::{RelayProcess, accept_upstream},
    scrape::{get, promtool_accepts, value},
};

const BYTES: usize = 8 << 20;

#[test]
fn a_bpf_relay_serves_metrics_promtool_accepts_with_the_bytes_it_moved() {
    let (mut relay, server, addr) = relay_with_metrics("bpf");
    let (head, body) = get(addr, "/healthz");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok\n");
    let (head, _) = get(addr, "/nothing");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    let line = move_bytes(&mut relay, &server);
    let (head, text) = get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    promtool_accepts(&text);
    assert_eq!(value(&text, "zc_relay_info{mode=\"bpf\"}"), 1.0);
    assert_eq!(
        value(&text, "zc_relay_connections_total{result=\"closed\"}"),
        1.0
    );
    assert_eq!(value(&text, "zc_relay_connections_open"), 0.0);
    assert_eq!(value(&text, "zc_relay_bytes_total"), BYTES as f64);
    let kernel = value(&text, "zc_kernel_redirected_bytes_total");
    assert!(
        kernel >= BYTES as f64,
        "the kernel carried the transfer: {kernel} of {BYTES} bytes"
    );
    // What user space moved (a held direction's bytes) is what the
    // connection's access line says; none if it was never held.
    let by_user = line
        .split("; ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .map_or(0.0, |n| n.parse::<f64>().unwrap_or(f64::NAN));
    assert_eq!(
        value(&text, "zc_relay_user_space_bytes_total"),
        by_user,
        "against the access line `{line}`"
    );
    // And a real Prometheus server scrapes it and stores what it says.
    let scraped = Prometheus::scraping(addr).query("zc_relay_bytes_total");
    assert_eq!(
        scraped, BYTES as f64,
        "what Prometheus stored from the relay"
    );
    let (ok, log) = relay.stop();
    assert!(ok, "zc relay did not exit cleanly: {log}");
}

/// In copy mode every byte goes through the relay: the user-space count
/// is the whole transfer and the kernel's is nothing.
#[test]
fn a_copy_relay_counts_every_byte_as_moved_in_user_space() {
    let (mut relay, server, addr) = relay_with_metrics("copy");
    move_bytes(&mut relay, &server);
    let (_, text) = get(addr, "/metrics");
    promtool_accepts(&text);
    assert_eq!(value(&text, "zc_relay_info{mode=\"copy\"}"), 1.0);
    assert_eq!(value(&text, "zc_relay_bytes_total"), BYTES as f64);
    assert_eq!(
        value(&text, "zc_relay_user_space_bytes_total"),
        BYTES as f64
    );
    assert_eq!(value(&text, "zc_kernel_redirected_bytes_total"), 0.0);
    let (ok, log) = relay.stop();
    assert!(ok, "zc relay did not exit cleanly: {log}");
}

/// A client that does not read leaves bytes in the relay's sockets: the
/// socket memory gauge shows them, and falls back once the client has
/// read them and the connection has ended.
#[test]
fn the_socket_memory_gauge_shows_what_waits_for_a_client_that_does_not_read() {
    let (mut relay, server, addr) = relay_with_metrics("copy");
    let mut client = relay.connect();
    let mut up = accept_upstream(&server);
    let writer = std::thread::spawn(move || {
        up.write_all(&vec![9u8; BYTES]).expect("write");
        up.shutdown(Shutdown::Write).expect("shutdown");
        up
    });
    // The relay reads what the server sends and cannot pass it on.
    let held = gauge_until(addr, |b| b >= (1 << 20) as f64);
    let mut got = Vec::new();
    client.read_to_end(&mut got).expect("read");
    assert_eq!(got.len(), BYTES, "bytes lost");
    drop((client, writer.join().expect("writer")));
    relay.wait_for_log(" bytes up, ");
    let after = gauge_until(addr, |b| b < (64 << 10) as f64);
    eprintln!(
        "socket memory: {:.1} MiB while the client did not read, {after} bytes once it ended",
        held / f64::from(1 << 20)
    );
    let (ok, log) = relay.stop();
    assert!(ok, "zc relay did not exit cleanly: {log}");
}

/// Scrapes `zc_relay_socket_memory_bytes` until `done` holds for it (the
/// relay's sockets change as the kernel moves bytes; nothing signals it),
/// at most 10 s; returns the value.
fn gauge_until(addr: SocketAddr, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, text) = get(addr, "/metrics");
        let v = value(&text, "zc_relay_socket_memory_bytes");
        if done(v) {
            promtool_accepts(&text);
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "zc_relay_socket_memory_bytes stayed at {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `zc relay --mode MODE --metrics` in front of a listener; its metrics
/// address.
fn relay_with_metrics(mode: &str) -> (RelayProcess, TcpListener, SocketAddr) {
    assert!(
        mode != "bpf" || nix::unistd::geteuid().is_root(),
        "this test runs `zc relay --mode bpf` and needs root; run `cargo xtask test` as root"
    );
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut relay = RelayProcess::start(
        server.local_addr().expect("addr"),
        &["--mode", mode, "--metrics", "127.0.0.1:0"],
        &[],
        false,
    );
    let line = relay.wait_for_log("metrics on http://");
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"));
    (relay, server, addr)
}

/// Sends BYTES through the relay to `server`, checks they all arrived and
/// both ends closed, and returns the connection's access line.
fn move_bytes(relay: &mut RelayProcess, server: &TcpListener) -> String {
    let mut client = relay.connect();
    let mut s = accept_upstream(server);
    let data = vec![7u8; BYTES];
    let writer = std::thread::spawn(move || {
        client.write_all(&data).expect("write");
        client.shutdown(Shutdown::Write).expect("shutdown");
        client
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read");
    assert_eq!(got.len(), BYTES);
    drop(s);
    let mut client = writer.join().expect("writer");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("the relay's EOF");
    drop(client);
    // The access line comes when the relay has counted the connection.
    relay.wait_for_log(" bytes up, ")
}

/// A Prometheus server (Debian's package) scraping one target every
/// second, listening on a port the kernel picked; killed when dropped.
struct Prometheus {
    child: std::process::Child,
    api: SocketAddr,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Prometheus {
    fn scraping(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("zc-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let dir = tempdir::Dir(dir);
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: zc\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("prometheus.yml");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "running prometheus (Debian's prometheus package; `cargo xtask test` installs it)",
            );
        let api = SocketAddr::from((
            [127, 0, 0, 1],
            common::process::listening_port(child.id(), "prometheus"),
        ));
        Self {
            child,
            api,
            _dir: dir,
        }
    }

    /// The value of `query` once Prometheus has one (it scrapes every
    /// second; the first scrape comes when it is ready).
    fn query(&self, query: &str) -> f64 {
        let deadline = std::time::Instant::now() + common::HANG;
        loop {
            let (head, body) = get(self.api, &format!("/api/v1/query?query={query}"));
            if head.starts_with("HTTP/1.1 200") {
                let v: serde_json::Value = serde_json::from_str(&body).expect("API JSON");
                if let Some(x) = v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                {
                    return x;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "prometheus never stored {query}: {head}\n{body}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
