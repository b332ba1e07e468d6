//! What the programs read from a socket: its key, and its kernel address.
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_map_lookup_elem, bpf_sk_release},
    },
};
use zc_common::SockKey;

/// Builds a key from a socket context (`sk_msg_md` or `bpf_sock_ops`,
/// which name these fields alike) and the cookie of the socket's network
/// namespace (`bpf_get_netns_cookie`). Every field is loaded on its own, volatile:
/// the verifier rejects a load through a context pointer the compiler has
/// offset ("dereference of modified ctx ptr"), which copying the IPv6
/// arrays as a whole produces.
macro_rules! key_of {
    ($ctx:expr, $netns:expr) => {{
        use ::core::ptr::read_volatile;
        use ::zc_common::{AF_INET, SockKey, remote_port_from_ctx};
        let c = $ctx;
        // SAFETY: the kernel hands the program a valid context for its run.
        unsafe {
            let family = read_volatile(&raw const (*c).family);
            let mut key = SockKey {
                netns: $netns,
                family,
                local_port: read_volatile(&raw const (*c).local_port),
                remote_port: remote_port_from_ctx(read_volatile(&raw const (*c).remote_port)),
                local_ip: [0; 4],
                remote_ip: [0; 4],
                pad: 0,
            };
            if family == AF_INET {
                key.local_ip[0] = read_volatile(&raw const (*c).local_ip4);
                key.remote_ip[0] = read_volatile(&raw const (*c).remote_ip4);
            } else {
                key.local_ip[0] = read_volatile(&raw const (*c).local_ip6[0]);
                key.local_ip[1] = read_volatile(&raw const (*c).local_ip6[1]);
                key.local_ip[2] = read_volatile(&raw const (*c).local_ip6[2]);
                key.local_ip[3] = read_volatile(&raw const (*c).local_ip6[3]);
                key.remote_ip[0] = read_volatile(&raw const (*c).remote_ip6[0]);
                key.remote_ip[1] = read_volatile(&raw const (*c).remote_ip6[1]);
                key.remote_ip[2] = read_volatile(&raw const (*c).remote_ip6[2]);
                key.remote_ip[3] = read_volatile(&raw const (*c).remote_ip6[3]);
            }
            // IPv4-mapped sockets are keyed as IPv4, as user space and the
            // FIN hold key them.
            key.normalised()
        }
    }};
}
pub(crate) use key_of;

/// The kernel address of the socket stored under `key` in the sockhash
/// `map`, to follow with probe reads at offsets taken from BTF.
#[inline(always)]
pub(crate) fn sock_addr(map: *mut c_void, key: &SockKey) -> Option<u64> {
    // SAFETY: a sockhash lookup yields a referenced socket or null; it is
    // released at once. Its address is copied out through a probe read
    // (the verifier forbids arithmetic on a socket pointer, and lets a
    // privileged program read its own stack this way).
    unsafe {
        let sk = bpf_map_lookup_elem(map, key as *const SockKey as *const c_void);
        if sk.is_null() {
            return None;
        }
        let slot = [sk as u64];
        let addr = bpf_probe_read_kernel(slot.as_ptr()).unwrap_or(0);
        bpf_sk_release(sk);
        (addr != 0).then_some(addr)
    }
}
