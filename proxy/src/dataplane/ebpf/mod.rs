//! The eBPF backend (`--proxy-mode ebpf`): cgroup socket hooks translate a frontend to a
//! backend at connect/sendmsg time (TCP and UDP), and back for UDP replies and
//! getpeername; tc programs on the node's external interfaces translate NodePorts,
//! external and load-balancer IPs (and ClusterIPs routed to the node) per packet, with a
//! connection-tracking map for replies, SNAT to the node for remote backends and
//! TCP RST / ICMP rejects for frontends without endpoints (IPv4 and IPv6); a cgroup_skb
//! egress program and the tc path enforce `loadBalancerSourceRanges`. Backends are picked
//! at random or by Maglev, with ClientIP session affinity. [`render`] turns the desired
//! state into map contents and diffs them (pure), [`kernel`] loads, attaches and pins the
//! programs and writes the maps with aya, [`fake`] behaves like BPF maps for tests.
//!
//! Not yet: SCTP; ICMP errors translated back for IPv6, masqueraded flows and towards
//! backends.

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod kernel;
pub mod render;
pub mod stale;
pub mod sync;

pub use kernel::EbpfError;
pub use render::{MapContents, MapOp, MapPlan};

/// The eBPF object built by `build.rs` (ebpf/weir-ebpf for bpfel-unknown-none).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-ebpf"));

/// What the sync runner needs from the services and backends maps: read them, write a
/// plan. Writes are not atomic: a failed plan may be half applied (the runner then re-reads
/// the maps on its next, full, sync).
pub trait MapStore: Send + 'static {
    /// Reads both maps.
    fn dump(&mut self) -> Result<MapContents, EbpfError>;
    /// Applies the writes in order, stopping at the first failure.
    fn apply(&mut self, plan: &MapPlan) -> Result<(), EbpfError>;
    /// Makes sure the tc programs are attached to the node's external interfaces (those
    /// holding `node_ips` unless configured); called on every sync, attaching only to
    /// interfaces not yet attached.
    fn attach_interfaces(&mut self, node_ips: &[std::net::IpAddr]) -> Result<(), EbpfError> {
        let _ = node_ips;
        Ok(())
    }
    /// Makes the ClusterIPs map hold `desired` (every Service's ClusterIPs), given what it
    /// holds (`current`, `None`: read it). A store without that map (the fake) keeps none.
    fn write_cluster_ips(
        &mut self,
        current: Option<&std::collections::BTreeSet<std::net::IpAddr>>,
        desired: &std::collections::BTreeSet<std::net::IpAddr>,
    ) -> Result<(), EbpfError> {
        let _ = (current, desired);
        Ok(())
    }
    /// Moves the connections `filters` name as stale off their backends ([`stale`]):
    /// destroys the sockets the hooks translated to them, in every network namespace of
    /// the node, and deletes the tc path's forward entries of such flows. A store without
    /// sockets or flows (the fake) has none to move.
    fn leave_stale_backends(
        &mut self,
        filters: &[crate::dataplane::conntrack::FlowFilter],
    ) -> Result<stale::Destroyed, EbpfError> {
        let _ = filters;
        Ok(stale::Destroyed::default())
    }
}
