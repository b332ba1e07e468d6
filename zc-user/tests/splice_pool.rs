//! The splice engine's pipe pool is bounded; a connection that finds no
//! pipe is copied instead, and loses nothing.
mod common;

use std::sync::Arc;

use common::*;
use tokio::net::TcpStream;
use zc_user::engine::{
    Engine,
    splice::{PipePool, SpliceEngine},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_pipe_pool_are_copied_intact() {
    init();
    // Room for one connection's two pipes only.
    let pool = Arc::new(PipePool::new(2, 1 << 20));
    let engine = Engine::Splice(SpliceEngine::new(pool.clone()));
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let (server_addr, mut reports) =
        exchange_server_gated("127.0.0.1:0", 4 << 20, 256 << 10, go).await;
    let relay = TestRelay::start(engine, server_addr).await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(TcpStream::connect(relay.addr).await.expect("connect"));
    }
    go_tx.send(true).expect("servers");
    let mut clients = tokio::task::JoinSet::new();
    for (i, s) in streams.into_iter().enumerate() {
        clients.spawn(async move { exchange(s, 4 << 20, 256 << 10, 900 + i as u64).await });
    }
    let mut server = std::collections::HashMap::new();
    for _ in 0..4 {
        let (srv_sent, srv_got) = reports.recv().await.expect("report");
        server.insert(srv_got, srv_sent);
    }
    while let Some(r) = clients.join_next().await {
        let (sent, got) = r.expect("client");
        assert_eq!(server.get(&sent), Some(&got), "a stream arrived damaged");
    }
    assert!(
        pool.live() <= 2,
        "the pool made {} pipes, more than its bound of 2",
        pool.live()
    );
    relay.stop().await;
}
