//! The agent's pin directory on bpffs (`--pin-dir`, /sys/fs/bpf/zc).
//! bpffs is mounted 1777, so anyone may create that directory first, and
//! aya reuses whatever map is pinned under a name without looking at it:
//! a user who made the directory could remove or replace the agent's pins,
//! and a squatted name made the agent fail over to splice. So the agent
//! owns its directory (its uid, 0700, under ancestors only root can
//! change), records the layout of what it pins there (an empty directory
//! `layout-vN`), and refuses to start over anything else, naming the path
//! and what to do, before it loads or attaches anything.
use std::{
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::Path,
};

use anyhow::{Context as _, Result, bail};

use crate::ebpf::{HOLD_LINK_PREFIX, PINNED};

/// The layout of the pins: which maps, their definitions and what their
/// keys mean. 2: IPv4-mapped IPv6 sockets are keyed as IPv4
/// (`SockKey::normalised`); 3: `BY_COOKIE`, and `Peer` carries the
/// socket's cookie; 4: the socket-keyed hash maps are not preallocated
/// (`BPF_F_NO_PREALLOC`); 5: `SockKey` names the socket's network
/// namespace, and the verdict finds every key through `BY_COOKIE`;
/// earlier pins carry no version.
pub const LAYOUT_VERSION: u32 = 6;

const LAYOUT_PREFIX: &str = "layout-v";

/// What [`prepare`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No pins: a new directory, or an empty one of the agent's.
    Empty,
    /// Pins of this layout, which the agent reuses (and adopts pairs from).
    Pins,
}

/// Makes `dir` the agent's pin directory, or says why it cannot be:
/// creates it (0700) if absent; otherwise it must be a directory of the
/// agent's uid, mode 0700, holding only zc's pins of [`LAYOUT_VERSION`],
/// each map defined as this build defines it.
pub fn prepare(dir: &Path) -> Result<Found> {
    let me = nix::unistd::geteuid().as_raw();
    check_ancestors(dir, me)?;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating the pin directory {}", dir.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("looking at {}", dir.display())),
        Ok(_) => {}
    }
    let fix = fix(dir);
    // Checked after creating too: someone may have made it meanwhile.
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("looking at the pin directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "the pin directory {} is not a directory (a link or a file someone made?); {fix}",
            dir.display()
        );
    }
    if meta.uid() != me {
        bail!(
            "the pin directory {} belongs to uid {}, not to the agent (uid {me}): bpffs lets \
             anyone create it, and its owner could remove or replace the agent's pins; {fix}",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o7777 != 0o700 {
        bail!(
            "the pin directory {} has mode {:04o}, not 0700 (made by someone else, or by an \
             older zc); {fix}",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    check_entries(dir, me, &fix)
}

/// Records the layout once the programs are loaded with their maps
/// pinned in `dir`.
pub fn mark(dir: &Path) -> Result<()> {
    let marker = dir.join(format!("{LAYOUT_PREFIX}{LAYOUT_VERSION}"));
    match std::fs::create_dir(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("recording the layout at {}", marker.display())),
    }
}

fn fix(dir: &Path) -> String {
    format!(
        "check who made it, then run `zc agent --cleanup --pin-dir {}` (it removes the \
         directory and everything in it, ending pairs pinned there)",
        dir.display()
    )
}

/// Every ancestor must be one only root (or the agent) can change, or a
/// sticky directory (such as bpffs's root, 1777), where nobody else may
/// rename or remove what the agent made.
fn check_ancestors(dir: &Path, me: u32) -> Result<()> {
    let abs =
        std::path::absolute(dir).with_context(|| format!("making {} absolute", dir.display()))?;
    for a in abs.ancestors().skip(1) {
        let m = match std::fs::symlink_metadata(a) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("looking at {}", a.display())),
        };
        let writable_by_others = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if (m.uid() != 0 && m.uid() != me) || (writable_by_others && !m.is_symlink()) {
            bail!(
                "{} (uid {}, mode {:04o}) can be changed by users other than root, so the pin \
                 directory {} under it could be replaced; give a --pin-dir under directories \
                 only root can change",
                a.display(),
                m.uid(),
                m.mode() & 0o7777,
                dir.display()
            );
        }
    }
    Ok(())
}

fn check_entries(dir: &Path, me: u32, fix: &str) -> Result<Found> {
    let mut unexpected = Vec::new();
    let mut layouts = Vec::new();
    let mut maps = Vec::new();
    let mut links = 0;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("listing the pin directory {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("listing the pin directory {}", dir.display()))?;
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("looking at {}", path.display()))?;
        if meta.uid() != me {
            bail!(
                "{} belongs to uid {}, not to the agent (uid {me}); {fix}",
                path.display(),
                meta.uid()
            );
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if PINNED.contains(&name.as_str()) {
            maps.push(name);
        } else if name
            .strip_prefix(HOLD_LINK_PREFIX)
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit() || b == b'_'))
        {
            links += 1;
        } else if let Some(v) = name.strip_prefix(LAYOUT_PREFIX) {
            layouts.push(v.to_string());
        } else {
            unexpected.push(name);
        }
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        bail!(
            "the pin directory {} holds entries zc never pins there: {}; {fix}",
            dir.display(),
            unexpected.join(", ")
        );
    }
    if maps.is_empty() && links == 0 && layouts.is_empty() {
        return Ok(Found::Empty);
    }
    let want = LAYOUT_VERSION.to_string();
    match &layouts[..] {
        [v] if *v == want => {}
        [] => bail!(
            "the pin directory {} holds pins without a layout version, made by an older zc; \
             this one (layout v{LAYOUT_VERSION}) cannot adopt them: stop the agent that made \
             them, then {}",
            dir.display(),
            cleanup_hint(dir)
        ),
        found => bail!(
            "the pin directory {} holds pins of layout v{}; this zc uses layout \
             v{LAYOUT_VERSION} and cannot adopt them: stop the agent that made them, then {}",
            dir.display(),
            found.join(", v"),
            cleanup_hint(dir)
        ),
    }
    let specs = crate::ebpf::pinned_map_specs().map_err(anyhow::Error::msg)?;
    for name in maps {
        let Some(want) = specs.get(name.as_str()) else {
            continue;
        };
        let path = dir.join(&name);
        let got = crate::ebpf::MapSpec::of_pinned(&path)
            .with_context(|| format!("{} is not a map zc can open; {fix}", path.display()))?;
        if got != *want {
            bail!(
                "the map pinned at {} ({got}) is not the `{name}` this zc defines ({want}): \
                 pinned by another build; stop the agent that made it, then {}",
                path.display(),
                cleanup_hint(dir)
            );
        }
    }
    Ok(Found::Pins)
}

fn cleanup_hint(dir: &Path) -> String {
    format!(
        "`zc agent --cleanup --pin-dir {}` (which ends the pairs pinned there)",
        dir.display()
    )
}

/// What [`remove_all`] removed.
#[derive(Debug, Default)]
pub struct Removed {
    /// Pinned objects and markers removed.
    pub entries: usize,
    /// Why the directory was not the agent's own, when it was not.
    pub foreign: Vec<String>,
}

/// Removes the pin directory and everything in it (`--cleanup`, and
/// `--unpin-on-exit`); a map is freed, and its sockets released from it,
/// once nothing else holds it. Works on a directory someone else made
/// too: through a descriptor of the directory itself (never following a
/// link planted at its path), entry by entry.
pub fn remove_all(dir: &Path) -> Result<Removed> {
    use rustix::fs::{AtFlags, CWD, Mode, OFlags};
    let mut removed = Removed::default();
    let me = nix::unistd::geteuid().as_raw();
    let fd = match rustix::fs::openat(
        CWD,
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(removed),
        Err(e) => {
            return Err(std::io::Error::from(e)).with_context(|| {
                format!(
                    "opening the pin directory {} (a link or a file?)",
                    dir.display()
                )
            });
        }
    };
    let st = rustix::fs::fstat(&fd).with_context(|| format!("looking at {}", dir.display()))?;
    if st.st_uid != me {
        removed
            .foreign
            .push(format!("it belonged to uid {}", st.st_uid));
    }
    if st.st_mode & 0o7777 != 0o700 {
        removed
            .foreign
            .push(format!("its mode was {:04o}", st.st_mode & 0o7777));
    }
    remove_entries(&fd, dir, 0, &mut removed)?;
    drop(fd);
    rustix::fs::unlinkat(CWD, dir, AtFlags::REMOVEDIR)
        .map_err(std::io::Error::from)
        .with_context(|| format!("removing {}", dir.display()))?;
    Ok(removed)
}

/// Removes what the directory `fd` (at `path`) holds, subdirectories
/// included (a marker, or what a squatter made), a few levels deep.
fn remove_entries(
    fd: &rustix::fd::OwnedFd,
    path: &Path,
    depth: u32,
    removed: &mut Removed,
) -> Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let names: Vec<std::ffi::CString> = rustix::fs::Dir::read_from(fd)
        .with_context(|| format!("listing {}", path.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        let shown = path.join(name.to_string_lossy().as_ref());
        let known = {
            let n = name.to_string_lossy();
            PINNED.contains(&&*n) || n.starts_with(HOLD_LINK_PREFIX) || n.starts_with(LAYOUT_PREFIX)
        };
        if !known {
            removed
                .foreign
                .push(format!("it held {}, which zc never pins", shown.display()));
        }
        let st = rustix::fs::statat(fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(std::io::Error::from)
            .with_context(|| format!("looking at {}", shown.display()))?;
        let how = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if depth >= 4 {
                bail!("{} is nested too deep; remove it yourself", shown.display());
            }
            let sub = rustix::fs::openat(
                fd,
                name.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(std::io::Error::from)
            .with_context(|| format!("opening {}", shown.display()))?;
            remove_entries(&sub, &shown, depth + 1, removed)?;
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(fd, name.as_c_str(), how)
            .map_err(std::io::Error::from)
            .with_context(|| format!("removing {}", shown.display()))?;
        removed.entries += 1;
    }
    Ok(())
}
