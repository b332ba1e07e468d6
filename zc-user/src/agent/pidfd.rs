//! A process held by a pidfd. Its pid names it once, when it is opened;
//! after that its fds are taken and signals sent through the pidfd, and
//! every /proc read (its thread list, for stopping it: see `stop`) goes
//! through the /proc/PID directory opened beside it. Both keep naming that
//! process after it exits (signals fail with ESRCH, reads with ESRCH), so a
//! pid the kernel hands to a new process is never hit.
use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal},
};

use super::{
    proto::ErrorKind,
    take::{Refusal, refuse},
};

#[derive(Debug)]
pub struct Process {
    pid: i32,
    pidfd: OwnedFd,
    proc_dir: File,
}

impl Process {
    /// The process `pid` names now. The agent itself is refused: the kernel
    /// lets a process take its own fds without any check, and stopping
    /// itself would hang it.
    pub fn open(pid: i32) -> Result<Self, Refusal> {
        let gone = || refuse(ErrorKind::NotFound, format!("no process with pid {pid}"));
        if i64::from(pid) == i64::from(std::process::id()) {
            return Err(refuse(
                ErrorKind::Denied,
                format!("pid {pid} is the agent itself"),
            ));
        }
        let p = (pid > 0)
            .then(|| Pid::from_raw(pid))
            .flatten()
            .ok_or_else(gone)?;
        let pidfd = pidfd_open(p, PidfdFlags::empty()).map_err(|e| match e {
            rustix::io::Errno::SRCH => gone(),
            rustix::io::Errno::INVAL => refuse(
                ErrorKind::NotFound,
                format!("pid {pid} is a thread, not a process (give its process id)"),
            ),
            e => refuse(ErrorKind::Internal, format!("pidfd_open({pid}): {e}")),
        })?;
        let proc_dir = File::open(format!("/proc/{pid}")).map_err(|_| gone())?;
        let me = Self {
            pid,
            pidfd,
            proc_dir,
        };
        // A pid is reused only after its process has exited and been
        // reaped; alive now, it was this process when /proc/PID was opened.
        if !me.alive() {
            return Err(gone());
        }
        Ok(me)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        pidfd_send_signal(&self.pidfd, sig).map_err(io::Error::from)
    }

    /// Whether the process has not exited: the kernel makes a pidfd
    /// readable when it does (zombies included).
    pub fn alive(&self) -> bool {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&Timespec::default())), Ok(0))
    }

    /// `rel` under this process's /proc directory, e.g. "task" or
    /// "net/tcp": the path goes through the agent's descriptor for the
    /// directory, so it never reaches another process that got the pid.
    pub fn proc_path(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{rel}", self.proc_dir.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_followed_by_its_pidfd_not_its_pid() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let p = Process::open(child.id() as i32).expect("open");
        assert!(p.alive());
        let status = std::fs::read_to_string(p.proc_path("status")).expect("status");
        // The pid, not the name: the child may not have exec'd sleep yet.
        let pid_line = format!("\nPid:\t{}\n", child.id());
        assert!(status.contains(&pid_line), "{status}");
        child.kill().expect("kill");
        child.wait().expect("wait");
        // Reaped: the pid is free for reuse, and nothing reaches it now.
        assert!(!p.alive());
        assert!(std::fs::read_to_string(p.proc_path("status")).is_err());
        assert!(p.signal(Signal::CONT).is_err());
    }

    #[test]
    fn the_agent_itself_and_unknown_pids_are_refused() {
        let me = Process::open(std::process::id() as i32).expect_err("self");
        assert!(me.message.contains("the agent itself"), "{}", me.message);
        for pid in [0, -1, 999_999_999] {
            let e = Process::open(pid).expect_err("no such process");
            assert!(e.message.contains("no process with pid"), "{}", e.message);
        }
    }
}
