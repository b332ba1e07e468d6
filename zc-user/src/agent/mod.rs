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
mod sockopts;
mod stop;
mod supervise;
pub mod take;
mod turns;

use std::{
    collections::BTreeMap,
    net::TcpStream,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use log::{debug, info, warn};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use self::{
    access::Requester,
    pairing::Candidate,
    pidfd::Process,
    proto::{ErrorKind, PairInfo, Request, Response},
    sockopts::Saved,
    take::{Refusal, refuse},
    turns::Turns,
};
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

    /// Serves the control socket until `stop` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: AsyncFd<OwnedFd>,
        stop: impl std::future::Future<Output = ()>,
        on_stop: OnStop,
    ) {
        tokio::pin!(stop);
        tokio::spawn(adopted::watch(Arc::downgrade(&self)));
        let mut failing = AcceptBackoff::default();
        self.tally.set_state(metrics::State::Serving);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                r = control::accept(&listener) => match r {
                    Ok((conn, who)) => {
                        if failing.failures > 0 {
                            self.tally.set_state(metrics::State::Serving);
                        }
                        failing.succeeded();
                        match self.admit(&who) {
                            Ok(admitted) => {
                                let me = self.clone();
                                tokio::spawn(async move { me.conversation(conn, who, admitted).await });
                            }
                            Err(r) => {
                                debug!("control connection from uid {} pid {} turned away: {}", who.uid, who.pid, r.message);
                                let permit = self.turning_away.clone().try_acquire_owned().ok();
                                tokio::spawn(async move {
                                    let busy = Response::Error { kind: r.kind, message: r.message };
                                    control::turn_away(conn, &busy, permit.is_some()).await;
                                    drop(permit);
                                });
                            }
                        }
                    }
                    Err(e) => {
                        self.tally.set_state(metrics::State::AcceptFailing(e.to_string()));
                        let pause = failing.failed(&e);
                        tokio::select! {
                            _ = &mut stop => break,
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                },
            }
        }
        self.tally.set_state(metrics::State::Stopping);
        let n = self.pairs().len();
        match on_stop {
            OnStop::Keep => {
                if let Some(p) = &self.progs {
                    p.retain_pairs();
                }
                info!(
                    "zc agent: stopping; {n} pair(s) stay in the kernel and keep moving bytes \
                     (a restarted agent adopts them; `zc agent --cleanup` removes them)"
                );
            }
            OnStop::Remove => {
                info!("zc agent: stopping; {n} pair(s) end with it");
                let mut ends = tokio::task::JoinSet::new();
                for (id, e) in std::mem::take(&mut *self.pairs()) {
                    let me = self.clone();
                    ends.spawn(async move { (id, me.end(e).await) });
                }
                while let Some(r) = ends.join_next().await {
                    if let Ok((id, how)) = r {
                        info!("pair {id}: {how}");
                    }
                }
            }
        }
    }

    /// Counts a new control connection against its uid, or refuses it
    /// when that uid, or all uids but root together, hold their share.
    /// Root is never counted nor refused.
    fn admit(self: &Arc<Self>, who: &Requester) -> Result<Admitted, Refusal> {
        if !who.is_root() {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            if conns.get(&who.uid).copied().unwrap_or(0) >= MAX_CONNS_PER_UID {
                return Err(refuse(
                    ErrorKind::Busy,
                    format!(
                        "uid {} has {MAX_CONNS_PER_UID} control connections open already; \
                         close one first",
                        who.uid
                    ),
                ));
            }
            if conns.values().sum::<usize>() >= MAX_UNPRIVILEGED_CONNS {
                return Err(refuse(
                    ErrorKind::Busy,
                    format!(
                        "users other than root hold {MAX_UNPRIVILEGED_CONNS} control connections; \
                         try again later"
                    ),
                ));
            }
            *conns.entry(who.uid).or_default() += 1;
        }
        Ok(Admitted {
            agent: self.clone(),
            uid: (!who.is_root()).then_some(who.uid),
        })
    }

    /// `_admitted` is held for as long as the connection is served.
    async fn conversation(
        self: Arc<Self>,
        conn: AsyncFd<OwnedFd>,
        who: Requester,
        _admitted: Admitted,
    ) {
        loop {
            let msg = match control::recv(&conn).await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    debug!("control connection from pid {}: {e}", who.pid);
                    return;
                }
            };
            let resp = match proto::decode(&msg.body, msg.truncated) {
                Ok(req) => {
                    let kind = req.clone();
                    let resp = self.clone().handle(req, &who, msg.fds).await;
                    if let Some(o) = metrics::Outcome::of(&kind, &resp) {
                        self.tally.request(o);
                    }
                    resp
                }
                Err(e) => Response::Error {
                    kind: ErrorKind::Malformed,
                    message: e.to_string(),
                },
            };
            if let Response::Error { message, .. } = &resp
                && let Some(left_out) = self.refusals.admit()
            {
                if left_out > 0 {
                    info!(
                        "{left_out} more refused request(s) not logged (at most {} a second)",
                        LogLimit::PER_SECOND
                    );
                }
                info!(
                    "request from uid {} pid {} refused: {message}",
                    who.uid, who.pid
                );
            }
            if control::send(&conn, &resp).await.is_err() {
                return;
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request, who: &Requester, fds: Vec<OwnedFd>) -> Response {
        let result = match (req, fds.len()) {
            (Request::Handoff, 2) => self.handoff(fds, who).await,
            (Request::Handoff, n) => Err(refuse(
                ErrorKind::Malformed,
                format!("a handoff carries exactly two sockets (SCM_RIGHTS), not {n}"),
            )),
            (_, n) if n > 0 => Err(refuse(
                ErrorKind::Malformed,
                format!("only a handoff carries file descriptors; got {n}"),
            )),
            (req, _) => self.clone().handle_plain(req, who).await,
        };
        result.unwrap_or_else(|r| Response::Error {
            kind: r.kind,
            message: r.message,
        })
    }

    async fn handle_plain(
        self: Arc<Self>,
        req: Request,
        who: &Requester,
    ) -> Result<Response, Refusal> {
        // Answers list no adopted pair that has ended since the last look.
        let _ = self.prune_adopted();
        match req {
            Request::List => Ok(Response::Pairs {
                pairs: self.pairs().values().map(|e| e.info.clone()).collect(),
            }),
            Request::Stats => Ok(Response::Stats {
                short_circuit: self.short_circuit_totals(),
                pairs: self.stats(),
            }),
            Request::Status => Ok(Response::Status(self.status())),
            Request::Unpair { id } => self.unpair(id, who).await,
            Request::PairPid { pid, fds } => self.pair_pid(pid, fds, who).await,
            Request::PairTuple { sockets, netns } => {
                self.pair_tuple(sockets, netns.as_deref(), who).await
            }
            Request::Handoff => Err(refuse(ErrorKind::Malformed, "a handoff needs its sockets")),
        }
    }

    /// Takes over two sockets a cooperative proxy sent: checked like any
    /// pairing, then relayed by the owned engine, which closes them.
    async fn handoff(
        self: Arc<Self>,
        fds: Vec<OwnedFd>,
        who: &Requester,
    ) -> Result<Response, Refusal> {
        let mut socks = Vec::with_capacity(2);
        for (i, fd) in fds.into_iter().enumerate() {
            socks.push(take::established_tcp(
                fd,
                &format!("handed-over socket {i}"),
            )?);
        }
        let [a, b]: [TcpStream; 2] = socks
            .try_into()
            .map_err(|_| refuse(ErrorKind::Internal, "two sockets expected"))?;
        let inodes = check_pairable(&a, &b, "the two handed-over sockets")?;
        let c = Candidate {
            socks: [a, b],
            inodes,
            owners: Vec::new(),
        };
        self.start(c, format!("handoff from pid {}", who.pid), who)
            .await
    }

    /// Pairs two sockets recorded by sock_ops, found by 4-tuple in the
    /// process that holds them, with the rule pid/fd pairing follows (see
    /// `access`); root may also join two processes' sockets.
    async fn pair_tuple(
        self: Arc<Self>,
        tuples: [String; 2],
        netns: Option<&str>,
        who: &Requester,
    ) -> Result<Response, Refusal> {
        if !who.is_root() && !self.group.is_some_and(|g| who.in_group(g)) {
            return Err(refuse(
                ErrorKind::Denied,
                "pairing by tuple is for root and the agent's --group",
            ));
        }
        let progs = match (&self.progs, &self.no_bpf) {
            (Some(p), None) => p.clone(),
            (_, why) => {
                return Err(refuse(
                    ErrorKind::Invalid,
                    format!(
                        "pairing by tuple needs BPF, which is unavailable ({})",
                        why.as_deref().unwrap_or("not loaded")
                    ),
                ));
            }
        };
        if let Some(why) = &self.no_recording {
            return Err(refuse(
                ErrorKind::Invalid,
                format!("sockets are not being recorded: {why}"),
            ));
        }
        let mut inodes = [0u64; 2];
        for (i, t) in tuples.iter().enumerate() {
            let (local, remote) = find::parse_tuple(t)?;
            let inode = match netns {
                None => find::inode_of(local, remote),
                Some(ns) => find::inode_in_netns(ns, local, remote)
                    .map_err(|e| refuse(ErrorKind::NotFound, e))?,
            };
            inodes[i] = inode.ok_or_else(|| {
                refuse(
                    ErrorKind::NotFound,
                    format!(
                        "{t} is not an established connection in {}",
                        netns.map_or("the agent's network namespace".to_string(), |n| {
                            format!("network namespace {n}")
                        })
                    ),
                )
            })?;
        }
        let holders = access::one_holder(who, &tuples, find::holders_of(inodes))?;
        // One pidfd per process, from before the first fd is taken to the
        // last signal.
        let first = Arc::new(Process::open(holders[0].0)?);
        let second = if holders[1].0 == first.pid() {
            first.clone()
        } else {
            Arc::new(Process::open(holders[1].0)?)
        };
        let from = [first, second];
        let mut socks = Vec::with_capacity(2);
        for (i, t) in tuples.iter().enumerate() {
            let (pid, fd) = holders[i];
            let taken = access::take_fd(who, &from[i], fd)?;
            let s = take::established_tcp(taken, &format!("{t} (fd {fd} of pid {pid})"))?;
            // Its key names its network namespace, which only the socket
            // itself tells without entering that namespace.
            let key = crate::sys::sock_key(&s)
                .map_err(|e| refuse(ErrorKind::Invalid, format!("reading {t}'s addresses: {e}")))?;
            let recorded = progs.recorded(&key).ok_or_else(|| {
                let lost = progs.recording_lost();
                let full = if lost > 0 {
                    format!(
                        ", or lost: {lost} sockets could not be recorded because the map of \
                         recorded sockets was full"
                    )
                } else {
                    String::new()
                };
                refuse(
                    ErrorKind::NotFound,
                    format!(
                        "{t} was not recorded: not established in the agent's cgroup since it \
                         started, or closed since{full}"
                    ),
                )
            })?;
            // Also proves the fd was taken from the process the scan found
            // (a pid reused since would hold other sockets).
            if crate::sys::socket_cookie(std::os::fd::AsFd::as_fd(&s)).ok() != Some(recorded.cookie)
            {
                return Err(refuse(
                    ErrorKind::Invalid,
                    format!("{t} is no longer the socket that was recorded"),
                ));
            }
            socks.push(s);
        }
        let [a, b]: [TcpStream; 2] = socks
            .try_into()
            .map_err(|_| refuse(ErrorKind::Internal, "two sockets expected"))?;
        let inodes = check_pairable(&a, &b, "the two tuples")?;
        let mut owners = from.to_vec();
        owners.dedup_by_key(|p| p.pid());
        let c = Candidate {
            socks: [a, b],
            inodes,
            owners,
        };
        self.start(c, "tuple".to_string(), who).await
    }

    fn status(&self) -> proto::AgentStatus {
        let pinned = self
            .pin_dir
            .as_ref()
            .and_then(|d| std::fs::read_dir(d).ok())
            .map(|d| {
                let mut v: Vec<String> = d
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let (fins_held, fins_stripped, fins_requeued) = self
            .progs
            .as_ref()
            .and_then(Programs::fin_hold_counts)
            .unwrap_or_default();
        proto::AgentStatus {
            data_path: match &self.no_bpf {
                None => "bpf".into(),
                Some(why) => format!("splice ({why})"),
            },
            pid_pairing: self.no_bpf.as_ref().map(|why| format!("needs BPF ({why})")),
            tuple_pairing: self.no_recording.clone(),
            fin_hold: self.no_fin_hold.clone(),
            fins_held,
            fins_stripped,
            fins_requeued,
            short_circuit: self.no_short_circuit.clone(),
            pin_dir: self.pin_dir.as_ref().map(|d| d.display().to_string()),
            pinned,
            pairs: self.pairs().len(),
            metrics: self.metrics_addr.map(|a| a.to_string()),
        }
    }

    fn short_circuit_totals(&self) -> Option<crate::ebpf::ShortCircuitTotals> {
        match (&self.progs, &self.no_short_circuit) {
            (Some(p), None) => p.short_circuit_totals(),
            _ => None,
        }
    }

    fn stats(&self) -> Vec<proto::PairStats> {
        self.pairs()
            .values()
            .map(|e| {
                // What the kernel carried (BPF pairs) plus what user space
                // moved (splice and copy pairs, held BPF directions).
                let kernel = match &self.progs {
                    Some(progs) => e.keys.map(|k| progs.counters(&k).unwrap_or_default()),
                    None => Default::default(),
                };
                let c = [0, 1].map(|i| zc_common::Counters {
                    bytes: kernel[i].bytes
                        + e.counts
                            .as_ref()
                            .map_or(0, |n| n[i].load(Ordering::Relaxed)),
                    ..kernel[i]
                });
                proto::PairStats {
                    id: e.info.id,
                    sockets: e.info.sockets.clone(),
                    bytes: c.map(|c| c.bytes),
                    msgs: c.map(|c| c.msgs),
                    failed: c.map(|c| c.failed),
                }
            })
            .collect()
    }

    async fn unpair(&self, id: u64, who: &Requester) -> Result<Response, Refusal> {
        let e = {
            let mut pairs = self.pairs();
            let e = pairs
                .get(&id)
                .ok_or_else(|| refuse(ErrorKind::NotFound, format!("no pair {id}")))?;
            if !who.is_root() && who.uid != e.owner_uid {
                return Err(refuse(
                    ErrorKind::Denied,
                    format!("pair {id} was made by another user"),
                ));
            }
            pairs
                .remove(&id)
                .ok_or_else(|| refuse(ErrorKind::NotFound, format!("no pair {id}")))?
        };
        let how = self.end(e).await;
        info!("pair {id} unpaired: {how}");
        Ok(Response::Unpaired { id, how })
    }

    async fn pair_pid(
        self: Arc<Self>,
        pid: i32,
        fds: [i32; 2],
        who: &Requester,
    ) -> Result<Response, Refusal> {
        if let Some(why) = &self.no_bpf {
            return Err(refuse(
                ErrorKind::Invalid,
                format!(
                    "pairing another process's sockets needs BPF, which is unavailable ({why}); \
                     a user-space relay would race that process's own reads. Hand the sockets \
                     over instead (zc_user::agent::client::hand_off)"
                ),
            ));
        }
        // One pidfd for the whole request: the fds are taken from it and
        // the signals go to it.
        let owner = Arc::new(Process::open(pid)?);
        let [fa, fb]: [OwnedFd; 2] = access::take_fds(who, &owner, &fds)?
            .try_into()
            .map_err(|_| refuse(ErrorKind::Internal, "two fds expected"))?;
        let a = take::established_tcp(fa, &format!("fd {} of pid {pid}", fds[0]))?;
        let b = take::established_tcp(fb, &format!("fd {} of pid {pid}", fds[1]))?;
        let inodes = check_pairable(
            &a,
            &b,
            &format!("fds {} and {} of pid {pid}", fds[0], fds[1]),
        )?;
        let c = Candidate {
            socks: [a, b],
            inodes,
            owners: vec![owner],
        };
        self.start(c, format!("pid {pid} fds {},{}", fds[0], fds[1]), who)
            .await
    }
}

/// A control connection counted against its uid (none for root) until
/// it is dropped.
struct Admitted {
    agent: Arc<Agent>,
    uid: Option<u32>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let Some(uid) = self.uid else { return };
        let mut conns = self.agent.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = conns.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&uid);
            }
        }
    }
}

/// At most [`Self::PER_SECOND`] lines a second of one kind: a client
/// repeating a bad request must not fill the log (11,000 refused
/// handoffs wrote 11,000 lines).
struct LogLimit {
    /// Start of the current second, lines logged in it, lines left out
    /// since the last one logged.
    state: Mutex<(std::time::Instant, u32, u64)>,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self {
            state: Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }
}

impl LogLimit {
    const PER_SECOND: u32 = 10;

    /// Whether to log a line now and, if so, how many were left out
    /// before it.
    fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if now.duration_since(s.0) >= Duration::from_secs(1) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < Self::PER_SECOND {
            s.1 += 1;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

/// Pauses between failed accepts. Out of descriptors (EMFILE, ENFILE) or
/// memory, the connection stays queued and the listener readable, so
/// retrying at once spins a CPU and writes a log line each time. The
/// pause doubles from 5 ms to 1 s (as Go's net/http does), and the log
/// says when failing starts and when it stops.
#[derive(Default)]
struct AcceptBackoff {
    pause: Duration,
    failures: u64,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MOST: Duration = Duration::from_secs(1);

    fn failed(&mut self, e: &std::io::Error) -> Duration {
        if self.failures == 0 {
            warn!("accepting a control connection: {e}; retrying with backoff up to 1 s");
        }
        self.failures += 1;
        self.pause = (self.pause * 2).clamp(Self::FIRST, Self::MOST);
        self.pause
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(
                "accepting control connections again after {} failed attempt(s)",
                self.failures
            );
        }
        *self = Self::default();
    }
}

/// Refuses sockets (by inode) that are part of a pair already.
fn not_paired(pairs: &BTreeMap<u64, Entry>, inodes: &[u64; 2]) -> Result<(), Refusal> {
    match pairs
        .iter()
        .find(|(_, e)| e.inodes.iter().any(|i| inodes.contains(i)))
    {
        Some((other, _)) => Err(refuse(
            ErrorKind::Invalid,
            format!("a socket is already paired (pair {other})"),
        )),
        None => Ok(()),
    }
}

impl Agent {
    /// Whether `s` connected (active open) rather than was accepted: as
    /// sock_ops recorded it, else whether no listener has its port.
    fn connected(&self, s: &TcpStream, owners: &[Arc<Process>]) -> bool {
        let recorded = self.progs.as_ref().and_then(|p| {
            let fd = std::os::fd::AsFd::as_fd(s);
            let r = p.recorded(&crate::sys::sock_key(fd).ok()?)?;
            (crate::sys::socket_cookie(fd).ok()? == r.cookie).then_some(r.active != 0)
        });
        recorded.unwrap_or_else(|| !owners.first().is_some_and(|o| quiesce::accepted(s, o)))
    }
}

/// Two distinct sockets of one address family, or why not; returns their
/// inodes.
fn check_pairable(a: &TcpStream, b: &TcpStream, what: &str) -> Result<[u64; 2], Refusal> {
    let inodes = [inode(a)?, inode(b)?];
    if inodes[0] == inodes[1] {
        return Err(refuse(
            ErrorKind::Invalid,
            format!("{what} are the same socket"),
        ));
    }
    // As keyed: an IPv6 socket holding an IPv4-mapped connection (a
    // dual-stack listener's) counts as IPv4, and the kernel redirects
    // between it and an IPv4 socket like any two TCP sockets.
    let family = |s: &TcpStream| crate::sys::sock_key(s.as_fd()).map(|k| k.family).ok();
    if family(a) != family(b) {
        return Err(refuse(
            ErrorKind::Invalid,
            "the sockets are of different address families (IPv4 and IPv6)",
        ));
    }
    Ok(inodes)
}

fn inode(s: &TcpStream) -> Result<u64, Refusal> {
    let f = std::fs::File::from(
        s.as_fd()
            .try_clone_to_owned()
            .map_err(|e| refuse(ErrorKind::Internal, e.to_string()))?,
    );
    f.metadata()
        .map(|m| m.ino())
        .map_err(|e| refuse(ErrorKind::Internal, e.to_string()))
}
