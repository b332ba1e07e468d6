//! The systems under test: a direct connection, `zc relay` in each mode,
//! and relays the user names with `--peer`. Each relay is a child process
//! so its CPU and memory are its own.
use std::{
    collections::VecDeque,
    io::BufRead as _,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    kmem::{self, RelaySockets},
    topology::{Topology, within},
};

#[derive(Clone, Debug)]
pub enum Spec {
    Direct,
    Zc(&'static str),
    Peer { name: String, command: String },
}

impl Spec {
    pub fn name(&self) -> String {
        match self {
            Spec::Direct => "direct".into(),
            Spec::Zc(mode) => (*mode).into(),
            Spec::Peer { name, .. } => name.clone(),
        }
    }

    /// `NAME=COMMAND`; COMMAND may use {listen}, {listen_host},
    /// {listen_port}, {upstream}, {upstream_host}, {upstream_port}.
    pub fn parse_peer(s: &str) -> Result<Self, String> {
        let (name, command) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=COMMAND"))?;
        if name.is_empty() || command.trim().is_empty() {
            return Err(format!("`{s}` needs both a name and a command"));
        }
        if !command.contains("{listen") {
            return Err(format!(
                "the command for `{name}` must say where to listen: use {{listen}} or {{listen_port}}"
            ));
        }
        Ok(Spec::Peer {
            name: name.to_string(),
            command: command.to_string(),
        })
    }
}

/// A started system: where clients connect, and the relay process if any.
pub struct Running {
    pub name: String,
    pub addr: SocketAddr,
    child: Option<Child>,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Running {
    pub fn start(
        spec: &Spec,
        topo: &Topology,
        upstream: SocketAddr,
        relay_args: &str,
    ) -> Result<Self> {
        let name = spec.name();
        match spec {
            Spec::Direct => Ok(Self {
                name,
                addr: upstream,
                child: None,
                log: Arc::default(),
            }),
            Spec::Zc(mode) => {
                let exe = std::env::current_exe().context("finding the zc binary")?;
                let mut argv = topo.relay_prefix();
                argv.push(exe.to_string_lossy().into_owned());
                argv.extend(
                    [
                        "relay",
                        "--mode",
                        mode,
                        "--listen",
                        &SocketAddr::new(topo.relay_ip, 0).to_string(),
                        "--upstream",
                        &upstream.to_string(),
                    ]
                    .map(String::from),
                );
                argv.extend(relay_args.split_whitespace().map(String::from));
                let (child, lines, log) = spawn(&argv)?;
                let mut me = Self {
                    name,
                    addr: upstream,
                    child: Some(child),
                    log,
                };
                me.addr = me.wait_for_start_line(&lines)?;
                Ok(me)
            }
            Spec::Peer { command, .. } => {
                let port = within(topo.relay.as_ref(), || -> Result<u16> {
                    Ok(TcpListener::bind((topo.relay_ip, 0))?.local_addr()?.port())
                })??;
                let listen = SocketAddr::new(topo.relay_ip, port);
                let cmd = command
                    .replace("{listen}", &listen.to_string())
                    .replace("{listen_host}", &listen.ip().to_string())
                    .replace("{listen_port}", &port.to_string())
                    .replace("{upstream}", &upstream.to_string())
                    .replace("{upstream_host}", &upstream.ip().to_string())
                    .replace("{upstream_port}", &upstream.port().to_string());
                let mut argv = topo.relay_prefix();
                argv.extend(["sh".into(), "-c".into(), format!("exec {cmd}")]);
                let (child, _lines, log) = spawn(&argv)?;
                let mut me = Self {
                    name,
                    addr: listen,
                    child: Some(child),
                    log,
                };
                me.wait_until_accepting(topo)?;
                Ok(me)
            }
        }
    }

    fn wait_for_start_line(&mut self, lines: &mpsc::Receiver<String>) -> Result<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "{} relay did not start within 20 s; its log:\n{}",
                    self.name,
                    self.log_tail()
                )
            })?;
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split(',').next().unwrap_or_default();
                return addr
                    .parse()
                    .with_context(|| format!("reading the address in `{line}`"));
            }
        }
    }

    fn wait_until_accepting(&mut self, topo: &Topology) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = within(topo.client.as_ref(), || {
                TcpStream::connect(self.addr).is_ok()
            })?;
            if ok {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept on {} within 20 s; its output:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Whether the relay process is still running (always, for direct).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child
            && let Some(st) = child.try_wait()?
        {
            bail!(
                "{} exited ({st}); its output:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// CPU seconds used by the relay process and its descendants.
    pub fn cpu_secs(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        Some(tree(pid).iter().filter_map(|&p| proc_cpu(p)).sum())
    }

    /// The relay's sockets, for the memory sampler (None for direct).
    pub fn relay_sockets(&self, topo: &Topology) -> Result<Option<RelaySockets>> {
        self.child
            .as_ref()
            .map(|c| RelaySockets::open(topo, c.id()))
            .transpose()
    }

    /// Resident memory of the relay process and its descendants, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        Some(tree(pid).iter().filter_map(|&p| proc_rss_kib(p)).sum())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // SIGTERM first so a zc relay unloads its programs cleanly.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(8);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

type Spawned = (Child, mpsc::Receiver<String>, Arc<Mutex<VecDeque<String>>>);

/// Starts argv with stderr and stdout read by a thread that keeps the last
/// lines (for error messages) and forwards each line to the receiver. It
/// keeps reading after nobody listens, so the child never blocks on a log.
fn spawn(argv: &[String]) -> Result<Spawned> {
    let (prog, rest) = argv.split_first().context("empty command")?;
    let mut child = Command::new(prog)
        .args(rest)
        // ZC_BENCH_LOG gives the systems another log filter, to see why
        // one failed (its last 40 lines are shown).
        .env(
            "RUST_LOG",
            std::env::var("ZC_BENCH_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", argv.join(" ")))?;
    let stderr = child.stderr.take().context("child stderr")?;
    let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let (tx, rx) = mpsc::channel();
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(mut l) = keep.lock() {
                if l.len() == 40 {
                    l.pop_front();
                }
                l.push_back(line.clone());
            }
            let _ = tx.send(line);
        }
    });
    Ok((child, rx, log))
}

/// `pid` and every process descended from it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = stat_fields(p).and_then(|f| f.get(1).and_then(|v| v.parse().ok())) {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name (state is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// utime + stime of one process, seconds.
fn proc_cpu(pid: u32) -> Option<f64> {
    zc_user::host::process_cpu_secs(pid).ok()
}

fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Busy CPU seconds of the whole machine, all cores: everything but idle
/// and iowait, so softirq and kernel threads count.
pub fn machine_cpu_secs() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = s.lines().next().context("/proc/stat is empty")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        bail!("unexpected /proc/stat line: {line}");
    }
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Ok(busy / zc_user::host::clock_ticks())
}

/// Memory in use by the whole machine (MemTotal - MemAvailable), KiB.
pub fn machine_used_kib() -> Result<u64> {
    Ok(kmem::meminfo_kib("MemTotal")?.saturating_sub(kmem::meminfo_kib("MemAvailable")?))
}
