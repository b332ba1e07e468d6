//! Making a pair. Handed-over sockets are the agent's and pair at once. A
//! proxy's sockets pair while the proxy is held still at a moment it holds
//! no bytes (`quiesce`), one request per proxy at a time (`turns`), and the
//! pair counts only once the kernel has taken what was queued: if that
//! cannot be confirmed before the stop's bound (`--max-stop`), the pair
//! is undone before the proxy goes on and the request refused. A pair
//! reported made is therefore whole; nothing is left half made.
use std::{
    net::TcpStream,
    os::fd::AsFd as _,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use log::{debug, info};
use tokio::sync::oneshot;
use zc_common::SockKey;

use super::{
    Agent, Entry,
    pidfd::Process,
    proto::{ErrorKind, PairInfo, Response},
    quiesce::{self, Progress},
    sockopts::Saved,
    supervise,
    take::{Refusal, refuse},
};
use crate::engine::{Counts, Engine};

/// Two checked sockets about to be paired.
pub(super) struct Candidate {
    pub socks: [TcpStream; 2],
    pub inodes: [u64; 2],
    /// The processes that own them (pid/fd and tuple pairing); none when
    /// they were handed over and the agent owns them.
    pub owners: Vec<Arc<Process>>,
}

/// Told once the pair is in the kernel, or why it could not be.
type Report = oneshot::Receiver<Result<[SockKey; 2], String>>;

impl Agent {
    /// Pairs `c` and waits until the kernel has it (or refused it).
    pub(super) async fn start(
        self: Arc<Self>,
        c: Candidate,
        source: String,
        who: &super::access::Requester,
    ) -> Result<Response, Refusal> {
        // A pair adopted from a killed agent whose socket has closed would
        // refuse a later connection with its 4-tuple as "already paired".
        let _ = self.prune_adopted();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let info = PairInfo {
            id,
            source,
            sockets: [describe(&c.socks[0]), describe(&c.socks[1])],
        };
        if c.owners.is_empty() {
            let report = self.claim_and_spawn(c, &info, who.uid, None)?;
            self.in_kernel(id, report).await?;
            return Ok(announce(info));
        }
        // Refuse what will be refused before stopping anyone.
        self.pairable_now(&c)?;
        let _turn = self.turns.take(&c.owners).await;
        let probes = [clone(&c.socks[0])?, clone(&c.socks[1])?];
        let active = probes.each_ref().map(|s| self.connected(s, &c.owners));
        let saved = Arc::new(Saved::record(&probes).map_err(|e| {
            refuse(
                ErrorKind::Invalid,
                format!("reading the sockets' options: {e}"),
            )
        })?);
        let (stopped, before) = quiesce::settle(
            &c.owners,
            &probes,
            &c.inodes,
            active,
            self.max_stop,
            self.stop_ceiling(),
        )
        .await?;
        // Held still from here; each way out lets the owner go.
        let keys = match self.claim_and_spawn(c, &info, who.uid, Some(saved.clone())) {
            Ok(report) => self.in_kernel(id, report).await,
            Err(r) => Err(r),
        };
        let keys = match keys {
            Ok(k) => k,
            Err(r) => {
                stopped.release().await;
                return Err(r);
            }
        };
        if let Err(why) = self
            .confirm(&keys, &probes, before, stopped.deadline())
            .await
        {
            let how = self.undo(id).await;
            let held = stopped.since().elapsed();
            stopped.release().await;
            return Err(refuse(
                ErrorKind::Invalid,
                format!(
                    "the pairing was undone: {why}, {} ms after the owner stopped (--max-stop \
                     {} ms); {how}",
                    held.as_millis(),
                    self.max_stop.as_millis()
                ),
            ));
        }
        if let Some(e) = self.pairs().get_mut(&id) {
            e.before = Some(before);
        }
        quiesce::wait_unreadable(&probes, stopped.deadline()).await;
        let held = stopped.since().elapsed();
        stopped.release().await;
        debug!("pair {id}: the owner was stopped for {held:?}");
        supervise::start(&self, id, keys, saved, before);
        Ok(announce(info))
    }

    /// Refuses, before anything is stopped, sockets that are paired
    /// already or short-circuited.
    fn pairable_now(&self, c: &Candidate) -> Result<(), Refusal> {
        super::requests::not_paired(&self.pairs(), &c.inodes)?;
        let Some(progs) = &self.progs else {
            return Ok(());
        };
        for s in &c.socks {
            let key = crate::sys::sock_key(s.as_fd());
            if key.is_ok_and(|k| progs.short_circuited(&k)) {
                return Err(refuse(
                    ErrorKind::Invalid,
                    format!(
                        "{} is short-circuited (--short-circuit): what its peer sends arrives \
                         without TCP, where no redirect sees it",
                        describe(s)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Waits until the relay says the pair is in the kernel. If it is not,
    /// the pair is forgotten and its sockets get their options back.
    async fn in_kernel(&self, id: u64, report: Report) -> Result<[SockKey; 2], Refusal> {
        let why = match report.await {
            Ok(Ok(keys)) => return Ok(keys),
            Ok(Err(msg)) => msg,
            Err(_) => "the sockets could not be prepared for pairing (closed meanwhile?)".into(),
        };
        let e = self.pairs().remove(&id);
        if let Some(saved) = e.and_then(|e| e.saved) {
            saved.restore();
        }
        Err(refuse(ErrorKind::Invalid, why))
    }

    /// Whether the verdict took every byte that was queued on either
    /// socket when the owner stopped, by `deadline`: the owner's next read
    /// of a byte the kernel has not taken yet would make the kernel run
    /// the verdict on it again (net/ipv4/tcp_bpf.c rewinds `copied_seq`),
    /// duplicating it downstream.
    async fn confirm(
        &self,
        keys: &[SockKey; 2],
        probes: &[TcpStream; 2],
        before: [Progress; 2],
        deadline: Instant,
    ) -> Result<(), String> {
        let Some(progs) = &self.progs else {
            return Ok(());
        };
        for i in 0..2 {
            let taken = || progs.flow(&keys[i]).map(|f| f.sent + f.passed);
            quiesce::wait_redirected(&probes[i], before[i], taken, deadline)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Takes back a pair that could not be confirmed, its owner still
    /// stopped: the same hand-back `zc unpair` does.
    async fn undo(&self, id: u64) -> String {
        let e = self.pairs().remove(&id);
        match e {
            Some(e) => self.give_back(e).await,
            None => "the pair had ended meanwhile".into(),
        }
    }

    /// Claims the sockets (so a concurrent request for either is refused
    /// rather than racing this one) and starts relaying them.
    fn claim_and_spawn(
        self: &Arc<Self>,
        c: Candidate,
        info: &PairInfo,
        owner_uid: u32,
        saved: Option<Arc<Saved>>,
    ) -> Result<Report, Refusal> {
        let Candidate {
            socks: [a, b],
            inodes,
            owners,
        } = c;
        let foreign = !owners.is_empty();
        let id = info.id;
        let mut pairs = self.pairs();
        super::requests::not_paired(&pairs, &inodes)?;
        let keys = match (crate::sys::sock_key(&a), crate::sys::sock_key(&b)) {
            (Ok(ka), Ok(kb)) => [ka, kb],
            _ => {
                return Err(refuse(
                    ErrorKind::Invalid,
                    "a socket closed during the request",
                ));
            }
        };
        let (tx, rx) = oneshot::channel();
        let me = self.clone();
        // Foreign pairs move only through the kernel (no window: user space
        // must never touch another process's sockets).
        let counts = (!foreign).then(Counts::default);
        let live = counts.clone();
        let by_user = counts.clone().unwrap_or_default();
        let (hand_back, asked) = oneshot::channel();
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
            let e = {
                let mut pairs = me.pairs();
                if let Ok(s) = &end {
                    me.tally
                        .pair_ended(s, [0, 1].map(|i| by_user[i].load(Ordering::Relaxed)));
                }
                pairs.remove(&id)
            };
            if let Some(e) = e {
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
                if let Some(saved) = e.saved {
                    saved.restore();
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
                task: Some(task),
                counts,
                hand_back: foreign.then_some(hand_back),
                owners,
                saved,
                before: None,
            },
        );
        Ok(rx)
    }
}

fn announce(info: PairInfo) -> Response {
    info!(
        "pair {}: {} <-> {} ({})",
        info.id, info.sockets[0], info.sockets[1], info.source
    );
    Response::Paired {
        id: info.id,
        pair: info,
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

/// A socket as `ss` prints it: local-remote.
pub(super) fn describe(s: &TcpStream) -> String {
    match (s.local_addr(), s.peer_addr()) {
        (Ok(l), Ok(r)) => format!("{l}-{r}"),
        _ => "?".into(),
    }
}
