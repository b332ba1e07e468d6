//! One agent at a time. Two agents on one pin directory would replace
//! each other's FIN hold links and write the same maps; two racing to
//! mount bpffs stack two mounts, and the pins made in the lower one are
//! hidden. So before it touches anything an agent takes an flock(2) on a
//! lock file under /run/zc for its pin directory and for its control
//! socket (released by the kernel however the agent ends, `kill -9`
//! included), and mounts bpffs only while holding a third.
use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

/// Where the lock files live (root's: /run is writable by root only).
pub const LOCK_DIR: &str = "/run/zc";

/// A held lock; dropping it (or the process ending) releases it.
pub struct Lock {
    _file: Flock<File>,
    pub path: PathBuf,
}

/// The lock file for an agent's pin directory, e.g.
/// `/run/zc/pins-sys-fs-bpf-zc.lock` for `/sys/fs/bpf/zc`.
pub fn pin_dir_lock(pin_dir: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(pin_dir)
        .with_context(|| format!("making {} absolute", pin_dir.display()))?;
    let name = abs.to_string_lossy().trim_matches('/').replace('/', "-");
    Ok(Path::new(LOCK_DIR).join(format!("pins-{name}.lock")))
}

/// The lock file for a control socket: beside it, `PATH.lock`.
pub fn socket_lock(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the lock at `path` for `what` (e.g. "the pin directory
/// /sys/fs/bpf/zc"), or says which process holds it.
pub fn take(path: &Path, what: &str) -> Result<Lock> {
    take_with(path, what, FlockArg::LockExclusiveNonblock)
}

/// Waits for the lock at `path` (a short critical section, such as
/// mounting bpffs).
pub fn wait(path: &Path, what: &str) -> Result<Lock> {
    take_with(path, what, FlockArg::LockExclusive)
}

fn take_with(path: &Path, what: &str, how: FlockArg) -> Result<Lock> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Never through a link planted at the path; 0600, root's.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    let mut file = match Flock::lock(file, how) {
        Ok(f) => f,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            bail!(
                "another zc agent{holder} holds {} for {what}; stop it first (only one agent \
                 may use them at a time)",
                path.display()
            );
        }
        Err((_, e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    };
    // Who holds it, for the message above.
    let pid = std::process::id();
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(*file, "{pid}");
    Ok(Lock {
        _file: file,
        path: path.to_path_buf(),
    })
}
