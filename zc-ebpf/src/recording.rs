//! Recording: `zc_sockops`, on a cgroup, records each socket there as it
//! becomes established, so the agent can pair sockets by 4-tuple. It also
//! enrols same-host connections in the short-circuit.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{map, sock_ops},
    maps::{HashMap, PerCpuArray},
    programs::SockOpsContext,
};
use zc_common::{MAX_SOCKETS, Recorded, SockKey};

use crate::{maps::NO_PREALLOC, short_circuit, sock::key_of};

/// Established TCP sockets in the agent's cgroup, by 4-tuple, with their
/// cookie (so the agent can tell the socket it finds in a process is the
/// one that was recorded) and which side opened the connection.
#[map]
static RECORDED: HashMap<SockKey, Recorded> = HashMap::with_max_entries(MAX_SOCKETS, NO_PREALLOC);

/// [RECORD_LOST]: sockets that could not be recorded (RECORDED full).
/// User space names the loss when a tuple it is asked for is missing.
#[map]
static RECORD_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
const RECORD_LOST: u32 = 0;

// include/uapi/linux/bpf.h
const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: u32 = 5;
const SOCK_OPS_STATE: u32 = 10;
const SOCK_OPS_TCP_LISTEN: u32 = 11;
const SOCK_OPS_STATE_CB_FLAG: u32 = 1 << 2;
const TCP_CLOSE: u32 = 7;

/// Records each socket of the cgroup as it becomes established, and
/// forgets it when it closes (the state callback is asked for per socket).
/// With the short-circuit on, both ends of a same-host connection whose
/// listener is in the cgroup join `LOCAL`: the client when it is
/// established (its callback runs before the server's, which needs the
/// client's ACK), the server then, with the `PEERS` entries that make
/// `zc_msg` redirect.
#[sock_ops]
pub fn zc_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let established = op == SOCK_OPS_ACTIVE_ESTABLISHED || op == SOCK_OPS_PASSIVE_ESTABLISHED;
    let closing = op == SOCK_OPS_STATE && ctx.arg(1) == TCP_CLOSE;
    if !(established || closing || op == SOCK_OPS_TCP_LISTEN) {
        return 1;
    }
    // Read once for every branch: a copy per branch let the compiler
    // share the reads through an offset into the context, which the
    // verifier refuses ("dereference of modified ctx ptr").
    // SAFETY: sock_ops programs may ask for their socket's namespace.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut _) };
    let key = key_of!(ctx.ops, netns);
    if established {
        // SAFETY: sock_ops programs may ask for their socket's cookie.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
        let rec = Recorded {
            cookie,
            active: u64::from(op == SOCK_OPS_ACTIVE_ESTABLISHED),
        };
        if RECORDED.insert(&key, &rec, 0).is_err()
            && let Some(lost) = RECORD_STATS.get_ptr_mut(RECORD_LOST)
        {
            // SAFETY: per-CPU value, so no other CPU writes it concurrently.
            unsafe { *lost += 1 };
        }
        let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG) as i32);
        if short_circuit::on() && short_circuit::same_host(&key) {
            short_circuit::enrol(&ctx, key, op == SOCK_OPS_PASSIVE_ESTABLISHED);
        }
    } else if closing {
        let _ = RECORDED.remove(&key);
        short_circuit::forget(&key);
    } else {
        // Listeners are noted whether or not the short-circuit is on yet,
        // and their close is asked for like any socket's.
        short_circuit::listening(&key);
        let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    1
}
