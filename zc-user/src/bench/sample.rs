//! One sample: one workload against one system, with the CPU and the
//! kernel memory it cost.
use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use serde::Serialize;

use super::{
    Plan, Workload, kmem, load, pin, report, stall,
    systems::{self, Running},
    topology::Topology,
};

/// One measurement of one system.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub topology: &'static str,
    pub system: String,
    pub rep: usize,
    pub workload: Workload,
    /// gbps (up_gbps and down_gbps both ways), gib, secs, relay_cpu_s, machine_cpu_s, relay_sock_peak_mib,
    /// slab_growth_mib; p50_us, p99_us, p999_us, round_trips;
    /// relay_kib_per_conn, machine_kib_per_conn, conns_per_s; for stall,
    /// per connection and in total: relay_sock_mib, slab_mib,
    /// kernel_mib (relay sockets + slab), available_drop_mib, pushed_mib.
    pub metrics: BTreeMap<&'static str, f64>,
    /// Every byte arrived (counted, and hashed with --verify).
    pub intact: bool,
    pub error: Option<String>,
}

pub fn measure(
    topo: &Topology,
    sys: &mut Running,
    server: &load::Server,
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
    // The load runs on the client's CPU; the sampler and the relay don't.
    let client_cpu = plan.pin.map(|p| p.client_cpu);
    let addr = sys.addr;
    let result = match w {
        Workload::Bulk {
            write_size,
            streams,
        } => {
            let sampler = kmem::Sampler::start(sys.relay_sockets(topo)?)?;
            pin::on_cpu(client_cpu, || {
                load::bulk(topo, addr, write_size, streams, plan.duration, plan.verify)
            })
            .and_then(|b| Ok((b, sampler.finish()?)))
            .map(|(b, peaks)| {
                let gib = b.bytes as f64 / (1u64 << 30) as f64;
                s.metrics.insert("gbps", b.bytes as f64 / b.secs / 1e9);
                s.metrics.insert("gib", gib);
                s.metrics.insert("secs", b.secs);
                record_peaks(&mut s, &peaks);
                s.intact = b.intact;
                if !b.intact {
                    s.error = Some(if b.sent == b.bytes {
                        format!("{} bytes arrived, but not the bytes sent", b.bytes)
                    } else {
                        format!("sent {} bytes, the server got {}", b.sent, b.bytes)
                    });
                }
            })
        }
        Workload::Bidir { write_size } => {
            let sampler = kmem::Sampler::start(sys.relay_sockets(topo)?)?;
            pin::on_cpu(client_cpu, || {
                load::bidir(topo, addr, write_size, plan.duration)
            })
            .and_then(|b| Ok((b, sampler.finish()?)))
            .map(|(b, peaks)| {
                record_peaks(&mut s, &peaks);
                s.metrics.insert("up_gbps", b.up as f64 / b.secs / 1e9);
                s.metrics.insert("down_gbps", b.down as f64 / b.secs / 1e9);
                s.metrics
                    .insert("gib", (b.up + b.down) as f64 / (1u64 << 30) as f64);
                s.metrics.insert("secs", b.secs);
                if let Some(e) = b.problem {
                    s.intact = false;
                    s.error = Some(e);
                }
            })
        }
        Workload::PingPong { size } => pin::on_cpu(client_cpu, || {
            load::ping_pong(topo, addr, size, plan.duration)
        })
        .map(|mut rtts| {
            rtts.sort_by(f64::total_cmp);
            s.metrics.insert("p50_us", report::percentile(&rtts, 50.0));
            s.metrics.insert("p99_us", report::percentile(&rtts, 99.0));
            s.metrics.insert("p999_us", report::percentile(&rtts, 99.9));
            s.metrics
                .insert("max_us", rtts.last().copied().unwrap_or(0.0));
            s.metrics.insert("round_trips", rtts.len() as f64);
        }),
        Workload::Conns { count } => {
            let rss0 = sys.rss_kib();
            let mem0 = systems::machine_used_kib()?;
            let mut after = (None, 0);
            let relay: &Running = sys;
            pin::on_cpu(client_cpu, || {
                load::many_conns(topo, addr, count, || {
                    // Let the relay finish pairing the last connections.
                    std::thread::sleep(Duration::from_millis(300));
                    after = (relay.rss_kib(), systems::machine_used_kib()?);
                    Ok(())
                })
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
        Workload::Stall { count } => {
            let sampler = kmem::Sampler::start(sys.relay_sockets(topo)?)?;
            pin::on_cpu(client_cpu, || {
                stall::run(topo, addr, count, &server.board, || sampler.finish())
            })
            .map(|st| record_stall(&mut s, count, &st))
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

fn record_stall(s: &mut Sample, count: usize, st: &stall::Stall<kmem::Peaks>) {
    let n = count as f64;
    let p = st.measured;
    let slab = mib(p.slab_growth_kib << 10);
    let drop = mib(p.available_drop_kib << 10);
    let mut put = |name: &'static str, total_name: &'static str, v: f64| {
        s.metrics.insert(name, v / n);
        s.metrics.insert(total_name, v);
    };
    put("slab_mib_per_conn", "slab_mib_total", slab);
    put(
        "available_drop_mib_per_conn",
        "available_drop_mib_total",
        drop,
    );
    put("pushed_mib_per_conn", "pushed_mib_total", mib(st.pushed));
    if let Some(bytes) = p.relay_sock_bytes {
        put(
            "relay_sock_mib_per_conn",
            "relay_sock_mib_total",
            mib(bytes),
        );
        put("kernel_mib_per_conn", "kernel_mib_total", mib(bytes) + slab);
    }
    if let (Some(pages), Some(limit)) = (p.tcp_pages, kmem::tcp_mem_limit().filter(|&l| l > 0)) {
        s.metrics.insert(
            "tcp_mem_peak_pct_of_limit",
            100.0 * pages as f64 / limit as f64,
        );
    }
    s.metrics.insert("mismatched_conns", st.mismatched as f64);
    if !st.problems.is_empty() {
        s.intact = false;
        s.error = Some(st.problems.join("; "));
    }
}

/// The kernel memory a bulk or both-ways sample saw at its peak.
fn record_peaks(s: &mut Sample, peaks: &kmem::Peaks) {
    if let Some(bytes) = peaks.relay_sock_bytes {
        s.metrics.insert("relay_sock_peak_mib", mib(bytes));
    }
    s.metrics
        .insert("slab_growth_mib", mib(peaks.slab_growth_kib << 10));
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}
