//! The goals zc is held to, each with this run's figures.
use serde::Serialize;

use super::{
    Sample, Workload,
    report::{Summary, TARGET_BULK, TARGET_TOPOLOGY, num, size},
};

#[derive(Debug, Serialize)]
pub struct Target {
    pub goal: String,
    pub measured: String,
    /// None when the run did not measure what the target needs.
    pub met: Option<bool>,
}

impl Summary<'_> {
    /// The goals zc is held to (issue 10), with this run's figures.
    pub fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for topo in self.topologies.clone() {
            self.default_mode_targets(topo, &mut out);
            out.extend(self.both_ways_targets(topo));
        }
        let pp = Workload::PingPong { size: 64 };
        let lat = |s: &str, m: &str| self.median(TARGET_TOPOLOGY, pp, s, m);
        out.push(Target::judged(
            "bpf ping-pong p99 no worse than copy's",
            lat("bpf", "p99_us")
                .zip(lat("copy", "p99_us"))
                .map(|(b, c)| (format!("{} vs {} us", num(b), num(c)), b <= c)),
        ));
        for sys in &self.systems {
            out.push(Target::judged(
                &format!("{sys} ping-pong p99.9 < 1 ms"),
                lat(sys, "p999_us").map(|v| (format!("{} us", num(v)), v < 1000.0)),
            ));
        }
        out.push(self.pinned_target());
        out.extend(self.conns_targets());
        out.extend(self.stall_targets());
        out
    }

    /// Single-stream bulk sizes in this run, smallest first.
    fn bulk_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = self
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
        sizes.sort_unstable();
        sizes
    }

    /// `zc relay`'s default mode (`auto`) against the honest baseline at
    /// every write size: never slower and never costlier for the machine;
    /// from 64 KiB up it should cost the relay process almost nothing, and
    /// across namespaces beat copy clearly and come close to direct.
    fn default_mode_targets(&self, topo: &str, out: &mut Vec<Target>) {
        let ratio =
            |a: f64, b: f64, unit: &str| format!("{:.2}x ({} vs {} {unit})", a / b, num(a), num(b));
        for ws in self.bulk_sizes() {
            let w = Workload::Bulk {
                write_size: ws,
                streams: 1,
            };
            let gbps = |s: &str| self.median(topo, w, s, "gbps");
            let cpu = |s: &str, m: &str| self.cpu_per_gib(topo, w, s, m);
            let at = format!("{topo}, {} writes", size(ws));
            out.push(Target::judged(
                &format!("{at}: auto throughput >= 1.0x copy"),
                gbps("auto")
                    .zip(gbps("copy"))
                    .map(|(a, c)| (ratio(a, c, "GB/s"), a >= c)),
            ));
            out.push(Target::judged(
                &format!("{at}: auto machine CPU per GiB <= 1.0x copy"),
                cpu("auto", "machine_cpu_s")
                    .zip(cpu("copy", "machine_cpu_s"))
                    .map(|(a, c)| (ratio(a, c, "s/GiB"), a <= c)),
            ));
            if ws < 64 << 10 {
                continue;
            }
            out.push(Target::judged(
                &format!("{at}: auto relay-process CPU per GiB <= 5% of copy's"),
                cpu("auto", "relay_cpu_s")
                    .zip(cpu("copy", "relay_cpu_s"))
                    .map(|(a, c)| {
                        let pct = if c > 0.0 {
                            100.0 * a / c
                        } else {
                            f64::INFINITY
                        };
                        (
                            format!("{pct:.1}% ({} vs {} s/GiB)", num(a), num(c)),
                            pct <= 5.0,
                        )
                    }),
            ));
            if topo == TARGET_TOPOLOGY {
                continue;
            }
            out.push(Target::judged(
                &format!("{at}: auto throughput >= 1.2x copy"),
                gbps("auto")
                    .zip(gbps("copy"))
                    .map(|(a, c)| (ratio(a, c, "GB/s"), a >= 1.2 * c)),
            ));
            out.push(Target::judged(
                &format!("{at}: auto throughput >= 0.95x direct"),
                gbps("auto")
                    .zip(gbps("direct"))
                    .map(|(a, d)| (ratio(a, d, "GB/s"), a >= 0.95 * d)),
            ));
        }
    }

    /// Both directions at once: each delivers at least 0.8x what copy
    /// mode's does.
    fn both_ways_targets(&self, topo: &str) -> Vec<Target> {
        let Some(w) = self
            .workloads
            .iter()
            .copied()
            .find(|w| matches!(w, Workload::Bidir { .. }))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for dir in ["up", "down"] {
            let metric = if dir == "up" { "up_gbps" } else { "down_gbps" };
            let g = |s: &str| self.median(topo, w, s, metric);
            out.push(Target::judged(
                &format!("{topo}, {}: auto {dir} >= 0.8x copy's", w.label()),
                g("auto").zip(g("copy")).map(|(a, c)| {
                    (
                        format!("{:.2}x ({} vs {} GB/s)", a / c, num(a), num(c)),
                        a >= 0.8 * c,
                    )
                }),
            ));
        }
        // Each direction may hold two windows plus 1 MiB (the bound a
        // client that never reads is held to), whatever the other does.
        let bound_mib = 2.0 * self.direction_bound_mib();
        for sys in ["auto", "bpf"] {
            let peak = self.stat(topo, w, sys, "relay_sock_peak_mib");
            out.push(Target::judged(
                &format!(
                    "{topo}, {}: {sys} relay socket memory <= 2 directions x (2 x window + 1 MiB)",
                    w.label()
                ),
                peak.map(|v| {
                    (
                        format!(
                            "{} MiB at the worst sample, median {} (bound {} MiB)",
                            num(v.max),
                            num(v.median),
                            num(bound_mib)
                        ),
                        v.max <= bound_mib,
                    )
                }),
            ));
        }
        out
    }

    /// Relay memory per connection with the kernel path: at most 1 KiB.
    fn conns_targets(&self) -> Vec<Target> {
        let Some(w @ Workload::Conns { count }) = self
            .workloads
            .iter()
            .copied()
            .find(|w| matches!(w, Workload::Conns { .. }))
        else {
            return Vec::new();
        };
        ["auto", "bpf"]
            .into_iter()
            .filter(|sys| self.systems.iter().any(|s| s == sys))
            .map(|sys| {
                Target::judged(
                    &format!("{sys}: relay memory per connection <= 1 KiB ({count} conns)"),
                    self.median(TARGET_TOPOLOGY, w, sys, "relay_kib_per_conn")
                        .map(|v| (format!("{} KiB (median)", num(v)), v <= 1.0)),
                )
            })
            .collect()
    }

    fn pinned_target(&self) -> Target {
        let goal = "With --pin, loopback, 64 KiB: bpf >= 0.85x direct";
        if self.pin.is_none() {
            return Target::absent(goal, "n/a: the load generators were not pinned");
        }
        let gbps = |s: &str| self.median(TARGET_TOPOLOGY, TARGET_BULK, s, "gbps");
        Target::judged(
            goal,
            gbps("bpf").zip(gbps("direct")).map(|(b, d)| {
                (
                    format!("{:.2}x ({} vs {} GB/s)", b / d, num(b), num(d)),
                    b >= 0.85 * d,
                )
            }),
        )
    }

    /// What one direction may hold in kernel memory: two windows plus
    /// 1 MiB, in MiB.
    fn direction_bound_mib(&self) -> f64 {
        (2 * self.window + (1 << 20)) as f64 / f64::from(1 << 20)
    }

    /// A client that never reads may cost each zc relay with the BPF path
    /// two windows plus 1 MiB of kernel memory (only the server-to-client
    /// direction carries bytes), and N of them N times that.
    fn stall_targets(&self) -> Vec<Target> {
        let bound_mib = self.direction_bound_mib();
        let mut out = Vec::new();
        let Some(w @ Workload::Stall { count }) = self
            .workloads
            .iter()
            .copied()
            .find(|w| matches!(w, Workload::Stall { .. }))
        else {
            return out;
        };
        for sys in ["auto", "bpf"] {
            if !self.systems.iter().any(|s| s == sys) {
                continue;
            }
            let per_conn = self.stat(TARGET_TOPOLOGY, w, sys, "kernel_mib_per_conn");
            out.push(Target::judged(
                &format!(
                    "{sys}: a client that never reads: kernel memory growth per connection \
                     <= 2 x window + 1 MiB"
                ),
                per_conn.map(|v| {
                    (
                        format!(
                            "{} MiB/conn in the worst run of {count} conns (relay sockets + slab; \
                             bound {} MiB, window {})",
                            num(v.max),
                            num(bound_mib),
                            size(self.window as usize)
                        ),
                        v.max <= bound_mib,
                    )
                }),
            ));
            let goal = format!(
                "{sys}: {count} stalled clients: the host stays up and growth <= {count} x that"
            );
            let runs: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| s.topology == TARGET_TOPOLOGY && s.workload == w && s.system == sys)
                .collect();
            // The host's view: MemAvailable also drops by what the relay
            // holds outside its sockets' accounting (the sockmap backlog,
            // which tcp_mem does not limit) and by the load generators'
            // own sockets, so it is the stricter figure.
            let host_drop = |s: &Sample| s.metrics.get("available_drop_mib_total").copied();
            let failed = runs.iter().find(|s| s.error.is_some());
            let worst = runs
                .iter()
                .filter_map(|s| host_drop(s))
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            let limit = count as f64 * bound_mib;
            out.push(match (failed, worst) {
                (Some(s), _) => Target {
                    goal,
                    measured: format!(
                        "a run failed (MemAvailable dropped {} MiB, limit {} MiB): {}",
                        host_drop(s).map_or("-".into(), num),
                        num(limit),
                        s.error.as_deref().unwrap_or_default()
                    ),
                    met: Some(false),
                },
                (None, Some(d)) => Target {
                    goal,
                    measured: format!(
                        "MemAvailable dropped {} MiB at worst, limit {} MiB; every byte read back",
                        num(d),
                        num(limit),
                    ),
                    met: Some(d <= limit),
                },
                (None, None) => Target::absent(&goal, "not measured in this run"),
            });
        }
        out
    }
}

impl Target {
    fn judged(goal: &str, measured: Option<(String, bool)>) -> Self {
        match measured {
            Some((measured, ok)) => Self {
                goal: goal.into(),
                measured,
                met: Some(ok),
            },
            None => Self::absent(goal, "not measured in this run"),
        }
    }

    fn absent(goal: &str, why: &str) -> Self {
        Self {
            goal: goal.into(),
            measured: why.into(),
            met: None,
        }
    }
}
