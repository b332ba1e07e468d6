//! A relay at its limits: a `zc relay` process whose open-file limit has
//! room for fewer connections than clients offer takes what it can, leaves
//! the rest in the listen backlog and admits them as others end; nobody is
//! reset or left hanging. And the splice pipe pool gives its pipes back
//! after a burst.
mod common;

use std::{
    io,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

/// Soft and hard RLIMIT_NOFILE of the relay process under test: the relay
/// cannot raise it, so it must size itself to it.
const FD_LIMIT: u64 = 1024;
/// Clients offered at once, well beyond what FD_LIMIT allows in any mode.
const CONNS: usize = 1500;
/// Bytes each way per connection.
const BYTES: u64 = 8 << 10;
/// A whole test must end well before this.
const DEADLINE: Duration = Duration::from_secs(45);

/// Sockets a relay holds besides its connections': the listener, the
/// watcher's netlink socket, the logger's, a margin.
const SOCKETS_BESIDE: usize = 8;
/// The log line the relay writes when it reaches its connection cap.
const LIMIT_LINE: &str = "connection limit reached";

/// `zc relay` in a child process, optionally with a lowered open-file
/// limit, its log read line by line.
struct Relay {
    child: Child,
    listen: SocketAddr,
    /// Connections at once, from the relay's start log.
    cap: usize,
    /// Every line logged so far.
    log: Arc<Mutex<Vec<String>>>,
    /// Bumped on each new line, and closed at the log's end.
    lines: watch::Receiver<usize>,
}

impl Relay {
    async fn start(
        upstream: SocketAddr,
        mode: &str,
        fd_limit: Option<u64>,
        extra: &[&str],
    ) -> Self {
        let mut cmd = common::process::zc_command(false);
        cmd.args([
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.to_string(),
            "--mode",
            mode,
        ])
        .args(extra)
        // ZC_TEST_RELAY_LOG=debug to see what the relay did.
        .env(
            "RUST_LOG",
            std::env::var("ZC_TEST_RELAY_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(n) = fd_limit {
            // SAFETY: setrlimit is a plain system call, safe between fork
            // and exec.
            unsafe {
                cmd.pre_exec(move || {
                    use nix::sys::resource::{Resource, setrlimit};
                    setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().expect("starting zc relay");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = watch::channel(0usize);
        let all = log.clone();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok)
            {
                let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
                all.push(line);
                tx.send_replace(all.len());
            }
            // Dropping `tx` tells waiters the log ended.
        });
        let mut relay = Self {
            child,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            cap: 0,
            log,
            lines,
        };
        let started = relay.wait_line("at most ", Duration::from_secs(20)).await;
        for line in relay.lines_now() {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split(',').next().unwrap_or_default();
                relay.listen = addr
                    .parse()
                    .unwrap_or_else(|e| panic!("bad address in `{line}`: {e}"));
            }
        }
        let n = started
            .split("at most ")
            .nth(1)
            .and_then(|r| r.split(' ').next());
        relay.cap = n
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad capacity in `{started}`"));
        assert_ne!(
            relay.listen.port(),
            0,
            "no address in the start log:\n{}",
            relay.lines_now().join("\n")
        );
        relay
    }

    fn lines_now(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for a line containing `pat`, failing after `limit`.
    async fn wait_line(&self, pat: &str, limit: Duration) -> String {
        let mut lines = self.lines.clone();
        let found = tokio::time::timeout(limit, async {
            loop {
                if let Some(l) = self.lines_now().into_iter().find(|l| l.contains(pat)) {
                    return l;
                }
                if lines.changed().await.is_err() {
                    panic!(
                        "zc relay ended without logging `{pat}`:\n{}",
                        self.lines_now().join("\n")
                    );
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "zc relay did not log `{pat}` within {limit:?}:\n{}",
                self.lines_now().join("\n")
            )
        })
    }

    /// Pipe fds the relay holds now.
    fn pipe_fds(&self) -> usize {
        self.fds_of_kind("pipe:")
    }

    /// Fds the relay holds now whose target starts with `kind`.
    fn fds_of_kind(&self, kind: &str) -> usize {
        let dir = format!("/proc/{}/fd", self.child.id());
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with(kind))
            .count()
    }

    /// What the relay said one connection costs in fds.
    fn fds_per_conn(&self) -> usize {
        let line = self
            .lines_now()
            .into_iter()
            .find(|l| l.contains(" fds per connection"))
            .unwrap_or_else(|| panic!("no capacity line:\n{}", self.lines_now().join("\n")));
        let n = line
            .split(" fds per connection")
            .next()
            .and_then(|l| l.rsplit(' ').next());
        n.and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad capacity line `{line}`"))
    }

    /// Waits until the relay holds `want` pipe fds (by `check`), polling
    /// /proc: the kernel has no event for another process's fd table.
    async fn wait_pipes(&self, what: &str, check: impl Fn(usize) -> bool) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = self.pipe_fds();
            if check(n) {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the relay still holds {n} pipe fds after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, wait; returns whether it exited cleanly and its whole log.
    async fn stop(mut self) -> (bool, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        )
        .expect("kill");
        let status = self.child.wait().expect("wait");
        // The reader thread ends at EOF, after the child exited.
        let mut lines = self.lines.clone();
        while lines.changed().await.is_ok() {}
        (status.success(), self.lines_now().join("\n"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Upstream connections the server holds, and how many it ever accepted.
#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    accepted: AtomicUsize,
}

/// An upstream that holds every connection until `gate` opens, then runs
/// an exchange on it and reports both digests (or the error).
async fn gated_server(
    gate: watch::Receiver<bool>,
) -> (
    SocketAddr,
    Arc<Counts>,
    watch::Receiver<usize>,
    mpsc::UnboundedReceiver<io::Result<(Digest, Digest)>>,
) {
    // The relay connects hundreds at once when the gate opens.
    let l = listen_deep("127.0.0.1:0".parse().expect("address"));
    let addr = l.local_addr().expect("server address");
    let counts = Arc::new(Counts::default());
    let (open_tx, open_rx) = watch::channel(0usize);
    let (tx, rx) = mpsc::unbounded_channel();
    let c = counts.clone();
    tokio::spawn(async move {
        let open_tx = Arc::new(open_tx);
        while let Ok((s, _)) = l.accept().await {
            let n = c.accepted.fetch_add(1, Ordering::SeqCst);
            let now = c.open.fetch_add(1, Ordering::SeqCst) + 1;
            open_tx.send_replace(now);
            let (tx, c, open_tx, mut gate) = (tx.clone(), c.clone(), open_tx.clone(), gate.clone());
            tokio::spawn(async move {
                let _ = gate.wait_for(|g| *g).await;
                let r = try_exchange(s, 1_000_000 + n as u64).await;
                let now = c.open.fetch_sub(1, Ordering::SeqCst) - 1;
                open_tx.send_replace(now);
                let _ = tx.send(r);
            });
        }
    });
    (addr, counts, open_rx, rx)
}

/// Sends BYTES random bytes and shuts down while reading to EOF; returns
/// (sent, received), or the first error (a reset shows as one).
async fn try_exchange(s: TcpStream, seed: u64) -> io::Result<(Digest, Digest)> {
    let (mut r, mut w) = s.into_split();
    let send = async move {
        let d = send_random(&mut w, BYTES, 4 << 10, seed).await?;
        w.shutdown().await?;
        Ok::<_, io::Error>(d)
    };
    let (sent, got) = tokio::join!(send, recv_all(&mut r));
    Ok((sent?, got?))
}

/// A client's index and its exchange, or the deadline it hit.
type ClientOutcome = (
    usize,
    Result<io::Result<(Digest, Digest)>, tokio::time::error::Elapsed>,
);

/// Connects `n` clients to `addr` at once, each running an exchange.
async fn offer_clients(addr: SocketAddr, n: usize) -> tokio::task::JoinSet<ClientOutcome> {
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..n {
        let s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("client {i}: connecting to the relay: {e}"));
        clients.spawn(async move {
            let r = tokio::time::timeout(DEADLINE, try_exchange(s, i as u64)).await;
            (i, r)
        });
    }
    clients
}

/// Waits for every client and for `n` server reports; returns what failed
/// (errors, hangs) and how many streams the two ends saw differently.
async fn outcomes(
    clients: &mut tokio::task::JoinSet<ClientOutcome>,
    reports: &mut mpsc::UnboundedReceiver<io::Result<(Digest, Digest)>>,
    n: usize,
) -> (Vec<String>, usize) {
    let mut failures = Vec::new();
    let mut client_digests = Vec::new();
    while let Some(r) = clients.join_next().await {
        match r.expect("client task") {
            (_, Ok(Ok(d))) => client_digests.push(d),
            (i, Ok(Err(e))) => failures.push(format!("client {i}: {e} ({:?})", e.kind())),
            (i, Err(_)) => failures.push(format!("client {i}: hung for {DEADLINE:?}")),
        }
    }
    let mut server = std::collections::HashMap::new();
    for _ in 0..n {
        match tokio::time::timeout(DEADLINE, reports.recv()).await {
            Ok(Some(Ok((srv_sent, srv_got)))) => {
                server.insert(srv_got, srv_sent);
            }
            Ok(Some(Err(e))) => failures.push(format!("server side: {e} ({:?})", e.kind())),
            Ok(None) | Err(_) => {
                failures.push(format!("only {} upstream connections ended", server.len()));
                break;
            }
        }
    }
    let damaged = client_digests
        .iter()
        .filter(|(sent, got)| server.get(sent) != Some(got))
        .count();
    (failures, damaged)
}

/// Offers CONNS clients at once to a relay limited to FD_LIMIT open files
/// and checks that it takes exactly its announced cap, says so once,
/// admits the rest as connections end, and relays every byte of every
/// connection both ways.
async fn clients_beyond_the_fd_limit_wait_and_complete(mode: &str) {
    init();
    let started = Instant::now();
    let (gate_tx, gate) = watch::channel(false);
    let (upstream, counts, mut open, mut reports) = gated_server(gate).await;
    let relay = Relay::start(upstream, mode, Some(FD_LIMIT), &[]).await;
    let cap = relay.cap;
    if mode == "auto" {
        // The start line came before the capacity line.
        let start = relay.lines_now().join("\n");
        assert!(
            start.contains("zc relay: mode bpf"),
            "auto mode did not pick bpf:\n{start}"
        );
    }
    println!(
        "{mode}: open-file limit {FD_LIMIT}: the relay takes at most {cap} connections at once"
    );
    assert!(
        cap > 0 && cap < CONNS / 2,
        "a cap of {cap} does not test clients beyond the fd limit"
    );

    // Every client connects at once: those beyond the cap complete the
    // handshake into the listen backlog, and send and shut down into their
    // socket buffers.
    let mut clients = offer_clients(relay.listen, CONNS).await;

    // The relay fills up to its cap, says so, and stops there.
    // (`wait_for` returns a guard that holds the server's counter locked;
    // it must not outlive this statement.)
    let filled = tokio::time::timeout(Duration::from_secs(20), open.wait_for(|&n| n >= cap))
        .await
        .is_ok_and(|r| r.is_ok());
    let at_cap = counts.accepted.load(Ordering::SeqCst);
    assert!(
        filled,
        "the relay admitted only {at_cap} connections with a cap of {cap}"
    );
    relay.wait_line(LIMIT_LINE, Duration::from_secs(20)).await;
    let at_cap = counts.accepted.load(Ordering::SeqCst);
    assert_eq!(
        at_cap, cap,
        "the relay admitted {at_cap} connections with a cap of {cap}"
    );
    // A connection costs its two sockets, and in splice mode its two pipes;
    // the kernel path and user-space forwarding (auto) need no more.
    let per_conn = relay.fds_per_conn();
    let want = if mode == "splice" { 6 } else { 2 };
    assert_eq!(per_conn, want, "{mode}: {per_conn} fds per connection");
    let sockets = relay.fds_of_kind("socket:");
    println!("{mode}: {per_conn} fds per connection; {sockets} sockets open at the cap");
    assert!(
        sockets <= 2 * cap + SOCKETS_BESIDE,
        "{mode}: {sockets} sockets open for {cap} connections"
    );
    println!(
        "{mode}: {at_cap} connections admitted, {} waiting in the backlog ({:?})",
        CONNS - at_cap,
        started.elapsed()
    );
    gate_tx.send(true).expect("server gone");

    let (failures, damaged) = outcomes(&mut clients, &mut reports, CONNS).await;
    if !failures.is_empty() {
        let path = std::env::temp_dir().join(format!("zc-fd-limits-{mode}.log"));
        let _ = std::fs::write(&path, relay.lines_now().join("\n"));
        println!("relay log: {}", path.display());
    }
    assert!(
        failures.is_empty(),
        "{} of {CONNS} connections failed, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    assert_eq!(damaged, 0, "{damaged} of {CONNS} streams arrived damaged");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), CONNS);
    let elapsed = started.elapsed();

    let (clean, log) = relay.stop().await;
    assert!(clean, "zc relay did not exit cleanly:\n{log}");
    let said = log.lines().filter(|l| l.contains(LIMIT_LINE)).count();
    assert_eq!(
        said, 1,
        "the relay should say once that it reached its limit:\n{log}"
    );
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        complaints.is_empty(),
        "the relay complained (out of fds?):\n{}",
        complaints.join("\n")
    );
    println!(
        "{mode}: {CONNS} of {CONNS} connections intact both ways ({BYTES} bytes each way), none \
         reset or hung, {} admitted after others ended; {elapsed:?}",
        CONNS - cap
    );
    assert!(elapsed < DEADLINE, "took {elapsed:?}");
}

fn need_root(what: &str) {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "{what} needs root (or CAP_BPF + CAP_NET_ADMIN) to load BPF programs; run the suite as root: `cargo xtask test`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_relay_admits_clients_beyond_its_fd_limit_later_intact() {
    clients_beyond_the_fd_limit_wait_and_complete("copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_relay_admits_clients_beyond_its_fd_limit_later_intact() {
    clients_beyond_the_fd_limit_wait_and_complete("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpf_relay_admits_clients_beyond_its_fd_limit_later_intact() {
    need_root("the bpf relay");
    clients_beyond_the_fd_limit_wait_and_complete("bpf").await;
}

/// Auto mode on the BPF path moves directions of small segments to user
/// space, which must cost no descriptor beyond the two sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_relay_admits_clients_beyond_its_fd_limit_later_intact() {
    need_root("the auto relay on its BPF path");
    clients_beyond_the_fd_limit_wait_and_complete("auto").await;
}

/// A burst of spliced connections takes two pipes each; once they end the
/// pool keeps only a few idle ones open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_pool_closes_its_pipes_after_a_burst() {
    init();
    const BURST: usize = 300;
    let (gate_tx, gate) = watch::channel(false);
    let (upstream, _counts, mut open, mut reports) = gated_server(gate).await;
    let relay = Relay::start(upstream, "splice", None, &[]).await;
    assert!(relay.cap >= BURST, "cap {} below the burst", relay.cap);
    let before = relay.pipe_fds();

    let mut clients = tokio::task::JoinSet::new();
    for i in 0..BURST {
        let s = TcpStream::connect(relay.listen)
            .await
            .unwrap_or_else(|e| panic!("client {i}: connecting to the relay: {e}"));
        clients
            .spawn(async move { tokio::time::timeout(DEADLINE, try_exchange(s, i as u64)).await });
    }
    tokio::time::timeout(Duration::from_secs(20), open.wait_for(|&n| n == BURST))
        .await
        .expect("the relay did not connect every client upstream")
        .expect("server gone");
    // Each connection takes its pipes as its relay starts, just after it
    // connected upstream.
    let peak = relay
        .wait_pipes("during the burst", |n| n >= before + 4 * BURST)
        .await;
    gate_tx.send(true).expect("server gone");
    while let Some(r) = clients.join_next().await {
        let r = r.expect("client task");
        let r = r.unwrap_or_else(|_| panic!("a client hung for {DEADLINE:?}"));
        r.expect("a client failed");
    }
    for _ in 0..BURST {
        reports
            .recv()
            .await
            .expect("server report")
            .expect("the server side failed");
    }
    let idle_fds = 2 * zc_user::engine::splice::DEFAULT_IDLE_PIPES;
    let after = relay
        .wait_pipes("after the burst", |n| n <= before + idle_fds)
        .await;
    println!(
        "splice pool: {before} pipe fds before, {peak} with {BURST} connections open, {after} after they ended (at most {idle_fds} idle)"
    );
    let (clean, log) = relay.stop().await;
    assert!(clean, "zc relay did not exit cleanly:\n{log}");
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let secs =
        zc_user::host::process_cpu_secs(pid).unwrap_or_else(|e| panic!("CPU time of {pid}: {e}"));
    Duration::from_secs_f64(secs)
}

/// The open-file limit is lowered under a running relay (as `prlimit
/// --pid` would), so it runs out of fds it counted on and accept() fails
/// with EMFILE. It must say so once, back off rather than spin, and admit
/// the waiting clients once connections end, every byte intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_out_of_fds_backs_off_and_admits_clients_later() {
    init();
    const CLIENTS: usize = 400;
    const LOWERED: u64 = 256;
    let started = Instant::now();
    let (gate_tx, gate) = watch::channel(false);
    let (upstream, counts, _open, mut reports) = gated_server(gate).await;
    let relay = Relay::start(upstream, "copy", None, &[]).await;
    assert!(relay.cap >= CLIENTS, "cap {} below the clients", relay.cap);
    let pid = relay.child.id();
    let lowered = libc::rlimit {
        rlim_cur: LOWERED,
        rlim_max: LOWERED,
    };
    // SAFETY: a system call given a valid rlimit and no old-value pointer.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lowered,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", io::Error::last_os_error());

    let mut clients = offer_clients(relay.listen, CLIENTS).await;
    // Nothing ends while the server holds every connection, so the relay
    // runs out of fds and must wait.
    relay
        .wait_line("accept failed", Duration::from_secs(20))
        .await;
    let at_limit = counts.accepted.load(Ordering::SeqCst);
    // A relay that retried at once would burn a core here.
    let cpu0 = cpu_time(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = cpu_time(pid).saturating_sub(cpu0);
    let window = window.elapsed();
    println!(
        "out of fds: {at_limit} connections admitted under a limit of {LOWERED}, then {cpu:?} CPU in {window:?} while waiting"
    );
    assert!(
        cpu < Duration::from_millis(200),
        "the relay used {cpu:?} of CPU in {window:?} while out of fds: it spins"
    );
    assert!(
        at_limit < CLIENTS,
        "every client was admitted within the lowered limit"
    );
    gate_tx.send(true).expect("server gone");

    let (failures, damaged) = outcomes(&mut clients, &mut reports, CLIENTS).await;
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} connections failed, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    assert_eq!(damaged, 0, "{damaged} of {CLIENTS} streams arrived damaged");
    let elapsed = started.elapsed();
    let (clean, log) = relay.stop().await;
    assert!(clean, "zc relay did not exit cleanly:\n{log}");
    let said = log.lines().filter(|l| l.contains("accept failed")).count();
    assert_eq!(
        said, 1,
        "the relay should say once that accept failed:\n{log}"
    );
    println!(
        "out of fds: {CLIENTS} of {CLIENTS} connections intact, {} admitted after others ended; {elapsed:?}",
        CLIENTS - at_limit
    );
}

/// The relay no longer keeps duplicate fds to reset connections cut at
/// shutdown; it arms the reset through the fds the engine owns. A
/// connection still open when the grace period ends must reach both ends
/// as a reset, never as a clean end of stream.
async fn connections_cut_at_shutdown_are_reset(mode: &str) {
    init();
    let server = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the server");
    let relay = Relay::start(
        server.local_addr().expect("server address"),
        mode,
        None,
        &["--shutdown-grace", "0"],
    )
    .await;
    let mut client = TcpStream::connect(relay.listen).await.expect("connect");
    client.write_all(b"hello").await.expect("client write");
    let (mut upstream, _) = tokio::time::timeout(Duration::from_secs(20), server.accept())
        .await
        .expect("the relay never connected upstream")
        .expect("accept");
    let mut got = [0u8; 5];
    tokio::io::AsyncReadExt::read_exact(&mut upstream, &mut got)
        .await
        .expect("the first bytes through the relay");
    assert_eq!(&got, b"hello");
    let (clean, log) = relay.stop().await;
    assert!(clean, "zc relay did not exit cleanly:\n{log}");
    assert!(
        log.contains("resetting 1 connection"),
        "the relay did not cut the open connection:\n{log}"
    );
    for (side, s) in [("client", &mut client), ("server", &mut upstream)] {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(s, &mut buf),
        )
        .await
        .unwrap_or_else(|_| panic!("{mode}: the {side} hung after the relay stopped"));
        match r {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("{mode}: the {side} saw {other:?} instead of a reset"),
        }
    }
    println!("{mode}: a connection cut at shutdown reached both ends as a reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_connections_cut_at_shutdown_are_reset() {
    connections_cut_at_shutdown_are_reset("copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_connections_cut_at_shutdown_are_reset() {
    connections_cut_at_shutdown_are_reset("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpf_connections_cut_at_shutdown_are_reset() {
    connections_cut_at_shutdown_are_reset("bpf").await;
}
