//! The host's TCP memory limit and the kernel path.
//!
//! The window bounds each connection, not the host: bytes waiting in the
//! kernel's redirect queues are charged to no socket, so TCP's host-wide
//! limit (`net.ipv4.tcp_mem`) never sees them, and a thousand clients that
//! never read could hold a thousand windows where copy mode stops at
//! tcp_mem. So while TCP's memory is under pressure, [`watch`] shrinks
//! every pair's cap to nothing: each direction is held, its sender stopped
//! by TCP, and what zc forwards meanwhile is charged like any socket's.
//! A held socket still takes, past TCP's hard limit, whatever its window
//! promised, so held sockets also take a smaller receive buffer then.
use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use log::{info, warn};

use crate::ebpf::Programs;

/// Whether [`watch`] last found TCP's memory under pressure.
static UNDER: AtomicBool = AtomicBool::new(false);

/// Whether TCP's memory is under pressure, as [`watch`] last saw it (false
/// where nothing watches).
pub fn under() -> bool {
    UNDER.load(Ordering::Relaxed)
}

/// How often the host's TCP memory is read.
const PERIOD: Duration = Duration::from_millis(100);

/// TCP's memory in use and its limits, in pages (`/proc/net/sockstat`,
/// `/proc/sys/net/ipv4/tcp_mem`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpMem {
    pub pages: u64,
    /// Below this TCP leaves pressure.
    pub low: u64,
    /// From this on TCP is under pressure.
    pub pressure: u64,
}

impl TcpMem {
    pub fn read() -> io::Result<Self> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let pages = parse_sockstat(&std::fs::read_to_string("/proc/net/sockstat")?)
            .ok_or_else(|| bad("no TCP mem in /proc/net/sockstat"))?;
        let [low, pressure, _] = parse_tcp_mem(&std::fs::read_to_string(TCP_MEM)?)
            .ok_or_else(|| bad("/proc/sys/net/ipv4/tcp_mem is not three numbers"))?;
        Ok(Self {
            pages,
            low,
            pressure,
        })
    }

    /// Whether the kernel path should stand back, given whether it did:
    /// from the pressure threshold on, until TCP is below its low mark
    /// again, as TCP itself does.
    pub fn under_pressure(&self, was: bool) -> bool {
        if was {
            self.pages >= self.low
        } else {
            self.pages >= self.pressure
        }
    }
}

/// Global, but shown only in the host's network namespace.
const TCP_MEM: &str = "/proc/sys/net/ipv4/tcp_mem";

/// The `mem` field of the `TCP:` line of `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "mem")?;
    words.next()?.parse().ok()
}

/// The three numbers of `tcp_mem`.
pub fn parse_tcp_mem(text: &str) -> Option<[u64; 3]> {
    let mut n = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    let v = [n.next()??, n.next()??, n.next()??];
    n.next().is_none().then_some(v)
}

/// Follows TCP's memory pressure for as long as the process runs, shrinking
/// every pair's cap while it lasts. Where it cannot be read (another
/// network namespace than the host's shows no tcp_mem), says so once and
/// stops.
pub fn watch(progs: Programs) -> io::Result<thread::JoinHandle<()>> {
    let first = TcpMem::read();
    if let Err(e) = &first {
        info!(
            "TCP's memory limit is not readable here ({e}); the kernel path will not step \
             back when TCP memory runs short"
        );
    }
    thread::Builder::new()
        .name("zc-tcp-mem".into())
        .spawn(move || {
            if first.is_err() {
                return;
            }
            let mut under = false;
            loop {
                let mem = match TcpMem::read() {
                    Ok(m) => m,
                    Err(e) => {
                        warn!("reading TCP's memory use: {e}; no longer following it");
                        // Not left stepped back for good.
                        if under && let Err(e) = step_back(&progs, false) {
                            warn!("undoing the step-back: {e:#}");
                        }
                        return;
                    }
                };
                let now = mem.under_pressure(under);
                if now != under {
                    match step_back(&progs, now) {
                        Ok(()) if now => warn!(
                            "TCP memory under pressure ({} of {} pages): every direction is \
                             held, with a smaller receive buffer, and forwarded in user space \
                             until it falls below {}",
                            mem.pages, mem.pressure, mem.low
                        ),
                        Ok(()) => info!(
                            "TCP memory below {} pages again ({}): the kernel path resumes",
                            mem.low, mem.pages
                        ),
                        // Tried again at the next look.
                        Err(e) => warn!("following TCP memory pressure: {e:#}"),
                    }
                    under = self::under();
                }
                thread::sleep(PERIOD);
            }
        })
}

/// What zc does when TCP's memory goes under pressure (`under`) or leaves
/// it: every pair's cap shrinks to nothing, so every direction is held,
/// and held sockets take the smaller receive buffer
/// (`engine::bpf::switch::held_rcvbuf`); or both are undone.
///
/// The flag is the process's (one relay, one set of programs); it changes
/// only once the caps have.
pub fn step_back(progs: &Programs, under: bool) -> anyhow::Result<()> {
    progs.set_cap_shrink(if under { u64::MAX } else { 0 })?;
    UNDER.store(under, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tcp_line_of_sockstat() {
        let text =
            "sockets: used 160\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 312\nUDP: inuse 1 mem 2\n";
        assert_eq!(parse_sockstat(text), Some(312));
        assert_eq!(parse_sockstat("UDP: inuse 1 mem 2\n"), None);
        assert_eq!(
            parse_tcp_mem("283962\t378617\t567924\n"),
            Some([283962, 378617, 567924])
        );
        assert_eq!(parse_tcp_mem("1 2\n"), None);
        assert_eq!(parse_tcp_mem("1 2 3 4\n"), None);
    }

    #[test]
    fn steps_back_from_the_pressure_mark_until_below_the_low_one() {
        let at = |pages| TcpMem {
            pages,
            low: 100,
            pressure: 200,
        };
        assert!(!at(150).under_pressure(false));
        assert!(at(200).under_pressure(false));
        assert!(at(150).under_pressure(true));
        assert!(!at(99).under_pressure(true));
    }
}
