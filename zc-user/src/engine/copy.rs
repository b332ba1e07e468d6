//! The copy engine: read into a buffer, write it out. The honest baseline,
//! and the path BPF mode uses for a direction the kernel cannot take over
//! (a socket whose remote end finished before it could be paired).
use std::{
    io,
    net::TcpStream as StdTcpStream,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use tokio::{io::Interest, net::TcpStream};

use super::Summary;
use crate::sys;

/// Default buffer per direction. Measured with iperf3 through `zc relay
/// --mode copy` on loopback (2 cores, 6.18, two interleaved rounds):
/// 16 KiB 1.84 GB/s, 64 KiB 2.2, 256 KiB 2.7-3.0, 1 MiB 2.6-2.8; 256 KiB
/// also cost the least CPU per byte.
pub const DEFAULT_BUFFER: usize = 256 << 10;

#[derive(Clone, Debug)]
pub struct CopyEngine {
    buffer: usize,
}

impl Default for CopyEngine {
    fn default() -> Self {
        Self {
            buffer: DEFAULT_BUFFER,
        }
    }
}

impl CopyEngine {
    pub fn new(buffer: usize) -> Self {
        Self {
            buffer: buffer.max(1),
        }
    }

    pub async fn relay(&self, a: StdTcpStream, b: StdTcpStream) -> Result<Summary> {
        self.relay_counted(a, b, super::Counts::default()).await
    }

    pub async fn relay_counted(
        &self,
        a: StdTcpStream,
        b: StdTcpStream,
        counts: super::Counts,
    ) -> Result<Summary> {
        let (a, b) = (to_tokio(a)?, to_tokio(b)?);
        arm_reset(&a, &b);
        // try_join: the first error cancels the other direction.
        let result = tokio::try_join!(
            pump(&a, &b, self.buffer, &counts[0]),
            pump(&b, &a, self.buffer, &counts[1]),
        );
        Ok(finish(&a, &b, result.err().map(|e| e.kind()), &counts))
    }
}

/// Makes both closes abortive until [`finish`] says the relay ended
/// cleanly: should this process die mid-stream (kill -9), the kernel's
/// close then sends RST, and neither end takes the cut for a complete
/// stream.
pub fn arm_reset(a: &TcpStream, b: &TcpStream) {
    for s in [a, b] {
        let _ = sys::set_reset_on_close(s.as_fd());
    }
}

/// Leaves both closes abortive if the relay failed (with `cause`; see
/// [`arm_reset`]), graceful otherwise, and sums up.
pub fn finish(
    a: &TcpStream,
    b: &TcpStream,
    cause: Option<io::ErrorKind>,
    counts: &[AtomicU64; 2],
) -> Summary {
    let failed = cause.is_some();
    for s in [a, b] {
        let _ = if failed {
            sys::set_reset_on_close(s.as_fd())
        } else {
            socket2::SockRef::from(s).set_linger(None)
        };
    }
    Summary {
        a_to_b: counts[0].load(Ordering::Relaxed),
        b_to_a: counts[1].load(Ordering::Relaxed),
        reset: failed,
        cause,
        holds: 0,
        parks: 0,
        small: 0,
        small_bytes: 0,
        kicks: 0,
    }
}

pub fn to_tokio(s: StdTcpStream) -> Result<TcpStream> {
    s.set_nonblocking(true)
        .context("making the socket non-blocking")?;
    TcpStream::from_std(s).context("registering the socket with the runtime")
}

/// Copies `src` to `dst` until EOF, then shuts `dst`'s write side so the
/// far end sees EOF after the last byte. `count` is exact even when an
/// error ends the copy: it counts bytes written, not bytes read.
pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    buffer: usize,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; buffer.max(1)];
    loop {
        let n = src
            .async_io(Interest::READABLE, || src.try_read(&mut buf))
            .await?;
        if n == 0 {
            break;
        }
        write_all(dst, &buf[..n], count).await?;
    }
    shutdown_write(dst)
}

/// Writes all of `buf`, adding to `count` as bytes are taken.
pub async fn write_all(dst: &TcpStream, buf: &[u8], count: &AtomicU64) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let w = dst
            .async_io(Interest::WRITABLE, || dst.try_write(&buf[off..]))
            .await?;
        if w == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        off += w;
        count.fetch_add(w as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Passes EOF on: the far end reads EOF after every byte written before.
pub fn shutdown_write(dst: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write)
}
