//! Recording (`zc_sockops` on a cgroup): established sockets by 4-tuple,
//! so the agent can pair sockets named as `ss` prints them.
use zc_common::{Recorded, SockKey};

use super::{LoadError, Programs};

impl Programs {
    /// Attaches `zc_sockops` to the cgroup v2 directory `cgroup`: sockets
    /// established there from now on are recorded by 4-tuple (see
    /// [`Self::recorded`]). It attaches as a BPF link, which coexists with
    /// other links on the cgroup (link_create refuses the multi flag).
    pub fn enable_recording(&self, cgroup: &std::path::Path) -> Result<(), LoadError> {
        let dir = std::fs::File::open(cgroup)
            .map_err(|e| LoadError::Recording(format!("opening {}: {e}", cgroup.display())))?;
        let mut ebpf = self.ebpf();
        let prog: &mut aya::programs::SockOps = ebpf
            .program_mut("zc_sockops")
            .ok_or(LoadError::MissingProgram("zc_sockops"))?
            .try_into()
            .map_err(|e| LoadError::Program("zc_sockops", e))?;
        prog.load()
            .map_err(|e| LoadError::Program("zc_sockops", e))?;
        prog.attach(&dir, aya::programs::CgroupAttachMode::Single)
            .map_err(|e| LoadError::Program("zc_sockops", e))?;
        Ok(())
    }

    /// Sockets `zc_sockops` could not record because `RECORDED` was full,
    /// since the map was created.
    pub fn recording_lost(&self) -> u64 {
        let ebpf = self.ebpf();
        ebpf.map("RECORD_STATS")
            .and_then(|m| aya::maps::PerCpuArray::<_, u64>::try_from(m).ok())
            .and_then(|stats| stats.get(&0, 0).ok())
            .map_or(0, |v| v.iter().sum())
    }

    /// The established socket recorded under `key`, if any.
    pub fn recorded(&self, key: &SockKey) -> Option<Recorded> {
        self.maps().recorded.get(key, 0).ok()
    }
}
