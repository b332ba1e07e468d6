//! Loads zc's eBPF object into the kernel and exposes its maps as typed
//! operations. One [`Programs`] value owns every kernel object it created;
//! dropping it detaches the programs and frees the maps.
//!
//! This module loads the object and keeps the map handles the program
//! families share. Each family has its own module, as in `zc-ebpf`:
//! - `verdict`: the relay (`zc_verdict`, `zc_verdict_parsed`,
//!   `zc_parser`): pairing, the hold and the cap, limit events;
//! - `fin_hold`: `zc_fin_hold` on tc ingress, for the agent's pairs;
//! - `recording`: `zc_sockops` on a cgroup, recording established
//!   sockets;
//! - `short_circuit`: `zc_msg` and the same-host pairs;
//! - `pairs`: the pair table both redirecting families write (checks,
//!   removal, listing);
//! - `stats`: what the programs carried, over every family;
//! - `rings`: draining the ring buffers the programs write to.
mod fin_hold;
mod pairs;
mod park;
mod recording;
mod rings;
mod short_circuit;
mod stats;
mod verdict;

use std::sync::{Arc, Mutex, MutexGuard};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, RingBuf, SockHash},
};
use zc_common::{Counters, Flow, Peer, Recorded, SockKey};

pub use self::{
    fin_hold::HOLD_LINK_PREFIX,
    pairs::PairError,
    park::Unparked,
    short_circuit::ShortCircuitTotals,
    verdict::{Cap, RelayPairing},
};

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
    #[error(
        "loading the eBPF object failed (needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): {0}"
    )]
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
    #[error("parking is unavailable: {0}")]
    Parking(String),
    // Without CAP_PERFMON the verifier refuses the programs' reads of
    // kernel memory (through BTF) with EACCES, and says nothing of it.
    #[error(
        "loading or attaching program `{0}` failed (needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): {1}"
    )]
    Program(&'static str, #[source] aya::programs::ProgramError),
}

struct Maps {
    targets: SockHash<MapData, SockKey>,
    relay: SockHash<MapData, SockKey>,
    foreign: SockHash<MapData, SockKey>,
    local: SockHash<MapData, SockKey>,
    peers: HashMap<MapData, SockKey, Peer>,
    flow: HashMap<MapData, SockKey, Flow>,
    forwarded: HashMap<MapData, SockKey, u64>,
    by_cookie: HashMap<MapData, u64, SockKey>,
    counters: PerCpuHashMap<MapData, SockKey, Counters>,
    guarded: HashMap<MapData, SockKey, SockKey>,
    recorded: HashMap<MapData, SockKey, Recorded>,
}

/// The loaded programs and their maps. Cheap to clone; all clones share
/// the same kernel objects.
#[derive(Clone)]
pub struct Programs {
    inner: Arc<Mutex<Maps>>,
    listeners: Arc<Mutex<verdict::Listeners>>,
    /// Set when pairs must outlive this process (a pinned agent stopping
    /// without --unpin-on-exit): ending relays then leave the maps alone.
    retain: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes the programs redirected for pairs that have been removed, so
    /// [`Self::kernel_bytes`] covers ended pairs too.
    retired: Arc<std::sync::atomic::AtomicU64>,
    /// Failed redirects of pairs that have been removed.
    retired_failed: Arc<std::sync::atomic::AtomicU64>,
    /// Interfaces the FIN hold has looked at (attached or skipped).
    /// (network namespace inode, interface index): numbers repeat across
    /// namespaces.
    hold_ifaces: Arc<Mutex<std::collections::HashSet<(u64, u32)>>>,
    /// `zc_park` is attached ([`Self::enable_parking`]).
    parking: Arc<std::sync::atomic::AtomicBool>,
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

/// The maps with one entry per socket, sized together
/// ([`Programs::load_sized`]). Their hash maps allocate entries as they
/// are used, so a large size costs little until it is used.
const SOCKET_MAPS: [&str; 15] = [
    "PARK",
    "TARGETS",
    "RELAY",
    "FOREIGN",
    "LOCAL",
    "PEERS",
    "FLOW",
    "FORWARDED",
    "BY_COOKIE",
    "COUNTERS",
    "GUARDED",
    "RECORDED",
    "SC_ADDRS",
    "SC_LISTENERS",
    "HOLD_SINCE",
];

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
        Self::load_sized(zc_common::MAX_SOCKETS)
    }

    /// Like [`Self::load`], with every socket-keyed map sized for
    /// `sockets` sockets (two per pair): a relay sizes them to the
    /// connections it takes at once, a probe to its one test pair.
    pub fn load_sized(sockets: u32) -> Result<Self, LoadError> {
        let mut loader = EbpfLoader::new();
        for name in SOCKET_MAPS {
            loader.map_max_entries(name, sockets.max(2));
        }
        Self::load_with(&mut loader)
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
        if let Some(logger) = rings::start_log_forwarding(&mut ebpf) {
            undrained.push(Box::new(logger));
        }
        let targets: SockHash<MapData, SockKey> = take(&mut ebpf, "TARGETS")?;
        let relay: SockHash<MapData, SockKey> = take(&mut ebpf, "RELAY")?;
        let foreign: SockHash<MapData, SockKey> = take(&mut ebpf, "FOREIGN")?;
        let local: SockHash<MapData, SockKey> = take(&mut ebpf, "LOCAL")?;
        let peers = take(&mut ebpf, "PEERS")?;
        let flow = take(&mut ebpf, "FLOW")?;
        let forwarded = take(&mut ebpf, "FORWARDED")?;
        let by_cookie = take(&mut ebpf, "BY_COOKIE")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let events: RingBuf<MapData> = take(&mut ebpf, "EVENTS")?;
        let guarded = take(&mut ebpf, "GUARDED")?;
        let recorded = take(&mut ebpf, "RECORDED")?;
        let listeners = Arc::new(Mutex::new(verdict::Listeners::new()));
        if let Some(events) = verdict::start_event_forwarding(events, listeners.clone()) {
            undrained.push(Box::new(events));
        }

        verdict::attach(&mut ebpf, &relay, &foreign)?;
        short_circuit::attach(&mut ebpf, &local)?;

        Ok(Self {
            inner: Arc::new(Mutex::new(Maps {
                targets,
                relay,
                foreign,
                local,
                peers,
                flow,
                forwarded,
                by_cookie,
                counters,
                guarded,
                recorded,
            })),
            listeners,
            retain: Arc::default(),
            retired: Arc::default(),
            retired_failed: Arc::default(),
            hold_ifaces: Arc::default(),
            parking: Arc::default(),
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

    /// The loaded object, for the programs attached after loading and
    /// the maps only one family reads.
    fn ebpf(&self) -> MutexGuard<'_, Ebpf> {
        self._ebpf.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A map's definition as the kernel keeps it, to compare a pinned map
/// with the one this build defines.
#[derive(Debug, PartialEq)]
pub struct MapSpec {
    pub kind: Option<aya::maps::MapType>,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapSpec {
    /// The definition of the map pinned at `path`.
    pub fn of_pinned(path: &std::path::Path) -> Result<Self, aya::maps::MapError> {
        let info = aya::maps::MapData::from_pin(path)?.info()?;
        Ok(Self {
            kind: info.map_type().ok(),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        })
    }
}

impl std::fmt::Display for MapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Some(k) => write!(f, "{k:?}")?,
            None => write!(f, "an unknown type")?,
        }
        write!(
            f,
            ", key {} B, value {} B, {} entries",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// What this build expects of each map in [`PINNED`], from its own
/// object. aya reuses a map pinned under a name without looking at it, so
/// the agent compares first (as cilium/ebpf's `MapSpec.Compatible` does).
/// Empty for a build without its object, which loads nothing anyway.
pub fn pinned_map_specs() -> Result<std::collections::HashMap<&'static str, MapSpec>, String> {
    if OBJECT.is_empty() {
        return Ok(Default::default());
    }
    let obj =
        aya_obj::Object::parse(OBJECT).map_err(|e| format!("parsing the eBPF object: {e}"))?;
    PINNED
        .iter()
        .map(|name| {
            let m = obj
                .maps
                .get(*name)
                .ok_or_else(|| format!("map `{name}` is missing from the eBPF object"))?;
            let kind = aya_obj::generated::bpf_map_type::try_from(m.map_type())
                .ok()
                .and_then(|t| aya::maps::MapType::try_from(t).ok());
            Ok((
                *name,
                MapSpec {
                    kind,
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: m.max_entries(),
                },
            ))
        })
        .collect()
}

/// Maps an agent pins: everything a pair needs to keep working, and its
/// counters. The ring buffers stay private to each process.
pub const PINNED: [&str; 10] = [
    "TARGETS",
    "RELAY",
    "FOREIGN",
    "LOCAL",
    "PEERS",
    "FLOW",
    "FORWARDED",
    "BY_COOKIE",
    "COUNTERS",
    "GUARDED",
];
