//! Medians, ranges, ratios and the targets, as a terminal table and as
//! data for the JSON and chart files.
use std::fmt::Write as _;

use serde::Serialize;

use super::{Plan, Sample, Workload, pin::Pinning};

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub mem_gib: f64,
}

impl Machine {
    pub fn read() -> Self {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0.0);
        Self {
            kernel,
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_gib: mem_kib / (1u64 << 20) as f64,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} x {}, {:.0} GiB, Linux {}",
            self.cpus, self.cpu, self.mem_gib, self.kernel
        )
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A number with as many decimals as its size deserves.
pub fn num(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 0.1 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub struct Summary<'a> {
    pub topologies: Vec<&'static str>,
    pub systems: Vec<String>,
    pub workloads: Vec<Workload>,
    pub reps: usize,
    pub secs: f64,
    pub pin: Option<Pinning>,
    /// The zc relays' window, bytes.
    pub window: u64,
    pub samples: &'a [Sample],
}

pub const TARGET_TOPOLOGY: &str = "loopback";
pub const TARGET_BULK: Workload = Workload::Bulk {
    write_size: 64 << 10,
    streams: 1,
};

impl<'a> Summary<'a> {
    pub fn new(plan: &Plan, samples: &'a [Sample]) -> Self {
        let mut topologies: Vec<&'static str> = Vec::new();
        for s in samples {
            if !topologies.contains(&s.topology) {
                topologies.push(s.topology);
            }
        }
        Self {
            topologies,
            systems: plan.systems.iter().map(|s| s.name()).collect(),
            workloads: plan.workloads.clone(),
            reps: plan.reps,
            secs: plan.duration.as_secs_f64(),
            pin: plan.pin,
            window: plan.window,
            samples,
        }
    }

    fn matching(&self, topo: &str, w: Workload, sys: &str) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| {
            s.topology == topo && s.workload == w && s.system == sys && s.error.is_none()
        })
    }

    pub fn stat(&self, topo: &str, w: Workload, sys: &str, metric: &str) -> Option<Stat> {
        let mut v: Vec<f64> = self
            .matching(topo, w, sys)
            .filter_map(|s| s.metrics.get(metric).copied())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    pub fn median(&self, topo: &str, w: Workload, sys: &str, metric: &str) -> Option<f64> {
        self.stat(topo, w, sys, metric).map(|s| s.median)
    }

    /// CPU seconds per GiB over all repetitions together: the clock-tick
    /// resolution of /proc is too coarse for one short sample.
    pub fn cpu_per_gib(&self, topo: &str, w: Workload, sys: &str, metric: &str) -> Option<f64> {
        let (mut cpu, mut gib) = (0.0, 0.0);
        for s in self.matching(topo, w, sys) {
            cpu += s.metrics.get(metric)?;
            gib += s.metrics.get("gib")?;
        }
        (gib > 0.0).then(|| cpu / gib)
    }

    pub fn table(&self, machine: &Machine) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "zc bench on {}", machine.line());
        let _ = writeln!(
            out,
            "{} repetitions interleaved across systems, {} s per sample; median [min-max]",
            self.reps,
            num(self.secs)
        );
        let _ = writeln!(
            out,
            "{}",
            match self.pin {
                Some(p) => format!(
                    "load generators pinned: client on CPU {}, server on CPU {}; relays unpinned",
                    p.client_cpu, p.server_cpu
                ),
                None => "load generators not pinned (--pin pins them)".into(),
            }
        );
        for &topo in &self.topologies {
            let _ = writeln!(out, "\n== {topo} ==");
            let mut head = format!("{:<34}", "");
            for s in &self.systems {
                let _ = write!(head, "{s:<20}");
            }
            let _ = writeln!(out, "{}", head.trim_end());
            for &w in &self.workloads {
                for (label, cells) in self.rows(topo, w) {
                    let mut line = format!("{label:<34}");
                    for c in cells {
                        let _ = write!(line, "{c:<20}");
                    }
                    let _ = writeln!(out, "{}", line.trim_end());
                }
            }
        }
        let _ = writeln!(out, "\ntargets (issue 10; {TARGET_TOPOLOGY} unless said):");
        for t in self.targets() {
            let mark = match t.met {
                Some(true) => "met   ",
                Some(false) => "MISSED",
                None => "n/a   ",
            };
            let _ = writeln!(out, "  [{mark}] {}: {}", t.goal, t.measured);
        }
        out
    }

    fn rows(&self, topo: &str, w: Workload) -> Vec<(String, Vec<String>)> {
        let cell = |sys: &str, metric: &str| match self.stat(topo, w, sys, metric) {
            Some(s) if self.reps > 1 => {
                format!("{} [{}-{}]", num(s.median), num(s.min), num(s.max))
            }
            Some(s) => num(s.median),
            None => "-".into(),
        };
        let row = |label: String, f: &dyn Fn(&str) -> String| {
            (label, self.systems.iter().map(|s| f(s)).collect::<Vec<_>>())
        };
        let ratio = |sys: &str, base: &str| match (
            self.median(topo, w, sys, "gbps"),
            self.median(topo, w, base, "gbps"),
        ) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let per_gib = |sys: &str, metric: &str| {
            self.cpu_per_gib(topo, w, sys, metric)
                .map_or("-".into(), num)
        };
        let name = w.label();
        match w {
            Workload::Bulk { .. } => vec![
                row(format!("{name}  GB/s"), &|s| cell(s, "gbps")),
                row("  vs direct".into(), &|s| ratio(s, "direct")),
                row("  vs copy".into(), &|s| ratio(s, "copy")),
                row("  relay CPU s/GiB".into(), &|s| per_gib(s, "relay_cpu_s")),
                row("  machine CPU s/GiB".into(), &|s| {
                    per_gib(s, "machine_cpu_s")
                }),
                row("  peak relay socket memory MiB".into(), &|s| {
                    cell(s, "relay_sock_peak_mib")
                }),
                row("  slab growth MiB".into(), &|s| cell(s, "slab_growth_mib")),
            ],
            Workload::Bidir { .. } => vec![
                row(format!("{name}  up GB/s"), &|s| cell(s, "up_gbps")),
                row("  down GB/s".into(), &|s| cell(s, "down_gbps")),
                row("  machine CPU s/GiB".into(), &|s| {
                    per_gib(s, "machine_cpu_s")
                }),
                row("  peak relay socket memory MiB".into(), &|s| {
                    cell(s, "relay_sock_peak_mib")
                }),
                row("  slab growth MiB".into(), &|s| cell(s, "slab_growth_mib")),
            ],
            Workload::PingPong { .. } => vec![
                row(format!("{name}  p50 us"), &|s| cell(s, "p50_us")),
                row("  p99 us".into(), &|s| cell(s, "p99_us")),
                row("  p99.9 us".into(), &|s| cell(s, "p999_us")),
                row("  max us".into(), &|s| cell(s, "max_us")),
            ],
            Workload::Conns { .. } => vec![
                row(format!("{name}  relay KiB/conn"), &|s| {
                    cell(s, "relay_kib_per_conn")
                }),
                row("  machine KiB/conn".into(), &|s| {
                    cell(s, "machine_kib_per_conn")
                }),
                row("  setup conn/s".into(), &|s| cell(s, "conns_per_s")),
            ],
            // Kernel memory is relay sockets + slab growth, as
            // tests/memory_bound.rs counts it; MemAvailable also drops by
            // what the clients' and the server's own sockets hold.
            Workload::Stall { .. } => vec![
                row(format!("{name}  kernel MiB/conn"), &|s| {
                    cell(s, "kernel_mib_per_conn")
                }),
                row("  relay sockets MiB/conn".into(), &|s| {
                    cell(s, "relay_sock_mib_per_conn")
                }),
                row("  slab growth MiB/conn".into(), &|s| {
                    cell(s, "slab_mib_per_conn")
                }),
                row("  MemAvailable drop MiB/conn".into(), &|s| {
                    cell(s, "available_drop_mib_per_conn")
                }),
                row("  kernel MiB total".into(), &|s| {
                    cell(s, "kernel_mib_total")
                }),
                row("  MemAvailable drop MiB total".into(), &|s| {
                    cell(s, "available_drop_mib_total")
                }),
                row("  pushed MiB/conn".into(), &|s| {
                    cell(s, "pushed_mib_per_conn")
                }),
                // Past 100 every TCP socket of the host drops what it
                // receives (unless its receive queue is empty).
                row("  TCP mem peak, % of hard limit".into(), &|s| {
                    cell(s, "tcp_mem_peak_pct_of_limit")
                }),
            ],
        }
    }
}
