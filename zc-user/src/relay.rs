//! `zc relay`: a small TCP proxy. Accepts clients, connects each to the
//! upstream, and hands the two sockets to an engine.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{debug, info, warn};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

use crate::{engine::Engine, sys};

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub connect_timeout: Duration,
    pub max_conns: usize,
    /// After a stop signal: how long open connections may finish.
    pub shutdown_grace: Duration,
}

/// Totals over the relay's life.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub finished: AtomicU64,
    pub reset: AtomicU64,
    pub failed: AtomicU64,
    pub bytes: AtomicU64,
}

/// A bound relay, ready to serve.
pub struct Relay {
    listener: TcpListener,
    engine: Engine,
    config: Config,
    pub stats: Arc<Stats>,
}

impl Relay {
    pub async fn bind(config: Config, engine: Engine) -> Result<Self> {
        let listener =
            listen(config.listen).with_context(|| format!("listening on {}", config.listen))?;
        Ok(Self {
            listener,
            engine,
            config,
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `stop` resolves, then lets open connections finish for
    /// the grace period and resets the rest.
    pub async fn serve(self, stop: impl Future<Output = ()>) -> Result<()> {
        let limit = Arc::new(Semaphore::new(self.config.max_conns));
        let mut conns = JoinSet::new();
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                _ = &mut stop => break,
                p = limit.clone().acquire_owned() => p.context("connection limit closed")?,
            };
            let (client, peer) = tokio::select! {
                _ = &mut stop => break,
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: keep serving those we have.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let (engine, cfg, stats) =
                (self.engine.clone(), self.config.clone(), self.stats.clone());
            conns.spawn(async move {
                let _permit = permit;
                if let Err(e) = serve_one(client, peer, &engine, &cfg, &stats).await {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    warn!("{peer}: {e:#}");
                }
            });
            while conns.try_join_next().is_some() {}
        }
        // Reap what already ended so the count below is of open ones.
        while conns.try_join_next().is_some() {}
        info!(
            "stopping: {} open connection(s), grace {:?}",
            conns.len(),
            self.config.shutdown_grace
        );
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                "resetting {} connection(s) still open after the grace period",
                conns.len()
            );
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        }
        Ok(())
    }
}

/// A listening socket with a deep accept queue: a burst of clients must
/// wait for accept(), not be dropped by the kernel.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // [::] accepts IPv4 too unless told otherwise; keep the kernel's
        // default but make it explicit that v4-mapped peers are fine.
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    TcpListener::from_std(s.into())
}

async fn serve_one(
    client: TcpStream,
    peer: SocketAddr,
    engine: &Engine,
    cfg: &Config,
    stats: &Stats,
) -> Result<()> {
    debug!("{peer}: accepted");
    let client = client.into_std()?;
    let upstream =
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(cfg.upstream)).await {
            Ok(Ok(s)) => s.into_std()?,
            Ok(Err(e)) => {
                let _ = sys::set_reset_on_close(std::os::fd::AsFd::as_fd(&client));
                return Err(e).with_context(|| format!("connecting to upstream {}", cfg.upstream));
            }
            Err(_) => {
                let _ = sys::set_reset_on_close(std::os::fd::AsFd::as_fd(&client));
                anyhow::bail!(
                    "connecting to upstream {} timed out after {:?}",
                    cfg.upstream,
                    cfg.connect_timeout
                );
            }
        };
    debug!("{peer}: connected upstream");
    // A task aborted at shutdown drops the sockets mid-relay; make that an
    // abortive close so neither end mistakes it for a clean end of stream.
    let mut guard = ResetOnDrop {
        socks: [client.try_clone()?, upstream.try_clone()?],
        armed: true,
    };
    let summary = engine.relay(client, upstream).await;
    guard.armed = false;
    let summary = summary?;
    stats.finished.fetch_add(1, Ordering::Relaxed);
    stats
        .bytes
        .fetch_add(summary.a_to_b + summary.b_to_a, Ordering::Relaxed);
    if summary.reset {
        stats.reset.fetch_add(1, Ordering::Relaxed);
    }
    debug!(
        "{peer}: done, {} bytes up, {} down{}",
        summary.a_to_b,
        summary.b_to_a,
        if summary.reset { ", reset" } else { "" }
    );
    Ok(())
}

struct ResetOnDrop {
    socks: [std::net::TcpStream; 2],
    armed: bool,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for s in &self.socks {
            let _ = sys::set_reset_on_close(std::os::fd::AsFd::as_fd(s));
        }
    }
}
