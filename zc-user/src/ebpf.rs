//! Loads zc's eBPF object into the kernel and exposes its maps as typed
//! operations. One [`Programs`] value owns every kernel object it created;
//! dropping it detaches the programs and frees the maps.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{Arc, Mutex, MutexGuard},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, RingBuf, SockHash},
    programs::{SchedClassifier, SkMsg, SkSkb, TcAttachType, links::FdLink},
};
use log::{debug, warn};
use zc_common::{Counters, Flow, PEER_LOCAL, PEER_RELAY, Peer, Recorded, SockKey};

/// The object built from `zc-ebpf` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zc-ebpf"));

/// Why the programs could not be made ready. Callers branch on it to pick
/// a fallback and to tell the user what is missing.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this zc binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("loading the eBPF object failed (needs root, or CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map `{0}` is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map `{0}` has an unexpected type: {1}")]
    MapType(&'static str, #[source] aya::maps::MapError),
    #[error("the FIN hold is unavailable: {0}")]
    Hold(String),
    #[error("recording sockets is unavailable: {0}")]
    Recording(String),
    #[error("the short-circuit is unavailable: {0}")]
    ShortCircuit(String),
    #[error("loading or attaching program `{0}` failed: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
}

/// Failure of one pairing operation.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("socket {0:?} is already paired")]
    AlreadyPaired(SockKey),
    #[error("both ends are the same socket")]
    SameSocket,
    #[error(
        "socket {0:?} is short-circuited (the agent's --short-circuit): what its peer sends \
         arrives without TCP, where no redirect sees it"
    )]
    ShortCircuited(SockKey),
    #[error(
        "socket {0:?} is not an established TCP connection (it closed, or its remote end finished, before pairing)"
    )]
    NotEstablished(SockKey),
    #[error("reading the socket's addresses failed: {0}")]
    Socket(#[source] std::io::Error),
    #[error("updating map `{0}` failed: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
}

struct Maps {
    targets: SockHash<MapData, SockKey>,
    relay: SockHash<MapData, SockKey>,
    foreign: SockHash<MapData, SockKey>,
    local: SockHash<MapData, SockKey>,
    peers: HashMap<MapData, SockKey, Peer>,
    flow: HashMap<MapData, SockKey, Flow>,
    forwarded: HashMap<MapData, SockKey, u64>,
    counters: PerCpuHashMap<MapData, SockKey, Counters>,
    guarded: HashMap<MapData, SockKey, SockKey>,
    recorded: HashMap<MapData, SockKey, Recorded>,
}

type Listeners = std::collections::HashMap<SockKey, tokio::sync::mpsc::UnboundedSender<SockKey>>;

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

/// What [`Programs::pair_relay`] set up.
#[derive(Clone, Copy, Debug)]
pub struct RelayPairing {
    pub keys: [SockKey; 2],
    /// Whether each socket's arriving bytes are redirected by the kernel.
    /// `false` when its remote end finished sending (or failed) between
    /// joining `TARGETS` and joining `RELAY`: TCP then leaves the
    /// established state and the kernel refuses the socket. The caller
    /// copies that direction itself; the other still runs in the kernel.
    pub in_relay: [bool; 2],
}

/// The loaded programs and their maps. Cheap to clone; all clones share
/// the same kernel objects.
#[derive(Clone)]
pub struct Programs {
    inner: Arc<Mutex<Maps>>,
    listeners: Arc<Mutex<Listeners>>,
    /// Set when pairs must outlive this process (a pinned agent stopping
    /// without --unpin-on-exit): ending relays then leave the maps alone.
    retain: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes the programs redirected for pairs that have been removed, so
    /// [`Self::kernel_bytes`] covers ended pairs too.
    retired: Arc<std::sync::atomic::AtomicU64>,
    /// Interfaces the FIN hold has looked at (attached or skipped).
    hold_ifaces: Arc<Mutex<std::collections::HashSet<u32>>>,
    /// Where the maps are pinned ([`Self::load_pinned`]); the FIN hold's
    /// links are pinned there too, so it outlives this process with the
    /// pairs it protects.
    pin_dir: Option<std::path::PathBuf>,
    // Keeps programs and their attachments alive; dropped last.
    _ebpf: Arc<Mutex<Ebpf>>,
    /// Ring buffers no tokio runtime could drain (loaded outside one):
    /// kept, so their maps, which the programs reference, stay open.
    _undrained: Arc<Mutex<Vec<Box<dyn Send>>>>,
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoadError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    M::try_from(map).map_err(|e| LoadError::MapType(name, e))
}

impl Programs {
    /// Loads the object, attaches `zc_verdict` to `RELAY` and `zc_msg` to
    /// `LOCAL`, and starts forwarding eBPF-side logs to `log`.
    pub fn load() -> Result<Self, LoadError> {
        Self::load_with(&mut EbpfLoader::new())
    }

    /// Like [`Self::load`], with every map that holds pairing state pinned
    /// under `dir` (bpffs). Maps already pinned there are reused, so pairs
    /// made by an earlier process keep working and can be adopted.
    pub fn load_pinned(dir: &std::path::Path) -> Result<Self, LoadError> {
        let paths: Vec<(&'static str, std::path::PathBuf)> =
            PINNED.iter().map(|n| (*n, dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut progs = Self::load_with(&mut loader)?;
        progs.pin_dir = Some(dir.to_path_buf());
        Ok(progs)
    }

    fn load_with(loader: &mut EbpfLoader<'_>) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let mut ebpf = loader.load(OBJECT).map_err(LoadError::Load)?;
        let mut undrained: Vec<Box<dyn Send>> = Vec::new();
        if let Some(logger) = start_log_forwarding(&mut ebpf) {
            undrained.push(Box::new(logger));
        }
        let targets: SockHash<MapData, SockKey> = take(&mut ebpf, "TARGETS")?;
        let relay: SockHash<MapData, SockKey> = take(&mut ebpf, "RELAY")?;
        let foreign: SockHash<MapData, SockKey> = take(&mut ebpf, "FOREIGN")?;
        let local: SockHash<MapData, SockKey> = take(&mut ebpf, "LOCAL")?;
        let peers = take(&mut ebpf, "PEERS")?;
        let flow = take(&mut ebpf, "FLOW")?;
        let forwarded = take(&mut ebpf, "FORWARDED")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let events: RingBuf<MapData> = take(&mut ebpf, "EVENTS")?;
        let guarded = take(&mut ebpf, "GUARDED")?;
        let recorded = take(&mut ebpf, "RECORDED")?;
        let listeners = Arc::new(Mutex::new(Listeners::new()));
        if let Some(events) = start_event_forwarding(events, listeners.clone()) {
            undrained.push(Box::new(events));
        }

        attach_skb(&mut ebpf, "zc_verdict", &relay)?;
        attach_skb(&mut ebpf, "zc_verdict_parsed", &foreign)?;
        attach_skb(&mut ebpf, "zc_parser", &foreign)?;
        configure_skb_offsets(&mut ebpf);

        let msg: &mut SkMsg = ebpf
            .program_mut("zc_msg")
            .ok_or(LoadError::MissingProgram("zc_msg"))?
            .try_into()
            .map_err(|e| LoadError::Program("zc_msg", e))?;
        msg.load().map_err(|e| LoadError::Program("zc_msg", e))?;
        msg.attach(local.fd())
            .map_err(|e| LoadError::Program("zc_msg", e))?;

        Ok(Self {
            inner: Arc::new(Mutex::new(Maps {
                targets,
                relay,
                foreign,
                local,
                peers,
                flow,
                forwarded,
                counters,
                guarded,
                recorded,
            })),
            listeners,
            retain: Arc::default(),
            retired: Arc::default(),
            hold_ifaces: Arc::default(),
            pin_dir: None,
            _ebpf: Arc::new(Mutex::new(ebpf)),
            _undrained: Arc::new(Mutex::new(undrained)),
        })
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way the kernel cares about, so keep going after poisoning.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins two connected TCP sockets so that what arrives on one leaves
    /// through the other, in the kernel.
    ///
    /// Order matters. Both sockets first join `TARGETS` (no programs, so
    /// nothing changes for them) and get their `PEERS` entries; only then
    /// does each join `RELAY`, whose verdict program redirects into
    /// `TARGETS`. So a redirect never finds its peer missing, and bytes
    /// that arrive meanwhile simply wait in the receive queue. Joining
    /// `RELAY` does not process bytes already queued, so each socket is
    /// then kicked (see [`crate::sys::kick_data_ready`]).
    ///
    /// The kernel only accepts established sockets. If one is refused at
    /// the `TARGETS` step nothing has moved yet: everything is undone and
    /// [`PairError::NotEstablished`] returned. A refusal at the `RELAY`
    /// step is reported in [`RelayPairing::in_relay`].
    ///
    /// With a non-zero `window`, the verdict program reports each socket
    /// on [`Programs::limit_events`] once it has redirected `window` bytes
    /// (see [`Programs::rearm`]).
    pub fn pair_relay(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        window: u64,
    ) -> Result<RelayPairing, PairError> {
        self.pair_in(false, a, b, window)
    }

    /// [`Self::pair_relay`] for sockets another process owns and reads:
    /// they join `FOREIGN`, where a stream parser keeps the kernel from
    /// waking the owner's reads after each redirect.
    pub fn pair_foreign(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        window: u64,
    ) -> Result<RelayPairing, PairError> {
        // An interface may have appeared since the last pairing.
        self.refresh_fin_hold();
        self.pair_in(true, a, b, window)
    }

    fn pair_in(
        &self,
        foreign: bool,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        window: u64,
    ) -> Result<RelayPairing, PairError> {
        let keys = [
            crate::sys::sock_key(a).map_err(PairError::Socket)?,
            crate::sys::sock_key(b).map_err(PairError::Socket)?,
        ];
        let fds = [a, b];
        let mut m = self.prepare(PEER_RELAY, keys, window)?;
        for i in 0..2 {
            if let Err(e) = m.targets.insert(keys[i], fds[i].as_raw_fd(), 0) {
                remove_locked(&mut m, &keys);
                return Err(map_insert_error("TARGETS", keys[i], e));
            }
        }
        let mut in_relay = [false; 2];
        let name = if foreign { "FOREIGN" } else { "RELAY" };
        for i in 0..2 {
            let map = if foreign {
                &mut m.foreign
            } else {
                &mut m.relay
            };
            match map.insert(keys[i], fds[i].as_raw_fd(), 0) {
                Ok(()) => in_relay[i] = true,
                Err(e) => match map_insert_error(name, keys[i], e) {
                    PairError::NotEstablished(_) => {}
                    other => {
                        remove_locked(&mut m, &keys);
                        return Err(other);
                    }
                },
            }
        }
        if foreign {
            // Hold FINs before the kick: from here on the proxy may see EOF.
            for i in 0..2 {
                if let Err(e) = m.guarded.insert(keys[i], keys[1 - i], 0) {
                    remove_locked(&mut m, &keys);
                    return Err(PairError::Map("GUARDED", e));
                }
            }
        }
        drop(m);
        for i in 0..2 {
            if in_relay[i]
                && let Err(e) = crate::sys::kick_data_ready(fds[i])
            {
                warn!("kicking a newly paired socket failed: {e}");
            }
        }
        debug!(
            "paired {:?} <-> {:?} (in kernel: {in_relay:?})",
            keys[0], keys[1]
        );
        Ok(RelayPairing { keys, in_relay })
    }

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
        let mut m = self.prepare(PEER_LOCAL, keys, 0)?;
        for (k, fd) in keys.iter().zip([a, b]) {
            if let Err(e) = m.local.insert(k, fd.as_raw_fd(), 0) {
                remove_locked(&mut m, &keys);
                return Err(map_insert_error("LOCAL", *k, e));
            }
        }
        debug!("short-circuited {:?} <-> {:?}", keys[0], keys[1]);
        Ok(keys)
    }

    /// Checks the keys and writes the `COUNTERS` and `PEERS` entries;
    /// returns the locked maps for the socket inserts.
    fn prepare(
        &self,
        kind: u32,
        [ka, kb]: [SockKey; 2],
        window: u64,
    ) -> Result<MutexGuard<'_, Maps>, PairError> {
        if ka == kb {
            return Err(PairError::SameSocket);
        }
        let mut m = self.maps();
        for k in [&ka, &kb] {
            if let Ok(p) = m.peers.get(k, 0) {
                if p.kind == PEER_LOCAL && kind != PEER_LOCAL {
                    return Err(PairError::ShortCircuited(*k));
                }
                return Err(PairError::AlreadyPaired(*k));
            }
        }
        let result = (|| {
            for k in [&ka, &kb] {
                let zero = aya::maps::PerCpuValues::try_from(vec![Counters::default(); nr_cpus()])
                    .map_err(PairError::Socket)?;
                m.counters
                    .insert(k, zero, 0)
                    .map_err(|e| PairError::Map("COUNTERS", e))?;
            }
            for k in [&ka, &kb] {
                m.flow
                    .insert(k, Flow::default(), 0)
                    .map_err(|e| PairError::Map("FLOW", e))?;
                m.forwarded
                    .insert(k, 0, 0)
                    .map_err(|e| PairError::Map("FORWARDED", e))?;
            }
            let peer = |key| Peer {
                key,
                kind,
                armed: u32::from(window > 0),
                hold: 0,
                limit: window / 2,
                msg_limit: u64::MAX,
                cap: 2 * window,
            };
            m.peers
                .insert(ka, peer(kb), 0)
                .map_err(|e| PairError::Map("PEERS", e))?;
            m.peers
                .insert(kb, peer(ka), 0)
                .map_err(|e| PairError::Map("PEERS", e))
        })();
        if let Err(e) = result {
            remove_locked(&mut m, &[ka, kb]);
            return Err(e);
        }
        Ok(m)
    }

    /// Loads `zc_fin_hold` and attaches it to the ingress of every network
    /// interface (tcx links, which leave other tc programs alone): from
    /// now on a FIN for a socket paired with [`Self::pair_foreign`] waits
    /// until its peer has taken every redirected byte. Needs the kernel's
    /// BTF for two struct offsets.
    pub fn enable_fin_hold(&self) -> Result<(), LoadError> {
        let hold = |e: anyhow::Error| LoadError::Hold(format!("{e:#}"));
        let o = crate::btf::Offsets::of_running_kernel(&[
            ("sock", "sk_user_data"),
            ("sk_psock", "ingress_skb"),
            ("sk_buff_head", "qlen"),
        ])
        .map_err(hold)?;
        let user_data = o.get("sock", "sk_user_data").map_err(hold)?;
        let qlen = o.get("sk_psock", "ingress_skb").map_err(hold)?
            + o.get("sk_buff_head", "qlen").map_err(hold)?;
        let mut ebpf = self._ebpf.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut config: aya::maps::Array<_, u64> = aya::maps::Array::try_from(
                ebpf.map_mut("HOLD_CONFIG")
                    .ok_or(LoadError::MissingMap("HOLD_CONFIG"))?,
            )
            .map_err(|e| LoadError::MapType("HOLD_CONFIG", e))?;
            for (i, v) in [(0, user_data), (1, qlen)] {
                config
                    .set(i, u64::from(v), 0)
                    .map_err(|e| LoadError::MapType("HOLD_CONFIG", e))?;
            }
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut("zc_fin_hold")
            .ok_or(LoadError::MissingProgram("zc_fin_hold"))?
            .try_into()
            .map_err(|e| LoadError::Program("zc_fin_hold", e))?;
        prog.load()
            .map_err(|e| LoadError::Program("zc_fin_hold", e))?;
        drop(ebpf);
        // An earlier agent's hold, kept by its pins, gives way to this one.
        if let Some(dir) = &self.pin_dir {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(HOLD_LINK_PREFIX)
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.refresh_fin_hold();
        Ok(())
    }

    /// Attaches the FIN hold to interfaces that appeared since it was
    /// enabled (a no-op when it is not). Interfaces whose link-layer
    /// header length is unknown are skipped, with a warning.
    pub fn refresh_fin_hold(&self) {
        let mut ebpf = self._ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Ok(prog)) = ebpf
            .program_mut("zc_fin_hold")
            .map(<&mut SchedClassifier>::try_from)
        else {
            return;
        };
        if prog.fd().is_err() {
            return;
        }
        let mut attached = self.hold_ifaces.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = Vec::new();
        for (index, name) in crate::sys::interfaces() {
            if attached.contains(&index) {
                continue;
            }
            let Some(l2) = crate::sys::link_header_len(&name) else {
                warn!("FIN hold: interface {name} has an unknown link type, not attached");
                attached.insert(index);
                continue;
            };
            match prog.attach(&name, TcAttachType::Ingress) {
                Ok(id) => {
                    debug!("FIN hold attached to {name}");
                    fresh.push((index, l2));
                    if let Some(dir) = &self.pin_dir {
                        let path = dir.join(format!("{HOLD_LINK_PREFIX}{index}"));
                        let pinned = prog
                            .take_link(id)
                            .map_err(|e| format!("{e:#}"))
                            .and_then(|l| FdLink::try_from(l).map_err(|e| format!("{e:#}")))
                            .and_then(|l| l.pin(&path).map_err(|e| format!("{e:#}")));
                        if let Err(e) = pinned {
                            // The failed pin dropped the link: attach again,
                            // held by this process only.
                            warn!(
                                "FIN hold on {name}: pinning its link at {} failed ({e}); \
                                 it ends with this process",
                                path.display()
                            );
                            if let Err(e) = prog.attach(&name, TcAttachType::Ingress) {
                                warn!("FIN hold: attaching to {name} failed: {e}");
                            }
                        }
                    }
                }
                Err(e) => warn!("FIN hold: attaching to {name} failed: {e}"),
            }
            attached.insert(index);
        }
        if fresh.is_empty() {
            return;
        }
        let Some(map) = ebpf.map_mut("HOLD_IFACES") else {
            return;
        };
        let Ok(mut ifaces) = HashMap::<_, u32, u32>::try_from(map) else {
            return;
        };
        for (index, l2) in fresh {
            if let Err(e) = ifaces.insert(index, l2, 0) {
                warn!("FIN hold: recording interface {index} failed: {e}");
            }
        }
    }

    /// Turns on the same-host short-circuit in the recording program
    /// ([`Self::enable_recording`]): both ends of a connection to this
    /// host, in the recorded cgroup, join `LOCAL` as they are established,
    /// so what one end sends goes straight into the other's receive queue.
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
        let mut ebpf = self._ebpf.lock().unwrap_or_else(|p| p.into_inner());
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
        let ebpf = self._ebpf.lock().unwrap_or_else(|p| p.into_inner());
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

    /// What the FIN hold did so far: bare FINs dropped until the peer's
    /// queue emptied, and FINs taken off data segments.
    pub fn fin_hold_counts(&self) -> Option<(u64, u64)> {
        let ebpf = self._ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let stats = aya::maps::PerCpuArray::<_, u64>::try_from(ebpf.map("HOLD_STATS")?).ok()?;
        let sum = |i| stats.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        Some((sum(0), sum(1)))
    }

    /// Attaches `zc_sockops` to the cgroup v2 directory `cgroup`: sockets
    /// established there from now on are recorded by 4-tuple (see
    /// [`Self::recorded`]). It attaches as a BPF link, which coexists with
    /// other links on the cgroup (link_create refuses the multi flag).
    pub fn enable_recording(&self, cgroup: &std::path::Path) -> Result<(), LoadError> {
        let dir = std::fs::File::open(cgroup)
            .map_err(|e| LoadError::Recording(format!("opening {}: {e}", cgroup.display())))?;
        let mut ebpf = self._ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let prog: &mut aya::programs::SockOps = ebpf
            .program_mut("zc_sockops")
            .ok_or(LoadError::MissingProgram("zc_sockops"))?
            .try_into()
            .map_err(|e| LoadError::Program("zc_sockops", e))?;
        prog.load()
            .map_err(|e| LoadError::Program("zc_sockops", e))?;
        prog.attach(&dir, aya::programs::CgroupAttachMode::Single)
            .map_err(|e| LoadError::Program("zc_sockops", e))?;
        Ok(())
    }

    /// The established socket recorded under `key`, if any.
    pub fn recorded(&self, key: &SockKey) -> Option<Recorded> {
        self.maps().recorded.get(key, 0).ok()
    }

    /// From now on, relays that end leave their pairs in the maps (see
    /// [`Self::unpair_ended`]).
    pub fn retain_pairs(&self) {
        self.retain
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// For a relay that ended: removes its pair unless pairs are retained.
    pub fn unpair_ended(&self, keys: &[SockKey]) {
        if !self.retain.load(std::sync::atomic::Ordering::Relaxed) {
            self.unpair(keys);
        }
    }

    /// Relay pairs present in the maps, each once, in key order: also
    /// those made by an earlier process on the same pinned maps.
    pub fn relay_pairs(&self) -> Vec<[SockKey; 2]> {
        let m = self.maps();
        let mut out: Vec<[SockKey; 2]> = m
            .peers
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, p)| p.kind == PEER_RELAY && key_bytes(k) < key_bytes(&p.key))
            .map(|(k, p)| [k, p.key])
            .collect();
        out.sort_by_key(|p| key_bytes(&p[0]));
        out
    }

    /// Removes both sockets of a pair from every map. Sockets leave the
    /// program maps before `TARGETS`, so no redirect targets a socket that
    /// is half removed.
    pub fn unpair(&self, keys: &[SockKey]) {
        let carried: u64 = keys
            .iter()
            .filter_map(|k| self.counters(k))
            .map(|c| c.bytes)
            .sum();
        self.retired
            .fetch_add(carried, std::sync::atomic::Ordering::Relaxed);
        remove_locked(&mut self.maps(), keys);
        let mut l = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            l.remove(k);
        }
    }

    /// What the verdict program did with `key`'s bytes so far.
    pub fn flow(&self, key: &SockKey) -> Option<Flow> {
        self.maps().flow.get(key, 0).ok()
    }

    /// Records how many passed bytes user space has forwarded; the verdict
    /// resumes redirecting once this equals [`Flow::passed`].
    pub fn set_forwarded(&self, key: &SockKey, bytes: u64) -> Result<(), PairError> {
        self.maps()
            .forwarded
            .insert(key, bytes, 0)
            .map_err(|e| PairError::Map("FORWARDED", e))
    }

    fn update_peer(&self, key: &SockKey, f: impl FnOnce(&mut Peer)) -> Result<(), PairError> {
        let mut m = self.maps();
        let mut peer = m
            .peers
            .get(key, 0)
            .map_err(|e| PairError::Map("PEERS", e))?;
        f(&mut peer);
        m.peers
            .insert(key, peer, 0)
            .map_err(|e| PairError::Map("PEERS", e))
    }

    /// Sets the next redirected-byte and skb totals at which `key` is
    /// reported, arms the report, and moves its cap (see [`Peer::cap`]).
    pub fn rearm(
        &self,
        key: &SockKey,
        limit: u64,
        msg_limit: u64,
        cap: u64,
    ) -> Result<(), PairError> {
        self.update_peer(key, |p| {
            p.limit = limit;
            p.msg_limit = msg_limit;
            p.cap = cap;
            p.armed = 1;
        })
    }

    /// Asks the verdict to pass what arrives on `key`'s socket; see
    /// [`Peer::hold`].
    pub fn hold(&self, key: &SockKey) -> Result<(), PairError> {
        self.update_peer(key, |p| p.hold = 1)
    }

    /// Lets the verdict redirect again (once every passed byte has been
    /// forwarded), up to a new cap.
    pub fn release(&self, key: &SockKey, cap: u64) -> Result<(), PairError> {
        self.update_peer(key, |p| {
            p.hold = 0;
            p.cap = cap;
        })
    }

    /// Receives the key of `key`'s socket each time it passes its armed
    /// limit. Replaces any earlier listener for the key.
    pub fn limit_events(&self, key: SockKey) -> tokio::sync::mpsc::UnboundedReceiver<SockKey> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, tx);
        rx
    }

    /// Every byte these programs redirected (sk_skb and sk_msg), for pairs
    /// alive now and pairs since removed: what the kernel path carried, as
    /// opposed to what zc moved in user space.
    pub fn kernel_bytes(&self) -> u64 {
        let live: u64 = {
            let m = self.maps();
            m.counters
                .iter()
                .filter_map(Result::ok)
                .map(|(_, per_cpu)| per_cpu.iter().map(|c| c.bytes).sum::<u64>())
                .sum()
        };
        live + self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the programs redirected away from `key`, summed over CPUs.
    pub fn counters(&self, key: &SockKey) -> Option<Counters> {
        let m = self.maps();
        let per_cpu = m.counters.get(key, 0).ok()?;
        Some(per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
            bytes: acc.bytes + c.bytes,
            msgs: acc.msgs + c.msgs,
            failed: acc.failed + c.failed,
        }))
    }

    /// Number of entries in each map: (TARGETS, RELAY, LOCAL, PEERS,
    /// FLOW, FORWARDED, COUNTERS).
    pub fn entry_counts(&self) -> [usize; 7] {
        let m = self.maps();
        [
            m.targets.keys().count(),
            m.relay.keys().count(),
            m.local.keys().count(),
            m.peers.keys().count(),
            m.flow.keys().count(),
            m.forwarded.keys().count(),
            m.counters.keys().count(),
        ]
    }

    /// Raw access for tests that need a socket in `RELAY` without a peer.
    #[doc(hidden)]
    pub fn insert_unpaired_relay(&self, fd: impl AsFd) -> Result<SockKey, PairError> {
        let fd = fd.as_fd();
        let k = crate::sys::sock_key(fd).map_err(PairError::Socket)?;
        self.maps()
            .relay
            .insert(k, fd.as_raw_fd(), 0)
            .map_err(|e| PairError::Map("RELAY", e))?;
        Ok(k)
    }
}

/// The kernel answers EOPNOTSUPP when a socket is not established
/// (net/core/sock_map.c, sock_map_sk_state_allowed).
fn map_insert_error(map: &'static str, key: SockKey, e: aya::maps::MapError) -> PairError {
    if let aya::maps::MapError::SyscallError(s) = &e
        && s.io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
    {
        return PairError::NotEstablished(key);
    }
    PairError::Map(map, e)
}

fn remove_locked(m: &mut Maps, keys: &[SockKey]) {
    // Missing entries are expected when undoing a partial pairing.
    for k in keys {
        let _ = m.relay.remove(k);
        let _ = m.foreign.remove(k);
        let _ = m.local.remove(k);
    }
    for k in keys {
        let _ = m.targets.remove(k);
        let _ = m.peers.remove(k);
        let _ = m.flow.remove(k);
        let _ = m.forwarded.remove(k);
        let _ = m.counters.remove(k);
        let _ = m.guarded.remove(k);
    }
}

/// Loads the sk_skb program `name` and attaches it to `map`.
fn attach_skb(
    ebpf: &mut Ebpf,
    name: &'static str,
    map: &SockHash<MapData, SockKey>,
) -> Result<(), LoadError> {
    let prog: &mut SkSkb = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|e| LoadError::Program(name, e))?;
    prog.load().map_err(|e| LoadError::Program(name, e))?;
    prog.attach(map.fd())
        .map_err(|e| LoadError::Program(name, e))?;
    Ok(())
}

/// Tells the programs where the stream parser keeps a message's offset in
/// an skb (from BTF). Without it they assume offset 0, which holds for
/// sockets paired with nothing read from a partly consumed skb.
/// Tells the verdict where two members sit in an skb (`SKB_CONFIG`):
/// the stream parser's offset into a partly read skb, and the TCP
/// sequence number it uses to skip retransmitted bytes it already handled.
fn configure_skb_offsets(ebpf: &mut Ebpf) {
    let offsets = crate::btf::Offsets::of_running_kernel(&[
        ("sk_buff", "cb"),
        ("sk_skb_cb", "strp"),
        ("_strp_msg", "strp"),
        ("strp_msg", "offset"),
        ("tcp_skb_cb", "seq"),
    ]);
    let strp = offsets
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|o| {
            Ok(o.get("sk_buff", "cb")?
                + o.get("sk_skb_cb", "strp")?
                + o.get("_strp_msg", "strp")?
                + o.get("strp_msg", "offset")?)
        });
    let seq = offsets
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|o| Ok(o.get("sk_buff", "cb")? + o.get("tcp_skb_cb", "seq")?));
    let mut set = |slot: u32, at: u32| -> anyhow::Result<()> {
        let map = ebpf
            .map_mut("SKB_CONFIG")
            .ok_or_else(|| anyhow::anyhow!("no SKB_CONFIG map"))?;
        aya::maps::Array::<_, u64>::try_from(map)?.set(slot, u64::from(at), 0)?;
        Ok(())
    };
    if let Err(e) = strp.and_then(|at| set(0, at)) {
        warn!("the stream parser's offset is unknown ({e:#}); pair only idle sockets");
    }
    if let Err(e) = seq.and_then(|at| set(1, at)) {
        warn!(
            "the TCP sequence number of an skb is unknown ({e:#}); a retransmission that \
             overlaps bytes already relayed would deliver them twice"
        );
    }
}

/// File names of the FIN hold's pinned links start with this, followed by
/// the interface index (bpffs refuses dots, which interface names may hold).
pub const HOLD_LINK_PREFIX: &str = "fin_hold_";

/// Maps an agent pins: everything a pair needs to keep working, and its
/// counters. The ring buffers stay private to each process.
pub const PINNED: [&str; 9] = [
    "TARGETS",
    "RELAY",
    "FOREIGN",
    "LOCAL",
    "PEERS",
    "FLOW",
    "FORWARDED",
    "COUNTERS",
    "GUARDED",
];

fn key_bytes(k: &SockKey) -> [u32; 11] {
    let mut b = [0u32; 11];
    b[0] = k.family;
    b[1] = k.local_port;
    b[2] = k.remote_port;
    b[3..7].copy_from_slice(&k.local_ip);
    b[7..11].copy_from_slice(&k.remote_ip);
    b
}

fn nr_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

/// Runs `drain` on `source` each time it becomes readable, in a task on
/// the current tokio runtime. Both users are ring buffers that only
/// support side channels (limit events, logs), so failing to start is
/// logged, not fatal. Without a runtime `source` is handed back for the
/// caller to keep open.
fn drain_when_readable<T, F>(what: &'static str, source: T, mut drain: F) -> Option<T>
where
    T: std::os::fd::AsRawFd + Send + 'static,
    F: FnMut(&mut T) + Send + 'static,
{
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        // Dropping `source` would close its map before the programs that
        // write to it are loaded ("fd is not pointing to valid bpf_map").
        debug!("{what} not forwarded: no tokio runtime");
        return Some(source);
    };
    handle.spawn(async move {
        // SAFETY: `source` owns its fd and keeps it open while the AsyncFd
        // holds it.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(source, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!("{what} unavailable: {}", e.into_parts().1);
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            drain(guard.get_inner_mut());
            guard.clear_ready();
        }
    });
    None
}

/// Hands each key the verdict puts on `EVENTS` to its listener.
fn start_event_forwarding(
    events: RingBuf<MapData>,
    listeners: Arc<Mutex<Listeners>>,
) -> Option<RingBuf<MapData>> {
    drain_when_readable("limit events", events, move |ring| {
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<SockKey>() {
                continue;
            }
            // SAFETY: the program writes whole SockKeys; read unaligned
            // because the ring gives no alignment promise to Rust.
            let key = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SockKey>()) };
            drop(item);
            if let Some(tx) = listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
            {
                let _ = tx.send(key);
            }
        }
    })
}

/// eBPF-side logs arrive through aya-log's ring buffer and go to `log`.
/// Forwards eBPF-side log lines to `log` on the current tokio runtime;
/// hands the logger back when there is none (see [`drain_when_readable`]).
fn start_log_forwarding(ebpf: &mut Ebpf) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => drain_when_readable("eBPF-side logging", logger, |l| l.flush()),
        Err(e) => {
            warn!("eBPF-side logging is unavailable: {e}");
            None
        }
    }
}
