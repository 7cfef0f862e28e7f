//! The eBPF backend (`--proxy-mode ebpf`), first slice: cgroup socket hooks translate a
//! ClusterIP:port to a backend at connect/sendmsg time (TCP and UDP), and back for UDP
//! replies and getpeername. [`render`] turns the desired state into map contents and diffs
//! them (pure), [`kernel`] loads, attaches and pins the programs and writes the maps with
//! aya, [`fake`] behaves like BPF hash maps for tests.
//!
//! Not in this slice: the tc path for NodePort, ExternalIPs and LoadBalancer IPs, Maglev,
//! session affinity, SCTP.

pub mod fake;
pub mod kernel;
pub mod render;

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
}
