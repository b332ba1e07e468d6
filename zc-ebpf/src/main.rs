//! zc's kernel side: sockmap programs that move bytes between paired TCP
//! sockets without a trip through user space.
//!
//! Maps (all keyed by [`SockKey`], the socket's own 4-tuple):
//! - `TARGETS`: every socket that can receive a redirect. It has no
//!   programs attached, so joining it changes nothing about a socket; it
//!   only gives the redirect helpers something to look the peer up in.
//! - `RELAY`: sockets whose arriving bytes go to their peer's egress
//!   (`zc_verdict`, an sk_skb stream verdict program).
//! - `LOCAL`: same-host sockets whose sent bytes go to their peer's
//!   ingress (`zc_msg`, an sk_msg program).
//! - `PEERS`: socket -> where its bytes go. `COUNTERS`: what moved.
//! - `PARK`: relay sockets the verdict asked to park, or parked (out of
//!   `RELAY`, still in `TARGETS`) by `zc_park`, a sock_ops program.
//!
//! One module per program family, mirrored by `zc-user`'s `ebpf` module:
//! `verdict` (the relay: `zc_verdict`, `zc_verdict_parsed`, `zc_parser`),
//! `park` (`zc_park`), `fin_hold` (`zc_fin_hold`), `recording` (`zc_sockops`) and
//! `short_circuit` (`zc_msg`, and the sock_ops enrolment). `maps` holds
//! the maps more than one family uses, `sock` what every family reads
//! from a socket.
// Host builds (clippy, tests) see a plain empty binary; only the bpf
// target is freestanding.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod fin_hold;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod park;
#[cfg(target_arch = "bpf")]
mod recording;
#[cfg(target_arch = "bpf")]
mod short_circuit;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
