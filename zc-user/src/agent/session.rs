//! The control socket: accepting connections, admitting them per uid
//! (root always), turning the rest away, and the request loop of each.
use std::{
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{debug, info, warn};
use tokio::io::unix::AsyncFd;

use super::{
    Agent, MAX_CONNS_PER_UID, MAX_UNPRIVILEGED_CONNS, OnStop,
    access::Requester,
    adopted, control, metrics,
    proto::{self, ErrorKind, Request, Response},
    take::{Refusal, refuse},
};

impl Agent {
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
pub(super) struct LogLimit {
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
