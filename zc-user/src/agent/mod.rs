//! `zc agent`: pairs sockets of other processes (an unmodified proxy) in
//! the kernel on request over a control socket.
pub mod access;
mod adopted;
pub mod client;
pub mod control;
mod ending;
pub mod find;
pub mod lock;
pub mod metrics;
mod pairing;
pub mod pidfd;
pub mod pins;
pub mod proto;
mod ptrace;
mod quiesce;
mod readiness;
mod report;
mod requests;
mod session;
mod sockopts;
mod stop;
mod supervise;
pub mod take;
mod turns;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use tokio::task::JoinHandle;

use self::{pidfd::Process, proto::PairInfo, session::LogLimit, sockopts::Saved, turns::Turns};
use zc_common::SockKey;

use crate::{
    ebpf::Programs,
    engine::{
        Counts, Engine,
        bpf::{BpfEngine, HandBack},
        splice::{DEFAULT_MAX_PIPES, DEFAULT_PIPE_SIZE, PipePool, SpliceEngine},
    },
};

/// How long a proxy may be held still for pairing by default: it measures
/// what the proxy holds, pairs, and sees the kernel take what was queued
/// (a fraction of a millisecond on an idle host).
pub const DEFAULT_MAX_STOP: Duration = Duration::from_millis(50);

struct Entry {
    info: PairInfo,
    keys: [SockKey; 2],
    /// Socket inodes: one socket has one inode however many fds name it.
    /// Unknown (0) for adopted pairs.
    inodes: [u64; 2],
    owner_uid: u32,
    /// The relay watching this pair; none for a pair adopted from pinned
    /// maps, which the kernel carries on its own.
    task: Option<JoinHandle<()>>,
    /// What a user-space relay (splice) moved so far; none when the
    /// kernel carries the pair and its counters say it.
    counts: Option<Counts>,
    /// The processes that own the sockets (pid/fd and tuple pairs).
    owners: Vec<Arc<Process>>,
    /// Asks the relay to give the sockets back to their owners (pairs of
    /// another process's sockets, with a relay).
    hand_back: Option<tokio::sync::oneshot::Sender<HandBack>>,
    /// The owner's options for both sockets from before pairing, put back
    /// when the pair ends (pairs of another process's sockets).
    saved: Option<Arc<Saved>>,
    /// What the owner had read and written on each socket at pairing
    /// (pairs of another process's sockets), for the kernel's backlog.
    before: Option<[quiesce::Progress; 2]>,
}

pub struct Agent {
    /// For a proxy's own sockets (pid/fd); none without BPF.
    foreign: Option<BpfEngine>,
    /// For sockets handed over: the agent owns them, so any engine works
    /// (BPF, or splice without it).
    owned: Engine,
    progs: Option<Programs>,
    /// Why BPF is not in use, if it is not.
    no_bpf: Option<String>,
    /// Why sockets are not recorded by 4-tuple (sock_ops), if they are not.
    no_recording: Option<String>,
    /// The group that may pair by tuple besides root.
    group: Option<u32>,
    /// Why the FIN hold is off, if it is.
    no_fin_hold: Option<String>,
    /// Why the same-host short-circuit is off, if it is.
    no_short_circuit: Option<String>,
    pin_dir: Option<std::path::PathBuf>,
    pairs: Mutex<BTreeMap<u64, Entry>>,
    next: AtomicU64,
    /// Requests that stop a process take turns.
    turns: Turns,
    /// The longest a pairing holds a proxy still.
    max_stop: Duration,
    /// Open control connections per uid other than root.
    conns: Mutex<std::collections::HashMap<u32, usize>>,
    /// Refusals are logged at most this often.
    refusals: LogLimit,
    /// Turned-away control connections that may wait for their request
    /// before they close (see [`control::turn_away`]).
    turning_away: Arc<tokio::sync::Semaphore>,
    /// What `--metrics` shows that no map holds.
    tally: metrics::Tally,
    /// Where `--metrics` is served, for `zc status`.
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Control connections one uid other than root may hold open at once.
pub const MAX_CONNS_PER_UID: usize = 8;
/// Control connections all uids other than root may hold open at once.
/// Each holds a descriptor, and up to 253 more while its request is
/// handled (SCM_MAX_FD), so 64 of them take at most about 16,000: the
/// rest of the open-file limit stays for root's requests and the pairs.
pub const MAX_UNPRIVILEGED_CONNS: usize = 64;

/// The data path an agent runs on.
pub enum DataPath {
    Bpf(Programs, crate::watch::Watcher),
    /// BPF is unavailable (the reason): handed-over sockets are spliced,
    /// pid/fd pairing is refused.
    Splice(String),
}

/// How the agent was set up, for its answers.
pub struct Options {
    /// The group that may pair by tuple besides root.
    pub group: Option<u32>,
    /// Why sockets are not recorded by tuple, if they are not.
    pub no_recording: Option<String>,
    /// Why the FIN hold is off, if it is.
    pub no_fin_hold: Option<String>,
    /// Why the same-host short-circuit is off, if it is.
    pub no_short_circuit: Option<String>,
    /// Where the maps are pinned (none without BPF).
    pub pin_dir: Option<std::path::PathBuf>,
    /// The longest a pairing holds a proxy still; a pairing that cannot be
    /// confirmed within it is undone and refused.
    pub max_stop: Duration,
    /// Where `--metrics` is served, if it is.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            group: None,
            no_recording: None,
            no_fin_hold: None,
            no_short_circuit: None,
            pin_dir: None,
            max_stop: DEFAULT_MAX_STOP,
            metrics: None,
        }
    }
}

/// What happens to the pairs when the agent stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStop {
    /// They stay in the pinned maps and keep moving bytes.
    Keep,
    /// They end with the agent.
    Remove,
}

impl Agent {
    /// An agent over `progs`; pairs already in its (pinned) maps are
    /// adopted and listed.
    pub fn new(path: DataPath, opts: Options) -> Arc<Self> {
        let (foreign, owned, progs, no_bpf) = match path {
            DataPath::Bpf(progs, watcher) => {
                let engine = BpfEngine::new(progs.clone(), watcher);
                (
                    Some(engine.clone().for_foreign_sockets()),
                    Engine::Bpf(engine),
                    Some(progs),
                    None,
                )
            }
            DataPath::Splice(why) => (
                None,
                Engine::Splice(SpliceEngine::new(Arc::new(PipePool::new(
                    DEFAULT_MAX_PIPES,
                    DEFAULT_PIPE_SIZE,
                )))),
                None,
                Some(why),
            ),
        };
        let agent = Arc::new(Self {
            foreign,
            owned,
            progs,
            no_bpf,
            no_recording: opts.no_recording,
            group: opts.group,
            no_fin_hold: opts.no_fin_hold,
            no_short_circuit: opts.no_short_circuit,
            pin_dir: opts.pin_dir,
            pairs: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
            turns: Turns::default(),
            max_stop: opts.max_stop,
            conns: Mutex::default(),
            refusals: LogLimit::default(),
            turning_away: Arc::new(tokio::sync::Semaphore::new(MAX_UNPRIVILEGED_CONNS)),
            tally: metrics::Tally::default(),
            metrics_addr: opts.metrics,
        });
        agent.adopt();
        agent
    }

    fn pairs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When a stop's thread lets the owner go by itself, should the agent
    /// never do so: past the bound and an undo's hand-back.
    fn stop_ceiling(&self) -> Duration {
        self.max_stop + ending::HAND_BACK_ANSWER + Duration::from_secs(1)
    }
}
