//! zc: move bytes between two TCP sockets without visiting user space.
pub mod agent;
pub mod btf;
pub mod cli;
pub mod ebpf;
pub mod engine;
pub mod host;
pub mod idle;
pub mod metrics;
pub mod pressure;
pub mod probe;
pub mod relay;
pub mod sock_diag;
pub mod sys;
pub mod traffic;
pub mod watch;
