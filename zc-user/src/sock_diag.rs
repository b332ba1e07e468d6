//! TCP sockets' memory as the kernel accounts it (what `ss -tm` prints),
//! read with sock_diag in the network namespace the reader was opened
//! in: a dump per address family finds the sockets, and a lookup by a
//! socket's own identity reads one again. A dump walks the host's whole
//! TCP hash table, which took about 5% of this 2-CPU machine when the
//! bench dumped every 50 ms; a lookup reads one bucket. Hand-written
//! because zc needs a few fields; no crate in the tree speaks sock_diag.
//! The bench samples relays with it; `zc relay --metrics` sums its own
//! sockets.
use std::os::fd::{AsRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_SKMEMINFO: u16 = 7;
const NLMSG_HDR: usize = 16;
/// nlmsghdr plus inet_diag_req_v2 (family, protocol, ext, pad, states,
/// and a 48-byte inet_diag_sockid: zero for a dump of every socket, or
/// one socket's for a lookup).
const REQUEST_LEN: usize = NLMSG_HDR + 56;
/// inet_diag_sockid: ports, addresses, interface and cookie.
const SOCKID_LEN: usize = 48;
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
    /// Address family and inet_diag_sockid: what a lookup asks for.
    family: u8,
    id: [u8; SOCKID_LEN],
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
    /// A sock_diag socket in the caller's network namespace: it sees that
    /// namespace's sockets, whichever namespace the caller is in later.
    pub fn open() -> Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
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
            let req = self.request(family as u8, libc::NLM_F_DUMP as u16, &[0; SOCKID_LEN]);
            self.exchange(&req, true, &mut out)
                .with_context(|| format!("sock_diag dump of family {family}"))?;
        }
        Ok(out)
    }

    /// The sockets of `known` (as an earlier read returned them) as they
    /// are now; one that is gone is left out.
    pub fn again(&mut self, known: &[SockMem]) -> Result<Vec<SockMem>> {
        let mut out = Vec::with_capacity(known.len());
        for k in known {
            let req = self.request(k.family, 0, &k.id);
            match self.exchange(&req, false, &mut out) {
                Ok(()) => {}
                // Gone, or its identity now names another socket.
                Err(e)
                    if matches!(
                        e.downcast_ref::<std::io::Error>()
                            .and_then(std::io::Error::raw_os_error),
                        Some(libc::ENOENT | libc::ESTALE)
                    ) => {}
                Err(e) => return Err(e.context("sock_diag lookup of one socket")),
            }
        }
        Ok(out)
    }

    fn request(&mut self, family: u8, flags: u16, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = Vec::with_capacity(REQUEST_LEN);
        req.extend_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
        req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req.extend_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[
            family,
            libc::IPPROTO_TCP as u8,
            1 << (INET_DIAG_SKMEMINFO - 1),
            0,
        ]);
        req.extend_from_slice(&STATES.to_ne_bytes());
        req.extend_from_slice(id);
        req
    }

    /// Sends `req` and collects its answer: a dump's messages up to its
    /// end, or a lookup's one message.
    fn exchange(&mut self, req: &[u8], dump: bool, out: &mut Vec<SockMem>) -> Result<()> {
        send(self.fd.as_raw_fd(), req, MsgFlags::empty()).context("sending the request")?;
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
                // A reply to an earlier, abandoned request is skipped.
                if u32_at(msgs, 8) == self.seq {
                    let body = &msgs[NLMSG_HDR..len];
                    match kind {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let errno = body.get(..4).map_or(0, |b| u32_at(b, 0) as i32);
                            bail!(std::io::Error::from_raw_os_error(-errno));
                        }
                        SOCK_DIAG_BY_FAMILY => {
                            out.extend(parse(body));
                            if !dump {
                                return Ok(());
                            }
                        }
                        _ => {}
                    }
                }
                msgs = &msgs[align4(len).min(msgs.len())..];
            }
        }
    }
}

/// Kernel memory of this process's own TCP sockets (received and queued
/// to send, with skb overhead): its socket inodes, matched against a
/// dump of its network namespace.
pub fn own_socket_memory() -> Result<u64> {
    let inodes = socket_inodes(&["self"]);
    let all = SockDiag::open()?.tcp_sockets()?;
    Ok(all
        .iter()
        .filter(|s| inodes.contains(&s.inode))
        .map(SockMem::bytes)
        .sum())
}

/// Inodes of the sockets the processes (pids, or "self") hold open, from
/// their `socket:[N]` fd links. A process that is gone, or an fd closed
/// meanwhile, adds nothing.
pub fn socket_inodes(pids: &[impl std::fmt::Display]) -> std::collections::HashSet<u32> {
    let mut out = std::collections::HashSet::new();
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            if let Some(ino) = std::fs::read_link(e.path()).ok().and_then(|t| {
                t.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            }) {
                out.insert(ino);
            }
        }
    }
    out
}

fn parse(body: &[u8]) -> Option<SockMem> {
    if body.len() < DIAG_MSG_LEN {
        return None;
    }
    let mut id = [0u8; SOCKID_LEN];
    id.copy_from_slice(&body[4..4 + SOCKID_LEN]);
    let mut mem = SockMem {
        inode: u32_at(body, 68),
        rmem_alloc: 0,
        wmem_queued: 0,
        family: body[0],
        id,
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

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// The inode of a socket, as its /proc/self/fd link names it.
    fn inode(s: &impl std::os::fd::AsRawFd) -> u32 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).expect("fd link");
        link.to_str()
            .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .expect("a socket inode")
    }

    /// A lookup reads the same socket a dump found, with what it holds
    /// now, and leaves out one that has closed.
    #[test]
    fn a_lookup_reads_what_a_dump_found() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let mut diag = SockDiag::open().expect("sock_diag");
        let ino = inode(&server);
        let found: Vec<SockMem> = diag
            .tcp_sockets()
            .expect("dump")
            .into_iter()
            .filter(|s| s.inode == ino)
            .collect();
        assert_eq!(found.len(), 1, "the dump finds the server's socket");
        assert_eq!(found[0].rmem_alloc, 0, "nothing received yet");

        // Unread bytes are charged to the server's receive buffer.
        client.write_all(&[7u8; 100_000]).expect("write");
        let mut again = Vec::new();
        for _ in 0..1000 {
            again = diag.again(&found).expect("lookup");
            if again.first().is_some_and(|s| s.rmem_alloc >= 100_000) {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(again.len(), 1, "the lookup finds the same socket");
        assert_eq!(again[0].inode, ino);
        assert!(
            again[0].rmem_alloc >= 100_000,
            "the lookup sees the unread bytes: {again:?}"
        );

        drop(server);
        drop(client);
        drop(listener);
        // Closed: TIME_WAIT or gone, and either way not this socket.
        let left = diag.again(&found).expect("lookup of a closed socket");
        assert!(left.iter().all(|s| s.inode != ino), "{left:?}");
    }
}
