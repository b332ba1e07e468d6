//! Makes the eBPF toolchain ready on a fresh machine, once.
//!
//! The eBPF crate builds with the installed nightly (`-Z build-std=core`
//! needs its `rust-src`) and links with bpf-linker, which must use the same
//! LLVM major as that nightly. No LLVM development package is required:
//! the nightly ships `libLLVM.so`, so bpf-linker is built against it
//! through a scratch `LLVM_PREFIX` (a `lib/libLLVM.so` link and a stub
//! `llvm-config` that only reports the version) and given an rpath to the
//! nightly's `lib` directory so it runs outside `rustup run`.
//!
//! The result lives in `$ZC_TOOLS_DIR` (default `~/.cache/zc-tools`) with a
//! stamp naming the bpf-linker version and the nightly it was built for; a
//! later run that finds a matching stamp and a working binary does nothing.
use std::{
    env, fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const TOOLCHAIN: &str = "nightly";

pub struct Tools {
    pub dir: PathBuf,
}

impl Tools {
    pub fn linker(&self) -> PathBuf {
        self.dir.join("bin/bpf-linker")
    }
}

fn tools_dir() -> Result<PathBuf> {
    if let Some(d) = env::var_os("ZC_TOOLS_DIR") {
        return Ok(PathBuf::from(d));
    }
    let home =
        env::var_os("HOME").ok_or_else(|| anyhow!("neither ZC_TOOLS_DIR nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".cache/zc-tools"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Nightly {
    sysroot: PathBuf,
    commit: String,
    llvm: String,
}

fn nightly() -> Result<Nightly> {
    let vv = output(Command::new("rustc").args([&format!("+{TOOLCHAIN}"), "-vV"])).map_err(|e| {
        anyhow!("the `{TOOLCHAIN}` Rust toolchain is missing or broken ({e}); install it with `rustup toolchain install {TOOLCHAIN}`")
    })?;
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| anyhow!("`rustc +{TOOLCHAIN} -vV` printed no `{name}` line"))
    };
    let sysroot =
        output(Command::new("rustc").args([&format!("+{TOOLCHAIN}"), "--print", "sysroot"]))?;
    Ok(Nightly {
        sysroot: PathBuf::from(sysroot.trim()),
        commit: field("commit-hash:")?,
        llvm: field("LLVM version:")?,
    })
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        TOOLCHAIN,
    ]))
    .context("rustup is required to manage the nightly toolchain")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for the {TOOLCHAIN} toolchain");
    output(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]))
        .context(
            "could not install rust-src for the nightly toolchain (is crates.io/rustup reachable?)",
        )?;
    Ok(())
}

fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let entries = fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    for e in entries {
        let path = e?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("libLLVM") && name.contains(".so") {
            return Ok(path);
        }
    }
    bail!(
        "the nightly toolchain at {} ships no libLLVM shared library to build bpf-linker against",
        lib.display()
    )
}

pub fn ensure() -> Result<Tools> {
    ensure_rust_src()?;
    let n = nightly()?;
    let tools = Tools { dir: tools_dir()? };
    let stamp_path = tools.dir.join("stamp");
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION}\nnightly {}\nllvm {}\n",
        n.commit, n.llvm
    );
    let works = || {
        Command::new(tools.linker())
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && works() {
        return Ok(tools);
    }

    let major = n.llvm.split('.').next().unwrap_or_default();
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} (about a minute)",
        n.llvm
    );
    let prefix = tools.dir.join("llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    fs::create_dir_all(prefix.join("bin"))?;
    let so = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&so);
    symlink(find_libllvm(&n.sysroot)?, &so)
        .context("linking libLLVM.so into the scratch prefix")?;
    let config = prefix.join("bin/llvm-config");
    fs::write(&config, format!("#!/bin/sh\necho {}\n", n.llvm))?;
    fs::set_permissions(&config, fs::Permissions::from_mode(0o755))?;

    let rpath = format!("-Clink-arg=-Wl,-rpath,{}", n.sysroot.join("lib").display());
    let st = Command::new("cargo")
        .args([
            &format!("+{TOOLCHAIN}"),
            "install",
            "bpf-linker",
            "--version",
            &format!("={BPF_LINKER_VERSION}"),
        ])
        .args([
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(&tools.dir)
        .env("LLVM_PREFIX", &prefix)
        .env("RUSTFLAGS", rpath)
        .status()
        .context("running cargo install bpf-linker")?;
    if !st.success() {
        bail!(
            "building bpf-linker failed ({st}); it needs crates.io and the nightly's libLLVM (see the output above)"
        );
    }
    if !works() {
        bail!(
            "bpf-linker was built but does not run: {}",
            tools.linker().display()
        );
    }
    fs::write(&stamp_path, stamp)?;
    Ok(tools)
}
