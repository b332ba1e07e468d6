//! How `zc agent` holds a proxy still while it pairs: never longer than
//! `--max-stop`, never for good (the agent stops it with ptrace, and the
//! kernel lets a dead tracer's tracees go), one request per proxy at a
//! time, and with the proxy's socket options as they were once its pair
//! ends. Every proxy is a real process (socat, HAProxy, perl) holding
//! connections to this test, watched from its own side in /proc.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::agent::*;
use nix::{
    sys::{
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use zc_user::traffic::Digest;

/// What the scheduler of this 2-vCPU VM may add to a stop on top of the
/// bound: the agent's timer firing late, this test's sampling.
const SLACK: Duration = Duration::from_millis(30);

/// The agent is killed (kill -9) while socat is stopped, eight times: each
/// time socat runs again at once and, in the end, has relayed every byte.
///
/// socat is kept from ever settling: the server does not read, so socat
/// sits in select(2) waiting for the server's socket to take more, with
/// bytes queued on the client's socket that it knows are readable; each
/// pair request stops it, steps it and lets it go again and again for
/// 3 s before it is refused. This test sees a stop in /proc, freezes the
/// agent (SIGSTOP), and kills it only if socat is still stopped then, so
/// every kill lands inside a stop.
#[test]
fn a_kill_9_of_the_agent_while_it_holds_the_proxy_never_leaves_the_proxy_stopped() {
    const ROUNDS: usize = 8;
    let mut agent = Agent::start("stop-kill");
    let mut socat = Holder::socat(&[]);
    let pid = socat.pid();
    const N: u64 = 64 << 20;
    let mut client = socat.ends[0].try_clone().expect("clone");
    let sent = std::thread::spawn(move || send_n(&mut client, N, 7));
    wait_holding(&socat);
    let mut kills = 0;
    for round in 0..ROUNDS {
        if round > 0 {
            agent.spawn();
            let pairs = agent.pairs();
            assert!(pairs.is_empty(), "a killed pairing left a pair: {pairs:?}");
        }
        let mut tries = 0;
        while !kill_inside_a_stop(&mut agent, pid, socat.fds) {
            tries += 1;
            assert!(
                tries < 5,
                "round {round}: no stop of socat seen in {tries} requests"
            );
        }
        let states = thread_states(pid);
        assert!(
            !states.is_empty() && !any_stopped(pid),
            "round {round}: the agent was killed while socat was stopped, and socat is still \
             stopped: {states:?}"
        );
        kills += 1;
    }
    eprintln!("{kills}/{ROUNDS} kills of the agent inside a stop; socat ran on after each");
    let got = read_n(&mut socat.ends[1], N);
    assert_eq!(
        sent.join().expect("sender"),
        got,
        "client -> server damaged"
    );
    socat.still_relays();
}

/// Waits until `socat` (a [`Holder`]) sits in select(2) with bytes queued
/// on its socket from the client: it stays so while the server does not
/// read, and every pairing attempt then finds it about to read.
fn wait_holding(socat: &Holder) {
    let pid = socat.pid();
    // Until then socat may still empty its buffer into a growing send
    // buffer, and a pairing caught at that moment succeeds (CI, once).
    wait_stuck(pid, socat.fds, false);
    let queued = || {
        let fd = take_fd(pid, socat.fds[0]);
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ writes one int.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        rc == 0 && n > 0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let call = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let in_select = call
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<i64>().ok())
            .is_some_and(|n| SELECTS.contains(&n));
        if in_select && queued() {
            return;
        }
        assert!(Instant::now() < deadline, "socat never filled up: {call}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(target_arch = "x86_64")]
const SELECTS: [i64; 4] = [
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_poll,
    libc::SYS_ppoll,
];
#[cfg(not(target_arch = "x86_64"))]
const SELECTS: [i64; 2] = [libc::SYS_pselect6, libc::SYS_ppoll];

/// Asks the agent to pair `fds` of `pid` and kills the agent (kill -9) at
/// a moment it holds `pid` stopped; false if the request ended first.
fn kill_inside_a_stop(agent: &mut Agent, pid: u32, fds: [i32; 2]) -> bool {
    let mut request = agent.pair_started(pid, fds);
    let agent_pid = Pid::from_raw(agent.child.as_ref().expect("agent").id() as i32);
    let killed = loop {
        if request.try_wait().expect("zc pair").is_some() {
            break false;
        }
        if !any_stopped(pid) {
            std::thread::yield_now();
            continue;
        }
        // Freeze the agent, so the stop cannot end on its own meanwhile.
        kill(agent_pid, Signal::SIGSTOP).expect("SIGSTOP the agent");
        assert_eq!(
            waitpid(agent_pid, Some(WaitPidFlag::WUNTRACED)).expect("waitpid"),
            WaitStatus::Stopped(agent_pid, Signal::SIGSTOP)
        );
        if any_stopped(pid) {
            agent.kill9();
            break true;
        }
        kill(agent_pid, Signal::SIGCONT).expect("SIGCONT the agent");
        assert_eq!(
            waitpid(agent_pid, Some(WaitPidFlag::WCONTINUED)).expect("waitpid"),
            WaitStatus::Continued(agent_pid)
        );
    };
    let _ = request.kill();
    let _ = request.wait();
    killed
}

/// A thread in uninterruptible sleep cannot be stopped. One thread of the
/// holder waits in vfork(2) for a child that never execs; its main thread
/// wakes every millisecond. The agent stops the main thread, gives up on
/// the other at the bound, refuses, and lets go of both: the main thread
/// was stopped no longer than `--max-stop`.
#[test]
fn a_proxy_is_held_still_no_longer_than_max_stop_even_when_a_thread_cannot_stop() {
    let max_stop = Duration::from_millis(20);
    let agent = Agent::start_with("stop-bound", &["--max-stop", "20"]);
    let holder = Holder::start(&[], |a, b| {
        vec![
            "perl".into(),
            "-e".into(),
            format!(
                "use threads; use IO::Socket::INET; \
                 my @s = map {{ IO::Socket::INET->new(PeerAddr => $_) or die \"$_: $!\" }} @ARGV; \
                 threads->create(sub {{ syscall({VFORK}) == 0 and syscall({PAUSE}); sleep }}) \
                 ->detach; select(undef, undef, undef, 0.001) while 1"
            ),
            a.to_string(),
            b.to_string(),
        ]
    });
    let pid = holder.pid();
    let _child = VforkChild::of(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while thread_states(pid) != ['S', 'D'] {
        assert!(
            Instant::now() < deadline,
            "the holder's threads: {:?}",
            thread_states(pid)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let watch = StopWatch::start(pid);
    let t = Instant::now();
    let (ok, out, err) = agent.pair(pid, holder.fds);
    let took = t.elapsed();
    let stops = watch.finish();
    eprintln!(
        "refused after {took:?}; the holder's main thread was stopped for at most {:?} (bound \
         {max_stop:?})",
        stops.first()
    );
    assert!(
        !stops.is_empty(),
        "the holder's main thread was never seen stopped"
    );
    assert!(
        stops[0] <= max_stop + SLACK,
        "the holder was stopped for {:?}, over --max-stop {max_stop:?} (+{SLACK:?} slack)",
        stops[0]
    );
    assert!(!ok, "paired a process that cannot be stopped: {out}");
    assert!(err.contains("did not stop in time"), "{err}");
    assert!(!any_stopped(pid), "{:?}", thread_states(pid));
    assert!(agent.pairs().is_empty());
}

/// vfork(2) and pause(2) as `perl -e syscall` takes them.
#[cfg(target_arch = "x86_64")]
const VFORK: u32 = 58;
#[cfg(target_arch = "x86_64")]
const PAUSE: u32 = 34;

/// The child a holder vforked, killed when the test ends (the holder's
/// own kill leaves it behind).
struct VforkChild(u32);

impl VforkChild {
    fn of(pid: u32) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children: String = std::fs::read_dir(format!("/proc/{pid}/task"))
                .expect("task list")
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .collect();
            if let Some(c) = children.split_whitespace().next() {
                return Self(c.parse().expect("a pid"));
            }
            assert!(Instant::now() < deadline, "pid {pid} never vforked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for VforkChild {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

/// Two requests for two connections of one HAProxy (two threads) overlap.
/// The first can never pair: its server does not read, so HAProxy always
/// holds bytes of that connection, and the agent stops and lets it go
/// every few milliseconds for 3 s before refusing. The second, for a
/// connection carrying bytes both ways, arrives during those 3 s. They
/// take turns: the second waits for the first to end rather than pair
/// while the first lets HAProxy run; then it pairs, every byte of both
/// connections arrives intact, the kernel carries what is sent after
/// pairing, and no stop of HAProxy outlasts the bound.
#[test]
fn two_pair_requests_for_one_proxy_take_turns_and_lose_nothing() {
    let agent = Agent::start("stop-turns");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let haproxy = Proxy::haproxy_on(
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        server.local_addr().expect("addr"),
        &agent.dir,
        2,
    );
    let pid = haproxy.child.id();
    let (mut busy_client, mut busy_up, busy_fds) = through_proxy(&haproxy, &server);
    let (mut stuck_client, mut stuck_up, stuck_fds) = through_proxy(&haproxy, &server);
    let flows = Flows::start(&busy_client, &busy_up);
    const STUCK: u64 = 64 << 20;
    let mut c = stuck_client.try_clone().expect("clone");
    let stuck_sent = std::thread::spawn(move || send_n(&mut c, STUCK, 5));
    wait_stuck(pid, stuck_fds, true);
    let watch = StopWatch::start(pid);
    let first = Answer::start(&agent.socket, pid, stuck_fds);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !any_stopped(pid) {
        assert!(
            Instant::now() < deadline,
            "the first request never stopped HAProxy"
        );
        std::thread::yield_now();
    }
    let second = Answer::start(&agent.socket, pid, busy_fds);
    let (first, second) = (first.wait(), second.wait());
    let stops = watch.finish();
    eprintln!(
        "first: {}\nsecond: {} ({:?} after the first)\n{} stops of HAProxy, the longest {:?}",
        first.text,
        second.text,
        second.at.checked_duration_since(first.at),
        stops.len(),
        stops.first()
    );
    assert!(
        !first.ok && first.text.contains("never held zero bytes"),
        "the first request: {}",
        first.text
    );
    assert!(second.ok, "the second request: {}", second.text);
    assert!(
        second.at > first.at,
        "the second pairing finished while the first request still held its turn, stopping and \
         continuing HAProxy"
    );
    assert!(
        stops
            .first()
            .is_some_and(|&s| s <= DEFAULT_MAX_STOP + SLACK),
        "HAProxy was stopped for {stops:?}, over the default --max-stop {DEFAULT_MAX_STOP:?}"
    );
    flows.check();
    for s in [&busy_client, &busy_up] {
        s.set_read_timeout(Some(common::HANG)).expect("timeout");
    }
    let got = read_n(&mut stuck_up, STUCK);
    assert_eq!(
        stuck_sent.join().expect("sender"),
        got,
        "the unpaired connection through HAProxy"
    );
    // What moves now crosses the kernel, counted by the verdict.
    let before = kernel_bytes(&agent);
    const M: u64 = 16 << 20;
    exchange(&mut busy_client, &mut busy_up, M);
    let after = kernel_bytes(&agent);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        [
            after[0].1[0] - before[0].1[0],
            after[0].1[1] - before[0].1[1]
        ],
        [M, M],
        "the kernel carried every byte both ways"
    );
    exchange(&mut stuck_client, &mut stuck_up, 1 << 20);
}

/// Waits until the stream from `client` to fd `fd` of `pid` has stalled:
/// more than 32 KiB wait unread at `pid` (which reads 16 KiB at a time)
/// and more than 1 MiB wait to leave `client`.
/// Waits until a proxy is stuck on a connection for good: the server's
/// zero window has outlasted one of the kernel's window probes on the
/// proxy's upstream socket (`tcpi_backoff` grows only while the window
/// stays shut), and the proxy holds bytes it read from the client. From
/// then on nothing is acknowledged, so the upstream socket's send buffer
/// can neither drain nor grow (autotuning grows it on ACKs), and the
/// proxy holds those bytes until the server reads. Waiting only for bytes
/// queued on both sides let HAProxy, still filling a growing send buffer,
/// hold nothing at the agent's first stop (2 of 6 CI runs on 2026-12-01).
/// `fds` are the proxy's client side, then the upstream it connected;
/// socat, which reads only when it can write, holds nothing then
/// (`must_hold` false).
fn wait_stuck(pid: u32, fds: [i32; 2], must_hold: bool) {
    use zc_user::sys;
    let [down, up] = fds.map(|fd| TcpStream::from(take_fd(pid, fd)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let consumed = sys::bytes_received(down.as_fd()).expect("bytes received")
            - sys::inq(down.as_fd()).expect("SIOCINQ");
        // HAProxy connected the upstream socket: its count holds the SYN.
        let written = sys::bytes_written(up.as_fd()).expect("bytes written") - 1;
        let held = consumed as i64 - written as i64;
        let probed = sys::tcp_info(up.as_fd()).expect("tcp_info").backoff > 0;
        if probed && (held > 0 || !must_hold) {
            eprintln!("the proxy holds {held} bytes behind a shut window");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never got stuck: it holds {held} bytes, window probed: {probed}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `zc pair` run's answer and when it came.
struct Answer {
    ok: bool,
    text: String,
    at: Instant,
}

impl Answer {
    /// Asks the agent to pair `fds` of `pid` from a thread, and notes when
    /// the answer arrived: read from the control socket itself, not when a
    /// `zc pair` process got round to exiting (a loaded machine once let
    /// the first client exit after the second pairing had finished).
    fn start(socket: &std::path::Path, pid: u32, fds: [i32; 2]) -> std::thread::JoinHandle<Self> {
        let socket = socket.to_path_buf();
        std::thread::spawn(move || {
            let req = zc_user::agent::proto::Request::PairPid {
                pid: pid as i32,
                fds,
            };
            let resp = zc_user::agent::control::call(&socket, &req);
            let at = Instant::now();
            let text = format!("{resp:?}");
            Self {
                at,
                ok: matches!(resp, Ok(zc_user::agent::proto::Response::Paired { .. })),
                text,
            }
        })
    }
}

trait Wait {
    fn wait(self) -> Answer;
}

impl Wait for std::thread::JoinHandle<Answer> {
    fn wait(self) -> Answer {
        self.join().expect("the zc pair thread")
    }
}

const DEFAULT_MAX_STOP: Duration = Duration::from_millis(50);

/// Each pair's verdict counters, by id.
fn kernel_bytes(agent: &Agent) -> Vec<(u64, [u64; 2])> {
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    stats["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| {
            let b = |i: usize| p["bytes"][i].as_u64().expect("bytes");
            (p["id"].as_u64().expect("id"), [b(0), b(1)])
        })
        .collect()
}

/// Bytes both ways through one connection until [`Flows::check`]: each
/// sender writes a pattern until told to stop, then says how much it
/// sent; each reader reads exactly that much.
struct Flows {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: [std::thread::JoinHandle<Digest>; 2],
    totals: [mpsc::Sender<u64>; 2],
    got: [std::thread::JoinHandle<Digest>; 2],
}

impl Flows {
    fn start(client: &TcpStream, up: &TcpStream) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let ends = [client, up].map(|s| s.try_clone().expect("clone"));
        let sent = [0, 1].map(|i| {
            let mut s = ends[i].try_clone().expect("clone");
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut p = zc_user::traffic::Pattern::new(40 + i as u64);
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                let mut bytes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let buf = p.next(64 << 10);
                    s.write_all(buf).expect("write");
                    h.update(buf);
                    bytes += buf.len() as u64;
                    // Paced (about 64 MB/s), so that the two CPUs are
                    // left to the proxy and the agent.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Digest {
                    bytes,
                    hash: h.digest(),
                }
            })
        });
        let (totals, told): (Vec<_>, Vec<_>) = (0..2).map(|_| mpsc::channel::<u64>()).unzip();
        let mut told = told.into_iter();
        let got = [1, 0].map(|i| {
            let mut s = ends[i].try_clone().expect("clone");
            let told = told.next().expect("a channel");
            std::thread::spawn(move || {
                // Short reads, so that the total, once told, is seen.
                s.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                let mut buf = vec![0u8; 256 << 10];
                let mut bytes = 0u64;
                let mut total = None;
                while total != Some(bytes) {
                    if total.is_none()
                        && let Ok(t) = told.try_recv()
                    {
                        total = Some(t);
                        continue;
                    }
                    let want =
                        total.map_or(buf.len() as u64, |t| (t - bytes).min(buf.len() as u64));
                    match s.read(&mut buf[..want as usize]) {
                        Ok(0) => panic!("EOF after {bytes} bytes"),
                        Ok(k) => {
                            h.update(&buf[..k]);
                            bytes += k as u64;
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => panic!("read: {e}"),
                    }
                }
                Digest {
                    bytes,
                    hash: h.digest(),
                }
            })
        });
        Self {
            stop,
            sent,
            totals: totals.try_into().expect("two"),
            got,
        }
    }

    /// Stops the senders and compares what each side got with what the
    /// other sent.
    fn check(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self.sent.map(|s| s.join().expect("sender"));
        for (t, d) in self.totals.iter().zip(&sent) {
            t.send(d.bytes).expect("the reader");
        }
        let got = self.got.map(|g| g.join().expect("reader"));
        assert_eq!(sent[0], got[0], "client -> server damaged");
        assert_eq!(sent[1], got[1], "server -> client damaged");
        eprintln!(
            "{} and {} bytes through the busy connection, intact",
            sent[0].bytes, sent[1].bytes
        );
    }
}

/// The socket options pairing changes, as the proxy sees them.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    nodelay: i32,
    sndbuf: i32,
    rcvlowat: i32,
    /// SO_BUF_LOCK: whether the buffer sizes are the application's (set)
    /// or TCP's to tune.
    buf_lock: i32,
}

/// SO_BUF_LOCK (include/uapi/asm-generic/socket.h).
const SO_BUF_LOCK: i32 = 72;

fn getsockopt(fd: BorrowedFd<'_>, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the call to write an int into.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    v
}

fn options(fd: BorrowedFd<'_>) -> Options {
    Options {
        nodelay: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY),
        sndbuf: getsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF),
        rcvlowat: getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT),
        buf_lock: getsockopt(fd, libc::SOL_SOCKET, SO_BUF_LOCK),
    }
}

/// Pairing sets TCP_NODELAY, a 16 MiB SO_SNDBUF (locking it against TCP's
/// autotuning) and SO_RCVLOWAT 1 on the proxy's sockets; unpairing puts
/// back what socat had, read through the sockets themselves
/// (pidfd_getfd).
#[test]
fn unpairing_gives_the_proxy_its_socket_options_back() {
    let agent = Agent::start("stop-opts");
    let mut socat = Holder::socat(&[]);
    let pid = socat.pid();
    let fds = socat.fds.map(|fd| take_fd(pid, fd));
    // socat's own SO_RCVLOWAT is 1, as pairing leaves it; make it differ.
    let three: libc::c_int = 3;
    // SAFETY: passes a valid int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fds[0].as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const three).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVLOWAT");
    let before = fds.each_ref().map(|f| options(f.as_fd()));
    let (ok, _, err) = agent.pair(pid, socat.fds);
    assert!(ok, "zc pair failed: {err}");
    let paired = fds.each_ref().map(|f| options(f.as_fd()));
    for (b, p) in before.iter().zip(&paired) {
        assert_ne!(b, p, "pairing changed nothing, so this test shows nothing");
    }
    let [a, b] = &mut socat.ends;
    exchange(a, b, 16 << 20);
    let bytes = kernel_bytes(&agent);
    assert_eq!(bytes[0].1, [16 << 20, 16 << 20], "the kernel carried them");
    let (ok, out, err) = agent.zc(&["unpair", &bytes[0].0.to_string()]);
    assert!(ok, "zc unpair failed: {err}");
    assert!(out.contains("every byte"), "{out}");
    let after = fds.each_ref().map(|f| options(f.as_fd()));
    eprintln!("before {before:?}\npaired {paired:?}\nafter  {after:?}");
    assert_eq!(after, before, "socat's options after unpairing");
    socat.still_relays();
}

/// A process under strace cannot be seized: the request is refused with
/// the tracer's pid, and nothing is paired.
#[test]
fn a_proxy_under_a_debugger_is_refused() {
    let agent = Agent::start("stop-traced");
    let mut socat = Holder::socat(&[]);
    let pid = socat.pid();
    let mut strace = Command::new("strace")
        .args(["-o", "/dev/null", "-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace must be installed");
    let tracer = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .expect("TracerPid")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracer(pid) != strace.id() {
        assert!(Instant::now() < deadline, "strace did not attach");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (ok, out, err) = agent.pair(pid, socat.fds);
    assert!(!ok, "paired a traced process: {out}");
    assert!(
        err.contains(&format!("is being traced by pid {}", strace.id())),
        "{err}"
    );
    assert!(agent.pairs().is_empty());
    strace.kill().expect("kill strace");
    strace.wait().expect("wait");
    socat.still_relays();
}

/// Urgent data stops the verdict at its mark (tcp_read_sock reads no
/// further), so the bytes behind it are never redirected, and the stream
/// could never be finished in the kernel: the pair would stay listed and
/// the agent would poll it forever. The agent ends such a pair, and
/// HAProxy, with its sockets back, reads and relays the rest itself: the
/// server gets every byte after the kernel's, in order, then EOF.
#[test]
fn a_pair_the_kernel_cannot_finish_is_ended_and_the_proxy_relays_the_rest() {
    let agent = Agent::start("stop-stuck");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let haproxy = Proxy::haproxy_on(
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        server.local_addr().expect("addr"),
        &agent.dir,
        1,
    );
    let pid = haproxy.child.id();
    let (mut client, mut up, fds) = through_proxy(&haproxy, &server);
    let (ok, _, err) = agent.pair(pid, fds);
    assert!(ok, "zc pair failed: {err}");
    const KERNEL: u64 = 1 << 20;
    let sent = send_n(&mut client, KERNEL, 11);
    assert_eq!(read_n(&mut up, KERNEL), sent, "through the kernel");
    assert_eq!(
        kernel_bytes(&agent)[0].1[0],
        KERNEL,
        "the kernel carried it"
    );
    // One urgent byte, then bytes the verdict cannot reach, then EOF.
    let rest: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    // SAFETY: sends one byte from a valid buffer.
    let n = unsafe { libc::send(client.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(n, 1, "MSG_OOB: {}", std::io::Error::last_os_error());
    client.write_all(&rest).expect("write");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut listed = agent.pairs();
    while !listed.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pair is still listed 10 s after its client's EOF: {listed:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        listed = agent.pairs();
    }
    let mut got = Vec::new();
    up.read_to_end(&mut got).expect("the rest, then EOF");
    assert_eq!(got, rest, "what HAProxy relayed after the pair ended");
}

/// Bytes that leave a paired socket's receive queue without the verdict
/// (here spliced out through a duplicate of socat's own descriptor, as
/// the owner itself could) can never be accounted for: at the stream's
/// end the agent would wait for them forever ("4096 bytes received, 0
/// through the verdict") and the pair would stay listed. The owner's
/// SO_RCVLOWAT keeps TCP from calling the verdict for the first bytes
/// (tcp_data_ready on 6.18 calls the data-ready hook only once that many
/// are queued), so the splice finds them there. The agent ends the pair.
#[test]
fn a_pair_whose_owner_read_bytes_itself_is_ended() {
    let agent = Agent::start("stop-selfread");
    let mut socat = Holder::socat(&[]);
    let (ok, _, err) = agent.pair(socat.pid(), socat.fds);
    assert!(ok, "zc pair failed: {err}");
    socat.still_relays();
    let sock = take_fd(socat.pid(), socat.fds[0]);
    let lowat: libc::c_int = 64 << 10;
    // SAFETY: passes a valid int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const lowat).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVLOWAT: {}", std::io::Error::last_os_error());
    const OWN: usize = 4096;
    socat.ends[0].write_all(&[7u8; OWN]).expect("write");
    let mut pipe = [0; 2];
    // SAFETY: pipe(2) fills two ints.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0, "pipe");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut taken = 0usize;
    while taken < OWN {
        // SAFETY: plain descriptors, no offsets.
        let n = unsafe {
            libc::splice(
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                pipe[1],
                std::ptr::null_mut(),
                OWN - taken,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n > 0 {
            taken += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        assert!(
            n < 0 && e.kind() == std::io::ErrorKind::WouldBlock,
            "splice: {n} {e}"
        );
        assert!(
            Instant::now() < deadline,
            "the {OWN} bytes never waited in the receive queue ({taken} spliced)"
        );
        std::thread::yield_now();
    }
    for fd in pipe {
        // SAFETY: closes the pipe made above.
        unsafe { libc::close(fd) };
    }
    socat.ends[0]
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut listed = agent.pairs();
    while !listed.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pair is still listed 10 s after its client's EOF, with {OWN} bytes read past \
             the verdict: {listed:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        listed = agent.pairs();
    }
    let (ok, _, err) = agent.zc(&["list"]);
    assert!(ok, "the agent still answers: {err}");
}
