//! Taking a socket out of another process (pidfd_getfd) for a requester,
//! after checking the requester could reach that process itself and that
//! the fd really is an established TCP socket.
use std::{
    io,
    net::TcpStream,
    os::{
        fd::{AsFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use socket2::SockRef;

use super::proto::ErrorKind;

/// A refusal with its reason, as the requester will read it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

pub fn refuse(kind: ErrorKind, message: impl Into<String>) -> Refusal {
    Refusal {
        kind,
        message: message.into(),
    }
}

/// Who sent a request, from SO_PEERCRED.
#[derive(Clone, Copy, Debug)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

/// Root may take from any process; anyone else only from a process of
/// their own uid that is dumpable (as ptrace would require): the kernel
/// makes /proc/PID root-owned when a process is not dumpable.
pub fn check_access(who: Requester, pid: i32) -> Result<(), Refusal> {
    let meta = std::fs::metadata(format!("/proc/{pid}"))
        .map_err(|_| refuse(ErrorKind::NotFound, format!("no process with pid {pid}")))?;
    if who.uid == 0 {
        return Ok(());
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| refuse(ErrorKind::NotFound, format!("no process with pid {pid}")))?;
    // Uid: real effective saved fs
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let same_user = !uids.is_empty() && uids.iter().all(|&u| u == who.uid);
    if !same_user || meta.uid() != who.uid {
        return Err(refuse(
            ErrorKind::Denied,
            format!(
                "uid {} may not take sockets from pid {pid}: it is not theirs, or not dumpable",
                who.uid
            ),
        ));
    }
    Ok(())
}

/// Duplicates `fd` of process `pid` into the agent.
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd, Refusal> {
    // SAFETY: plain syscalls; the returned descriptors are owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ESRCH) => refuse(ErrorKind::NotFound, format!("no process with pid {pid}")),
            _ => refuse(ErrorKind::Internal, format!("pidfd_open({pid}): {e}")),
        });
    }
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above.
    let got = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    if got < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EBADF) => refuse(
                ErrorKind::NotFound,
                format!("pid {pid} has no open fd {fd}"),
            ),
            Some(libc::ESRCH) => refuse(
                ErrorKind::NotFound,
                format!("pid {pid} exited during the request"),
            ),
            Some(libc::EPERM) => refuse(
                ErrorKind::Denied,
                format!("the agent may not take fds from pid {pid}: {e}"),
            ),
            _ => refuse(
                ErrorKind::Internal,
                format!("pidfd_getfd(pid {pid}, fd {fd}): {e}"),
            ),
        });
    }
    // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// Checks that `fd` is a connected, established TCP socket and returns it
/// as a stream. `what` names it in errors ("fd 5 of pid 42").
pub fn established_tcp(fd: OwnedFd, what: &str) -> Result<TcpStream, Refusal> {
    let invalid = |m: String| refuse(ErrorKind::Invalid, m);
    let meta = std::fs::File::from(
        fd.try_clone()
            .map_err(|e| invalid(format!("{what}: {e}")))?,
    )
    .metadata()
    .map_err(|e| invalid(format!("{what}: {e}")))?;
    if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
        return Err(invalid(format!("{what} is not a socket")));
    }
    let sock = SockRef::from(&fd);
    let domain = sock.domain().map_err(|e| invalid(format!("{what}: {e}")))?;
    if domain != socket2::Domain::IPV4 && domain != socket2::Domain::IPV6 {
        return Err(invalid(format!(
            "{what} is not a TCP socket (a Unix or other non-IP socket)"
        )));
    }
    let ty = sock.r#type().map_err(|e| invalid(format!("{what}: {e}")))?;
    let proto = sock
        .protocol()
        .map_err(|e| invalid(format!("{what}: {e}")))?;
    if ty != socket2::Type::STREAM || proto.is_some_and(|p| p != socket2::Protocol::TCP) {
        return Err(invalid(format!("{what} is not a TCP socket (UDP or raw)")));
    }
    let info = crate::sys::tcp_info(fd.as_fd()).map_err(|e| invalid(format!("{what}: {e}")))?;
    // TCP_ESTABLISHED = 1, TCP_LISTEN = 10 (include/net/tcp_states.h).
    match info.state {
        1 => Ok(TcpStream::from(fd)),
        10 => Err(invalid(format!("{what} is a listening socket"))),
        7 => Err(invalid(format!("{what} is not connected"))),
        s => Err(invalid(format!(
            "{what} is not an established connection (it is in {}: closing or closed)",
            state_name(s)
        ))),
    }
}

/// The name `ss` prints for a TCP state (include/net/tcp_states.h).
fn state_name(state: u8) -> String {
    match state {
        2 => "SYN-SENT".into(),
        3 => "SYN-RECV".into(),
        4 => "FIN-WAIT-1".into(),
        5 => "FIN-WAIT-2".into(),
        6 => "TIME-WAIT".into(),
        8 => "CLOSE-WAIT (its remote end has closed)".into(),
        9 => "LAST-ACK".into(),
        11 => "CLOSING".into(),
        s => format!("TCP state {s}"),
    }
}
