//! socat, a poll(2) loop that takes a failed read as fatal, paired by the
//! agent in the middle of a busy connection: bytes both ways at once,
//! paired by pid/fd and by tuple, twenty times in a row, every byte
//! intact and the kernel carrying what is sent after pairing. And socat
//! pushing into a slow reader: pairing it is either safe or refused for
//! the reason that makes it unsafe.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::agent::*;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use zc_user::traffic::{Digest, Pattern};

const ROUNDS: usize = 20;
/// Bytes each way before pairing is asked for: socat is busy by then.
const BEFORE: u64 = 8 << 20;
/// Bytes each way sent after the pairing was reported made; all of them
/// must cross the kernel.
const AFTER: u64 = 64 << 20;

/// Twenty connections through twenty socat processes, one after the
/// other, each paired while both ends write random-sized chunks of a
/// pattern at each other (pid/fd on even rounds, tuple on odd ones).
/// Every round must end intact both ways, with socat still running, the
/// verdict's counters showing at least [`AFTER`] bytes each way, and the
/// pair gone from the list once both ends close.
#[test]
fn socat_paired_mid_stream_both_ways_is_intact_twenty_times_in_a_row() {
    // What is tested here is every byte across a pairing. Under the whole
    // suite's load the kernel once took 56 ms to send what socat had
    // queued, past the default 50 ms stop, and the pairing was (rightly)
    // undone; the default bound has tests of its own (agent_stop.rs).
    let agent = Agent::start_with("socat-both", &["--max-stop", "250"]);
    let mut failed = Vec::new();
    for round in 0..ROUNDS {
        match one_round(&agent, round) {
            Ok(line) => eprintln!("round {round}: {line}"),
            Err(why) => {
                eprintln!("round {round}: FAILED: {why}");
                failed.push((round, why));
            }
        }
    }
    eprintln!(
        "{}/{ROUNDS} rounds intact, both ways, the kernel carrying what followed the pairing",
        ROUNDS - failed.len()
    );
    assert!(failed.is_empty(), "failed rounds: {failed:#?}");
}

fn one_round(agent: &Agent, round: usize) -> Result<String, String> {
    let socat = Holder::socat(&[]);
    let pid = socat.pid();
    let flows = TwoWay::start(&socat.ends, round as u64);
    flows.wait_read()?;
    let by_tuple = round % 2 == 1;
    let (ok, out, err) = if by_tuple {
        agent.zc(&["pair", &socat.tuples[0], &socat.tuples[1]])
    } else {
        agent.pair(pid, socat.fds)
    };
    if !ok {
        // A refusal must leave the proxy relaying as before.
        let intact = match flows.finish(AFTER) {
            Ok((sent, got)) if sent == got => "intact".to_string(),
            Ok((sent, got)) => format!("damaged: sent {sent:?}, got {got:?}"),
            Err(e) => e,
        };
        return Err(format!(
            "zc pair refused ({intact} through socat after): {}",
            err.trim()
        ));
    }
    let (sent, got) = flows.finish(AFTER)?;
    if sent != got {
        return Err(format!("damaged: sent {sent:?}, got {got:?}"));
    }
    let alive = cpu_secs_if_alive(pid).is_some();
    let carried = carried(agent)?;
    if carried.iter().any(|&c| c < AFTER) {
        return Err(format!(
            "the kernel carried {carried:?} bytes, less than the {AFTER} sent each way after \
             pairing"
        ));
    }
    if !alive {
        return Err("socat exited while paired".into());
    }
    drop(socat);
    wait_unlisted(agent)?;
    Ok(format!(
        "{} ({}), {} and {} bytes intact, {} and {} through the kernel",
        out.trim(),
        if by_tuple { "tuple" } else { "pid/fd" },
        sent[0].bytes,
        sent[1].bytes,
        carried[0],
        carried[1]
    ))
}

/// The verdict's byte counts of the only pair, per direction.
fn carried(agent: &Agent) -> Result<[u64; 2], String> {
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    if !ok {
        return Err(format!("zc stats failed: {err}"));
    }
    let stats: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("zc stats --json: {e}: {out}"))?;
    let b = |i: usize| stats["pairs"][0]["bytes"][i].as_u64();
    match (b(0), b(1)) {
        (Some(a), Some(b)) => Ok([a, b]),
        _ => Err(format!("no pair in zc stats: {stats}")),
    }
}

/// Waits until the agent lists no pair: both ends closed, so the pair
/// must end rather than stay listed.
fn wait_unlisted(agent: &Agent) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pairs = agent.pairs();
        if pairs.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "still listed 10 s after both ends closed: {pairs:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Random-sized writes of a pattern both ways through one connection:
/// each sender writes until told how far to go, each reader reads what
/// its sender says it sent.
struct TwoWay {
    /// Bytes each sender has written so far.
    written: [Arc<AtomicU64>; 2],
    /// Where each sender stops (u64::MAX: not yet told).
    limit: [Arc<AtomicU64>; 2],
    sent: [JoinHandle<Result<Digest, String>>; 2],
    /// Each reader says once it has read the amount asked for by
    /// [`TwoWay::wait_read`], and later reads until told the total.
    crossed: [mpsc::Receiver<()>; 2],
    totals: [mpsc::Sender<u64>; 2],
    got: [JoinHandle<Result<Digest, String>>; 2],
}

impl TwoWay {
    fn start(ends: &[TcpStream; 2], seed: u64) -> Self {
        let written = [0, 1].map(|_| Arc::new(AtomicU64::new(0)));
        let limit = [0, 1].map(|_| Arc::new(AtomicU64::new(u64::MAX)));
        let sent = [0, 1].map(|i| {
            let s = ends[i].try_clone().expect("clone");
            let (w, l) = (written[i].clone(), limit[i].clone());
            std::thread::spawn(move || send(s, seed * 2 + i as u64, &w, &l))
        });
        let mut crossed = Vec::new();
        let mut totals = Vec::new();
        // Direction d: sender d writes into ends[d], its reader reads the
        // other end.
        let got = [0, 1].map(|d| {
            let s = ends[1 - d].try_clone().expect("clone");
            let (at, crossed_rx) = mpsc::channel();
            let (total_tx, total) = mpsc::channel();
            crossed.push(crossed_rx);
            totals.push(total_tx);
            std::thread::spawn(move || receive(s, at, total))
        });
        Self {
            written,
            limit,
            sent,
            crossed: crossed.try_into().expect("two"),
            totals: totals.try_into().expect("two"),
            got,
        }
    }

    /// Waits until both readers have read at least [`BEFORE`] bytes.
    fn wait_read(&self) -> Result<(), String> {
        for (i, c) in self.crossed.iter().enumerate() {
            c.recv_timeout(common::HANG).map_err(|_| {
                format!(
                    "direction {i} never carried {BEFORE} bytes before pairing (written: {})",
                    self.written[i].load(Ordering::Relaxed)
                )
            })?;
        }
        Ok(())
    }

    /// Lets each sender write `more` bytes past what it has written now,
    /// then compares what each reader got with what its sender sent.
    fn finish(self, more: u64) -> Result<([Digest; 2], [Digest; 2]), String> {
        for i in 0..2 {
            let now = self.written[i].load(Ordering::Relaxed);
            self.limit[i].store(now + more, Ordering::Relaxed);
        }
        let mut sent = Vec::new();
        for (i, s) in self.sent.into_iter().enumerate() {
            let d = s.join().map_err(|_| format!("sender {i} panicked"))??;
            self.totals[i]
                .send(d.bytes)
                .map_err(|_| format!("reader of direction {i} ended early"))?;
            sent.push(d);
        }
        let mut got = Vec::new();
        for (i, g) in self.got.into_iter().enumerate() {
            got.push(g.join().map_err(|_| format!("reader {i} panicked"))??);
        }
        Ok((sent.try_into().expect("two"), got.try_into().expect("two")))
    }
}

fn send(
    mut s: TcpStream,
    seed: u64,
    written: &AtomicU64,
    limit: &AtomicU64,
) -> Result<Digest, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut p = Pattern::new(seed + 1);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut bytes = 0u64;
    loop {
        let left = limit.load(Ordering::Relaxed).saturating_sub(bytes);
        if left == 0 {
            break;
        }
        let len = rng.random_range(1..=128 << 10).min(left) as usize;
        let buf = p.next(len);
        s.write_all(buf)
            .map_err(|e| format!("write after {bytes} bytes: {e}"))?;
        h.update(buf);
        bytes += buf.len() as u64;
        written.store(bytes, Ordering::Relaxed);
    }
    Ok(Digest {
        bytes,
        hash: h.digest(),
    })
}

/// Reads until it has the total its sender reports; says on `at` once
/// [`BEFORE`] bytes are in.
fn receive(
    mut s: TcpStream,
    at: mpsc::Sender<()>,
    total: mpsc::Receiver<u64>,
) -> Result<Digest, String> {
    // Short reads, so that a total told meanwhile is seen.
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut bytes = 0u64;
    let mut told = None;
    let mut at = Some(at);
    let mut last = Instant::now();
    while told != Some(bytes) {
        if told.is_none()
            && let Ok(t) = total.try_recv()
        {
            told = Some(t);
            continue;
        }
        let want = told.map_or(buf.len() as u64, |t| (t - bytes).min(buf.len() as u64));
        match s.read(&mut buf[..want as usize]) {
            Ok(0) => return Err(format!("EOF after {bytes} bytes (of {told:?})")),
            Ok(k) => {
                h.update(&buf[..k]);
                bytes += k as u64;
                last = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if last.elapsed() > common::HANG {
                    return Err(format!("stalled after {bytes} bytes (of {told:?})"));
                }
            }
            Err(e) => return Err(format!("read after {bytes} bytes: {e}")),
        }
        if bytes >= BEFORE
            && let Some(tx) = at.take()
        {
            let _ = tx.send(());
        }
    }
    Ok(Digest {
        bytes,
        hash: h.digest(),
    })
}

/// socat pushing into a reader slower than its sender (about 3 MB/s until
/// the pairing is done): socat is always busy, bytes always wait on the
/// client's socket, and a random stop
/// nearly always finds socat knowing that socket is readable (it stops
/// polling it until the server's socket can take more), so pairing then
/// would make its next read fail. The agent steps socat to the entry of
/// a poll(2) that asks about every socket with bytes queued, pairs it
/// there, and the slow reader gets every byte, most of them through the
/// kernel.
#[test]
fn socat_pushing_into_a_slow_reader_is_paired_and_loses_nothing() {
    const N: u64 = 64 << 20;
    let agent = Agent::start("socat-slow");
    let mut socat = Holder::socat(&[]);
    let written = Arc::new(AtomicU64::new(0));
    let mut client = socat.ends[0].try_clone().expect("clone");
    let w = written.clone();
    let sent = std::thread::spawn(move || {
        let mut p = Pattern::new(21);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut bytes = 0u64;
        while bytes < N {
            let buf = p.next((64 << 10).min((N - bytes) as usize));
            client.write_all(buf).expect("write");
            h.update(buf);
            bytes += buf.len() as u64;
            w.store(bytes, Ordering::Relaxed);
        }
        Digest {
            bytes,
            hash: h.digest(),
        }
    });
    let read = Arc::new(AtomicU64::new(0));
    let fast = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut server = socat.ends[1].try_clone().expect("clone");
    let (r, f) = (read.clone(), fast.clone());
    let got = std::thread::spawn(move || {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 16 << 10];
        let mut bytes = 0u64;
        while bytes < N {
            let want = buf.len().min((N - bytes) as usize);
            let k = server.read(&mut buf[..want]).expect("read");
            assert!(k > 0, "EOF after {bytes} of {N} bytes");
            h.update(&buf[..k]);
            bytes += k as u64;
            r.store(bytes, Ordering::Relaxed);
            // The workload, not a wait: a reader of about 3 MB/s until
            // the pairing is done, then as fast as it can.
            if !f.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Digest {
            bytes,
            hash: h.digest(),
        }
    });
    // socat is backed up: megabytes wait between the client and the
    // reader, in the sockets' buffers on both sides of socat.
    let deadline = Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::Relaxed) < read.load(Ordering::Relaxed) + (4 << 20) {
        assert!(Instant::now() < deadline, "socat never backed up");
        std::thread::sleep(Duration::from_millis(5));
    }
    let asked = Instant::now();
    let (ok, out, err) = agent.pair(socat.pid(), socat.fds);
    let took = asked.elapsed();
    let before = written.load(Ordering::Relaxed);
    fast.store(true, Ordering::Relaxed);
    assert!(ok, "zc pair of socat behind a slow reader: {err}");
    eprintln!(
        "{} in {took:?}, with {} bytes sent and {} read",
        out.trim(),
        before,
        read.load(Ordering::Relaxed)
    );
    assert!(
        before < N,
        "the client finished before the pairing: make N larger"
    );
    let (sent, got) = (sent.join().expect("sender"), got.join().expect("reader"));
    assert_eq!(
        sent, got,
        "client -> server through socat, paired mid-stream"
    );
    let carried = carried(&agent).expect("zc stats");
    eprintln!("the kernel carried {} bytes of {N}", carried[0]);
    assert!(
        carried[0] >= N - before,
        "the kernel carried {} bytes, less than the {} sent after pairing",
        carried[0],
        N - before
    );
    assert!(
        cpu_secs_if_alive(socat.pid()).is_some(),
        "socat exited while paired"
    );
    socat.still_relays();
}
