//! For proxies that cooperate: hand two connected sockets to `zc agent`,
//! which from then on moves their bytes (in the kernel with BPF, with
//! splice without it) and closes them when the connection ends.
use std::{net::TcpStream, os::fd::AsFd as _, path::Path};

use anyhow::{Result, bail};

use super::{
    control,
    proto::{Request, Response},
};

/// Hands `a` and `b` to the agent listening on `socket` and returns the
/// pair's id. The caller's copies are consumed: the agent now owns both
/// connections, including their half-close, reset and close.
///
/// ```no_run
/// # fn f(client: std::net::TcpStream, upstream: std::net::TcpStream) -> anyhow::Result<()> {
/// let id = zc_user::agent::client::hand_off(
///     std::path::Path::new(zc_user::agent::control::DEFAULT_SOCKET),
///     client,
///     upstream,
/// )?;
/// println!("relayed by the agent as pair {id}");
/// # Ok(()) }
/// ```
pub fn hand_off(socket: &Path, a: TcpStream, b: TcpStream) -> Result<u64> {
    let body = serde_json::to_vec(&Request::Handoff)?;
    let resp = control::call_with_fds(socket, &body, &[a.as_fd(), b.as_fd()])?;
    // The agent holds its own references now; ours close here.
    drop((a, b));
    match resp {
        Response::Paired { id, .. } => Ok(id),
        Response::Error { kind, message } => bail!("the agent refused ({kind:?}): {message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}
