//! Allocator tuning for a long-running daemon.

#![allow(unsafe_code)]

/// Limits glibc malloc to one arena. With an arena per thread, memory a parsing thread
/// freed stayed resident in that thread's arena while the sync thread grew its own: at
/// 10,000 services this kept about 12 MiB more resident (measured with
/// `cargo xtask bench sync`). weir's work is sequential, so one arena costs no contention
/// worth having. Returns whether glibc accepted the setting.
pub fn limit_arenas() -> bool {
    // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX takes a positive count
    // and is called at start, before the runtime's threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
}
