//! Who asks, and what they may take. The kernel decides, not a
//! re-implementation of its rules: for a requester other than root, the
//! agent takes the fds on a short-lived thread that first takes on the
//! requester's credentials, so pidfd_getfd's own check,
//! ptrace_may_access(PTRACE_MODE_ATTACH_REALCREDS) (kernel/pid.c), runs
//! against them: same uid and gid as the target, no capability the target
//! has and the requester lacks, a dumpable target, and whatever Yama and
//! other LSMs add. Credentials are per thread in the kernel, and the raw
//! setresuid/setresgid/setgroups calls (rustix's `set_thread_*`) change only
//! the calling thread, unlike glibc's wrappers, which change every thread
//! of the process. The taken fds land in the agent's shared fd table; the
//! thread ends with the request.
//!
//! Chosen over the alternative, a client that takes the fds itself and
//! sends them (SCM_RIGHTS): the agent would still have to prove that the
//! sockets belong to the process it is about to stop, and a socket shared
//! with another process (passed over a Unix socket, or inherited) would let
//! a requester name a process it may not touch.
//!
//! Exact for what credentials carry: uids, gids and capabilities (the
//! thread holds none, so capabilities a non-root requester has count for
//! nothing). Rules keyed on the calling process see the agent instead:
//! Yama's ptrace_scope 1 asks whether the target descends from the agent
//! (it does not, so there only root pairs in practice), PR_SET_PTRACER
//! names a tracer by pid, and SELinux or AppArmor labels are the agent's.
//! Root requesters take with the agent's own credentials.
//!
//! The requester's identity is what the kernel recorded on the control
//! socket at connect(2): uid and gid from SO_PEERCRED, supplementary groups
//! from SO_PEERGROUPS (the same credentials). Nothing about the requester
//! is read from /proc, where a pid could name another process by now; for
//! the same reason SO_PEERPIDFD is not needed: what a requester may take
//! follows from its credentials, never from its process.
use std::os::fd::OwnedFd;

use rustix::{
    process::{Gid, Uid},
    thread::{
        CapabilitySet, CapabilitySets, set_capabilities, set_thread_groups, set_thread_res_gid,
        set_thread_res_uid,
    },
};

use super::{
    pidfd::Process,
    proto::ErrorKind,
    take::{Refusal, refuse},
};

/// Who sent a request, as the control socket's peer credentials say.
#[derive(Clone, Debug)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// For messages only: the pid that connected.
    pub pid: i32,
}

impl Requester {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Duplicates `fds` of `from` into the agent, as far as the kernel lets
/// `who` ptrace-attach to it. All or nothing.
pub fn take_fds(who: &Requester, from: &Process, fds: &[i32]) -> Result<Vec<OwnedFd>, Refusal> {
    let take_all = || fds.iter().map(|&fd| take(who, from, fd)).collect();
    if who.is_root() {
        return take_all();
    }
    std::thread::scope(|s| {
        // A thread of its own, never a pooled one: its credentials end
        // with it.
        let thread = std::thread::Builder::new()
            .name("zc-take-as".into())
            .spawn_scoped(s, || {
                become_requester(who).map_err(|e| {
                    refuse(
                        ErrorKind::Internal,
                        format!("taking on uid {}'s credentials: {e}", who.uid),
                    )
                })?;
                take_all()
            })
            .map_err(|e| refuse(ErrorKind::Internal, format!("starting a thread: {e}")))?;
        thread.join().unwrap_or_else(|_| {
            Err(refuse(
                ErrorKind::Internal,
                "the thread taking the fds panicked",
            ))
        })
    })
}

/// One fd, as [`take_fds`] takes them.
pub fn take_fd(who: &Requester, from: &Process, fd: i32) -> Result<OwnedFd, Refusal> {
    take_fds(who, from, &[fd])?
        .pop()
        .ok_or_else(|| refuse(ErrorKind::Internal, "no fd taken"))
}

/// Gives the calling thread `who`'s uid, gid and groups, and no
/// capabilities.
fn become_requester(who: &Requester) -> rustix::io::Result<()> {
    let groups: Vec<Gid> = who.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    let (uid, gid) = (Uid::from_raw(who.uid), Gid::from_raw(who.gid));
    // Groups and gid first: they need CAP_SETGID, which the uid change
    // takes away.
    set_thread_groups(&groups)?;
    set_thread_res_gid(gid, gid, gid)?;
    set_thread_res_uid(uid, uid, uid)?;
    // Leaving uid 0 clears the capabilities already, unless securebits the
    // agent inherited (SECBIT_NO_SETUID_FIXUP) keep them: clear them here.
    set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )
}

fn take(who: &Requester, from: &Process, fd: i32) -> Result<OwnedFd, Refusal> {
    use rustix::{io::Errno, process::PidfdGetfdFlags};
    let pid = from.pid();
    rustix::process::pidfd_getfd(from.pidfd(), fd, PidfdGetfdFlags::empty()).map_err(|e| match e {
        Errno::BADF => refuse(
            ErrorKind::NotFound,
            format!("pid {pid} has no open fd {fd}"),
        ),
        Errno::SRCH => refuse(
            ErrorKind::NotFound,
            format!("pid {pid} exited during the request"),
        ),
        Errno::PERM if !who.is_root() => refuse(
            ErrorKind::Denied,
            format!(
                "the kernel denies uid {} ptrace access to pid {pid}, so it may not take its fds \
                 (another user or group, a capability the requester lacks, not dumpable, or a \
                 security module's rule)",
                who.uid
            ),
        ),
        // Root's request runs with the agent's own credentials: a bounded
        // agent (zc-agent.service) lands here without CAP_SYS_PTRACE.
        Errno::PERM => refuse(
            ErrorKind::Denied,
            format!(
                "the agent may not take fds from pid {pid}: {e} (pidfd_getfd is a ptrace \
                 access: the agent needs CAP_SYS_PTRACE for a process of another user or with \
                 capabilities the agent lacks, and a security module may forbid it)"
            ),
        ),
        e => refuse(
            ErrorKind::Internal,
            format!("pidfd_getfd(pid {pid}, fd {fd}): {e}"),
        ),
    })
}

/// Where to take each of two sockets from, given every (pid, fd) holding
/// each: the process that holds both, as pid/fd pairing names one process
/// for both. Only root may join sockets of two processes (with `--group`,
/// anyone else could join their own connection to another's and read and
/// inject that stream).
pub fn one_holder(
    who: &Requester,
    names: &[String; 2],
    holders: [Vec<(i32, i32)>; 2],
) -> Result<[(i32, i32); 2], Refusal> {
    for (name, h) in names.iter().zip(&holders) {
        if h.is_empty() {
            return Err(refuse(
                ErrorKind::NotFound,
                format!("no process holds {name}"),
            ));
        }
    }
    let [a, b] = &holders;
    if let Some(both) = a.iter().find_map(|&(pid, fa)| {
        b.iter()
            .find(|(p, _)| *p == pid)
            .map(|&(_, fb)| [(pid, fa), (pid, fb)])
    }) {
        return Ok(both);
    }
    if who.is_root() {
        return Ok([a[0], b[0]]);
    }
    Err(refuse(
        ErrorKind::Denied,
        format!(
            "{} (pid {}) and {} (pid {}) belong to different processes: only root may pair \
             sockets of two processes",
            names[0], a[0].0, names[1], b[0].0
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32) -> Requester {
        Requester {
            uid,
            gid: uid,
            groups: vec![4242],
            pid: 1,
        }
    }

    #[test]
    fn tuples_are_taken_from_one_process_that_holds_both() {
        let names = ["a".to_string(), "b".to_string()];
        // pid 7 holds both (b also in pid 9): 7 it is, for anyone.
        let holders = || [vec![(5, 3), (7, 4)], vec![(9, 8), (7, 6)]];
        for uid in [0, 1000] {
            assert_eq!(
                one_holder(&who(uid), &names, holders()).expect("one process"),
                [(7, 4), (7, 6)]
            );
        }
        // Two processes: root only.
        let apart = || [vec![(5, 3)], vec![(9, 8)]];
        assert_eq!(
            one_holder(&who(0), &names, apart()).expect("root"),
            [(5, 3), (9, 8)]
        );
        let e = one_holder(&who(1000), &names, apart()).expect_err("not root");
        assert!(e.message.contains("different processes"), "{}", e.message);
        let e = one_holder(&who(0), &names, [vec![], vec![(9, 8)]]).expect_err("none");
        assert!(e.message.contains("no process holds a"), "{}", e.message);
    }

    #[test]
    fn group_membership_counts_primary_and_supplementary_groups() {
        let w = who(1000);
        assert!(w.in_group(1000) && w.in_group(4242) && !w.in_group(4243));
    }
}
