//! The bench's server and the workloads its client runs against a system.
//! The first byte of every connection tells the server what to do, so one
//! server serves all systems: `B` count to EOF and answer with the count,
//! `H` also hash what arrived, `E` echo until EOF, `S` push until the
//! client's side blocks (the stall workload), `D` push while counting
//! what arrives (both ways at once).
use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use xxhash_rust::xxh3::Xxh3;
use zc_user::traffic::{Digest, Pattern};

use super::{
    pin,
    stall::{self, Board},
    topology::{Netns, Topology, within},
};

const STALL: Duration = Duration::from_secs(20);

pub struct Server {
    pub port: u16,
    /// Where the stall workload's pushers report.
    pub board: Arc<Board>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// The server's threads run on `cpu` if given (the connection threads
    /// inherit the accept thread's affinity).
    pub fn start(topo: &Topology, cpu: Option<usize>) -> Result<Self> {
        let listener = within(topo.server.as_ref(), || {
            // 1,000 connections arrive at once (stall, 1000 conns).
            zc_user::sys::listen_deep(SocketAddr::new(topo.server_ip, 0))
        })?
        .context("binding the bench server")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let board = Arc::new(Board::new()?);
        let (flag, b) = (stop.clone(), board.clone());
        std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = pin::pin_this_thread(cpu)
                {
                    log::warn!("the bench server runs unpinned: {e:#}");
                }
                accept_loop(listener, &flag, &b)
            })
            .context("starting the bench server")?;
        Ok(Self { port, board, stop })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(listener: TcpListener, stop: &AtomicBool, board: &Arc<Board>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    while !stop.load(Ordering::Relaxed) {
        // A short timeout lets the loop see `stop`.
        let mut pfd = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if !poll(&mut pfd, PollTimeout::from(100u8)).is_ok_and(|n| n > 0) {
            continue;
        }
        let Ok((s, _)) = listener.accept() else {
            continue;
        };
        let board = board.clone();
        let _ = std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || serve(s, &board));
    }
}

fn serve(mut s: TcpStream, board: &Board) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut kind = [0u8; 1];
    if s.read(&mut kind)? == 0 {
        return Ok(());
    }
    if kind[0] == b'S' {
        return stall::push(s, board);
    }
    if kind[0] == b'D' {
        return duplex(s);
    }
    let mut buf = vec![0u8; 256 << 10];
    match kind[0] {
        b'E' => loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        },
        k @ (b'B' | b'H') => {
            let mut h = Xxh3::new();
            let mut bytes = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if k == b'H' {
                    h.update(&buf[..n]);
                }
                bytes += n as u64;
            }
            let hash = if k == b'H' { h.digest() } else { 0 };
            s.write_all(&Digest { bytes, hash }.to_bytes())
        }
        _ => Ok(()),
    }
}

/// The server's half of [`bidir`]: after `D`, the client sends the write
/// size and the duration (u64 each, little-endian); the server pushes that
/// long while a second thread counts what arrives until the client's EOF,
/// then sends what it counted and what it pushed (the last 16 bytes) and
/// shuts down.
fn duplex(mut s: TcpStream) -> io::Result<()> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
    let (size, dur) = (word(0) as usize, Duration::from_millis(word(8)));
    let mut r = s.try_clone()?;
    let counter = std::thread::spawn(move || -> io::Result<u64> {
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            match r.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    let mut pattern = Pattern::new(3);
    let mut pushed = 0u64;
    let t = Instant::now();
    while t.elapsed() < dur {
        let buf = pattern.next(size.clamp(1, 1 << 20));
        s.write_all(buf)?;
        pushed += buf.len() as u64;
    }
    let got = counter
        .join()
        .map_err(|_| io::Error::other("the counting thread panicked"))??;
    s.write_all(&got.to_le_bytes())?;
    s.write_all(&pushed.to_le_bytes())?;
    s.shutdown(Shutdown::Write)
}

pub struct Bidir {
    /// Bytes each way as the far end counted them.
    pub up: u64,
    pub down: u64,
    pub secs: f64,
    /// What did not add up, if anything.
    pub problem: Option<String>,
}

/// One connection, `write_size` writes both ways at once for `dur`:
/// the client pushes up while the server pushes down. Time runs until
/// both directions have ended.
pub fn bidir(topo: &Topology, addr: SocketAddr, write_size: usize, dur: Duration) -> Result<Bidir> {
    let mut s = connect(topo.client.as_ref(), addr)?;
    let mut head = vec![b'D'];
    head.extend_from_slice(&(write_size as u64).to_le_bytes());
    head.extend_from_slice(&(dur.as_millis() as u64).to_le_bytes());
    s.write_all(&head)?;
    let t = Instant::now();
    let mut r = s.try_clone()?;
    let reader = std::thread::spawn(move || -> Result<(u64, [u8; 16])> {
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        // The last 16 bytes of the stream are the server's counts.
        let mut tail = [0u8; 16];
        loop {
            let n = r.read(&mut buf).context("reading (the system stalled?)")?;
            if n == 0 {
                return Ok((total, tail));
            }
            total += n as u64;
            let keep = n.min(16);
            tail.copy_within(keep.., 0);
            tail[16 - keep..].copy_from_slice(&buf[n - keep..n]);
        }
    });
    let mut pattern = Pattern::new(4);
    let mut sent = 0u64;
    while t.elapsed() < dur {
        let buf = pattern.next(write_size);
        s.write_all(buf).context("writing (the system stalled?)")?;
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let (total, tail) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reading thread panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    let word = |i: usize| u64::from_le_bytes(tail[i..i + 8].try_into().unwrap_or_default());
    let (up, pushed) = (word(0), word(8));
    let down = total.saturating_sub(16);
    let problem = (up != sent || down != pushed || total < 16).then(|| {
        format!("sent {sent} up, the server got {up}; it pushed {pushed} down, {down} arrived")
    });
    Ok(Bidir {
        up,
        down,
        secs,
        problem,
    })
}

pub fn connect(ns: Option<&Netns>, addr: SocketAddr) -> Result<TcpStream> {
    let sock = within(ns, || {
        socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
    })?
    .context("creating a client socket")?;
    sock.connect(&addr.into())
        .with_context(|| format!("connecting to {addr}"))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    Ok(s)
}

pub struct Bulk {
    /// Bytes the server counted, and the client sent.
    pub bytes: u64,
    pub sent: u64,
    pub secs: f64,
    /// Every stream's byte count (and hash, if verified) matched.
    pub intact: bool,
}

/// `streams` connections write `write_size` chunks for `dur`, then shut
/// down and wait for the server's count; time runs until the last count.
pub fn bulk(
    topo: &Topology,
    addr: SocketAddr,
    write_size: usize,
    streams: usize,
    dur: Duration,
    verify: bool,
) -> Result<Bulk> {
    let conns = (0..streams)
        .map(|_| connect(topo.client.as_ref(), addr))
        .collect::<Result<Vec<_>>>()?;
    let start = Arc::new(Barrier::new(streams + 1));
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let start = start.clone();
            std::thread::spawn(move || one_stream(s, write_size, dur, verify, i as u64, &start))
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let mut out = Bulk {
        bytes: 0,
        sent: 0,
        secs: 0.0,
        intact: true,
    };
    for h in handles {
        let (sent, got) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a bench stream panicked"))??;
        out.bytes += got.bytes;
        out.sent += sent.bytes;
        out.intact &= sent.bytes == got.bytes && (!verify || sent.hash == got.hash);
    }
    out.secs = t.elapsed().as_secs_f64();
    Ok(out)
}

fn one_stream(
    mut s: TcpStream,
    write_size: usize,
    dur: Duration,
    verify: bool,
    seed: u64,
    start: &Barrier,
) -> Result<(Digest, Digest)> {
    let mut pattern = Pattern::new(seed + 1);
    let mut h = Xxh3::new();
    let mut bytes = 0u64;
    s.write_all(if verify { b"H" } else { b"B" })?;
    start.wait();
    let t = Instant::now();
    while t.elapsed() < dur {
        let buf = pattern.next(write_size);
        s.write_all(buf).context("writing (the system stalled?)")?;
        if verify {
            h.update(buf);
        }
        bytes += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .context("waiting for the server's count (the system stalled or lost the stream)")?;
    let hash = if verify { h.digest() } else { 0 };
    Ok((Digest { bytes, hash }, Digest::from_bytes(reply)))
}

/// Round trips of `size`-byte messages for `dur`, after a warm-up of 100
/// that lets a relay finish pairing. Returns each round trip, microseconds.
pub fn ping_pong(
    topo: &Topology,
    addr: SocketAddr,
    size: usize,
    dur: Duration,
) -> Result<Vec<f64>> {
    let mut s = connect(topo.client.as_ref(), addr)?;
    s.set_nodelay(true)?;
    s.write_all(b"E")?;
    let mut pattern = Pattern::new(7);
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(100_000);
    let mut round = |s: &mut TcpStream| -> Result<f64> {
        let msg = pattern.next(size);
        let t = Instant::now();
        s.write_all(msg)?;
        s.read_exact(&mut back)
            .context("waiting for the echo (the system stalled?)")?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if back != msg {
            bail!("the echo differs from the message");
        }
        Ok(us)
    };
    for _ in 0..100 {
        round(&mut s)?;
    }
    let t = Instant::now();
    while t.elapsed() < dur {
        rtts.push(round(&mut s)?);
    }
    Ok(rtts)
}

/// Opens `n` connections, each proven end to end with one echo, and keeps
/// them open while `measure` runs; returns the setup rate (conn/s).
pub fn many_conns(
    topo: &Topology,
    addr: SocketAddr,
    n: usize,
    measure: impl FnOnce() -> Result<()>,
) -> Result<f64> {
    let t = Instant::now();
    let mut open = Vec::with_capacity(n);
    let mut back = [0u8; 64];
    for i in 0..n {
        let mut s = connect(topo.client.as_ref(), addr)
            .with_context(|| format!("opening connection {} of {n}", i + 1))?;
        let msg = [b'x'; 64];
        s.write_all(b"E")?;
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("echo on connection {} of {n}", i + 1))?;
        open.push(s);
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    measure()?;
    drop(open);
    Ok(rate)
}
