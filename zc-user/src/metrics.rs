//! `/metrics` (Prometheus text format) and `/healthz` over plain HTTP, for
//! whoever runs zc as a service. A few requests a minute from a scraper
//! need no HTTP library: one request per connection, then close.
use std::{fmt::Write as _, sync::Arc};

use log::debug;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// Builds the metrics text on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Whether the service is doing its job, for `/healthz`: Err says why
/// not (answered 503).
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A service that is healthy whenever it can answer at all.
pub fn always_healthy() -> Health {
    Arc::new(|| Ok(()))
}

/// Answers scrapes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, render: Render, health: Health) {
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            // Out of descriptors or similar: the relay itself says so;
            // back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (render, health) = (render.clone(), health.clone());
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            // The request line and headers; a scraper's fit in a few KiB.
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => req.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let line = String::from_utf8_lossy(&req);
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, kind, body) = match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render(),
                ),
                ("GET", "/healthz") => match health() {
                    Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
                    Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
                },
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if let Err(e) = async {
                s.write_all(head.as_bytes()).await?;
                s.write_all(body.as_bytes()).await?;
                s.shutdown().await
            }
            .await
            {
                debug!("metrics: answering {peer}: {e}");
            }
        });
    }
}

/// One metric family in the text format: help, type, then its samples
/// (`labels` may be empty).
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl<'a> Family<'a> {
    pub fn new(out: &'a mut String, name: &'a str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out, name }
    }

    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let _ = write!(self.out, "{}", self.name);
        if !labels.is_empty() {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let _ = write!(self.out, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}
