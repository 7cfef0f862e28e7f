//! System interfaces: foreign functions of system libraries (the one place with `unsafe`)
//! and kernel queries.

pub mod attachments;
pub mod libnftables;
pub mod local_addrs;
pub mod malloc;
