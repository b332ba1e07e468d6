//! The data paths. Each engine takes two connected TCP sockets and moves
//! bytes between them until both directions have ended, propagating
//! half-close and reset. Callers never know which engine moved the bytes.
pub mod bpf;
pub mod copy;
pub mod splice;

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
    /// What failed, when the engine saw a socket's error itself (the
    /// access log names it: a reset with no reason helps no one). None
    /// for the BPF engine's own reasons (a map lookup, a count that does
    /// not add up), which it logs at debug level.
    pub cause: Option<std::io::ErrorKind>,
    /// BPF engine: times a direction was held back because its reader lagged
    /// by more than the window, and forwarded in user space until it caught up.
    pub holds: u64,
    /// BPF engine with parking: times a direction was parked (asked to
    /// be, at least): with `--park` for a lagging reader (its sender held
    /// by TCP flow control while the bytes stayed in the kernel), and on
    /// the adaptive path for small skbs, read as a plain socket (also
    /// counted in `small`).
    pub parks: u64,
    /// BPF engine with the adaptive path: times a direction of small skbs
    /// was moved to user space.
    pub small: u64,
    /// BPF engine with the adaptive path: of the bytes user space moved,
    /// those it forwarded while a direction was there for its small skbs
    /// (the rest went through user space for a slow reader).
    pub small_bytes: u64,
    /// BPF engine: times a relay socket that heard nothing from its end
    /// was made to announce its window (see `bpf::unstick`). Always 0 for
    /// an agent's pairs, which are never held or parked.
    pub kicks: u64,
}

/// Which data path moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Pick at start: bpf if it loads and passes a self-test, else splice,
    /// else copy; the choice and its reason are logged.
    Auto,
    /// In-kernel sockmap redirect: the bytes never enter user space.
    Bpf,
    /// splice(2) through a pipe: the bytes stay in kernel pages, but a
    /// process moves them.
    Splice,
    /// read(2)/write(2) through a buffer: the plain baseline.
    Copy,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Bpf => "bpf",
            Mode::Splice => "splice",
            Mode::Copy => "copy",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A ready data path.
#[derive(Clone)]
pub enum Engine {
    Bpf(bpf::BpfEngine),
    Splice(splice::SpliceEngine),
    Copy(copy::CopyEngine),
}

/// Bytes a user-space relay has moved so far, a to b and b to a, for
/// whoever watches it live.
pub type Counts = std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>;

impl Engine {
    /// Bytes the kernel's BPF path carried for this engine's pairs (0 for
    /// the user-space engines).
    pub fn kernel_bytes(&self) -> u64 {
        match self {
            Engine::Bpf(e) => e.kernel_bytes(),
            _ => 0,
        }
    }

    /// Relays between `a` and `b` until both directions end; closes both.
    pub async fn relay(&self, a: TcpStream, b: TcpStream) -> Result<Summary> {
        self.relay_counted(a, b, Counts::default()).await
    }

    /// [`Self::relay_counted`], and on the BPF path, `paired` is told the
    /// pair's map keys once it is in the kernel (see
    /// [`bpf::BpfEngine::handled`]); the other engines drop it.
    pub async fn relay_observed(
        &self,
        a: TcpStream,
        b: TcpStream,
        counts: Counts,
        paired: bpf::PairedReport,
    ) -> Result<Summary> {
        match self {
            Engine::Bpf(e) => e.relay_reporting(a, b, Some(paired), counts).await,
            other => other.relay_counted(a, b, counts).await,
        }
    }

    /// [`Self::relay`], keeping `counts` up to date with the bytes user
    /// space moves (all of them in splice and copy mode; in BPF mode those
    /// of held directions, the rest being in the verdict's counters).
    pub async fn relay_counted(
        &self,
        a: TcpStream,
        b: TcpStream,
        counts: Counts,
    ) -> Result<Summary> {
        match self {
            Engine::Bpf(e) => e.relay_reporting(a, b, None, counts).await,
            Engine::Splice(e) => e.relay_counted(a, b, counts).await,
            Engine::Copy(e) => e.relay_counted(a, b, counts).await,
        }
    }
}
