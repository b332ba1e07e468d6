//! Whether a stopped owner may already have been told that one of its
//! sockets is readable. Once the socket is paired, the verdict takes
//! every byte; an owner that reads because of what it was told before
//! then finds nothing, and a paired socket answers that read with EAGAIN,
//! blocking or not (net/ipv4/tcp_bpf.c, tcp_bpf_recvmsg_parser on 6.18:
//! with nothing in the psock's queue, `copied = -EAGAIN` after any wake).
//! socat (a pselect6 loop) treats that as fatal, exits, and shuts both
//! sockets down.
//!
//! So for an owner without epoll (a poll or select loop, or blocking
//! reads) pairing waits for a moment when, for each socket with bytes
//! queued, some thread sits in a poll or select asking for it to become
//! readable and was not answered yet: it looks again once let go. Any
//! other state may act on old readiness: a thread stopped in user space
//! (between a poll and a read), a call that returned the socket readable,
//! a thread blocked in read(2) on the socket, or no thread asking about a
//! socket whose bytes wait (socat stops asking about a socket it knows is
//! readable until the other one can take what it would read). Which
//! stage a stopped call is in comes from its registers (see `Stage`), so
//! only the stopping thread (the tracer) can tell a select apart.
//!
//! Event loops (an epoll instance among the owner's files) are left out:
//! they treat EAGAIN as "no data after all", as HAProxy does.
use std::{fmt, fs, io, os::unix::fs::FileExt as _};

use super::pidfd::Process;

#[cfg(target_arch = "x86_64")]
const POLLS: [i64; 2] = [libc::SYS_poll, libc::SYS_ppoll];
#[cfg(not(target_arch = "x86_64"))]
const POLLS: [i64; 1] = [libc::SYS_ppoll];
#[cfg(target_arch = "x86_64")]
const SELECTS: [i64; 2] = [libc::SYS_select, libc::SYS_pselect6];
#[cfg(not(target_arch = "x86_64"))]
const SELECTS: [i64; 1] = [libc::SYS_pselect6];
#[cfg(target_arch = "x86_64")]
const READS: [i64; 5] = [
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_pread64,
];
#[cfg(not(target_arch = "x86_64"))]
const READS: [i64; 4] = [
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
];

/// Why pairing now could make the owner read a socket the kernel emptied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hazard {
    /// A thread stopped outside any system call, with bytes queued: it
    /// may be between a poll that said "readable" and its read.
    InUserSpace { tid: i32 },
    /// A poll or select of this thread returned the socket readable.
    Told { tid: i32, socket: usize },
    /// A thread stopped in select(2), with bytes queued, where the agent
    /// cannot tell whether it was answered.
    InSelect { tid: i32 },
    /// A thread blocked in read(2) on the socket.
    Reading { tid: i32, socket: usize },
    /// Bytes wait on the socket and no thread asks whether it is
    /// readable: the owner knows already and reads when it chooses.
    KnownReadable { socket: usize },
    /// The owner's state could not be read (/proc).
    Unreadable(String),
}

impl fmt::Display for Hazard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InUserSpace { tid } => write!(
                f,
                "thread {tid} was between system calls with bytes queued (it may have been told \
                 they are readable)"
            ),
            Self::Told { tid, socket } => write!(
                f,
                "thread {tid}'s poll or select had just returned socket {} readable",
                socket + 1
            ),
            Self::InSelect { tid } => write!(
                f,
                "thread {tid} was in select(2) with bytes queued (a stopped select cannot tell \
                 whether it was answered)"
            ),
            Self::Reading { tid, socket } => {
                write!(f, "thread {tid} was blocked reading socket {}", socket + 1)
            }
            Self::Unreadable(e) => write!(f, "its state could not be read ({e})"),
            Self::KnownReadable { socket } => write!(
                f,
                "bytes wait on socket {} and the owner does not poll it: it was told it is \
                 readable and will read once the other socket can take more (a slow reader)",
                socket + 1
            ),
        }
    }
}

/// Whether system call `nr` asks which descriptors are ready: poll(2),
/// ppoll(2), select(2), pselect6(2).
pub fn is_scan(nr: i64) -> bool {
    POLLS.contains(&nr) || SELECTS.contains(&nr)
}

/// Whether the poll or select that thread `tid` of `p` returns from (with
/// a count above 0) answered one of the sockets (`fds`) readable though
/// nothing is there for the owner: `real` says whether a socket has
/// something to read (bytes, an EOF or an error). What else it answered,
/// it answers again when run again (both calls are level-triggered).
pub fn spurious(p: &Process, tid: i32, fds: &[Vec<i32>; 2], real: impl Fn(usize) -> bool) -> bool {
    let Some((nr, args)) = scanning(p, tid) else {
        return false;
    };
    let Ok(scan) = Scan::read(p, nr, &args, Stage::Returned) else {
        return false;
    };
    (0..2).any(|i| !real(i) && scan.ready.iter().any(|fd| fds[i].contains(fd)))
}

/// Whether thread `tid` of `p` sits in a poll or select that also waits
/// for one of the sockets (`fds`) to become writable: such a call wakes
/// again, and looks at every socket anew, when the kernel's worker frees
/// space in it.
pub fn waits_to_write(p: &Process, tid: i32, fds: &[Vec<i32>; 2]) -> bool {
    let Some((nr, args)) = scanning(p, tid) else {
        return false;
    };
    Scan::read(p, nr, &args, Stage::Entry).is_ok_and(|scan| {
        scan.asked_write
            .iter()
            .any(|fd| fds.iter().any(|f| f.contains(fd)))
    })
}

/// Whether thread `tid` of `p` sleeps (state S) in a poll or select.
pub fn asleep_in_scan(p: &Process, tid: i32) -> bool {
    let state = fs::read_to_string(p.proc_path(&format!("task/{tid}/stat")))
        .ok()
        .and_then(|s| s.rsplit_once(") ")?.1.chars().next());
    state == Some('S') && scanning(p, tid).is_some()
}

/// The poll or select thread `tid` of `p` is in, if any.
fn scanning(p: &Process, tid: i32) -> Option<(i64, [u64; 6])> {
    let text = fs::read_to_string(p.proc_path(&format!("task/{tid}/syscall"))).ok()?;
    match Call::parse(&text) {
        Call::Sys { nr, args } if is_scan(nr) => Some((nr, args)),
        _ => None,
    }
}

/// The owner's descriptors for each of the two sockets (by inode).
pub fn owner_fds(p: &Process, inodes: &[u64; 2]) -> [Vec<i32>; 2] {
    let mut fds = [Vec::new(), Vec::new()];
    let Ok(dir) = fs::read_dir(p.proc_path("fd")) else {
        return fds;
    };
    let names = inodes.map(|i| format!("socket:[{i}]"));
    for e in dir.flatten() {
        let (Ok(link), Some(fd)) = (
            fs::read_link(e.path()),
            e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()),
        ) else {
            continue;
        };
        for (i, name) in names.iter().enumerate() {
            if link.as_os_str() == name.as_str() {
                fds[i].push(fd);
            }
        }
    }
    fds
}

/// Whether `p` holds an epoll instance (an event loop).
pub fn uses_epoll(p: &Process) -> bool {
    fs::read_dir(p.proc_path("fd")).is_ok_and(|dir| {
        dir.flatten().any(|e| {
            fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]")
        })
    })
}

/// Whether `p` can be stepped through its system calls: one thread, not
/// stopped already (stepping would make a stopped process run).
pub fn steppable(p: &Process) -> bool {
    let one = fs::read_dir(p.proc_path("task")).is_ok_and(|d| d.count() == 1);
    let running = fs::read_to_string(p.proc_path("stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(") ")?.1.chars().next()? != 'T'))
        .unwrap_or(false);
    one && running
}

/// The first hazard found in stopped owner `p`, whose descriptors for the
/// two sockets are `fds` and which has `queued` bytes waiting on each.
/// `entry` names a thread stopped at a system call's entry: its call has
/// not answered anything yet.
pub fn hazard(
    p: &Process,
    fds: &[Vec<i32>; 2],
    queued: [u64; 2],
    entry: Option<i32>,
) -> io::Result<Option<Hazard>> {
    let waiting = queued.map(|q| q > 0);
    let mut asked = [false; 2];
    for task in fs::read_dir(p.proc_path("task"))? {
        let task = task?;
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        let call = match fs::read_to_string(task.path().join("syscall")) {
            Ok(c) => Call::parse(&c),
            // The thread exited meanwhile.
            Err(_) => continue,
        };
        match call {
            Call::None if waiting.contains(&true) => return Ok(Some(Hazard::InUserSpace { tid })),
            Call::Sys { nr, args } if is_scan(nr) => {
                let stage = if Some(tid) == entry {
                    Stage::Entry
                } else {
                    Stage::of(tid)
                };
                let scan = Scan::read(p, nr, &args, stage)?;
                for (i, socket_fds) in fds.iter().enumerate() {
                    let mine = |list: &[i32]| list.iter().any(|fd| socket_fds.contains(fd));
                    if waiting[i] && scan.unknown {
                        return Ok(Some(Hazard::InSelect { tid }));
                    }
                    if waiting[i] && mine(&scan.ready) {
                        return Ok(Some(Hazard::Told { tid, socket: i }));
                    }
                    asked[i] |= mine(&scan.asked_read);
                }
            }
            Call::Sys { nr, args } if READS.contains(&nr) => {
                if let Some(i) = fds.iter().position(|f| f.contains(&(args[0] as i32))) {
                    return Ok(Some(Hazard::Reading { tid, socket: i }));
                }
            }
            _ => {}
        }
    }
    Ok((0..2)
        .find(|&i| waiting[i] && !asked[i])
        .map(|socket| Hazard::KnownReadable { socket }))
}

/// What /proc/PID/task/TID/syscall says a stopped thread is in.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    /// Not in a system call ("-1 sp pc"), or not stopped ("running").
    None,
    Sys {
        nr: i64,
        args: [u64; 6],
    },
}

impl Call {
    fn parse(text: &str) -> Self {
        let mut f = text.split_whitespace();
        let Some(nr) = f.next().and_then(|n| n.parse::<i64>().ok()) else {
            return Self::None;
        };
        if nr < 0 {
            return Self::None;
        }
        let mut args = [0u64; 6];
        for a in &mut args {
            *a = f
                .next()
                .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0);
        }
        Self::Sys { nr, args }
    }
}

/// Where a thread stopped in a poll or select stands: its arrays hold
/// what it asked until the call returns a count, and what it was
/// answered after (fs/select.c: poll writes `revents` back even when
/// interrupted, select rewrites its sets only when it returns a count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// At the call's entry: it has looked at nothing yet.
    Entry,
    /// Interrupted (a restart code in rax): it asks again when let go.
    Interrupted,
    /// Returning a count: it acts on the answer when let go.
    Returned,
    /// Not known (only the tracing thread can read registers).
    Unknown,
}

impl Stage {
    fn of(tid: i32) -> Self {
        #[cfg(target_arch = "x86_64")]
        match super::ptrace::syscall_stop(tid) {
            Ok(super::ptrace::SyscallStop::Entry { .. }) => Self::Entry,
            Ok(super::ptrace::SyscallStop::Exit { ret, .. }) if ret < 0 => Self::Interrupted,
            Ok(super::ptrace::SyscallStop::Exit { .. }) => Self::Returned,
            Err(_) => Self::Unknown,
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = tid;
            Self::Unknown
        }
    }
}

/// What a stopped thread's poll or select asked and was answered.
#[derive(Debug, Default)]
struct Scan {
    /// Descriptors it asks to become readable, and writable.
    asked_read: Vec<i32>,
    asked_write: Vec<i32>,
    /// Descriptors it was answered readable.
    ready: Vec<i32>,
    /// Neither can be told (a select whose stage is unknown).
    unknown: bool,
}

impl Scan {
    fn read(p: &Process, nr: i64, args: &[u64; 6], stage: Stage) -> io::Result<Self> {
        let mut scan = Self::default();
        if POLLS.contains(&nr) {
            let readable = libc::POLLIN | libc::POLLRDNORM;
            for poll in pollfds(p, args[0], args[1])? {
                if poll.events & readable != 0 {
                    scan.asked_read.push(poll.fd);
                }
                if poll.events & libc::POLLOUT != 0 {
                    scan.asked_write.push(poll.fd);
                }
                // At the entry, `revents` are left from an earlier call.
                if stage != Stage::Entry && poll.revents & readable != 0 {
                    scan.ready.push(poll.fd);
                }
            }
            return Ok(scan);
        }
        // select(2): nfds, readfds, writefds.
        let read = fd_set(p, args[1], args[0])?;
        match stage {
            Stage::Entry | Stage::Interrupted => {
                scan.asked_read = read;
                scan.asked_write = fd_set(p, args[2], args[0])?;
            }
            Stage::Returned => scan.ready = read,
            Stage::Unknown => scan.unknown = true,
        }
        Ok(scan)
    }
}

/// One `struct pollfd`.
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

/// Reads a stopped thread's poll(2) array from its memory.
fn pollfds(p: &Process, addr: u64, n: u64) -> io::Result<Vec<PollFd>> {
    // More would not be a poll loop relaying one connection.
    let n = n.min(512) as usize;
    let mut buf = vec![0u8; n * 8];
    fs::File::open(p.proc_path("mem"))?.read_exact_at(&mut buf, addr)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| PollFd {
            fd: i32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
            events: i16::from_ne_bytes([c[4], c[5]]),
            revents: i16::from_ne_bytes([c[6], c[7]]),
        })
        .collect())
}

/// The descriptors set in a select(2) `fd_set` of `nfds` bits at `addr`
/// (none for a null set).
fn fd_set(p: &Process, addr: u64, nfds: u64) -> io::Result<Vec<i32>> {
    if addr == 0 {
        return Ok(Vec::new());
    }
    let nfds = nfds.min(libc::FD_SETSIZE as u64) as usize;
    let mut buf = vec![0u8; nfds.div_ceil(64) * 8];
    fs::File::open(p.proc_path("mem"))?.read_exact_at(&mut buf, addr)?;
    Ok((0..nfds)
        .filter(|&fd| buf[fd / 8] & (1 << (fd % 8)) != 0)
        .map(|fd| fd as i32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_syscall_lines_parse() {
        assert_eq!(Call::parse("running\n"), Call::None);
        assert_eq!(Call::parse("-1 0x7ffd1 0x4011\n"), Call::None);
        assert_eq!(
            Call::parse("7 0x7ffe10 0x4 0xffffffffffffffff 0x0 0x0 0x0 0x7ffe00 0x7f12\n"),
            Call::Sys {
                nr: 7,
                args: [0x7ffe10, 4, u64::MAX, 0, 0, 0]
            }
        );
    }
}
