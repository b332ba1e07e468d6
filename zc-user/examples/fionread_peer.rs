//! The processes `tests/short_circuit_safety.rs` starts inside its test
//! cgroup (and one outside it), where the short-circuit may put their
//! sockets in its sockhash:
//!
//! - `fionread_peer echo`: serves echoes on 127.0.0.1 and prints
//!   `port N`;
//! - `fionread_peer fionread ADDR LEN`: connects to ADDR, reads LEN bytes
//!   the way FIONREAD-based clients do (nginx, Java, .NET) and prints
//!   `digest BYTES HASH`.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
};

use anyhow::{Context as _, Result, bail, ensure};
use zc_user::traffic::Digest;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args[..] {
        ["echo"] => echo(),
        ["fionread", addr, len] => {
            let mut s =
                TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            let d = read_by_fionread(&mut s, len.parse().context("LEN")?)?;
            println!("digest {} {:x}", d.bytes, d.hash);
            Ok(())
        }
        _ => bail!("usage: fionread_peer echo | fionread ADDR LEN"),
    }
}

fn echo() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    println!("port {}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let mut s = s.context("accept")?;
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut w = s.try_clone()?;
            std::io::copy(&mut s, &mut w)?;
            w.shutdown(Shutdown::Write)
        });
    }
    Ok(())
}

/// Reads `n` bytes as FIONREAD-based clients do: wait for readability, ask
/// how much is queued, read that much. A socket in a sockhash answers 0
/// with bytes queued (see the kernel notes), which such a client takes for
/// "nothing yet" and stalls on; here that is an error.
fn read_by_fionread(s: &mut TcpStream, n: u64) -> Result<Digest> {
    let fd = s.as_raw_fd();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while got < n {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 30_000) };
        ensure!(
            r > 0,
            "nothing readable within 30 s after {got} of {n} bytes"
        );
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) };
        ensure!(r == 0, "FIONREAD: {}", std::io::Error::last_os_error());
        if avail == 0 {
            let mut one = [0u8; 1];
            // SAFETY: peeks into a buffer we own.
            let k = unsafe {
                libc::recv(
                    fd,
                    one.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            ensure!(
                k <= 0,
                "FIONREAD said 0 while bytes were readable (after {got} of {n} bytes)"
            );
            ensure!(k != 0, "EOF after {got} of {n} bytes");
            continue;
        }
        let want = (avail as usize).min(buf.len());
        s.read_exact(&mut buf[..want])
            .context("reading what FIONREAD announced")?;
        h.update(&buf[..want]);
        got += want as u64;
    }
    Ok(Digest {
        bytes: got,
        hash: h.digest(),
    })
}
