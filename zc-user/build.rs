//! Builds the eBPF object from `zc-ebpf` and leaves it in `OUT_DIR/zc-ebpf`,
//! where `src/ebpf/mod.rs` embeds it, so the `zc` binary is self-contained.
//! Then stamps what `zc --version` shows: the git revision the binary was
//! built from (`ZC_GIT_REV`) and a hash of that object (`ZC_EBPF_HASH`).
//!
//! `cargo xtask build` bootstraps the toolchain first (nightly `rust-src`,
//! a bpf-linker matching the nightly's LLVM). With `AYA_BUILD_SKIP=1` an
//! empty object is written instead, so `cargo check`/`clippy` work on hosts
//! without bpf-linker; such a binary refuses BPF mode with a clear error.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=ZC_TOOLS_DIR");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    stamp_git_rev()?;
    let object = out_dir.join("zc-ebpf");
    if skip {
        fs::write(&object, []).with_context(|| format!("writing stub {}", object.display()))?;
    } else {
        build_ebpf()?;
    }
    stamp_ebpf_hash(&object)
}

fn build_ebpf() -> anyhow::Result<()> {
    // The bootstrap installs bpf-linker under ZC_TOOLS_DIR/bin (xtask sets
    // it; default ~/.cache/zc-tools); put it first on PATH for the nested
    // nightly cargo.
    let tools = env::var_os("ZC_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/zc-tools")));
    if let Some(tools) = tools {
        let bin = tools.join("bin");
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", joined) };
    }
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH; run `cargo xtask build` once to install it, \
             or set AYA_BUILD_SKIP=1 to build without BPF support"
        ));
    }
    let manifest = env::var("CARGO_MANIFEST_DIR")?;
    let root = PathBuf::from(manifest).join("..").join("zc-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "zc-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}

/// `ZC_GIT_REV`: the short hash of HEAD, `-dirty` when tracked files differ
/// from it, `unknown` outside a git checkout (a source tarball).
fn stamp_git_rev() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let rev = match git(&manifest, &["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            // Untracked files are left out, as `git describe --dirty` does:
            // a stray scratch file is not a change to what was built.
            let dirty = git(
                &manifest,
                &["status", "--porcelain", "--untracked-files=no"],
            )
            .is_none_or(|s| !s.is_empty());
            format!("{rev}{}", if dirty { "-dirty" } else { "" })
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=ZC_GIT_REV={rev}");
    // Rerun when HEAD moves (commit, checkout). Not on every change to the
    // index: each rerun rebuilds the eBPF object too (a minute), and a
    // `git add` is no reason to. So the dirty mark is as of the last run
    // of this script. In a worktree HEAD lives in the worktree's own git
    // dir, branch refs in the common one, so ask git for both rather than
    // assume `.git/`.
    if let (Some(git_dir), Some(common)) = (
        git(&manifest, &["rev-parse", "--absolute-git-dir"]),
        git(
            &manifest,
            &["rev-parse", "--path-format=absolute", "--git-common-dir"],
        ),
    ) {
        let (git_dir, common) = (PathBuf::from(git_dir), PathBuf::from(common));
        let head_ref = git(&manifest, &["symbolic-ref", "-q", "HEAD"]).map(|r| common.join(r));
        let files = [git_dir.join("HEAD"), common.join("packed-refs")];
        // A path that does not exist would make cargo rerun on every build
        // (a branch whose ref is only packed has no file of its own).
        for file in files.iter().chain(&head_ref).filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", file.display());
        }
    }
    Ok(())
}

/// `ZC_EBPF_HASH`: xxh3-64 of the object the binary embeds, so two builds
/// can be told apart by the programs they load; `none` for the stub.
fn stamp_ebpf_hash(object: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let hash = if bytes.is_empty() {
        "none".to_string()
    } else {
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
    };
    println!("cargo:rustc-env=ZC_EBPF_HASH={hash}");
    Ok(())
}

/// A git command's trimmed stdout, or None if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        // `git status` may rewrite the index to refresh it, which would
        // make this script's own rerun-if-changed fire on the next build.
        .env("GIT_OPTIONAL_LOCKS", "0")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
