//! `zc bench`: direct, bpf, splice and copy (and any relay the user names)
//! measured side by side in one run, repetitions interleaved across
//! systems so drift on the machine hits every system alike.
mod kmem;
mod load;
mod pin;
mod report;
mod sample;
mod stall;
mod svg;
mod systems;
mod targets;
mod topology;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use log::warn;
use serde::Serialize;

pub use self::sample::Sample;
use self::{
    pin::Pinning,
    systems::{Running, Spec},
    topology::Topology,
};
use zc_user::cli::parse_size;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A first look in under a minute: 64 KiB writes, ping-pong and 200
    /// connections (50 stalled clients if stall is named), 3 repetitions
    /// of 0.5 s, on loopback and across namespaces. Options given
    /// explicitly still apply.
    #[arg(long)]
    quick: bool,
    /// Topologies: loopback, and netns (client, relay and server in three
    /// network namespaces joined by veth pairs, created and removed by the
    /// bench; the relay namespace routes, so direct crosses the same links).
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["loopback", "netns"])]
    topology: Vec<TopologyName>,
    /// Systems: direct (no relay: the physical limit) and zc relay in each
    /// mode.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["direct", "auto", "bpf", "splice", "copy"])]
    systems: Vec<SystemName>,
    /// Another relay to hold zc against, as NAME=COMMAND, repeatable. The
    /// command runs in the relay's place (under `sh -c`, in the relay
    /// namespace for netns) and may use {listen}, {listen_host},
    /// {listen_port}, {upstream}, {upstream_host} and {upstream_port}. It
    /// must stay in the foreground.
    #[arg(long = "peer", value_name = "NAME=COMMAND", value_parser = Spec::parse_peer)]
    peers: Vec<Spec>,
    /// Workloads: bulk (throughput by write size, and the kernel memory
    /// the relay holds meanwhile), pingpong (64-byte round trips: p50,
    /// p99, p99.9), conns (many connections held open: memory per
    /// connection and setup rate), stall (clients that never read while
    /// the server pushes until its writes block: kernel memory per
    /// stalled connection, then every byte read and checked; it takes the
    /// host's TCP memory to its limit, so it runs only when named),
    /// bidir (64 KiB writes both ways at once on one connection: what
    /// each direction delivered).
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["bulk", "bidir", "pingpong", "conns"])]
    workloads: Vec<WorkloadName>,
    /// Repetitions of every measurement; each repetition visits every
    /// system, in a rotating order. Default 3.
    #[arg(long, value_name = "N")]
    reps: Option<usize>,
    /// Seconds each bulk or ping-pong sample runs. Default 1 (0.5 with
    /// --quick).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Bulk write sizes, comma-separated (64k, 1MiB and the like). Default
    /// 64,1k,16k,64k,256k,1m (64k with --quick).
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = parse_size)]
    write_sizes: Option<Vec<u64>>,
    /// Parallel streams for the multi-stream bulk run at 64 KiB writes (0
    /// skips it). Default 4 (0 with --quick).
    #[arg(long, value_name = "N")]
    streams: Option<usize>,
    /// Connections held open at once in the conns workload. Default 1000
    /// (200 with --quick).
    #[arg(long, value_name = "N")]
    conns: Option<usize>,
    /// Clients that never read in the stall workload. Default 1000 (50
    /// with --quick).
    #[arg(long, value_name = "N")]
    stall_conns: Option<usize>,
    /// Pin the client's threads to one CPU and the server's to another
    /// (the first two this process may use); relays stay unpinned.
    #[arg(long)]
    pin: bool,
    /// Hash every bulk byte on both ends and compare (costs CPU on the
    /// client and server, the same for every system). Byte counts are
    /// always compared.
    #[arg(long)]
    verify: bool,
    /// Extra arguments for every zc relay, e.g. "--sndbuf 8388608".
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    relay_args: String,
    /// Write every sample, the summary and the targets as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the charts (throughput by write size, latency percentiles) as
    /// SVG to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TopologyName {
    Loopback,
    Netns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SystemName {
    Direct,
    /// zc relay's default: BPF with the adaptive path (small segments in
    /// user space).
    Auto,
    /// The pure kernel path (`--mode bpf`).
    Bpf,
    Splice,
    Copy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WorkloadName {
    Bulk,
    Bidir,
    Pingpong,
    Conns,
    Stall,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    Bulk { write_size: usize, streams: usize },
    Bidir { write_size: usize },
    PingPong { size: usize },
    Conns { count: usize },
    Stall { count: usize },
}

impl Workload {
    pub fn label(&self) -> String {
        match self {
            Workload::Bulk {
                write_size,
                streams,
            } => format!("bulk {} x{streams}", report::size(*write_size)),
            Workload::Bidir { write_size } => format!("both ways {}", report::size(*write_size)),
            Workload::PingPong { size } => format!("ping-pong {}", report::size(*size)),
            Workload::Conns { count } => format!("{count} conns"),
            Workload::Stall { count } => format!("stall {count} conns"),
        }
    }
}

pub struct Plan {
    topologies: Vec<TopologyName>,
    systems: Vec<Spec>,
    workloads: Vec<Workload>,
    reps: usize,
    duration: Duration,
    verify: bool,
    relay_args: String,
    pin: Option<Pinning>,
    /// The zc relays' --window, for the stall targets.
    window: u64,
}

impl Plan {
    fn from_args(a: &BenchArgs) -> Result<Self> {
        let reps = a.reps.unwrap_or(3).max(1);
        let secs = a.duration.unwrap_or(if a.quick { 0.5 } else { 1.0 });
        let duration = Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--duration must be a positive number of seconds")?;
        let sizes = match &a.write_sizes {
            Some(s) => s.clone(),
            None if a.quick => vec![64 << 10],
            None => vec![64, 1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20],
        };
        let streams = a.streams.unwrap_or(if a.quick { 0 } else { 4 });
        let conns = a.conns.unwrap_or(if a.quick { 200 } else { 1000 });
        let stalled = a.stall_conns.unwrap_or(if a.quick { 50 } else { 1000 });
        let mut workloads = Vec::new();
        for w in dedup(&a.workloads) {
            match w {
                WorkloadName::Bulk => {
                    for &s in &sizes {
                        if s == 0 || s > 1 << 20 {
                            bail!("write sizes must be 1 byte to 1 MiB, not {s}");
                        }
                        workloads.push(Workload::Bulk {
                            write_size: s as usize,
                            streams: 1,
                        });
                    }
                    if streams > 1 {
                        workloads.push(Workload::Bulk {
                            write_size: 64 << 10,
                            streams,
                        });
                    }
                }
                WorkloadName::Bidir => workloads.push(Workload::Bidir {
                    write_size: 64 << 10,
                }),
                WorkloadName::Pingpong => workloads.push(Workload::PingPong { size: 64 }),
                WorkloadName::Conns if conns > 0 => {
                    workloads.push(Workload::Conns { count: conns })
                }
                WorkloadName::Conns => {}
                WorkloadName::Stall if stalled > 0 => {
                    workloads.push(Workload::Stall { count: stalled })
                }
                WorkloadName::Stall => {}
            }
        }
        if workloads.is_empty() {
            bail!("nothing to measure: no workload selected");
        }
        let mut systems: Vec<Spec> = dedup(&a.systems)
            .into_iter()
            .map(|s| match s {
                SystemName::Direct => Spec::Direct,
                SystemName::Auto => Spec::Zc("auto"),
                SystemName::Bpf => Spec::Zc("bpf"),
                SystemName::Splice => Spec::Zc("splice"),
                SystemName::Copy => Spec::Zc("copy"),
            })
            .collect();
        systems.extend(a.peers.iter().cloned());
        Ok(Self {
            topologies: dedup(&a.topology),
            systems,
            workloads,
            reps,
            duration,
            verify: a.verify,
            window: relay_window(&a.relay_args)?,
            relay_args: a.relay_args.clone(),
            pin: a.pin.then(Pinning::choose).transpose()?,
        })
    }
}

/// The relay namespace's TCP counters that grow over a second while a
/// sample stands stalled ("TCPBacklogDrop +120, ..."): what keeps
/// happening to the stuck stream's segments.
fn counters_while_stalled(topo: &Topology) -> String {
    let before = topo.tcp_counters();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after = topo.tcp_counters();
    let grew: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.checked_sub(*before.get(k)?)?;
            (d > 0).then(|| format!("{k} +{d}"))
        })
        .collect();
    grew.join(", ")
}

/// The window the zc relays run with: `--window` in --relay-args, or the
/// relay's default.
fn relay_window(relay_args: &str) -> Result<u64> {
    let mut args = relay_args.split_whitespace();
    let mut window = zc_user::engine::bpf::DEFAULT_WINDOW;
    while let Some(a) = args.next() {
        let value = match a.strip_prefix("--window") {
            Some("") => args.next(),
            Some(v) => v.strip_prefix('='),
            None => continue,
        };
        // The relay's own parser, so that `8m` means here what it means there.
        window = value
            .and_then(|v| zc_user::cli::parse_size(v).ok())
            .with_context(|| {
                format!("--relay-args: `{relay_args}` has no byte count after --window")
            })?;
    }
    Ok(window)
}

fn dedup<T: PartialEq + Copy>(v: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for x in v {
        if !out.contains(x) {
            out.push(*x);
        }
    }
    out
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub async fn run(args: BenchArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: BenchArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "zc bench needs root: it creates network namespaces and runs zc relay in bpf mode \
             (run it with sudo)"
        );
    }
    let plan = Plan::from_args(&args)?;
    crate::raise_fd_limit();
    // A Ctrl-C between samples stops the run but still removes the
    // namespaces and relays (their Drop impls run on the way out).
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    let machine = report::Machine::read();
    let per_topology = plan.reps * plan.workloads.len() * plan.systems.len();
    let bar = ProgressBar::new((per_topology * plan.topologies.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut samples = Vec::new();
    let mut missing = Vec::new();
    for &t in &plan.topologies {
        let topo = match t {
            TopologyName::Loopback => Topology::loopback(),
            TopologyName::Netns => Topology::namespaces().context("building the netns topology")?,
        };
        bar.set_message(format!("{}: starting relays", topo.name));
        let server = load::Server::start(&topo, plan.pin.map(|p| p.server_cpu))?;
        let upstream = topo.server_addr(server.port);
        let mut running = Vec::new();
        for spec in &plan.systems {
            match Running::start(spec, &topo, upstream, &plan.relay_args) {
                Ok(r) => running.push(r),
                Err(e) => {
                    bar.suspend(|| warn!("{}: {} left out: {e:#}", topo.name, spec.name()));
                    missing.push(format!("{} on {}: {e:#}", spec.name(), topo.name));
                    bar.inc((plan.reps * plan.workloads.len()) as u64);
                }
            }
        }
        for rep in 0..plan.reps {
            for &w in &plan.workloads {
                let n = running.len();
                for i in 0..n {
                    if STOP.load(Ordering::Relaxed) {
                        bar.abandon();
                        bail!("interrupted; namespaces and relays removed");
                    }
                    let sys = &mut running[(i + rep) % n];
                    bar.set_message(format!(
                        "{} {} {} (rep {}/{})",
                        topo.name,
                        w.label(),
                        sys.name,
                        rep + 1,
                        plan.reps
                    ));
                    let s = sample::measure(&topo, sys, &server, w, &plan, rep)?;
                    if let Some(e) = &s.error {
                        // What the relay said last often names the cause.
                        let tail = sys.log_tail();
                        let tail: Vec<&str> = tail.lines().rev().take(6).collect();
                        let queued = topo.queued_sockets();
                        let grew = counters_while_stalled(&topo);
                        bar.suspend(|| {
                            warn!("{} {} {}: {e}", topo.name, w.label(), s.system);
                            for line in tail.iter().rev() {
                                warn!("  {} said: {line}", s.system);
                            }
                            for line in &queued {
                                warn!("  socket with bytes queued: {line}");
                            }
                            if !grew.is_empty() {
                                warn!("  relay namespace's TCP counters that grew in the next second: {grew}");
                            }
                        });
                    }
                    samples.push(s);
                    bar.inc(1);
                }
            }
        }
        drop(running);
        drop(server);
    }
    bar.finish_and_clear();
    let summary = report::Summary::new(&plan, &samples);
    print!("{}", summary.table(&machine));
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>(),
            "machine": machine,
            "reps": plan.reps,
            "sample_secs": plan.duration.as_secs_f64(),
            "verify": plan.verify,
            "relay_args": plan.relay_args,
            "pin": plan.pin,
            "window": plan.window,
            "left_out": missing,
            "targets": summary.targets(),
            "samples": samples,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("samples written to {}", path.display());
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg::render(&summary, &machine))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("charts written to {}", path.display());
    }
    let bad = samples.iter().filter(|s| !s.intact).count();
    if bad > 0 {
        bail!("{bad} sample(s) failed or lost bytes; see the warnings above");
    }
    if !missing.is_empty() {
        bail!("left out: {}", missing.join("; "));
    }
    Ok(())
}
