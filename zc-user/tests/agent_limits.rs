//! Limits and bad input (issue 11): answers larger than one control
//! message, descriptors sent with refused requests, an agent out of
//! descriptors, and `--record`'s files.
mod common;

use std::{
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd},
        unix::fs::PermissionsExt as _,
    },
    path::Path,
    sync::Arc,
    time::Duration,
};

use common::agent::{Agent, MEMBER_GROUP, become_member, cpu_secs};
use zc_user::agent::{
    MAX_CONNS_PER_UID,
    client::hand_off,
    control,
    proto::{ErrorKind, Response},
};

fn agent_pid(agent: &Agent) -> u32 {
    agent.child.as_ref().expect("agent running").id()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's /proc/PID/fd")
        .count()
}

/// 2,000 pairs make the answers to `zc stats` and `zc list` about 270 KB
/// and 250 KB, past the 212,992 bytes one control message could carry.
#[test]
fn read_commands_answer_with_thousands_of_pairs() {
    common::init();
    const PAIRS: usize = 2000;
    let agent = Agent::start("limits-many");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = listener.local_addr().expect("listener address");
    // Our ends of each pair's two connections, kept open so the pairs stay.
    let mut ours = Vec::with_capacity(2 * PAIRS);
    for i in 0..PAIRS {
        let mut accepted = Vec::with_capacity(2);
        for _ in 0..2 {
            ours.push(TcpStream::connect(addr).expect("connect"));
            accepted.push(listener.accept().expect("accept").0);
        }
        let b = accepted.pop().expect("second");
        let a = accepted.pop().expect("first");
        hand_off(&agent.socket, a, b).unwrap_or_else(|e| panic!("handoff {i}: {e:#}"));
    }
    let (ok, out, err) = agent.zc(&["list", "--json"]);
    assert!(ok, "zc list --json failed with {PAIRS} pairs: {err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).expect("zc list --json");
    println!(
        "zc list --json: {} pairs, {} bytes",
        listed.len(),
        out.len()
    );
    assert_eq!(listed.len(), PAIRS);

    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats --json failed with {PAIRS} pairs: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("zc stats --json");
    let n = stats["pairs"].as_array().map_or(0, Vec::len);
    println!("zc stats --json: {n} pairs, {} bytes", out.len());
    assert_eq!(n, PAIRS);

    for args in [&["list"][..], &["stats"], &["status"]] {
        let (ok, out, err) = agent.zc(args);
        assert!(ok, "zc {args:?} failed with {PAIRS} pairs: {err}");
        println!("zc {args:?}: {} lines", out.lines().count());
    }
}

/// Three descriptors where a handoff takes two used to truncate the
/// control data, and the two that did arrive were never closed.
#[test]
fn descriptors_sent_with_refused_requests_are_all_closed() {
    common::init();
    const REQUESTS: usize = 300;
    let agent = Agent::start("limits-fds");
    let pid = agent_pid(&agent);
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let s = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
    let fd = s.as_fd();
    let before = open_fds(pid);
    for i in 0..REQUESTS {
        for (body, fds, says) in [
            (
                &br#"{"op":"handoff"}"#[..],
                [fd; 3].to_vec(),
                "exactly two sockets",
            ),
            (br#"{"op":"list"}"#, [fd; 3].to_vec(), "only a handoff"),
            (br#"not json"#, [fd; 2].to_vec(), ""),
            (&[b' '; 5000], [fd; 2].to_vec(), "larger than"),
        ] {
            let fds: Vec<BorrowedFd<'_>> = fds;
            let resp = control::call_with_fds(&agent.socket, body, &fds)
                .unwrap_or_else(|e| panic!("request {i} got no answer: {e:#}"));
            let text = format!("{resp:?}");
            assert!(
                text.contains("Error") && text.contains(says),
                "request {i}: expected a refusal saying `{says}`: {text}"
            );
        }
    }
    let after = open_fds(pid);
    println!(
        "agent fds: {before} before, {after} after {} refused requests carrying {} descriptors",
        4 * REQUESTS,
        10 * REQUESTS
    );
    assert!(
        after <= before + 8,
        "the agent kept descriptors it was sent: {before} -> {after}"
    );
}

/// A member of the agent's group opens more control connections than its
/// share: the extra ones are answered "busy" and closed, and root is
/// still served.
#[test]
fn a_member_holds_at_most_its_share_of_control_connections() {
    common::init();
    const EXTRA: usize = 4;
    let agent = Agent::start_with("limits-conns", &["--group", MEMBER_GROUP]);
    let socket = agent.socket.clone();
    let conns = std::thread::spawn(move || {
        become_member();
        (0..MAX_CONNS_PER_UID + EXTRA)
            .map(|i| {
                control::connect_control(&socket)
                    .unwrap_or_else(|e| panic!("member connection {i}: {e:#}"))
            })
            .collect::<Vec<_>>()
    })
    .join()
    .expect("the member's thread");
    let (mut served, mut busy) = (0, 0);
    for (i, c) in conns.iter().enumerate() {
        match control::call_on(c.as_fd(), br#"{"op":"list"}"#, &[])
            .unwrap_or_else(|e| panic!("member connection {i} got no answer: {e:#}"))
        {
            Response::Pairs { .. } => served += 1,
            Response::Error {
                kind: ErrorKind::Busy,
                message,
            } => {
                busy += 1;
                if busy == 1 {
                    println!("connection {i}: {message}");
                }
            }
            other => panic!("member connection {i}: {other:?}"),
        }
    }
    println!("member: {served} connections served, {busy} turned away");
    assert_eq!((served, busy), (MAX_CONNS_PER_UID, EXTRA));
    let (ok, _, err) = agent.zc(&["list"]);
    assert!(
        ok,
        "root was not served beside a member at its share: {err}"
    );
}

/// A member past its share that sends its request at once, before the
/// agent turned it away, still reads why: the agent reads that request
/// before it closes, as a Unix socket closed with an unread message
/// resets its peer, and that reset is read before the queued answer.
#[test]
fn a_turned_away_request_sent_at_once_reads_its_refusal() {
    common::init();
    const EXTRA: usize = 20;
    let agent = Agent::start_with("limits-race", &["--group", MEMBER_GROUP]);
    let socket = agent.socket.clone();
    let answers = std::thread::spawn(move || {
        become_member();
        let held: Vec<_> = (0..MAX_CONNS_PER_UID)
            .map(|i| {
                control::connect_control(&socket)
                    .unwrap_or_else(|e| panic!("member connection {i}: {e:#}"))
            })
            .collect();
        let answers: Vec<String> = (0..EXTRA)
            .map(|i| {
                let c = control::connect_control(&socket)
                    .unwrap_or_else(|e| panic!("extra connection {i}: {e:#}"));
                let req = br#"{"op":"list"}"#;
                // EPIPE if the agent closed first: nothing to race then.
                let _ = nix::sys::socket::send(
                    c.as_raw_fd(),
                    req,
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                );
                // The agent's close is the event: then the answer, if
                // any, is queued, and a reset would be pending.
                let mut pfd = [nix::poll::PollFd::new(
                    c.as_fd(),
                    nix::poll::PollFlags::empty(),
                )];
                nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(10_000u16))
                    .unwrap_or_else(|e| panic!("extra connection {i}: poll: {e}"));
                let mut buf = vec![0u8; control::REPLY_CHUNK];
                match nix::sys::socket::recv(
                    c.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                    Err(e) => format!("recv: {e}"),
                }
            })
            .collect();
        drop(held);
        answers
    })
    .join()
    .expect("the member's thread");
    let refused = answers
        .iter()
        .filter(|a| a.contains("close one first"))
        .count();
    println!(
        "{refused} of {EXTRA} requests sent at once read their refusal; first: {}",
        answers[0]
    );
    let other: Vec<_> = answers
        .iter()
        .filter(|a| !a.contains("close one first"))
        .collect();
    assert!(
        other.is_empty(),
        "turned-away requests read no refusal: {other:?}"
    );
}

/// 1,000 or more refused requests write at most 10 refusal lines a second to the
/// agent's log, and say how many they left out.
#[test]
fn repeated_refusals_are_logged_at_most_ten_a_second() {
    common::init();
    const REQUESTS: usize = 1000;
    let dir = std::env::temp_dir().join(format!("zc-limits-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let log = dir.join("agent.log");
    // The agent's stderr (its log) into a file: sh execs zc in its place.
    let script = format!("exec \"$0\" \"$@\" 2>{}", log.display());
    let agent = Agent::start_wrapped("limits-log", &["sh", "-c", &script], &[]);
    let started = std::time::Instant::now();
    // Past one second, so that a line is logged in a second second and
    // says what the first left out.
    let mut i = 0;
    while i < REQUESTS || started.elapsed() < Duration::from_millis(1200) {
        i += 1;
        let resp = control::call_raw(&agent.socket, br#"{"op":"unpair","id":999}"#)
            .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        assert!(format!("{resp:?}").contains("no pair 999"), "{resp:?}");
    }
    let secs = started.elapsed().as_secs_f64();
    // The last refusal is answered after it is logged (or left out).
    let text = std::fs::read_to_string(&log).expect("agent log");
    let refused = text.matches("refused: no pair 999").count();
    let left_out = text.contains("more refused request(s) not logged");
    println!("{i} refusals in {secs:.2} s: {refused} logged, left-out note: {left_out}");
    assert!(
        refused as f64 <= 10.0 * (secs.ceil() + 1.0),
        "{refused} refusal lines in {secs:.2} s"
    );
    assert!(left_out, "the log does not say lines were left out");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sets the agent's soft open-file limit (prlimit(2) on another process).
fn set_fd_limit(pid: u32, soft: u64) {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: plain values in, no old value out.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        r,
        0,
        "prlimit on the agent: {}",
        std::io::Error::last_os_error()
    );
}

/// Out of descriptors, accept(2) fails while the connection stays queued,
/// so an agent that retries at once spins a CPU.
#[test]
fn an_agent_out_of_descriptors_backs_off_and_recovers() {
    common::init();
    let agent = Agent::start("limits-accept");
    let pid = agent_pid(&agent);
    let (ok, _, err) = agent.zc(&["status"]);
    assert!(ok, "zc status: {err}");
    set_fd_limit(pid, open_fds(pid) as u64);
    // Queued in the listen backlog; every accept of it fails with EMFILE.
    let _waiting = control::connect_control(&agent.socket).expect("connect");
    let cpu = cpu_secs(pid);
    // A measuring window, not a wait for an event: the CPU the agent
    // spends while its accepts fail.
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_secs(pid) - cpu;
    println!("agent CPU over 2 s of failing accepts: {spent:.2} s");
    assert!(
        spent < 0.2,
        "the agent spun on failing accepts: {spent:.2} s of CPU in 2 s"
    );
    set_fd_limit(pid, 4096);
    let (ok, out, err) = agent.zc(&["status"]);
    assert!(ok, "zc status after the limit was raised again: {err}");
    println!(
        "zc status after recovery: {}",
        out.lines().next().unwrap_or("")
    );
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// One connection through a splice relay recording into `dir`; returns
/// the digests (client to upstream, upstream to client).
async fn record_one(dir: &Path, seed: u64) -> (common::Digest, common::Digest) {
    use zc_user::engine::{
        Engine,
        splice::{PipePool, Recorder, SpliceEngine},
    };
    let rec = Arc::new(Recorder::new(dir.to_path_buf()).expect("recorder"));
    let pool = Arc::new(PipePool::new(8, 1 << 20));
    let engine = Engine::Splice(SpliceEngine::new(pool).with_recorder(rec));
    let (server, mut reports) = common::exchange_server("127.0.0.1:0", 1 << 20, 64 << 10).await;
    let relay = common::TestRelay::start(engine, server).await;
    let s = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    let (sent, got) = common::exchange(s, 1 << 20, 64 << 10, seed).await;
    let (srv_sent, srv_got) = reports.recv().await.expect("server report");
    assert_eq!(srv_got, sent);
    assert_eq!(got, srv_sent);
    relay.stop().await;
    (sent, srv_sent)
}

fn digest_of(p: &Path) -> common::Digest {
    let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&data);
    common::Digest {
        bytes: data.len() as u64,
        hash: h.digest(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_are_new_private_files_that_never_follow_a_link() {
    common::init();
    let dir = std::env::temp_dir().join(format!("zc-limits-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("recording dir");
    let target = dir.join("victim");
    std::fs::write(&target, b"planted").expect("victim");
    // Where the first connection's second file would go.
    std::os::unix::fs::symlink(&target, dir.join("000001-upstream-to-client")).expect("symlink");

    let first = record_one(&dir, 1).await;
    let victim = std::fs::read(&target).expect("victim");
    assert!(
        victim == b"planted",
        "the recording wrote through the planted link: the target now holds {} bytes",
        victim.len()
    );
    assert!(
        !dir.join("000001-client-to-upstream").exists(),
        "number 1 was half taken; its free half must not be left behind"
    );
    let names = ["client-to-upstream", "upstream-to-client"];
    for (name, want) in names.iter().zip([first.0, first.1]) {
        let p = dir.join(format!("000002-{name}"));
        assert_eq!(digest_of(&p), want, "{} differs", p.display());
        assert_eq!(mode_of(&p), 0o600, "{} is not 0600", p.display());
    }

    // A second run (a new recorder starts counting at 1 again) must not
    // overwrite the first run's files.
    let second = record_one(&dir, 2).await;
    for (name, want) in names.iter().zip([first.0, first.1]) {
        let p = dir.join(format!("000002-{name}"));
        assert_eq!(
            digest_of(&p),
            want,
            "the second run overwrote {}",
            p.display()
        );
    }
    for (name, want) in names.iter().zip([second.0, second.1]) {
        let p = dir.join(format!("000003-{name}"));
        assert_eq!(digest_of(&p), want, "{} differs", p.display());
        assert_eq!(mode_of(&p), 0o600, "{} is not 0600", p.display());
    }
    println!(
        "planted link untouched; recordings at 000002 and 000003, 0600: {:?}",
        std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
