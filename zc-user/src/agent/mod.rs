//! `zc agent`: pairs sockets of other processes (an unmodified proxy) in
//! the kernel on request over a control socket.
pub mod access;
pub mod client;
pub mod control;
pub mod find;
pub mod pidfd;
pub mod proto;
mod quiesce;
pub mod take;

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
};

use log::{debug, info, warn};
use tokio::{io::unix::AsyncFd, task::AbortHandle};

use self::{
    access::Requester,
    pidfd::Process,
    proto::{ErrorKind, PairInfo, Request, Response},
    take::{Refusal, refuse},
};
use zc_common::SockKey;

use crate::{
    ebpf::Programs,
    engine::{
        Counts, Engine,
        bpf::{BpfEngine, HandBack, HandedBack},
        splice::{DEFAULT_MAX_PIPES, DEFAULT_PIPE_SIZE, PipePool, SpliceEngine},
    },
};

struct Entry {
    info: PairInfo,
    keys: [SockKey; 2],
    /// Socket inodes: one socket has one inode however many fds name it.
    /// Unknown (0) for adopted pairs.
    inodes: [u64; 2],
    owner_uid: u32,
    /// The relay watching this pair; none for a pair adopted from pinned
    /// maps, which the kernel carries on its own.
    task: Option<AbortHandle>,
    /// What a user-space relay (splice) moved so far; none when the
    /// kernel carries the pair and its counters say it.
    counts: Option<Counts>,
    /// The processes that own the sockets (pid/fd and tuple pairs).
    owners: Vec<Arc<Process>>,
    /// Asks the relay to give the sockets back to their owners (pairs of
    /// another process's sockets, with a relay).
    hand_back: Option<tokio::sync::oneshot::Sender<HandBack>>,
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
}

/// The data path an agent runs on.
pub enum DataPath {
    Bpf(Programs, crate::watch::Watcher),
    /// BPF is unavailable (the reason): handed-over sockets are spliced,
    /// pid/fd pairing is refused.
    Splice(String),
}

/// How the agent was set up, for its answers.
#[derive(Default)]
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
        });
        agent.adopt();
        agent
    }

    fn adopt(&self) {
        let Some(progs) = &self.progs else { return };
        let found = progs.relay_pairs();
        let mut pairs = self.pairs();
        for keys in found {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let sockets = keys.map(|k| {
                let (l, r) = crate::sys::addrs_of_key(&k);
                format!("{l}-{r}")
            });
            info!("adopted pair {id}: {} <-> {}", sockets[0], sockets[1]);
            pairs.insert(
                id,
                Entry {
                    info: PairInfo {
                        id,
                        source: "adopted".into(),
                        sockets,
                    },
                    keys,
                    inodes: [0; 2],
                    owner_uid: 0,
                    task: None,
                    counts: None,
                    owners: Vec::new(),
                    hand_back: None,
                },
            );
        }
    }

    fn pairs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves the control socket until `stop` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: AsyncFd<OwnedFd>,
        stop: impl std::future::Future<Output = ()>,
        on_stop: OnStop,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                r = control::accept(&listener) => match r {
                    Ok((conn, who)) => {
                        let me = self.clone();
                        tokio::spawn(async move { me.conversation(conn, who).await });
                    }
                    Err(e) => warn!("accepting a control connection: {e}"),
                },
            }
        }
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

    /// Ends a pair and says how its sockets ended.
    async fn end(&self, e: Entry) -> String {
        if let (Some(ask), Some(task)) = (e.hand_back, &e.task) {
            return match hand_back(ask, &e.owners).await {
                Ok(HandedBack::Intact) => {
                    "every byte the kernel accepted was delivered; the owner has its sockets back"
                        .into()
                }
                Ok(HandedBack::Reset(why)) => {
                    format!("both connections were reset: {why}")
                }
                Err(why) => {
                    task.abort();
                    format!("left to the owner, bytes queued in the kernel may be lost: {why}")
                }
            };
        }
        match e.task {
            // Dropping the relay ends the pair: handed-over sockets close
            // (with a reset unless both directions had ended).
            Some(t) => {
                t.abort();
                "the agent's relay of the handed-over sockets ended".into()
            }
            // Adopted from pinned maps: no relay and no byte counts from
            // pairing time to check against.
            None => {
                if let Some(p) = &self.progs {
                    p.unpair(&e.keys);
                }
                "left to the owner; bytes queued in the kernel at this moment are lost (adopted \
                 pair: the agent that paired it is gone)"
                    .into()
            }
        }
    }

    async fn conversation(self: Arc<Self>, conn: AsyncFd<OwnedFd>, who: Requester) {
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
                Ok(req) => self.clone().handle(req, &who, msg.fds).await,
                Err(e) => Response::Error {
                    kind: ErrorKind::Malformed,
                    message: e.to_string(),
                },
            };
            if let Response::Error { message, .. } = &resp {
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
            Request::PairTuple { sockets } => self.pair_tuple(sockets, who).await,
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
        let mut cookies = [0u64; 2];
        let mut inodes = [0u64; 2];
        for (i, t) in tuples.iter().enumerate() {
            let (local, remote) = find::parse_tuple(t)?;
            let key = crate::sys::key_from_addrs(&local, &remote);
            let recorded = progs.recorded(&key).ok_or_else(|| {
                refuse(
                    ErrorKind::NotFound,
                    format!(
                        "{t} was not recorded: not established in the agent's cgroup since it \
                         started, or closed since"
                    ),
                )
            })?;
            cookies[i] = recorded.cookie;
            inodes[i] = find::inode_of(local, remote).ok_or_else(|| {
                refuse(
                    ErrorKind::NotFound,
                    format!("{t} is not an established connection"),
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
            // Also proves the fd was taken from the process the scan found
            // (a pid reused since would hold other sockets).
            if crate::sys::socket_cookie(std::os::fd::AsFd::as_fd(&s)).ok() != Some(cookies[i]) {
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
        let (fins_held, fins_stripped) = self
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
            short_circuit: self.no_short_circuit.clone(),
            pin_dir: self.pin_dir.as_ref().map(|d| d.display().to_string()),
            pinned,
            pairs: self.pairs().len(),
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

    /// Pairs `c` and waits until the kernel has it (or refused it).
    async fn start(
        self: Arc<Self>,
        c: Candidate,
        source: String,
        who: &Requester,
    ) -> Result<Response, Refusal> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let info = PairInfo {
            id,
            source,
            sockets: [describe(&c.socks[0]), describe(&c.socks[1])],
        };
        // A proxy's sockets: pair them while it is stopped and holds no
        // bytes between them (see `quiesce`).
        let settled = if c.owners.is_empty() {
            None
        } else {
            // Refuse what will be refused before stopping anyone.
            not_paired(&self.pairs(), &c.inodes)?;
            if let Some(progs) = &self.progs {
                for s in &c.socks {
                    let key = crate::sys::sock_key(std::os::fd::AsFd::as_fd(s));
                    if key.is_ok_and(|k| progs.short_circuited(&k)) {
                        return Err(refuse(
                            ErrorKind::Invalid,
                            format!(
                                "{} is short-circuited (--short-circuit): what its peer sends \
                                 arrives without TCP, where no redirect sees it",
                                describe(s)
                            ),
                        ));
                    }
                }
            }
            let probes = [clone(&c.socks[0])?, clone(&c.socks[1])?];
            let active = probes.each_ref().map(|s| self.connected(s, &c.owners));
            let (stopped, before) = quiesce::settle(&c.owners, &probes, active).await?;
            Some((stopped, before, probes))
        };
        let rx = self.claim_and_spawn(c, &info, who.uid)?;
        let outcome = rx.await;
        if !matches!(outcome, Ok(Ok(_))) {
            self.pairs().remove(&id);
        }
        match outcome {
            Ok(Ok(keys)) => {
                if let (Some((stopped, before, probes)), Some(progs)) = (settled, &self.progs) {
                    for i in 0..2 {
                        let taken = || progs.flow(&keys[i]).map(|f| f.sent + f.passed);
                        if let Err(e) = quiesce::wait_redirected(&probes[i], before[i], taken).await
                        {
                            warn!("pair {id}: {e}; letting the owner continue");
                        }
                    }
                    quiesce::wait_unreadable(&probes).await;
                    drop(stopped);
                }
            }
            Ok(Err(msg)) => return Err(refuse(ErrorKind::Invalid, msg)),
            Err(_) => {
                return Err(refuse(
                    ErrorKind::Invalid,
                    "the sockets could not be prepared for pairing (closed meanwhile?)",
                ));
            }
        }
        info!(
            "pair {id}: {} <-> {} ({})",
            info.sockets[0], info.sockets[1], info.source
        );
        Ok(Response::Paired { id, pair: info })
    }
}

/// Two checked sockets about to be paired.
struct Candidate {
    socks: [TcpStream; 2],
    inodes: [u64; 2],
    /// The processes that own them (pid/fd and tuple pairing); none when
    /// they were handed over and the agent owns them.
    owners: Vec<Arc<Process>>,
}

impl Agent {
    /// Claims the sockets (so a concurrent request for either is refused
    /// rather than racing this one) and starts relaying them.
    fn claim_and_spawn(
        self: &Arc<Self>,
        c: Candidate,
        info: &PairInfo,
        owner_uid: u32,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<[SockKey; 2], String>>, Refusal> {
        let Candidate {
            socks: [a, b],
            inodes,
            owners,
        } = c;
        let foreign = !owners.is_empty();
        let id = info.id;
        let mut pairs = self.pairs();
        not_paired(&pairs, &inodes)?;
        let keys = match (crate::sys::sock_key(&a), crate::sys::sock_key(&b)) {
            (Ok(ka), Ok(kb)) => [ka, kb],
            _ => {
                return Err(refuse(
                    ErrorKind::Invalid,
                    "a socket closed during the request",
                ));
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        // Foreign pairs move only through the kernel (no window: user space
        // must never touch another process's sockets).
        let counts = (!foreign).then(Counts::default);
        let live = counts.clone();
        let (hand_back, asked) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let end = match (&me.foreign, &me.owned, live) {
                (Some(e), _, _) if foreign => e.relay_foreign(a, b, tx, asked).await,
                (_, Engine::Bpf(e), live) => {
                    e.relay_reporting(a, b, Some(tx), live.unwrap_or_default())
                        .await
                }
                (_, other, live) => {
                    // Splice and copy take any connected pair at once.
                    let _ = tx.send(Ok(keys));
                    other.relay_counted(a, b, live.unwrap_or_default()).await
                }
            };
            if let Some(e) = me.pairs().remove(&id) {
                match end {
                    Ok(s) => info!(
                        "pair {id} ({}) ended: {} and {} bytes{}",
                        e.info.source,
                        s.a_to_b,
                        s.b_to_a,
                        if s.reset { ", reset" } else { "" }
                    ),
                    Err(err) => debug!("pair {id} ended: {err:#}"),
                }
            }
        });
        pairs.insert(
            id,
            Entry {
                info: info.clone(),
                keys,
                inodes,
                owner_uid,
                task: Some(task.abort_handle()),
                counts,
                hand_back: foreign.then_some(hand_back),
                owners,
            },
        );
        Ok(rx)
    }
}

/// Stops the owners, has the relay give the sockets back, and lets the
/// owners go on.
async fn hand_back(
    ask: tokio::sync::oneshot::Sender<HandBack>,
    owners: &[Arc<Process>],
) -> Result<HandedBack, String> {
    // Unstopped, the owner may read meanwhile and the counts then show
    // bytes the verdict did not move: the hand-back resets rather than
    // risk a cut, which is the honest end when the owner cannot be held.
    let stopped = quiesce::stop(owners)
        .inspect_err(|r| {
            warn!(
                "handing a pair back without stopping its owner: {}",
                r.message
            )
        })
        .ok();
    let (answer, how) = tokio::sync::oneshot::channel();
    ask.send(answer)
        .map_err(|_| "the pair's relay had ended".to_string())?;
    let how = how
        .await
        .map_err(|_| "the pair's relay ended while handing back".to_string());
    drop(stopped);
    how
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

fn clone(s: &TcpStream) -> Result<TcpStream, Refusal> {
    s.try_clone().map_err(|e| {
        refuse(
            ErrorKind::Internal,
            format!("duplicating a socket descriptor: {e}"),
        )
    })
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
    let family = |s: &TcpStream| s.local_addr().map(|a| a.is_ipv4()).ok();
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

/// A socket as `ss` prints it: local-remote.
fn describe(s: &TcpStream) -> String {
    match (s.local_addr(), s.peer_addr()) {
        (Ok(l), Ok(r)) => format!("{l}-{r}"),
        _ => "?".into(),
    }
}
