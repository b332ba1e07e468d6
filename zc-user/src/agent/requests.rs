//! Pairing and unpairing requests: sockets handed over, found by pid and
//! fd or by 4-tuple, checked, and started (see `pairing`); ending a pair.
use std::{
    collections::BTreeMap,
    net::TcpStream,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    sync::Arc,
};

use log::info;

use super::{
    Agent, Entry, access,
    access::Requester,
    find,
    pairing::Candidate,
    pidfd::Process,
    proto::{ErrorKind, Response},
    quiesce,
    take::{self, Refusal, refuse},
};

impl Agent {
    /// Takes over two sockets a cooperative proxy sent: checked like any
    /// pairing, then relayed by the owned engine, which closes them.
    pub(super) async fn handoff(
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
    pub(super) async fn pair_tuple(
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

    pub(super) async fn unpair(&self, id: u64, who: &Requester) -> Result<Response, Refusal> {
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

    pub(super) async fn pair_pid(
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

/// Refuses sockets (by inode) that are part of a pair already.
pub(super) fn not_paired(pairs: &BTreeMap<u64, Entry>, inodes: &[u64; 2]) -> Result<(), Refusal> {
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
    pub(super) fn connected(&self, s: &TcpStream, owners: &[Arc<Process>]) -> bool {
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
