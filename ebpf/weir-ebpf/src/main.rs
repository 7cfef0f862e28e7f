//! weir's eBPF programs: cgroup socket hooks that translate a Service frontend
//! (ClusterIP:port) to a backend when a socket connects or sends, and translate replies
//! back; and tc programs that translate NodePorts, external and load-balancer IPs (and
//! ClusterIPs reached from outside) on the node's external interfaces. On the host this crate is an empty binary; `proxy/build.rs` builds it for
//! `bpfel-unknown-none`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod tc;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
