//! The kernel's log as a witness for the test suite. The tests load BPF
//! into the running kernel and drive sockmap through its rare paths; a
//! kernel warning logged meanwhile (a socket freed with memory still
//! charged to it, a lock held too long) means zc made the host's kernel
//! unhappy even when every byte arrived, so the suite fails on it.
use std::{
    fs::{File, OpenOptions},
    io::{ErrorKind, Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
};

use anyhow::{Context as _, Result};

/// What a kernel record starts with when something went wrong in the
/// kernel itself (WARN_ON, BUG_ON, an oops, the hung-task and RCU stall
/// detectors). Messages that report load, such as "Possible SYN
/// flooding" or "out of memory -- consider tuning tcp_mem", are not
/// among them: the tests cause those on purpose.
const ALARMS: [&str; 7] = [
    "WARNING:",
    "BUG:",
    "kernel BUG",
    "Oops",
    "general protection fault",
    "INFO: task",
    "rcu: INFO:",
];

/// Kernel warnings seen during the suite whose trigger is not found yet,
/// as (what the message contains, why it is let through). Each is still
/// printed; any other warning fails the suite.
const KNOWN: [(&str, &str); 1] = [(
    "inet_sock_destruct",
    "a socket freed from sk_psock_destroy with memory still charged to it \
     (af_inet.c, WARN_ON_ONCE: once per boot), seen in the first \
     whole-suite run on each of two boots of 6.18.44: sockmap's worker \
     charges a held byte that waited \
     behind redirected ones without the socket's lock, so updates are lost \
     (reproduced: idle relay sockets keep 779-3,317 bytes of forward \
     allocation after both directions were held; README, \"Not yet \
     bounded: both directions in bulk at once\"; reported upstream in \
     May 2025)",
)];

/// Why a warning is let through, if it is a [`KNOWN`] one.
pub fn known(message: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .find(|(what, _)| message.contains(what))
        .map(|(_, why)| *why)
}

/// Is this log message one of [`ALARMS`]?
pub fn is_alarm(message: &str) -> bool {
    let m = message.trim_start();
    ALARMS.iter().any(|a| m.starts_with(a))
}

/// The message of one /dev/kmsg record ("prio,seq,usec,flags;message",
/// then continuation lines, which start with a space).
fn message(record: &str) -> &str {
    record
        .split_once(';')
        .map_or(record, |(_, m)| m)
        .lines()
        .next()
        .unwrap_or("")
}

/// A reader of the kernel log positioned at the moment it was opened.
pub struct Watch {
    log: File,
}

impl Watch {
    /// Starts watching: only records logged from now on are read.
    pub fn start() -> Result<Self> {
        let mut log = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .context("opening /dev/kmsg to watch for kernel warnings (needs root)")?;
        log.seek(SeekFrom::End(0))
            .context("moving to the end of the kernel log")?;
        Ok(Self { log })
    }

    /// The alarming messages logged since [`Watch::start`].
    pub fn alarms(self) -> Result<Vec<String>> {
        Ok(self
            .messages()?
            .into_iter()
            .filter(|m| is_alarm(m))
            .collect())
    }

    /// Every message logged since [`Watch::start`] (the first line of
    /// each record).
    fn messages(mut self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        // One read returns one record; the kernel's records are shorter.
        let mut buf = vec![0u8; 8192];
        loop {
            match self.log.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]);
                    found.push(message(&record).to_string());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The ring overwrote records before they were read: say
                // so, since a lost one may have been a warning.
                Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                    found.push("WARNING: (zc xtask) kernel log records were overwritten before they were read".into());
                }
                Err(e) => return Err(e).context("reading the kernel log"),
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_warnings_and_leaves_load_reports() {
        let warn = "4,1234,5678,-;WARNING: CPU: 1 PID: 7 at net/ipv4/af_inet.c:157 inet_sock_destruct+0x1a0/0x1f0\n SUBSYSTEM=net";
        assert!(is_alarm(message(warn)));
        assert_eq!(
            message(warn),
            "WARNING: CPU: 1 PID: 7 at net/ipv4/af_inet.c:157 inet_sock_destruct+0x1a0/0x1f0"
        );
        assert!(is_alarm(message(
            "1,9,10,-;BUG: kernel NULL pointer dereference"
        )));
        assert!(!is_alarm(message(
            "6,9,10,-;TCP: request_sock_TCP: Possible SYN flooding on port 40000"
        )));
        assert!(!is_alarm(message(
            "4,9,10,-;TCP: out of memory -- consider tuning tcp_mem"
        )));
        assert!(known(message(warn)).is_some());
        assert!(known("WARNING: CPU: 0 PID: 1 at net/core/skmsg.c:700 sk_psock_backlog").is_none());
    }

    /// Needs root: writes a record into the live log and reads it back.
    /// The record is no alarm, so a suite being watched meanwhile (this
    /// test is part of it) does not fail on it.
    #[test]
    fn sees_a_record_written_after_start() {
        let before = "zc xtask kmsg self-test: before the watch";
        let after = "zc xtask kmsg self-test: after the watch started";
        std::fs::write("/dev/kmsg", format!("{before}\n")).expect("writing to /dev/kmsg (root)");
        let watch = Watch::start().expect("the kernel log (run as root)");
        std::fs::write("/dev/kmsg", format!("{after}\n")).expect("writing to /dev/kmsg");
        let seen = watch.messages().expect("reading the kernel log");
        assert!(
            seen.iter().any(|m| m.contains(after)),
            "the record written after start was not read back: {seen:?}"
        );
        assert!(
            !seen.iter().any(|m| m.contains(before)),
            "a record from before the start was read: {seen:?}"
        );
    }
}
