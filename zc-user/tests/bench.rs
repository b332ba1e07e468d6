//! `zc bench` as a user runs it: a short run over both topologies and all
//! systems must measure every cell, keep every byte, write readable JSON
//! and SVG, and remove the namespaces it made.
mod common;

use common::process::zc_command;

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
        "targets (loopback",
        "vs copy",
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
    // x (2 sizes + 2 streams + pingpong + conns).
    assert_eq!(samples.len(), 2 * 5 * 2 * 5, "one sample per cell and rep");
    for s in samples {
        assert_eq!(s["intact"], true, "a sample lost bytes: {s}");
        let m = &s["metrics"];
        match s["workload"]["kind"].as_str().expect("kind") {
            "bulk" => {
                let gbps = m["gbps"].as_f64().expect("gbps");
                assert!(gbps > 0.001, "no throughput measured: {s}");
                assert!(m["machine_cpu_s"].as_f64().expect("cpu") >= 0.0);
                if s["system"] != "direct" {
                    assert!(m["relay_cpu_s"].is_number(), "relay CPU missing: {s}");
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
            k => panic!("unknown workload {k}"),
        }
    }
    for system in ["direct", "auto", "bpf", "splice", "copy"] {
        for topo in ["loopback", "netns"] {
            assert!(
                samples
                    .iter()
                    .any(|s| s["system"] == system && s["topology"] == topo),
                "no {system} samples on {topo}"
            );
        }
    }
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
