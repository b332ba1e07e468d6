//! How long a paired connection takes to close. The FIN hold keeps a FIN
//! back while bytes redirected before it wait in the kernel; it used to
//! drop the FIN (or take it off its data segment) and wait for the
//! sender to resend it, a tail-loss probe about 200 ms later, so every
//! paired close took about 205 ms against 0.3 ms unpaired. Now the held
//! FIN goes round the device's backlog until the queue is empty. Measured
//! here from the client's shutdown to the server's EOF through socat,
//! unpaired and paired, with the FIN alone and riding on the last bytes.
mod common;

use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use common::agent::{Agent, Holder};

const RUNS: usize = 20;

/// One close through a fresh socat (paired by `agent` if given): the
/// client end sends 4 KiB and shuts down (corked: FIN on the data);
/// returns how long until the server end read it all and then EOF.
fn close_once(agent: Option<&Agent>, cork: bool) -> Duration {
    let mut socat = Holder::socat(&[]);
    if let Some(agent) = agent {
        let (ok, _, err) = agent.pair(socat.pid(), socat.fds);
        assert!(ok, "zc pair failed: {err}");
    }
    let [client, server] = &mut socat.ends;
    if cork {
        common::set_cork(client, true);
    }
    let msg = [0x5au8; 4096];
    let start = Instant::now();
    client.write_all(&msg).expect("write");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut got = Vec::new();
    server.read_to_end(&mut got).expect("read to EOF");
    let took = start.elapsed();
    assert_eq!(got, msg, "the message arrived damaged");
    took
}

fn summary(what: &str, mut t: Vec<Duration>) -> Duration {
    t.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = t[t.len() / 2];
    eprintln!(
        "{what}: close p50 {:.2} ms, min {:.2} ms, max {:.2} ms ({} runs)",
        ms(p50),
        ms(t[0]),
        ms(t[t.len() - 1]),
        t.len()
    );
    p50
}

#[test]
fn a_paired_connection_closes_without_waiting_for_a_retransmission() {
    let agent = Agent::start("close");
    for cork in [false, true] {
        let how = if cork { "FIN on data" } else { "bare FIN" };
        let unpaired = summary(
            &format!("unpaired, {how}"),
            (0..RUNS).map(|_| close_once(None, cork)).collect(),
        );
        let paired = summary(
            &format!("paired, {how}"),
            (0..RUNS).map(|_| close_once(Some(&agent), cork)).collect(),
        );
        assert!(
            paired < Duration::from_millis(50),
            "paired closes ({how}) still wait for TCP to resend the FIN: p50 {paired:?} \
             (unpaired {unpaired:?})"
        );
    }
    let (ok, out, _) = agent.zc(&["status"]);
    assert!(ok);
    eprintln!(
        "{}",
        out.lines()
            .find(|l| l.contains("FIN hold"))
            .unwrap_or_default()
    );
}
