//! The data paths. Each engine takes two connected TCP sockets and moves
//! bytes between them until both directions have ended, propagating
//! half-close and reset. Callers never know which engine moved the bytes.
pub mod bpf;
pub mod copy;

use std::{fmt, net::TcpStream};

use anyhow::Result;

/// How a relayed connection ended, and what crossed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Bytes moved from the first socket to the second.
    pub a_to_b: u64,
    /// Bytes moved from the second socket to the first.
    pub b_to_a: u64,
    /// One side was reset or failed, and the other was reset in turn.
    pub reset: bool,
}

/// Which data path moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// In-kernel sockmap redirect: the bytes never enter user space.
    Bpf,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Bpf => "bpf",
        })
    }
}

/// A ready data path.
#[derive(Clone)]
pub enum Engine {
    Bpf(bpf::BpfEngine),
}

impl Engine {
    pub fn mode(&self) -> Mode {
        match self {
            Engine::Bpf(_) => Mode::Bpf,
        }
    }

    /// Relays between `a` and `b` until both directions end; closes both.
    pub async fn relay(&self, a: TcpStream, b: TcpStream) -> Result<Summary> {
        match self {
            Engine::Bpf(e) => e.relay(a, b).await,
        }
    }
}
