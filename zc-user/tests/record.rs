//! `--record`: each direction lands in its own file, byte for byte what
//! crossed the wire.
mod common;

use std::sync::Arc;

use common::*;
use tokio::net::TcpStream;
use xxhash_rust::xxh3::Xxh3;
use zc_user::engine::{
    Engine,
    splice::{PipePool, Recorder, SpliceEngine},
};

fn digest_of(path: &std::path::Path) -> Digest {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut h = Xxh3::new();
    h.update(&data);
    Digest {
        bytes: data.len() as u64,
        hash: h.digest(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_match_the_relayed_bytes_in_both_directions() {
    init();
    let dir = std::env::temp_dir().join(format!("zc-record-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rec = Arc::new(Recorder::new(dir.clone()).expect("recorder"));
    let pool = Arc::new(PipePool::new(64, 1 << 20));
    let engine = Engine::Splice(SpliceEngine::new(pool).with_recorder(rec));
    let (server_addr, mut reports) = exchange_server("127.0.0.1:0", 12 << 20, 2 << 20).await;
    let relay = TestRelay::start(engine, server_addr).await;
    let s = TcpStream::connect(relay.addr).await.expect("connect");
    let (sent, got) = exchange(s, 20 << 20, 2 << 20, 77).await;
    let (srv_sent, srv_got) = reports.recv().await.expect("server report");
    assert_eq!(srv_got, sent);
    assert_eq!(got, srv_sent);
    relay.stop().await;
    assert_eq!(
        digest_of(&dir.join("000001-client-to-upstream")),
        sent,
        "client-to-upstream recording differs"
    );
    assert_eq!(
        digest_of(&dir.join("000001-upstream-to-client")),
        srv_sent,
        "upstream-to-client recording differs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
