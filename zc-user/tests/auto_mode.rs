//! `--mode auto` picks BPF only where it works, and says why otherwise.
mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener},
};

use common::process::{RelayProcess, accept_upstream, zc_command};

/// Relays one message through `relay` to `server` and checks it.
fn relay_once(relay: &RelayProcess, server: &TcpListener) {
    let mut c = relay.connect();
    let mut s = accept_upstream(server);
    c.write_all(b"through whatever path was chosen")
        .expect("write");
    c.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read");
    assert_eq!(got, "through whatever path was chosen");
    s.write_all(b"and back").expect("write");
    drop(s);
    let mut back = String::new();
    c.read_to_string(&mut back).expect("read");
    assert_eq!(back, "and back");
}

/// Runs a relay with `args`/`env`, relays one exchange through it, stops
/// it, and returns its log.
fn relay_log(args: &[&str], env: &[(&str, &str)], unprivileged: bool) -> String {
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut relay =
        RelayProcess::start(server.local_addr().expect("addr"), args, env, unprivileged);
    relay_once(&relay, &server);
    let (ok, log) = relay.stop();
    assert!(ok, "zc relay did not exit cleanly: {log}");
    log
}

fn must_be_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests start zc with and without privilege and need root; run `cargo xtask test` as root"
    );
}

#[test]
fn auto_mode_with_privilege_chooses_bpf() {
    must_be_root();
    let log = relay_log(&[], &[], false);
    assert!(
        log.contains("mode bpf (auto: "),
        "auto mode did not choose bpf: {log}"
    );
}

#[test]
fn auto_mode_without_capabilities_chooses_splice_and_says_why() {
    must_be_root();
    let log = relay_log(&[], &[], true);
    assert!(
        log.contains("mode splice (auto: BPF unavailable"),
        "expected splice with a reason: {log}"
    );
    assert!(
        log.contains("CAP_BPF"),
        "the reason should name the missing privilege: {log}"
    );
}

#[test]
fn auto_mode_refuses_bpf_when_the_self_test_sees_damage() {
    must_be_root();
    for fault in ["corrupt", "stall"] {
        let log = relay_log(&[], &[(zc_user::probe::FAULT_ENV, fault)], false);
        assert!(
            log.contains("mode splice (auto: BPF unavailable (the kernel's redirect path failed its self-test"),
            "a {fault}ed self-test must rule BPF out: {log}"
        );
    }
}

#[test]
fn forced_splice_and_copy_relay_as_asked() {
    must_be_root();
    for mode in ["splice", "copy"] {
        let log = relay_log(&["--mode", mode], &[], false);
        assert!(log.contains(&format!("mode {mode} (forced)")), "{log}");
    }
}

#[test]
fn status_reports_the_choice_as_text_and_json() {
    must_be_root();
    let run = |unprivileged: bool, json: bool| {
        let mut cmd = zc_command(unprivileged);
        cmd.arg("status");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("zc status");
        assert!(
            out.status.success(),
            "zc status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: serde_json::Value =
        serde_json::from_str(&run(false, true)).expect("status --json is JSON");
    assert_eq!(v["mode"], "bpf");
    assert!(v["bpf_unavailable"].is_null());
    let v: serde_json::Value =
        serde_json::from_str(&run(true, true)).expect("status --json is JSON");
    assert_eq!(v["mode"], "splice");
    assert!(
        v["bpf_unavailable"]
            .as_str()
            .is_some_and(|r| r.contains("CAP_BPF")),
        "{v}"
    );
    let text = run(true, false);
    assert!(
        text.contains("mode:   splice") && text.contains("CAP_BPF"),
        "{text}"
    );
}
