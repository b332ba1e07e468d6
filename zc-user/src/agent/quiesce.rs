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
    readiness,
    stop::{Advance, Stopped, stop, stop_advancing},
    take::{Refusal, refuse},
};
use crate::sys;

/// How long to look for a moment when the owner holds no bytes.
const SETTLE: Duration = Duration::from_secs(3);

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

/// How long one try may step an owner of one thread towards a moment it
/// may be paired (see `stop::Advance`).
const STEPPING: Duration = Duration::from_millis(100);

/// What one look at the stopped owners found.
#[derive(Clone, Debug)]
struct Look {
    progress: [Progress; 2],
    /// Bytes read from one socket and not yet written to the other.
    held: [i64; 2],
    hazard: Option<readiness::Hazard>,
}

impl Look {
    fn safe(&self) -> bool {
        self.held == [0, 0] && self.hazard.is_none()
    }
}

/// The sockets and owners `settle` looks at, shared with a stepping stop.
struct Scene {
    socks: [TcpStream; 2],
    connected: [bool; 2],
    /// Owners without epoll, with their descriptors for the two sockets.
    looked_at: Vec<(Arc<Process>, [Vec<i32>; 2])>,
}

impl Scene {
    /// Looks at the stopped owners; `entry` names a thread stopped at a
    /// system call's entry.
    fn look(&self, entry: Option<i32>) -> io::Result<Look> {
        let p = progress_of(&self.socks, self.connected)?;
        let held = [
            p[0].read as i64 - p[1].written as i64,
            p[1].read as i64 - p[0].written as i64,
        ];
        let queued = [
            sys::inq(self.socks[0].as_fd())?,
            sys::inq(self.socks[1].as_fd())?,
        ];
        let hazard = if held == [0, 0] {
            self.looked_at.iter().find_map(|(p, fds)| {
                readiness::hazard(p, fds, queued, entry)
                    .unwrap_or_else(|e| Some(readiness::Hazard::Unreadable(e.to_string())))
            })
        } else {
            None
        };
        debug!("held {held:?}, queued {queued:?}, hazard {hazard:?}, at entry of {entry:?}");
        Ok(Look {
            progress: p,
            held,
            hazard,
        })
    }

    /// See `readiness::spurious`. A socket is readable for real when its
    /// remote end finished (or reset: TCP_CLOSE), or when SIOCINQ counts
    /// bytes: on a paired socket it counts only what the owner may read
    /// (tcp_bpf_ioctl), on one no longer paired (an undone pairing) all.
    fn spurious(&self, tid: i32) -> bool {
        let real = |i: usize| {
            let fd = self.socks[i].as_fd();
            sys::tcp_info(fd).map_or(true, |t| sys::fin_arrived(&t))
                || sys::inq(fd).map_or(true, |q| q > 0)
        };
        self.looked_at
            .iter()
            .any(|(p, fds)| readiness::spurious(p, tid, fds, real))
    }

    /// Whether thread `tid` sleeps in a poll or select that waits for no
    /// paired socket to become writable (see `readiness::waits_to_write`).
    fn settled(&self, tid: i32) -> bool {
        self.looked_at.iter().all(|(p, fds)| {
            readiness::asleep_in_scan(p, tid) && !readiness::waits_to_write(p, tid, fds)
        })
    }
}

/// Stops the owners at a moment when they hold no bytes between the two
/// sockets and cannot act on readiness they were told before (see
/// `readiness`); returns them stopped, with each socket's progress then.
/// `inodes` name the two sockets among the owners' files. An owner of one
/// thread is stepped from system call to system call towards such a
/// moment (a busy poll loop is seldom caught in one at random); others
/// are stopped and let go until one is found. Each stop lasts at most
/// `bound` unless it is kept for pairing (see [`stop`] for `ceiling`).
pub async fn settle(
    owners: &[Arc<Process>],
    socks: &[TcpStream; 2],
    inodes: &[u64; 2],
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
    // Event loops take EAGAIN as "nothing after all"; the others are
    // looked at (`readiness`).
    let looked_at: Vec<_> = owners
        .iter()
        .filter(|p| !readiness::uses_epoll(p))
        .map(|p| (p.clone(), readiness::owner_fds(p, inodes)))
        .collect();
    let stepping = match &looked_at[..] {
        [(p, _)] => owners.len() == 1 && readiness::steppable(p),
        _ => false,
    };
    let socks_copy = [
        socks[0].try_clone().map_err(closed)?,
        socks[1].try_clone().map_err(closed)?,
    ];
    let scene = Arc::new(Scene {
        socks: socks_copy,
        connected,
        looked_at,
    });
    let deadline = Instant::now() + SETTLE;
    let mut tries = 0u32;
    let mut holding = 0u32;
    let mut last_held = [0i64; 2];
    let mut hazards = 0u32;
    let mut last_hazard = None;
    loop {
        tries += 1;
        let (stopped, look) = if stepping {
            let seen = Arc::new(std::sync::Mutex::new(None));
            let (scene2, scene3, scene4) = (scene.clone(), scene.clone(), scene.clone());
            let seen2 = seen.clone();
            let advance = Advance {
                budget: STEPPING,
                safe: Box::new(move |entry| {
                    let look = scene2.look(entry);
                    let safe = look.as_ref().is_ok_and(Look::safe);
                    if let Ok(mut s) = seen2.lock() {
                        *s = Some(look);
                    }
                    safe
                }),
                spurious: Box::new(move |tid| scene3.spurious(tid)),
                settled: Box::new(move |tid| scene4.settled(tid)),
            };
            let (stopped, _) = stop_advancing(owners, bound, ceiling, Some(advance)).await?;
            let look = seen.lock().ok().and_then(|mut s| s.take());
            let look = match look {
                Some(l) => l,
                None => scene.look(None),
            };
            (stopped, look)
        } else {
            let stopped = stop(owners, bound, ceiling).await?;
            let look = scene.look(None);
            (stopped, look)
        };
        let look = look.map_err(closed)?;
        debug!("try {tries}: {look:?}");
        if look.safe() {
            debug!("owner holds no bytes and acts on no old readiness (try {tries}); pairing");
            return Ok((stopped, look.progress));
        }
        if look.held != [0, 0] {
            holding += 1;
            last_held = look.held;
        }
        if let Some(h) = look.hazard {
            hazards += 1;
            last_hazard = Some(h);
        }
        stopped.release().await;
        if Instant::now() > deadline {
            return Err(refuse(
                ErrorKind::Invalid,
                never_settled(tries, holding, last_held, hazards, last_hazard),
            ));
        }
        // Let it write out what it holds.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Why `settle` gave up, from what its tries found.
fn never_settled(
    tries: u32,
    holding: u32,
    last_held: [i64; 2],
    hazards: u32,
    last_hazard: Option<readiness::Hazard>,
) -> String {
    let mut why = format!(
        "in {} s ({tries} tries) the owner was never at a moment it could be paired safely:",
        SETTLE.as_secs()
    );
    if holding > 0 {
        why += &format!(
            " {holding} tries found that it never held zero bytes between the two sockets \
             (last: {} read from the first and not written to the second, {} the other way; zc \
             pairs only proxies that pass bytes through unchanged)",
            last_held[0], last_held[1]
        );
    }
    if let Some(h) = last_hazard {
        if holding > 0 {
            why += ";";
        }
        why += &format!(
            " {hazards} tries found it holding nothing, but {h}; once paired, the kernel takes \
             the queued bytes, and that read would fail with EAGAIN, which a poll loop such as \
             socat takes as fatal"
        );
    }
    why
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
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    loop {
        let mut fds = socks
            .each_ref()
            .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN));
        // An error (EINTR, ENOMEM) counts as readable: try again.
        let n = poll(&mut fds, PollTimeout::ZERO).unwrap_or(1);
        if n == 0 || Instant::now() > deadline {
            if n != 0 {
                debug!("a paired socket still polls readable; letting the owner continue");
            }
            return;
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}
