//! `zc demo`: the main job, end to end, on loopback. Starts a sink server,
//! then sends the same verified stream to it directly and through a
//! `zc relay --mode bpf` child process, and prints throughput, integrity
//! and the relay's own CPU time.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use zc_user::traffic::{self, Digest};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Bytes to send in each run (suffixes k, m, g are powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "2g", value_parser = zc_user::cli::parse_size)]
    bytes: u64,
    /// Extra arguments for the relay (e.g. "--window 8388608").
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    relay_args: String,
    /// Size of each write the client makes.
    #[arg(long, value_name = "SIZE", default_value = "64k", value_parser = zc_user::cli::parse_size)]
    write_size: u64,
}

/// A sink server: each connection is read to EOF and answered with the
/// digest of what arrived.
fn start_sink() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding the demo server")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                if let Ok(d) = traffic::sink(&mut s) {
                    let _ = s.write_all(&d.to_bytes());
                }
            });
        }
    });
    Ok(addr)
}

fn run_once(to: SocketAddr, bytes: u64, write_size: usize) -> Result<(Duration, Digest, Digest)> {
    let mut s = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    let t = Instant::now();
    let sent = traffic::send(&mut s, bytes, write_size, 42)?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .context("reading the server's digest")?;
    Ok((t.elapsed(), sent, Digest::from_bytes(reply)))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SIGTERM first so the relay unloads its programs cleanly.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// Starts `zc relay --mode bpf` on a port the kernel picks, and learns it
/// from the relay's own start line (its log is passed through to ours):
/// no port is chosen in advance and no probe connection shows up in the
/// relay's access log.
fn start_relay(upstream: SocketAddr, extra: &str) -> Result<(KillOnDrop, SocketAddr)> {
    let exe = std::env::current_exe().context("finding the zc binary")?;
    // The start line is at info level, whatever the user's filter says.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut child = Command::new(exe)
        .args([
            "relay",
            "--mode",
            "bpf",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.to_string(),
        ])
        .args(extra.split_whitespace())
        .env("RUST_LOG", format!("{filter},zc=info"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting zc relay")?;
    let stderr = child.stderr.take().context("the relay's stderr")?;
    let child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{line}");
            if let Some(addr) = listening_on(&line) {
                let _ = tx.send(addr);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(addr) => Ok((child, addr)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            bail!("zc relay exited before listening; see its error above")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("zc relay did not start listening within 10 s")
        }
    }
}

/// The address in the relay's start line (`zc relay: mode ..., listening
/// on ADDR, upstream ...`).
fn listening_on(line: &str) -> Option<SocketAddr> {
    let rest = line.split_once("zc relay: mode ")?.1;
    let rest = rest.split_once(", listening on ")?.1;
    rest.split_once(", upstream ")?.0.parse().ok()
}

pub async fn run(args: DemoArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: DemoArgs) -> Result<()> {
    let ws = usize::try_from(args.write_size)
        .context("--write-size too large")?
        .clamp(1, 1 << 20);
    let server = start_sink()?;
    let (relay, listen) = start_relay(server, &args.relay_args)?;
    println!(
        "zc demo: {} MiB in {} KiB writes, loopback",
        args.bytes >> 20,
        ws >> 10
    );
    println!(
        "{:<26} {:>10} {:>10} {:>16}",
        "path", "GB/s", "intact", "relay CPU (s)"
    );
    let gbps = |d: Duration| args.bytes as f64 / d.as_secs_f64() / 1e9;
    let (t, sent, got) = run_once(server, args.bytes, ws)?;
    println!(
        "{:<26} {:>10.2} {:>10} {:>16}",
        "direct",
        gbps(t),
        sent == got,
        "-"
    );
    let before = zc_user::host::process_cpu_secs(relay.0.id())?;
    let (t, sent, got) = run_once(listen, args.bytes, ws)?;
    let cpu = zc_user::host::process_cpu_secs(relay.0.id())? - before;
    println!(
        "{:<26} {:>10.2} {:>10} {:>16.3}",
        "zc relay --mode bpf",
        gbps(t),
        sent == got,
        cpu
    );
    drop(relay);
    if sent != got {
        bail!("the relayed stream arrived damaged: sent {sent:?}, received {got:?}");
    }
    Ok(())
}
