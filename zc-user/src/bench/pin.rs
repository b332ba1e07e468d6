//! `--pin`: the client and the server load generators each on a CPU of
//! their own, so the scheduler neither stacks them on one CPU nor moves
//! them between samples. The relay stays unpinned, as it would run in
//! production; so does the bench's main thread, because the relays it
//! starts inherit its affinity.
use anyhow::{Context as _, Result, anyhow, bail};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Pinning {
    pub client_cpu: usize,
    pub server_cpu: usize,
}

impl Pinning {
    /// The first two CPUs this process may run on.
    pub fn choose() -> Result<Self> {
        let set =
            sched_getaffinity(Pid::from_raw(0)).context("reading the bench's CPU affinity")?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .take(2)
            .collect();
        match cpus[..] {
            [client_cpu, server_cpu] => Ok(Self {
                client_cpu,
                server_cpu,
            }),
            _ => bail!(
                "--pin needs two CPUs, one for the client and one for the server; the bench may \
                 run on {} only",
                cpus.len()
            ),
        }
    }
}

/// Pins the calling thread, and the threads it starts from now on (they
/// inherit its affinity), to `cpu`.
pub fn pin_this_thread(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} is beyond the CPU set's size"))?;
    // Pid 0 is the calling thread, not the whole process.
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// Runs `f` on a thread of its own pinned to `cpu`, or right here when
/// there is no CPU to pin to.
pub fn on_cpu<T: Send>(cpu: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(cpu) = cpu else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_this_thread(cpu)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("a pinned load thread panicked"))?
    })
}
