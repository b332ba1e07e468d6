//! What a taken fd must be before it is paired (an established TCP
//! socket), and how a request is refused. Taking it is `access`'s job.
use std::{
    net::TcpStream,
    os::fd::{AsFd as _, OwnedFd},
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
