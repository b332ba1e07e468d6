//! Which data path can this machine use? `--mode auto` and `zc status`
//! ask here.
//!
//! BPF is chosen only if the programs load and attach *and* the kernel's
//! redirect path passes a short self-test: a known byte pattern through a
//! real pair on loopback, checked for integrity, with a deadline for
//! stalls. Otherwise splice, if a pipe can be made; otherwise copy.
use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    ebpf::Programs,
    engine::{Mode, bpf::BpfEngine},
    watch::Watcher,
};

/// Bytes sent each way by the self-test.
const PROBE_BYTES: usize = 4 << 20;
/// A healthy kernel moves the probe in milliseconds.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// Test-only: set to `corrupt` or `stall` to make the self-test see a
/// damaged or stalled redirect, as a broken kernel would show. Read only
/// in a build with the `test-faults` feature (the test suite's).
pub const FAULT_ENV: &str = "ZC_TEST_PROBE_FAULT";

/// The fault the tests asked for, if this build honours one.
fn injected_fault() -> String {
    if cfg!(feature = "test-faults") {
        std::env::var(FAULT_ENV).unwrap_or_default()
    } else {
        String::new()
    }
}

/// The decision and why.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub mode: String,
    pub reason: String,
    /// Why BPF was not chosen, if it was not.
    pub bpf_unavailable: Option<String>,
    pub kernel: String,
}

/// Loaded programs that passed the self-test, or why not.
///
/// The maps are sized for `sockets` paired sockets (two per connection;
/// see [`Programs::load_sized`]); the self-test needs two.
pub async fn bpf_ready(sockets: u32) -> Result<Programs, String> {
    let progs = Programs::load_sized(sockets).map_err(|e| e.to_string())?;
    self_test(&progs)
        .await
        .map_err(|e| format!("the kernel's redirect path failed its self-test: {e}"))?;
    Ok(progs)
}

/// Picks the best mode; returns the programs when it picked BPF, their
/// maps sized for `sockets` sockets.
pub async fn choose(sockets: u32) -> (Verdict, Option<Programs>) {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    match bpf_ready(sockets).await {
        Ok(progs) => (
            Verdict {
                mode: Mode::Bpf.to_string(),
                reason: "BPF programs loaded and the redirect self-test passed".into(),
                bpf_unavailable: None,
                kernel,
            },
            Some(progs),
        ),
        Err(why) => {
            let (mode, reason) = match nix::unistd::pipe() {
                Ok(_) => (
                    Mode::Splice,
                    format!("BPF unavailable ({why}); splice works"),
                ),
                Err(e) => (
                    Mode::Copy,
                    format!("BPF unavailable ({why}); no pipes either ({e})"),
                ),
            };
            (
                Verdict {
                    mode: mode.to_string(),
                    reason,
                    bpf_unavailable: Some(why),
                    kernel,
                },
                None,
            )
        }
    }
}

/// Sends a known pattern both ways through a real BPF pair on loopback.
async fn self_test(progs: &Programs) -> Result<(), String> {
    let fault = injected_fault();
    let watcher = Watcher::start().map_err(|e| e.to_string())?;
    let engine = BpfEngine::new(progs.clone(), watcher);
    let io = |e: std::io::Error| e.to_string();
    let (client, a) = loopback_pair().map_err(io)?;
    let (b, server) = loopback_pair().map_err(io)?;
    let relay = tokio::spawn(async move { engine.relay(a, b).await });
    let run = async {
        let mut client = tokio::net::TcpStream::from_std(client).map_err(io)?;
        let mut server = tokio::net::TcpStream::from_std(server).map_err(io)?;
        let pattern: Vec<u8> = (0..PROBE_BYTES).map(|i| (i * 7 + i / 4096) as u8).collect();
        let (up, down) = tokio::join!(
            async {
                client.write_all(&pattern).await?;
                client.shutdown().await?;
                let mut back = Vec::new();
                client.read_to_end(&mut back).await?;
                Ok::<_, std::io::Error>(back)
            },
            async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await?;
                server.write_all(&pattern).await?;
                server.shutdown().await?;
                Ok::<_, std::io::Error>(got)
            }
        );
        let (mut at_client, at_server) = (up.map_err(io)?, down.map_err(io)?);
        if fault == "stall" {
            std::future::pending::<()>().await;
        }
        if fault == "corrupt"
            && let Some(b) = at_client.get_mut(PROBE_BYTES / 2)
        {
            *b ^= 0xff;
        }
        for (what, got) in [
            ("client to server", &at_server),
            ("server to client", &at_client),
        ] {
            if got.len() != PROBE_BYTES {
                return Err(format!(
                    "{what}: {} of {PROBE_BYTES} bytes arrived",
                    got.len()
                ));
            }
            if let Some(i) = got.iter().zip(&pattern).position(|(a, b)| a != b) {
                return Err(format!("{what}: byte {i} arrived damaged"));
            }
        }
        // Intact bytes prove nothing about the path: a user-space copy
        // delivers them too. The verdict's counters say what the kernel
        // carried (a held direction may take some through user space).
        let carried = progs.kernel_bytes();
        if carried < PROBE_BYTES as u64 {
            return Err(format!(
                "the bytes arrived, but the kernel carried only {carried} of {}",
                2 * PROBE_BYTES
            ));
        }
        Ok(())
    };
    let result = match tokio::time::timeout(PROBE_DEADLINE, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no complete exchange within {PROBE_DEADLINE:?} (stalled)"
        )),
    };
    relay.abort();
    let _ = relay.await;
    result
}

fn loopback_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    c.set_nonblocking(true)?;
    s.set_nonblocking(true)?;
    Ok((c, s))
}
