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
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::Summary;
use crate::sys;

/// Default buffer per direction.
pub const DEFAULT_BUFFER: usize = 64 << 10;

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
    pub async fn relay(&self, a: StdTcpStream, b: StdTcpStream) -> Result<Summary> {
        let (mut a, mut b) = (to_tokio(a)?, to_tokio(b)?);
        let counts = [AtomicU64::new(0), AtomicU64::new(0)];
        let result = {
            let (mut ar, mut aw) = a.split();
            let (mut br, mut bw) = b.split();
            // try_join: the first error cancels the other direction.
            tokio::try_join!(
                pump(&mut ar, &mut bw, self.buffer, &counts[0]),
                pump(&mut br, &mut aw, self.buffer, &counts[1]),
            )
        };
        let reset = result.is_err();
        if reset {
            for s in [&a, &b] {
                let _ = sys::set_reset_on_close(s.as_fd());
            }
        }
        Ok(Summary {
            a_to_b: counts[0].load(Ordering::Relaxed),
            b_to_a: counts[1].load(Ordering::Relaxed),
            reset,
        })
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
pub async fn pump<R, W>(
    src: &mut R,
    dst: &mut W,
    buffer: usize,
    count: &AtomicU64,
) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer.max(1)];
    loop {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off < n {
            let w = dst.write(&buf[off..n]).await?;
            if w == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += w;
            count.fetch_add(w as u64, Ordering::Relaxed);
        }
    }
    dst.shutdown().await
}
