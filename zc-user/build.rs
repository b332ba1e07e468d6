//! Builds the eBPF object from `zc-ebpf` and leaves it in `OUT_DIR/zc-ebpf`,
//! where `src/ebpf/mod.rs` embeds it, so the `zc` binary is self-contained.
//!
//! `cargo xtask build` bootstraps the toolchain first (nightly `rust-src`,
//! a bpf-linker matching the nightly's LLVM). With `AYA_BUILD_SKIP=1` an
//! empty object is written instead, so `cargo check`/`clippy` work on hosts
//! without bpf-linker; such a binary refuses BPF mode with a clear error.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=ZC_TOOLS_DIR");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let stub = out_dir.join("zc-ebpf");
        fs::write(&stub, []).with_context(|| format!("writing stub {}", stub.display()))?;
        return Ok(());
    }
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

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
