//! The systemd units in deploy/systemd: systemd-analyze accepts them as
//! they are, zc works under exactly the capabilities they grant (read from
//! the unit files, not copied here), and without any one of them it fails
//! saying what is missing.
//!
//! There is no systemd running the tests, so setpriv does what systemd
//! does with each unit: the agent runs as root with its bounding set cut
//! to the unit's `CapabilityBoundingSet` (a root process gets exactly its
//! bounding set at exec); the relay (`DynamicUser=yes`) runs as a user
//! other than root with the unit's `AmbientCapabilities`. Both with
//! `NoNewPrivileges`.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
};

use common::{
    agent::{Agent, Proxy, exchange, through_proxy},
    process::{RelayProcess, accept_upstream},
};

const AGENT: &str = "zc-agent.service";
const RELAY: &str = "zc-relay@.service";

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn unit(name: &str) -> String {
    let path = unit_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every value of `key=` in the unit, split at whitespace, in order (the
/// way systemd merges capability and address-family lines).
fn directive(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

/// The unit's one value of `key`, or a panic naming the unit.
fn single(text: &str, key: &str, name: &str) -> String {
    let v = directive(text, key);
    assert_eq!(v.len(), 1, "{name}: expected one {key}=, found {v:?}");
    v[0].clone()
}

/// `CapabilityBoundingSet` as setpriv spells it (`-all,+bpf,...`), less
/// `without`.
fn setpriv_caps(caps: &[String], without: Option<&str>) -> String {
    let mut s = String::from("-all");
    for cap in caps.iter().filter(|c| Some(c.as_str()) != without) {
        let name = cap
            .strip_prefix("CAP_")
            .unwrap_or_else(|| panic!("`{cap}` is not a capability name"));
        s.push_str(",+");
        s.push_str(&name.to_ascii_lowercase());
    }
    s
}

fn must_be_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests load BPF and change credentials with setpriv; run `cargo xtask test` as root"
    );
}

/// The capability bits a process holds (CapEff in /proc/PID/status).
fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff");
    u64::from_str_radix(hex.trim(), 16).expect("CapEff is hex")
}

/// The same set as bits, as `capsh --decode` would read them.
fn cap_bits(caps: &[String]) -> u64 {
    caps.iter()
        .map(|c| {
            let n = match c.as_str() {
                "CAP_CHOWN" => 0,
                "CAP_FOWNER" => 3,
                "CAP_SETGID" => 6,
                "CAP_SETUID" => 7,
                "CAP_NET_BIND_SERVICE" => 10,
                "CAP_NET_ADMIN" => 12,
                "CAP_SYS_PTRACE" => 19,
                "CAP_SYS_ADMIN" => 21,
                "CAP_SYS_RESOURCE" => 24,
                "CAP_PERFMON" => 38,
                "CAP_BPF" => 39,
                other => panic!("add {other}'s bit number to cap_bits"),
            };
            1u64 << n
        })
        .fold(0, |a, b| a | b)
}

/// `systemd-analyze verify` on `units` (file names in `dir`); fails on any
/// message, since verify exits 0 after "ignoring" a key it cannot parse.
fn verify(dir: &Path, units: &[&str]) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units.iter().map(|u| dir.join(u)))
        .output()
        .expect("systemd-analyze (package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("({}) {said}", out.status))
    }
}

/// The units with ExecStart pointing at the built zc (verify checks the
/// command is executable; /usr/bin/zc exists only once installed).
fn units_for_verify(dir: &Path) {
    std::fs::create_dir_all(dir).expect("temp dir");
    let zc = env!("CARGO_BIN_EXE_zc");
    for name in [AGENT, RELAY] {
        let text = unit(name);
        assert!(
            text.contains("ExecStart=/usr/bin/zc "),
            "{name}: ExecStart should run /usr/bin/zc (what the package installs)"
        );
        std::fs::write(
            dir.join(name),
            text.replace("=/usr/bin/zc ", &format!("={zc} ")),
        )
        .expect("writing the unit copy");
    }
}

#[test]
fn systemd_analyze_verify_accepts_both_units_and_catches_a_broken_one() {
    let dir = std::env::temp_dir().join(format!("zc-units-{}", std::process::id()));
    units_for_verify(&dir);
    // The template, and an instance of it (%i expanded).
    let verdict = verify(&dir, &[AGENT, RELAY, "zc-relay@web.service"]);
    // The check is worth something only if it fails on a broken unit: a
    // misspelt key and a bad value, each of which verify only warns about.
    let broken: Vec<(&str, Result<(), String>)> = [
        ("NoNewPrivileges=", "NoNewPrivilege="),
        ("ProtectSystem=strict", "ProtectSystem=very"),
    ]
    .into_iter()
    .map(|(from, to)| {
        std::fs::write(dir.join("broken.service"), unit(AGENT).replace(from, to))
            .expect("writing the broken unit");
        (to, verify(&dir, &["broken.service"]))
    })
    .collect();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = verdict {
        panic!("systemd-analyze verify found problems in deploy/systemd: {e}");
    }
    for (to, v) in broken {
        assert!(v.is_err(), "verify did not catch `{to}` in a unit");
    }
}

/// `zc` under setpriv as systemd starts `unit`'s ExecStart, less `without`.
fn as_the_relay_unit(without: Option<&str>) -> Command {
    let text = unit(RELAY);
    let caps = directive(&text, "CapabilityBoundingSet");
    assert_eq!(
        directive(&text, "AmbientCapabilities"),
        caps,
        "{RELAY}: the relay runs as a user of its own, so it holds only its ambient \
         capabilities; they should equal the bounding set"
    );
    assert_eq!(single(&text, "DynamicUser", RELAY), "yes");
    assert_eq!(single(&text, "NoNewPrivileges", RELAY), "yes");
    let set = setpriv_caps(&caps, without);
    let mut cmd = Command::new("setpriv");
    // nobody stands for the unit's dynamic user: neither is root.
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg("--no-new-privs")
        .arg(env!("CARGO_BIN_EXE_zc"));
    cmd
}

/// The relay unit's ExecStart arguments with `$ZC_RELAY_ARGS` replaced.
fn relay_args(zc_relay_args: &[&str]) -> Vec<String> {
    let exec = directive(&unit(RELAY), "ExecStart");
    assert_eq!(
        exec[..3],
        ["/usr/bin/zc", "relay", "$ZC_RELAY_ARGS"],
        "{RELAY}: ExecStart changed; this test runs what it runs"
    );
    zc_relay_args.iter().map(|a| a.to_string()).collect()
}

fn metric(addr: SocketAddr, series: &str) -> f64 {
    let mut s = TcpStream::connect(addr).expect("connecting to the metrics port");
    s.set_read_timeout(Some(common::HANG)).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: zc\r\n\r\n").expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    reply
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{series}` in:\n{reply}"))
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn a_relay_with_only_its_units_capabilities_moves_bytes_through_the_kernel() {
    must_be_root();
    let caps = directive(&unit(RELAY), "CapabilityBoundingSet");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream = server.local_addr().expect("addr").to_string();
    let args = relay_args(&["--mode", "bpf", "--metrics", "127.0.0.1:0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = RelayProcess::start_command(
        as_the_relay_unit(None),
        "127.0.0.1:0",
        &upstream,
        &args,
        &[],
    );
    // setpriv execs zc: the pid is the relay's own.
    assert_eq!(
        effective_caps(relay.child.id()),
        cap_bits(&caps),
        "the relay should hold exactly {caps:?}"
    );
    let line = relay.wait_for_log("metrics on http://");
    let metrics: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"));

    let mut client = relay.connect();
    let mut up = accept_upstream(&server);
    // Under the relay's window (8 MiB), so no direction is held and moved
    // through user space: the kernel carries every byte.
    const N: u64 = 4 << 20;
    exchange(&mut client, &mut up, N);
    client.shutdown(Shutdown::Write).expect("shutdown");
    up.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    up.read_to_end(&mut rest).expect("the relay's EOF upstream");
    client
        .read_to_end(&mut rest)
        .expect("the relay's EOF to the client");
    assert!(rest.is_empty(), "bytes after the exchange: {}", rest.len());
    let access = relay.wait_for_log(" bytes up, ");
    assert!(
        access.contains(&format!("{N} bytes up, {N} down")) && access.contains(", bpf"),
        "{access}"
    );
    let kernel = metric(metrics, "zc_kernel_redirected_bytes_total");
    assert!(
        kernel >= (2 * N) as f64,
        "the BPF counters saw {kernel} bytes of the {} relayed: the kernel did not carry them",
        2 * N
    );
    let (ok, log) = relay.stop();
    assert!(ok, "the relay did not stop cleanly: {log}");
    assert!(log.contains("mode bpf (forced)"), "{log}");
}

#[test]
fn a_relay_missing_any_capability_of_its_unit_refuses_bpf_and_says_why() {
    must_be_root();
    let caps = directive(&unit(RELAY), "CapabilityBoundingSet");
    for cap in &caps {
        // What the kernel refuses first without it.
        let refused = match cap.as_str() {
            "CAP_BPF" | "CAP_NET_ADMIN" => "failed to create map",
            "CAP_PERFMON" => "cannot use helper bpf_probe_read",
            other => panic!("{RELAY} grants {other}: say here what fails without it"),
        };
        let out = as_the_relay_unit(Some(cap))
            .args(["relay", "--mode", "bpf", "--listen", "127.0.0.1:0"])
            .args(["--upstream", "127.0.0.1:9"])
            .output()
            .expect("setpriv (util-linux)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the relay ran without {cap}: {err}");
        assert!(
            err.contains("BPF mode is unavailable") && err.contains(refused) && err.contains(cap),
            "without {cap}: expected `{refused}` and the capability named, got: {err}"
        );
    }
}

/// setpriv arguments that start the agent as its unit does, less
/// `without`: root, bounding set cut to the unit's.
fn as_the_agent_unit(without: Option<&str>) -> Vec<String> {
    let text = unit(AGENT);
    assert!(
        directive(&text, "User").is_empty() && directive(&text, "DynamicUser").is_empty(),
        "{AGENT} runs as root; this test assumes so"
    );
    assert_eq!(single(&text, "NoNewPrivileges", AGENT), "yes");
    let caps = directive(&text, "CapabilityBoundingSet");
    vec![
        "setpriv".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set={}", setpriv_caps(&caps, without)),
        "--no-new-privs".into(),
    ]
}

fn start_agent(tag: &str, without: Option<&str>) -> Agent {
    let wrap = as_the_agent_unit(without);
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    Agent::start_wrapped(tag, &wrap, &[])
}

/// HAProxy run by root with every capability, as a system proxy is: the
/// agent, holding fewer, needs CAP_SYS_PTRACE to take its sockets.
fn haproxy(agent: &Agent, server: &TcpListener) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    Proxy::haproxy_on(listener, server.local_addr().expect("addr"), &agent.dir, 1)
}

#[test]
fn the_agent_with_only_its_units_capabilities_answers_status_and_pairs_a_root_proxy() {
    must_be_root();
    let caps = directive(&unit(AGENT), "CapabilityBoundingSet");
    let agent = start_agent("unit-caps", None);
    let pid = agent.child.as_ref().expect("agent").id();
    assert_eq!(
        effective_caps(pid),
        cap_bits(&caps),
        "the agent should hold exactly {caps:?}"
    );
    let (ok, out, err) = agent.zc(&["status", "--json"]);
    assert!(ok, "zc status failed: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    let a = &status["agent"];
    assert_eq!(a["data_path"], "bpf", "{status}");
    assert!(
        a["pid_pairing"].is_null() && a["tuple_pairing"].is_null(),
        "{status}"
    );

    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = haproxy(&agent, &server);
    let (mut client, mut up, fds) = through_proxy(&proxy, &server);
    let (ok, out, err) = agent.pair(proxy.child.id(), fds);
    assert!(ok, "zc pair failed under the unit's capabilities: {err}");
    assert!(out.starts_with("pair 1: "), "{out}");
    const N: u64 = 16 << 20;
    exchange(&mut client, &mut up, N);
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats --json");
    assert_eq!(stats["pairs"][0]["bytes"][0], N, "{stats}");
    assert_eq!(stats["pairs"][0]["bytes"][1], N, "{stats}");
}

#[test]
fn the_agent_missing_any_capability_of_its_unit_cannot_pair_and_says_why() {
    must_be_root();
    let caps = directive(&unit(AGENT), "CapabilityBoundingSet");
    for cap in &caps {
        let says: &[&str] = match cap.as_str() {
            "CAP_BPF" | "CAP_NET_ADMIN" => &["needs BPF", "failed to create map", cap],
            "CAP_PERFMON" => &["needs BPF", "cannot use helper bpf_probe_read", cap],
            "CAP_SYS_PTRACE" => &["may not take fds from pid", "Operation not permitted", cap],
            other => panic!("{AGENT} grants {other}: say here what fails without it"),
        };
        let tag = format!("unit-no-{}", cap.to_ascii_lowercase().replace('_', "-"));
        let agent = start_agent(&tag, Some(cap));
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let proxy = haproxy(&agent, &server);
        let (_client, _up, fds) = through_proxy(&proxy, &server);
        let (ok, _, err) = agent.pair(proxy.child.id(), fds);
        assert!(!ok, "the agent paired without {cap}");
        assert!(
            says.iter().all(|s| err.contains(s)),
            "without {cap}: expected {says:?} in: {err}"
        );
        assert!(agent.pairs().is_empty(), "a refused pairing left a pair");
    }
}
