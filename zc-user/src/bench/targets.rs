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
            out.push(Target::judged(goal, measured));
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
        out.push(self.pinned_target());
        out.extend(self.stall_targets());
        out
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

    /// A client that never reads may cost each zc relay with the BPF path
    /// two windows plus 1 MiB of kernel memory (only the server-to-client
    /// direction carries bytes), and N of them N times that.
    fn stall_targets(&self) -> Vec<Target> {
        let bound = 2 * self.window + (1 << 20);
        let bound_mib = bound as f64 / f64::from(1 << 20);
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
