//! The splice engine: socket -> pipe -> socket with splice(2), so the
//! bytes stay in kernel pages and never reach a user buffer.
//!
//! Each direction owns one pipe from a bounded pool and alternates: fill
//! the empty pipe from the source, then drain it into the destination.
//! Because the pipe is only filled when empty, EAGAIN has one meaning per
//! call: "no data yet" when filling, "destination full" when draining;
//! either way the task waits for that socket's readiness, never spins.
use std::{
    io,
    net::TcpStream as StdTcpStream,
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use anyhow::Result;
use log::debug;
use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::{
    Summary,
    copy::{self, CopyEngine, finish, pump, shutdown_write, to_tokio, write_all},
};

/// Pipe capacity asked of F_SETPIPE_SZ (the kernel's default maximum for
/// unprivileged users is also 1 MiB, /proc/sys/fs/pipe-max-size).
pub const DEFAULT_PIPE_SIZE: usize = 1 << 20;
/// Most pipes alive at once (two per connection).
pub const DEFAULT_MAX_PIPES: usize = 4096;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

/// Pipes are reused: making one costs two fds and a resize, and a
/// returned pipe is always empty.
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    live: AtomicUsize,
    max: usize,
    size: usize,
}

impl PipePool {
    pub fn new(max: usize, size: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            max,
            size,
        }
    }

    /// Pipes in existence (in use or free).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn get(&self) -> Option<Pipe> {
        if let Some(p) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Some(p);
        }
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match make_pipe(self.size) {
            Ok(p) => Some(p),
            Err(e) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                debug!("cannot make a pipe: {e}");
                None
            }
        }
    }

    fn put(&self, p: Pipe) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(p);
    }

    /// A pipe that may still hold bytes is closed, not reused.
    fn discard(&self, p: Pipe) {
        drop(p);
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

fn make_pipe(size: usize) -> io::Result<Pipe> {
    let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A smaller pipe still works, only with more calls per byte.
    let size = match fcntl(
        &write,
        FcntlArg::F_SETPIPE_SZ(i32::try_from(size).unwrap_or(i32::MAX)),
    ) {
        Ok(n) => usize::try_from(n).unwrap_or(64 << 10),
        Err(_) => 64 << 10,
    };
    Ok(Pipe { read, write, size })
}

#[derive(Clone)]
pub struct SpliceEngine {
    pool: Arc<PipePool>,
}

/// How a direction ended.
enum End {
    /// EOF passed on; the pipe is empty.
    Done,
    /// The kernel refused splice for these sockets (EINVAL); the pipe is
    /// drained and the rest was copied.
    Copied,
}

impl SpliceEngine {
    pub fn new(pool: Arc<PipePool>) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PipePool {
        &self.pool
    }

    pub async fn relay(&self, a: StdTcpStream, b: StdTcpStream) -> Result<Summary> {
        let (p0, p1) = match (self.pool.get(), self.pool.get()) {
            (Some(p0), Some(p1)) => (p0, p1),
            (p0, p1) => {
                for p in [p0, p1].into_iter().flatten() {
                    self.pool.put(p);
                }
                debug!("no pipe free; copying this connection");
                return CopyEngine::default().relay(a, b).await;
            }
        };
        let (a, b) = (to_tokio(a)?, to_tokio(b)?);
        let counts = [AtomicU64::new(0), AtomicU64::new(0)];
        let result = tokio::try_join!(
            direction(&a, &b, &p0, &counts[0]),
            direction(&b, &a, &p1, &counts[1])
        );
        let failed = result.is_err();
        for p in [p0, p1] {
            // After an error a pipe may hold bytes of a dead connection.
            if failed {
                self.pool.discard(p)
            } else {
                self.pool.put(p)
            }
        }
        Ok(finish(&a, &b, failed, &counts))
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves `src` to `dst` through `pipe` until EOF, then shuts `dst`'s write
/// side. `count` holds the bytes the destination took.
async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    count: &AtomicU64,
) -> io::Result<End> {
    loop {
        let filled = src
            .async_io(Interest::READABLE, || {
                Ok(splice(src, None, &pipe.write, None, pipe.size, flags())?)
            })
            .await;
        let mut in_pipe = match filled {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                debug!("splice refused for this socket (EINVAL); copying the rest");
                pump(src, dst, copy::DEFAULT_BUFFER, count).await?;
                return Ok(End::Copied);
            }
            Err(e) => return Err(e),
        };
        while in_pipe > 0 {
            let drained = dst
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.read, None, dst, None, in_pipe, flags())?)
                })
                .await;
            match drained {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    in_pipe -= n;
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    debug!(
                        "splice refused for this socket (EINVAL); draining the pipe, then copying"
                    );
                    drain_pipe(pipe, dst, in_pipe, count).await?;
                    pump(src, dst, copy::DEFAULT_BUFFER, count).await?;
                    return Ok(End::Copied);
                }
                Err(e) => return Err(e),
            }
        }
    }
    shutdown_write(dst)?;
    Ok(End::Done)
}

/// Empties `pipe` into `dst` with read(2)/write(2), for when splice will
/// not take the destination: the bytes already in the pipe go first.
async fn drain_pipe(
    pipe: &Pipe,
    dst: &TcpStream,
    mut left: usize,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; copy::DEFAULT_BUFFER];
    while left > 0 {
        let want = left.min(buf.len());
        // The pipe holds `left` bytes, so this read does not block.
        let n = nix::unistd::read(pipe.read.as_fd(), &mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        write_all(dst, &buf[..n], count).await?;
        left -= n;
    }
    Ok(())
}
