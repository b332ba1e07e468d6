//! `zc agent` beside an unmodified proxy (socat): its sockets are found
//! the way a user finds them (ss/proc), paired by pid and fd, and then the
//! bytes flow intact while the proxy's CPU time stays flat. Every bad
//! request is refused precisely and changes nothing.
mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::{AsFd, AsRawFd},
        unix::net::UnixStream,
    },
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent::*,
    process::{UNPRIVILEGED, example},
};
use zc_user::traffic::{self, Digest};

/// On a host with cgroup v1 only (here: a mount namespace where the
/// cgroup2 hierarchy is unmounted), the agent mounts cgroup2 itself, so
/// sockets are still recorded and pairing by tuple works.
#[test]
fn without_a_cgroup2_mount_the_agent_mounts_one_and_records_sockets() {
    let agent = Agent::start_wrapped(
        "nocgroup2",
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "for m in $(awk '$3 == \"cgroup2\" { print $2 }' /proc/mounts); do umount -l $m; done; \
             exec \"$0\" \"$@\"",
        ],
        &[],
    );
    let (ok, status, err) = agent.zc(&["status", "--json"]);
    assert!(ok, "zc status failed: {err}");
    assert!(status.contains(r#""tuple_pairing":null"#), "{status}");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (mut client, mut up, _) = through_proxy(&socat, &server);
    let tuple = |s: &TcpStream| {
        format!(
            "{}-{}",
            s.peer_addr().expect("peer"),
            s.local_addr().expect("local")
        )
    };
    let (ok, _, err) = agent.zc(&["pair", &tuple(&client), &tuple(&up)]);
    assert!(ok, "pairing by tuple failed: {err}");
    exchange(&mut client, &mut up, 16 << 20);
}

#[test]
fn socat_pair_by_pid_and_fd_moves_a_gigabyte_each_way_intact_without_socat() {
    let agent = Agent::start("socat");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    proxy_paired_by_pid_and_fd(&agent, &socat, &server);
}

/// Sockets recorded by sock_ops, named as `ss -tn` prints them.
#[test]
fn socat_paired_by_tuple_moves_bytes_intact_and_unknown_tuples_are_refused() {
    // Established before the agent started: never recorded.
    let early = TcpListener::bind("127.0.0.1:0").expect("bind");
    let early_client = TcpStream::connect(early.local_addr().expect("addr")).expect("connect");
    let (_early_server, _) = early.accept().expect("accept");
    let agent = Agent::start("tuple");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (mut client, mut up, _) = through_proxy(&socat, &server);
    let addr = |s: &TcpStream| (s.peer_addr().expect("peer"), s.local_addr().expect("local"));
    let (c_peer, c_local) = addr(&client);
    let (u_peer, u_local) = addr(&up);
    // socat's own sockets: accepted (local = its port) and upstream.
    let tuples = [format!("{c_peer}-{c_local}"), format!("{u_peer}-{u_local}")];
    let (e_local, e_peer) = (
        early_client.local_addr().expect("local"),
        early_client.peer_addr().expect("peer"),
    );
    let unrecorded = format!("{e_local}-{e_peer}");
    for (bad, says) in [
        (unrecorded.as_str(), "was not recorded"),
        (
            "127.0.0.1:1-127.0.0.1:2",
            "is not an established connection",
        ),
        ("nonsense", "is not LOCAL-REMOTE"),
    ] {
        let (ok, _, err) = agent.zc(&["pair", bad, &tuples[1]]);
        assert!(
            !ok && err.contains(says),
            "{bad}: expected `{says}` in {err}"
        );
    }
    assert!(agent.pairs().is_empty());
    let (ok, status, err) = agent.zc(&["status", "--json"]);
    assert!(ok, "zc status failed: {err}");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let a = &status["agent"];
    assert_eq!(a["data_path"], "bpf", "{status}");
    assert!(
        a["pid_pairing"].is_null() && a["tuple_pairing"].is_null(),
        "{status}"
    );
    assert!(a["pinned"].to_string().contains("PEERS"), "{status}");
    let (ok, out, err) = agent.zc(&["pair", &tuples[0], &tuples[1]]);
    assert!(ok, "zc pair by tuple failed: {err}");
    assert!(out.contains(&tuples[0]), "{out}");
    assert_eq!(agent.pairs()[0]["source"], "tuple");
    const N: u64 = 256 << 20;
    exchange(&mut client, &mut up, N);
    let stats: serde_json::Value =
        serde_json::from_str(&agent.zc(&["stats", "--json"]).1).expect("stats");
    assert_eq!(stats["pairs"][0]["bytes"][0], N, "{stats}");
}

#[test]
fn haproxy_pair_by_pid_and_fd_moves_a_gigabyte_each_way_intact_without_haproxy() {
    let agent = Agent::start("haproxy");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let haproxy = Proxy::haproxy(server.local_addr().expect("addr"), &agent.dir);
    proxy_paired_by_pid_and_fd(&agent, &haproxy, &server);
}

fn proxy_paired_by_pid_and_fd(agent: &Agent, socat: &Proxy, server: &TcpListener) {
    let (mut client, mut up, fds) = through_proxy(socat, server);
    // Before pairing, the proxy relays as usual.
    client.write_all(b"hello").expect("write");
    let mut hello = [0u8; 5];
    up.read_exact(&mut hello).expect("read");
    assert_eq!(&hello, b"hello");

    let (ok, out, err) = agent.pair(socat.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");
    assert!(out.starts_with("pair 1: "), "{out}");
    let pairs = agent.pairs();
    assert_eq!(pairs.len(), 1, "{pairs:?}");

    let cpu_before = cpu_secs(socat.child.id());
    const N: u64 = 1 << 30;
    exchange(&mut client, &mut up, N);
    let socat_cpu = cpu_secs(socat.child.id()) - cpu_before;
    eprintln!("proxy CPU while 2 GiB crossed the pair: {socat_cpu:.2} s");
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    assert_eq!(
        stats["pairs"][0]["bytes"][0], N,
        "the counters saw every byte client -> server"
    );
    assert_eq!(stats["pairs"][0]["bytes"][1], N, "and server -> client");
    assert!(
        socat_cpu < 0.1,
        "the proxy used {socat_cpu:.2} s of CPU for 2 GiB: it still touches the bytes"
    );

    // Unpairing hands the sockets back: socat relays again.
    let (ok, _, err) = agent.zc(&["unpair", "1"]);
    assert!(ok, "zc unpair failed: {err}");
    assert!(agent.pairs().is_empty());
    client.write_all(b"again").expect("write");
    up.read_exact(&mut hello).expect("read");
    assert_eq!(&hello, b"again", "after unpair, the proxy relays again");
}

/// Pairing in the middle of a busy stream: the agent stops the proxy at a
/// moment it holds no bytes, pairs, and lets it go on; nothing is lost,
/// doubled or reordered. socat one way, HAProxy both ways at once
/// (socat both ways: tests/agent_socat.rs).
#[test]
fn socat_paired_mid_stream_loses_nothing() {
    let agent = Agent::start("midsocat");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    paired_mid_stream(&agent, &socat, &server, false);
}

#[test]
fn haproxy_paired_mid_stream_both_ways_loses_nothing() {
    let agent = Agent::start("midhaproxy");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let haproxy = Proxy::haproxy(server.local_addr().expect("addr"), &agent.dir);
    paired_mid_stream(&agent, &haproxy, &server, true);
}

fn paired_mid_stream(agent: &Agent, proxy: &Proxy, server: &TcpListener, both_ways: bool) {
    let (client, up, fds) = through_proxy(proxy, server);
    const N: u64 = 2 << 30;
    let down_n = if both_ways { N } else { 0 };
    let (mut client, mut up) = (client, up);
    let mut c2 = client.try_clone().expect("clone");
    let mut u2 = up.try_clone().expect("clone");
    let sent_up = std::thread::spawn(move || send_n(&mut c2, N, 8));
    let sent_down = std::thread::spawn(move || send_n(&mut u2, down_n, 9));
    let mut c3 = client.try_clone().expect("clone");
    let mut u3 = up.try_clone().expect("clone");
    let got_up = std::thread::spawn(move || read_n(&mut u3, N));
    let got_down = std::thread::spawn(move || read_n(&mut c3, down_n));
    // Well into the stream: bytes are moving through the proxy.
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out, err) = agent.pair(proxy.child.id(), fds);
    assert!(ok, "zc pair mid-stream failed: {err}");
    assert!(
        !sent_up.is_finished(),
        "the transfer ended before the pairing: make it longer"
    );
    eprintln!("{}", out.trim());
    let cpu_after_pairing = cpu_secs_if_alive(proxy.child.id());
    assert_eq!(
        sent_up.join().expect("sender"),
        got_up.join().expect("reader"),
        "client -> server"
    );
    assert_eq!(
        sent_down.join().expect("sender"),
        got_down.join().expect("reader"),
        "server -> client"
    );
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    let moved: Vec<u64> = (0..2)
        .map(|i| stats["pairs"][0]["bytes"][i].as_u64().unwrap_or(0))
        .collect();
    eprintln!("the kernel carried {moved:?} bytes (of {N} and {down_n})");
    assert!(
        moved.iter().any(|m| *m > N / 2) && moved.iter().all(|m| *m <= N),
        "implausible counts for {N} and {down_n} bytes: {stats}"
    );
    let (before, after) = (
        cpu_after_pairing.expect("the proxy exited while paired"),
        cpu_secs_if_alive(proxy.child.id()).expect("the proxy exited while paired"),
    );
    eprintln!("proxy CPU after pairing: {:.2} s", after - before);
    assert!(
        after - before < 0.2,
        "the proxy used {:.2} s of CPU after pairing",
        after - before
    );
    // The other direction, after the bulk, through the pair as well.
    up.write_all(b"back").expect("write");
    let mut back = [0u8; 4];
    client.read_exact(&mut back).expect("read");
    assert_eq!(&back, b"back");
}

/// `zc unpair` of a quiet pair hands the proxy its sockets back with
/// nothing lost: what the kernel carried before, what the proxy relays
/// after, one intact stream each way.
#[test]
fn unpair_of_a_quiet_pair_gives_the_proxy_an_intact_stream() {
    let agent = Agent::start("unpairquiet");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (mut client, mut up, fds) = through_proxy(&socat, &server);
    let (ok, _, err) = agent.pair(socat.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");
    const N: u64 = 64 << 20;
    // Each half is read whole before the next step: the pair is quiet.
    for step in 0..2 {
        let mut c2 = client.try_clone().expect("clone");
        let writer = std::thread::spawn(move || send_n(&mut c2, N, 31 + step));
        let got = read_n(&mut up, N);
        assert_eq!(
            writer.join().expect("writer"),
            got,
            "half {step} of the stream across the unpair is damaged"
        );
        if step == 0 {
            let carried = kernel_bytes(&agent);
            assert!(
                carried >= N,
                "the kernel carried {carried} bytes of the first {N}: not paired"
            );
            let (ok, out, err) = agent.zc(&["unpair", "1"]);
            assert!(ok, "zc unpair failed: {err}");
            eprintln!("{}", out.trim());
            assert!(
                out.contains("every byte"),
                "a quiet pair was not handed back whole: {out}"
            );
        }
    }
    up.write_all(b"back").expect("write");
    let mut back = [0u8; 4];
    client.read_exact(&mut back).expect("read");
    assert_eq!(&back, b"back", "after unpair, the proxy relays again");
}

/// `zc unpair` while bytes pour through the pair: the server gets every
/// byte once and in order, or a reset; never a clean end of a cut stream.
/// With a reader that keeps reading, the kernel's queues drain and the
/// proxy usually gets its sockets back with nothing lost; now and then the
/// hand-back finds TCP counting one redirected skb as unread, which the
/// proxy would read again, and resets instead (see engine/bpf/hand_back.rs).
#[test]
fn unpair_of_socat_under_load_delivers_every_byte_or_resets() {
    let mut agent = Agent::start("unpairload");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    ended_under_load(&mut agent, &socat, &server, Ending::Unpair, false);
}

#[test]
fn unpair_of_haproxy_under_load_both_ways_delivers_every_byte_or_resets() {
    let mut agent = Agent::start("unpairhaproxy");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let haproxy = Proxy::haproxy(server.local_addr().expect("addr"), &agent.dir);
    ended_under_load(&mut agent, &haproxy, &server, Ending::Unpair, true);
}

/// An agent stopping with `--unpin-on-exit` gives every pair back the
/// same way.
#[test]
fn an_agent_stopping_with_unpin_on_exit_hands_pairs_back_under_load() {
    let mut agent = Agent::start_with("unpinexit", &["--unpin-on-exit"]);
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    ended_under_load(&mut agent, &socat, &server, Ending::StopAgent, false);
}

enum Ending {
    Unpair,
    StopAgent,
}

/// Pairs the proxy's connection, streams 1 GiB client -> server (and
/// 256 MiB back with `both_ways`), ends the pair mid-stream, and checks
/// each direction: every byte intact, or a reset, never a clean EOF of a
/// cut stream, and what `zc unpair` says matches what the ends saw.
fn ended_under_load(
    agent: &mut Agent,
    proxy: &Proxy,
    server: &TcpListener,
    ending: Ending,
    both_ways: bool,
) {
    let (client, up, fds) = through_proxy(proxy, server);
    let (ok, _, err) = agent.pair(proxy.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");
    const N: u64 = 1 << 30;
    let (at_tx, at_rx) = std::sync::mpsc::channel();
    let mut streams = vec![(
        "client -> server",
        spawn_sender(client.try_clone().expect("clone"), N, 41),
        spawn_reader(up.try_clone().expect("clone"), Some(at_tx)),
    )];
    // One way only, the server's side stays open: socat ends a connection
    // half a second after either side's EOF.
    if both_ways {
        streams.push((
            "server -> client",
            spawn_sender(up.try_clone().expect("clone"), N / 4, 42),
            spawn_reader(client.try_clone().expect("clone"), None),
        ));
    }
    let at = at_rx.recv().expect("the stream ended before 64 MiB");
    let how = match ending {
        Ending::Unpair => {
            let (ok, out, err) = agent.zc(&["unpair", "1"]);
            assert!(ok, "zc unpair failed: {err}");
            out
        }
        Ending::StopAgent => {
            let mut child = agent.child.take().expect("agent running");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGTERM,
            )
            .expect("SIGTERM");
            let status = child.wait().expect("wait");
            assert!(status.success(), "the agent exited with {status}");
            String::new()
        }
    };
    eprintln!("at {} MiB or later: {}", at >> 20, how.trim());
    let ended: Vec<_> = streams
        .into_iter()
        .map(|(what, sender, reader)| {
            let (end, got) = reader.join().expect("reader");
            (what, sender.join().expect("sender"), end, got)
        })
        .collect();
    for (i, (what, sent, end, got)) in ended.iter().enumerate() {
        // Both ways, this reader's socket also carries the other stream's
        // sender, and a reset is reported to one call only: if that
        // sender took it, this read sees a plain EOF with the socket
        // already in TCP_CLOSE. Without a sender that finished (and shut
        // its side), nothing else leaves a socket in TCP_CLOSE.
        let same_socket_sender = ended.get(1 - i).filter(|_| ended.len() == 2);
        let end = match end {
            Ok(EofState(7)) if same_socket_sender.is_none_or(|s| s.1.is_err()) => Err(
                std::io::Error::new(std::io::ErrorKind::ConnectionReset, "EOF in TCP_CLOSE"),
            ),
            Ok(_) => Ok(()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        match end {
            Ok(()) => {
                let sent = sent.as_ref().unwrap_or_else(|e| {
                    panic!("{what}: the sender failed ({e}), the reader saw EOF")
                });
                assert_eq!(got, sent, "{what}: a clean end of a damaged stream");
            }
            Err(e) => {
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset,
                    "{what}: the read failed, but not with a reset: {e}"
                );
                eprintln!("{what}: reset, an honest end ({how})");
                if let Ending::Unpair = ending {
                    // Which reset (a read's own or one its socket's sender
                    // took) and what each sender saw, for a failure that
                    // came once in many runs and is not understood yet.
                    let senders: Vec<_> = ended
                        .iter()
                        .map(|(w, sent, _, got)| format!("{w}: sent {sent:?}, read {got:?}"))
                        .collect();
                    assert!(
                        how.contains("reset"),
                        "{what}: reset ({e}), but unpair said: {how}; {senders:?}; the proxy's \
                         log: {}",
                        proxy.log()
                    );
                }
                return;
            }
        }
    }
    if let Ending::Unpair = ending {
        assert!(how.contains("every byte"), "intact, but unpair said: {how}");
    }
    drop((client, up));
}

/// Sends `n` bytes of a pattern, then shuts the write side; stops at the
/// first error.
fn spawn_sender(
    mut s: TcpStream,
    n: u64,
    seed: u64,
) -> std::thread::JoinHandle<std::io::Result<Digest>> {
    std::thread::spawn(move || {
        let mut p = traffic::Pattern::new(seed);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut left = n;
        while left > 0 {
            let buf = p.next((64 << 10).min(left as usize));
            s.write_all(buf)?;
            h.update(buf);
            left -= buf.len() as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(Digest {
            bytes: n,
            hash: h.digest(),
        })
    })
}

/// The TCP state of a socket when its reader met EOF (tcp_states.h).
struct EofState(u8);

/// Reads to EOF or an error; says once on `at` when 64 MiB are in.
fn spawn_reader(
    mut s: TcpStream,
    at: Option<std::sync::mpsc::Sender<u64>>,
) -> std::thread::JoinHandle<(std::io::Result<EofState>, Digest)> {
    std::thread::spawn(move || {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        let mut at = at;
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let info = zc_user::sys::tcp_info(s.as_fd()).expect("TCP_INFO");
                    break Ok(EofState(info.state));
                }
                Ok(k) => {
                    h.update(&buf[..k]);
                    got += k as u64;
                }
                Err(e) => break Err(e),
            }
            if got >= 64 << 20
                && let Some(tx) = at.take()
            {
                let _ = tx.send(got);
            }
        };
        (
            end,
            Digest {
                bytes: got,
                hash: h.digest(),
            },
        )
    })
}

fn kernel_bytes(agent: &Agent) -> u64 {
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    stats["pairs"][0]["bytes"][0].as_u64().unwrap_or(0)
}

#[test]
fn kill_9_of_the_agent_mid_transfer_loses_nothing_and_a_restart_adopts_the_pair() {
    let mut agent = Agent::start("kill9");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (mut client, mut up, fds) = through_proxy(&socat, &server);
    let (ok, _, err) = agent.pair(socat.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");

    const N: u64 = 1 << 30;
    let mut c2 = client.try_clone().expect("clone");
    let mut u2 = up.try_clone().expect("clone");
    let sent_up = std::thread::spawn(move || send_n(&mut c2, N, 3));
    let sent_down = std::thread::spawn(move || send_n(&mut u2, N, 4));
    // Read a first part, kill the agent mid-stream, read the rest.
    let mut client_r = client.try_clone().expect("clone");
    let down = std::thread::spawn(move || read_n(&mut client_r, N));
    let mut first = vec![0u8; 64 << 20];
    up.read_exact(&mut first).expect("first 64 MiB");
    agent.kill9();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&first);
    let rest = read_n_into(&mut up, N - first.len() as u64, &mut h);
    let got_up = Digest {
        bytes: first.len() as u64 + rest,
        hash: h.digest(),
    };
    assert_eq!(
        sent_up.join().expect("sender"),
        got_up,
        "client -> server damaged"
    );
    assert_eq!(
        sent_down.join().expect("sender"),
        down.join().expect("reader")
    );

    // A new agent on the same pinned maps adopts the pair and can end it.
    agent.spawn();
    let pairs = agent.pairs();
    assert_eq!(
        pairs.len(),
        1,
        "the restarted agent lists the pair: {pairs:?}"
    );
    assert_eq!(pairs[0]["source"], "adopted");
    let local = up.peer_addr().expect("addr").to_string();
    assert!(
        pairs[0]["sockets"].to_string().contains(&local),
        "{pairs:?} names socat's upstream socket {local}"
    );
    let (ok, _, err) = agent.zc(&["unpair", &pairs[0]["id"].to_string()]);
    assert!(ok, "unpairing an adopted pair failed: {err}");
    client.write_all(b"again").expect("write");
    let mut again = [0u8; 5];
    up.read_exact(&mut again).expect("read");
    assert_eq!(&again, b"again", "after unpair, socat relays again");
}

/// socat shuts its upstream socket down the moment it sees the client's
/// EOF, and closes both a moment later. With the server slow to read,
/// most of what the client sent still waits in the kernel's redirect queue
/// at that moment; the FIN hold keeps the EOF back until it has left, so
/// the server gets every byte, then EOF. Its answer, sent after that and
/// after socat has closed its sockets, reaches the client whole, then EOF.
#[test]
fn a_proxy_that_shuts_down_on_eof_still_delivers_every_byte() {
    let (held, _) = half_close_through_socat("halfclose", false, false);
    assert!(
        held > 0,
        "the client's FIN never waited, so this run did not test the hold"
    );
}

/// The same with the client corked (TCP_CORK): its last bytes and its FIN
/// leave in one segment, and the hold must take the FIN off it.
#[test]
fn a_fin_riding_on_the_last_bytes_is_held_back_too() {
    let (_, stripped) = half_close_through_socat("datafin", true, false);
    assert!(
        stripped > 0,
        "no FIN came on a data segment, so this run did not test that case"
    );
}

/// The hold is pinned with the pairs: with the agent killed (kill -9)
/// right after pairing, socat's shutdown still cuts nothing off.
#[test]
fn the_fin_hold_outlives_a_killed_agent() {
    half_close_through_socat("holdkill", false, true);
}

/// A proxy that does not pass a half-close on (socat with `shut-none`,
/// staying 30 s after the client's EOF) still has it reach the server:
/// the agent leaves a FIN to the owner for a moment, then passes it on
/// itself, after every byte. (When the owner passes it, as socat does by
/// default, the agent must not: see the test above.)
#[test]
fn a_half_close_the_proxy_does_not_pass_on_is_passed_by_the_agent() {
    let agent = Agent::start("noshut");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start_with(
        server.local_addr().expect("addr"),
        ",shut-none",
        &["-t", "30"],
    );
    let (mut client, mut up, fds) = through_proxy(&socat, &server);
    let (ok, _, err) = agent.pair(socat.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");

    const N: u64 = 16 << 20;
    let sent = send_n(&mut client, N, 8);
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("client shutdown");
    // Without the agent's FIN the server would wait for socat's -t.
    up.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    assert_eq!(
        sent,
        read_to_eof(&mut up),
        "client -> server through a proxy that keeps the upstream open"
    );
    let carried = kernel_bytes(&agent);
    assert!(
        carried >= N,
        "the kernel carried {carried} of the {N} bytes: the pair was not in the kernel"
    );
    let back = send_n(&mut up, 1 << 20, 9);
    up.shutdown(std::net::Shutdown::Write)
        .expect("server shutdown");
    assert_eq!(back, read_to_eof(&mut client), "server -> client after it");
}

/// Returns what the FIN hold did: (bare FINs held, FINs taken off data),
/// as the agent counted them (zeros when `kill` killed it after pairing).
fn half_close_through_socat(tag: &str, cork: bool, kill: bool) -> (u64, u64) {
    let mut agent = Agent::start(tag);
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (mut client, mut up, fds) = through_proxy(&socat, &server);
    let (ok, _, err) = agent.pair(socat.child.id(), fds);
    assert!(ok, "zc pair failed: {err}");
    if kill {
        agent.kill9();
    }

    const N: u64 = 256 << 20;
    const M: u64 = 32 << 20;
    if cork {
        common::set_cork(&client, true);
    }
    let mut c2 = client.try_clone().expect("clone");
    let sent_up = std::thread::spawn(move || {
        let d = send_n(&mut c2, N, 5);
        c2.shutdown(std::net::Shutdown::Write)
            .expect("client shutdown");
        d
    });
    // Let the client's bytes and its FIN pile up before the server reads.
    std::thread::sleep(Duration::from_secs(2));
    let got_up = read_to_eof(&mut up);
    assert_eq!(
        sent_up.join().expect("sender"),
        got_up,
        "client -> server lost bytes when socat shut the upstream side down"
    );
    let sent_down = send_n(&mut up, M, 6);
    up.shutdown(std::net::Shutdown::Write)
        .expect("server shutdown");
    assert_eq!(
        sent_down,
        read_to_eof(&mut client),
        "server -> client after the half-close"
    );
    if kill {
        return (0, 0);
    }
    let (ok, out, err) = agent.zc(&["status", "--json"]);
    assert!(ok, "zc status failed: {err}");
    let st: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let count = |k: &str| st["agent"][k].as_u64().unwrap_or(0);
    let (held, stripped) = (count("fins_held"), count("fins_stripped"));
    eprintln!("FIN hold: {held} bare FINs held, {stripped} taken off data");
    (held, stripped)
}

/// `zc agent --short-circuit` on a cgroup of its own: a client and an
/// echo server (socat, talking first) run in it, and what crosses their
/// connection both ways goes through sk_msg, intact, then the connection
/// leaves the maps when it closes.
#[test]
fn the_short_circuit_carries_same_host_connections_in_its_cgroup() {
    let cgroup = TestCgroup::new("sc");
    let agent = Agent::start_short_circuit("shortcircuit", &cgroup);
    const SIZE: u64 = 64 << 20;
    let input = agent.dir.join("in");
    let echoed = agent.dir.join("echoed");
    pattern_file(&input, SIZE, 7);
    let mut server = cgroup.spawn("socat TCP-LISTEN:0,bind=127.0.0.1,reuseaddr EXEC:cat");
    let port = listening_port(server.id(), "the echo server");
    let mut client = cgroup.spawn(&format!(
        "socat -b 262144 OPEN:{}!!CREATE:{} TCP:127.0.0.1:{port}",
        input.display(),
        echoed.display()
    ));
    let st = client.wait().expect("client");
    assert!(st.success(), "the socat client failed: {st}");
    let _ = server.kill();
    let _ = server.wait();
    let digest = |p: &std::path::Path| {
        let data = std::fs::read(p).expect("read file");
        (data.len(), xxhash_rust::xxh3::xxh3_64(&data))
    };
    assert_eq!(
        digest(&input),
        digest(&echoed),
        "the echo through the short-circuit differs"
    );

    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    let sc = &stats["short_circuit"];
    eprintln!("short-circuit: {sc}");
    assert!(
        sc["connections"].as_u64().unwrap_or(0) >= 1,
        "no connection was short-circuited: {stats}"
    );
    assert!(
        sc["bytes"].as_u64().unwrap_or(0) >= SIZE,
        "the short-circuit carried less than one direction's {SIZE} bytes: {stats}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = agent.zc(&["stats", "--json"]);
        let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
        if stats["short_circuit"]["now"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed connection stayed in the maps: {stats}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A proxy in the cgroup whose client connection is short-circuited:
    // pairing it would strand what the client sends, so it is refused.
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = cgroup.spawn(&format!(
        "socat TCP-LISTEN:0,bind=127.0.0.1,reuseaddr TCP:{}",
        upstream.local_addr().expect("addr")
    ));
    let port = listening_port(proxy.id(), "socat in the cgroup");
    let client = cgroup.spawn_piped(&format!("socat - TCP:127.0.0.1:{port}"));
    let (up, _) = upstream.accept().expect("socat connects upstream");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (pid, fds) = loop {
        // socat's upstream socket, named from our end of it; then the
        // accepted one beside it in the same process.
        let up_inode = inode_of(
            up.peer_addr().expect("peer"),
            up.local_addr().expect("local"),
        );
        let held = up_inode.and_then(zc_user::agent::find::holder_of);
        let accepted = std::fs::read_to_string("/proc/net/tcp")
            .expect("/proc/net/tcp")
            .lines()
            .skip(1)
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let ours = f.get(1)?.ends_with(&format!(":{port:04X}")) && f.get(3) == Some(&"01");
                ours.then(|| f.get(9)?.parse::<u64>().ok())?
            });
        if let (Some((pid, up_fd)), Some(inode)) = (held, accepted)
            && let Some(fd) = fd_of(pid as u32, inode)
        {
            break (pid as u32, [fd, up_fd]);
        }
        assert!(Instant::now() < deadline, "socat's sockets not found");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (ok, _, err) = agent.pair(pid, fds);
    assert!(!ok, "a short-circuited socket was paired");
    assert!(err.contains("is short-circuited"), "{err}");
    for mut c in [client, proxy] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The example proxy from zc-user/examples, built by `cargo test`, on a
/// port the kernel picks: it names its address in its first line.
fn handoff_proxy(agent: &Agent, upstream: SocketAddr) -> (Child, u16) {
    let example = example("handoff_proxy");
    let mut child = Command::new(&example)
        .arg("127.0.0.1:0")
        .arg(upstream.to_string())
        .arg(&agent.socket)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting {} (`cargo xtask test` builds it): {e}",
                example.display()
            )
        });
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        child.stderr.take().expect("stderr"),
    ));
    let first = lines
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("handoff_proxy said nothing"));
    let port = first
        .strip_prefix("handoff_proxy: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in handoff_proxy's `{first}`"))
        .port();
    // Keep reading, so that its later lines never block it (and show).
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
    (child, port)
}

/// Through the example proxy, which hands every connection to the agent:
/// a stream each way with half-close, digests compared.
fn handoff_round_trip(agent: &Agent) {
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut proxy, port) = handoff_proxy(agent, server.local_addr().expect("addr"));
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut up, _) = server.accept().expect("upstream");
    for s in [&client, &up] {
        s.set_read_timeout(Some(common::HANG)).expect("timeout");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.pairs().iter().any(|p| {
        p["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("handoff from pid"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the agent never listed the handed-over pair"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    const N: u64 = 512 << 20;
    let mut c2 = client.try_clone().expect("clone");
    let sender = std::thread::spawn(move || traffic::send(&mut c2, N, 64 << 10, 21));
    let got = traffic::sink(&mut up).expect("server reads to EOF");
    assert_eq!(
        sender.join().expect("sender").expect("send"),
        got,
        "client -> server"
    );
    // While the pair lives (the other direction is still open), the
    // agent's stats count what crossed it, in BPF and splice mode alike.
    let (ok, out, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    assert!(
        stats["pairs"][0]["bytes"]
            .as_array()
            .is_some_and(|b| b.contains(&serde_json::json!(N))),
        "zc stats does not show the {N} bytes that crossed: {stats}"
    );
    let mut u2 = up.try_clone().expect("clone");
    let answer = std::thread::spawn(move || traffic::send(&mut u2, N / 8, 64 << 10, 22));
    let back = traffic::sink(&mut client).expect("client reads to EOF");
    assert_eq!(
        answer.join().expect("answer").expect("send"),
        back,
        "server -> client"
    );
    let proxy_cpu = cpu_secs(proxy.id());
    assert!(
        proxy_cpu < 0.1,
        "the proxy itself used {proxy_cpu:.2} s of CPU"
    );
    let _ = proxy.kill();
    let _ = proxy.wait();
}

#[test]
fn a_cooperative_proxy_hands_sockets_to_a_bpf_agent() {
    let agent = Agent::start("handoff-bpf");
    handoff_round_trip(&agent);
}

#[test]
fn without_bpf_the_agent_splices_handed_over_sockets_and_refuses_pid_pairing() {
    let agent = Agent::start_with("handoff-splice", &["--data-path", "splice"]);
    handoff_round_trip(&agent);
    let (c, d) = tcp_pair(false);
    let (ok, _, err) = agent.pair(std::process::id(), [c.as_raw_fd(), d.as_raw_fd()]);
    assert!(!ok, "pid/fd pairing without BPF was accepted");
    assert!(err.contains("needs BPF"), "{err}");
    let (ok, text, err) = agent.zc(&["status"]);
    assert!(ok, "{err}");
    assert!(
        text.contains("data path splice") && text.contains("pair by pid/fd: unavailable"),
        "{text}"
    );
}

#[test]
fn a_handoff_of_bad_sockets_is_refused() {
    let agent = Agent::start("handoff-bad");
    let (a, _b) = tcp_pair(false);
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let body = br#"{"op":"handoff"}"#;
    for (fds, says) in [
        (vec![a.as_fd()], "exactly two sockets"),
        (vec![a.as_fd(), udp.as_fd()], "not a TCP socket"),
        (vec![a.as_fd(), a.as_fd()], "are the same socket"),
    ] {
        let resp = zc_user::agent::control::call_with_fds(&agent.socket, body, &fds).expect("call");
        let text = format!("{resp:?}");
        assert!(text.contains(says), "expected `{says}` in {text}");
    }
    let resp =
        zc_user::agent::control::call_with_fds(&agent.socket, br#"{"op":"list"}"#, &[a.as_fd()])
            .expect("call");
    assert!(
        format!("{resp:?}").contains("only a handoff carries"),
        "{resp:?}"
    );
    assert!(agent.pairs().is_empty());
}

/// A connected loopback TCP pair owned by this process.
fn tcp_pair(v6: bool) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    (c, s)
}

#[test]
fn bad_pair_requests_are_refused_precisely_and_change_nothing() {
    let agent = Agent::start("bad");
    let me = std::process::id();
    let (a, b) = tcp_pair(false);
    let (a6, _b6) = tcp_pair(true);
    // A connection whose remote end has gone (CLOSE_WAIT): it closed
    // before it could be paired.
    let (finished, gone) = tcp_pair(false);
    drop(gone);
    std::thread::sleep(Duration::from_millis(50));
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let (unix, _unix2) = UnixStream::pair().expect("unix");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let unconnected =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let file = std::fs::File::open("/proc/self/status").expect("file");
    let a_dup = a.try_clone().expect("dup");
    let fd = |s: &dyn AsRawFd| s.as_raw_fd();
    let ok_fd = fd(&a);

    // Pair a proxy's sockets for real, so "already paired" has something
    // to hit. (Not this process's own: the agent stops a socket's owner
    // while it pairs, and that would stop every test running here.)
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (_client, _up, socat_fds) = through_proxy(&socat, &server);
    let (ok, _, err) = agent.pair(socat.child.id(), socat_fds);
    assert!(ok, "pairing socat's sockets failed: {err}");

    let cases: Vec<(u32, [i32; 2], &str)> = vec![
        (999_999_999, [3, 4], "no process with pid 999999999"),
        (me, [ok_fd, 999], "has no open fd 999"),
        (me, [ok_fd, fd(&file)], "is not a socket"),
        (me, [ok_fd, fd(&udp)], "not a TCP socket (UDP"),
        (me, [ok_fd, fd(&unix)], "not a TCP socket (a Unix"),
        (me, [ok_fd, fd(&listener)], "is a listening socket"),
        (me, [ok_fd, fd(&unconnected)], "is not connected"),
        (me, [ok_fd, ok_fd], "cannot be paired with itself"),
        (me, [ok_fd, fd(&a_dup)], "are the same socket"),
        (me, [ok_fd, fd(&a6)], "different address families"),
        (
            me,
            [ok_fd, fd(&finished)],
            "is not an established connection (it is in CLOSE-WAIT",
        ),
        (socat.child.id(), socat_fds, "already paired (pair 1)"),
    ];
    for (pid, fds, says) in cases {
        let (ok, _, err) = agent.pair(pid, fds);
        assert!(!ok, "pid {pid} fds {fds:?} was accepted");
        assert!(
            err.contains(says),
            "pid {pid} fds {fds:?}: expected `{says}` in: {err}"
        );
        let pairs = agent.pairs();
        assert_eq!(
            pairs.len(),
            1,
            "a refused request changed the pairs: {pairs:?}"
        );
    }
    let (ok, _, err) = agent.zc(&["unpair", "7"]);
    assert!(!ok && err.contains("no pair 7"), "{err}");

    // The refused sockets still work as their owner left them.
    let (mut a, mut b) = (a, b);
    a.write_all(b"still mine").expect("write");
    let mut got = [0u8; 10];
    b.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"still mine");

    // Raw requests that are not requests.
    for (body, says) in [
        (&b"not json"[..], "not valid JSON"),
        (br#"{"op":"pair_pid","pid":1}"#, "not valid JSON"),
        (br#"{"op":"pair_pid","pid":1,"fd"#, "not valid JSON"),
        (&[b' '; 5000][..], "larger than 4096"),
    ] {
        let resp = zc_user::agent::control::call_raw(&agent.socket, body).expect("call");
        let text = format!("{resp:?}");
        assert!(text.contains("Malformed") && text.contains(says), "{text}");
    }
    assert_eq!(agent.pairs().len(), 1);
}

/// `--group`: the control socket is 0660 for that group; its members may
/// connect but take none of root's sockets, by pid or by tuple (they pair
/// their own: tests/agent_permissions.rs); a user outside the group cannot
/// connect at all.
#[test]
fn members_of_the_agents_group_may_connect_but_not_pair_roots_sockets() {
    let agent = Agent::start_with("group", &["--group", MEMBER_GROUP]);
    let meta = std::fs::metadata(&agent.socket).expect("control socket");
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid().to_string(), MEMBER_GROUP);

    let (ok, _, err) = agent.zc_as(&UNPRIVILEGED, &["list"]);
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, _, err) = agent.zc_as(&MEMBER, &["list"]);
    assert!(ok, "a member could not connect: {err}");

    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = Proxy::start(server.local_addr().expect("addr"));
    let (client, up, fds) = through_proxy(&socat, &server);
    let (pid, fds) = (socat.child.id().to_string(), fds.map(|f| f.to_string()));
    let (ok, _, err) = agent.zc_as(
        &MEMBER,
        &["pair", "--pid", &pid, "--fd", &fds[0], "--fd", &fds[1]],
    );
    assert!(!ok, "a group member took root's sockets by pid");
    assert!(err.contains("the kernel denies uid 65534"), "{err}");
    let addr = |s: &TcpStream| {
        format!(
            "{}-{}",
            s.peer_addr().expect("peer"),
            s.local_addr().expect("local")
        )
    };
    let (ok, _, err) = agent.zc_as(&MEMBER, &["pair", &addr(&client), &addr(&up)]);
    assert!(!ok, "a group member paired root's sockets by tuple");
    assert!(err.contains("the kernel denies uid 65534"), "{err}");
    assert!(agent.pairs().is_empty());
}

#[test]
fn an_unprivileged_user_cannot_reach_the_agent() {
    let agent = Agent::start("unpriv");
    let (c, d) = tcp_pair(false);
    let out = Command::new("setpriv")
        .args(UNPRIVILEGED)
        .arg(env!("CARGO_BIN_EXE_zc"))
        .args(["pair", "--pid", &std::process::id().to_string()])
        .args([
            "--fd",
            &c.as_raw_fd().to_string(),
            "--fd",
            &d.as_raw_fd().to_string(),
        ])
        .arg("--socket")
        .arg(&agent.socket)
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody paired root's sockets");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(agent.pairs().is_empty());
}
