//! The splice engine: socket -> pipe -> socket with splice(2), so the
//! bytes stay in kernel pages and never reach a user buffer.
//!
//! Each direction owns one pipe from a bounded pool and alternates: fill
//! the empty pipe from the source, then drain it into the destination.
//! Because the pipe is only filled when empty, EAGAIN has one meaning per
//! call: "no data yet" when filling, "destination full" when draining;
//! either way the task waits for that socket's readiness, never spins.
use std::{
    fs::File,
    io,
    mem::ManuallyDrop,
    net::TcpStream as StdTcpStream,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use anyhow::{Context as _, Result};
use log::{debug, info, warn};
use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice, tee},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::{
    Summary,
    copy::{self, CopyEngine, arm_reset, finish, pump, shutdown_write, to_tokio, write_all},
};

/// Pipe capacity asked of F_SETPIPE_SZ (the kernel's default maximum for
/// unprivileged users is also 1 MiB, /proc/sys/fs/pipe-max-size).
pub const DEFAULT_PIPE_SIZE: usize = 1 << 20;
/// Most pipes alive at once (two per connection).
pub const DEFAULT_MAX_PIPES: usize = 4096;
/// Most empty pipes kept for reuse. Reuse saves a pipe2 and a resize per
/// direction, but every idle pipe holds two fds: after a burst the pool
/// closes all but these few, so pipes do not outlive their connections.
pub const DEFAULT_IDLE_PIPES: usize = 16;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

/// Pipes are reused: making one costs two fds and a resize, and a
/// returned pipe is always empty. At most `idle` empty pipes are kept.
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    live: AtomicUsize,
    max: usize,
    idle: usize,
    size: usize,
    /// Whether running out was already logged at info/warn level: the
    /// pool at its bound, or the kernel refusing a pipe.
    said_full: AtomicBool,
    said_failed: AtomicBool,
}

impl PipePool {
    pub fn new(max: usize, size: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            max,
            idle: DEFAULT_IDLE_PIPES,
            size,
            said_full: AtomicBool::new(false),
            said_failed: AtomicBool::new(false),
        }
    }

    /// Keeps at most `idle` empty pipes for reuse instead of
    /// [`DEFAULT_IDLE_PIPES`].
    pub fn with_idle(mut self, idle: usize) -> Self {
        self.idle = idle;
        self
    }

    /// Pipes in existence (in use or free).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Most pipes alive at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Most empty pipes kept open for reuse.
    pub fn idle_max(&self) -> usize {
        self.idle
    }

    fn get(&self) -> Option<Pipe> {
        if let Some(p) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Some(p);
        }
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.live.fetch_sub(1, Ordering::Relaxed);
            if !self.said_full.swap(true, Ordering::Relaxed) {
                info!(
                    "all {} pipes of the pool are in use; connections that find none are \
                     copied (logged once)",
                    self.max
                );
            }
            return None;
        }
        match make_pipe(self.size) {
            Ok(p) => Some(p),
            Err(e) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                // Once, not per connection: at the fd or memory limit every
                // new connection would say it again.
                if self.said_failed.swap(true, Ordering::Relaxed) {
                    debug!("cannot make a pipe: {e}; copying this connection");
                } else {
                    warn!(
                        "cannot make a pipe: {e}; connections that find no pipe are copied \
                         until pipes can be made (logged once)"
                    );
                }
                None
            }
        }
    }

    /// Keeps `p` for reuse, or closes it if enough are idle already.
    fn put(&self, p: Pipe) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.idle {
            free.push(p);
        } else {
            drop(free);
            self.discard(p);
        }
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
    record: Option<Arc<Recorder>>,
}

/// Where `--record` puts each direction of each connection.
pub struct Recorder {
    dir: PathBuf,
    next: AtomicU64,
}

impl Recorder {
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            next: AtomicU64::new(1),
        })
    }

    /// Files for the next connection: (a to b, b to a), under the first
    /// number whose two names are both free. Each file is created new
    /// (O_EXCL, which also refuses any symlink in its place, and
    /// O_NOFOLLOW), 0600: recordings hold other people's traffic, and an
    /// earlier run's recordings, or a link planted where the next one
    /// goes, are never written through.
    fn open(&self) -> io::Result<[(File, Pipe); 2]> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let create = |path: &std::path::Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
        };
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let [a, b] = ["client-to-upstream", "upstream-to-client"]
                .map(|name| self.dir.join(format!("{id:06}-{name}")));
            let fa = match create(&a) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                r => r.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", a.display())))?,
            };
            let fb = match create(&b) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // The first name is ours (just created, empty): give
                    // the number up whole.
                    drop(fa);
                    let _ = std::fs::remove_file(&a);
                    continue;
                }
                r => r.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", b.display())))?,
            };
            return Ok([
                (fa, make_pipe(DEFAULT_PIPE_SIZE)?),
                (fb, make_pipe(DEFAULT_PIPE_SIZE)?),
            ]);
        }
    }
}

impl SpliceEngine {
    pub fn new(pool: Arc<PipePool>) -> Self {
        Self { pool, record: None }
    }

    /// Also writes each direction of every connection to its own file in
    /// the recorder's directory, duplicating the pipe's pages with tee(2)
    /// so the recording never passes through user space either.
    pub fn with_recorder(mut self, rec: Arc<Recorder>) -> Self {
        self.record = Some(rec);
        self
    }

    pub fn pool(&self) -> &PipePool {
        &self.pool
    }

    /// Descriptors one connection holds besides its two sockets: two
    /// pipes from the pool, and when recording a file and a pipe per
    /// direction.
    pub fn fds_per_conn(&self) -> usize {
        4 + if self.record.is_some() { 6 } else { 0 }
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
        let (p0, p1) = match (self.pool.get(), self.pool.get()) {
            (Some(p0), Some(p1)) => (p0, p1),
            (p0, p1) => {
                for p in [p0, p1].into_iter().flatten() {
                    self.pool.put(p);
                }
                debug!("no pipe free; copying this connection");
                return CopyEngine::default().relay_counted(a, b, counts).await;
            }
        };
        let mut leases = [Lease::new(&self.pool, p0), Lease::new(&self.pool, p1)];
        let (a, b) = (to_tokio(a)?, to_tokio(b)?);
        arm_reset(&a, &b);
        let [rec0, rec1] = match self.record.as_ref().map(|r| r.open()) {
            Some(Ok([x, y])) => [Some(x), Some(y)],
            Some(Err(e)) => {
                // Nothing moved yet; neither end may take the close for a
                // complete (empty) stream.
                finish(&a, &b, Some(e.kind()), &counts);
                return Err(e).context("opening the recording files");
            }
            None => [None, None],
        };
        let result = tokio::try_join!(
            direction(&a, &b, &leases[0].pipe, rec0.as_ref(), &counts[0]),
            direction(&b, &a, &leases[1].pipe, rec1.as_ref(), &counts[1])
        );
        let cause = result.err().map(|e| e.kind());
        for l in &mut leases {
            l.reusable = cause.is_none();
        }
        drop(leases);
        Ok(finish(&a, &b, cause, &counts))
    }
}

/// A pipe taken from the pool, given back however the relay ends (an
/// error, a task aborted at shutdown): kept for reuse after a clean end,
/// closed otherwise, since it may hold bytes of a dead connection.
struct Lease<'a> {
    pool: &'a PipePool,
    pipe: ManuallyDrop<Pipe>,
    reusable: bool,
}

impl<'a> Lease<'a> {
    fn new(pool: &'a PipePool, pipe: Pipe) -> Self {
        Self {
            pool,
            pipe: ManuallyDrop::new(pipe),
            reusable: false,
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // SAFETY: taken once, here, and the field is never used again.
        let pipe = unsafe { ManuallyDrop::take(&mut self.pipe) };
        if self.reusable {
            self.pool.put(pipe)
        } else {
            self.pool.discard(pipe)
        }
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves `src` to `dst` through `pipe` until EOF, then shuts `dst`'s write
/// side. `count` holds the bytes the destination took. With `record`,
/// every byte is first duplicated into the recording pipe (tee) and
/// spliced into the file, so the file holds exactly what `dst` got.
async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    record: Option<&(File, Pipe)>,
    count: &AtomicU64,
) -> io::Result<()> {
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
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // Bytes at the head of the pipe already in the recording.
        let mut recorded = 0;
        while in_pipe > 0 {
            let mut chunk = in_pipe;
            if let Some((file, rec)) = record {
                if recorded == 0 {
                    recorded = record_head(pipe, in_pipe, file, rec)?;
                }
                // After a short tee, send only what was recorded; the rest
                // is teed once it is at the head.
                chunk = recorded;
            }
            let drained = dst
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.read, None, dst, None, chunk, flags())?)
                })
                .await;
            match drained {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    in_pipe -= n;
                    recorded = recorded.saturating_sub(n);
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    debug!(
                        "splice refused for this socket (EINVAL); draining the pipe, then copying"
                    );
                    drain_pipe(pipe, dst, in_pipe, count).await?;
                    pump(src, dst, copy::DEFAULT_BUFFER, count).await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
    shutdown_write(dst)?;
    Ok(())
}

/// Duplicates up to `len` bytes at the head of `pipe` into the empty
/// recording pipe and splices them into the file; returns how many. The
/// file is regular, so these splices complete without waiting on a peer.
fn record_head(pipe: &Pipe, len: usize, file: &File, rec: &Pipe) -> io::Result<usize> {
    let teed = tee(
        &pipe.read,
        &rec.write,
        len.min(rec.size),
        SpliceFFlags::SPLICE_F_NONBLOCK,
    )?;
    let mut left = teed;
    while left > 0 {
        let n = splice(
            &rec.read,
            None,
            file,
            None,
            left,
            SpliceFFlags::SPLICE_F_MOVE,
        )?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        left -= n;
    }
    Ok(teed)
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
