//! The short-circuit must not break the host (issue 11): it needs a cgroup
//! of its own, refuses the root and any cgroup holding the agent, attaches
//! nothing when it refuses, and while it carries a pair in its cgroup,
//! everything beside it (zc relay in every mode, HAProxy splicing, a
//! FIONREAD-based client, a client in the cgroup talking to a server out
//! of it) delivers every byte.
mod common;

use std::{
    io::BufRead as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{agent::*, process::*};

/// `examples/fionread_peer` as `what` (see there), in `cgroup` or, with
/// `None`, outside it; stdout piped.
fn spawn_peer(cgroup: Option<&TestCgroup>, what: &str) -> Child {
    let exe = example("fionread_peer");
    let enter = cgroup
        .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.path.display()))
        .unwrap_or_default();
    Command::new("sh")
        .arg("-c")
        .arg(format!("{enter}exec {} {what}", exe.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh")
}

/// The first stdout line of `child` that starts with `prefix`, without it.
fn line_from(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().expect("stdout");
    let mut r = std::io::BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).expect("fionread_peer's stdout");
        assert!(n > 0, "fionread_peer ended before printing `{prefix}`");
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim_end().to_string();
        }
    }
}

fn local_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// `n` bytes each way through `zc relay --mode MODE` to a server of ours;
/// returns the relay's log.
fn through_relay(mode: &str, n: u64) -> String {
    let (server, upstream) = local_listener();
    // A stall of the adaptive path was seen here once (CI, read timeout
    // with 16 MiB each way): its debug log says where a direction stood.
    let debug = [("RUST_LOG", "info,zc_user::engine=debug")];
    let mut relay = RelayProcess::start(upstream, &["--mode", mode], &debug, false);
    let mut c = relay.connect();
    let mut up = accept_upstream(&server);
    exchange(&mut c, &mut up, n);
    drop((c, up));
    let (_, log) = relay.stop();
    // Its access line says how long the connection took and, in bpf
    // mode, what went through user space.
    let access = log.lines().find(|l| l.contains(" bytes up, "));
    eprintln!(
        "zc relay --mode {mode}: {n} bytes each way intact; {}",
        access.unwrap_or("no access line")
    );
    log
}

/// HAProxy forced to splice both ways: one long stream and many short
/// connections, every byte checked.
fn through_haproxy_splice(dir: &Path, n: u64, short: u32) {
    let started = Instant::now();
    let (server, upstream) = local_listener();
    let (front, addr) = local_listener();
    let _proxy = Proxy::haproxy_with(
        front,
        upstream,
        dir,
        1,
        &["option splice-request", "option splice-response"],
    );
    let connect = || {
        let c = TcpStream::connect(addr).expect("connect to HAProxy");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        c
    };
    let mut c = connect();
    let mut up = accept_upstream(&server);
    exchange(&mut c, &mut up, n);
    drop((c, up));
    for _ in 0..short {
        let mut c = connect();
        let mut up = accept_upstream(&server);
        exchange(&mut c, &mut up, 64 << 10);
    }
    eprintln!(
        "HAProxy splicing: {n} bytes each way and {short} short connections intact in {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

/// A FIONREAD client of ours reading `n` bytes from a server of ours,
/// both outside the cgroup.
fn fionread_outside(n: u64) {
    fionread_client(None, n);
    eprintln!("FIONREAD client outside the cgroup: {n} bytes intact");
}

/// A FIONREAD client in the cgroup reading from a server outside it: only
/// one end is in the cgroup, so neither may join the sockhash.
fn fionread_from_cgroup_to_outside(cgroup: &TestCgroup, n: u64) {
    fionread_client(Some(cgroup), n);
    eprintln!("FIONREAD client in the cgroup, server outside: {n} bytes intact");
}

/// `examples/fionread_peer` reading `n` bytes from a server of ours
/// outside the cgroup; it must get exactly what was sent.
fn fionread_client(cgroup: Option<&TestCgroup>, n: u64) {
    let (server, addr) = local_listener();
    let mut client = spawn_peer(cgroup, &format!("fionread {addr} {n}"));
    let (mut s, _) = server.accept().expect("accept the FIONREAD client");
    let sent = send_n(&mut s, n, 6);
    let got = line_from(&mut client, "digest ");
    assert!(
        client.wait().expect("fionread_peer").success(),
        "the FIONREAD client failed"
    );
    assert_eq!(
        got,
        format!("{} {:x}", sent.bytes, sent.hash),
        "the FIONREAD client (in the cgroup: {}) got other bytes",
        cgroup.is_some()
    );
}

fn stats(agent: &Agent) -> serde_json::Value {
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    serde_json::from_str(&out).expect("stats json")
}

/// While the short-circuit carries an echo in its cgroup, everything
/// beside it delivers every byte, and auto mode's self-test still passes.
#[test]
fn the_short_circuit_in_its_cgroup_leaves_every_other_program_intact() {
    let cgroup = TestCgroup::new("scsafe");
    let agent = Agent::start_short_circuit("scsafe", &cgroup);
    const SIZE: u64 = 64 << 20;
    let input = agent.dir.join("in");
    let echoed = agent.dir.join("echoed");
    pattern_file(&input, SIZE, 7);
    let mut echo = spawn_peer(Some(&cgroup), "echo");
    let port = line_from(&mut echo, "port ");
    let mut client = cgroup.spawn(&format!(
        "socat -b 262144 OPEN:{}!!CREATE:{} TCP:127.0.0.1:{port}",
        input.display(),
        echoed.display()
    ));

    // Beside it, outside the cgroup.
    for mode in ["splice", "copy", "bpf"] {
        through_relay(mode, 16 << 20);
    }
    let log = through_relay("auto", 16 << 20);
    let start = log
        .lines()
        .find(|l| l.contains("zc relay: mode"))
        .unwrap_or_default()
        .to_string();
    eprintln!("auto: {start}");
    assert!(
        start.contains("zc relay: mode bpf"),
        "auto mode did not choose bpf (its self-test failed?):\n{log}"
    );
    through_haproxy_splice(&agent.dir, 64 << 20, 200);
    fionread_outside(16 << 20);
    fionread_from_cgroup_to_outside(&cgroup, 16 << 20);

    let st = client.wait().expect("client");
    assert!(st.success(), "the socat client failed: {st}");
    let _ = echo.kill();
    let _ = echo.wait();
    let digest = |p: &Path| {
        let data = std::fs::read(p).expect("read file");
        (data.len(), xxhash_rust::xxh3::xxh3_64(&data))
    };
    assert_eq!(
        digest(&input),
        digest(&echoed),
        "the echo in the cgroup differs"
    );
    let stats = stats(&agent);
    let sc = &stats["short_circuit"];
    eprintln!("short-circuit: {sc}");
    assert!(
        sc["bytes"].as_u64().unwrap_or(0) >= SIZE,
        "the short-circuit carried less than one direction's {SIZE} bytes: {stats}"
    );
    // The echo is the only same-host pair with both ends in the cgroup.
    assert_eq!(
        sc["connections"].as_u64(),
        Some(1),
        "a connection other than the echo was short-circuited: {stats}"
    );
}

/// Runs `zc agent ARGS` expecting a refusal; returns (exit code, stderr)
/// and checks that nothing was pinned or served.
fn refused(tag: &str, wrap_in: Option<&TestCgroup>, args: &[&str]) -> (Option<i32>, String) {
    let id = format!("{tag}-{}", std::process::id());
    let pin = format!("/sys/fs/bpf/zc-test-{id}");
    let sock = std::env::temp_dir().join(format!("zc-sc-refused-{id}.sock"));
    let zc = env!("CARGO_BIN_EXE_zc");
    let mut full = vec![
        "agent".to_string(),
        "--pin-dir".into(),
        pin.clone(),
        "--socket".into(),
        sock.display().to_string(),
    ];
    full.extend(args.iter().map(|s| s.to_string()));
    // An agent that accepts serves until killed: `timeout` ends it, and
    // the checks below then fail.
    let out = match wrap_in {
        None => Command::new("timeout")
            .arg("20")
            .arg(zc)
            .args(&full)
            .output(),
        Some(cg) => Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec timeout 20 {zc} {}",
                cg.path.display(),
                full.join(" ")
            ))
            .output(),
    }
    .expect("run zc agent");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "zc agent {}: {:?}\n{err}",
        args.join(" "),
        out.status.code()
    );
    assert!(
        !out.status.success(),
        "zc agent {args:?} was not refused:\n{err}"
    );
    assert!(!Path::new(&pin).exists(), "a refused agent pinned {pin}");
    assert!(!sock.exists(), "a refused agent served {}", sock.display());
    let lock = zc_user::agent::lock::socket_lock(&sock);
    assert!(
        !lock.exists(),
        "a refused agent left its lock file {}",
        lock.display()
    );
    (out.status.code(), err)
}

/// The root cgroup holds every process on the host: refused, as is a
/// short-circuit with no cgroup named, and a cgroup that holds the agent.
#[test]
fn the_short_circuit_refuses_the_root_cgroup_and_attaches_nothing() {
    let root = zc_user::host::cgroup2_root().expect("cgroup2");
    let (code, err) = refused("scroot", None, &["--short-circuit"]);
    assert_eq!(code, Some(2), "a usage error: {err}");
    assert!(err.contains("--cgroup"), "{err}");

    let (_, err) = refused(
        "scroot",
        None,
        &["--short-circuit", "--cgroup", root.to_str().expect("utf-8")],
    );
    assert!(err.contains("refuses the root cgroup"), "{err}");

    let cgroup = TestCgroup::new("scself");
    let (_, err) = refused(
        "scself",
        Some(&cgroup),
        &[
            "--short-circuit",
            "--cgroup",
            cgroup.path.to_str().expect("utf-8"),
        ],
    );
    assert!(err.contains("it holds the agent"), "{err}");
}
