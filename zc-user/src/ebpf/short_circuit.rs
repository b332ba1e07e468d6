//! The same-host short-circuit (`zc_msg` on `LOCAL`; `zc_sockops` enrols
//! both ends of a local connection once it is on): what one end sends
//! goes straight into the other's receive queue.
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::{
    Ebpf,
    maps::{MapData, SockHash},
    programs::SkMsg,
};
use log::debug;
use zc_common::{PEER_LOCAL, SockKey};

use super::{
    LoadError, Programs,
    pairs::{PairError, map_insert_error, remove_locked},
};

/// What the same-host short-circuit carried (see
/// [`Programs::enable_short_circuit`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShortCircuitTotals {
    /// Bytes and sendmsg calls redirected, both directions together.
    pub bytes: u64,
    pub msgs: u64,
    /// Connections short-circuited since the programs were loaded.
    pub connections: u64,
    /// Connections short-circuited now.
    pub now: u64,
}

/// Loads `zc_msg` and attaches it to `LOCAL`.
pub(super) fn attach(ebpf: &mut Ebpf, local: &SockHash<MapData, SockKey>) -> Result<(), LoadError> {
    let msg: &mut SkMsg = ebpf
        .program_mut("zc_msg")
        .ok_or(LoadError::MissingProgram("zc_msg"))?
        .try_into()
        .map_err(|e| LoadError::Program("zc_msg", e))?;
    msg.load().map_err(|e| LoadError::Program("zc_msg", e))?;
    msg.attach(local.fd())
        .map_err(|e| LoadError::Program("zc_msg", e))?;
    Ok(())
}

impl Programs {
    /// Short-circuits the two ends of one local TCP connection: what either
    /// end sends goes straight into the other's receive queue.
    pub fn pair_local(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
    ) -> Result<[SockKey; 2], PairError> {
        let keys = [
            crate::sys::sock_key(a).map_err(PairError::Socket)?,
            crate::sys::sock_key(b).map_err(PairError::Socket)?,
        ];
        let mut m = self.prepare(PEER_LOCAL, keys, [0; 2], 0, [0; 2])?;
        for (k, fd) in keys.iter().zip([a, b]) {
            if let Err(e) = m.local.insert(k, fd.as_raw_fd(), 0) {
                remove_locked(&mut m, &keys);
                return Err(map_insert_error("LOCAL", *k, e));
            }
        }
        debug!("short-circuited {:?} <-> {:?}", keys[0], keys[1]);
        Ok(keys)
    }

    /// Turns on the same-host short-circuit in the recording program
    /// ([`Self::enable_recording`]): both ends of a connection to this
    /// host, both in the recorded cgroup (its listener opened there), join
    /// `LOCAL` as they are established, so what one end sends goes
    /// straight into the other's receive queue. A socket alone in `LOCAL`
    /// would lose splice(2) and FIONREAD, so no end joins without the
    /// other; the caller picks a cgroup that holds only programs that do
    /// neither (see `zc agent --short-circuit`).
    /// Needs the kernel's BTF for two `tcp_sock` offsets.
    pub fn enable_short_circuit(&self) -> Result<(), LoadError> {
        let sc = |e: anyhow::Error| LoadError::ShortCircuit(format!("{e:#}"));
        let o = crate::btf::Offsets::of_running_kernel(&[
            ("tcp_sock", "write_seq"),
            ("tcp_sock", "copied_seq"),
        ])
        .map_err(sc)?;
        let write_seq = o.get("tcp_sock", "write_seq").map_err(sc)?;
        let copied_seq = o.get("tcp_sock", "copied_seq").map_err(sc)?;
        let mut ebpf = self.ebpf();
        let mut config: aya::maps::Array<_, u64> = aya::maps::Array::try_from(
            ebpf.map_mut("SC_CONFIG")
                .ok_or(LoadError::MissingMap("SC_CONFIG"))?,
        )
        .map_err(|e| LoadError::MapType("SC_CONFIG", e))?;
        // Offsets first: the program reads them once it sees the switch.
        for (i, v) in [(1, write_seq), (2, copied_seq), (0, 1)] {
            config
                .set(i, u64::from(v), 0)
                .map_err(|e| LoadError::MapType("SC_CONFIG", e))?;
        }
        Ok(())
    }

    /// What the short-circuit carried so far, and how many connections it
    /// holds now.
    pub fn short_circuit_totals(&self) -> Option<ShortCircuitTotals> {
        let now = self
            .maps()
            .peers
            .iter()
            .flatten()
            .filter(|(_, p)| p.kind == PEER_LOCAL)
            .count()
            / 2;
        let ebpf = self.ebpf();
        let totals = aya::maps::PerCpuArray::<_, u64>::try_from(ebpf.map("SC_TOTALS")?).ok()?;
        let sum = |i| {
            totals
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        Some(ShortCircuitTotals {
            bytes: sum(0),
            msgs: sum(1),
            connections: sum(2),
            now: now as u64,
        })
    }

    /// Whether the socket named `key` is short-circuited (see
    /// [`Self::enable_short_circuit`]).
    pub fn short_circuited(&self, key: &SockKey) -> bool {
        self.maps()
            .peers
            .get(key, 0)
            .is_ok_and(|p| p.kind == PEER_LOCAL)
    }
}
