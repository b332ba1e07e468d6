//! Medians, ranges, ratios and the targets, as a terminal table and as
//! data for the JSON and chart files.
use std::fmt::Write as _;

use serde::Serialize;

use super::{Plan, Sample, Workload};

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
fn num(v: f64) -> String {
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

#[derive(Debug, Serialize)]
pub struct Target {
    pub goal: String,
    pub measured: String,
    /// None when the run did not measure what the target needs.
    pub met: Option<bool>,
}

pub struct Summary<'a> {
    pub topologies: Vec<&'static str>,
    pub systems: Vec<String>,
    pub workloads: Vec<Workload>,
    pub reps: usize,
    pub secs: f64,
    samples: &'a [Sample],
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
        let _ = writeln!(
            out,
            "\ntargets ({TARGET_TOPOLOGY}, {} writes, single stream unless said):",
            size(64 << 10)
        );
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
        }
    }

    /// The goals zc's BPF mode is held to, with this run's figures.
    pub fn targets(&self) -> Vec<Target> {
        let t = TARGET_TOPOLOGY;
        let bulk = TARGET_BULK;
        let gbps = |s: &str| self.median(t, bulk, s, "gbps");
        let cpu = |s: &str, m: &str| self.cpu_per_gib(t, bulk, s, m);
        let pp = Workload::PingPong { size: 64 };
        let lat = |s: &str, m: &str| self.median(t, pp, s, m);
        let mut out = Vec::new();
        let mut push = |goal: &str, measured: Option<(String, bool)>| {
            out.push(match measured {
                Some((m, ok)) => Target {
                    goal: goal.into(),
                    measured: m,
                    met: Some(ok),
                },
                None => Target {
                    goal: goal.into(),
                    measured: "not measured in this run".into(),
                    met: None,
                },
            });
        };
        push(
            "bpf throughput >= 0.8x direct",
            gbps("bpf").zip(gbps("direct")).map(|(b, d)| {
                (
                    format!("{:.2}x ({} vs {} GB/s)", b / d, num(b), num(d)),
                    b >= 0.8 * d,
                )
            }),
        );
        push(
            "bpf throughput >= 1.5x the better of splice and copy",
            gbps("bpf")
                .zip(gbps("splice").zip(gbps("copy")))
                .map(|(b, (s, c))| {
                    let best = s.max(c);
                    (
                        format!("{:.2}x ({} vs {} GB/s)", b / best, num(b), num(best)),
                        b >= 1.5 * best,
                    )
                }),
        );
        push(
            "bpf relay-process CPU per GiB < 2% of copy's",
            cpu("bpf", "relay_cpu_s")
                .zip(cpu("copy", "relay_cpu_s"))
                .map(|(b, c)| {
                    let pct = if c > 0.0 {
                        100.0 * b / c
                    } else {
                        f64::INFINITY
                    };
                    (
                        format!("{pct:.1}% ({} vs {} s/GiB)", num(b), num(c)),
                        pct < 2.0,
                    )
                }),
        );
        push(
            "bpf whole-machine CPU per GiB below copy's",
            cpu("bpf", "machine_cpu_s")
                .zip(cpu("copy", "machine_cpu_s"))
                .map(|(b, c)| {
                    (
                        format!("{} vs {} s/GiB ({:.2}x)", num(b), num(c), b / c),
                        b < c,
                    )
                }),
        );
        push(
            "bpf ping-pong p99 no worse than copy's",
            lat("bpf", "p99_us")
                .zip(lat("copy", "p99_us"))
                .map(|(b, c)| (format!("{} vs {} us", num(b), num(c)), b <= c)),
        );
        for sys in &self.systems {
            push(
                &format!("{sys} ping-pong p99.9 < 1 ms"),
                lat(sys, "p999_us").map(|v| (format!("{} us", num(v)), v < 1000.0)),
            );
        }
        let mut all_sizes: Vec<usize> = self
            .workloads
            .iter()
            .filter_map(|w| match *w {
                Workload::Bulk {
                    write_size,
                    streams: 1,
                } => Some(write_size),
                _ => None,
            })
            .collect();
        all_sizes.sort_unstable();
        // The default mode must never lose to the honest baseline.
        for &ws in &all_sizes {
            let w = Workload::Bulk {
                write_size: ws,
                streams: 1,
            };
            let g = |s: &str, m: &str| self.median(t, w, s, m);
            push(
                &format!("auto >= 1.0x copy at {} writes", size(ws)),
                g("auto", "gbps").zip(g("copy", "gbps")).map(|(a, c)| {
                    (
                        format!("{:.2}x ({} vs {} GB/s)", a / c, num(a), num(c)),
                        a >= c,
                    )
                }),
            );
        }
        let sizes: Vec<usize> = all_sizes.into_iter().filter(|&ws| ws >= 64 << 10).collect();
        for ws in sizes {
            let w = Workload::Bulk {
                write_size: ws,
                streams: 1,
            };
            let g = |s: &str| self.median(t, w, s, "gbps");
            push(
                &format!("splice >= 1.2x copy at {} writes", size(ws)),
                g("splice").zip(g("copy")).map(|(s, c)| {
                    (
                        format!("{:.2}x ({} vs {} GB/s)", s / c, num(s), num(c)),
                        s >= 1.2 * c,
                    )
                }),
            );
        }
        out
    }
}
