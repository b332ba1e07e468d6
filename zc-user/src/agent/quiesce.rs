//! Pairing a connection that is busy. A proxy may hold bytes it has read
//! from one socket and not yet written to the other; were the kernel to
//! start redirecting then, what it redirects would overtake them. So the
//! owner is stopped (see `stop`) for the moment of pairing, and only paired
//! while it holds nothing: every byte it read from each socket it has
//! written to the other. That needs a byte-transparent proxy (TCP mode);
//! one that adds or rewrites bytes (PROXY protocol, TLS) never matches
//! and is refused.
//!
//! After the sockets join the map, the owner stays stopped until the
//! kernel has redirected what was queued: its read of a socket with
//! unprocessed bytes would make the kernel run the verdict on them twice
//! (net/ipv4/tcp_bpf.c rewinds `copied_seq`). Bytes queued behind a
//! partly read skb are handled by the programs (`strp_offset`).
use std::{
    io,
    net::TcpStream,
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use log::debug;

use super::{
    pidfd::Process,
    proto::ErrorKind,
    stop::{Stopped, stop},
    take::{Refusal, refuse},
};
use crate::sys;

/// How long to look for a moment when the owner holds no bytes.
const SETTLE: Duration = Duration::from_secs(3);

/// Whether a thread of `p` stopped right after select(2) or poll(2): it
/// may have been told a socket is readable and be about to read it. Once
/// paired, that read would find nothing and fail with EAGAIN, which a
/// select loop (socat) takes as fatal, shutting the sockets down on its
/// way out. A thread stopped while blocked in such a call restarts it and
/// sees the truth, so this only matters while bytes are queued.
fn just_scanned(p: &Process) -> bool {
    #[cfg(target_arch = "x86_64")]
    const SCANS: [i64; 4] = [
        libc::SYS_select,
        libc::SYS_poll,
        libc::SYS_pselect6,
        libc::SYS_ppoll,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    const SCANS: [i64; 2] = [libc::SYS_pselect6, libc::SYS_ppoll];
    let Ok(tasks) = std::fs::read_dir(p.proc_path("task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("syscall")).is_ok_and(|s| {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<i64>().ok())
                .is_some_and(|n| SCANS.contains(&n))
        })
    })
}

/// What the owner has read from a socket and what it has written into it.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub read: u64,
    pub written: u64,
}

/// Bytes that have left `s`'s receive queue: what its owner read, and,
/// once paired, what the verdict took. Received first, so that bytes
/// arriving between the two readings can only make this too small.
pub fn consumed(s: &TcpStream) -> io::Result<u64> {
    let fd = s.as_fd();
    Ok(sys::bytes_received(fd)?.saturating_sub(sys::inq(fd)?))
}

fn progress(s: &TcpStream, connected: bool) -> io::Result<Progress> {
    let fd = s.as_fd();
    let read = consumed(s)?;
    // The connecting side's count of acknowledged bytes includes its SYN.
    let syn = u64::from(connected);
    Ok(Progress {
        read,
        written: sys::bytes_written(fd)?.saturating_sub(syn),
    })
}

/// Whether the socket was accepted (a listener in the owner's network
/// namespace has its local port) rather than connected. A proxy that
/// closed its listener makes this wrong, and the pairing is then refused.
pub fn accepted(s: &TcpStream, owner: &Process) -> bool {
    let Ok(local) = s.local_addr() else {
        return false;
    };
    let port = format!(":{:04X} ", local.port());
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(owner.proc_path(&format!("net/{f}"))).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let mut cols = l.split_whitespace().skip(1);
                let (Some(local), Some(_), Some(state)) = (cols.next(), cols.next(), cols.next())
                else {
                    return false;
                };
                state == "0A" && format!("{local} ").ends_with(&port)
            })
        })
    })
}

/// Both sockets' progress, as [`settle`] measures it; `connected` says
/// which of them opened its connection.
pub fn progress_of(socks: &[TcpStream; 2], connected: [bool; 2]) -> io::Result<[Progress; 2]> {
    Ok([
        progress(&socks[0], connected[0])?,
        progress(&socks[1], connected[1])?,
    ])
}

/// Stops the owners at a moment when they hold no bytes between the two
/// sockets; returns them stopped, with each socket's progress then.
/// Each stop lasts at most `bound` unless it is kept for pairing (see
/// [`stop`] for `ceiling`).
pub async fn settle(
    owners: &[Arc<Process>],
    socks: &[TcpStream; 2],
    connected: [bool; 2],
    bound: Duration,
    ceiling: Duration,
) -> Result<(Stopped, [Progress; 2]), Refusal> {
    let closed = |e: io::Error| {
        refuse(
            ErrorKind::Invalid,
            format!("a socket closed during the request: {e}"),
        )
    };
    let deadline = Instant::now() + SETTLE;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let stopped = stop(owners, bound, ceiling).await?;
        let p = progress_of(socks, connected).map_err(closed)?;
        let held = [
            p[0].read as i64 - p[1].written as i64,
            p[1].read as i64 - p[0].written as i64,
        ];
        let queued = sys::inq(socks[0].as_fd()).map_err(closed)?
            + sys::inq(socks[1].as_fd()).map_err(closed)?;
        let scanned = owners.iter().any(|p| just_scanned(p));
        debug!("try {tries}: held {held:?}, queued {queued}, just scanned {scanned}");
        if held == [0, 0] && !(queued > 0 && scanned) {
            debug!("owner holds no bytes (try {tries}); pairing");
            return Ok((stopped, p));
        }
        stopped.release().await;
        if Instant::now() > deadline {
            return Err(refuse(
                ErrorKind::Invalid,
                format!(
                    "in {} s the owner never held zero bytes between the two sockets \
                     (last: {} read from the first and not written to the second, {} the \
                     other way): zc pairs only proxies that pass bytes through unchanged",
                    SETTLE.as_secs(),
                    held[0],
                    held[1]
                ),
            ));
        }
        // Let it write out what it holds.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits (the owners still stopped), until `deadline` at most, until every
/// byte that reached `s` after the owner's last read has been through the
/// verdict: `taken` reports what the verdict has taken from it so far.
pub async fn wait_redirected(
    s: &TcpStream,
    before: Progress,
    taken: impl Fn() -> Option<u64>,
    deadline: Instant,
) -> io::Result<()> {
    loop {
        let arrived = sys::bytes_received(s.as_fd())?.saturating_sub(before.read);
        let done = taken().unwrap_or(0);
        if done >= arrived {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "the kernel had taken {done} of the {arrived} bytes queued on {} when the \
                 owner had to go on",
                describe(s)
            )));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

fn describe(s: &TcpStream) -> String {
    match (s.local_addr(), s.peer_addr()) {
        (Ok(l), Ok(r)) => format!("{l}-{r}"),
        _ => "a socket".into(),
    }
}

/// Waits, until `deadline` at most, until neither socket looks readable to poll(2). Bytes
/// that arrived while a socket was locked wait for the kernel's parser
/// worker, and meanwhile poll reports them; an owner let go then would
/// read, find them gone, and get EAGAIN.
pub async fn wait_unreadable(socks: &[TcpStream; 2], deadline: Instant) {
    use std::os::fd::AsRawFd as _;
    loop {
        let mut fds = socks.each_ref().map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds; zero timeout.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
        if n == 0 || Instant::now() > deadline {
            if n != 0 {
                debug!("a paired socket still polls readable; letting the owner continue");
            }
            return;
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}
