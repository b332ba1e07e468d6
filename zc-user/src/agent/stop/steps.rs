//! Stepping an owner of one thread to a place where it may be paired, and
//! letting it go so that its next poll or select cannot answer a paired
//! socket readable for bytes the verdict takes (see `readiness`).
use std::{
    io,
    time::{Duration, Instant},
};

use log::debug;

use super::{
    State, Tracees,
    ptrace::{self, Waited},
};
use crate::agent::{
    proto::ErrorKind,
    take::{Refusal, refuse},
};

/// Stepping an owner of one thread from system call to system call until
/// it stops where it may be paired.
pub struct Advance {
    /// How long to step before giving up.
    pub budget: Duration,
    /// Whether the owner may be paired as it is stopped now; given the
    /// thread's tid when it is stopped at a system call's entry (the call
    /// has not looked at anything yet).
    pub safe: Box<dyn FnMut(Option<i32>) -> bool + Send>,
    /// At the exit of a poll or select of the thread (given its tid) once the
    /// owner is let go: whether the poll answered a paired socket readable
    /// for bytes that are not there for the owner (see [`Tracees::escort`]).
    pub spurious: Box<dyn FnMut(i32) -> bool + Send>,
    /// Whether the thread (given its tid) sleeps in a poll or select that
    /// nothing but a real event on the paired sockets wakes.
    pub settled: Box<dyn FnMut(i32) -> bool + Send>,
}

/// How long a let-go owner is escorted at most (see [`Tracees::escort`]).
const ESCORT: Duration = Duration::from_millis(200);

/// How long a stepped thread may take to stop once interrupted.
const STOPPING: Duration = Duration::from_millis(100);

impl Tracees {
    /// Steps the only stopped thread from system call to system call until
    /// `a.safe` says yes, for at most `a.budget`; returns whether it did.
    /// The thread is stopped when this returns. Owners of several threads
    /// are only looked at as they are (their threads would run while one
    /// is stepped).
    pub(super) fn advance(&mut self, a: &mut Advance) -> Result<bool, Refusal> {
        let live: Vec<i32> = self
            .0
            .iter()
            .filter(|(_, s)| matches!(s, State::Stopped { .. } | State::Stopping))
            .map(|(&t, _)| t)
            .collect();
        let &[tid] = live.as_slice() else {
            return Ok((a.safe)(None));
        };
        let until = Instant::now() + a.budget;
        let mut entry = false;
        loop {
            if (a.safe)(entry.then_some(tid)) {
                return Ok(true);
            }
            if Instant::now() > until {
                return Ok(false);
            }
            // From an entry its exit comes first, then the next entry.
            let mut reached = true;
            for _ in 0..if entry { 2 } else { 1 } {
                if !self.step(tid, until)? {
                    reached = false;
                    break;
                }
            }
            entry = reached;
        }
    }

    /// Runs stopped `tid` to its next system call stop (true). A thread
    /// that gets none by `until` (blocked in a call) is interrupted and
    /// stopped again (false), as is one that exits or group-stops.
    fn step(&mut self, tid: i32, until: Instant) -> Result<bool, Refusal> {
        let fail = |what: &str, e: io::Error| {
            refuse(
                ErrorKind::Internal,
                format!("{what} thread {tid} while stepping it: {e}"),
            )
        };
        loop {
            let signal = match self.0.get(&tid) {
                Some(State::Stopped { signal }) => signal.unwrap_or(0),
                _ => return Ok(false),
            };
            ptrace::syscall(tid, signal).map_err(|e| fail("resuming", e))?;
            self.0.insert(tid, State::Stopping);
            let mut interrupted = false;
            loop {
                match ptrace::poll(tid).map_err(|e| fail("waiting for", e))? {
                    Waited::Running => {
                        if !interrupted && Instant::now() > until {
                            ptrace::interrupt(tid).map_err(|e| fail("interrupting", e))?;
                            interrupted = true;
                        }
                        if Instant::now() > until + STOPPING {
                            return Err(refuse(
                                ErrorKind::Invalid,
                                format!(
                                    "thread {tid} did not stop again while being stepped \
                                     (uninterruptible sleep?); it was let go"
                                ),
                            ));
                        }
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    Waited::AtSyscall if !interrupted => {
                        self.0.insert(tid, State::Stopped { signal: None });
                        return Ok(true);
                    }
                    Waited::AtSyscall => {
                        // Interrupted in a call: the call's exit stop is
                        // where it stops (the interrupt takes no stop of
                        // its own after it; resuming here let a restarted
                        // select block, and this loop waited for ever).
                        self.0.insert(tid, State::Stopped { signal: None });
                        return Ok(false);
                    }
                    Waited::Stopped { signal } => {
                        self.0.insert(tid, State::Stopped { signal });
                        if signal.is_none() || interrupted {
                            return Ok(false);
                        }
                        // A signal on its way: hand it over and go on.
                        break;
                    }
                    Waited::Gone => {
                        self.0.insert(tid, State::Gone);
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Lets the only thread go, paired, without ever letting a poll or
    /// select of it answer a paired socket readable for bytes the verdict
    /// takes. Bytes that arrive while a socket is locked (the kernel's
    /// worker sending the other direction into it) wait for the stream
    /// parser's work item, and poll reports them meanwhile (tcp_poll counts
    /// `rcv_nxt - copied_seq`); an owner let go into such a poll would
    /// read, and get EAGAIN. So the thread runs traced from call to call: a
    /// poll that answers so (`a.spurious`) is run again, and once the
    /// thread sleeps in one that found nothing (`a.settled`: state S in
    /// /proc, waiting for no paired socket to become writable, which would
    /// wake it) the stopping thread ends without waking it: the kernel then
    /// lets it go as it is (`exit_ptrace`). Not having made a call for a
    /// while is not enough: the thread may be waiting for a CPU. Bounded by
    /// [`ESCORT`]; on other architectures than x86_64 the thread is simply
    /// let go.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn escort(&mut self, a: &mut Advance) {
        let live: Vec<i32> = self
            .0
            .iter()
            .filter(|(_, s)| matches!(s, State::Stopped { .. }))
            .map(|(&t, _)| t)
            .collect();
        let &[tid] = live.as_slice() else {
            return self.detach();
        };
        let until = Instant::now() + ESCORT;
        let mut reruns = 0u32;
        while Instant::now() < until {
            let Some(State::Stopped { signal }) = self.0.get(&tid).copied() else {
                return;
            };
            if ptrace::syscall(tid, signal.unwrap_or(0)).is_err() {
                return;
            }
            self.0.insert(tid, State::Stopping);
            loop {
                match ptrace::poll(tid) {
                    Ok(Waited::Running) if (a.settled)(tid) => {
                        debug!("owner let go asleep ({reruns} polls run again)");
                        // Left running: ending this thread lets it go.
                        return;
                    }
                    Ok(Waited::Running) if Instant::now() > until => {
                        debug!("owner still awake after the escort ({reruns} polls run again)");
                        return;
                    }
                    Ok(Waited::Running) => std::thread::sleep(Duration::from_micros(20)),
                    Ok(Waited::AtSyscall) => {
                        if let Ok(ptrace::SyscallStop::Exit { nr, ret }) = ptrace::syscall_stop(tid)
                            && crate::agent::readiness::is_scan(nr)
                            && ret > 0
                            && (a.spurious)(tid)
                            && ptrace::rerun_syscall(tid).is_ok()
                        {
                            reruns += 1;
                        }
                        self.0.insert(tid, State::Stopped { signal: None });
                        break;
                    }
                    Ok(Waited::Stopped { signal }) => {
                        self.0.insert(tid, State::Stopped { signal });
                        break;
                    }
                    Ok(Waited::Gone) | Err(_) => {
                        self.0.insert(tid, State::Gone);
                        return;
                    }
                }
            }
        }
        debug!("owner still busy after the escort ({reruns} polls run again); letting it go");
        self.detach();
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn escort(&mut self, _: &mut Advance) {
        self.detach();
    }
}
