//! The Debian package `cargo xtask dist` makes (and `cargo xtask test`
//! makes before the suite): it installs on this machine with dpkg, the
//! installed zc is this build and works, and purging it leaves none of
//! its files behind.
//!
//! It installs into the real root: the tests run as root on a throwaway
//! machine, and dpkg's --instdir would run the maintainer scripts chrooted
//! into a tree with no shell.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// target/dist/zc_VERSION_ARCH.deb for this crate's version.
fn package() -> PathBuf {
    let arch = stdout_of(Command::new("dpkg").arg("--print-architecture"));
    let deb = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../target/dist/zc_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    ));
    assert!(
        deb.is_file(),
        "{} is missing: `cargo xtask test` builds it before the tests \
         (or run `cargo xtask dist`)",
        deb.display()
    );
    deb
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "zc"]))
        .stdout
        .starts_with(b"install ok installed")
}

/// The lines of `zc --version` after the first (git revision, eBPF hash).
fn stamps(zc: &str) -> Vec<String> {
    stdout_of(Command::new(zc).arg("--version"))
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// Purges the package even when the test fails midway, so the next run
/// starts from a machine without it.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "zc"]).output();
    }
}

#[test]
fn the_package_installs_runs_this_build_and_purges_without_a_trace() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test installs a package with dpkg and needs root: run `cargo xtask test` as root"
    );
    let deb = package();
    assert!(
        !installed(),
        "a zc package is installed already, and this test would replace and then purge it; \
         remove it first (`dpkg --purge zc`)"
    );
    let listed = stdout_of(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/zc",
        "./lib/systemd/system/zc-agent.service",
        "./lib/systemd/system/zc-relay@.service",
        "./usr/share/bash-completion/completions/zc",
        "./usr/share/zsh/vendor-completions/_zc",
        "./usr/share/fish/vendor_completions.d/zc.fish",
        "./usr/share/man/man1/zc.1.gz",
        "./usr/share/man/man1/zc-agent.1.gz",
        "./usr/share/man/man1/zc-relay.1.gz",
        "./usr/share/doc/zc/README.md",
        "./usr/share/doc/zc/LICENSE-MIT",
        "./usr/share/doc/zc/LICENSE-APACHE",
        "./usr/share/doc/zc/copyright",
    ] {
        assert!(
            listed.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "the package lacks {path}:\n{listed}"
        );
    }

    let _purge = Purge;
    stdout_of(Command::new("dpkg").arg("--install").arg(&deb));
    assert!(installed(), "dpkg says zc is not installed");
    let files: Vec<PathBuf> = stdout_of(Command::new("dpkg").args(["--listfiles", "zc"]))
        .lines()
        .map(PathBuf::from)
        .filter(|p| !p.is_dir())
        .collect();
    assert!(files.len() > 10, "dpkg lists too few files: {files:?}");
    for f in &files {
        assert!(f.exists(), "{} is listed but not installed", f.display());
    }

    // The installed zc is the one this suite built: same source revision
    // (the tree's HEAD) and the same eBPF object.
    let head = stdout_of(
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(["rev-parse", "--short", "HEAD"]),
    );
    let ours = stamps("/usr/bin/zc");
    assert_eq!(
        ours,
        stamps(env!("CARGO_BIN_EXE_zc")),
        "the installed zc is another build"
    );
    assert!(
        ours.iter()
            .any(|l| l.starts_with(&format!("git revision: {}", head.trim()))),
        "the installed zc does not name HEAD ({}): {ours:?}",
        head.trim()
    );
    assert!(
        ours.iter()
            .any(|l| l.starts_with("eBPF object:  xxh3 ") && !l.ends_with("none")),
        "the installed zc has no eBPF object: {ours:?}"
    );

    let status = stdout_of(Command::new("/usr/bin/zc").arg("status"));
    assert!(
        status.contains("mode:   bpf"),
        "the installed zc cannot use BPF here: {status}"
    );
    // The self-test's fault injection is for the test suite's build only:
    // that one fails its self-test when asked, the packaged one ignores it.
    let faulty = |zc: &str| {
        let out = run(Command::new(zc)
            .arg("status")
            .env(zc_user::probe::FAULT_ENV, "corrupt"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tests_build = faulty(env!("CARGO_BIN_EXE_zc"));
    assert!(
        !tests_build.contains("mode:   bpf"),
        "the test suite's zc ignored {}: {tests_build}",
        zc_user::probe::FAULT_ENV
    );
    let shipped = faulty("/usr/bin/zc");
    assert!(
        shipped.contains("mode:   bpf"),
        "the packaged zc honoured the test-only {}: {shipped}",
        zc_user::probe::FAULT_ENV
    );
    // With the binary and its man pages in place, systemd-analyze can
    // check everything the units name, Documentation= included.
    let verify = run(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/zc-agent.service",
        "/lib/systemd/system/zc-relay@.service",
    ]));
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify on the installed units: {said}"
    );

    stdout_of(Command::new("dpkg").args(["--purge", "zc"]));
    assert!(!installed(), "dpkg still lists zc after --purge");
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "left behind by --purge: {left:?}");
    for dir in ["/usr/share/doc/zc", "/etc/zc"] {
        assert!(!Path::new(dir).exists(), "{dir} is left behind");
    }
}
