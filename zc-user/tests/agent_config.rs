//! `zc agent --config FILE`: the agent takes its settings from the file,
//! flags on the command line beat it, and a bad file is a usage error
//! that names the file, the line and the key and changes nothing.
mod common;

use std::{
    io::BufRead as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use common::process::zc_command;
use zc_user::agent::{
    control,
    proto::{AgentStatus, Request, Response},
};

/// A scratch directory and a pin directory of this test's own.
struct Scratch {
    dir: PathBuf,
    pins: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "zc agent loads BPF and pins maps: run `cargo xtask test` as root"
        );
        let id = format!("{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("zc-config-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self {
            dir,
            pins: PathBuf::from(format!("/sys/fs/bpf/zc-test-config-{id}")),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("from-file.sock")
    }

    fn file(&self, text: &str) -> PathBuf {
        let f = self.dir.join("agent.toml");
        std::fs::write(&f, text).expect("writing the file");
        f
    }

    /// A file that sets the socket, the pin directory and the metrics
    /// address, plus `more`.
    fn settings(&self, more: &str) -> String {
        format!(
            "# the test's agent\nsocket = \"{}\"\npin-dir = \"{}\"\nmetrics = \"127.0.0.1:0\"\n\
             unpin-on-exit = true\n{more}",
            self.socket().display(),
            self.pins.display()
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = zc_command(false)
            .args(["agent", "--cleanup", "--config"])
            .arg(self.dir.join("agent.toml"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running agent; stopped with SIGTERM when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// Starts `zc agent ARGS` and returns once its log says it serves (or
/// panics with the log if it exits first).
fn start(args: &[&std::ffi::OsStr]) -> Running {
    let mut child = zc_command(false)
        .arg("agent")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting zc agent");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut log = String::new();
    loop {
        match lines.next() {
            Some(Ok(l)) => {
                log.push_str(&l);
                log.push('\n');
                if l.contains("zc agent: data path") && l.contains("serving") {
                    break;
                }
            }
            _ => panic!("zc agent ended before serving:\n{log}"),
        }
    }
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Running(child)
}

fn status(socket: &Path) -> AgentStatus {
    match control::call(socket, &Request::Status).expect("asking the agent on the file's socket") {
        Response::Status(s) => s,
        other => panic!("not a status: {other:?}"),
    }
}

fn metrics_of(s: &AgentStatus) -> SocketAddr {
    s.metrics
        .as_deref()
        .expect("metrics are served")
        .parse()
        .expect("an address")
}

#[test]
fn the_agent_serves_the_socket_and_metrics_its_file_names() {
    let scratch = Scratch::new("file");
    let file = scratch.file(&scratch.settings(""));
    let _agent = start(&["--config".as_ref(), file.as_os_str()]);
    let s = status(&scratch.socket());
    assert_eq!(
        s.pin_dir.as_deref(),
        Some(scratch.pins.to_str().expect("utf-8"))
    );
    let m = metrics_of(&s);
    assert_eq!(m.ip().to_string(), "127.0.0.1");
    assert_ne!(m.port(), 0);
    let mut c = std::net::TcpStream::connect(m).expect("the metrics port answers");
    std::io::Write::write_all(&mut c, b"GET /healthz HTTP/1.1\r\n\r\n").expect("request");
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut c, &mut reply).expect("reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn a_flag_on_the_command_line_beats_the_file() {
    let scratch = Scratch::new("override");
    let file = scratch.file(&scratch.settings(""));
    let _agent = start(&[
        "--config".as_ref(),
        file.as_os_str(),
        "--metrics".as_ref(),
        "127.0.0.2:0".as_ref(),
    ]);
    let m = metrics_of(&status(&scratch.socket()));
    assert_eq!(m.ip().to_string(), "127.0.0.2", "the file's address won");
}

/// The agent exits 2 with `what` and the file's path in its message, and
/// neither the file's socket nor its pin directory exists.
fn refused(scratch: &Scratch, text: &str, what: &[&str]) {
    let file = scratch.file(text);
    let out = zc_command(false)
        .arg("agent")
        .arg("--config")
        .arg(&file)
        .output()
        .expect("running zc agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&file.display().to_string()),
        "the file is not named: {err}"
    );
    for w in what {
        assert!(err.contains(w), "`{w}` is not in: {err}");
    }
    assert!(!scratch.socket().exists(), "the socket was created: {err}");
    assert!(!scratch.pins.exists(), "the pin directory was made: {err}");
}

#[test]
fn an_unknown_key_or_a_bad_type_is_a_usage_error_naming_file_line_and_key() {
    let scratch = Scratch::new("bad");
    // Line 6: after the comment and the four settings.
    refused(
        &scratch,
        &scratch.settings("max-stopp = 20\n"),
        &[":6:", "key `max-stopp`", "unknown field"],
    );
    refused(
        &scratch,
        &scratch.settings("max-stop = \"fast\"\n"),
        &[":6:", "key `max-stop`", "invalid type"],
    );
    refused(
        &scratch,
        &scratch
            .settings("unpin-on-exit = \"yes\"\n")
            .replace("unpin-on-exit = true\n", ""),
        &[":5:", "key `unpin-on-exit`", "invalid type"],
    );
    // The right type, but a value the flag refuses.
    refused(
        &scratch,
        &scratch.settings("max-stop = 0\n"),
        &[":6:", "key `max-stop`", "0 is not in 1..=10000"],
    );
}

#[test]
fn a_missing_file_given_with_config_is_an_error() {
    let scratch = Scratch::new("missing");
    let out = zc_command(false)
        .args(["agent", "--config"])
        .arg(scratch.dir.join("nothing.toml"))
        .output()
        .expect("running zc agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nothing.toml"), "{err}");
}
