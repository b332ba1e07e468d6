//! What the kernel holds while a system runs: the memory of the relay's
//! own sockets (sock_diag, in the relay's namespace, matched by the
//! inodes its processes' descriptors point at), the host's Slab and
//! MemAvailable, and TCP's memory against its hard limit (tcp_mem). A
//! thread samples them every 50 ms and keeps the peaks.
use std::{collections::HashSet, sync::mpsc, thread::JoinHandle, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};

use zc_user::sock_diag::{SockDiag, SockMem, socket_inodes};

use super::{
    systems,
    topology::{Topology, within},
};

const INTERVAL: Duration = Duration::from_millis(50);

/// One field of /proc/meminfo, KiB.
pub fn meminfo_kib(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("no {field} in /proc/meminfo"))
}

#[derive(Clone, Copy, Debug)]
struct HostMem {
    slab_kib: u64,
    available_kib: u64,
    /// TCP's memory in pages (`/proc/net/sockstat`), where readable.
    tcp_pages: Option<u64>,
}

impl HostMem {
    fn read() -> Result<Self> {
        Ok(Self {
            slab_kib: meminfo_kib("Slab")?,
            available_kib: meminfo_kib("MemAvailable")?,
            tcp_pages: std::fs::read_to_string("/proc/net/sockstat")
                .ok()
                .as_deref()
                .and_then(zc_user::pressure::parse_sockstat),
        })
    }
}

/// tcp_mem's hard limit in pages, where readable (the host's namespace).
pub fn tcp_mem_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
    Some(zc_user::pressure::parse_tcp_mem(&text)?[2])
}

/// Above this many sockets a dump is cheaper than a lookup each.
const LOOKUPS_MAX: usize = 64;

/// The sockets of a relay process and its descendants.
pub struct RelaySockets {
    diag: SockDiag,
    pid: u32,
    /// The relay's TCP sockets as last read, each identifying itself for
    /// the next lookup.
    known: Vec<SockMem>,
    /// Its other sockets (netlink, unix) at the last dump, which no TCP
    /// lookup finds.
    others: HashSet<u32>,
}

impl RelaySockets {
    pub fn open(topo: &Topology, pid: u32) -> Result<Self> {
        Ok(Self {
            diag: within(topo.relay.as_ref(), SockDiag::open)??,
            pid,
            known: Vec::new(),
            others: HashSet::new(),
        })
    }

    /// The relay's TCP sockets now. The process tree is read each time:
    /// a peer such as `socat fork` starts a process per connection. The
    /// namespace is dumped only when the relay holds a socket not seen
    /// before (or many); the ones already known are looked up.
    pub fn read(&mut self) -> Result<Vec<SockMem>> {
        let inodes = socket_inodes(&systems::tree(self.pid));
        if inodes.is_empty() {
            bail!("relay process {} holds no sockets (gone?)", self.pid);
        }
        let known: HashSet<u32> = self.known.iter().map(|s| s.inode).collect();
        let now = if inodes.len() <= LOOKUPS_MAX
            && inodes
                .iter()
                .all(|i| known.contains(i) || self.others.contains(i))
        {
            let ours: Vec<SockMem> = self
                .known
                .iter()
                .filter(|s| inodes.contains(&s.inode))
                .copied()
                .collect();
            self.diag.again(&ours)?
        } else {
            let mut all = self.diag.tcp_sockets()?;
            all.retain(|s| inodes.contains(&s.inode));
            let tcp: HashSet<u32> = all.iter().map(|s| s.inode).collect();
            self.others = inodes.difference(&tcp).copied().collect();
            all
        };
        self.known.clone_from(&now);
        Ok(now)
    }
}

/// The largest values seen from the sampler's start to its end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peaks {
    /// rmem_alloc + wmem_queued over the relay's sockets (None: no relay).
    pub relay_sock_bytes: Option<u64>,
    /// Slab above its value at the start.
    pub slab_growth_kib: u64,
    /// MemAvailable below its value at the start.
    pub available_drop_kib: u64,
    /// The most TCP memory seen, in pages (None: not readable). Past
    /// tcp_mem's hard limit every TCP socket of the host drops what it
    /// receives unless its receive queue is empty.
    pub tcp_pages: Option<u64>,
    pub samples: usize,
}

pub struct Sampler {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<Result<Peaks>>,
}

impl Sampler {
    /// Takes the baseline now and samples until `finish`.
    pub fn start(relay: Option<RelaySockets>) -> Result<Self> {
        let base = HostMem::read()?;
        let (stop, stopped) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("bench-kmem".into())
            .spawn(move || sample_until(base, relay, &stopped))
            .context("starting the memory sampler")?;
        Ok(Self { stop, handle })
    }

    /// Takes one last sample and returns the peaks.
    pub fn finish(self) -> Result<Peaks> {
        let Self { stop, handle } = self;
        let _ = stop.send(());
        handle
            .join()
            .map_err(|_| anyhow!("the memory sampler panicked"))?
    }
}

fn sample_until(
    base: HostMem,
    mut relay: Option<RelaySockets>,
    stopped: &mpsc::Receiver<()>,
) -> Result<Peaks> {
    let mut peaks = Peaks::default();
    loop {
        sample(&base, relay.as_mut(), &mut peaks)?;
        // The channel is the clock: a stop request ends the wait at once,
        // and one last sample is the state at that moment.
        if !matches!(
            stopped.recv_timeout(INTERVAL),
            Err(mpsc::RecvTimeoutError::Timeout)
        ) {
            sample(&base, relay.as_mut(), &mut peaks)?;
            return Ok(peaks);
        }
    }
}

fn sample(base: &HostMem, relay: Option<&mut RelaySockets>, peaks: &mut Peaks) -> Result<()> {
    let host = HostMem::read()?;
    peaks.slab_growth_kib = peaks
        .slab_growth_kib
        .max(host.slab_kib.saturating_sub(base.slab_kib));
    peaks.available_drop_kib = peaks
        .available_drop_kib
        .max(base.available_kib.saturating_sub(host.available_kib));
    if let Some(pages) = host.tcp_pages {
        peaks.tcp_pages = Some(peaks.tcp_pages.unwrap_or(0).max(pages));
    }
    if let Some(r) = relay {
        let bytes: u64 = r.read()?.iter().map(SockMem::bytes).sum();
        peaks.relay_sock_bytes = Some(peaks.relay_sock_bytes.unwrap_or(0).max(bytes));
    }
    peaks.samples += 1;
    Ok(())
}
