//! The nftables backend: one table `weir` per family; every service, endpoint and
//! NodePort is an element of shared named maps and sets.

pub mod diff;
pub mod elements;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod incremental;
pub mod kernel;
pub mod plan;
pub mod policy;
#[cfg(test)]
mod policy_tests;
pub mod render;
pub mod sync;
pub mod table;
#[cfg(any(test, feature = "testing"))]
pub mod tracer;

pub use plan::{Op, Plan};
pub use table::{DumpedTable, Family, Table};

/// The families weir programs: one table each.
pub const FAMILIES: [Family; 2] = [Family::Ip, Family::Ip6];

/// What the sync runner needs from nftables: list weir's table, apply a plan. The real
/// kernel ([`kernel::KernelNft`]) and the fake ([`fake::SharedFake`]) both provide it.
pub trait NftBackend: Clone + Send + Sync + 'static {
    /// Lists weir's table of a family (`None` when it does not exist).
    fn dump(&self, family: Family) -> Result<Option<DumpedTable>, kernel::KernelError>;
    /// Applies a plan atomically.
    fn apply(&self, plan: &Plan) -> Result<(), kernel::KernelError>;
    /// Adds the elements of a plan holding only [`Op::AddElements`] on plain (not interval,
    /// not dynamic) sets and maps; it may take several transactions, so only for loads into
    /// a table nothing uses yet. By default the same as [`NftBackend::apply`].
    fn add_elements(&self, plan: &Plan) -> Result<(), kernel::KernelError> {
        self.apply(plan)
    }
}

impl NftBackend for kernel::KernelNft {
    fn dump(&self, family: Family) -> Result<Option<DumpedTable>, kernel::KernelError> {
        kernel::KernelNft::dump(self, family)
    }

    fn apply(&self, plan: &Plan) -> Result<(), kernel::KernelError> {
        kernel::KernelNft::apply(self, plan)
    }

    fn add_elements(&self, plan: &Plan) -> Result<(), kernel::KernelError> {
        kernel::KernelNft::add_elements(self, plan)
    }
}

/// nftables' spelling of the protocols.
impl crate::objects::Protocol {
    /// nftables' name of the protocol (`tcp`, `udp`, `sctp`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }

    /// Parses nftables' name of the protocol.
    pub fn from_nft_name(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "sctp" => Some(Self::Sctp),
            _ => None,
        }
    }
}
