//! Parking (`zc_park`, a sock_ops program on this process's cgroup): the
//! verdict asks for it when a direction's reader lags, and `zc_park`
//! takes the socket out of `RELAY` under the socket's own lock, so its
//! bytes wait in its receive queue and TCP flow control holds its sender
//! without a byte entering user space. User space puts it back.
use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
    sync::atomic::Ordering,
};

use aya::maps::{HashMap, MapData};
use zc_common::SockKey;

use super::{LoadError, Programs, pairs::PairError};

impl Programs {
    /// Attaches `zc_park` to this process's cgroup (once) and tells it
    /// where a socket keeps its receive queue's length (BTF). Sockets
    /// join only through [`Self::park_ends`].
    pub fn enable_parking(&self) -> Result<(), LoadError> {
        if self.parking.load(Ordering::Relaxed) {
            return Ok(());
        }
        let err = |e: String| LoadError::Parking(e);
        let o = crate::btf::Offsets::of_running_kernel(&[
            ("sock", "sk_receive_queue"),
            ("sk_buff_head", "qlen"),
        ])
        .map_err(|e| err(format!("{e:#}")))?;
        let at = o
            .get("sock", "sk_receive_queue")
            .and_then(|a| Ok(a + o.get("sk_buff_head", "qlen")?))
            .map_err(|e| err(format!("{e:#}")))?;
        let cgroup = own_cgroup().map_err(err)?;
        let dir = std::fs::File::open(&cgroup)
            .map_err(|e| err(format!("opening {}: {e}", cgroup.display())))?;
        let mut ebpf = self.ebpf();
        let mut config: aya::maps::Array<_, u64> = aya::maps::Array::try_from(
            ebpf.map_mut("PARK_CONFIG")
                .ok_or(LoadError::MissingMap("PARK_CONFIG"))?,
        )
        .map_err(|e| LoadError::MapType("PARK_CONFIG", e))?;
        config
            .set(0, u64::from(at), 0)
            .map_err(|e| LoadError::MapType("PARK_CONFIG", e))?;
        let prog: &mut aya::programs::SockOps = ebpf
            .program_mut("zc_park")
            .ok_or(LoadError::MissingProgram("zc_park"))?
            .try_into()
            .map_err(|e| LoadError::Program("zc_park", e))?;
        prog.load().map_err(|e| LoadError::Program("zc_park", e))?;
        // A link: other programs on the cgroup stay, and it goes with
        // this process.
        prog.attach(&dir, aya::programs::CgroupAttachMode::Single)
            .map_err(|e| LoadError::Program("zc_park", e))?;
        self.parking.store(true, Ordering::Relaxed);
        log::debug!("parking on, in cgroup {}", cgroup.display());
        Ok(())
    }

    /// Whether [`Self::enable_parking`] succeeded.
    pub fn parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
    }

    /// Names the relay's ends to `zc_park`: sockets accepted on port
    /// `listen.port()`, and sockets connected to `upstream`. Only those
    /// can be parked; other sockets of the cgroup are left alone.
    pub fn park_ends(&self, listen: SocketAddr, upstream: SocketAddr) -> Result<(), LoadError> {
        let blank = |family| SockKey {
            netns: 0,
            family,
            local_port: 0,
            remote_port: 0,
            local_ip: [0; 4],
            remote_ip: [0; 4],
            pad: 0,
        };
        let mut ends = Vec::new();
        // An IPv6 listener may take IPv4 clients too (keyed as IPv4).
        for f in [zc_common::AF_INET, zc_common::AF_INET6] {
            if listen.is_ipv6() || f == zc_common::AF_INET {
                let mut k = blank(f);
                k.local_port = u32::from(listen.port());
                ends.push(k);
            }
        }
        // Keyed as the programs key it: an IPv4-mapped address as IPv4.
        let upstream = SocketAddr::new(upstream.ip().to_canonical(), upstream.port());
        let (f, ip, port) = crate::sys::addr_words(&upstream);
        let mut up = blank(f);
        up.remote_port = port;
        up.remote_ip = ip;
        ends.push(up);
        let mut ebpf = self.ebpf();
        let mut map: HashMap<_, SockKey, u8> = HashMap::try_from(
            ebpf.map_mut("PARK_ENDS")
                .ok_or(LoadError::MissingMap("PARK_ENDS"))?,
        )
        .map_err(|e| LoadError::MapType("PARK_ENDS", e))?;
        for k in ends {
            map.insert(k, 1, 0)
                .map_err(|e| LoadError::MapType("PARK_ENDS", e))?;
        }
        Ok(())
    }

    fn park_map<R>(
        &self,
        f: impl FnOnce(&mut HashMap<&mut MapData, SockKey, u64>) -> R,
    ) -> Option<R> {
        let mut ebpf = self.ebpf();
        let mut map: HashMap<_, SockKey, u64> = HashMap::try_from(ebpf.map_mut("PARK")?).ok()?;
        Some(f(&mut map))
    }

    /// Asks `zc_park` to take `key`'s socket out of `RELAY` so that user
    /// space reads it as a plain socket (no verdict run, no message per
    /// skb): the adaptive path's small segments. It acts at the socket's
    /// next segment with an empty receive queue (see [`crate::sys::nudge`]).
    /// A request already there (`--park`'s, or a park it made) stays: it
    /// ends as [`zc_common::PARKED`] too. False if the programs have no
    /// `PARK` map.
    pub fn park_to_read(&self, key: &SockKey) -> Result<bool, PairError> {
        let asked = |m: &mut HashMap<&mut MapData, SockKey, u64>| {
            m.insert(key, zc_common::PARK_TO_READ, NOEXIST)
        };
        match self.park_map(asked) {
            Some(Ok(())) => Ok(true),
            Some(Err(aya::maps::MapError::SyscallError(e)))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(true)
            }
            Some(Err(e)) => Err(PairError::map("PARK", e)),
            None => Ok(false),
        }
    }

    /// Counts `n` bytes user space read from `key`'s parked socket as if
    /// the verdict had passed them: `passed` (so the verdict, once the
    /// socket is back, finds them forwarded like any pass) and its
    /// sequence cursor (so a retransmission overlapping them is cut).
    /// Only the verdict writes `FLOW` otherwise, and it does not run for
    /// a socket out of `RELAY`.
    pub fn count_parked_read(&self, key: &SockKey, n: u64) -> Result<(), PairError> {
        let mut m = self.maps();
        let mut f = m.flow.get(key, 0).map_err(|e| PairError::map("FLOW", e))?;
        f.passed += n;
        f.passed_msgs += 1;
        if f.seq_known != 0 {
            // Sequence numbers wrap at 32 bits.
            f.next_seq = f.next_seq.wrapping_add(n as u32);
        }
        m.flow
            .insert(key, f, 0)
            .map_err(|e| PairError::map("FLOW", e))
    }

    /// Drops the park entries of `keys` (a pair that ended while parked
    /// leaves one, and a later socket may get the same key).
    pub(super) fn forget_parks(&self, keys: &[SockKey]) {
        self.park_map(|m| {
            for k in keys {
                let _ = m.remove(k);
            }
        });
    }

    /// `zc_common::PARK_ASKED`, `zc_common::PARK_TO_READ`,
    /// `zc_common::PARKED`, or 0.
    pub fn park_state(&self, key: &SockKey) -> u64 {
        self.park_map(|m| m.get(key, 0).unwrap_or(0)).unwrap_or(0)
    }

    /// Withdraws a park the verdict asked for, and puts the socket back
    /// in `RELAY` if it was parked, kicking the verdict to take what
    /// waits in its queue.
    pub fn unpark(&self, key: &SockKey, fd: BorrowedFd<'_>) -> Result<Unparked, PairError> {
        // Withdraw first: once the entry is gone nothing parks it.
        let _ = self.park_map(|m| m.remove(key));
        // Whether it was parked meanwhile, the map tells: a socket still in
        // RELAY is refused (its psock has the verdict: EBUSY).
        match self.maps().relay.insert(key, fd.as_raw_fd(), 1) {
            Ok(()) => {
                crate::sys::kick_data_ready(fd).map_err(PairError::Socket)?;
                Ok(Unparked::Back)
            }
            Err(aya::maps::MapError::SyscallError(e)) => match e.io_error.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EEXIST) => Ok(Unparked::NotParked),
                // A socket joins a sockmap only while established: its
                // remote end's FIN came while it was parked.
                Some(libc::EOPNOTSUPP) => Ok(Unparked::Stranded),
                _ => Err(PairError::map(
                    "RELAY",
                    aya::maps::MapError::SyscallError(e),
                )),
            },
            Err(e) => Err(PairError::map("RELAY", e)),
        }
    }
}

/// `BPF_NOEXIST`: an insert that leaves an entry already there.
const NOEXIST: u64 = 1;

/// What [`Programs::unpark`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unparked {
    /// It was parked and is back in `RELAY`.
    Back,
    /// It was not parked (a request withdrawn in time, or none).
    NotParked,
    /// It was parked and cannot go back: its remote end's FIN came
    /// meanwhile, and a socket that is no longer established cannot join
    /// a sockmap. What it keeps must be forwarded by user space.
    Stranded,
}

/// This process's cgroup (v2) directory.
fn own_cgroup() -> Result<std::path::PathBuf, String> {
    let s = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let path = s
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    let root = crate::host::cgroup2_root().map_err(|e| e.to_string())?;
    Ok(root.join(path.trim_start_matches('/')))
}
