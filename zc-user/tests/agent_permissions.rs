//! Who may pair what. A requester other than root gets exactly what the
//! kernel would give it for ptrace attach (same uid and gid, no
//! capability it lacks, a dumpable process), decided by the kernel, and
//! never a join of two processes' sockets. A refusal stops nobody and
//! leaves the pairs as they were.
//!
//! The requester is nobody in the agent's `--group`; the processes holding
//! sockets are children of this test, whose stop detector
//! (`Holder::was_ever_stopped`) tells whether anything ever stopped them.
mod common;

use std::os::unix::fs::MetadataExt as _;

use common::{agent::*, process::UNPRIVILEGED};

/// An agent whose control socket the unprivileged requester can reach.
fn agent(tag: &str) -> Agent {
    Agent::start_with(tag, &["--group", MEMBER_GROUP])
}

/// Asserts a request was refused with `says`, changed no pair and stopped
/// none of `holders`.
fn refused(agent: &Agent, got: (bool, String, String), says: &str, holders: &[&Holder]) {
    let (ok, out, err) = got;
    assert!(!ok, "accepted ({says} expected): {out}");
    assert!(err.contains(says), "expected `{says}` in: {err}");
    let pairs = agent.pairs();
    assert!(pairs.is_empty(), "a refused request made a pair: {pairs:?}");
    for h in holders {
        assert!(
            !h.was_ever_stopped(),
            "a refused request stopped pid {} ({says})",
            h.pid()
        );
    }
}

/// The escalation tuple pairing allowed: a member joining its own
/// connection to root's (reading and injecting root's stream), or pairing
/// root's proxy outright, and the agent stopping root's proxy to do it.
#[test]
fn a_member_cannot_pair_its_connection_with_roots_by_tuple_and_nobody_is_stopped() {
    let agent = agent("perm-tuple");
    let mine = Holder::socat(&UNPRIVILEGED);
    let mut roots = Holder::socat(&[]);
    let pair = |a: &str, b: &str| agent.zc_as(&MEMBER, &["pair", a, b]);
    refused(
        &agent,
        pair(&mine.tuples[0], &roots.tuples[0]),
        "different processes",
        &[&mine, &roots],
    );
    refused(
        &agent,
        pair(&roots.tuples[0], &roots.tuples[1]),
        "the kernel denies",
        &[&mine, &roots],
    );
    roots.still_relays();
}

/// Targets a comparison of uids let through: every uid of the target is
/// the requester's, and so is /proc/PID, even for a process that is not
/// dumpable (fs/proc/base.c task_dump_owner gives root only the files
/// inside, not the world-readable directory). The kernel's ptrace check
/// for the requester refuses each.
#[test]
fn a_member_cannot_take_sockets_the_kernel_would_not_let_it_ptrace() {
    let agent = agent("perm-kernel");
    let proxy = |user: &[&str]| Holder::socat(user);
    let targets = [
        (
            "a process of its uid holding a capability it lacks",
            proxy(&[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=+net_bind_service",
                "--ambient-caps=+net_bind_service",
                "--bounding-set=-all,+net_bind_service",
            ]),
        ),
        (
            "a process of its uid in another group",
            proxy(&[
                "--reuid=65534",
                "--regid=4244",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ]),
        ),
        (
            "a process of its uid that made itself not dumpable",
            Holder::start(&UNPRIVILEGED, |a, b| {
                vec![
                    "perl".into(),
                    "-e".into(),
                    format!(
                        "use IO::Socket::INET; \
                         syscall({PRCTL}, 4, 0, 0, 0, 0) == 0 or die \"PR_SET_DUMPABLE: $!\"; \
                         my @s = map {{ IO::Socket::INET->new(PeerAddr => $_) or die \"$_: $!\" }} \
                         @ARGV; sleep"
                    ),
                    a.to_string(),
                    b.to_string(),
                ]
            }),
        ),
    ];
    for (what, t) in &targets {
        let status = std::fs::read_to_string(format!("/proc/{}/status", t.pid())).expect("status");
        assert!(
            status.contains("Uid:\t65534\t65534\t65534\t65534"),
            "{what}: {status}"
        );
        let dir = std::fs::metadata(format!("/proc/{}", t.pid())).expect("/proc/PID");
        assert_eq!(dir.uid(), 65534, "{what}: /proc/PID is the requester's");
        let (pid, fds) = (t.pid().to_string(), t.fds.map(|f| f.to_string()));
        let got = agent.zc_as(
            &MEMBER,
            &["pair", "--pid", &pid, "--fd", &fds[0], "--fd", &fds[1]],
        );
        eprintln!("{what}: {}", got.2.trim());
        refused(&agent, got, "the kernel denies", &[t]);
    }
    // pidfd_getfd never checks a process's own threads: a request naming
    // the agent itself would hand over every socket it holds.
    let me = agent.child.as_ref().expect("agent").id().to_string();
    refused(
        &agent,
        agent.zc_as(&MEMBER, &["pair", "--pid", &me, "--fd", "3", "--fd", "4"]),
        "is the agent itself",
        &[],
    );
}

/// prctl(2) on this architecture (`perl -e syscall` takes the number).
#[cfg(target_arch = "x86_64")]
const PRCTL: u32 = 157;
#[cfg(target_arch = "aarch64")]
const PRCTL: u32 = 167;

/// The positive control: what the kernel allows, the member gets, by
/// pid and fd and by tuple, and the bytes then cross the kernel.
#[test]
fn a_member_may_pair_its_own_proxy_by_pid_and_fd() {
    let agent = agent("perm-own-pid");
    let mut mine = Holder::socat(&UNPRIVILEGED);
    let (pid, fds) = (mine.pid().to_string(), mine.fds.map(|f| f.to_string()));
    let got = agent.zc_as(
        &MEMBER,
        &["pair", "--pid", &pid, "--fd", &fds[0], "--fd", &fds[1]],
    );
    paired_and_carried(&agent, got, &mut mine);
}

#[test]
fn a_member_may_pair_its_own_proxy_by_tuple() {
    let agent = agent("perm-own-tuple");
    let mut mine = Holder::socat(&UNPRIVILEGED);
    let [a, b] = mine.tuples.clone();
    let got = agent.zc_as(&MEMBER, &["pair", &a, &b]);
    paired_and_carried(&agent, got, &mut mine);
}

/// The pair was made, the kernel carried bytes both ways intact, and the
/// member may end it.
fn paired_and_carried(agent: &Agent, got: (bool, String, String), proxy: &mut Holder) {
    let (ok, out, err) = got;
    assert!(ok, "the member could not pair its own proxy: {err}");
    assert!(out.starts_with("pair "), "{out}");
    // The agent stops the owner while it pairs: the check the refusal
    // tests rely on sees that.
    assert!(proxy.was_ever_stopped(), "pairing did not stop the owner");
    const N: u64 = 16 << 20;
    let [a, b] = &mut proxy.ends;
    exchange(a, b, N);
    let (ok, stats, err) = agent.zc(&["stats", "--json"]);
    assert!(ok, "zc stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats json");
    let bytes = &stats["pairs"][0]["bytes"];
    assert_eq!(
        bytes[0], N,
        "the kernel carried every byte one way: {stats}"
    );
    assert_eq!(bytes[1], N, "and the other: {stats}");
    let id = agent.pairs()[0]["id"].to_string();
    let (ok, _, err) = agent.zc_as(&MEMBER, &["unpair", &id]);
    assert!(ok, "the member could not end its pair: {err}");
    assert!(agent.pairs().is_empty());
    proxy.still_relays();
}
