//! Typed wrappers for the socket calls the engines need and std or socket2
//! do not offer. Each unsafe call lives here once.
use std::{
    io, mem,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use socket2::SockRef;
use zc_common::{AF_INET, AF_INET6, SockKey};

/// The `struct tcp_info` fields zc reads (a prefix of the kernel's layout,
/// include/uapi/linux/tcp.h; fields up to `tcpi_bytes_received` exist since
/// Linux 4.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpInfo {
    pub state: u8,
    pub ca_state: u8,
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    pub options: u8,
    pub wscale: u8,
    pub flags: u8,
    pub rto: u32,
    pub ato: u32,
    pub snd_mss: u32,
    pub rcv_mss: u32,
    pub unacked: u32,
    pub sacked: u32,
    pub lost: u32,
    pub retrans: u32,
    pub fackets: u32,
    pub last_data_sent: u32,
    pub last_ack_sent: u32,
    pub last_data_recv: u32,
    pub last_ack_recv: u32,
    pub pmtu: u32,
    pub rcv_ssthresh: u32,
    pub rtt: u32,
    pub rttvar: u32,
    pub snd_ssthresh: u32,
    pub snd_cwnd: u32,
    pub advmss: u32,
    pub reordering: u32,
    pub rcv_rtt: u32,
    pub rcv_space: u32,
    pub total_retrans: u32,
    pub pacing_rate: u64,
    pub max_pacing_rate: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut info = TcpInfo::default();
    let mut len = mem::size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: the buffer is a valid, writable TcpInfo of `len` bytes; the
    // kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < mem::size_of::<TcpInfo>() {
        return Err(io::Error::other(
            "kernel's tcp_info lacks byte counters (Linux < 4.1)",
        ));
    }
    Ok(info)
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCINQ/SIOCOUTQ write one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(v).unwrap_or(0))
}

/// Bytes written to a TCP socket and not yet acknowledged (SIOCOUTQ).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Bytes received and not yet read (SIOCINQ).
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Has the remote end's FIN arrived (the states after it, tcp_states.h)?
/// Not reliable for a socket in TCP_CLOSE, which may or may not have.
pub fn fin_received(info: &TcpInfo) -> bool {
    // TIME_WAIT 6, CLOSE_WAIT 8, LAST_ACK 9, CLOSING 11.
    matches!(info.state, 6 | 8 | 9 | 11)
}

/// [`fin_received`], or TCP_CLOSE (7) with no error pending: a socket
/// that closed gracefully both ways, which took the remote end's FIN (a
/// reset leaves an error, which callers check first).
pub fn fin_arrived(info: &TcpInfo) -> bool {
    fin_received(info) || info.state == 7
}

/// Has this end sent its FIN (shut for writing or closed): FIN_WAIT1 4,
/// FIN_WAIT2 5, TIME_WAIT 6, CLOSE 7, LAST_ACK 9, CLOSING 11?
pub fn fin_sent(info: &TcpInfo) -> bool {
    matches!(info.state, 4 | 5 | 6 | 7 | 9 | 11)
}

/// Data bytes that arrived on the socket in order, read or not. The
/// kernel's `tcpi_bytes_received` also counts the FIN's sequence number.
pub fn bytes_received(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = tcp_info(fd)?;
    Ok(info.bytes_received - u64::from(fin_received(&info)))
}

/// Bytes the application ever wrote into the socket: acknowledged plus
/// still queued. Read in this order so a concurrent ACK can only make the
/// sum too small, never too large (callers wait for it to reach a target).
///
/// Both counts are in sequence space, which may also hold the SYN (the
/// connecting side counts it, the accepting side does not, seen on 6.18)
/// and, once the write side is shut, the FIN. Callers compare two readings
/// taken before shutting down, never one reading with a byte count.
pub fn bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcp_info(fd)?.bytes_acked;
    Ok(acked + outq(fd)?)
}

/// A listening socket with a deep queue (4,096): a burst of clients must
/// wait for accept(), not be dropped by the kernel. std's and tokio's
/// listeners take 128; past that the kernel answers with SYN cookies, and
/// a connection whose cookie fails is reset though its client already
/// sent bytes (seen when a relay connected 1,000 times at once to a
/// server behind it).
pub fn listen_deep(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // [::] accepts IPv4 too unless told otherwise; keep the kernel's
        // default but make it explicit that v4-mapped peers are fine.
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// TCP_RTO_MAX_MS (include/uapi/linux/tcp.h, Linux 6.15); libc lacks it.
const TCP_RTO_MAX_MS: i32 = 44;

/// Caps a socket's retransmission timeout, and with it the exponential
/// backoff of retransmissions and zero-window probes (the kernel takes
/// 1 s to 120 s).
pub fn set_rto_max(fd: BorrowedFd<'_>, max: std::time::Duration) -> io::Result<()> {
    let ms = i32::try_from(max.as_millis()).unwrap_or(i32::MAX);
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_RTO_MAX_MS, ms)
}

/// Whether this kernel takes [`set_rto_max`] with `max`, tried on a
/// socket of its own.
pub fn probe_rto_max(max: std::time::Duration) -> io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    set_rto_max(s.as_fd(), max).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) => {
            io::Error::other("this kernel has no TCP_RTO_MAX_MS (it came in Linux 6.15)")
        }
        Some(libc::EINVAL) => io::Error::other("the kernel takes 1 s to 120 s"),
        _ => e,
    })
}

/// How long TCP retransmits to a silent peer before giving up, with the
/// retransmission timeout capped at `max`: net.ipv4.tcp_retries2 (15)
/// timeouts that double from 200 ms until they reach the cap
/// (`tcp_model_timeout`, net/ipv4/tcp_timer.c).
pub fn give_up_after(max: std::time::Duration) -> std::time::Duration {
    const RETRIES: u32 = 15;
    let base = std::time::Duration::from_millis(200);
    let doubling = (max.as_millis() / base.as_millis()).max(1).ilog2();
    if RETRIES <= doubling {
        return base * ((2 << RETRIES) - 1);
    }
    base * ((2 << doubling) - 1) + max * (RETRIES - doubling)
}

/// Reads an int socket option.
pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for the call to write an int into.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut val).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}

/// The socket's send buffer as the kernel keeps it (SO_SNDBUF: twice
/// what was asked for, or the autotuned size).
pub fn sndbuf(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let val = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    Ok(u64::try_from(val).unwrap_or(0))
}

/// Sets an int socket option.
pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, val: i32) -> io::Result<()> {
    // SAFETY: passes a valid int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const val).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Setting SO_RCVLOWAT makes TCP re-check readiness and call the socket's
/// data-ready hook (tcp_set_rcvlowat -> tcp_data_ready). A stream verdict
/// program attached after bytes were queued only sees them on the next
/// data-ready call, so this "kick" hands it the bytes already waiting.
pub fn kick_data_ready(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Sends nothing on a TCP socket: TCP still works out the segment size
/// it would use, which runs its sock_ops header-option callback (with
/// the socket locked), so a parking program gets a chance at once.
/// TCP works the size out before it checks the send side, so on a socket
/// already shut for writing (its direction's FIN passed on while the
/// other direction still flows) the callback runs too, and the EPIPE
/// that follows is no failure.
pub fn nudge(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::{
        errno::Errno,
        sys::socket::{MsgFlags, send},
    };
    match send(
        fd.as_raw_fd(),
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    ) {
        // EINVAL: the other direction had the socket in repair mode for
        // a moment (`announce_window`); the caller nudges again.
        Ok(_) | Err(Errno::EPIPE) | Err(Errno::EINVAL) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes an established TCP socket send a window probe now: an empty
/// segment that carries the receive window it has (TCP sends one as a
/// socket leaves repair mode, `tcp_send_window_probe`). With `open` > 0
/// the window reaches at least that far past the last one announced
/// (`TCP_REPAIR_WINDOW`), even when the socket's memory is past its
/// buffer and TCP would offer none. Needs CAP_NET_ADMIN (EPERM
/// without). While the socket is in repair mode, for these few calls,
/// sends and reads on it fail with EINVAL.
pub fn announce_window(fd: BorrowedFd<'_>, open: u32) -> io::Result<()> {
    const ON: i32 = 1; // TCP_REPAIR_ON
    const OFF: i32 = 0; // TCP_REPAIR_OFF: leave, sending the probe
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, ON)?;
    let widened = if open > 0 {
        repair_window(fd).and_then(|mut w| {
            if w.rcv_wnd >= open {
                return Ok(());
            }
            w.rcv_wnd = open;
            set_repair_window(fd, &w)
        })
    } else {
        Ok(())
    };
    // Left in repair mode the socket would refuse every send: try twice.
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, OFF)
        .or_else(|_| setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, OFF))?;
    widened
}

/// `struct tcp_repair_window` (include/uapi/linux/tcp.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

const TCP_REPAIR_WINDOW: i32 = 29;

/// The windows of a socket in repair mode.
pub fn repair_window(fd: BorrowedFd<'_>) -> io::Result<RepairWindow> {
    let mut w = RepairWindow::default();
    let mut len = mem::size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: the buffer is a writable RepairWindow of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            (&raw mut w).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(w)
}

/// Sets the windows of a socket in repair mode (TCP checks them against
/// what it has received).
pub fn set_repair_window(fd: BorrowedFd<'_>, w: &RepairWindow) -> io::Result<()> {
    // SAFETY: `w` is a RepairWindow, the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            (w as *const RepairWindow).cast(),
            mem::size_of::<RepairWindow>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TCP_WINDOW_CLAMP: the most receive window TCP will offer.
pub fn window_clamp(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP)
}

pub fn set_window_clamp(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// Copies what the socket holds into `buf` without taking it
/// (MSG_PEEK); `WouldBlock` when it holds nothing.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    recv(
        fd.as_raw_fd(),
        buf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)
}

/// Sets SO_RCVBUF (the kernel doubles it), forcing past `rmem_max` when
/// privileged.
pub fn set_rcvbuf(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let val = i32::try_from(bytes).unwrap_or(i32::MAX);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, val)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, val))
}

/// Sets the send buffer, above `net.core.wmem_max` when privileged
/// (SO_SNDBUFFORCE needs CAP_NET_ADMIN), else as far as allowed.
pub fn set_sndbuf(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let val = i32::try_from(bytes).unwrap_or(i32::MAX);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, val)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, val))
}

/// Two figures of a socket's SO_MEMINFO, in bytes with skb overhead.
#[derive(Debug, Clone, Copy)]
pub struct MemInfo {
    /// Received and not yet read (SK_MEMINFO_RMEM_ALLOC).
    pub rmem_alloc: u64,
    /// Queued to send, until acknowledged (SK_MEMINFO_WMEM_QUEUED).
    pub wmem_queued: u64,
}

/// SO_MEMINFO of `fd`.
pub fn meminfo(fd: BorrowedFd<'_>) -> io::Result<MemInfo> {
    let mut v = [0u32; 9];
    if getsockopt_u32s(fd, libc::SOL_SOCKET, libc::SO_MEMINFO, &mut v)? < 6 {
        return Err(io::Error::other("SO_MEMINFO came back short"));
    }
    Ok(MemInfo {
        rmem_alloc: u64::from(v[0]),
        wmem_queued: u64::from(v[5]),
    })
}

/// Reads a socket option made of u32s into `buf`; returns how many the
/// option holds. More than `buf.len()` means the kernel refused for lack
/// of room (ERANGE) and said how much it needs.
pub fn getsockopt_u32s(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    buf: &mut [u32],
) -> io::Result<usize> {
    let room = mem::size_of_val(buf);
    let mut len = room as libc::socklen_t;
    // SAFETY: the buffer holds `len` bytes, and the kernel writes at most
    // that many.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || len as usize <= room {
            return Err(e);
        }
    }
    Ok((len as usize).div_ceil(mem::size_of::<u32>()))
}

/// The windows of a TCP socket in bytes, from TCP_INFO (Linux 6.2 on;
/// None before): what its peer last offered it (`tcpi_snd_wnd`) and what
/// it last announced (`tcpi_rcv_wnd`).
pub fn windows(fd: BorrowedFd<'_>) -> io::Result<Option<(u32, u32)>> {
    // struct tcp_info holds 228 bytes before tcpi_snd_wnd, then rcv_wnd.
    const AT: usize = 228 / 4;
    let mut v = [0u32; AT + 2];
    let n = getsockopt_u32s(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut v)?;
    Ok((n > AT + 1).then_some((v[AT], v[AT + 1])))
}

/// The socket's receive buffer as the kernel keeps it (SO_RCVBUF: twice
/// what was asked for, or the autotuned size).
pub fn rcvbuf(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let val = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    Ok(u64::try_from(val).unwrap_or(0))
}

/// Moves the calling thread into the network namespace `f` refers to.
pub fn setns_net(f: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setns only reads the descriptor, which `f` keeps open.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Arms an abortive close: the next close() sends RST instead of FIN.
pub fn set_reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO))
}

/// Resets the connection now, however many processes hold the socket:
/// connect(2) with AF_UNSPEC disconnects a TCP socket, which sends RST
/// from any synchronised state (tcp_disconnect) and fails the owner's next
/// call with ECONNRESET. For sockets zc shares with their owner, where an
/// abortive close would wait for the owner's own close.
pub fn reset_now(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr with only its family set, of its size.
    let rc = unsafe {
        let mut sa: libc::sockaddr = std::mem::zeroed();
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            fd.as_raw_fd(),
            &sa,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The socket's cookie (SO_COOKIE): a number that names it for its whole
/// life, the same in every process and in eBPF programs.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    rustix::net::sockopt::socket_cookie(fd).map_err(io::Error::from)
}

/// The cookie of the socket's network namespace (SO_NETNS_COOKIE, which
/// neither nix nor rustix wraps), as `bpf_get_netns_cookie` gives it to
/// the eBPF programs.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v = 0u64;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Converts a socket address to the words the kernel's socket contexts
/// carry: network-order 32-bit words, the port in host order.
pub fn addr_words(addr: &SocketAddr) -> (u32, [u32; 4], u32) {
    match addr {
        SocketAddr::V4(a) => (
            AF_INET,
            [u32::from_ne_bytes(a.ip().octets()), 0, 0, 0],
            u32::from(a.port()),
        ),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (AF_INET6, [w(0), w(4), w(8), w(12)], u32::from(a.port()))
        }
    }
}

/// The map key of a connected TCP socket, as the eBPF programs compute it.
pub fn sock_key(fd: impl AsFd) -> io::Result<SockKey> {
    let sock = SockRef::from(&fd);
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    let peer = sock
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    let netns = netns_cookie(fd.as_fd())?;
    Ok(key_from_addrs(netns, &local, &peer))
}

/// The map key of a connection in the network namespace with cookie
/// `netns`, from its addresses; an IPv4-mapped IPv6 connection gets its
/// IPv4 key, as in the eBPF programs ([`SockKey::normalised`]).
pub fn key_from_addrs(netns: u64, local: &SocketAddr, remote: &SocketAddr) -> SockKey {
    let (family, local_ip, local_port) = addr_words(local);
    let (_, remote_ip, remote_port) = addr_words(remote);
    SockKey {
        netns,
        family,
        local_port,
        remote_port,
        local_ip,
        remote_ip,
        pad: 0,
    }
    .normalised()
}

/// The (local, remote) addresses a key was made from.
pub fn addrs_of_key(k: &SockKey) -> (SocketAddr, SocketAddr) {
    let addr = |ip: [u32; 4], port: u32| -> SocketAddr {
        let port = u16::try_from(port).unwrap_or(0);
        if k.family == AF_INET6 {
            let mut o = [0u8; 16];
            for (i, w) in ip.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            (std::net::Ipv6Addr::from(o), port).into()
        } else {
            (std::net::Ipv4Addr::from(ip[0].to_ne_bytes()), port).into()
        }
    };
    (
        addr(k.local_ip, k.local_port),
        addr(k.remote_ip, k.remote_port),
    )
}

/// The network interfaces of this namespace: (index, name).
pub fn interfaces() -> Vec<(u32, String)> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Length of the link-layer header an interface's frames start with, for
/// the link types zc knows: Ethernet and loopback 14, none (tun,
/// WireGuard) 0. Asked of the kernel (SIOCGIFHWADDR) in the calling
/// thread's network namespace, which /sys need not show.
pub fn link_header_len(name: &str) -> Option<u32> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes the hardware
    // address into the ifreq passed.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return None;
    }
    // SAFETY: the kernel filled the hardware-address member.
    match unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } {
        libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Some(14),
        libc::ARPHRD_NONE => Some(0),
        _ => None,
    }
}

/// The network namespace a socket belongs to (SIOCGSKNS): a descriptor
/// for it, and its inode number, which names it.
pub fn netns_of(fd: BorrowedFd<'_>) -> io::Result<(OwnedFd, u64)> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGSKNS) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just made for us.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    let ino = nix::sys::stat::fstat(&ns).map_err(io::Error::from)?.st_ino;
    Ok((ns, ino))
}

/// The inode number of this process's network namespace.
pub fn own_netns() -> io::Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(
        "/proc/self/ns/net",
    )?))
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn giving_up_takes_the_kernels_924_s_uncapped_and_14_s_at_1_s() {
        let ms = |s: u64| give_up_after(std::time::Duration::from_secs(s)).as_millis();
        assert_eq!(ms(120), 924_600);
        assert_eq!(ms(10), 112_600);
        assert_eq!(ms(1), 14_400);
    }

    #[test]
    fn keys_of_both_ends_mirror_each_other() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let kc = sock_key(&c).expect("key");
        let ks = sock_key(&s).expect("key");
        assert_eq!(kc.reversed(), ks);
        let (l, r) = addrs_of_key(&kc);
        assert_eq!(
            (l, r),
            (c.local_addr().expect("l"), c.peer_addr().expect("r"))
        );
        assert_eq!(kc.family, AF_INET);
        assert_eq!(kc.local_ip[0], u32::from_ne_bytes([127, 0, 0, 1]));
    }

    #[test]
    fn an_ipv4_mapped_socket_has_the_key_of_its_ipv4_peer() {
        let l = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .expect("socket");
        l.set_only_v6(false).expect("dual stack");
        l.bind(&"[::]:0".parse::<SocketAddr>().expect("addr").into())
            .expect("bind");
        l.listen(1).expect("listen");
        let port = l
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("port")
            .port();
        let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        assert!(s.local_addr().expect("local").is_ipv6(), "not mapped");
        let ks = sock_key(&s).expect("key");
        assert_eq!(ks.family, AF_INET);
        assert_eq!(sock_key(&c).expect("key").reversed(), ks);
    }

    #[test]
    fn written_bytes_count_what_was_sent() {
        use std::io::{Read, Write};
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        let before = [
            bytes_written(c.as_fd()).expect("written"),
            bytes_written(s.as_fd()).expect("written"),
        ];
        c.write_all(&[7u8; 1000]).expect("write");
        s.write_all(&[8u8; 10]).expect("write");
        let mut buf = [0u8; 1000];
        s.read_exact(&mut buf).expect("read");
        assert_eq!(bytes_written(c.as_fd()).expect("written") - before[0], 1000);
        assert_eq!(bytes_written(s.as_fd()).expect("written") - before[1], 10);
        assert_eq!(tcp_info(s.as_fd()).expect("info").bytes_received, 1000);
        assert_eq!(inq(s.as_fd()).expect("inq"), 0);
    }
}
