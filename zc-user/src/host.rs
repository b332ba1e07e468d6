//! Facts about the host that several parts of zc need, each found in one
//! place: where the cgroup2 hierarchy is, mounting pseudo filesystems.
use std::{
    io,
    path::{Path, PathBuf},
};

use log::info;

/// Where zc mounts the cgroup2 hierarchy when the host has none.
pub const CGROUP2_MOUNT: &str = "/run/zc/cgroup2";

/// The root of the cgroup2 hierarchy, mounted on [`CGROUP2_MOUNT`] when a
/// host with cgroup v1 only has none mounted: the v2 hierarchy exists all
/// the same (every process is in its root), it is just not visible.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if let Some(root) = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    }) {
        return Ok(root);
    }
    let root = PathBuf::from(CGROUP2_MOUNT);
    std::fs::create_dir_all(&root)?;
    mount_fs("cgroup2", &root).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "no cgroup2 hierarchy is mounted, and mounting one on {} failed: {e}",
                root.display()
            ),
        )
    })?;
    info!(
        "mounted the cgroup2 hierarchy on {} (the host had none)",
        root.display()
    );
    Ok(root)
}

/// Mounts a pseudo filesystem (`fstype` names the source too) on `target`.
pub fn mount_fs(fstype: &str, target: &Path) -> io::Result<()> {
    nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Clock ticks per second, the unit of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn process_cpu_secs(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields are
    // counted after its last ')'. utime and stime, fields 14 and 15, are
    // then at 11 and 12.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: no field {}", i + 3)))
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}
