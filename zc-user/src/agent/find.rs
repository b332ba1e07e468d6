//! Finding the process and fd that hold a TCP socket named by its 4-tuple,
//! the way `ss -p` does: /proc/net/tcp{,6} gives the socket's inode, and
//! /proc/PID/fd links name it as `socket:[INODE]`.
use std::net::SocketAddr;

use super::{
    proto::ErrorKind,
    take::{Refusal, refuse},
};

/// Parses `LOCAL-REMOTE` as `ss` prints a connection, e.g.
/// `10.0.0.5:443-10.0.0.9:51234` or `[::1]:443-[::1]:51234`.
pub fn parse_tuple(s: &str) -> Result<(SocketAddr, SocketAddr), Refusal> {
    let bad = || {
        refuse(
            ErrorKind::Malformed,
            format!("`{s}` is not LOCAL-REMOTE, e.g. 10.0.0.5:443-10.0.0.9:51234"),
        )
    };
    // IPv6 addresses are bracketed and contain no '-'.
    let (l, r) = s.split_once('-').ok_or_else(bad)?;
    let local = l.trim().parse().map_err(|_| bad())?;
    let remote = r.trim().parse().map_err(|_| bad())?;
    Ok((local, remote))
}

/// The kernel's hex spelling of an address in /proc/net/tcp{,6}.
fn proc_hex(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(v6) => {
            let o = v6.ip().octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            format!(
                "{:08X}{:08X}{:08X}{:08X}:{:04X}",
                w(0),
                w(4),
                w(8),
                w(12),
                v6.port()
            )
        }
    }
}

/// Inode of the established socket local -> remote in this network
/// namespace. IPv4 addresses also find an IPv6 socket that holds the
/// connection IPv4-mapped (a dual-stack listener's), listed in tcp6 only.
pub fn inode_of(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    inode_in("/proc/net", local, remote)
}

/// [`inode_of`] in the network namespace `netns` names: a pid in it
/// (whose /proc/PID/net shows it) or a namespace file such as
/// /run/netns/NAME (entered by a thread of its own to read its table).
pub fn inode_in_netns(
    netns: &str,
    local: SocketAddr,
    remote: SocketAddr,
) -> Result<Option<u64>, String> {
    if let Ok(pid) = netns.parse::<u32>() {
        let dir = format!("/proc/{pid}/net");
        if !std::path::Path::new(&dir).exists() {
            return Err(format!("no process {pid} to name a network namespace by"));
        }
        return Ok(inode_in(&dir, local, remote));
    }
    let file = std::fs::File::open(netns)
        .map_err(|e| format!("opening network namespace {netns}: {e}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering network namespace {netns}: {e}"))?;
            // thread-self: /proc/self/net shows the main thread's namespace.
            Ok(inode_in("/proc/thread-self/net", local, remote))
        })
        .join()
        .map_err(|_| format!("reading network namespace {netns} panicked"))?
    })
}

/// [`inode_of`] in the TCP tables under `dir` (a /proc/.../net).
fn inode_in(dir: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => Some(SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()))),
        SocketAddr::V6(_) => None,
    };
    let (tcp, tcp6) = (format!("{dir}/tcp"), format!("{dir}/tcp6"));
    if local.is_ipv4() {
        in_table(&tcp, local, remote).or_else(|| in_table(&tcp6, mapped(local)?, mapped(remote)?))
    } else {
        in_table(&tcp6, local, remote)
    }
}

fn in_table(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let (l, r) = (proc_hex(local), proc_hex(remote));
    std::fs::read_to_string(table)
        .ok()?
        .lines()
        .skip(1)
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 01 is TCP_ESTABLISHED.
            (f.get(1) == Some(&l.as_str())
                && f.get(2) == Some(&r.as_str())
                && f.get(3) == Some(&"01"))
            .then(|| f.get(9)?.parse().ok())
            .flatten()
        })
}

/// A (pid, fd) that holds socket `inode`, searching every process.
pub fn holder_of(inode: u64) -> Option<(i32, i32)> {
    let [found] = holders_of([inode]);
    found.first().copied()
}

/// Every process but the agent that holds each socket of `inodes`, as
/// (pid, fd) with one fd per process, in one pass over /proc. A socket can
/// have several holders (inherited across fork, or passed over a Unix
/// socket).
pub fn holders_of<const N: usize>(inodes: [u64; N]) -> [Vec<(i32, i32)>; N] {
    let wants = inodes.map(|i| format!("socket:[{i}]"));
    let mut found = [(); N].map(|_| Vec::new());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            for (want, holders) in wants.iter().zip(found.iter_mut()) {
                if link.as_os_str() == want.as_str() && !holders.iter().any(|&(h, _)| h == pid) {
                    holders.push((pid, fd));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_parse_as_ss_prints_them() {
        let (l, r) = parse_tuple("10.0.0.5:443-10.0.0.9:51234").expect("v4");
        assert_eq!((l.port(), r.port()), (443, 51234));
        let (l, _) = parse_tuple("[::1]:443-[::1]:5").expect("v6");
        assert!(l.is_ipv6());
        for bad in ["10.0.0.5:443", "x-y", "10.0.0.5-10.0.0.9:1", ""] {
            assert!(parse_tuple(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn finds_the_inode_and_a_holder_of_a_live_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let _s = l.accept().expect("accept");
        let ino = inode_of(c.local_addr().expect("l"), c.peer_addr().expect("r"))
            .expect("inode of our own connection");
        assert!(ino > 0);
        // The agent never finds itself. (Another test's child may hold
        // the socket for a moment, between fork and exec.)
        let me = std::process::id() as i32;
        let [held] = holders_of([ino]);
        assert!(held.iter().all(|&(pid, _)| pid != me), "{held:?}");
    }
}
