//! A socket's memory as the kernel accounts it.
use std::os::fd::{AsRawFd, BorrowedFd};

/// The two figures of SO_MEMINFO the window bound is about.
pub struct SockMem {
    pub rmem_alloc: u64,
    pub wmem_queued: u64,
}

/// SO_MEMINFO of `fd`.
pub fn meminfo(fd: BorrowedFd<'_>) -> SockMem {
    let mut v = [0u32; 9];
    let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
    // SAFETY: the buffer and its length match.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            v.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_MEMINFO: {}", std::io::Error::last_os_error());
    // SK_MEMINFO_RMEM_ALLOC = 0, SK_MEMINFO_WMEM_QUEUED = 5.
    SockMem {
        rmem_alloc: u64::from(v[0]),
        wmem_queued: u64::from(v[5]),
    }
}
