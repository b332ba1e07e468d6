//! TCP sockets' memory as the kernel accounts it, read with one sock_diag
//! dump per address family (what `ss -tm` prints), in the network
//! namespace the reader was opened in. Hand-written because the bench
//! needs one request and three fields of the answer; no crate in the tree
//! speaks sock_diag.
use std::os::fd::{AsRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};

use super::topology::{Netns, within};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_SKMEMINFO: u16 = 7;
const NLMSG_HDR: usize = 16;
/// nlmsghdr plus inet_diag_req_v2 (family, protocol, ext, pad, states,
/// and a 48-byte inet_diag_sockid left zero: every socket).
const REQUEST_LEN: usize = NLMSG_HDR + 56;
/// inet_diag_msg: 4 bytes of family/state/timer/retrans, the sockid, then
/// expires, rqueue, wqueue, uid and inode.
const DIAG_MSG_LEN: usize = 72;
/// Every TCP state (bits 1-11) except SYN_RECV (3) and TIME_WAIT (6): those
/// are request and timewait minisocks, owned by no process.
const STATES: u32 = 0xffe & !((1 << 3) | (1 << 6));

/// One socket's memory (`SK_MEMINFO_RMEM_ALLOC` and `_WMEM_QUEUED`, bytes
/// with skb overhead, as TCP charges them against its limits).
#[derive(Clone, Copy, Debug)]
pub struct SockMem {
    pub inode: u32,
    pub rmem_alloc: u64,
    pub wmem_queued: u64,
}

impl SockMem {
    pub fn bytes(&self) -> u64 {
        self.rmem_alloc + self.wmem_queued
    }
}

pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl SockDiag {
    /// A sock_diag socket in `ns` (here if None): it sees that
    /// namespace's sockets, whichever namespace the caller is in later.
    pub fn open(ns: Option<&Netns>) -> Result<Self> {
        let fd = within(ns, || {
            socket(
                AddressFamily::Netlink,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkSockDiag,
            )
        })?
        .context("opening a sock_diag netlink socket")?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; 64 << 10],
        })
    }

    /// Every TCP socket of the namespace that a process can own.
    pub fn tcp_sockets(&mut self) -> Result<Vec<SockMem>> {
        let mut out = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            self.dump(family as u8, &mut out)
                .with_context(|| format!("sock_diag dump of family {family}"))?;
        }
        Ok(out)
    }

    fn dump(&mut self, family: u8, out: &mut Vec<SockMem>) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = Vec::with_capacity(REQUEST_LEN);
        req.extend_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
        req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[
            family,
            libc::IPPROTO_TCP as u8,
            1 << (INET_DIAG_SKMEMINFO - 1),
            0,
        ]);
        req.extend_from_slice(&STATES.to_ne_bytes());
        req.resize(REQUEST_LEN, 0);
        send(self.fd.as_raw_fd(), &req, MsgFlags::empty()).context("sending the request")?;
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())
                .context("reading the reply")?;
            let mut msgs = &self.buf[..n];
            while msgs.len() >= NLMSG_HDR {
                let len = u32_at(msgs, 0) as usize;
                let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
                if len < NLMSG_HDR || len > msgs.len() {
                    bail!("malformed netlink message ({len} bytes of {})", msgs.len());
                }
                // A reply to an earlier, abandoned dump is skipped.
                if u32_at(msgs, 8) == self.seq {
                    let body = &msgs[NLMSG_HDR..len];
                    match kind {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let errno = body.get(..4).map_or(0, |b| u32_at(b, 0) as i32);
                            bail!(std::io::Error::from_raw_os_error(-errno));
                        }
                        SOCK_DIAG_BY_FAMILY => out.extend(parse(body)),
                        _ => {}
                    }
                }
                msgs = &msgs[align4(len).min(msgs.len())..];
            }
        }
    }
}

fn parse(body: &[u8]) -> Option<SockMem> {
    if body.len() < DIAG_MSG_LEN {
        return None;
    }
    let mut mem = SockMem {
        inode: u32_at(body, 68),
        rmem_alloc: 0,
        wmem_queued: 0,
    };
    let mut attrs = &body[DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        // SK_MEMINFO_RMEM_ALLOC is the first u32, _WMEM_QUEUED the sixth.
        if kind == INET_DIAG_SKMEMINFO && len >= 4 + 24 {
            mem.rmem_alloc = u64::from(u32_at(attrs, 4));
            mem.wmem_queued = u64::from(u32_at(attrs, 4 + 20));
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Some(mem)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}
