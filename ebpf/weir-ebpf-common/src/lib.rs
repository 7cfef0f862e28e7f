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

/// What a frontend leads to: `count` backends in slots `0..count` of the backends map,
/// keyed by this frontend. `count == 0` means the Service has no endpoints (refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceValue {
    /// Number of backend slots.
    pub count: u32,
    /// [`FLAG_DROP`] or 0.
    pub flags: u32,
}

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<AddrPort>(), 20);
        assert_eq!(core::mem::size_of::<ServiceValue>(), 8);
        assert_eq!(core::mem::size_of::<BackendKey>(), 24);
        assert_eq!(core::mem::size_of::<RevNatKey>(), 32);
    }
}
