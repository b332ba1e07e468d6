//! Tells pair tasks when a socket's remote end shut down or failed,
//! without waking them for data.
//!
//! A socket in a sockmap still wakes its waiters on every arriving segment
//! (the verdict hook calls the original data-ready hook after redirecting).
//! tokio's readiness always includes EPOLLIN, so a task watching through
//! tokio would wake per segment and cost CPU in the data path. Here one
//! epoll instance is registered for EPOLLRDHUP only (EPOLLERR and EPOLLHUP
//! are always reported); the kernel filters data wake-ups out before they
//! reach user space (ep_poll_callback drops keys outside the interest set).
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use log::warn;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

/// What happened to one watched socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Index of the socket in the slice given to [`Watcher::watch`].
    pub side: usize,
    /// The remote end will send nothing more (FIN received).
    pub read_closed: bool,
    /// Error or hang-up: check the socket's error and state.
    pub failed: bool,
}

type Subscribers = Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>;

struct Inner {
    epoll: Epoll,
    subs: Subscribers,
    next: AtomicU64,
}

/// A shared epoll instance serviced by one tokio task.
#[derive(Clone)]
pub struct Watcher {
    inner: Arc<Inner>,
}

/// Receives the events of the sockets given to [`Watcher::watch`]; stops
/// watching them when dropped. Drop it before closing the sockets.
pub struct Subscription {
    inner: Arc<Inner>,
    id: u64,
    fds: Vec<RawFd>,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Watcher {
    /// Creates the epoll instance and spawns its task on the current
    /// tokio runtime.
    pub fn start() -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let inner = Arc::new(Inner {
            epoll,
            subs: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let raw = inner.epoll.0.as_raw_fd();
        // SAFETY: `raw` is the epoll fd owned by `inner`, which the task
        // below keeps alive for as long as it polls it.
        let afd = unsafe { AsyncFd::register_with_interest(raw, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let task_inner = inner.clone();
        tokio::spawn(async move { dispatch(afd, task_inner).await });
        Ok(Self { inner })
    }

    /// Watches `fds` (at most 2^8 of them) until the subscription drops.
    pub fn watch(&self, fds: &[BorrowedFd<'_>]) -> io::Result<Subscription> {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.subs).insert(id, tx);
        let mut sub = Subscription {
            inner: self.inner.clone(),
            id,
            fds: Vec::new(),
            rx,
        };
        for (side, fd) in fds.iter().enumerate() {
            let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
            self.inner
                .epoll
                .add(fd, EpollEvent::new(flags, (id << 8) | side as u64))
                .map_err(io::Error::from)?;
            sub.fds.push(fd.as_raw_fd());
        }
        Ok(sub)
    }
}

impl Subscription {
    /// The next event; `None` only if the watcher task ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for &fd in &self.fds {
            // SAFETY: the owner drops the subscription before closing the
            // fds; if one was closed anyway, epoll already forgot it and
            // the delete fails harmlessly.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = self.inner.epoll.delete(fd.as_fd());
        }
        lock(&self.inner.subs).remove(&self.id);
    }
}

fn lock(
    subs: &Subscribers,
) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<Event>>> {
    subs.lock().unwrap_or_else(|p| p.into_inner())
}

async fn dispatch(afd: AsyncFd<RawFd>, inner: Arc<Inner>) {
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        let mut guard = match afd.readable().await {
            Ok(g) => g,
            Err(e) => {
                warn!("socket watcher stopped: {e}");
                return;
            }
        };
        loop {
            let n = match inner.epoll.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("socket watcher stopped: {e}");
                    return;
                }
            };
            if n == 0 {
                break;
            }
            let subs = lock(&inner.subs);
            for ev in &events[..n] {
                let flags = ev.events();
                let event = Event {
                    side: (ev.data() & 0xff) as usize,
                    read_closed: flags.contains(EpollFlags::EPOLLRDHUP),
                    failed: flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP),
                };
                if let Some(tx) = subs.get(&(ev.data() >> 8)) {
                    let _ = tx.send(event);
                }
            }
        }
        guard.clear_ready();
    }
}
