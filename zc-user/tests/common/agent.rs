//! An agent process, the proxies it is paired beside (socat, HAProxy from
//! Debian's packages), and how a test finds their sockets and CPU time.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use zc_user::traffic::Digest;

pub use super::process::listening_port;
use super::process::zc_command;

pub struct Agent {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub extra: Vec<String>,
    /// A command the agent runs under (e.g. `unshare ...`), given the zc
    /// binary and its arguments; none: run directly.
    pub wrap: Vec<String>,
}

impl Agent {
    pub fn start(tag: &str) -> Self {
        Self::start_with(tag, &[])
    }

    /// `zc agent --short-circuit --cgroup CGROUP`, checked to say that
    /// the short-circuit is on.
    pub fn start_short_circuit(tag: &str, cgroup: &TestCgroup) -> Self {
        let cg = cgroup.path.to_str().expect("utf-8 path");
        let agent = Self::start_with(tag, &["--short-circuit", "--cgroup", cg]);
        let (ok, out, err) = agent.zc(&["status", "--json"]);
        assert!(ok, "zc status failed: {err}");
        assert!(out.contains(r#""short_circuit":null"#), "{out}");
        agent
    }

    pub fn start_with(tag: &str, extra: &[&str]) -> Self {
        Self::start_wrapped(tag, &[], extra)
    }

    pub fn start_wrapped(tag: &str, wrap: &[&str], extra: &[&str]) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "zc agent takes fds with pidfd_getfd and loads BPF: run `cargo xtask test` as root"
        );
        let id = format!("{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("zc-agent-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut agent = Self {
            child: None,
            socket: dir.join("zc.sock"),
            dir,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/zc-test-{id}")),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            wrap: wrap.iter().map(|s| s.to_string()).collect(),
        };
        agent.spawn();
        agent
    }

    /// Starts (or restarts) the agent process and waits for its socket.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_zc"));
                c
            }
            None => zc_command(false),
        };
        let child = cmd
            .args(["agent", "--socket"])
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting zc agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(c) = &mut self.child
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("zc agent exited ({st}) before serving; its log is above");
            }
            assert!(
                Instant::now() < deadline,
                "zc agent did not create {} within 30 s",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("wait");
        }
    }

    /// Runs `zc ARGS --socket S`; returns (success, stdout, stderr).
    pub fn zc(&self, args: &[&str]) -> (bool, String, String) {
        let out = zc_command(false)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("running zc");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn pairs(&self) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.zc(&["list", "--json"]);
        assert!(ok, "zc list failed: {err}");
        serde_json::from_str(&out).expect("zc list --json")
    }

    pub fn pair(&self, pid: u32, fds: [i32; 2]) -> (bool, String, String) {
        self.zc(&[
            "pair",
            "--pid",
            &pid.to_string(),
            "--fd",
            &fds[0].to_string(),
            "--fd",
            &fds[1].to_string(),
        ])
    }

    /// Starts `zc pair --pid PID --fd A --fd B` and returns at once; its
    /// output is piped.
    pub fn pair_started(&self, pid: u32, fds: [i32; 2]) -> Child {
        zc_command(false)
            .args(["pair", "--pid", &pid.to_string()])
            .args(["--fd", &fds[0].to_string(), "--fd", &fds[1].to_string()])
            .arg("--socket")
            .arg(&self.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running zc pair")
    }

    /// Runs `zc ARGS --socket S` under setpriv with `user` (e.g.
    /// [`MEMBER`]); returns (success, stdout, stderr).
    pub fn zc_as(&self, user: &[&str], args: &[&str]) -> (bool, String, String) {
        let out = Command::new("setpriv")
            .args(user)
            .arg(env!("CARGO_BIN_EXE_zc"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("setpriv (util-linux)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = zc_command(false)
            .args(["agent", "--cleanup", "--socket"])
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The socket inode for a TCP connection local -> remote, from
/// /proc/net/tcp (what `ss -e` shows as ino).
pub fn inode_of(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    inode_in("/proc/net/tcp", local, remote)
}

/// [`inode_of`] in the TCP table at `table`: `/proc/PID/net/tcp` shows
/// the network namespace of process PID.
pub fn inode_in(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let (l, r) = (hex(local), hex(remote));
    let table = std::fs::read_to_string(table).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&l.as_str()) && f.get(2) == Some(&r.as_str()))
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}

/// The fd number under which `pid` holds socket `inode`.
pub fn fd_of(pid: u32, inode: u64) -> Option<i32> {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

pub fn cpu_secs(pid: u32) -> f64 {
    zc_user::host::process_cpu_secs(pid).unwrap_or_else(|e| panic!("CPU time of {pid}: {e}"))
}

/// An unmodified proxy from Debian's packages relaying 127.0.0.1:port to
/// an upstream: socat (one connection) or HAProxy (mode tcp, one thread).
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    /// HAProxy's log: one line per connection with how it ended.
    pub log: Option<std::path::PathBuf>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Self {
        Self::start_with(upstream, "", &[])
    }

    /// socat with `upstream_opts` appended to its upstream address (e.g.
    /// ",shut-none") and `args` before both addresses (e.g. `-t 30`).
    pub fn start_with(upstream: SocketAddr, upstream_opts: &str, args: &[&str]) -> Self {
        let child = Command::new("socat")
            .args(args)
            .arg("TCP-LISTEN:0,bind=127.0.0.1,reuseaddr")
            .arg(format!("TCP:{upstream}{upstream_opts}"))
            .stdin(Stdio::null())
            .spawn()
            .expect("socat must be installed (cargo xtask test installs it)");
        let port = listening_port(child.id(), "socat");
        Self {
            child,
            port,
            log: None,
        }
    }

    pub fn haproxy(upstream: SocketAddr, dir: &std::path::Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind HAProxy's listener");
        Self::haproxy_on(listener, upstream, dir, 1)
    }

    /// HAProxy (mode tcp, `threads` threads) serving `listener`, which it
    /// inherits as fd 3 (`bind fd@3`): the port is the one the kernel gave
    /// the test, never one chosen in advance.
    pub fn haproxy_on(
        listener: TcpListener,
        upstream: SocketAddr,
        dir: &std::path::Path,
        threads: u32,
    ) -> Self {
        Self::haproxy_with(listener, upstream, dir, threads, &[])
    }

    /// [`Self::haproxy_on`] with more lines in its `listen` section (e.g.
    /// `option splice-request`).
    pub fn haproxy_with(
        listener: TcpListener,
        upstream: SocketAddr,
        dir: &std::path::Path,
        threads: u32,
        options: &[&str],
    ) -> Self {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let port = listener.local_addr().expect("addr").port();
        let cfg = dir.join(format!("haproxy-{port}.cfg"));
        let options: String = options.iter().map(|o| format!("  {o}\n")).collect();
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread {threads}\n  log stdout format raw local0\ndefaults\n  \
                 mode tcp\n  log global\n  option tcplog\n  timeout connect 5s\n  \
                 timeout client 120s\n  timeout server 120s\nlisten zc\n  \
                 bind fd@3\n{options}  server up {upstream}\n"
            ),
        )
        .expect("haproxy config");
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new("haproxy");
        // Its log (stdout; alerts stay on stderr) says how each connection
        // ended (termination state: `--` normal, `CD`/`SD` a client or
        // server side that failed).
        let log = dir.join(format!("haproxy-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("haproxy log");
        cmd.args(["-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log_file);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto another number clears close-on-exec; onto the
                // same number it does not, so clear it either way.
                if fd != 3 && libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("haproxy must be installed (cargo xtask test installs it)");
        // HAProxy has the socket now; ours closes.
        drop(listener);
        Self {
            child,
            port,
            log: Some(log),
        }
    }

    /// What the proxy logged, for a failure message (socat logs nothing).
    /// HAProxy writes a connection's line when it ends, which may come
    /// just after an end saw it: a failure quoting it may miss that line.
    pub fn log(&self) -> String {
        self.log.as_ref().map_or_else(String::new, |p| {
            std::fs::read_to_string(p).unwrap_or_else(|e| format!("{}: {e}", p.display()))
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Client -> socat -> server, connected; returns (client, server side,
/// socat's two fds).
pub fn through_proxy(socat: &Proxy, server: &TcpListener) -> (TcpStream, TcpStream, [i32; 2]) {
    let client = TcpStream::connect(("127.0.0.1", socat.port)).expect("connect to socat");
    through_proxy_from(socat, server, client)
}

/// [`through_proxy`] for a client connected already.
pub fn through_proxy_from(
    socat: &Proxy,
    server: &TcpListener,
    client: TcpStream,
) -> (TcpStream, TcpStream, [i32; 2]) {
    let (up, _) = server.accept().expect("socat connects upstream");
    for s in [&client, &up] {
        s.set_read_timeout(Some(super::HANG)).expect("timeout");
    }
    let pid = socat.child.id();
    // The proxy's own table: it may run in another network namespace.
    let table = format!("/proc/{pid}/net/tcp");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = inode_in(
            &table,
            client.peer_addr().expect("peer"),
            client.local_addr().expect("local"),
        )
        .and_then(|i| fd_of(pid, i));
        let b = inode_in(
            &table,
            up.peer_addr().expect("peer"),
            up.local_addr().expect("local"),
        )
        .and_then(|i| fd_of(pid, i));
        if let (Some(a), Some(b)) = (a, b) {
            return (client, up, [a, b]);
        }
        assert!(Instant::now() < deadline, "socat's sockets not found");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// CPU seconds of a process, or None once it has exited.
pub fn cpu_secs_if_alive(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    if stat.rsplit_once(')')?.1.split_whitespace().next() == Some("Z") {
        return None;
    }
    zc_user::host::process_cpu_secs(pid).ok()
}

/// A cgroup v2 directory made for one test under the hierarchy's root,
/// removed (with its processes gone) when dropped.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
        let root = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .expect("this test needs a cgroup2 hierarchy mounted (see /proc/mounts)");
        let path = root.join(format!("zc-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// Runs `command` with sh, inside this cgroup, its stdin a pipe kept
    /// open by the returned child handle.
    pub fn spawn_piped(&self, command: &str) -> Child {
        self.command(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("sh")
    }

    /// Runs `command` with sh, inside this cgroup.
    pub fn spawn(&self, command: &str) -> Child {
        self.command(command)
            .stdin(Stdio::null())
            .spawn()
            .expect("sh")
    }

    fn command(&self, command: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && exec {command}",
            self.path.display()
        ));
        c
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // rmdir fails while a process is still in it; they are killed by
        // now, but their exit can lag a moment.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `n` bytes each way at once, fixed lengths (nobody half-closes), both
/// checked by digest.
pub fn exchange(client: &mut TcpStream, up: &mut TcpStream, n: u64) {
    let mut c2 = client.try_clone().expect("clone");
    let mut u2 = up.try_clone().expect("clone");
    let sent_up = std::thread::spawn(move || send_n(&mut c2, n, 1));
    let sent_down = std::thread::spawn(move || send_n(&mut u2, n, 2));
    let got_up = read_n(up, n);
    let got_down = read_n(client, n);
    assert_eq!(
        sent_up.join().expect("sender"),
        got_up,
        "client -> server damaged"
    );
    assert_eq!(
        sent_down.join().expect("sender"),
        got_down,
        "server -> client damaged"
    );
}

pub fn read_n_into(s: &mut TcpStream, n: u64, h: &mut xxhash_rust::xxh3::Xxh3) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    while got < n {
        let want = buf.len().min((n - got) as usize);
        let k = s.read(&mut buf[..want]).expect("read");
        assert!(k > 0, "EOF after {got} of {n} bytes");
        h.update(&buf[..k]);
        got += k as u64;
    }
    got
}

pub fn send_n(s: &mut TcpStream, n: u64, seed: u64) -> Digest {
    let mut p = zc_user::traffic::Pattern::new(seed);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut left = n;
    while left > 0 {
        let buf = p.next((64 << 10).min(left as usize));
        s.write_all(buf).expect("write");
        h.update(buf);
        left -= buf.len() as u64;
    }
    Digest {
        bytes: n,
        hash: h.digest(),
    }
}

pub fn read_n(s: &mut TcpStream, n: u64) -> Digest {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let bytes = read_n_into(s, n, &mut h);
    Digest {
        bytes,
        hash: h.digest(),
    }
}

/// Reads until EOF; a reset or timeout fails the test.
pub fn read_to_eof(s: &mut TcpStream) -> Digest {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut bytes = 0u64;
    loop {
        let k = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read after {bytes} bytes: {e}"));
        if k == 0 {
            return Digest {
                bytes,
                hash: h.digest(),
            };
        }
        h.update(&buf[..k]);
        bytes += k as u64;
    }
}

/// The group an agent started with `--group MEMBER_GROUP` lets in.
pub const MEMBER_GROUP: &str = "4242";

/// setpriv arguments for an unprivileged requester that may reach such an
/// agent: nobody (uid and gid 65534) in group [`MEMBER_GROUP`], without
/// capabilities.
pub const MEMBER: [&str; 5] = [
    "--reuid=65534",
    "--regid=65534",
    "--groups=4242",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

/// A process that opened two connections to this test and holds them:
/// socat relaying between them (a proxy, both ends connected by it), or
/// any program given the two addresses. Neither port is chosen in
/// advance: the test's listeners take what the kernel gives them.
pub struct Holder {
    pub child: Child,
    /// This test's end of each connection.
    pub ends: [TcpStream; 2],
    /// The holder's fd for each connection.
    pub fds: [i32; 2],
    /// The holder's sockets as `ss -tn` prints them (LOCAL-REMOTE).
    pub tuples: [String; 2],
    /// Context switches of its threads once it sat idle (see
    /// [`Holder::was_ever_stopped`]).
    idle_switches: u64,
}

impl Holder {
    /// socat between two new listeners, run under setpriv with `user`
    /// (none: as root, directly).
    pub fn socat(user: &[&str]) -> Self {
        Self::start(user, |a, b| {
            vec!["socat".into(), format!("TCP:{a}"), format!("TCP:{b}")]
        })
    }

    /// `command(a, b)` under setpriv with `user`; it must connect to `a`,
    /// then to `b`, and keep both open.
    pub fn start(user: &[&str], command: impl Fn(SocketAddr, SocketAddr) -> Vec<String>) -> Self {
        let listeners = [0, 1].map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"));
        let addrs = listeners.each_ref().map(|l| l.local_addr().expect("addr"));
        let argv = command(addrs[0], addrs[1]);
        let mut cmd = if user.is_empty() {
            Command::new(&argv[0])
        } else {
            let mut c = Command::new("setpriv");
            c.args(user).arg(&argv[0]);
            c
        };
        let child = cmd
            .args(&argv[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {argv:?}: {e}"));
        let ends = listeners.map(|l| {
            let (s, _) = l.accept().expect("the holder connects");
            s.set_read_timeout(Some(super::HANG)).expect("timeout");
            s
        });
        let tuples = ends.each_ref().map(|s| {
            format!(
                "{}-{}",
                s.peer_addr().expect("peer"),
                s.local_addr().expect("local")
            )
        });
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let fds = loop {
            let fd = |s: &TcpStream| {
                inode_of(s.peer_addr().ok()?, s.local_addr().ok()?).and_then(|i| fd_of(pid, i))
            };
            if let (Some(a), Some(b)) = (fd(&ends[0]), fd(&ends[1])) {
                break [a, b];
            }
            assert!(
                Instant::now() < deadline,
                "{argv:?} (pid {pid}) holds no fds for its connections"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        wait_idle(pid);
        Self {
            child,
            ends,
            fds,
            tuples,
            idle_switches: switches(pid),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One message each way through the holder (a proxy): it still relays
    /// as it did.
    pub fn still_relays(&mut self) {
        for (from, to) in [(0, 1), (1, 0)] {
            self.ends[from].write_all(b"still").expect("write");
            let mut got = [0u8; 5];
            self.ends[to]
                .read_exact(&mut got)
                .expect("the proxy relays");
            assert_eq!(&got, b"still");
        }
    }

    /// Whether anything stopped the holder since it sat idle, whether or
    /// not it runs again since. A SIGSTOP leaves the kernel's record for
    /// the parent: CLD_STOPPED, and CLD_CONTINUED after a SIGCONT
    /// (kernel/signal.c prepare_signal), read here without reaping. A
    /// ptrace stop (the agent's) leaves no such record, but stopping a
    /// thread wakes it, and an idle holder's threads otherwise never run:
    /// their context-switch counts tell. So ask only while nothing has
    /// been sent to the holder since it started.
    pub fn was_ever_stopped(&self) -> bool {
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        let flags = WaitPidFlag::WSTOPPED
            | WaitPidFlag::WCONTINUED
            | WaitPidFlag::WNOHANG
            | WaitPidFlag::WNOWAIT;
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        match waitid(Id::Pid(pid), flags).expect("waitid on the holder") {
            WaitStatus::StillAlive => switches(self.pid()) != self.idle_switches,
            WaitStatus::Stopped(..) | WaitStatus::Continued(_) => true,
            other => panic!("the holder (pid {pid}) ended: {other:?}"),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Context switches of every thread of `pid` so far (/proc/PID/task/*/
/// status).
pub fn switches(pid: u32) -> u64 {
    switches_but(pid, &[])
}

/// [`switches`] without the threads named in `skip` (their `comm`).
pub fn switches_but(pid: u32, skip: &[&str]) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| !skip.contains(&c.trim()))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Waits (up to 10 s) until every thread of `pid` sleeps in a system call
/// (state S or D, a call number in /proc/PID/task/TID/syscall), where an
/// idle process stays until something wakes it.
pub fn wait_idle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let asleep = |t: &std::fs::DirEntry| {
        let state = std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ")?.1.chars().next());
        let call = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        matches!(state, Some('S' | 'D'))
            && call
                .split_whitespace()
                .next()
                .is_some_and(|n| n.parse::<i64>().is_ok_and(|n| n >= 0))
    };
    loop {
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the process's task list")
            .flatten()
            .collect();
        if tasks.iter().all(asleep) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} never went idle");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The state letter of each thread of `pid` (/proc/PID/task/*/stat);
/// empty once it has exited.
pub fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            stat.rsplit_once(") ")?.1.chars().next()
        })
        .collect()
}

/// Whether a thread of `pid` is stopped: by a signal (T) or by a tracer
/// (t).
pub fn any_stopped(pid: u32) -> bool {
    thread_states(pid).iter().any(|&c| c == 'T' || c == 't')
}

/// Watches `pid` from its own side, as often as /proc can be read, and
/// records how long each stop of any of its threads lasted, bounded from
/// above: from the last look that saw none stopped to the first look that
/// saw none stopped again.
pub struct StopWatch {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl StopWatch {
    pub fn start(pid: u32) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut spans = Vec::new();
            let mut last_running = Instant::now();
            let mut in_stop = false;
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let stopped = any_stopped(pid);
                match (in_stop, stopped) {
                    (false, false) => last_running = now,
                    (false, true) => in_stop = true,
                    (true, false) => {
                        spans.push(now - last_running);
                        in_stop = false;
                        last_running = now;
                    }
                    (true, true) => {}
                }
                // A sampling period, not a wait for an event: short enough
                // to resolve a stop well under a millisecond.
                std::thread::sleep(Duration::from_micros(50));
            }
            if in_stop {
                spans.push(last_running.elapsed());
            }
            spans
        });
        Self { done, thread }
    }

    /// The stops seen so far, longest first.
    pub fn finish(self) -> Vec<Duration> {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut spans = self.thread.join().expect("the stop watch");
        spans.sort_unstable_by(|a, b| b.cmp(a));
        spans
    }
}

/// The agent's view of a proxy's socket: fd `fd` of `pid`, duplicated
/// into this test with pidfd_getfd (the test runs as root).
pub fn take_fd(pid: u32, fd: i32) -> std::os::fd::OwnedFd {
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let pid = Pid::from_raw(pid as i32).expect("a pid");
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).expect("pidfd_open");
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).expect("pidfd_getfd")
}

/// Takes on, for this thread only (the raw syscalls, not glibc's
/// process-wide wrappers), the credentials of `common::agent::MEMBER`:
/// nobody in the agent's group. The kernel records them at connect(2).
pub fn become_member() {
    let gid: libc::gid_t = MEMBER_GROUP.parse().expect("group id");
    let nobody: u32 = 65534;
    // SAFETY: plain integers and a one-element array that outlives the call.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_setgroups, 1, [gid].as_ptr()), 0);
        assert_eq!(
            libc::syscall(libc::SYS_setresgid, nobody, nobody, nobody),
            0
        );
        assert_eq!(
            libc::syscall(libc::SYS_setresuid, nobody, nobody, nobody),
            0
        );
    }
}

/// Writes `size` bytes of the traffic pattern from `seed` to `path`.
pub fn pattern_file(path: &std::path::Path, size: u64, seed: u64) {
    use std::io::Write as _;
    let mut pattern = zc_user::traffic::Pattern::new(seed);
    let mut file = std::fs::File::create(path).expect("input file");
    let mut left = size;
    while left > 0 {
        let buf = pattern.next((1 << 20).min(left as usize));
        file.write_all(buf).expect("write input");
        left -= buf.len() as u64;
    }
}
