//! When the kernel's maps have no room for another pair, the relay still
//! serves the connection, in user space, instead of resetting it; the
//! pairs already made keep the kernel path.
mod common;

use common::*;
use tokio::net::{TcpListener, TcpStream};
use zc_user::ebpf::Programs;

/// Bytes each way per connection: far below a window, so nothing is
/// held and the kernel's counters see every byte of a paired connection.
const EACH: u64 = 1 << 20;

/// The relay's end index in `Programs::entry_counts` for PEERS.
const PEERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_maps_capacity_is_copied_not_reset() {
    programs();
    // Room for two pairs (four sockets).
    let progs = Programs::load_sized(4).expect("loading the programs with small maps");
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay = TestRelay::start(bpf_engine(&progs), server.local_addr().expect("addr")).await;

    // Two connections fill the maps.
    let mut paired = Vec::new();
    for _ in 0..2 {
        let c = TcpStream::connect(relay.addr).await.expect("connect");
        let (s, _) = server.accept().await.expect("accept");
        paired.push((c, s));
    }
    wait_for(|| progs.entry_counts()[PEERS] == 4, "both pairs in PEERS").await;

    // The third finds them full: it must still arrive whole, both ways,
    // and without the kernel carrying any of it.
    let c = TcpStream::connect(relay.addr).await.expect("connect");
    let (s, _) = server.accept().await.expect("accept");
    both_ways(c, s, 3).await;
    assert_eq!(
        progs.kernel_bytes(),
        0,
        "the connection past the maps' capacity went through the kernel path"
    );
    assert_eq!(
        progs.entry_counts()[PEERS],
        4,
        "a pair was made past capacity"
    );

    // The two paired connections still use the kernel path.
    for (i, (c, s)) in paired.into_iter().enumerate() {
        both_ways(c, s, i as u64).await;
    }
    assert_eq!(
        progs.kernel_bytes(),
        2 * 2 * EACH,
        "the kernel did not carry exactly the two paired connections' bytes"
    );
    relay.stop().await;
    assert_maps_empty(&progs).await;
}

/// Sends [`EACH`] random bytes each way at once and checks both arrive
/// whole and in order.
async fn both_ways(client: TcpStream, server: TcpStream, seed: u64) {
    let (c, s) = tokio::join!(
        exchange(client, EACH, 64 << 10, 2 * seed),
        exchange(server, EACH, 64 << 10, 2 * seed + 1)
    );
    assert_eq!(c.0, s.1, "client to server: bytes lost or damaged");
    assert_eq!(s.0, c.1, "server to client: bytes lost or damaged");
}

/// Polls `cond` (a map count, for which the kernel sends no event) until
/// it holds or [`HANG`] passes.
async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + HANG;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
