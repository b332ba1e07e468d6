//! The `zc` command line.
mod agent_cmd;
mod agent_config;
mod bench;
mod demo;
mod docs;

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use log::{error, info, warn};
use zc_user::{
    engine::{
        Engine, Mode,
        bpf::BpfEngine,
        copy::CopyEngine,
        splice::{PipePool, Recorder, SpliceEngine},
    },
    relay::{Config, Relay},
    watch::Watcher,
};

#[derive(Parser)]
#[command(
    name = "zc",
    // build.rs stamps the git revision and the embedded eBPF object's hash.
    version = concat!(
        env!("CARGO_PKG_VERSION"),
        " (git ",
        env!("ZC_GIT_REV"),
        ", eBPF ",
        env!("ZC_EBPF_HASH"),
        ")"
    ),
    long_version = concat!(
        env!("CARGO_PKG_VERSION"),
        "\ngit revision: ",
        env!("ZC_GIT_REV"),
        "\neBPF object:  xxh3 ",
        env!("ZC_EBPF_HASH")
    ),
    about = "Move bytes between two TCP sockets without visiting user space",
    long_about = "zc joins pairs of TCP sockets inside the kernel with eBPF sockmap programs: \
                  what arrives on one socket leaves through the other without being copied \
                  into any process.\n\nLogs go to stderr; set RUST_LOG (error, warn, info, debug) \
                  to change how much. eBPF-side messages appear at debug level."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a TCP proxy: accept clients on --listen, connect each to
    /// --upstream, and relay the bytes in the kernel.
    #[command(
        long_about = "Run a TCP proxy: accept clients on --listen, connect each to --upstream, and \
                      join the two sockets so the bytes move without entering this process.\n\n\
                      Half-close and reset are carried across: when one side shuts down its write \
                      side, the other sees EOF after every byte sent before it; a reset on one side \
                      resets the other.\n\nRuns until SIGINT or SIGTERM, then stops accepting, lets \
                      open connections finish for --shutdown-grace, resets the rest and unloads \
                      everything it loaded.\n\nNeeds root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN.",
        after_help = "Example:\n  zc relay --listen 0.0.0.0:8080 --upstream 10.0.0.9:80\n  zc relay --listen [::]:5201 --upstream [::1]:5202"
    )]
    Relay(RelayArgs),
    /// Say which data path zc would use here and why: BPF programs,
    /// redirect self-test, fallback.
    Status(StatusArgs),
    /// Show zc at work: relay bytes through the kernel next to a direct
    /// connection and print throughput, integrity and the relay's CPU time.
    Demo(demo::DemoArgs),
    /// Measure direct, bpf, splice and copy (and relays you name) side by
    /// side: throughput, latency, CPU and memory, on loopback and across
    /// network namespaces.
    #[command(
        long_about = "Measure what each mode buys on this machine. One run starts a server, zc relays \
                      in bpf, splice and copy mode (and any --peer relay), and measures them next \
                      to a direct connection: bulk throughput by write size, 1 and several \
                      streams; 64-byte ping-pong latency (p50, p99, p99.9); many connections \
                      held open (memory per connection). CPU is counted for the relay process \
                      and for the whole machine, kernel work included. Repetitions are \
                      interleaved across systems; the table shows medians with min-max and \
                      ratios against direct and copy, then the targets zc holds its BPF mode to.\n\n\
                      Needs root: it creates network namespaces (removed afterwards, also on \
                      Ctrl-C) and loads BPF programs.",
        after_help = "Examples:\n  zc bench --quick\n  zc bench --json bench.json --svg bench.svg\n  \
                      zc bench --topology loopback --workloads bulk --write-sizes 64k,1m --reps 5\n  \
                      zc bench --peer 'socat=socat TCP-LISTEN:{listen_port},bind={listen_host},fork,reuseaddr TCP:{upstream}'"
    )]
    Bench(bench::BenchArgs),
    /// Run the agent: pair sockets of other processes (an unmodified
    /// proxy) in the kernel when `zc pair` asks.
    #[command(
        long_about = "Run the agent that pairs sockets of other processes in the kernel. A proxy \
                      you already run keeps accepting and connecting; `zc pair --pid PID --fd A \
                      --fd B` then hands two of its sockets to the agent, which joins them with \
                      the sockmap redirect so the proxy stops touching the bytes. The agent \
                      carries half-close and reset across and removes a pair when it ends, giving \
                      the proxy back the socket options pairing changed.\n\n\
                      Requests arrive on a Unix control socket (0600; 0660 with --group), and \
                      each is checked against the sender's credentials: root may pair any \
                      process's sockets; others only sockets the kernel would let them take \
                      themselves (its ptrace-attach check, run with their credentials), both \
                      held by one process.\n\n\
                      One agent runs per pin directory and control socket (flock'd lock files \
                      in /run/zc); a second one refuses before it touches anything. The pin \
                      directory must be the agent's own (created 0700 by it, holding only zc's \
                      pins of this layout version): one made by another user, or holding other \
                      entries, is refused with the path and the fix (`zc agent --cleanup`).\n\n\
                      Needs root (pidfd_getfd and BPF).",
        after_help = "Example:\n  zc agent &\n  ss -tnp | grep haproxy      # find the proxy's pid and fds\n  \
                      zc pair --pid 4242 --fd 12 --fd 13\n  zc list\n  zc unpair 1"
    )]
    Agent(agent_cmd::AgentArgs),
    /// Ask the agent (`zc agent`) to pair two sockets of a running proxy,
    /// by 4-tuple or by pid and fd numbers.
    #[command(
        long_about = "Ask the agent to pair two sockets of a running proxy, by 4-tuple (as \
                      `ss -tn` prints them) or by pid and fd numbers (as `ss -tnp` shows them).\n\n\
                      A busy connection can be paired: the agent holds the proxy still (ptrace, \
                      so that a killed agent cannot leave it stopped) at a moment it holds no \
                      bytes it has read from one socket and not yet written to the other, pairs, \
                      and lets it continue, within the agent's --max-stop (50 ms unless set). \
                      A poll or select loop (socat) is paired only where it cannot go on to \
                      read a socket it was told before is readable (once paired, that read \
                      would fail with EAGAIN): one of a single thread is stepped there through \
                      its system calls, and let go once its next select sleeps. \
                      A pairing the kernel has not confirmed by then is undone before the proxy \
                      goes on, and refused. A proxy that adds or rewrites bytes (PROXY protocol, \
                      TLS) never reaches such a moment and is refused: zc pairs only \
                      byte-transparent (TCP-mode) proxies. A proxy under a debugger or strace \
                      is refused. Requests for one proxy take turns.\n\n\
                      Root may pair any sockets. Anyone else (the agent's --group) gets what the \
                      kernel would let them take with ptrace: the agent takes the sockets with \
                      the requester's uid, gid and groups and no capabilities, so the owner must \
                      have the same uid and gid, be dumpable, hold no capability the requester \
                      lacks, and pass Yama and other security modules. Both sockets must belong to \
                      one process, by tuple as by pid; only root may join two processes' sockets. \
                      A refused request stops nothing and changes nothing.",
        after_help = "Examples:\n  zc pair 10.0.0.5:443-10.0.0.9:51234 10.0.0.5:40100-10.0.0.7:8443\n  \
                      zc pair --pid 4242 --fd 12 --fd 13"
    )]
    Pair(agent_cmd::PairArgs),
    /// Ask the agent (`zc agent`) to end a pairing and give the owner its
    /// sockets back.
    ///
    /// The owner gets the socket options they had before pairing. It is
    /// stopped for at most half a second while the kernel sends what it
    /// queued; then either every byte the kernel accepted has been
    /// delivered and the owner goes on, or, if some could not be (a reader
    /// too slow to drain in time), both connections are reset so no end
    /// mistakes a cut stream for a whole one. The answer says which.
    Unpair(agent_cmd::UnpairArgs),
    /// List the agent's pairs (asks `zc agent`).
    List(agent_cmd::ListArgs),
    /// Show what moved through each of the agent's pairs (asks `zc agent`).
    ///
    /// Bytes, skbs and failed redirects per direction from the BPF counters (live byte
    /// counts for spliced pairs), and what the same-host short-circuit
    /// carried when it is on. `--json` prints {"pairs": [...],
    /// "short_circuit": {...} or null}.
    Stats(agent_cmd::StatsArgs),
    /// Print a shell completion script for zc, e.g.
    /// `zc completions bash > /etc/bash_completion.d/zc`.
    Completions {
        /// The shell to complete for (bash, zsh, fish, elvish, powershell).
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write zc's man pages (zc.1 and one per command) into DIR.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Print one JSON object instead of text, for scripts.
    #[arg(long)]
    json: bool,
    /// Also ask the agent on this control socket what it can do.
    #[arg(long, value_name = "PATH", default_value = zc_user::agent::control::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,
}

async fn status(args: StatusArgs) -> Result<()> {
    // Maps sized for the self-test's one pair: status only asks whether
    // the kernel path works here.
    let (verdict, _) = zc_user::probe::choose(2).await;
    if args.json {
        let mut v = serde_json::to_value(&verdict)?;
        v["agent"] = serde_json::to_value(agent_cmd::agent_status(&args.socket))?;
        println!("{v}");
    } else {
        println!("kernel: {}", verdict.kernel);
        println!(
            "bpf:    {}",
            verdict
                .bpf_unavailable
                .as_deref()
                .unwrap_or("ready (programs load, redirect self-test passed)")
        );
        println!("mode:   {} ({})", verdict.mode, verdict.reason);
        agent_cmd::print_agent_status(&args.socket, agent_cmd::agent_status(&args.socket).as_ref());
    }
    Ok(())
}

#[derive(clap::Args)]
struct RelayArgs {
    /// Address to accept clients on: 127.0.0.1:8080, [::]:8080, or :8080
    /// for every IPv4 address.
    #[arg(long, value_name = "ADDR", value_parser = zc_user::cli::parse_listen)]
    listen: SocketAddr,
    /// The server each client is connected to: 10.0.0.9:80 or a name such
    /// as localhost:80 (resolved once, at start; the first address).
    #[arg(long, value_name = "ADDR", value_parser = zc_user::cli::parse_upstream)]
    upstream: SocketAddr,
    /// Data path. auto: bpf if its programs load and pass a self-test,
    /// else splice, else copy (the choice and reason are logged). bpf:
    /// in-kernel sockmap redirect, the bytes never enter a process (needs
    /// root or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN). splice: splice(2) through a pipe
    /// per direction, no user buffer. copy: read/write through a buffer,
    /// the plain baseline. A forced mode that cannot work is an error.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// Write each direction of every connection to its own file in DIR
    /// (NNNNNN-client-to-upstream, NNNNNN-upstream-to-client) while
    /// relaying. The pages are duplicated with tee(2), so recording never
    /// passes through user space either; the in-kernel redirect cannot
    /// duplicate a stream, so a recorded relay uses splice (and says so).
    #[arg(long, value_name = "DIR")]
    record: Option<std::path::PathBuf>,
    /// splice mode: capacity asked for each pipe (sizes: 4096, 64k,
    /// 1MiB, ...).
    #[arg(long, value_name = "BYTES", default_value = "1m", value_parser = zc_user::cli::parse_size_usize)]
    pipe_size: usize,
    /// splice mode: most pipes alive at once, two per connection, so the
    /// relay takes at most half as many connections at once (further
    /// clients wait in the listen backlog). Empty pipes are closed after
    /// use but for a few kept for reuse.
    #[arg(long, value_name = "N", default_value_t = zc_user::engine::splice::DEFAULT_MAX_PIPES)]
    max_pipes: usize,
    /// copy mode: buffer per direction.
    #[arg(long, value_name = "BYTES", default_value = "256k", value_parser = zc_user::cli::parse_size_usize)]
    buffer: usize,
    /// bpf mode: send buffer for both sockets of each pair (0 keeps the
    /// kernel's autotuning). Large buffers keep the in-kernel redirect
    /// from stalling on a momentarily full destination. What waits for a
    /// reader is also kept under half of this (the kernel doubles it), so a
    /// buffer small next to --window makes holds come sooner.
    #[arg(long, value_name = "BYTES", default_value = "16m", value_parser = zc_user::cli::parse_size_usize)]
    sndbuf: usize,
    /// bpf mode: bounds what one direction may have waiting in the kernel
    /// for a slow reader. With --park, past half a window the source is
    /// parked: its bytes wait in its own receive queue (a quarter window,
    /// 1-2 MiB, doubled by the kernel) and TCP flow control stops the
    /// sender. The verdict redirects no byte that would leave more
    /// than two windows less that queue and a quarter window (but at least
    /// one window) unacknowledged by the reader (the quarter window is
    /// what skbs cost beyond their bytes); beyond, it passes arriving bytes
    /// to the socket's own receive queue, where TCP flow control stops the
    /// sender, and zc forwards them once the reader caught up, keeping
    /// within the same bound; then the kernel path takes over again. A
    /// reader that never reads, or
    /// reads slowly, costs at most two windows per direction. The bound is
    /// per connection; for the host, while TCP's memory is under pressure
    /// (net.ipv4.tcp_mem) every direction is held and forwarded in user
    /// space, where that limit applies. Smaller windows hold
    /// bulk streams more often (each hold moves bytes through user space).
    /// 0: no bound (the kernel's own behaviour: the backlog grows without
    /// limit).
    #[arg(long, value_name = "BYTES", default_value = "8m", value_parser = zc_user::cli::parse_size)]
    window: u64,
    /// auto mode on the BPF path: a direction whose segments average fewer
    /// bytes than this in two checks in a row (one every 512 segments) is
    /// forwarded in user space, where one read takes many of them. It is
    /// parked (a sock_ops program on zc's own cgroup takes the socket out
    /// of the redirect map, touching only the relay's own sockets) and read
    /// as a plain socket, as copy mode reads, and goes back to the kernel
    /// after a stay of 1 MiB of forwarding, longer each time it comes back
    /// soon (up to 256 MiB). Where that program cannot attach, or with
    /// --passed-small-reads, it is held, zc reads what the verdict passes
    /// (a program run and a message per segment), and it goes back once
    /// those average twice this (at most 60 KiB). Bulk writes average
    /// about half a full segment (32 KiB on loopback), 16 KiB writes 20-25
    /// KiB. 0 keeps every direction in the kernel, as `--mode bpf` does.
    #[arg(long, value_name = "BYTES", default_value = "28k", value_parser = zc_user::cli::parse_size)]
    small_skb: u64,
    /// bpf mode, experimental: end each hold (see --window) by copying the
    /// held queue with MSG_PEEK while the sender waits and taking it only
    /// after the direction is back in the kernel, instead of forwarding
    /// until the sender pauses. Far fewer bytes cross user space (a
    /// fifth to a tenth in BENCHMARKS.md, tuning log 27), but on 6.18 the
    /// sender can stall for its 200 ms timer now and then after a hand-back:
    /// in `zc bench` it delivered half to two thirds of copy mode's
    /// throughput (tuning log 28).
    #[arg(long)]
    peek_hand_back: bool,
    /// auto mode: read a direction of small segments from what the verdict
    /// passes instead of parking it (see --small-skb): the behaviour before
    /// parked reads, kept for comparison.
    #[arg(long)]
    passed_small_reads: bool,
    /// bpf mode, experimental: park. When more than half a window waits
    /// for a direction's reader, a sock_ops program attached to zc's own
    /// cgroup takes the source socket out of the redirect map, so what
    /// arrives stays in its receive queue and TCP flow control stops the
    /// sender without a byte passing through zc; it goes back once the
    /// reader has caught up. Only the relay's own sockets (its listening
    /// port, its upstream) are touched. Off by default: across network
    /// namespaces senders stall for 200-600 ms after some put-backs and
    /// bulk throughput falls far below copy mode's (BENCHMARKS.md, tuning
    /// logs 29-32). Without it a lagging reader is met by holding the
    /// direction and forwarding it in user space.
    #[arg(long)]
    park: bool,
    /// Most connections relayed at once; further clients wait in the
    /// listen backlog until connections end. The relay takes fewer if its
    /// open-file limit (raised to the hard limit at start) has no room for
    /// more: a connection costs 2 fds in copy and bpf mode, 6 in splice
    /// mode (12 recording). The start log says how many and why.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_conns: usize,
    /// Give up connecting to the upstream after this many seconds (the
    /// client is then reset).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    connect_timeout: f64,
    /// Serve Prometheus metrics on http://ADDR/metrics (and /healthz):
    /// connections open and ended by how, bytes, bytes the kernel
    /// redirected, switches to user space, and the kernel memory the
    /// relay's sockets hold. `:9100` for every IPv4 address.
    #[arg(long, value_name = "ADDR", value_parser = zc_user::cli::parse_listen)]
    metrics: Option<SocketAddr>,
    /// End a connection that has moved no byte either way for this long
    /// (500ms, 30s, 5m, 1h; default: never). Nothing is in flight then,
    /// so both ends get a FIN; a connection with bytes still queued
    /// (a reader that stopped reading) is not idle. In bpf mode idleness
    /// is read from the kernel's counters. The access log says "idle
    /// timeout".
    #[arg(long, value_name = "DURATION", value_parser = zc_user::cli::parse_duration)]
    idle_timeout: Option<Duration>,
    /// After SIGINT/SIGTERM, let open connections finish for this many
    /// seconds before resetting them.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    shutdown_grace: f64,
    /// Cap the retransmission timeout of the relay's own sockets (1s to
    /// 120s; default 0: the kernel's 120 s). When a path drops segments
    /// (or the host runs out of TCP memory, net.ipv4.tcp_mem, and its
    /// receivers drop them), TCP backs off exponentially, and a peer that
    /// recovers may wait for the backed-off timer (52 s was seen with
    /// 1,000 stalled clients) before a byte moves; capped, at most this
    /// long. The cost: TCP gives up on a peer that acknowledges nothing
    /// much sooner (tcp_retries2 timeouts: about 15 min uncapped, 14 s at
    /// 1s, 61 s at 5s, 112 s at 10s), and the peer is not told. Needs
    /// Linux 6.15 (TCP_RTO_MAX_MS); older kernels say so and ignore it.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = zc_user::cli::parse_duration)]
    rto_max: Duration,
}

/// Stops a background task when the command it serves returns.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn secs(v: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

async fn relay(args: RelayArgs) -> Result<()> {
    let sockets = zc_user::relay::bpf_sockets(args.max_conns.max(1));
    let (mode, why) = match (args.mode, &args.record) {
        (Mode::Auto | Mode::Splice, Some(_)) => (
            Mode::Splice,
            (
                "recording: the in-kernel redirect cannot duplicate a stream, so splice and tee"
                    .to_string(),
                None,
            ),
        ),
        (forced, Some(_)) => {
            anyhow::bail!("--record needs splice mode; --mode {forced} cannot duplicate the stream")
        }
        (Mode::Auto, None) => {
            let (verdict, progs) = zc_user::probe::choose(sockets).await;
            let mode = match verdict.mode.as_str() {
                "bpf" => Mode::Bpf,
                "splice" => Mode::Splice,
                _ => Mode::Copy,
            };
            (mode, (format!("auto: {}", verdict.reason), progs))
        }
        (forced, None) => (forced, ("forced".to_string(), None)),
    };
    let (why, ready) = why;
    let engine = match mode {
        Mode::Auto => anyhow::bail!("auto mode resolved to itself"),
        Mode::Bpf => {
            let progs = match ready {
                Some(p) => p,
                None => zc_user::probe::bpf_ready(sockets)
                    .await
                    .map_err(anyhow::Error::msg)
                    .context("BPF mode is unavailable")?,
            };
            let watcher = Watcher::start().context("starting the socket watcher")?;
            if args.window > 0 {
                // The window bounds each connection; TCP's memory pressure
                // holds them all when their sum runs the host short.
                zc_user::pressure::watch(progs.clone()).context("starting the TCP memory watch")?;
            }
            let park = args.window > 0 && args.park;
            if park && let Err(e) = progs.enable_parking() {
                warn!(
                    "{e}; a lagging reader's sender is held back by forwarding its bytes in \
                     user space instead"
                );
            }
            let small_skb = match args.mode {
                Mode::Auto => args.small_skb,
                _ => 0,
            };
            let read_parked = args.window > 0 && small_skb > 0 && !args.passed_small_reads;
            if read_parked && let Err(e) = progs.enable_parking() {
                warn!("{e}; small segments are read from what the verdict passes instead");
            }
            Engine::Bpf(
                BpfEngine::new(progs, watcher)
                    .with_park(park)
                    .with_parked_reads(read_parked)
                    .with_sndbuf(args.sndbuf)
                    .with_window(args.window)
                    .with_peek_hand_back(args.peek_hand_back)
                    // Auto mode picks the faster path per direction; a
                    // forced `--mode bpf` keeps the pure kernel path.
                    .with_adaptive(small_skb),
            )
        }
        Mode::Splice => {
            let engine = SpliceEngine::new(Arc::new(PipePool::new(args.max_pipes, args.pipe_size)));
            match &args.record {
                Some(dir) => {
                    let rec = Recorder::new(dir.clone())
                        .with_context(|| format!("creating {}", dir.display()))?;
                    Engine::Splice(engine.with_recorder(Arc::new(rec)))
                }
                None => Engine::Splice(engine),
            }
        }
        Mode::Copy => Engine::Copy(CopyEngine::new(args.buffer)),
    };
    let config = Config {
        listen: args.listen,
        upstream: args.upstream,
        connect_timeout: secs(args.connect_timeout, "connect-timeout")?,
        max_conns: args.max_conns.max(1),
        shutdown_grace: secs(args.shutdown_grace, "shutdown-grace")?,
        idle_timeout: args.idle_timeout.filter(|d| !d.is_zero()),
        rto_max: Some(args.rto_max).filter(|d| !d.is_zero()),
    };
    let stop = stop_signal();
    // Raises the open-file limit and sizes the relay to it.
    let relay = Relay::bind(config, engine).await?;
    info!(
        "zc relay: mode {mode} ({why}), listening on {}, upstream {}",
        relay.local_addr()?,
        args.upstream
    );
    info!("zc relay: {}", relay.capacity());
    let _metrics = match args.metrics {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics {addr}"))?;
            info!(
                "zc relay: metrics on http://{}/metrics",
                l.local_addr().context("the metrics address")?
            );
            let task = tokio::spawn(zc_user::metrics::serve(
                l,
                relay.metrics(mode.name()),
                zc_user::metrics::always_healthy(),
            ));
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    relay.serve(stop).await?;
    info!("zc relay: stopped; programs and maps unloaded");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed
/// here, not when the future is first polled: a signal that arrives before
/// then must still stop zc cleanly rather than kill it.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            error!("cannot install signal handlers; stop zc with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

/// Allows as many open files as the hard limit permits (the agent and the
/// bench hold many sockets too); `zc relay` does this in `Relay::bind`.
fn raise_fd_limit() {
    if let Err(e) = zc_user::relay::raise_fd_limit() {
        log::warn!("keeping the open-file limit: {e:#}");
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // `zc agent` may take its flags from a file too.
    let cli = agent_config::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Relay(args) => relay(args).await,
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::Bench(args) => bench::run(args).await,
            Cmd::Agent(args) => agent_cmd::agent(args).await,
            Cmd::Pair(args) => agent_cmd::pair(args).await,
            Cmd::Unpair(args) => agent_cmd::unpair(args).await,
            Cmd::List(args) => agent_cmd::list(args).await,
            Cmd::Stats(args) => agent_cmd::stats(args).await,
            Cmd::Status(args) => status(args).await,
            Cmd::Completions { shell } => {
                docs::completions(shell, &mut std::io::stdout());
                Ok(())
            }
            Cmd::Man { dir } => docs::man_pages(&dir),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Cmd};

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `--help` must explain every option of every subcommand.
    #[test]
    fn every_option_has_help_text() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            assert!(
                sub.get_about().is_some(),
                "`zc {}` has no description",
                sub.get_name()
            );
            for arg in sub.get_arguments() {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(
                    help.len() > 10,
                    "`zc {} --{}` has no real help text",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }

    #[test]
    fn relay_defaults_written_with_units_are_the_engines_defaults() {
        let cli =
            Cli::try_parse_from(["zc", "relay", "--listen", ":0", "--upstream", "127.0.0.1:1"])
                .expect("parses");
        let Cmd::Relay(a) = cli.cmd else {
            panic!("not the relay command")
        };
        assert_eq!(a.pipe_size, zc_user::engine::splice::DEFAULT_PIPE_SIZE);
        assert_eq!(a.buffer, zc_user::engine::copy::DEFAULT_BUFFER);
        assert_eq!(a.sndbuf, zc_user::engine::bpf::DEFAULT_SNDBUF);
        assert_eq!(a.window, zc_user::engine::bpf::DEFAULT_WINDOW);
        assert_eq!(a.small_skb, zc_user::engine::bpf::DEFAULT_SMALL_SKB);
        assert_eq!(a.listen, "0.0.0.0:0".parse().expect("addr"));
    }

    #[test]
    fn a_bad_size_is_a_usage_error() {
        let e = Cli::try_parse_from([
            "zc",
            "relay",
            "--listen",
            ":0",
            "--upstream",
            "127.0.0.1:1",
            "--window",
            "4x",
        ])
        .err()
        .expect("refused");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("not a size"), "{e}");
    }
}
