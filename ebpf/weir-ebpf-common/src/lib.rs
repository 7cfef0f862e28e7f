//! Map keys and values shared by weir's eBPF programs (`weir-ebpf`) and the daemon.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so a key built in the kernel
//! and one built in userspace have the same bytes. Addresses and ports are kept in network
//! byte order, exactly as `struct bpf_sock_addr` holds them: an address is four `u32`
//! words whose memory bytes are the address's bytes (an IPv4 address uses the first word,
//! the others are zero), a port is a `u16` whose memory bytes are the port in big endian.
#![no_std]

/// `family` of an IPv4 [`AddrPort`].
pub const FAMILY_V4: u8 = 4;
/// `family` of an IPv6 [`AddrPort`].
pub const FAMILY_V6: u8 = 6;
/// `proto` of a TCP frontend (IPPROTO_TCP).
pub const PROTO_TCP: u8 = 6;
/// `proto` of a UDP frontend (IPPROTO_UDP).
pub const PROTO_UDP: u8 = 17;

/// Name of the services map: [`ServiceKey`] -> [`ServiceValue`].
pub const SERVICES_MAP: &str = "WEIR_SERVICES";
/// Name of the backends map: [`BackendKey`] -> [`Backend`].
pub const BACKENDS_MAP: &str = "WEIR_BACKENDS";
/// Name of the reverse translation map (LRU, written by the programs): [`RevNatKey`] ->
/// [`RevNatValue`].
pub const REVNAT_MAP: &str = "WEIR_REVNAT";

/// Name of the source ranges map (an LPM trie): `(prefix length, [`SourceRange`])` -> 1.
pub const SOURCE_RANGES_MAP: &str = "WEIR_SOURCE_RANGES";

/// Name of the service CIDRs map (an LPM trie, `--service-cluster-ip-range`): `(32 +
/// prefix length, [`IpKey`])` -> 1. A new connection to an address inside them that no
/// Service has is dropped, as nftables mode drops it.
pub const SERVICE_CIDRS_MAP: &str = "WEIR_SERVICE_CIDRS";
/// Name of the ClusterIPs map: [`IpKey`] -> 1. A connection to a ClusterIP on a port its
/// Service does not have is refused, as nftables mode rejects it.
pub const CLUSTER_IPS_MAP: &str = "WEIR_CLUSTER_IPS";
/// Capacity of the service CIDRs map.
pub const SERVICE_CIDRS_MAX: u32 = 64;
/// Capacity of the ClusterIPs map.
pub const CLUSTER_IPS_MAX: u32 = 65_536;
/// Bits of an [`IpKey`] taken by its family (an LPM prefix is 32 + the address prefix).
pub const IP_KEY_FAMILY_BITS: u32 = 32;

/// Name of the Maglev lookup tables: [`BackendKey`] (frontend, table index) -> slot (`u32`).
pub const MAGLEV_MAP: &str = "WEIR_MAGLEV";
/// Name of the tc path's connection-tracking map (LRU, written by the programs): [`CtKey`]
/// -> [`CtValue`].
pub const CT_MAP: &str = "WEIR_CT";
/// Name of the session affinity map (LRU, written by the programs): [`AffinityKey`] ->
/// [`AffinityValue`].
pub const AFFINITY_MAP: &str = "WEIR_AFFINITY";

/// Entries of one frontend's Maglev lookup table (a prime). Maglev wants it well above
/// the backend count (about 100 × for 1 % balance); 4093 keeps a table at about 100 KiB of
/// map memory and balances up to a few dozen backends within a few percent.
pub const MAGLEV_TABLE_SIZE: u32 = 4093;
/// Capacity of the Maglev map (table entries over all Maglev frontends; allocated on use).
pub const MAGLEV_MAX: u32 = 1 << 21;
/// Capacity of the connection-tracking map (two entries per translated flow).
pub const CT_MAX: u32 = 262_144;
/// Capacity of the session affinity map.
pub const AFFINITY_MAX: u32 = 65_536;

/// Capacity of the source ranges map (allowed prefixes over all frontends).
pub const SOURCE_RANGES_MAX: u32 = 65_536;

/// Capacity of the services map (frontends).
pub const SERVICES_MAX: u32 = 65_536;
/// Capacity of the backends map (slots over all frontends).
pub const BACKENDS_MAX: u32 = 524_288;
/// Capacity of the reverse translation map (sockets × backends, least recently used go).
pub const REVNAT_MAX: u32 = 262_144;

/// An address, port, family and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrPort {
    /// The address in network byte order (see the crate docs).
    pub addr: [u32; 4],
    /// The port in network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`] in a frontend; 0 in a backend.
    pub proto: u8,
}

/// A frontend (ClusterIP, port, protocol): the services map's key.
pub type ServiceKey = AddrPort;

/// [`ServiceValue::flags`]: the Service has endpoints, but none for this traffic (e.g.
/// `internalTrafficPolicy: Local` without local endpoints): connect fails with EPERM
/// instead of ECONNREFUSED, like nftables mode's drop.
pub const FLAG_DROP: u32 = 1;
/// [`ServiceValue::flags`]: the frontend's address is one of the node's own (a NodePort).
/// Without endpoints the tc path passes the packet on to the node's stack, which answers
/// it as a closed port would (TCP RST, ICMP port unreachable).
pub const FLAG_NODE_LOCAL: u32 = 2;
/// [`ServiceValue::flags`]: the tc path picks the backend from the frontend's Maglev table
/// (the [`MAGLEV_MAP`]) by a hash of the packet's 5-tuple instead of at random.
pub const FLAG_MAGLEV: u32 = 4;

/// [`ServiceValue::flags`]: an external frontend (NodePort, external or load-balancer IP)
/// of an `externalTrafficPolicy: Local` Service, whose slots are only this node's
/// endpoints. The socket hooks (the node's own processes and pods, which use every
/// endpoint) look up its [`SOCKET_VIEW`] twin instead.
pub const FLAG_EXTERNAL_LOCAL: u32 = 8;
/// Set in a [`ServiceKey`]'s `proto` for the socket hooks' twin of a
/// [`FLAG_EXTERNAL_LOCAL`] frontend: same address and port, slots over all endpoints. No
/// packet carries such a protocol, so the tc path never finds it.
pub const SOCKET_VIEW: u8 = 0x80;
/// [`ServiceValue::flags`]: the frontend (a load-balancer IP with
/// `loadBalancerSourceRanges`) accepts new flows only from sources inside one of its
/// prefixes in the [`SOURCE_RANGES_MAP`]; others are dropped.
pub const FLAG_SOURCE_RANGES: u32 = 16;

/// What a frontend leads to: `count` backends in slots `0..count` of the backends map,
/// keyed by this frontend. `count == 0` means the Service has no endpoints (refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceValue {
    /// Number of backend slots.
    pub count: u32,
    /// [`FLAG_DROP`], [`FLAG_NODE_LOCAL`], [`FLAG_MAGLEV`], [`FLAG_SOURCE_RANGES`] or 0.
    pub flags: u32,
    /// ClientIP session affinity timeout in seconds; 0 without affinity.
    pub affinity_timeout: u32,
    /// The node's address of the frontend's family (network byte order, see the crate
    /// docs) that the tc path puts as the source of flows to a remote backend
    /// ([`BACKEND_REMOTE`]); all zero where nothing is masqueraded.
    pub snat: [u32; 4],
}

/// [`Backend`]'s `proto` in the backends map: the endpoint is on another node and the
/// frontend's external traffic policy is Cluster, so the tc path masquerades flows to it
/// (source -> the frontend's `snat`). 0 otherwise.
pub const BACKEND_REMOTE: u8 = 1;

/// One backend slot of a frontend: the backends map's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    /// The frontend whose slot this is.
    pub service: ServiceKey,
    /// The slot, `0..count`.
    pub slot: u32,
}

/// A backend's address and port (`proto` is 0).
pub type Backend = AddrPort;

/// A socket's translation, recorded at connect/sendmsg time so replies (recvmsg) and
/// getpeername report the frontend instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevNatKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// The backend the socket was sent to (`proto` 0).
    pub backend: AddrPort,
    /// Padding (zero).
    pub pad: u32,
}

/// The frontend a socket's backend stands for (`proto` 0).
pub type RevNatValue = AddrPort;

/// The data of a source ranges map key: a frontend and a source address. The map's
/// prefix length covers the whole frontend ([`SOURCE_RANGE_FRONTEND_BITS`]) plus the
/// source prefix's length, so a lookup with the full length finds an allowed prefix of
/// that frontend holding the source, if there is one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    /// The frontend (as in the services map).
    pub frontend: ServiceKey,
    /// The source prefix's address (host bits zero; network byte order, an IPv4 address
    /// in the first word).
    pub source: [u32; 4],
}

/// Bits of a [`SourceRange`] key taken by the frontend.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 160;
/// Bits of a whole [`SourceRange`] key (a lookup's prefix length).
pub const SOURCE_RANGE_BITS: u32 = 288;

/// An address of either family, the family first (so an LPM prefix of
/// [`IP_KEY_FAMILY_BITS`] + n bits is the family and the address's first n bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`], as a word.
    pub family: u32,
    /// The address (network byte order, an IPv4 address in the first word).
    pub addr: [u32; 4],
}

/// `CtKey::dir` of a client's packet to a frontend (the entry holds the backend).
pub const CT_FORWARD: u8 = 0;
/// `CtKey::dir` of a backend's reply to a client (the entry holds the frontend).
pub const CT_REPLY: u8 = 1;

/// An IPv4 or IPv6 flow as the tc path sees it on the wire (addresses and ports in
/// network byte order; an IPv4 address uses the first word).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    /// Source address.
    pub saddr: [u32; 4],
    /// Destination address.
    pub daddr: [u32; 4],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub dir: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Padding (zero).
    pub pad: u8,
}

/// A tracked flow's translation: for [`CT_FORWARD`] the backend (new destination), for
/// [`CT_REPLY`] the frontend (new source).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtValue {
    /// The address.
    pub addr: [u32; 4],
    /// With [`CT_SNAT`]: for [`CT_FORWARD`] the new source address (the node's); for
    /// [`CT_REPLY`] the client's address (the reply's new destination).
    pub snat: [u32; 4],
    /// The port.
    pub port: u16,
    /// [`CT_SNAT`], [`CT_CLOSED`] or 0.
    pub flags: u16,
    /// Padding (zero).
    pub pad: u32,
    /// [`CT_FORWARD`]: `bpf_ktime_get_ns` of the flow's last packet from the client. An
    /// entry idle longer than its timeout ([`CT_TCP_TIMEOUT_S`], [`CT_TCP_CLOSED_TIMEOUT_S`],
    /// [`CT_UDP_TIMEOUT_S`]) is not used: the next packet picks a backend anew.
    pub last_seen: u64,
}

/// [`CtValue::flags`]: the flow is masqueraded (a remote backend). Its reply arrives
/// addressed to the node and is matched on ingress.
pub const CT_SNAT: u16 = 1;
/// [`CtValue::flags`] of a [`CT_FORWARD`] entry: a TCP FIN or RST was seen in either
/// direction. A new SYN on the same 5-tuple then picks a backend anew.
pub const CT_CLOSED: u16 = 2;
/// Idle timeout of an open TCP flow's entry, in seconds.
pub const CT_TCP_TIMEOUT_S: u64 = 6 * 3600;
/// Idle timeout of a TCP flow's entry after a FIN or RST, in seconds.
pub const CT_TCP_CLOSED_TIMEOUT_S: u64 = 10;
/// Idle timeout of a UDP flow's entry, in seconds.
pub const CT_UDP_TIMEOUT_S: u64 = 120;

/// `AffinityKey::kind` when `client` is an IP address (the tc path).
pub const CLIENT_IP: u32 = 0;
/// `AffinityKey::kind` when `client` holds a network namespace cookie in its first two
/// words (the socket hooks: a pod's sockets share its namespace and address).
pub const CLIENT_NETNS: u32 = 1;

/// A client of a frontend with ClientIP affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    /// The client (see `kind`).
    pub client: [u32; 4],
    /// [`CLIENT_IP`] or [`CLIENT_NETNS`].
    pub kind: u32,
    /// The frontend.
    pub service: ServiceKey,
}

/// The backend a client sticks to, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityValue {
    /// The backend.
    pub backend: Backend,
    /// Its slot (the entry is stale once the slot holds another backend).
    pub slot: u32,
    /// `bpf_ktime_get_ns` of the last use.
    pub last_seen: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is #[repr(C)], made only of integers, with explicit padding
    // fields, so every bit pattern is valid and no byte is uninitialised.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::AddrPort {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::BackendKey {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::RevNatKey {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::SourceRange {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::IpKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<AddrPort>(), 20);
        assert_eq!(core::mem::size_of::<ServiceValue>(), 28);
        assert_eq!(core::mem::size_of::<CtKey>(), 40);
        assert_eq!(core::mem::size_of::<CtValue>(), 48);
        assert_eq!(core::mem::size_of::<AffinityKey>(), 40);
        assert_eq!(core::mem::size_of::<AffinityValue>(), 32);
        assert_eq!(core::mem::size_of::<BackendKey>(), 24);
        assert_eq!(core::mem::size_of::<RevNatKey>(), 32);
        assert_eq!(
            core::mem::size_of::<SourceRange>() as u32 * 8,
            SOURCE_RANGE_BITS
        );
        assert_eq!(
            core::mem::size_of::<AddrPort>() as u32 * 8,
            SOURCE_RANGE_FRONTEND_BITS
        );
    }
}
