//! `zc agent`, `zc pair`, `zc unpair`, `zc list`: the command-line side
//! of the agent.
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use log::{info, warn};
use zc_user::{
    agent::{
        Agent, DEFAULT_MAX_STOP, DataPath, OnStop, Options,
        control::{self, DEFAULT_SOCKET},
        lock, pins,
        proto::{PairStats, Request, Response},
    },
    ebpf::{Programs, ShortCircuitTotals},
    watch::Watcher,
};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Read the agent's settings from this TOML file: each key is a flag's
    /// long name (`pin-dir = "/sys/fs/bpf/zc"`, `max-stop = 20`,
    /// `unpin-on-exit = true`); flags on the command line win. The default
    /// file is used only if it exists; a file given here must. An unknown
    /// key or a bad value is a usage error naming the file, line and key.
    #[arg(long, value_name = "PATH", default_value = crate::agent_config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Control socket to serve. A stale socket left there by a dead agent
    /// is replaced; anything else (a live socket, a regular file, a link)
    /// is refused and left alone.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Let members of this group (name or gid) use the control socket
    /// (it becomes 0660 and group-owned); without it only root can.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Directory on bpffs where the agent pins its maps, so pairs outlive
    /// the agent (kill -9 included) and a restarted agent adopts them.
    /// bpffs is mounted on /sys/fs/bpf if it is not there. The agent
    /// creates it 0700 and refuses to start on one it does not own (bpffs
    /// lets anyone create it), with other entries, or with pins of another
    /// layout version; `--cleanup` removes such a directory. One agent at
    /// a time per pin directory and per --socket (locks in /run/zc).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// On SIGINT/SIGTERM, end every pair and remove the pinned maps
    /// (default: pairs stay in the kernel and keep moving bytes).
    #[arg(long)]
    unpin_on_exit: bool,
    /// Remove --pin-dir and everything in it, ending any pairs left there,
    /// and exit; also a directory someone else made there. Refuses while
    /// an agent uses that directory or serves --socket.
    #[arg(long)]
    cleanup: bool,
    /// auto: BPF if its programs load, else splice (and say why). splice:
    /// never load BPF; handed-over sockets are spliced and pid/fd pairing
    /// is refused, since a user-space relay would race the owner's reads.
    #[arg(long, value_enum, default_value_t = DataPathArg::Auto)]
    data_path: DataPathArg,
    /// cgroup v2 directory whose sockets sock_ops records by 4-tuple for
    /// `zc pair TUPLE TUPLE` (default: the root of the cgroup2 hierarchy,
    /// mounted on /run/zc/cgroup2 if the host has only cgroup v1; narrow
    /// it to the proxy's cgroup). Required by --short-circuit, which acts
    /// on the same cgroup.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Short-circuit connections between two sockets of this host in
    /// --cgroup: as both ends are established they join an sk_msg map, and
    /// what one end sends goes straight into the other's receive queue,
    /// skipping TCP/IP. `zc stats` shows what it carried. Needs --cgroup,
    /// naming a cgroup made for the applications meant: a socket in an
    /// sk_msg map can no longer be read with splice(2), and FIONREAD may
    /// report 0 on it, so the cgroup is the promise that its programs do
    /// neither. Refused for the root cgroup and any cgroup holding the
    /// agent or PID 1. A connection joins only when its listener was
    /// opened in the cgroup while the agent ran, and both ends are there.
    #[arg(long, requires = "cgroup")]
    short_circuit: bool,
    /// The longest a pairing holds a proxy still, in milliseconds. The
    /// agent stops the proxy's threads (ptrace), checks that it holds no
    /// bytes between the two sockets, pairs them, and waits for the kernel
    /// to take what was queued; a pairing not confirmed by then is undone
    /// before the proxy goes on, and refused. Undoing a pairing in which
    /// the kernel had moved bytes already adds the time to deliver them
    /// (at most half a second, as `zc unpair`).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_MAX_STOP.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_stop: u64,
    /// Serve Prometheus metrics on http://ADDR/metrics (and /healthz, 200
    /// while the agent accepts requests, else 503 and why): pairs, bytes
    /// by direction and data path, failed redirects, held FINs, map fill,
    /// the kernel's backlog, pairing requests by answer. `:9101` for every
    /// IPv4 address; port 0 picks one (`zc status` says which).
    #[arg(long, value_name = "ADDR", value_parser = zc_user::cli::parse_listen)]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathArg {
    Auto,
    Splice,
}

/// Where `zc agent` pins its maps by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/zc";

#[derive(clap::Args)]
pub struct PairArgs {
    /// Two sockets recorded by the agent, as `ss -tn` prints them:
    /// LOCAL-REMOTE, e.g. 10.0.0.5:443-10.0.0.9:51234 (root or the
    /// agent's --group only; both held by one process, unless root). Or
    /// use --pid and --fd.
    #[arg(value_name = "TUPLE", conflicts_with_all = ["pid", "fds"])]
    tuples: Vec<String>,
    /// The process that owns both sockets (a proxy).
    #[arg(long, value_name = "PID", requires = "fds")]
    pid: Option<i32>,
    /// The two sockets, as fd numbers in that process (see `ls -l
    /// /proc/PID/fd` or `ss -tnp`); give --fd twice.
    #[arg(long = "fd", value_name = "FD", num_args = 1, requires = "pid")]
    fds: Vec<i32>,
    /// With TUPLE: the network namespace the sockets live in (a
    /// container's), named by a pid in it or a file such as
    /// /run/netns/NAME; default the agent's. Pairing by --pid needs none.
    #[arg(long, value_name = "PID|PATH", requires = "tuples")]
    netns: Option<String>,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
pub struct UnpairArgs {
    /// The pair's id, as `zc pair` and `zc list` print it.
    id: u64,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Print JSON instead of a table, for scripts.
    #[arg(long)]
    json: bool,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
pub struct StatsArgs {
    /// Print JSON instead of a table, for scripts.
    #[arg(long)]
    json: bool,
    /// Print again every SECS seconds, with rates, until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub async fn agent(args: AgentArgs) -> Result<()> {
    crate::raise_fd_limit();
    if args.short_circuit && !args.cleanup {
        // Before anything is touched, lock files included: a refusal
        // changes nothing.
        let cgroup = args
            .cgroup
            .as_deref()
            .context("--short-circuit needs --cgroup")?;
        check_short_circuit_cgroup(cgroup)?;
    }
    // One agent per pin directory and socket.
    let _locks = take_locks(&args)?;
    if args.cleanup {
        return cleanup(&args);
    }
    zc_user::agent::control::clear_socket_path(&args.socket)?;
    let group = match &args.group {
        None => None,
        Some(g) => Some(resolve_group(g)?),
    };
    let mut no_recording = Some("BPF is not in use".to_string());
    let mut no_fin_hold = Some("BPF is not in use".to_string());
    let mut no_short_circuit = Some(if args.short_circuit {
        "BPF is not in use".to_string()
    } else {
        "not asked for (--short-circuit)".to_string()
    });
    let mut pin_dir = None;
    let path = match args.data_path {
        DataPathArg::Splice => DataPath::Splice(zc_user::agent::metrics::FORCED_SPLICE.into()),
        DataPathArg::Auto => match load_bpf(&args.pin_dir)? {
            Ok((progs, guard)) => {
                no_fin_hold = guard;
                pin_dir = Some(args.pin_dir.clone());
                no_recording = match cgroup_root(args.cgroup.as_deref())
                    .and_then(|c| progs.enable_recording(&c).map(|()| c).map_err(Into::into))
                {
                    Ok(c) => {
                        info!("recording established sockets in cgroup {}", c.display());
                        None
                    }
                    Err(e) => {
                        warn!("pairing by tuple unavailable: {e:#}");
                        Some(format!("{e:#}"))
                    }
                };
                if args.short_circuit {
                    no_short_circuit = match &no_recording {
                        Some(why) => Some(format!("sockets are not recorded: {why}")),
                        None => progs.enable_short_circuit().err().map(|e| e.to_string()),
                    };
                    match &no_short_circuit {
                        None => info!("short-circuiting same-host connections"),
                        Some(why) => bail!("--short-circuit: {why}"),
                    }
                }
                let watcher = Watcher::start().context("starting the socket watcher")?;
                DataPath::Bpf(progs, watcher)
            }
            Err(e) => {
                warn!("BPF unavailable, handed-over sockets will be spliced: {e:#}");
                DataPath::Splice(format!("{e:#}"))
            }
        },
    };
    let mode = match &path {
        DataPath::Bpf(..) => "bpf".to_string(),
        DataPath::Splice(why) => format!("splice ({why})"),
    };
    // Bound before the agent exists, so that a taken port fails the start.
    let metrics = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics {addr}"))?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics {
        Some(l) => Some(l.local_addr().context("the metrics address")?),
        None => None,
    };
    let agent = Agent::new(
        path,
        Options {
            group,
            no_recording,
            no_fin_hold,
            no_short_circuit,
            pin_dir,
            max_stop: std::time::Duration::from_millis(args.max_stop),
            metrics: metrics_addr,
        },
    );
    let _metrics = metrics.map(|l| {
        if let Some(a) = metrics_addr {
            info!("zc agent: metrics on http://{a}/metrics");
        }
        crate::AbortOnDrop(tokio::spawn(zc_user::metrics::serve(
            l,
            agent.metrics(),
            agent.health(),
        )))
    });
    let stop = crate::stop_signal();
    let listener = control::bind_control(&args.socket, group)?;
    info!(
        "zc agent: data path {mode}; serving {} ({})",
        args.socket.display(),
        match group {
            Some(g) => format!("root and group {g}"),
            None => "root only".into(),
        }
    );
    let on_stop = if args.unpin_on_exit {
        OnStop::Remove
    } else {
        OnStop::Keep
    };
    agent.serve(listener, stop, on_stop).await;
    let _ = std::fs::remove_file(&args.socket);
    if args.unpin_on_exit {
        pins::remove_all(&args.pin_dir)?;
    }
    Ok(())
}

/// The agent's locks (see `zc_user::agent::lock`), or which agent holds
/// them.
fn take_locks(args: &AgentArgs) -> Result<[lock::Lock; 2]> {
    Ok([
        lock::take(
            &lock::pin_dir_lock(&args.pin_dir)?,
            &format!("the pin directory {}", args.pin_dir.display()),
        )?,
        lock::take(
            &lock::socket_lock(&args.socket),
            &format!("the control socket {}", args.socket.display()),
        )?,
    ])
}

/// Loads the programs with maps pinned in `dir` and the FIN hold. The
/// outer error is fatal (a pin directory the agent cannot trust: falling
/// back to splice would hide it); the inner one means BPF is unavailable.
fn load_bpf(dir: &std::path::Path) -> Result<Result<(Programs, Option<String>)>> {
    if let Err(e) = ensure_bpffs(dir) {
        return Ok(Err(e));
    }
    match pins::prepare(dir)? {
        pins::Found::Empty => {}
        pins::Found::Pins => info!("reusing the pins in {}", dir.display()),
    }
    let progs = match Programs::load_pinned(dir) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Err(anyhow::Error::new(e).context(format!(
                "loading the programs with maps pinned in {}",
                dir.display()
            ))));
        }
    };
    pins::mark(dir)?;
    let no_fin_hold = match progs.enable_fin_hold() {
        Ok(()) => {
            info!("FIN hold active: a proxy cannot see a paired stream end before its bytes left");
            None
        }
        Err(e) => {
            warn!(
                "{e}; a proxy that shuts a socket down as soon as it sees EOF may cut off bytes \
                 still queued in the kernel"
            );
            Some(e.to_string())
        }
    };
    Ok(Ok((progs, no_fin_hold)))
}

/// `given`, or the root of the cgroup2 hierarchy.
fn cgroup_root(given: Option<&std::path::Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => zc_user::host::cgroup2_root().context("finding the cgroup2 hierarchy"),
    }
}

/// Refuses a cgroup that would short-circuit programs that did not ask
/// for it: the root (every process on the host), or one holding the agent
/// or PID 1 (a cgroup's sock_ops program runs for its descendants too).
fn check_short_circuit_cgroup(cgroup: &std::path::Path) -> Result<()> {
    let canonical = |p: &std::path::Path| {
        std::fs::canonicalize(p).with_context(|| format!("--cgroup {}", p.display()))
    };
    let root = canonical(&zc_user::host::cgroup2_root().context("finding the cgroup2 hierarchy")?)?;
    let chosen = canonical(cgroup)?;
    let Ok(rel) = chosen.strip_prefix(&root) else {
        bail!(
            "--short-circuit: --cgroup {} is not in the cgroup2 hierarchy ({})",
            cgroup.display(),
            root.display()
        );
    };
    if rel.as_os_str().is_empty() {
        bail!(
            "--short-circuit refuses the root cgroup ({}): every process on the host lives there, \
             and a short-circuited socket breaks splice(2) and FIONREAD for its owner; make a \
             cgroup for the applications meant and give it with --cgroup",
            root.display()
        );
    }
    for (who, pid) in [("the agent", "self"), ("PID 1", "1")] {
        let Some(own) = cgroup2_of(pid)? else {
            continue;
        };
        if std::path::Path::new("/")
            .join(&own)
            .starts_with(std::path::Path::new("/").join(rel))
        {
            bail!(
                "--short-circuit refuses --cgroup {}: it holds {who} (in /{}); give a cgroup \
                 made for the applications meant",
                cgroup.display(),
                own.display()
            );
        }
    }
    Ok(())
}

/// The cgroup2 path of a process, relative to the hierarchy's root, or
/// None when the process is in no cgroup2 (a pure v1 host).
fn cgroup2_of(pid: &str) -> Result<Option<PathBuf>> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/'))))
}

/// `--cleanup`, with the agent's locks held (no agent uses the directory).
fn cleanup(args: &AgentArgs) -> Result<()> {
    if control::connect_control(&args.socket).is_ok() {
        bail!(
            "an agent is serving {}; stop it first (or stop it with --unpin-on-exit)",
            args.socket.display()
        );
    }
    let removed = pins::remove_all(&args.pin_dir)?;
    println!(
        "removed {} and {} pinned object(s) in it; pairs left there have ended",
        args.pin_dir.display(),
        removed.entries
    );
    if !removed.foreign.is_empty() {
        println!("it was not (only) zc's: {}", removed.foreign.join("; "));
    }
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf when the pin directory lives there and
/// nothing is mounted yet. Agents of other pin directories may start at
/// the same moment: the check and the mount happen under one lock, so
/// that they never stack two mounts (the pins of the first would vanish
/// under the second).
fn ensure_bpffs(dir: &std::path::Path) -> Result<()> {
    const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);
    let root = std::path::Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Ok(());
    }
    let _mounting = lock::wait(
        &std::path::Path::new(lock::LOCK_DIR).join("bpffs.lock"),
        "mounting bpffs",
    )?;
    if nix::sys::statfs::statfs(root).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC) {
        return Ok(());
    }
    zc_user::host::mount_fs("bpf", root).context("mounting bpffs on /sys/fs/bpf")?;
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

fn resolve_group(g: &str) -> Result<u32> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(g).context("looking up the group")? {
        Some(gr) => Ok(gr.gid.as_raw()),
        None => bail!("no group named `{g}`"),
    }
}

fn answer(resp: Response) -> Result<Response> {
    if let Response::Error { kind, message } = resp {
        bail!("the agent refused ({kind:?}): {message}");
    }
    Ok(resp)
}

pub async fn pair(args: PairArgs) -> Result<()> {
    let req = match (args.pid, &args.fds[..], &args.tuples[..]) {
        (Some(pid), [a, b], []) => Request::PairPid { pid, fds: [*a, *b] },
        (None, [], [a, b]) => Request::PairTuple {
            sockets: [a.clone(), b.clone()],
            netns: args.netns.clone(),
        },
        _ => bail!("give two sockets: TUPLE TUPLE, or --pid PID --fd A --fd B"),
    };
    if let Response::Paired { id, pair } = answer(control::call(&args.socket, &req)?)? {
        println!("pair {id}: {} <-> {}", pair.sockets[0], pair.sockets[1]);
    }
    Ok(())
}

pub async fn unpair(args: UnpairArgs) -> Result<()> {
    let how = match answer(control::call(
        &args.socket,
        &Request::Unpair { id: args.id },
    )?)? {
        Response::Unpaired { how, .. } => how,
        _ => String::new(),
    };
    println!("pair {} unpaired: {how}", args.id);
    Ok(())
}

pub async fn list(args: ListArgs) -> Result<()> {
    if let Response::Pairs { pairs } = answer(control::call(&args.socket, &Request::List)?)? {
        if args.json {
            println!("{}", serde_json::to_string(&pairs)?);
        } else if pairs.is_empty() {
            println!("no pairs");
        } else {
            println!("{:<5} {:<22} sockets", "id", "source");
            for p in pairs {
                println!(
                    "{:<5} {:<22} {} <-> {}",
                    p.id, p.source, p.sockets[0], p.sockets[1]
                );
            }
        }
    }
    Ok(())
}

pub async fn stats(args: StatsArgs) -> Result<()> {
    let fetch = || -> Result<(Vec<PairStats>, Option<ShortCircuitTotals>)> {
        match answer(control::call(&args.socket, &Request::Stats)?)? {
            Response::Stats {
                pairs,
                short_circuit,
            } => Ok((pairs, short_circuit)),
            other => bail!("unexpected answer from the agent: {other:?}"),
        }
    };
    let json = |pairs: &[PairStats], sc: &Option<ShortCircuitTotals>| {
        serde_json::json!({ "pairs": pairs, "short_circuit": sc }).to_string()
    };
    let Some(every) = args.watch else {
        let (pairs, sc) = fetch()?;
        if args.json {
            println!("{}", json(&pairs, &sc));
        } else {
            print_stats(&pairs, None);
            print_short_circuit(sc.as_ref());
        }
        return Ok(());
    };
    let every = std::time::Duration::try_from_secs_f64(every)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--watch needs a positive number of seconds")?;
    let mut last: Option<(std::time::Instant, Vec<PairStats>)> = None;
    let stop = crate::stop_signal();
    tokio::pin!(stop);
    loop {
        let (pairs, sc) = fetch()?;
        let now = std::time::Instant::now();
        if args.json {
            println!("{}", json(&pairs, &sc));
        } else {
            let prev = last
                .as_ref()
                .map(|(t, p)| (now.duration_since(*t).as_secs_f64(), p));
            print_stats(&pairs, prev);
            print_short_circuit(sc.as_ref());
        }
        last = Some((now, pairs));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

fn print_short_circuit(sc: Option<&ShortCircuitTotals>) {
    if let Some(t) = sc {
        println!(
            "short-circuit: {} connection(s) now, {} so far; carried {} bytes in {} sends",
            t.now, t.connections, t.bytes, t.msgs
        );
    }
}

fn print_stats(pairs: &[PairStats], prev: Option<(f64, &Vec<PairStats>)>) {
    if pairs.is_empty() {
        println!("no pairs");
        return;
    }
    println!(
        "{:<5} {:>16} {:>16} {:>12} {:>12} {:>8}  sockets",
        "id", "bytes 0->1", "bytes 1->0", "skbs 0->1", "skbs 1->0", "failed"
    );
    for p in pairs {
        let rate = prev.and_then(|(secs, old)| {
            let o = old.iter().find(|o| o.id == p.id)?;
            let r = |i: usize| p.bytes[i].saturating_sub(o.bytes[i]) as f64 / secs / 1e6;
            Some(format!("  ({:.1} / {:.1} MB/s)", r(0), r(1)))
        });
        println!(
            "{:<5} {:>16} {:>16} {:>12} {:>12} {:>8}  {} <-> {}{}",
            p.id,
            p.bytes[0],
            p.bytes[1],
            p.msgs[0],
            p.msgs[1],
            p.failed[0] + p.failed[1],
            p.sockets[0],
            p.sockets[1],
            rate.unwrap_or_default()
        );
    }
}

/// The agent's part of `zc status`: None when no agent answers on `socket`.
pub fn agent_status(socket: &std::path::Path) -> Option<zc_user::agent::proto::AgentStatus> {
    match control::call(socket, &Request::Status) {
        Ok(Response::Status(s)) => Some(s),
        _ => None,
    }
}

pub fn print_agent_status(
    socket: &std::path::Path,
    s: Option<&zc_user::agent::proto::AgentStatus>,
) {
    let Some(s) = s else {
        println!("agent:  not running (no answer on {})", socket.display());
        return;
    };
    let say = |v: &Option<String>| {
        v.as_deref()
            .map_or("available".to_string(), |w| format!("unavailable: {w}"))
    };
    println!(
        "agent:  running on {}, data path {}, {} pair(s)",
        socket.display(),
        s.data_path,
        s.pairs
    );
    println!("  pair by pid/fd: {}", say(&s.pid_pairing));
    println!("  pair by tuple:  {}", say(&s.tuple_pairing));
    println!("  handoff:        available");
    println!(
        "  short-circuit:  {}",
        s.short_circuit
            .as_deref()
            .map_or("on".to_string(), |w| format!("off: {w}"))
    );
    println!(
        "  FIN hold:       {}",
        s.fin_hold.as_deref().map_or(
            format!(
                "active ({} FINs held, {} taken off data, {} sent round again)",
                s.fins_held, s.fins_stripped, s.fins_requeued
            ),
            |w| format!("off: {w}")
        )
    );
    match &s.pin_dir {
        Some(d) => println!("  pinned in {d}: {}", s.pinned.join(", ")),
        None => println!("  nothing pinned"),
    }
    if let Some(m) = &s.metrics {
        println!("  metrics:        http://{m}/metrics");
    }
}
