//! `zc relay` as a user runs it: a process that relays, then stops on
//! SIGTERM and leaves nothing loaded behind.
mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener},
};

use common::process::{RelayProcess, accept_upstream, zc_command};

fn loaded_zc_programs() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("zc_")))
        .map(|p| p.id())
        .collect()
}

/// The ids of the BPF programs process `pid` holds a descriptor of (its
/// fdinfo names them): other zc instances on the host do not count.
fn programs_held_by(pid: u32) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("the relay's fdinfo")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Tests that start a BPF relay run one at a time, so each relay's
/// programs are its own to count.
static BPF_RELAYS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn relay_process_relays_then_stops_on_sigterm_leaving_no_programs() {
    let _one_at_a_time = BPF_RELAYS.lock().unwrap_or_else(|p| p.into_inner());
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs `zc relay --mode bpf` and needs root; run `cargo xtask test` as root"
    );
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut relay = RelayProcess::start(
        server.local_addr().expect("addr"),
        &["--mode", "bpf", "--shutdown-grace", "1"],
        &[],
        false,
    );
    let mut client = relay.connect();
    let mut s = accept_upstream(&server);
    let held = programs_held_by(relay.child.id());
    let zc: Vec<u32> = loaded_zc_programs()
        .into_iter()
        .filter(|id| held.contains(id))
        .collect();
    assert_eq!(
        zc.len(),
        4,
        "a running relay has its four programs loaded (two verdicts, parser, sk_msg): {held:?}"
    );
    client
        .write_all(b"hello through the kernel")
        .expect("write");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read");
    assert_eq!(got, "hello through the kernel");
    drop(s);
    let (ok, log) = relay.stop();
    assert!(ok, "zc relay did not exit cleanly: {log}");
    assert!(
        log.contains("mode bpf"),
        "the start line names the mode: {log}"
    );
    let left: Vec<u32> = loaded_zc_programs()
        .into_iter()
        .filter(|id| zc.contains(id))
        .collect();
    assert!(
        left.is_empty(),
        "programs left loaded after the relay stopped: {left:?}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/zc").exists(),
        "the relay pinned objects under /sys/fs/bpf/zc"
    );
}

#[test]
fn forced_bpf_mode_without_privilege_fails_with_a_reason() {
    // Drop every capability with setpriv (util-linux) and run as nobody.
    let out = zc_command(true)
        .args([
            "relay",
            "--mode",
            "bpf",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .output()
        .expect("setpriv is needed (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "zc relay --mode bpf ran without privilege"
    );
    assert!(
        err.contains("BPF mode is unavailable") && err.contains("CAP_BPF"),
        "unclear error: {err}"
    );
}

#[test]
fn killing_a_bpf_relay_mid_stream_resets_both_ends() {
    let _one_at_a_time = BPF_RELAYS.lock().unwrap_or_else(|p| p.into_inner());
    killed_mid_stream_resets_both_ends("bpf");
}

#[test]
fn killing_a_splice_relay_mid_stream_resets_both_ends() {
    killed_mid_stream_resets_both_ends("splice");
}

#[test]
fn killing_a_copy_relay_mid_stream_resets_both_ends() {
    killed_mid_stream_resets_both_ends("copy");
}

/// `kill -9` of a relay mid-stream: both ends see a reset, never a clean
/// end of a stream that was cut.
fn killed_mid_stream_resets_both_ends(mode: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs `zc relay --mode {mode}`, which needs root for bpf; run `cargo xtask test` as root"
    );
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut relay = RelayProcess::start(
        server.local_addr().expect("addr"),
        &["--mode", mode],
        &[],
        false,
    );
    let client = relay.connect();
    let mut up = accept_upstream(&server);
    let mut writer = client.try_clone().expect("clone");
    // The client sends until the connection fails; it must fail.
    let sender = std::thread::spawn(move || {
        let buf = vec![7u8; 64 << 10];
        let mut sent = 0u64;
        loop {
            match writer.write(&buf) {
                Ok(n) => sent += n as u64,
                Err(e) => return (sent, e),
            }
        }
    });
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    let mut killed = false;
    let end = loop {
        match up.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got += n as u64,
            Err(e) => break Err(e),
        }
        if !killed && got >= 8 << 20 {
            relay.child.kill().expect("kill -9");
            relay.child.wait().expect("wait");
            killed = true;
        }
    };
    let err = end.expect_err("the server saw a clean EOF of a cut stream");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "the server's read failed, but not with a reset: {err}"
    );
    let (sent, client_err) = sender.join().expect("sender");
    assert!(
        matches!(
            client_err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "the client's write failed with {client_err}, not a reset"
    );
    eprintln!("{mode}: server got {got} bytes, client sent {sent}, then both saw resets");
    drop(client);
}

/// Habits from other proxies: `:PORT` to listen on every address, the
/// upstream by name, sizes with units.
#[test]
fn listen_without_a_host_an_upstream_by_name_and_sizes_with_units() {
    // Where the relay will connect: the first address `localhost` has.
    let first = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 0))
        .expect("resolving localhost")
        .next()
        .expect("localhost has an address");
    let server = TcpListener::bind(first).expect("bind");
    let upstream = format!("localhost:{}", server.local_addr().expect("addr").port());
    let mut relay = RelayProcess::start_at(
        ":0",
        &upstream,
        &["--mode", "copy", "--buffer", "64KiB", "--window", "4m"],
        &[],
        false,
    );
    assert!(
        relay.listen.ip().is_unspecified(),
        "`:0` listens on every address: {}",
        relay.listen
    );
    let mut client = std::net::TcpStream::connect(("127.0.0.1", relay.listen.port()))
        .expect("connecting through 127.0.0.1");
    let mut s = accept_upstream(&server);
    client.write_all(b"by name").expect("write");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read");
    assert_eq!(got, "by name");
    drop((client, s));
    let (ok, log) = relay.stop();
    assert!(ok, "zc relay did not exit cleanly: {log}");
    // The access log: one info line per connection.
    assert!(
        log.lines().any(|l| l.contains(" INFO ")
            && l.contains(&format!("-> {}", server.local_addr().expect("addr")))
            && l.contains("7 bytes up, 0 down")
            && l.contains("copy, closed")),
        "no access log line for the connection: {log}"
    );

    let out = zc_command(false)
        .args([
            "relay",
            "--listen",
            ":0",
            "--upstream",
            &upstream,
            "--window",
            "4x",
        ])
        .output()
        .expect("running zc");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error exits 2: {stderr}"
    );
    assert!(stderr.contains("not a size"), "{stderr}");
}
