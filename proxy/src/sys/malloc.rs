//! Allocator tuning for a long-running daemon.

#![allow(unsafe_code)]

/// Limits glibc malloc to one arena. With an arena per thread, memory a parsing thread
/// freed stayed resident in that thread's arena while the sync thread grew its own: at
/// 10,000 services this kept about 12 MiB more resident (measured with
/// `cargo xtask bench sync`). The daemon's own allocations go to mimalloc; this still
/// bounds those of the C libraries (libnftables). Returns whether glibc accepted the
/// setting.
pub fn limit_arenas() -> bool {
    // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX takes a positive count
    // and is called at start, before the runtime's threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
}

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc v3's
/// `include/mimalloc.h`; libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc hand freed memory back to the kernel at once instead of after its
/// default delay: with the delay, the peak RSS of reading a 10,000-Service manifest file
/// was 139 MiB, without it 94 MiB (glibc: 103 MiB), for the same CPU time.
pub fn purge_at_once() {
    // SAFETY: mi_option_set only stores an option value; purge_delay takes any
    // millisecond count (0: at once).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}
