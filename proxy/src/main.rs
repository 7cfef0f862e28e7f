//! The weir-proxy daemon.
fn main() {}
