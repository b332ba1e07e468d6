//! ptrace(2) and waitpid(2), each wrapped once, for holding another
//! process's threads still (see `stop`). The kernel ties a tracee to the
//! *thread* that attached it, not to the process: every call here for a
//! tid must come from the thread that seized it.
use std::{io, ptr};

/// `PTRACE_EVENT_STOP` (include/uapi/linux/ptrace.h): the stop a seized
/// tracee reports for PTRACE_INTERRUPT and for a group stop.
const PTRACE_EVENT_STOP: i32 = 128;

/// Attaches to thread `tid` without stopping it (PTRACE_SEIZE). No events
/// are traced, and nothing about the thread changes until it is
/// interrupted; PTRACE_O_TRACESYSGOOD only marks the stops [`syscall`]
/// asks for, so they cannot be taken for a SIGTRAP.
pub fn seize(tid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_SEIZE reads no memory (addr 0, data: the options).
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            tid,
            ptr::null_mut::<libc::c_void>(),
            libc::PTRACE_O_TRACESYSGOOD as usize as *mut libc::c_void,
        )
    })
}

/// Lets stopped tracee `tid` run to its next system call entry or exit
/// (PTRACE_SYSCALL), delivering `signal` (0: none) if it stopped to take
/// one.
pub fn syscall(tid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: PTRACE_SYSCALL takes the signal number as its data argument,
    // not as a pointer.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SYSCALL,
            tid,
            ptr::null_mut::<libc::c_void>(),
            signal as usize as *mut libc::c_void,
        )
    })
}

/// Asks seized thread `tid` to stop (PTRACE_INTERRUPT). It stops at its
/// next return towards user space; a blocking system call is interrupted
/// and, for most calls, restarted when the thread goes on.
pub fn interrupt(tid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_INTERRUPT takes no pointers.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_INTERRUPT,
            tid,
            ptr::null_mut::<libc::c_void>(),
            ptr::null_mut::<libc::c_void>(),
        )
    })
}

/// Lets stopped tracee `tid` go (PTRACE_DETACH), delivering `signal` (0:
/// none) if it stopped to take one. A group stop in effect resumes as a
/// plain stop (kernel/ptrace.c, `__ptrace_unlink`).
pub fn detach(tid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: PTRACE_DETACH takes the signal number as its data argument,
    // not as a pointer.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            tid,
            ptr::null_mut::<libc::c_void>(),
            signal as usize as *mut libc::c_void,
        )
    })
}

/// Where a tracee stopped at a system call stands, from its registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallStop {
    /// Entering call `nr` (x86_64 puts -ENOSYS in rax until it runs).
    Entry { nr: i64 },
    /// Returning `ret` from call `nr`.
    Exit { nr: i64, ret: i64 },
}

/// Reads where stopped tracee `tid` stands in its system call.
#[cfg(target_arch = "x86_64")]
pub fn syscall_stop(tid: i32) -> io::Result<SyscallStop> {
    let r = regs(tid)?;
    let (nr, ret) = (r.orig_rax as i64, r.rax as i64);
    Ok(if ret == -i64::from(libc::ENOSYS) {
        SyscallStop::Entry { nr }
    } else {
        SyscallStop::Exit { nr, ret }
    })
}

/// Makes tracee `tid`, stopped at the exit of a system call, run the
/// same call again, as the kernel restarts an interrupted one
/// (arch/x86/kernel/signal.c: rax back to the call number, rip back over
/// the two-byte `syscall` instruction).
#[cfg(target_arch = "x86_64")]
pub fn rerun_syscall(tid: i32) -> io::Result<()> {
    let mut r = regs(tid)?;
    r.rax = r.orig_rax;
    r.rip -= 2;
    // SAFETY: PTRACE_SETREGS reads one user_regs_struct from `r`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGS,
            tid,
            ptr::null_mut::<libc::c_void>(),
            (&raw const r).cast_mut().cast::<libc::c_void>(),
        )
    })
}

#[cfg(target_arch = "x86_64")]
fn regs(tid: i32) -> io::Result<libc::user_regs_struct> {
    // SAFETY: all-zero is a valid user_regs_struct (plain integers).
    let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GETREGS writes one user_regs_struct into `r`.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            tid,
            ptr::null_mut::<libc::c_void>(),
            (&raw mut r).cast::<libc::c_void>(),
        )
    })?;
    Ok(r)
}

/// What a tracee is doing, as waitpid(2) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// Still running towards its stop.
    Running,
    /// Stopped. `signal` is a signal the thread was about to take when it
    /// stopped (a signal-delivery stop): it must be given back at detach,
    /// or it would be lost.
    Stopped { signal: Option<i32> },
    /// Stopped at a system call's entry or exit, as [`syscall`] asked.
    AtSyscall,
    /// Exited, or no longer ours to wait for.
    Gone,
}

/// Checks, without blocking, whether tracee `tid` has stopped.
pub fn poll(tid: i32) -> io::Result<Waited> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid int for the call to write.
        let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if rc == 0 {
            return Ok(Waited::Running);
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return Ok(Waited::Gone),
                _ => return Err(e),
            }
        }
        return Ok(decode(status));
    }
}

fn decode(status: i32) -> Waited {
    if !libc::WIFSTOPPED(status) {
        return Waited::Gone;
    }
    // PTRACE_O_TRACESYSGOOD sets 0x80 in a syscall stop's signal.
    if libc::WSTOPSIG(status) == libc::SIGTRAP | 0x80 {
        return Waited::AtSyscall;
    }
    // The event sits above the stop signal (ptrace(2), "PTRACE_EVENT
    // stops"); none but PTRACE_EVENT_STOP is asked for. With no event the
    // stop is a signal-delivery stop for that signal.
    let event = (status >> 16) & 0xff;
    let signal = (event == 0).then(|| libc::WSTOPSIG(status));
    debug_assert!(event == 0 || event == PTRACE_EVENT_STOP, "event {event}");
    Waited::Stopped { signal }
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status words as the kernel builds them (kernel/exit.c,
    /// wait_task_stopped: `(exit_code << 8) | 0x7f`; ptrace events put the
    /// event above the signal).
    #[test]
    fn stops_decode_to_the_signal_to_give_back() {
        let stop = |sig: i32, event: i32| (event << 8 | sig) << 8 | 0x7f;
        assert_eq!(
            decode(stop(libc::SIGTRAP, PTRACE_EVENT_STOP)),
            Waited::Stopped { signal: None },
            "PTRACE_INTERRUPT"
        );
        assert_eq!(
            decode(stop(libc::SIGSTOP, PTRACE_EVENT_STOP)),
            Waited::Stopped { signal: None },
            "a group stop"
        );
        assert_eq!(
            decode(stop(libc::SIGUSR1, 0)),
            Waited::Stopped {
                signal: Some(libc::SIGUSR1)
            },
            "a signal on its way"
        );
        assert_eq!(
            decode(stop(libc::SIGRTMIN() + 3, 0)),
            Waited::Stopped {
                signal: Some(libc::SIGRTMIN() + 3)
            },
            "a real-time signal"
        );
        assert_eq!(
            decode(stop(libc::SIGTRAP | 0x80, 0)),
            Waited::AtSyscall,
            "a syscall stop"
        );
        assert_eq!(decode(9), Waited::Gone, "killed by SIGKILL");
        assert_eq!(decode(3 << 8), Waited::Gone, "exited with 3");
    }
}
