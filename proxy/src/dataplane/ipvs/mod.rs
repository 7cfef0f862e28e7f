//! The IPVS backend: every Service frontend (ClusterIP, NodePort on each node address,
//! external and load-balancer IPs) is an IPVS virtual server whose real servers are the
//! endpoints; the frontend addresses that are not the node's own are bound to the dummy
//! interface [`DUMMY_INTERFACE`] so the kernel delivers their packets locally, where IPVS
//! takes them. nftables does only what IPVS cannot: masquerade marks and rejects/drops for
//! Services without (local) endpoints (see [`crate::dataplane::nft::render::RenderConfig`]'s
//! `ipvs` switch).
//!
//! - [`render`]: pure, [`crate::model::DesiredState`] -> [`IpvsState`].
//! - [`diff`]: pure, desired vs. dumped state -> [`Op`]s (only what changed), with graceful
//!   termination of removed real servers.
//! - [`netlink`]: the kernel, through the generic netlink family `IPVS`.
//! - [`fake`]: an in-memory IPVS that rejects what the kernel rejects.
//! - [`program`]: one sync against any [`IpvsBackend`], dumping only when the last applied
//!   state cannot be trusted.
//! - [`apply`]: the side effects of one sync (dummy interface, addresses, ops).

pub mod apply;
pub mod diff;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod netlink;
pub mod program;
pub mod render;
pub mod sync;

use crate::model::Protocol;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// The dummy interface that holds Service addresses in IPVS mode (kube-proxy's is
/// `kube-ipvs0`).
pub const DUMMY_INTERFACE: &str = "weir-ipvs0";

/// IPVS schedulers weir offers (`--ipvs-scheduler`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Round robin.
    #[default]
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connection.
    Lc,
    /// Weighted least connection.
    Wlc,
    /// Source hashing.
    Sh,
    /// Destination hashing.
    Dh,
    /// Maglev hashing.
    Mh,
}

impl Scheduler {
    /// The kernel's name for the scheduler (`ip_vs_<name>` is its module).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Sh => "sh",
            Scheduler::Dh => "dh",
            Scheduler::Mh => "mh",
        }
    }
}

/// IPVS connection timeouts in seconds (`IPVS_CMD_SET_CONFIG`, what `ipvsadm --set tcp
/// tcpfin udp` sets); 0 leaves a timeout as the kernel has it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Established TCP connections (`--ipvs-tcp-timeout`).
    pub tcp: u32,
    /// TCP connections after a FIN (`--ipvs-tcpfin-timeout`).
    pub tcp_fin: u32,
    /// UDP flows (`--ipvs-udp-timeout`).
    pub udp: u32,
}

/// The NodePort range: a virtual server on a node address with a port in it is weir's
/// (see [`diff::owned`]).
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// A virtual server's identity: address, protocol, port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Frontend address.
    pub addr: IpAddr,
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// Frontend port.
    pub port: u16,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.protocol.nft_name()
        )
    }
}

/// A virtual server's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    /// Identity.
    pub key: ServiceKey,
    /// Scheduler name as the kernel knows it (a string: the kernel, and the fake, reject
    /// unknown ones).
    pub scheduler: String,
    /// `persistent` timeout in seconds (`sessionAffinity: ClientIP`), `None` without.
    pub persistent_timeout: Option<u32>,
}

/// A real server as it is (or should be) in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealServer {
    /// Endpoint address and port.
    pub addr: SocketAddr,
    /// Weight (0: no new connections).
    pub weight: u32,
    /// Active connections (dumps only; 0 in desired state).
    pub active_conns: u32,
    /// Inactive connections (dumps only).
    pub inactive_conns: u32,
}

impl RealServer {
    /// A real server with weight `weight` and no connections.
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        RealServer {
            addr,
            weight,
            active_conns: 0,
            inactive_conns: 0,
        }
    }
}

/// A virtual server with its real servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// Settings.
    pub server: VirtualServer,
    /// Real servers by address.
    pub dests: BTreeMap<SocketAddr, RealServer>,
}

/// Every virtual server, keyed by identity.
pub type IpvsState = BTreeMap<ServiceKey, ServiceState>;

/// One IPVS change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `IPVS_CMD_NEW_SERVICE`.
    AddService(VirtualServer),
    /// `IPVS_CMD_SET_SERVICE` (scheduler or persistence changed).
    UpdateService(VirtualServer),
    /// `IPVS_CMD_DEL_SERVICE` (its real servers go with it).
    DelService(ServiceKey),
    /// `IPVS_CMD_NEW_DEST`.
    AddDest(ServiceKey, RealServer),
    /// `IPVS_CMD_SET_DEST` (weight changed; weight 0 starts graceful termination).
    UpdateDest(ServiceKey, RealServer),
    /// `IPVS_CMD_DEL_DEST`.
    DelDest(ServiceKey, SocketAddr),
}

/// Failures of an IPVS operation, from the kernel or the fake.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The generic netlink socket could not be opened.
    #[error("opening a generic netlink socket: {0}")]
    Open(#[source] std::io::Error),
    /// The `IPVS` generic netlink family is not registered (no `ip_vs` module).
    #[error("the IPVS generic netlink family is unavailable (is the ip_vs module loaded?): {0}")]
    NoFamily(String),
    /// Sending or receiving failed.
    #[error("netlink {op}: {source}")]
    Socket {
        /// `send` or `recv`.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel (or the fake) refused an operation.
    #[error("{op} {target}: {source}")]
    Refused {
        /// The command, e.g. `IPVS_CMD_NEW_SERVICE`.
        op: &'static str,
        /// The virtual server (and real server) concerned.
        target: String,
        /// The errno.
        source: std::io::Error,
    },
    /// A reply could not be decoded.
    #[error("malformed IPVS netlink reply: {0}")]
    Decode(String),
}

impl From<crate::dataplane::netlink::NetlinkError> for IpvsError {
    fn from(e: crate::dataplane::netlink::NetlinkError) -> Self {
        use crate::dataplane::netlink::NetlinkError;
        match e {
            NetlinkError::Open(e) => IpvsError::Open(e),
            NetlinkError::Socket { op, source } => IpvsError::Socket { op, source },
            NetlinkError::Decode(m) => IpvsError::Decode(m),
        }
    }
}

/// What a sync needs from IPVS: dump every virtual server with its real servers, apply one
/// operation. The kernel ([`netlink::KernelIpvs`]) and the fake ([`fake::FakeIpvs`]) both
/// provide it.
pub trait IpvsBackend {
    /// Every virtual server with its real servers (and their connection counts).
    fn dump(&mut self) -> Result<IpvsState, IpvsError>;
    /// One virtual server with its real servers (and their connection counts); `None`
    /// when IPVS has no such virtual server.
    fn read_service(&mut self, key: &ServiceKey) -> Result<Option<ServiceState>, IpvsError>;
    /// Applies one operation.
    fn apply(&mut self, op: &Op) -> Result<(), IpvsError>;
    /// Applies `ops` in order, each whether or not the ones before succeeded; one result
    /// per operation. The kernel backend sends them in batches rather than one request
    /// and acknowledgement at a time.
    fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), IpvsError>> {
        ops.iter().map(|op| self.apply(op)).collect()
    }
}
