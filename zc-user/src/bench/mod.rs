//! `zc bench`: direct, bpf, splice and copy (and any relay the user names)
//! measured side by side in one run, repetitions interleaved across
//! systems so drift on the machine hits every system alike.
mod load;
mod report;
mod svg;
mod systems;
mod topology;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use log::warn;
use serde::Serialize;

use self::{
    systems::{Running, Spec},
    topology::Topology,
};
use crate::demo::parse_size;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A first look in under a minute: 64 KiB writes, ping-pong and 200
    /// connections, 3 repetitions of 0.5 s, on loopback and across
    /// namespaces. Options given explicitly still apply.
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
    /// Workloads: bulk (throughput by write size), pingpong (64-byte round
    /// trips: p50, p99, p99.9), conns (many connections held open: memory
    /// per connection and setup rate).
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["bulk", "pingpong", "conns"])]
    workloads: Vec<WorkloadName>,
    /// Repetitions of every measurement; each repetition visits every
    /// system, in a rotating order. Default 3.
    #[arg(long, value_name = "N")]
    reps: Option<usize>,
    /// Seconds each bulk or ping-pong sample runs. Default 1 (0.5 with
    /// --quick).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Bulk write sizes, comma-separated (k, m suffixes). Default
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
    Pingpong,
    Conns,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    Bulk { write_size: usize, streams: usize },
    PingPong { size: usize },
    Conns { count: usize },
}

impl Workload {
    pub fn label(&self) -> String {
        match self {
            Workload::Bulk {
                write_size,
                streams,
            } => format!("bulk {} x{streams}", report::size(*write_size)),
            Workload::PingPong { size } => format!("ping-pong {}", report::size(*size)),
            Workload::Conns { count } => format!("{count} conns"),
        }
    }
}

/// One measurement of one system.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub topology: &'static str,
    pub system: String,
    pub rep: usize,
    pub workload: Workload,
    /// gbps, gib, secs, relay_cpu_s, machine_cpu_s; p50_us, p99_us,
    /// p999_us, round_trips; relay_kib_per_conn, machine_kib_per_conn,
    /// conns_per_s.
    pub metrics: BTreeMap<&'static str, f64>,
    /// Every byte arrived (counted, and hashed with --verify).
    pub intact: bool,
    pub error: Option<String>,
}

pub struct Plan {
    topologies: Vec<TopologyName>,
    systems: Vec<Spec>,
    workloads: Vec<Workload>,
    reps: usize,
    duration: Duration,
    verify: bool,
    relay_args: String,
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
                WorkloadName::Pingpong => workloads.push(Workload::PingPong { size: 64 }),
                WorkloadName::Conns if conns > 0 => {
                    workloads.push(Workload::Conns { count: conns })
                }
                WorkloadName::Conns => {}
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
            relay_args: a.relay_args.clone(),
        })
    }
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
        let server = load::Server::start(&topo)?;
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
                    let s = measure(&topo, sys, w, &plan, rep)?;
                    if let Some(e) = &s.error {
                        bar.suspend(|| warn!("{} {} {}: {e}", topo.name, w.label(), s.system));
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

fn measure(
    topo: &Topology,
    sys: &mut Running,
    w: Workload,
    plan: &Plan,
    rep: usize,
) -> Result<Sample> {
    sys.check_alive()?;
    let mut s = Sample {
        topology: topo.name,
        system: sys.name.clone(),
        rep,
        workload: w,
        metrics: BTreeMap::new(),
        intact: true,
        error: None,
    };
    let cpu0 = sys.cpu_secs();
    let machine0 = systems::machine_cpu_secs()?;
    let result = match w {
        Workload::Bulk {
            write_size,
            streams,
        } => load::bulk(
            topo,
            sys.addr,
            write_size,
            streams,
            plan.duration,
            plan.verify,
        )
        .map(|b| {
            let gib = b.bytes as f64 / (1u64 << 30) as f64;
            s.metrics.insert("gbps", b.bytes as f64 / b.secs / 1e9);
            s.metrics.insert("gib", gib);
            s.metrics.insert("secs", b.secs);
            s.intact = b.intact;
            if !b.intact {
                s.error = Some(if b.sent == b.bytes {
                    format!("{} bytes arrived, but not the bytes sent", b.bytes)
                } else {
                    format!("sent {} bytes, the server got {}", b.sent, b.bytes)
                });
            }
        }),
        Workload::PingPong { size } => {
            load::ping_pong(topo, sys.addr, size, plan.duration).map(|mut rtts| {
                rtts.sort_by(f64::total_cmp);
                s.metrics.insert("p50_us", report::percentile(&rtts, 50.0));
                s.metrics.insert("p99_us", report::percentile(&rtts, 99.0));
                s.metrics.insert("p999_us", report::percentile(&rtts, 99.9));
                s.metrics
                    .insert("max_us", rtts.last().copied().unwrap_or(0.0));
                s.metrics.insert("round_trips", rtts.len() as f64);
            })
        }
        Workload::Conns { count } => {
            let rss0 = sys.rss_kib();
            let mem0 = systems::machine_used_kib()?;
            let mut after = (None, 0);
            load::many_conns(topo, sys.addr, count, || {
                // Let the relay finish pairing the last connections.
                std::thread::sleep(Duration::from_millis(300));
                after = (sys.rss_kib(), systems::machine_used_kib()?);
                Ok(())
            })
            .map(|rate| {
                let n = count as f64;
                if let (Some(a), Some(b)) = (rss0, after.0) {
                    s.metrics
                        .insert("relay_kib_per_conn", (b as f64 - a as f64) / n);
                }
                s.metrics
                    .insert("machine_kib_per_conn", (after.1 as f64 - mem0 as f64) / n);
                s.metrics.insert("conns_per_s", rate);
            })
        }
    };
    if let Err(e) = result {
        s.intact = false;
        s.error = Some(format!("{e:#}"));
    }
    s.metrics
        .insert("machine_cpu_s", systems::machine_cpu_secs()? - machine0);
    if let (Some(a), Some(b)) = (cpu0, sys.cpu_secs()) {
        s.metrics.insert("relay_cpu_s", b - a);
    }
    // Conns samples need the closed connections gone before the next one.
    if matches!(w, Workload::Conns { .. }) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(s)
}
