//! Build, test and bench tooling for zc: `cargo xtask --help`.
mod bootstrap;
mod dist;
mod kmsg;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "zc's build, test and bench tooling")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the eBPF build needs (nightly rust-src, a bpf-linker
    /// built against the nightly's own LLVM). Cached: a second run only
    /// checks versions.
    Bootstrap,
    /// Bootstrap, then build the `zc` binary (eBPF object embedded).
    Build,
    /// Build, then run `zc`; with no arguments runs `zc demo`, which relays
    /// real bytes through the kernel and prints what it measured.
    Run {
        /// Arguments for `zc` (default: `demo`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the whole test suite (needs root: tests load BPF),
    /// then `lint`. With arguments, only `cargo test ARGS`.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fail if `cargo fmt` would change a file or clippy warns.
    Lint,
    /// Build, then make a Debian package of zc:
    /// target/dist/zc_VERSION_ARCH.deb.
    Dist,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo(tools: &bootstrap::Tools) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("ZC_TOOLS_DIR", &tools.dir);
    cmd
}

fn status(mut cmd: Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn build(tools: &bootstrap::Tools) -> Result<PathBuf> {
    let mut cmd = cargo(tools);
    cmd.args(["build", "--release", "--package", "zc-user", "--bin", "zc"]);
    status(cmd)?;
    Ok(workspace_root().join("target/release/zc"))
}

/// Programs the tests run beside zc, as a user would (an unmodified proxy).
/// Installed from the distribution's packages when missing.
const TEST_PROGRAMS: [(&str, &str); 5] = [
    ("socat", "socat"),
    ("haproxy", "haproxy"),
    ("iperf3", "iperf3"),
    // Reads the man pages `zc man` writes.
    ("man", "man-db"),
    // Checks what `zc relay --metrics` serves.
    ("promtool", "prometheus"),
];

fn ensure_test_programs() -> Result<()> {
    let missing: Vec<&str> = TEST_PROGRAMS
        .iter()
        .filter(|(bin, _)| {
            !std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing test programs: {}", missing.join(" "));
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(cmd)
    };
    // A fresh machine may have no package lists yet.
    install()
        .or_else(|_| {
            status({
                let mut c = Command::new("apt-get");
                c.arg("update");
                c
            })?;
            install()
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "the tests need {} (Debian packages); installing failed: {e:#}",
                missing.join(", ")
            )
        })
}

/// The whole suite also holds the code to its format and to clippy with
/// no warnings, so CI fails on either (after the tests, which say more).
fn lint(tools: &bootstrap::Tools) -> Result<()> {
    let mut fmt = cargo(tools);
    fmt.args(["fmt", "--all", "--", "--check"]);
    status(fmt).context("`cargo fmt --all` would change files; run it and commit")?;
    let mut clippy = cargo(tools);
    // The eBPF object was just built; clippy needs no second build of it.
    clippy
        .args([
            "clippy",
            "--release",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("AYA_BUILD_SKIP", "1");
    status(clippy).context("clippy found warnings")?;
    println!("format and clippy: clean");
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Bootstrap => {
            let tools = bootstrap::ensure()?;
            println!("bpf-linker ready: {}", tools.linker().display());
        }
        Cmd::Build => {
            let tools = bootstrap::ensure()?;
            let zc = build(&tools)?;
            println!("built {}", zc.display());
        }
        Cmd::Run { args } => {
            let tools = bootstrap::ensure()?;
            let zc = build(&tools)?;
            let args = if args.is_empty() {
                vec!["demo".to_string()]
            } else {
                args
            };
            let mut cmd = Command::new(zc);
            cmd.args(args);
            status(cmd)?;
        }
        Cmd::Lint => {
            let tools = bootstrap::ensure()?;
            lint(&tools)?;
        }
        Cmd::Dist => {
            let tools = bootstrap::ensure()?;
            let zc = build(&tools)?;
            println!("built {}", dist::package(&zc)?.display());
        }
        Cmd::Test { args } => {
            let tools = bootstrap::ensure()?;
            ensure_test_programs()?;
            let zc = build(&tools)?;
            // tests/package.rs installs this package: the shipping build,
            // packaged before the tests' build replaces target/release/zc.
            println!("packaged {}", dist::package(&zc)?.display());
            let whole_suite = args.is_empty();
            // The whole suite also answers for the kernel it ran on.
            let watch = whole_suite.then(kmsg::Watch::start).transpose()?;
            let mut cmd = cargo(&tools);
            // The default members: zc-ebpf is built by zc-user's build.rs.
            cmd.args(["test", "--release"]).args(args);
            if whole_suite {
                // One failing test binary must not hide the others' results.
                cmd.arg("--no-fail-fast");
            }
            let tested = status(cmd);
            // The tests' build has the `test-faults` feature and leaves its
            // zc in target/release; put the shipping build back.
            build(&tools)?;
            let alarms = watch
                .map(kmsg::Watch::alarms)
                .transpose()?
                .unwrap_or_default();
            let mut failing = 0;
            for a in &alarms {
                match kmsg::known(a) {
                    Some(why) => eprintln!(
                        "known kernel warning while the tests ran (let through: {why}): {a}"
                    ),
                    None => {
                        failing += 1;
                        eprintln!("kernel warning while the tests ran: {a}");
                    }
                }
            }
            tested?;
            if failing > 0 {
                bail!(
                    "every test passed, but the kernel logged {failing} warning(s) while they ran \
                     (above; `dmesg` has the traces)"
                );
            }
            if whole_suite {
                lint(&tools)?;
            }
        }
    }
    Ok(())
}
