//! weir-cni: a CNI 1.1 plugin that attaches pods with routed veth pairs.
//!
//! Each pod gets one veth pair: `CNI_IFNAME` in the pod with a /32 (and /128) from the
//! node's pod CIDRs and a default route via the link-local gateway 169.254.1.1 (fe80::1),
//! and a host end named from the container ID with a route to the pod's addresses.
//!
//! Layout: [`spec`] (CNI types), [`ipam`] (allocator and its crash-safe store),
//! [`netns`] and [`netlink`] (kernel work), [`attachments`] (records weir-proxy reads),
//! [`cmd`] (the verbs).

pub mod attachments;
pub mod cmd;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod spec;
pub mod statedir;
