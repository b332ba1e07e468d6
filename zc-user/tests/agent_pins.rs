//! What `zc agent` trusts before it starts: one agent per pin directory
//! and control socket, a pin directory of its own, and a control socket
//! path it may replace. Every refusal comes before anything is loaded,
//! attached, mounted or removed, names the path, and says what to do; it
//! never falls back to another data path.
mod common;

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{agent::Agent, process::UNPRIVILEGED};

fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests start `zc agent`, which loads BPF and pins on bpffs: run them as root \
         (`cargo xtask test`)"
    );
}

/// A pin directory and a socket for one test, neither existing yet.
struct Paths {
    pin_dir: PathBuf,
    dir: PathBuf,
    socket: PathBuf,
}

impl Paths {
    fn new(tag: &str) -> Self {
        need_root();
        let id = format!("{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("zc-pins-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // bpffs must be mounted for a user to squat on it, as an agent
        // would have mounted it.
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
        if !mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")) {
            let st = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .expect("mount");
            assert!(st.success(), "mounting bpffs on /sys/fs/bpf failed");
        }
        Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/zc-test-{id}")),
            socket: dir.join("zc.sock"),
            dir,
        }
    }

    /// `zc agent` on these paths, run to its end (a refusal ends it).
    fn refused(&self, says: &[&str]) -> String {
        let out = run_to_end(agent_cmd(&self.socket, &self.pin_dir));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "zc agent started where it must refuse ({says:?}): {err}"
        );
        for s in says {
            assert!(err.contains(s), "expected `{s}` in: {err}");
        }
        assert!(
            !err.contains("spliced") && !err.contains("data path splice"),
            "the agent fell back to splice instead of refusing: {err}"
        );
        err
    }

    fn cleanup(&self) -> String {
        let out = agent_cmd(&self.socket, &self.pin_dir)
            .arg("--cleanup")
            .output()
            .expect("zc agent --cleanup");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "zc agent --cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !self.pin_dir.exists(),
            "--cleanup left {}",
            self.pin_dir.display()
        );
        text
    }
}

impl Drop for Paths {
    fn drop(&mut self) {
        let _ = agent_cmd(&self.socket, &self.pin_dir)
            .arg("--cleanup")
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn agent_cmd(socket: &Path, pin_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zc"));
    c.arg("agent")
        .arg("--socket")
        .arg(socket)
        .arg("--pin-dir")
        .arg(pin_dir)
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` to its end, failing the test if it is still running after
/// a minute (an agent that started instead of refusing).
fn run_to_end(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(common::HANG) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
            panic!("zc agent (pid {pid}) kept running where it had to refuse");
        }
    }
}

/// Runs `argv` as nobody, without capabilities; it must succeed.
fn as_nobody(argv: &[&str]) {
    let st = Command::new("setpriv")
        .args(UNPRIVILEGED)
        .args(argv)
        .status()
        .expect("setpriv (util-linux)");
    assert!(st.success(), "{argv:?} as nobody failed");
}

/// (inode, name) of each entry of `dir`: a replaced pin has a new inode.
fn entries(dir: &Path) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            (
                e.metadata().expect("metadata").ino(),
                e.file_name().to_string_lossy().into_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_agent_refuses_before_touching_the_running_agents_pins() {
    let agent = Agent::start("second");
    let pinned = entries(&agent.pin_dir);
    assert!(
        pinned.iter().any(|(_, n)| n.starts_with("fin_hold_")),
        "the first agent pinned no FIN hold link: {pinned:?}"
    );
    let other = Paths::new("second-other");
    // The same pin directory, and the same socket, each with the other
    // path new.
    for (socket, pin_dir, says) in [
        (&agent.socket, &agent.pin_dir, "for the pin directory"),
        (&other.socket, &agent.pin_dir, "for the pin directory"),
        (&agent.socket, &other.pin_dir, "for the control socket"),
    ] {
        let out = run_to_end(agent_cmd(socket, pin_dir));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second agent started: {err}");
        assert!(
            err.contains("another zc agent (pid ") && err.contains(says),
            "expected `another zc agent (pid ...) holds ... {says}` in: {err}"
        );
        eprintln!("refused: {}", err.lines().last().unwrap_or_default());
        assert_eq!(
            entries(&agent.pin_dir),
            pinned,
            "the refused agent changed the running agent's pins"
        );
        assert!(
            !other.pin_dir.exists(),
            "the refused agent made {}",
            other.pin_dir.display()
        );
    }
    let (ok, out, err) = agent.zc(&["status"]);
    assert!(ok && out.contains("FIN hold:       active"), "{out}{err}");
}

/// Two agents on one pin directory and a third on another start at the
/// same moment, in a mount namespace where bpffs is not mounted: one of
/// the first two serves, the other refuses, the third serves, and bpffs
/// is mounted once (stacked mounts hide the pins made in the lower one).
#[test]
fn agents_started_at_once_mount_bpffs_once_and_only_one_takes_a_pin_directory() {
    let a = Paths::new("race-a");
    let c = Paths::new("race-c");
    let zc = env!("CARGO_BIN_EXE_zc");
    let agent = |p: &Paths, socket: &Path, log: &str| {
        format!(
            "{zc} agent --socket {} --pin-dir {} 2>{} &",
            socket.display(),
            p.pin_dir.display(),
            a.dir.join(log).display()
        )
    };
    let b_socket = a.dir.join("b.sock");
    let script = format!(
        "while umount /sys/fs/bpf 2>/dev/null; do :; done; {} {} {} wait",
        agent(&a, &a.socket, "a.log"),
        agent(&a, &b_socket, "b.log"),
        agent(&c, &c.socket, "c.log"),
    );
    let sh = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    // Stops the agents (the shell's children) and the shell however the
    // test ends, a failed assertion included.
    let sh = Namespace(sh);
    let log = |n: &str| std::fs::read_to_string(a.dir.join(n)).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (serving, refused) = loop {
        let serving = [&a.socket, &b_socket].map(|s| s.exists());
        let refused = ["a.log", "b.log"].map(|n| log(n).contains("another zc agent"));
        if c.socket.exists() && serving.iter().any(|s| *s) && refused.iter().any(|r| *r) {
            break (serving, refused);
        }
        assert!(
            Instant::now() < deadline,
            "agents did not settle: a: {} b: {} c: {}",
            log("a.log"),
            log("b.log"),
            log("c.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        serving.iter().filter(|s| **s).count(),
        1,
        "two agents serve one pin directory: {} / {}",
        log("a.log"),
        log("b.log")
    );
    assert_eq!(refused.iter().filter(|r| **r).count(), 1);
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", sh.0.id()))
        .expect("the namespace's mountinfo");
    let bpffs: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf"))
        .collect();
    eprintln!("bpffs mounts in the namespace: {bpffs:#?}");
    assert_eq!(bpffs.len(), 1, "bpffs stacked: {bpffs:#?}");
}

/// The shell running a test's agents in their mount namespace.
struct Namespace(std::process::Child);

impl Drop for Namespace {
    fn drop(&mut self) {
        let pid = self.0.id();
        let kids =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for kid in kids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(kid), nix::sys::signal::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

#[test]
fn a_pin_directory_another_user_made_is_refused_and_cleanup_removes_it() {
    let p = Paths::new("squat-dir");
    let dir = p.pin_dir.to_str().expect("utf-8 path");
    as_nobody(&["mkdir", dir]);
    let err = p.refused(&[dir, "belongs to uid 65534", "zc agent --cleanup --pin-dir"]);
    eprintln!("refused: {}", err.lines().last().unwrap_or_default());
    assert!(!p.socket.exists(), "the refused agent served");
    // A squatted entry inside it too (bpffs takes directories and links
    // from anyone, not files).
    as_nobody(&["mkdir", &format!("{dir}/PEERS")]);
    p.refused(&[dir, "belongs to uid 65534"]);
    let said = p.cleanup();
    eprintln!("cleanup: {said}");
    assert!(said.contains("belonged to uid 65534"), "{said}");
    // The path is the agent's again.
    let mut agent = Agent {
        child: None,
        socket: p.socket.clone(),
        dir: p.dir.join("agent"),
        pin_dir: p.pin_dir.clone(),
        extra: Vec::new(),
        wrap: Vec::new(),
    };
    agent.spawn();
    let meta = std::fs::symlink_metadata(&p.pin_dir).expect("pin dir");
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o7777),
        (0, 0o700),
        "the agent's own pin directory"
    );
}

#[test]
fn foreign_or_incompatible_entries_in_the_pin_directory_are_refused_and_cleanup_removes_them() {
    let p = Paths::new("squat-entries");
    let dir = p.pin_dir.to_str().expect("utf-8 path");
    let make = |mode: u32, inside: &[&str]| {
        std::fs::create_dir(&p.pin_dir).expect("mkdir");
        std::fs::set_permissions(&p.pin_dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        for e in inside {
            std::fs::create_dir(p.pin_dir.join(e)).expect("mkdir entry");
        }
    };
    let cases: [(u32, &[&str], &[&str]); 4] = [
        (0o755, &[], &["has mode 0755, not 0700"]),
        (0o700, &["junk"], &["entries zc never pins there: junk"]),
        (0o700, &["layout-v1", "fin_hold_3"], &["pins of layout v1"]),
        (0o700, &["fin_hold_3"], &["without a layout version"]),
    ];
    for (mode, inside, says) in cases {
        make(mode, inside);
        let mut want = vec![dir];
        want.extend_from_slice(says);
        let err = p.refused(&want);
        eprintln!("refused: {}", err.lines().last().unwrap_or_default());
        assert!(!p.socket.exists(), "the refused agent served");
        p.cleanup();
    }
}

#[test]
fn the_control_socket_path_is_replaced_only_when_it_is_a_stale_socket() {
    let p = Paths::new("socket-path");
    // A regular file stays, whole.
    std::fs::write(&p.socket, b"precious").expect("write");
    let err = p.refused(&["is a regular file", "will not remove it"]);
    eprintln!("refused: {}", err.lines().last().unwrap_or_default());
    assert_eq!(std::fs::read(&p.socket).expect("still there"), b"precious");
    std::fs::remove_file(&p.socket).expect("rm");
    // A live socket of another program stays, and still accepts.
    let live = std::os::unix::net::UnixListener::bind(&p.socket).expect("bind");
    p.refused(&["is a socket that is not a stale zc control socket"]);
    let _conn = std::os::unix::net::UnixStream::connect(&p.socket).expect("still live");
    assert!(live.accept().is_ok());
    drop(live);
    // Now stale: nobody listens. The agent replaces it and serves.
    let mut agent = Agent {
        child: None,
        socket: p.socket.clone(),
        dir: p.dir.join("agent"),
        pin_dir: p.pin_dir.clone(),
        extra: Vec::new(),
        wrap: Vec::new(),
    };
    assert!(p.socket.exists(), "the stale socket file");
    // spawn() removes the file first; start the agent here to keep it.
    let child = agent_cmd(&p.socket, &p.pin_dir).spawn().expect("zc agent");
    agent.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.zc(&["list"]).0 {
        assert!(
            Instant::now() < deadline,
            "the agent did not replace the stale socket and serve"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
