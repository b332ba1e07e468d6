//! `zc bench` as a user runs it: a short run over both topologies and all
//! systems must measure every cell, keep every byte, write readable JSON
//! and SVG, and remove the namespaces it made; clients that never read
//! are measured and every byte they get is checked.
mod common;

use std::{
    process::Output,
    sync::{Mutex, MutexGuard},
};

use common::process::zc_command;

/// Benches that measure run one at a time: two at once would share two
/// CPUs and each see the other's memory in Slab and MemAvailable.
fn one_bench_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `zc bench ARGS --json FILE` and returns its output and the JSON.
fn bench_with_json(args: &[&str], name: &str) -> (Output, Option<serde_json::Value>) {
    let dir = std::env::temp_dir().join(format!("zc-bench-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("b.json");
    let out = zc_command(false)
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running zc bench");
    let doc = std::fs::read_to_string(&json)
        .ok()
        .map(|t| serde_json::from_str(&t).expect("the JSON file parses"));
    let _ = std::fs::remove_dir_all(&dir);
    (out, doc)
}

/// Namespaces of the bench run by process `pid` (named `zcb<pid><role>`).
fn bench_namespaces(pid: u32) -> Vec<String> {
    let prefix = format!("zcb{pid}");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "zc bench creates namespaces and loads BPF: run `cargo xtask test` as root"
    );
}

#[test]
fn short_bench_measures_every_system_and_topology_and_cleans_up() {
    require_root();
    let _one = one_bench_at_a_time();
    let dir = std::env::temp_dir().join(format!("zc-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let out = zc_command(false)
        .args([
            "bench",
            "--reps",
            "2",
            "--duration",
            "0.2",
            "--write-sizes",
            "1k,64k",
            "--streams",
            "2",
            "--conns",
            "30",
            "--verify",
            "--pin",
            "--json",
        ])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running zc bench");
    let pid = out.id();
    let out = out.wait_with_output().expect("waiting for zc bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "zc bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for needle in [
        "== loopback ==",
        "== netns ==",
        "targets (issue 10",
        "both ways 64 KiB",
        "netns, 64 KiB writes: auto throughput >= 0.95x direct",
        "vs copy",
        "load generators pinned: client on CPU",
        "peak relay socket memory MiB",
        "slab growth MiB",
        "With --pin, loopback, 64 KiB: bpf >= 0.85x direct",
        "both ways 64 KiB: auto relay socket memory <= 2 directions x (2 x window + 1 MiB)",
    ] {
        assert!(
            stdout.contains(needle),
            "no `{needle}` in the table:\n{stdout}"
        );
    }

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json file")).expect("json");
    let samples = doc["samples"].as_array().expect("samples array");
    // 2 topologies x 5 systems (direct, auto, bpf, splice, copy) x 2 reps
    // x (2 sizes + 2 streams + both ways + pingpong + conns).
    assert_eq!(samples.len(), 2 * 5 * 2 * 6, "one sample per cell and rep");
    for s in samples {
        assert_eq!(s["intact"], true, "a sample lost bytes: {s}");
        let m = &s["metrics"];
        match s["workload"]["kind"].as_str().expect("kind") {
            "bulk" => {
                let gbps = m["gbps"].as_f64().expect("gbps");
                assert!(gbps > 0.001, "no throughput measured: {s}");
                assert!(m["machine_cpu_s"].as_f64().expect("cpu") >= 0.0);
                assert!(m["slab_growth_mib"].as_f64().expect("slab") >= 0.0);
                if s["system"] != "direct" {
                    assert!(m["relay_cpu_s"].is_number(), "relay CPU missing: {s}");
                    assert!(
                        m["relay_sock_peak_mib"].is_number(),
                        "relay memory missing: {s}"
                    );
                } else {
                    assert!(
                        m["relay_sock_peak_mib"].is_null(),
                        "direct has no relay: {s}"
                    );
                }
            }
            "ping_pong" => {
                let (p50, p999) = (m["p50_us"].as_f64(), m["p999_us"].as_f64());
                assert!(
                    p50.zip(p999).is_some_and(|(a, b)| a > 0.0 && b >= a),
                    "bad percentiles: {s}"
                );
                assert!(m["round_trips"].as_f64().expect("rt") > 10.0);
            }
            "conns" => {
                assert!(m["conns_per_s"].as_f64().expect("rate") > 0.0, "{s}");
            }
            "bidir" => {
                for dir in ["up_gbps", "down_gbps"] {
                    let v = m[dir].as_f64().expect(dir);
                    assert!(v > 0.001, "nothing moved {dir}: {s}");
                }
                // Both ways at once has a memory target of its own.
                assert_eq!(
                    m["relay_sock_peak_mib"].is_number(),
                    s["system"] != "direct",
                    "relay memory both ways: {s}"
                );
            }
            k => panic!("unknown workload {k}"),
        }
    }
    for system in ["direct", "auto", "bpf", "splice", "copy"] {
        for topo in ["loopback", "netns"] {
            let bulk_memory = samples
                .iter()
                .filter(|s| s["system"] == system && s["topology"] == topo)
                .filter_map(|s| s["metrics"]["relay_sock_peak_mib"].as_f64())
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            match system {
                "direct" => assert!(bulk_memory.is_none()),
                // A relay moving bulk data holds some of it in its sockets'
                // queues; none in every sample means the sampler missed
                // its sockets (wrong namespace or process).
                _ => assert!(
                    bulk_memory.is_some_and(|m| m > 0.0),
                    "no socket memory found for {system} on {topo}: {bulk_memory:?}"
                ),
            }
        }
    }
    assert!(doc["pin"]["client_cpu"].is_u64(), "{}", doc["pin"]);
    assert_ne!(doc["pin"]["client_cpu"], doc["pin"]["server_cpu"]);
    let targets = doc["targets"].as_array().expect("targets");
    assert!(
        targets.iter().all(|t| t["met"].is_boolean()),
        "every target was measured: {targets:?}"
    );

    let chart = std::fs::read_to_string(&svg).expect("svg file");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    for needle in ["loopback: bulk", "netns: 64 B ping-pong", ">bpf<", ">copy<"] {
        assert!(chart.contains(needle), "the chart lacks `{needle}`");
    }
    assert!(
        bench_namespaces(pid).is_empty(),
        "namespaces left behind: {:?}",
        bench_namespaces(pid)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clients_that_never_read_are_measured_then_get_every_byte() {
    require_root();
    let _one = one_bench_at_a_time();
    // A small window keeps the run short; the bench must pick it up from
    // --relay-args for the bound it reports.
    let window: u64 = 2 << 20;
    let window_arg = format!("--window {window}");
    let (out, doc) = bench_with_json(
        &[
            "--topology",
            "loopback",
            "--systems",
            "direct,auto,copy",
            "--workloads",
            "stall",
            "--stall-conns",
            "20",
            "--reps",
            "1",
            "--pin",
            "--relay-args",
            &window_arg,
        ],
        "stall",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "zc bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for needle in [
        "stall 20 conns  kernel MiB/conn",
        "relay sockets MiB/conn",
        "MemAvailable drop MiB total",
        "TCP mem peak, % of hard limit",
        "auto: 20 stalled clients: the host stays up",
        "bound 5.00 MiB, window 2 MiB",
    ] {
        assert!(stdout.contains(needle), "no `{needle}` in:\n{stdout}");
    }
    let doc = doc.expect("the JSON file");
    assert_eq!(doc["window"], window);
    let samples = doc["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 3, "one sample per system");
    let window_mib = (window >> 20) as f64;
    for s in samples {
        assert_eq!(s["intact"], true, "{s}");
        let m = &s["metrics"];
        assert_eq!(m["mismatched_conns"], 0.0, "{s}");
        assert!(
            m["pushed_mib_per_conn"].as_f64().expect("pushed") > 0.0,
            "{s}"
        );
        assert!(m["available_drop_mib_total"].is_number(), "{s}");
        // 20 clients take a few MiB of TCP memory: a share of the limit
        // above nothing and below all of it.
        let tcp = m["tcp_mem_peak_pct_of_limit"].as_f64();
        assert!(tcp.is_some_and(|p| p > 0.0 && p < 100.0), "{s}");
        let relay = m["relay_sock_mib_per_conn"].as_f64();
        match s["system"].as_str().expect("system") {
            "direct" => assert!(relay.is_none(), "direct has no relay: {s}"),
            // What waits for the reader and what the held sender keeps
            // fill more than a window, and the relay promises no more
            // than two (plus skb overhead).
            "auto" => assert!(
                relay.is_some_and(|v| v > window_mib && v <= 2.0 * window_mib + 1.0),
                "auto's sockets hold {relay:?} MiB per stalled connection, window {window_mib} MiB"
            ),
            _ => assert!(relay.is_some_and(|v| v > 0.0), "{s}"),
        }
    }
    let targets = doc["targets"].as_array().expect("targets");
    let stall_targets: Vec<_> = targets
        .iter()
        .filter(|t| t["goal"].as_str().is_some_and(|g| g.starts_with("auto: ")))
        .collect();
    assert_eq!(stall_targets.len(), 2, "{targets:?}");
    assert!(
        stall_targets.iter().all(|t| t["met"].is_boolean()),
        "{stall_targets:?}"
    );
}

/// socat relaying through a pipeline that throws away the first 100,000
/// bytes the server sends: a stalled stream that arrives short.
const LOSSY: &str = "socat - TCP:$1:$2 | { head -c 100000 >/dev/null; cat; }\n";

#[test]
fn a_relay_that_loses_bytes_of_a_stalled_stream_fails_the_run() {
    require_root();
    let _one = one_bench_at_a_time();
    let dir = std::env::temp_dir().join(format!("zc-bench-lossy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let script = dir.join("lossy.sh");
    std::fs::write(&script, LOSSY).expect("writing the script");
    let peer = format!(
        "lossy=socat TCP-LISTEN:{{listen_port}},bind={{listen_host}},reuseaddr,fork \
         'EXEC:sh {} {{upstream_host}} {{upstream_port}}'",
        script.display()
    );
    let (out, doc) = bench_with_json(
        &[
            "--topology",
            "loopback",
            "--systems",
            "direct",
            "--workloads",
            "stall",
            "--stall-conns",
            "3",
            "--reps",
            "1",
            "--peer",
            &peer,
        ],
        "lossy",
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a relay that lost bytes passed");
    assert!(
        stderr.contains("lossy") && stderr.contains("the server pushed"),
        "the failure names the relay and the counts: {stderr}"
    );
    let doc = doc.expect("the JSON file");
    let samples = doc["samples"].as_array().expect("samples");
    for s in samples {
        match s["system"].as_str().expect("system") {
            "direct" => assert_eq!(s["intact"], true, "{s}"),
            _ => {
                assert_eq!(s["intact"], false, "{s}");
                assert_eq!(s["metrics"]["mismatched_conns"], 3.0, "{s}");
            }
        }
    }
}

#[test]
fn a_peer_that_does_not_start_is_named_and_fails_the_run() {
    require_root();
    let out = zc_command(false)
        .args([
            "bench",
            "--topology",
            "loopback",
            "--systems",
            "direct",
            "--workloads",
            "pingpong",
            "--reps",
            "1",
            "--duration",
            "0.1",
            "--peer",
            "broken=false {listen}",
        ])
        .output()
        .expect("running zc bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing peer must fail the run");
    assert!(
        stderr.contains("broken") && stderr.contains("exited"),
        "the error names the peer and what happened: {stderr}"
    );
    // The systems that did start were still measured.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ping-pong 64 B"), "{stdout}");
}

#[test]
fn bad_bench_options_are_refused_before_anything_starts() {
    for (args, says) in [
        (&["--write-sizes", "2m"][..], "1 byte to 1 MiB"),
        (&["--duration", "0"][..], "--duration"),
        (&["--peer", "nolisten=socat - -"][..], "where to listen"),
        (
            &["--relay-args", "--window lots"][..],
            "no byte count after --window",
        ),
        (
            &["--workloads", "conns", "--conns", "0"][..],
            "nothing to measure",
        ),
    ] {
        let out = zc_command(false)
            .arg("bench")
            .args(args)
            .output()
            .expect("running zc bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(says),
            "{args:?}: expected `{says}` in: {stderr}"
        );
    }
}

#[test]
fn unprivileged_bench_says_it_needs_root() {
    require_root();
    let out = zc_command(true)
        .args(["bench", "--quick"])
        .output()
        .expect("running zc bench as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs root"), "{stderr}");
}
