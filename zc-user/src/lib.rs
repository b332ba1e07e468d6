//! zc: move bytes between two TCP sockets without visiting user space.
pub mod ebpf;
pub mod sys;
