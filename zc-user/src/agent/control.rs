//! The control socket: a SOCK_SEQPACKET Unix socket, one message per
//! request and one or more per response (see [`REPLY_CHUNK`]), with the
//! sender's credentials as the kernel recorded them at connect(2)
//! (SO_PEERCRED, SO_PEERGROUPS). Server and client halves both live here.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, connect, getsockopt,
    listen, socket, sockopt::PeerCredentials,
};
use tokio::io::{Interest, unix::AsyncFd};

use super::{
    access::Requester,
    proto::{MAX_REQUEST, Response},
};

/// Where `zc agent` listens and the other commands connect by default.
pub const DEFAULT_SOCKET: &str = "/run/zc/zc.sock";

/// A response goes out in messages of this many bytes; the first shorter
/// one ends it. One message cannot carry more than the sender's SO_SNDBUF
/// (net.core.wmem_default, 212,992 bytes here: `zc stats` failed with
/// EMSGSIZE past about 1,200 pairs), so a large answer must be split.
pub const REPLY_CHUNK: usize = 64 * 1024;

/// The most descriptors one message can carry (the kernel's SCM_MAX_FD,
/// include/net/scm.h, summed over all its SCM_RIGHTS headers). With room
/// for all of them the control data is never truncated, so every
/// descriptor a client sends arrives here and is closed with the request;
/// a truncated one (MSG_CTRUNC) makes nix refuse to list what did arrive,
/// and those leaked.
const SCM_MAX_FD: usize = 253;

/// Makes way for the control socket at `path`: nothing there, or a stale
/// socket (one nobody accepts on: ECONNREFUSED, left by a dead agent),
/// which is removed. Anything else is refused and left alone: a live
/// socket (another agent, or another program's), and whatever is not a
/// socket (a regular file, a link, a directory), which `--socket` must
/// never destroy.
pub fn clear_socket_path(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    let t = meta.file_type();
    if !t.is_socket() {
        let what = if t.is_symlink() {
            "a symbolic link"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        bail!(
            "{} exists and is {what}, not a stale control socket; zc agent will not remove \
             it: give another --socket PATH, or remove it yourself",
            path.display()
        );
    }
    let probe = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a socket to probe the control socket")?;
    match connect(probe.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => bail!(
            "another zc agent is serving {}; stop it first",
            path.display()
        ),
        Err(nix::errno::Errno::ECONNREFUSED) => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display())),
        Err(e) => bail!(
            "{} is a socket that is not a stale zc control socket (connecting: {e}); zc agent \
             will not remove it: give another --socket PATH",
            path.display()
        ),
    }
}

/// Binds the control socket, 0600 (0660 and group-owned with `group`).
/// A socket left by a dead agent is replaced; nothing else is (see
/// [`clear_socket_path`]).
pub fn bind_control(path: &Path, group: Option<u32>) -> Result<AsyncFd<OwnedFd>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clear_socket_path(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating the control socket")?;
    // Nobody else may connect between bind and chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = bind(fd.as_raw_fd(), &UnixAddr::new(path)?);
    nix::sys::stat::umask(old);
    bound.with_context(|| format!("binding {}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    }
    listen(&fd, Backlog::new(64)?).context("listening on the control socket")?;
    Ok(register(fd)?)
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, so it stays open exactly as
    // long as it is registered.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// Accepts one client and reads its credentials.
pub async fn accept(listener: &AsyncFd<OwnedFd>) -> io::Result<(AsyncFd<OwnedFd>, Requester)> {
    let fd = listener
        .async_io(Interest::READABLE, |l| {
            accept4(
                l.as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            )
            .map_err(io::Error::from)
        })
        .await?;
    // SAFETY: accept4 returned a new descriptor nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let cred = getsockopt(&fd, PeerCredentials)?;
    let who = Requester {
        uid: cred.uid(),
        gid: cred.gid(),
        groups: peer_groups(fd.as_fd())?,
        pid: cred.pid(),
    };
    Ok((register(fd)?, who))
}

/// The peer's supplementary groups, from the credentials SO_PEERCRED reads
/// (SO_PEERGROUPS, Linux 4.13).
fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 32];
    loop {
        let held =
            crate::sys::getsockopt_u32s(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, &mut groups)?;
        // More than there is room for: the kernel said how much it takes.
        let fits = held <= groups.len();
        groups.resize(held, 0);
        if fits {
            return Ok(groups);
        }
    }
}

/// One request as received: its bytes, whether the kernel cut it short
/// (longer than [`MAX_REQUEST`]), and any descriptors sent with it.
pub struct Message {
    pub body: Vec<u8>,
    pub truncated: bool,
    pub fds: Vec<OwnedFd>,
}

/// Reads one message; `None` at EOF.
pub async fn recv(conn: &AsyncFd<OwnedFd>) -> io::Result<Option<Message>> {
    let msg = conn
        .async_io(Interest::READABLE, |c| {
            let mut buf = vec![0u8; MAX_REQUEST + 1];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; SCM_MAX_FD]);
            let m = nix::sys::socket::recvmsg::<()>(
                c.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for cm in m.cmsgs()? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = cm {
                    // SAFETY: the kernel installed these descriptors for us.
                    fds.extend(
                        raw.into_iter().map(|fd| unsafe {
                            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                        }),
                    );
                }
            }
            let truncated = m.flags.intersects(
                nix::sys::socket::MsgFlags::MSG_TRUNC | nix::sys::socket::MsgFlags::MSG_CTRUNC,
            );
            let n = m.bytes;
            buf.truncate(n.min(MAX_REQUEST));
            Ok(Message {
                body: buf,
                truncated,
                fds,
            })
        })
        .await?;
    if msg.body.is_empty() && msg.fds.is_empty() && !msg.truncated {
        return Ok(None);
    }
    Ok(Some(msg))
}

/// Sends one response in [`REPLY_CHUNK`]-sized messages.
pub async fn send(conn: &AsyncFd<OwnedFd>, resp: &Response) -> io::Result<()> {
    let mut body = serde_json::to_vec(resp).map_err(io::Error::other)?;
    // A body that fills its last message exactly gets a trailing newline
    // (JSON allows it), so that a short message still ends it: an empty
    // one would read as end of file.
    if body.len() % REPLY_CHUNK == 0 {
        body.push(b'\n');
    }
    for chunk in body.chunks(REPLY_CHUNK) {
        conn.async_io(Interest::WRITABLE, |c| {
            nix::sys::socket::send(c.as_raw_fd(), chunk, nix::sys::socket::MsgFlags::empty())
                .map_err(io::Error::from)
        })
        .await?;
    }
    Ok(())
}

/// How long a turned-away connection waits for the request it was about
/// to send.
const TURN_AWAY_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Answers a connection the agent will not serve, and closes it without
/// resetting it. A Unix socket closed with an unread message in it sets
/// ECONNRESET on its peer, and on a SOCK_SEQPACKET socket that error is
/// returned before the answer already queued: a client that sent its
/// request just before the close would never read why it was refused. So
/// the request (or EOF) is awaited a short while and read first. `linger`
/// is false when too many turned-away connections wait already: those
/// close at once, as the cheap path must stay cheap.
pub async fn turn_away(conn: AsyncFd<OwnedFd>, resp: &Response, linger: bool) {
    if send(&conn, resp).await.is_err() || !linger {
        return;
    }
    // The request (its descriptors are closed with it), or EOF; then any
    // message queued behind it.
    if let Ok(Ok(Some(_))) = tokio::time::timeout(TURN_AWAY_WAIT, recv(&conn)).await {
        let mut buf = [0u8; 64];
        let dontwait = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        // Descriptors riding on these are discarded by the kernel, as no
        // room is given for them.
        while nix::sys::socket::recv(conn.as_raw_fd(), &mut buf, dontwait).is_ok_and(|n| n > 0) {}
    }
}

/// Client side: reads one response, message by message, until one shorter
/// than [`REPLY_CHUNK`].
fn read_reply(fd: BorrowedFd<'_>) -> Result<Response> {
    let mut body = Vec::new();
    // One byte more than a chunk, so that an overlong message shows.
    let mut buf = vec![0u8; REPLY_CHUNK + 1];
    let recv = |buf: &mut [u8], flags| nix::sys::socket::recv(fd.as_raw_fd(), buf, flags);
    loop {
        let n = match recv(&mut buf, nix::sys::socket::MsgFlags::empty()) {
            // A reset is reported before messages already queued (see
            // `turn_away`), and reported once: an answer may still wait.
            Err(nix::errno::Errno::ECONNRESET) => {
                recv(&mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
                    .map_err(|_| nix::errno::Errno::ECONNRESET)
            }
            r => r,
        }
        .context("reading the agent's answer")?;
        if n == 0 {
            bail!(
                "the agent closed the connection {}",
                if body.is_empty() {
                    "without answering".to_string()
                } else {
                    format!("after {} bytes of its answer", body.len())
                }
            );
        }
        if n > REPLY_CHUNK {
            bail!("the agent sent a message longer than {REPLY_CHUNK} bytes");
        }
        body.extend_from_slice(&buf[..n]);
        if n < REPLY_CHUNK {
            break;
        }
    }
    serde_json::from_slice(&body).context("reading the agent's answer")
}

/// Client side: connects (blocking) to the agent.
pub fn connect_control(path: &Path) -> Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?).with_context(|| {
        format!(
            "connecting to the zc agent at {} (is `zc agent` running?)",
            path.display()
        )
    })?;
    Ok(fd)
}

/// Client side: one raw request message, one response.
pub fn call_raw(path: &Path, body: &[u8]) -> Result<Response> {
    call_with_fds(path, body, &[])
}

/// Client side: one request with descriptors attached (SCM_RIGHTS).
pub fn call_with_fds(
    path: &Path,
    body: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Response> {
    let fd = connect_control(path)?;
    call_on(fd.as_fd(), body, fds)
}

/// Client side: one request on a connection already open, one response.
pub fn call_on(
    conn: BorrowedFd<'_>,
    body: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Response> {
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
    let sent = nix::sys::socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &[std::io::IoSlice::new(body)],
        if raw.is_empty() { &[] } else { &cmsg },
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    );
    if let Err(e) = sent {
        // A connection the agent turned away (at the requester's share)
        // was answered and closed before it could read a request: that
        // answer is still queued here.
        return read_reply(conn).map_err(|_| anyhow::Error::from(e).context("sending the request"));
    }
    read_reply(conn)
}

/// Client side: one request, one response.
pub fn call(path: &Path, req: &super::proto::Request) -> Result<Response> {
    call_raw(path, &serde_json::to_vec(req)?)
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::socketpair;

    use super::*;
    use crate::agent::proto::ErrorKind;

    /// A reply of exactly `len` bytes of JSON.
    fn reply_of(len: usize) -> Response {
        let with = |n: usize| Response::Error {
            kind: ErrorKind::Internal,
            message: "x".repeat(n),
        };
        let overhead = serde_json::to_vec(&with(0)).expect("json").len();
        with(len - overhead)
    }

    /// Every length around the chunk boundaries arrives whole through a
    /// real SOCK_SEQPACKET pair, up to 40 chunks (2.5 MiB).
    #[test]
    fn replies_of_any_length_arrive_whole() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for len in [
            100,
            REPLY_CHUNK - 1,
            REPLY_CHUNK,
            REPLY_CHUNK + 1,
            2 * REPLY_CHUNK,
            40 * REPLY_CHUNK,
            40 * REPLY_CHUNK + 7,
        ] {
            let (server, client) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .expect("socketpair");
            nix::fcntl::fcntl(
                &server,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .expect("O_NONBLOCK");
            // A reader that waits for a chunk never sent fails, not hangs.
            nix::sys::socket::setsockopt(
                &client,
                nix::sys::socket::sockopt::ReceiveTimeout,
                &nix::sys::time::TimeVal::new(10, 0),
            )
            .expect("SO_RCVTIMEO");
            let want = reply_of(len);
            let sent = want.clone();
            // The reader runs beside the sender: a reply larger than the
            // socket's buffer waits for it.
            let reader =
                std::thread::spawn(move || read_reply(client.as_fd()).map_err(|e| e.to_string()));
            rt.block_on(async {
                let conn = register(server).expect("register");
                send(&conn, &sent).await.expect("send");
            });
            let got = reader
                .join()
                .expect("reader")
                .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
            assert_eq!(got, want, "a reply of {len} bytes");
        }
    }
}
