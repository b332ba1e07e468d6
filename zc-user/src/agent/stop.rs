//! Holding a proxy still while its sockets are paired or handed back,
//! with ptrace rather than SIGSTOP, so that a dead agent can never leave
//! it stopped.
//!
//! A SIGSTOP outlives whoever sent it: an agent killed between SIGSTOP and
//! SIGCONT left the proxy stopped for good. A ptrace stop does not: every
//! thread of the owner is seized (PTRACE_SEIZE) and interrupted
//! (PTRACE_INTERRUPT), and the kernel detaches a tracer's tracees when the
//! tracing thread exits, however it exits, and lets them run
//! (kernel/exit.c, `forget_original_parent` -> `exit_ptrace`). So each stop
//! is one short-lived thread: it seizes, reports, waits to be told to let
//! go, detaches and ends; if the agent dies, or the thread ends early, the
//! kernel lets go. (ptrace is per thread: a tracee answers only the thread
//! that seized it, so nothing else touches these tracees.)
//!
//! Nothing the owner is owed is lost: a signal that arrived as a thread
//! stopped (a signal-delivery stop) is handed back at PTRACE_DETACH; one
//! that arrives during the stop stays pending; a process that was stopped
//! already (SIGSTOP, a shell's ^Z) stays stopped after the detach, and a
//! SIGCONT sent meanwhile does not wake a ptrace-stopped thread. Threads
//! started while the others are being stopped are found by reading the
//! task list again once all known threads have stopped: a stopped thread
//! starts none.
//!
//! A process traced already (a debugger, strace) cannot be seized: the
//! request is refused, and it is not stopped.
//!
//! An owner of one thread can also be stepped to a place where it may be
//! paired, and let go under escort (`steps`).
use std::{
    collections::BTreeMap,
    io,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use log::{debug, error};

use super::{
    pidfd::Process,
    proto::ErrorKind,
    ptrace::{self, Waited},
    take::{Refusal, refuse},
};

mod steps;

pub use self::steps::Advance;

/// The owners of a stop, held still until [`Stopped::release`] (or drop).
pub struct Stopped {
    release: Option<mpsc::SyncSender<()>>,
    released: Option<tokio::sync::oneshot::Receiver<()>>,
    since: Instant,
    bound: Duration,
}

impl Stopped {
    /// When the first thread was asked to stop.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// When the stop must end (see [`stop`]'s `bound`).
    pub fn deadline(&self) -> Instant {
        self.since + self.bound
    }

    /// Lets the owners go on and waits until they have.
    pub async fn release(mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
        if let Some(rx) = self.released.take() {
            let _ = rx.await;
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // Without waiting: the stopping thread detaches on its own.
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

/// Stops every thread of `owners`, each within `bound` of the first
/// interrupt, or refuses and lets go of all of them. The caller should end
/// the stop by [`Stopped::deadline`]; the stopping thread lets go by itself
/// at `ceiling` after the first interrupt, a last resort should the caller
/// never do so.
pub async fn stop(
    owners: &[Arc<Process>],
    bound: Duration,
    ceiling: Duration,
) -> Result<Stopped, Refusal> {
    Ok(stop_advancing(owners, bound, ceiling, None).await?.0)
}

/// [`stop`], then, with `advance`, steps an owner of one thread until
/// `advance.safe` says yes (the owner runs between steps; each stop on the
/// way is short). Returns the stop, and whether it is at such a place
/// (always `true` without `advance`).
pub async fn stop_advancing(
    owners: &[Arc<Process>],
    bound: Duration,
    ceiling: Duration,
    advance: Option<Advance>,
) -> Result<(Stopped, bool), Refusal> {
    let (report, stopped) = tokio::sync::oneshot::channel();
    let (release, told) = mpsc::sync_channel(1);
    let (done, released) = tokio::sync::oneshot::channel();
    let owners = owners.to_vec();
    std::thread::Builder::new()
        .name("zc-stop".into())
        .spawn(move || hold(&owners, bound, ceiling, advance, report, &told, done))
        .map_err(|e| refuse(ErrorKind::Internal, format!("starting a thread: {e}")))?;
    let (since, safe) = stopped
        .await
        .map_err(|_| refuse(ErrorKind::Internal, "the stopping thread ended"))??;
    Ok((
        Stopped {
            release: Some(release),
            released: Some(released),
            since,
            bound,
        },
        safe,
    ))
}

/// The body of one stop's thread.
fn hold(
    owners: &[Arc<Process>],
    bound: Duration,
    ceiling: Duration,
    advance: Option<Advance>,
    report: tokio::sync::oneshot::Sender<Result<(Instant, bool), Refusal>>,
    told: &mpsc::Receiver<()>,
    done: tokio::sync::oneshot::Sender<()>,
) {
    let mut since = Instant::now();
    let mut tracees = Tracees::default();
    let stopped = owners
        .iter()
        .try_for_each(|p| tracees.stop(p, since + bound));
    let mut advance = advance;
    let stopped = match (stopped, advance.as_mut()) {
        (Ok(()), Some(a)) => tracees.advance(a).inspect(|_| {
            // The owner ran between the steps: this stop starts now.
            since = Instant::now();
        }),
        (r, _) => r.map(|()| true),
    };
    let escort = stopped.as_ref().is_ok_and(|&safe| safe);
    let ok = stopped.is_ok();
    if report.send(stopped.map(|safe| (since, safe))).is_err() || !ok {
        // Refused, or nobody is waiting any more.
        tracees.detach();
        return;
    }
    let left = ceiling.saturating_sub(since.elapsed());
    if let Err(mpsc::RecvTimeoutError::Timeout) = told.recv_timeout(left) {
        error!(
            "letting pid(s) {} go after {} ms, though the agent had not finished with them",
            owners
                .iter()
                .map(|p| p.pid().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            ceiling.as_millis()
        );
    }
    match advance.as_mut() {
        Some(a) if escort => tracees.escort(a),
        _ => tracees.detach(),
    }
    debug!("stop released after {:?}", since.elapsed());
    let _ = done.send(());
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Interrupted, not yet stopped.
    Stopping,
    Stopped {
        signal: Option<i32>,
    },
    /// Seized but never interrupted: the tid had been reused by a thread
    /// of another process before it was seized. It runs on, and is let go
    /// when the stopping thread ends.
    Stranger,
    Gone,
}

/// The threads this stop has seized, by tid.
#[derive(Default)]
struct Tracees(BTreeMap<i32, State>);

impl Tracees {
    /// Stops every thread of `p`, including threads started meanwhile.
    fn stop(&mut self, p: &Process, deadline: Instant) -> Result<(), Refusal> {
        loop {
            let mut fresh = false;
            for tid in threads(p)? {
                if let std::collections::btree_map::Entry::Vacant(e) = self.0.entry(tid) {
                    fresh = true;
                    e.insert(seize(p, tid)?);
                }
            }
            if !fresh {
                return Ok(());
            }
            self.wait(p, deadline)?;
        }
    }

    /// Waits until every interrupted thread has stopped (or exited).
    fn wait(&mut self, p: &Process, deadline: Instant) -> Result<(), Refusal> {
        loop {
            let mut stopping = None;
            for (&tid, state) in self.0.iter_mut() {
                if !matches!(state, State::Stopping) {
                    continue;
                }
                *state = match ptrace::poll(tid) {
                    Ok(Waited::Running) => {
                        stopping = Some(tid);
                        State::Stopping
                    }
                    Ok(Waited::Stopped { signal }) => State::Stopped { signal },
                    Ok(Waited::AtSyscall) => State::Stopped { signal: None },
                    Ok(Waited::Gone) => State::Gone,
                    Err(e) => {
                        return Err(refuse(
                            ErrorKind::Internal,
                            format!("waiting for thread {tid} of pid {} to stop: {e}", p.pid()),
                        ));
                    }
                };
            }
            let Some(tid) = stopping else {
                return Ok(());
            };
            if Instant::now() > deadline {
                return Err(refuse(
                    ErrorKind::Invalid,
                    format!(
                        "thread {tid} of pid {} did not stop in time (the bound on stopping a \
                         process, --max-stop): it is in uninterruptible sleep (state D: a \
                         disk, a network file system, a vfork child); nothing was changed",
                        p.pid()
                    ),
                ));
            }
            // Stopping takes a scheduling round of the owner's threads;
            // waitpid has no timeout, so look again shortly.
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Lets every stopped thread go, each with the signal it was about to
    /// take. Threads still on their way to a stop are let go by the kernel
    /// when this thread ends.
    fn detach(&mut self) {
        for (&tid, state) in self.0.iter_mut() {
            if let State::Stopped { signal } = *state {
                if let Err(e) = ptrace::detach(tid, signal.unwrap_or(0))
                    && e.raw_os_error() != Some(libc::ESRCH)
                {
                    error!("detaching from thread {tid}: {e}");
                }
                *state = State::Gone;
            }
        }
    }
}

/// The threads of `p` now.
fn threads(p: &Process) -> Result<Vec<i32>, Refusal> {
    let gone = |e: io::Error| refuse(ErrorKind::NotFound, format!("pid {}: {e}", p.pid()));
    let dir = std::fs::read_dir(p.proc_path("task")).map_err(gone)?;
    Ok(dir
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect())
}

/// Seizes and interrupts thread `tid` of `p`.
fn seize(p: &Process, tid: i32) -> Result<State, Refusal> {
    if let Err(e) = ptrace::seize(tid) {
        return match e.raw_os_error() {
            // Exited since the task list was read.
            Some(libc::ESRCH) => Ok(State::Gone),
            Some(libc::EPERM) => not_traceable(p, tid),
            _ => Err(refuse(
                ErrorKind::Internal,
                format!("ptrace(PTRACE_SEIZE, thread {tid} of pid {}): {e}", p.pid()),
            )),
        };
    }
    // The tid was read from `p`'s task list; had that thread exited and
    // its tid gone to another process since, `p` no longer lists it. Once
    // seized it cannot change hands: a traced thread that exits stays a
    // zombie until its tracer reaps it or goes.
    if !p.proc_path(&format!("task/{tid}")).exists() {
        return Ok(State::Stranger);
    }
    match ptrace::interrupt(tid) {
        Ok(()) => Ok(State::Stopping),
        // It exits; waitpid says so.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(State::Stopping),
        Err(e) => Err(refuse(
            ErrorKind::Internal,
            format!(
                "ptrace(PTRACE_INTERRUPT, thread {tid} of pid {}): {e}",
                p.pid()
            ),
        )),
    }
}

/// Why the kernel would not let the agent seize `tid` (EPERM).
fn not_traceable(p: &Process, tid: i32) -> Result<State, Refusal> {
    let status = std::fs::read_to_string(p.proc_path(&format!("task/{tid}/status")));
    let field = |name: &str| {
        status.as_ref().ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        })
    };
    // An exiting thread (a zombie) cannot be seized, and needs no stop.
    if field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X')) {
        return Ok(State::Gone);
    }
    let pid = p.pid();
    match field("TracerPid:").and_then(|t| t.parse::<i32>().ok()) {
        Some(tracer) if tracer != 0 => Err(refuse(
            ErrorKind::Invalid,
            format!(
                "pid {pid} is being traced by pid {tracer} (a debugger or strace), so the agent \
                 cannot hold it still while pairing; nothing was stopped"
            ),
        )),
        _ => Err(refuse(
            ErrorKind::Denied,
            format!(
                "the kernel does not let the agent ptrace pid {pid} (a security module's rule, or \
                 kernel.yama.ptrace_scope = 3), and pairing needs to hold it still; nothing was \
                 stopped"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter of every thread of `pid` in /proc.
    fn states(pid: u32) -> Vec<char> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("task dir")
            .flatten()
            .map(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).expect("stat");
                let (_, rest) = stat.rsplit_once(") ").expect("comm");
                rest.chars().next().expect("state")
            })
            .collect()
    }

    /// A child process, killed when dropped, so that a failed test
    /// leaves nothing stopped behind.
    struct Kid(std::process::Child);

    impl std::ops::Deref for Kid {
        type Target = std::process::Child;
        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl std::ops::DerefMut for Kid {
        fn deref_mut(&mut self) -> &mut Self::Target {
            &mut self.0
        }
    }

    impl Drop for Kid {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A child that never stops on its own: `sleep`.
    fn sleeper() -> (Kid, Arc<Process>) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let p = Arc::new(Process::open(child.id() as i32).expect("pidfd"));
        (Kid(child), p)
    }

    #[tokio::test]
    async fn a_stopped_owner_is_traced_still_and_runs_again_once_released() {
        root();
        let (mut child, p) = sleeper();
        let s = hold(&p).await;
        assert_eq!(states(child.id()), vec!['t'], "a tracing stop");
        s.release().await;
        assert!(
            states(child.id()).iter().all(|&c| c != 't' && c != 'T'),
            "{:?}",
            states(child.id())
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    /// Stops `p` within a second, for at most 10 s.
    async fn hold(p: &Arc<Process>) -> Stopped {
        stop(
            std::slice::from_ref(p),
            Duration::from_secs(1),
            Duration::from_secs(10),
        )
        .await
        .expect("stop")
    }

    /// Waits (up to 10 s) until every thread of `pid` is in `state`.
    fn wait_for(pid: u32, state: char) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while states(pid).iter().any(|&c| c != state) {
            assert!(Instant::now() < deadline, "{:?}", states(pid));
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn root() {
        if !nix::unistd::geteuid().is_root() {
            panic!("ptrace of another user's process needs root: run the tests as root");
        }
    }

    #[tokio::test]
    async fn a_signal_sent_during_the_stop_is_delivered_after_it() {
        root();
        let (mut child, p) = sleeper();
        let s = hold(&p).await;
        p.signal(rustix::process::Signal::USR1).expect("SIGUSR1");
        assert_eq!(states(child.id()), vec!['t'], "still held");
        s.release().await;
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGUSR1), "{status}");
    }

    #[tokio::test]
    async fn a_process_stopped_already_stays_stopped() {
        root();
        let (mut child, p) = sleeper();
        p.signal(rustix::process::Signal::STOP).expect("SIGSTOP");
        wait_for(child.id(), 'T');
        let s = hold(&p).await;
        // SIGCONT does not wake a thread in a ptrace stop.
        p.signal(rustix::process::Signal::CONT).expect("SIGCONT");
        assert_eq!(states(child.id()), vec!['t']);
        s.release().await;
        wait_for(child.id(), 'S');
        p.signal(rustix::process::Signal::STOP).expect("SIGSTOP");
        wait_for(child.id(), 'T');
        let s = hold(&p).await;
        s.release().await;
        // Detached, it takes up the group stop again (kernel/ptrace.c,
        // __ptrace_unlink), passing through a moment of running.
        wait_for(child.id(), 'T');
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    /// A process that starts a thread every millisecond: every thread it
    /// has while stopped is stopped.
    #[tokio::test]
    async fn threads_started_while_stopping_are_stopped_too() {
        root();
        let mut child = Kid(std::process::Command::new("perl")
            .args([
                "-Mthreads",
                "-e",
                "while (1) { threads->create(sub { select(undef, undef, undef, 0.02) })->detach; \
                 select(undef, undef, undef, 0.001) }",
            ])
            .spawn()
            .expect("perl"));
        let p = Arc::new(Process::open(child.id() as i32).expect("pidfd"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while states(child.id()).len() < 3 {
            assert!(Instant::now() < deadline, "perl started no threads");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut most = 0;
        for _ in 0..20 {
            let s = hold(&p).await;
            let now = states(child.id());
            assert!(now.iter().all(|&c| c == 't'), "{now:?}");
            most = most.max(now.len());
            s.release().await;
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(most >= 3, "at most {most} threads at a stop");
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[tokio::test]
    async fn the_ceiling_lets_an_owner_go_that_the_agent_forgot() {
        root();
        let (mut child, p) = sleeper();
        let mut s = stop(&[p], Duration::from_secs(1), Duration::from_millis(50))
            .await
            .expect("stop");
        // Never told to let go: the sender is neither used nor dropped.
        std::mem::forget(s.release.take());
        let released = s.released.take().expect("receiver");
        released.await.expect("let go by the ceiling");
        assert!(states(child.id()).iter().all(|&c| c != 't'));
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}
