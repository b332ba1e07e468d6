//! User-space reads and writes on a paired socket, without a second
//! descriptor for it.
//!
//! The runtime needs a socket registered with its poller before it can
//! wait on it, and a `tokio::net::TcpStream` owns its descriptor, so
//! forwarding used to duplicate both sockets of a direction: a connection
//! cost up to six descriptors. Here a socket is registered once, on first
//! use, under the descriptor it already has, for both kinds of readiness,
//! and both directions' forwarders share that registration.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, RawFd},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use nix::sys::socket::{MsgFlags, recv, send};
use tokio::io::{Interest, unix::AsyncFd};

/// One paired socket, registered with the runtime under its own
/// descriptor number.
pub(super) struct SockIo(AsyncFd<RawFd>);

/// A pair's two registrations, made when a direction first needs them.
/// Whoever holds them must drop them before the sockets close.
pub(super) type Registrations = [OnceLock<SockIo>; 2];

/// The registration of `s` in `slot`, made now if it is not yet.
///
/// # Safety
/// `slot` must be dropped before `s` is closed.
pub(super) unsafe fn registered<'a>(
    slot: &'a OnceLock<SockIo>,
    s: &TcpStream,
) -> io::Result<&'a SockIo> {
    if let Some(io) = slot.get() {
        return Ok(io);
    }
    // SAFETY: the caller keeps `s` open for as long as `slot` lives.
    let io = unsafe {
        AsyncFd::register_with_interest(s.as_raw_fd(), Interest::READABLE | Interest::WRITABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    // One pair is driven by one task, so nothing else can fill the slot
    // between the look above and this.
    Ok(slot.get_or_init(|| SockIo(io)))
}

// MSG_DONTWAIT rather than O_NONBLOCK: the flag belongs to the open file,
// which another process may share (the agent's foreign sockets).
const FLAGS: MsgFlags = MsgFlags::MSG_DONTWAIT;

impl SockIo {
    /// Waits until the socket may have bytes to read (or an end).
    pub(super) async fn readable(&self) -> io::Result<()> {
        self.0.readable().await.map(|_| ())
    }

    /// Reads what is there without waiting; `WouldBlock` when nothing is.
    pub(super) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_io(Interest::READABLE, |fd| {
            recv(fd.as_raw_fd(), buf, FLAGS).map_err(io::Error::from)
        })
    }

    /// Reads at least a byte, or 0 at end of stream.
    pub(super) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .async_io(Interest::READABLE, |fd| {
                recv(fd.as_raw_fd(), buf, FLAGS).map_err(io::Error::from)
            })
            .await
    }

    /// Writes all of `buf`, adding to `count` as bytes are taken.
    pub(super) async fn write_all(&self, buf: &[u8], count: &AtomicU64) -> io::Result<()> {
        let mut off = 0;
        while off < buf.len() {
            let w = self
                .0
                .async_io(Interest::WRITABLE, |fd| {
                    send(fd.as_raw_fd(), &buf[off..], FLAGS | MsgFlags::MSG_NOSIGNAL)
                        .map_err(io::Error::from)
                })
                .await?;
            if w == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += w;
            count.fetch_add(w as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}
