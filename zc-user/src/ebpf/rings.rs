//! The ring buffers the programs write to (the eBPF-side log, the
//! verdict's limit events), drained on the tokio runtime.
use aya::Ebpf;
use log::{debug, warn};

/// Runs `drain` on `source` each time it becomes readable, in a task on
/// the current tokio runtime. Both users are ring buffers that only
/// support side channels (limit events, logs), so failing to start is
/// logged, not fatal. Without a runtime `source` is handed back for the
/// caller to keep open.
pub(super) fn drain_when_readable<T, F>(what: &'static str, source: T, mut drain: F) -> Option<T>
where
    T: std::os::fd::AsRawFd + Send + 'static,
    F: FnMut(&mut T) + Send + 'static,
{
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        // Dropping `source` would close its map before the programs that
        // write to it are loaded ("fd is not pointing to valid bpf_map").
        debug!("{what} not forwarded: no tokio runtime");
        return Some(source);
    };
    handle.spawn(async move {
        // SAFETY: `source` owns its fd and keeps it open while the AsyncFd
        // holds it.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(source, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!("{what} unavailable: {}", e.into_parts().1);
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            drain(guard.get_inner_mut());
            guard.clear_ready();
        }
    });
    None
}

/// eBPF-side logs arrive through aya-log's ring buffer and go to `log`.
/// Forwards eBPF-side log lines to `log` on the current tokio runtime;
/// hands the logger back when there is none (see [`drain_when_readable`]).
pub(super) fn start_log_forwarding(
    ebpf: &mut Ebpf,
) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => drain_when_readable("eBPF-side logging", logger, |l| l.flush()),
        Err(e) => {
            warn!("eBPF-side logging is unavailable: {e}");
            None
        }
    }
}
