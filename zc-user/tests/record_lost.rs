//! Sockets the recording program cannot record (its map full) are
//! counted, so the agent can say why a tuple is missing instead of
//! claiming it was never established.
//!
//! Its own test binary: it records the sockets of this process's cgroup.
mod common;

use std::net::{TcpListener, TcpStream};

use common::*;
use zc_user::{ebpf::Programs, sys};

#[test]
fn sockets_past_the_recording_maps_capacity_are_counted_as_lost() {
    programs();
    // Room for two sockets; the connections below establish six.
    let progs = Programs::load_sized(2).expect("loading the programs with small maps");
    let cgroup = own_cgroup();
    progs
        .enable_recording(&cgroup)
        .unwrap_or_else(|e| panic!("recording {}: {e}", cgroup.display()));
    assert_eq!(progs.recording_lost(), 0, "lost before any socket was made");

    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let mut conns = Vec::new();
    for _ in 0..3 {
        let c = TcpStream::connect(addr).expect("connect");
        let (s, _) = l.accept().expect("accept");
        conns.push((c, s));
    }
    let recorded = conns
        .iter()
        .flat_map(|(c, s)| [c, s])
        .filter(|s| {
            let key = sys::sock_key(std::os::fd::AsFd::as_fd(*s)).expect("key");
            progs.recorded(&key).is_some()
        })
        .count();
    assert!(recorded <= 2, "{recorded} sockets recorded in a map of 2");
    // Other processes in the cgroup may take entries too, so at least
    // the four of ours that found no room are lost.
    let lost = progs.recording_lost();
    assert!(
        lost >= 4,
        "{lost} sockets counted as lost; at least 4 of ours found the map full"
    );
}

/// This process's cgroup v2 directory.
fn own_cgroup() -> std::path::PathBuf {
    let line = std::fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
    let rel = line
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("this test needs cgroup v2; /proc/self/cgroup says:\n{line}"));
    let root = zc_user::host::cgroup2_root().expect("finding the cgroup2 mount");
    root.join(rel.trim_start_matches('/'))
}
