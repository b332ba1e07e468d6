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

#[test]
fn relay_process_relays_then_stops_on_sigterm_leaving_no_programs() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs `zc relay --mode bpf` and needs root; run `cargo xtask test` as root"
    );
    assert!(
        loaded_zc_programs().is_empty(),
        "zc programs were already loaded before the test: {:?}",
        loaded_zc_programs()
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
    assert_eq!(
        loaded_zc_programs().len(),
        4,
        "a running relay has its four programs loaded (two verdicts, parser, sk_msg)"
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
    assert!(
        loaded_zc_programs().is_empty(),
        "programs left loaded after the relay stopped: {:?}",
        loaded_zc_programs()
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
