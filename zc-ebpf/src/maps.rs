//! Maps more than one program family uses. Each family's own maps live
//! in its module.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap, SockHash},
};
use zc_common::{Counters, MAX_SOCKETS, Peer, SockKey};

/// Flags for the hash maps keyed by socket: elements are allocated when
/// inserted and freed only after every program that may still hold a
/// pointer into them has finished (RCU). A preallocated map recycles a
/// deleted element at once, so a verdict run holding a pointer into a
/// pair that just ended (`Peer::armed`, the `Flow` counters) would write
/// into whichever pair's entry took the slot next: a lost report or
/// wrong counts for an unrelated connection. It also saves preallocating
/// every entry of maps that are mostly empty.
pub(crate) const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// Relay sockets another process owns (the agent's pairs). Besides the
/// verdict, a stream parser is attached here: in parser mode the kernel
/// does not wake the owner's reader after each redirected skb. Without it
/// every redirect wakes a reader blocked in read(2), which then returns
/// EAGAIN, and proxies such as socat treat that as a fatal error.
#[map]
pub(crate) static FOREIGN: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub(crate) static PEERS: HashMap<SockKey, Peer> =
    HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

#[map]
pub(crate) static COUNTERS: PerCpuHashMap<SockKey, Counters> =
    PerCpuHashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

#[inline(always)]
pub(crate) fn count(key: &SockKey, len: u32, ok: bool) {
    // User space creates the entry when it pairs, so the hot path never
    // allocates.
    if let Some(c) = COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, so no other CPU writes it concurrently.
        unsafe {
            if ok {
                (*c).bytes += u64::from(len);
                (*c).msgs += 1;
            } else {
                (*c).failed += 1;
            }
        }
    }
}
