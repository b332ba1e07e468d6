//! The last bytes of a stream that arrive together with its FIN, after
//! the relay has already passed on the other direction's FIN, reach the
//! other side through the kernel.
//!
//! Then TCP closes the relay's socket (time-wait) before it hands those
//! bytes to the verdict, and a closed socket's key has lost its local
//! port: looked up by that key the bytes went unpaired into the socket's
//! own queue, and the relay waited for them forever (found in the bench's
//! both-ways workload). The verdict finds such a socket by its cookie.
mod common;

use std::{
    io::{Read, Write},
    net::Shutdown,
    os::fd::AsFd,
};

use common::*;
use zc_user::engine::bpf::BpfEngine;

fn watcher() -> zc_user::watch::Watcher {
    zc_user::watch::Watcher::start().expect("watcher")
}

const REQUEST: usize = 1 << 20;
const ANSWER: &[u8] = b"the last 32 bytes, with the FIN.";

#[test]
fn the_answer_riding_on_the_fin_after_ours_arrives_through_the_kernel() {
    let progs = programs();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_runtime = rt.enter();
    for round in 0..5 {
        // client -> near (the relay's end) ... far -> server
        let [mut client, near, far, mut server] = relay_sockets_blocking();
        let far_key = zc_user::sys::sock_key(far.as_fd()).expect("key");
        let engine = BpfEngine::new(progs.clone(), watcher());
        let carried_before = progs.kernel_bytes();
        let relay = rt.spawn(async move { engine.relay(near, far).await });

        // The request, then the client's FIN: the relay passes that FIN on,
        // so its far socket has sent its own before the answer comes.
        client.write_all(&vec![b'q'; REQUEST]).expect("request");
        client.shutdown(Shutdown::Write).expect("client FIN");
        server.set_read_timeout(Some(HANG)).expect("timeout");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .expect("the server reads the request to its end");
        assert_eq!(got.len(), REQUEST, "round {round}: the request");

        // Corked, the answer and the FIN leave in one segment.
        common::set_cork(&server, true);
        server.write_all(ANSWER).expect("answer");
        server.shutdown(Shutdown::Write).expect("server FIN");
        common::set_cork(&server, false);

        client.set_read_timeout(Some(HANG)).expect("timeout");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap_or_else(|e| {
            panic!(
                "round {round}: the answer never arrived ({e}); the far socket's flow: {:?}",
                progs.flow(&far_key)
            )
        });
        assert_eq!(answer, ANSWER, "round {round}: the answer");
        let summary = rt
            .block_on(async { tokio::time::timeout(HANG, relay).await })
            .expect("the relay ended")
            .expect("join")
            .expect("relay");
        assert!(!summary.reset, "round {round}: the relay reset the pair");
        assert_eq!(
            summary.b_to_a,
            ANSWER.len() as u64,
            "round {round}: the answer's bytes as the relay counted them"
        );
        let carried = progs.kernel_bytes() - carried_before;
        assert_eq!(
            carried,
            (REQUEST + ANSWER.len()) as u64,
            "round {round}: the kernel redirected the request and the answer (BPF counters)"
        );
    }
}
