//! The one place with `unsafe`: foreign functions of system libraries.

pub mod libnftables;
pub mod malloc;
