//! The options of a proxy's sockets that pairing changes, kept so the
//! proxy gets them back as they were when its pair ends or is unpaired.
//!
//! The engine sets TCP_NODELAY and SO_SNDBUF when it pairs, and its kick
//! (`sys::kick_data_ready`) sets SO_RCVLOWAT to 1. Setting SO_SNDBUF also
//! locks the size (SOCK_SNDBUF_LOCK), which turns TCP's send-buffer
//! autotuning off for good; SO_BUF_LOCK (Linux 5.14) reads and sets those
//! lock bits, so a socket that was autotuned is autotuned again.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd as _, BorrowedFd},
};

use crate::sys::{getsockopt_int as get, setsockopt_int as set};

/// `SO_BUF_LOCK` (include/uapi/asm-generic/socket.h, as on x86_64 and
/// aarch64): the SOCK_SNDBUF_LOCK and SOCK_RCVBUF_LOCK bits of a socket.
const SO_BUF_LOCK: i32 = 72;

/// SOCK_SNDBUF_LOCK (include/uapi/linux/socket.h).
#[cfg(test)]
const SOCK_SNDBUF_LOCK: i32 = 1;

/// One socket's options as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub nodelay: bool,
    /// SO_SNDBUF as getsockopt reports it (the kernel's doubled value).
    pub sndbuf: i32,
    pub rcvlowat: i32,
    /// None on kernels without SO_BUF_LOCK.
    pub buf_lock: Option<i32>,
}

impl Options {
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self {
            nodelay: get(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY)? != 0,
            sndbuf: get(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?,
            rcvlowat: get(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT)?,
            buf_lock: get(fd, libc::SOL_SOCKET, SO_BUF_LOCK).ok(),
        })
    }

    /// Puts these options back on `fd`.
    pub fn apply(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            self.nodelay.into(),
        )?;
        // The kernel stores twice what is set (net/core/sock.c,
        // __sock_set_sndbuf); SO_SNDBUFFORCE passes net.core.wmem_max, as
        // the engine's own setting did.
        set(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, self.sndbuf / 2)?;
        if let Some(bits) = self.buf_lock {
            set(fd, libc::SOL_SOCKET, SO_BUF_LOCK, bits)?;
        }
        set(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, self.rcvlowat)
    }
}

/// Both sockets of a pair and their options from before pairing.
pub struct Saved {
    socks: [TcpStream; 2],
    before: [Options; 2],
}

impl Saved {
    /// Reads the options of `socks` (the agent's own references to them,
    /// duplicated here so they stay valid until [`Self::restore`]).
    pub fn record(socks: &[TcpStream; 2]) -> io::Result<Self> {
        Ok(Self {
            before: [
                Options::of(socks[0].as_fd())?,
                Options::of(socks[1].as_fd())?,
            ],
            socks: [socks[0].try_clone()?, socks[1].try_clone()?],
        })
    }

    /// The agent's references to the sockets.
    pub fn socks(&self) -> &[TcpStream; 2] {
        &self.socks
    }

    /// Puts both sockets' options back; a socket that has failed or closed
    /// meanwhile is left as it is.
    pub fn restore(&self) {
        for (s, o) in self.socks.iter().zip(&self.before) {
            if let Err(e) = o.apply(s.as_fd()) {
                log::debug!("restoring a socket's options: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// What the engine does to a socket when it pairs it, and back.
    #[test]
    fn options_changed_by_pairing_come_back_exactly() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        set(c.as_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, 3).expect("rcvlowat");
        let before = Options::of(c.as_fd()).expect("read");
        assert_eq!(before.buf_lock, Some(0), "autotuned: nothing locked");
        c.set_nodelay(true).expect("nodelay");
        crate::sys::set_sndbuf(c.as_fd(), 16 << 20).expect("sndbuf");
        crate::sys::kick_data_ready(c.as_fd()).expect("kick");
        let paired = Options::of(c.as_fd()).expect("read");
        assert_ne!(paired, before);
        assert_eq!(paired.buf_lock, Some(SOCK_SNDBUF_LOCK));
        before.apply(c.as_fd()).expect("restore");
        assert_eq!(Options::of(c.as_fd()).expect("read"), before);
        drop(s);
    }
}
