//! `cargo xtask dist`: a Debian package of a built `zc`, made with
//! dpkg-deb from a staging tree under target/dist.
//!
//! The package holds the binary (eBPF object embedded), the systemd units
//! (installed, never enabled or started), shell completions and man pages
//! that the binary itself writes, and the docs. Its only maintainer
//! scripts reload systemd so that it sees the units come and go.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{status, workspace_root};

/// Where `cargo xtask dist` leaves the package.
pub fn dist_dir() -> PathBuf {
    workspace_root().join("target/dist")
}

/// Builds `target/dist/zc_<version>_<arch>.deb` from the binary `zc`;
/// returns its path.
pub fn package(zc: &Path) -> Result<PathBuf> {
    let version = zc_version(zc)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let name = format!("zc_{version}_{arch}");
    let root = dist_dir().join(&name);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    stage(zc, &root)?;
    let control = control(&root, &version, &arch, depends(&root.join("usr/bin/zc"))?)?;
    write(&root.join("DEBIAN/control"), &control, 0o644)?;
    for script in ["postinst", "postrm"] {
        write(&root.join("DEBIAN").join(script), DAEMON_RELOAD, 0o755)?;
    }
    let deb = dist_dir().join(format!("{name}.deb"));
    let mut build = Command::new("dpkg-deb");
    // Files belong to root in the package whoever builds it.
    build
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb);
    status(build).context("dpkg-deb (package dpkg) failed")?;
    Ok(deb)
}

/// The version `zc -V` reports (`zc 0.1.0 (git ..., eBPF ...)`), so the
/// package is named for the binary it holds.
fn zc_version(zc: &Path) -> Result<String> {
    let line = output(Command::new(zc).arg("-V"))?;
    line.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no version in `{line}` from {} -V", zc.display()))
}

/// The files, where Debian puts them, with modes set here rather than
/// inherited from the build's umask.
fn stage(zc: &Path, root: &Path) -> Result<()> {
    let src = workspace_root();
    copy(zc, &root.join("usr/bin/zc"), 0o755)?;
    for unit in ["zc-agent.service", "zc-relay@.service"] {
        copy(
            &src.join("deploy/systemd").join(unit),
            &root.join("lib/systemd/system").join(unit),
            0o644,
        )?;
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/zc"),
        ("zsh", "usr/share/zsh/vendor-completions/_zc"),
        ("fish", "usr/share/fish/vendor_completions.d/zc.fish"),
    ] {
        let script = output(Command::new(zc).args(["completions", shell]))?;
        write(&root.join(path), &format!("{script}\n"), 0o644)?;
    }
    man_pages(zc, &root.join("usr/share/man/man1"))?;
    let doc = root.join("usr/share/doc/zc");
    for file in ["README.md", "LICENSE-APACHE", "LICENSE-MIT"] {
        copy(&src.join(file), &doc.join(file), 0o644)?;
    }
    write(&doc.join("copyright"), COPYRIGHT, 0o644)?;
    // dpkg takes directory modes from the tree too.
    for dir in walk(root)?.into_iter().filter(|p| p.is_dir()) {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", dir.display()))?;
    }
    Ok(())
}

/// `zc man` writes the pages; Debian ships them gzipped (-n: no name or
/// time stamp inside, so the same pages give the same package).
fn man_pages(zc: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut man = Command::new(zc);
    man.arg("man").arg(dir);
    status(man)?;
    for page in walk(dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
    {
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("chmod {}", page.display()))?;
        let mut gzip = Command::new("gzip");
        gzip.args(["-9", "-n", "-f"]).arg(&page);
        status(gzip)?;
    }
    Ok(())
}

/// `Depends:` from the libraries the binary links (dpkg-shlibdeps, as
/// debhelper does; it wants a debian/control beside it, so give it one).
fn depends(binary: &Path) -> Result<String> {
    let scratch = dist_dir().join("shlibdeps");
    write(
        &scratch.join("debian/control"),
        "Source: zc\n\nPackage: zc\nArchitecture: any\n",
        0o644,
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.current_dir(&scratch)
        .arg("-O")
        .arg(format!("-e{}", binary.display()));
    let out = output(&mut cmd).context("dpkg-shlibdeps (package dpkg-dev)")?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .with_context(|| format!("no shlibs:Depends in dpkg-shlibdeps' output: {out}"))
}

fn control(root: &Path, version: &str, arch: &str, depends: String) -> Result<String> {
    let bytes: u64 = walk(root)?
        .iter()
        .filter_map(|p| p.symlink_metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    Ok(format!(
        "Package: zc\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {kib}\n\
         Depends: {depends}\n\
         Section: net\n\
         Priority: optional\n\
         Description: move bytes between TCP sockets inside the kernel (eBPF sockmap)\n \
         zc joins pairs of TCP sockets with eBPF sockmap programs: what arrives on\n \
         one socket leaves through the other without being copied into a process.\n \
         `zc relay` is a TCP proxy that works this way; `zc agent` pairs the\n \
         sockets of a proxy already running. Needs a kernel with BPF sockmap\n \
         support; the systemd units zc-agent.service and zc-relay@.service are\n \
         installed but not enabled.\n",
        maintainer = maintainer(),
        kib = bytes.div_ceil(1024),
    ))
}

/// DEBFULLNAME and DEBEMAIL as Debian's tools take them, else git's user.
fn maintainer() -> String {
    let env = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
    let git = |k| output(Command::new("git").args(["config", k])).ok();
    let name = env("DEBFULLNAME").or_else(|| git("user.name"));
    let email = env("DEBEMAIL").or_else(|| git("user.email"));
    format!(
        "{} <{}>",
        name.as_deref().unwrap_or("zc maintainers"),
        email.as_deref().unwrap_or("root@localhost")
    )
}

/// postinst and postrm: let a running systemd see the units appear and
/// go. Nothing is enabled, started or stopped.
const DAEMON_RELOAD: &str = "#!/bin/sh\nset -e\n\
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then\n\
\tsystemctl daemon-reload || true\n\
fi\n";

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: zc\n\
\n\
Files: *\n\
Copyright: the zc authors\n\
License: MIT or Apache-2.0\n \
zc may be used under the terms of either licence, at your option. Their\n \
full texts are in /usr/share/doc/zc/LICENSE-MIT and\n \
/usr/share/doc/zc/LICENSE-APACHE (the Apache License 2.0 also in\n \
/usr/share/common-licenses/Apache-2.0).\n";

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    mkdir_parent(to)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    mkdir_parent(path)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn mkdir_parent(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Every path under `dir`, itself included.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut all = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        let p = all[i].clone();
        i += 1;
        if p.is_dir() && !p.is_symlink() {
            for entry in fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
                all.push(
                    entry
                        .with_context(|| format!("reading {}", p.display()))?
                        .path(),
                );
            }
        }
    }
    Ok(all)
}

/// A command's stdout, trimmed; an error with its stderr if it fails.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
