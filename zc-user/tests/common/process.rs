//! `zc` run as a user would run it: a child process.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// setpriv arguments that run a command as `nobody` with no capabilities.
pub const UNPRIVILEGED: [&str; 5] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

/// The `zc` binary, run as nobody without capabilities if `unprivileged`.
pub fn zc_command(unprivileged: bool) -> Command {
    if unprivileged {
        let mut c = Command::new("setpriv");
        c.args(UNPRIVILEGED).arg(env!("CARGO_BIN_EXE_zc"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_zc"))
    }
}

pub struct RelayProcess {
    pub child: Child,
    pub listen: SocketAddr,
    log: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl RelayProcess {
    /// Starts `zc relay --listen 127.0.0.1:0 --upstream <upstream> ARGS`
    /// (as nobody if `unprivileged`) and waits for its start line, which
    /// names the port the kernel gave it. Letting the relay pick the port
    /// avoids racing other sockets for a port chosen in advance (a client
    /// can even connect to itself on a port nobody listens on).
    pub fn start(
        upstream: SocketAddr,
        args: &[&str],
        env: &[(&str, &str)],
        unprivileged: bool,
    ) -> Self {
        Self::start_at(
            "127.0.0.1:0",
            &upstream.to_string(),
            args,
            env,
            unprivileged,
        )
    }

    /// [`Self::start`] with `--listen` and `--upstream` as written.
    pub fn start_at(
        listen: &str,
        upstream: &str,
        args: &[&str],
        env: &[(&str, &str)],
        unprivileged: bool,
    ) -> Self {
        Self::start_command(zc_command(unprivileged), listen, upstream, args, env)
    }

    /// [`Self::start_at`] with `cmd` as the `zc` to run (e.g. under
    /// setpriv with a unit's capabilities).
    pub fn start_command(
        mut cmd: Command,
        listen: &str,
        upstream: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        cmd.args(["relay", "--listen", listen, "--upstream", upstream])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("starting zc relay (setpriv comes with util-linux)");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let listen = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest.split(',').next().unwrap_or_default();
                        break addr
                            .parse()
                            .unwrap_or_else(|e| panic!("bad address in `{line}`: {e}"));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("zc relay did not start listening within 20 s; its log:\n{seen}");
                }
            }
        };
        Self {
            child,
            listen,
            log,
            seen,
        }
    }

    /// Waits (up to 20 s) for a log line containing `needle` and returns it.
    #[allow(dead_code)]
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with `{needle}` in 20 s; the log:\n{}",
                    self.seen
                ),
            }
        }
    }

    /// A client connection; reads time out rather than hang a test.
    pub fn connect(&self) -> TcpStream {
        let c = TcpStream::connect(self.listen).expect("connecting to the relay");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        c
    }

    /// SIGTERM, wait; returns whether it exited cleanly and its whole log.
    pub fn stop(&mut self) -> (bool, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        )
        .expect("kill");
        let status = self.child.wait().expect("wait");
        let mut log = std::mem::take(&mut self.seen);
        // The reader thread ends at EOF, after the child exited.
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(5)) {
            log.push_str(&line);
            log.push('\n');
        }
        (status.success(), log)
    }
}

impl Drop for RelayProcess {
    /// A test that fails midway must not leave a relay (and its loaded
    /// programs) behind for the next test, and shows what the relay said.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let mut log = std::mem::take(&mut self.seen);
            while let Ok(line) = self.log.recv_timeout(Duration::from_secs(1)) {
                log.push_str(&line);
                log.push('\n');
            }
            eprintln!("the relay's log, up to the failure:\n{log}");
        }
    }
}

/// Accepts the relay's upstream connection, failing instead of hanging.
pub fn accept_upstream(server: &TcpListener) -> TcpStream {
    server.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match server.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the relay never connected upstream"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The TCP port process `pid` listens on, once it does. Started with port
/// 0, it was given one by the kernel: no port is chosen in advance.
pub fn listening_port(pid: u32, what: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(port) = listen_port_of(pid) {
            return port;
        }
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A listening TCP socket among `pid`'s fds (/proc/PID/net/tcp, matched by
/// inode), and its port.
pub fn listen_port_of(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    tcp.lines().skip(1).find_map(|l| {
        // sl local_address rem_address st ... uid timeout inode
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(3) != Some(&"0A") || !inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
            return None;
        }
        u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()
    })
}

/// The path of `zc-user/examples/NAME`, built beside the test binaries by
/// `cargo test` (and `cargo xtask test`).
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask test` builds the examples",
        path.display()
    );
    path
}
