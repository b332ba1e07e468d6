//! A socket's memory as the kernel accounts it.
use std::os::fd::BorrowedFd;

pub use zc_user::sys::MemInfo as SockMem;

/// SO_MEMINFO of `fd`; fails the test if the kernel refuses.
pub fn meminfo(fd: BorrowedFd<'_>) -> SockMem {
    zc_user::sys::meminfo(fd).expect("SO_MEMINFO")
}
