//! A TCP proxy that accepts, connects upstream, and hands both sockets to
//! `zc agent`: it never reads or writes a byte itself.
//!
//! ```sh
//! zc agent &
//! cargo run --release --example handoff_proxy -- 127.0.0.1:8080 127.0.0.1:80
//! ```
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
};

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: handoff_proxy LISTEN UPSTREAM [AGENT_SOCKET]";
    let listen: SocketAddr = args.next().context(usage)?.parse().context(usage)?;
    let upstream: SocketAddr = args.next().context(usage)?.parse().context(usage)?;
    let socket = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(zc_user::agent::control::DEFAULT_SOCKET));
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    eprintln!("handoff_proxy: {} -> {upstream}", listener.local_addr()?);
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let result = TcpStream::connect(upstream)
            .with_context(|| format!("connecting to {upstream}"))
            .and_then(|up| zc_user::agent::client::hand_off(&socket, client, up));
        match result {
            Ok(id) => eprintln!("handed over as pair {id}"),
            Err(e) => eprintln!("connection dropped: {e:#}"),
        }
    }
    Ok(())
}
