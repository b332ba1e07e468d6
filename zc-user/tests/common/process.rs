//! `zc` run as a user would run it: a child process.
use std::{
    io::Read,
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

pub struct RelayProcess {
    pub child: Child,
    pub listen: SocketAddr,
}

impl RelayProcess {
    /// Starts `zc relay --listen <free port> --upstream <upstream> ARGS`
    /// (as nobody if `unprivileged`) and waits until it accepts.
    pub fn start(
        upstream: SocketAddr,
        args: &[&str],
        env: &[(&str, &str)],
        unprivileged: bool,
    ) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = if unprivileged {
            let mut c = Command::new("setpriv");
            c.args(UNPRIVILEGED).arg(env!("CARGO_BIN_EXE_zc"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_zc"))
        };
        cmd.args([
            "relay",
            "--listen",
            &listen.to_string(),
            "--upstream",
            &upstream.to_string(),
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("starting zc relay (setpriv comes with util-linux)");
        let deadline = Instant::now() + Duration::from_secs(20);
        // A probe connection would itself be relayed; wait for the port
        // to be bound instead.
        while TcpListener::bind(listen).is_ok() {
            if let Some(st) = child.try_wait().expect("wait") {
                let mut err = String::new();
                child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!("zc relay exited early ({st}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "zc relay never listened on {listen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, listen }
    }

    pub fn connect(&self) -> TcpStream {
        TcpStream::connect(self.listen).expect("connecting to the relay")
    }

    /// SIGTERM, wait; returns whether it exited cleanly and its log.
    pub fn stop(mut self) -> (bool, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        )
        .expect("kill");
        let status = self.child.wait().expect("wait");
        let mut log = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut log).expect("log");
        }
        (status.success(), log)
    }
}
