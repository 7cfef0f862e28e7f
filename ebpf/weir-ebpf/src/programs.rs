//! The programs and maps (built only for the BPF target).
//!
//! Return values follow the cgroup sock_addr convention: 1 lets the call proceed (with the
//! address as the program left it), 0 rejects it with the error set by `bpf_set_retval`
//! (EPERM when none is set). recvmsg and getpeername programs must return 1.

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::helpers::generated::{
    bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
    bpf_set_retval,
};
use aya_ebpf::macros::{cgroup_skb, cgroup_sock_addr, map};
use aya_ebpf::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya_ebpf::maps::{HashMap, LruHashMap};
use aya_ebpf::programs::{SkBuffContext, SockAddrContext};
use weir_ebpf_common::{
    AddrPort, AffinityKey, AffinityValue, Backend, BackendKey, CtKey, CtValue, IpKey, RevNatKey,
    RevNatValue, ServiceKey, ServiceValue, SourceRange, AFFINITY_MAX, BACKENDS_MAX, CLIENT_NETNS,
    CLUSTER_IPS_MAX, CT_MAX, FAMILY_V4, FAMILY_V6, FLAG_DROP, FLAG_EXTERNAL_LOCAL, FLAG_MAGLEV,
    FLAG_SOURCE_RANGES, IP_KEY_FAMILY_BITS, MAGLEV_MAX, MAGLEV_TABLE_SIZE, PROTO_TCP, PROTO_UDP,
    REVNAT_MAX, SERVICES_MAX, SERVICE_CIDRS_MAX, SOCKET_VIEW, SOURCE_RANGES_MAX, SOURCE_RANGE_BITS,
};

/// Frontends.
#[map(name = "WEIR_SERVICES")]
static WEIR_SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICES_MAX, 0);

/// Backend slots.
#[map(name = "WEIR_BACKENDS")]
static WEIR_BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(BACKENDS_MAX, 0);

/// Reverse translation per socket.
#[map(name = "WEIR_REVNAT")]
static WEIR_REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(REVNAT_MAX, 0);

/// Maglev lookup tables: (frontend, index) -> slot.
#[map(name = "WEIR_MAGLEV")]
static WEIR_MAGLEV: HashMap<BackendKey, u32> = HashMap::pinned(MAGLEV_MAX, BPF_F_NO_PREALLOC);

/// The tc path's connection tracking (both directions of each translated flow).
#[map(name = "WEIR_CT")]
pub(crate) static WEIR_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CT_MAX, 0);

/// ClientIP session affinity: (client, frontend) -> backend and last use.
#[map(name = "WEIR_AFFINITY")]
static WEIR_AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(AFFINITY_MAX, 0);

/// Allowed source prefixes of frontends with `loadBalancerSourceRanges`.
#[map(name = "WEIR_SOURCE_RANGES")]
static WEIR_SOURCE_RANGES: LpmTrie<SourceRange, u32> = LpmTrie::pinned(SOURCE_RANGES_MAX, 0);

/// `--service-cluster-ip-range`.
#[map(name = "WEIR_SERVICE_CIDRS")]
static WEIR_SERVICE_CIDRS: LpmTrie<IpKey, u32> = LpmTrie::pinned(SERVICE_CIDRS_MAX, 0);

/// Every Service's ClusterIPs.
#[map(name = "WEIR_CLUSTER_IPS")]
static WEIR_CLUSTER_IPS: HashMap<IpKey, u32> = HashMap::pinned(CLUSTER_IPS_MAX, 0);

/// Whether `source` may open a flow to frontend `key` (whose value is `v`): always, unless
/// the frontend has [`FLAG_SOURCE_RANGES`] and no allowed prefix of it holds `source`. A
/// function of its own (a BPF-to-BPF call) to keep the callers' stacks small.
#[inline(never)]
pub(crate) fn source_allowed(key: &ServiceKey, v: &ServiceValue, source: &[u32; 4]) -> bool {
    if v.flags & FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    let k = LpmKey::new(
        SOURCE_RANGE_BITS,
        SourceRange {
            frontend: *key,
            source: *source,
        },
    );
    WEIR_SOURCE_RANGES.get(&k).is_some()
}

/// Looks a frontend up.
#[inline(always)]
pub(crate) fn service(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: the value is copied out at once; userspace replaces values whole.
    unsafe { WEIR_SERVICES.get(key) }.copied()
}

/// Picks a backend of frontend `key` (whose value is `v`, with `count > 0`): the client's
/// affinity entry while it is fresh and its slot still holds that backend; else the
/// Maglev table entry for `hash` (Maglev frontends) or a random slot. Records the choice
/// for the client when the frontend has affinity. A function of its own (a BPF-to-BPF
/// call) to keep the callers' stacks small.
#[inline(never)]
pub(crate) fn pick(
    key: &ServiceKey,
    v: &ServiceValue,
    hash: u32,
    client: &AffinityKey,
) -> Option<Backend> {
    if v.count == 0 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if v.affinity_timeout != 0 {
        // SAFETY: copied out at once.
        if let Some(a) = unsafe { WEIR_AFFINITY.get(client) }.copied() {
            let timeout = v.affinity_timeout as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_seen) < timeout {
                let bkey = BackendKey {
                    service: *key,
                    slot: a.slot,
                };
                // SAFETY: copied out at once.
                if let Some(b) = unsafe { WEIR_BACKENDS.get(bkey) }.copied() {
                    if b == a.backend {
                        let fresh = AffinityValue {
                            last_seen: now,
                            ..a
                        };
                        let _ = WEIR_AFFINITY.insert(client, fresh, 0);
                        return Some(b);
                    }
                }
            }
        }
    }
    let mut slot = if v.flags & FLAG_MAGLEV != 0 {
        let mkey = BackendKey {
            service: *key,
            slot: hash % MAGLEV_TABLE_SIZE,
        };
        // SAFETY: copied out at once.
        unsafe { WEIR_MAGLEV.get(mkey) }.copied().unwrap_or(hash)
    } else {
        // SAFETY: a helper without arguments.
        unsafe { bpf_get_prandom_u32() }
    };
    if slot >= v.count {
        // `count` is not 0 (checked above): no division by zero.
        slot = slot.checked_rem(v.count).unwrap_or(0);
    }
    let bkey = BackendKey {
        service: *key,
        slot,
    };
    // SAFETY: copied out at once.
    let backend = unsafe { WEIR_BACKENDS.get(bkey) }.copied()?;
    if v.affinity_timeout != 0 {
        let a = AffinityValue {
            backend,
            slot,
            last_seen: now,
        };
        let _ = WEIR_AFFINITY.insert(client, a, 0);
    }
    Some(backend)
}

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const SOCK_DGRAM: u32 = 2;

/// Which of the address fields a hook reads and writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// The destination (connect, sendmsg) or source (recvmsg) of the call, with no protocol.
#[inline(always)]
fn read_addr(ctx: &SockAddrContext, family: Family) -> AddrPort {
    let p = sa(ctx);
    // SAFETY: `p` is the context the kernel passed; these fields are readable in every
    // sock_addr hook of this family, with 4-byte loads.
    unsafe {
        let port = core::ptr::read_volatile(&(*p).user_port) as u16;
        match family {
            Family::V4 => AddrPort {
                addr: [core::ptr::read_volatile(&(*p).user_ip4), 0, 0, 0],
                port,
                family: FAMILY_V4,
                proto: 0,
            },
            Family::V6 => AddrPort {
                addr: [
                    core::ptr::read_volatile(&(*p).user_ip6[0]),
                    core::ptr::read_volatile(&(*p).user_ip6[1]),
                    core::ptr::read_volatile(&(*p).user_ip6[2]),
                    core::ptr::read_volatile(&(*p).user_ip6[3]),
                ],
                port,
                family: FAMILY_V6,
                proto: 0,
            },
        }
    }
}

#[inline(always)]
fn write_addr(ctx: &SockAddrContext, family: Family, a: &AddrPort) {
    let p = sa(ctx);
    // SAFETY: as in `read_addr`; these fields are writable in connect, sendmsg, recvmsg
    // and getpeername hooks, with 4-byte stores.
    unsafe {
        match family {
            Family::V4 => core::ptr::write_volatile(&mut (*p).user_ip4, a.addr[0]),
            Family::V6 => {
                core::ptr::write_volatile(&mut (*p).user_ip6[0], a.addr[0]);
                core::ptr::write_volatile(&mut (*p).user_ip6[1], a.addr[1]);
                core::ptr::write_volatile(&mut (*p).user_ip6[2], a.addr[2]);
                core::ptr::write_volatile(&mut (*p).user_ip6[3], a.addr[3]);
            }
        }
        core::ptr::write_volatile(&mut (*p).user_port, a.port as u32);
    }
}

/// The socket's protocol (TCP or UDP), 0 for anything else.
#[inline(always)]
fn proto(ctx: &SockAddrContext) -> u8 {
    // SAFETY: `protocol` is readable in every sock_addr hook.
    let p = unsafe { core::ptr::read_volatile(&(*sa(ctx)).protocol) };
    match p {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => 0,
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie is allowed in sock_addr hooks and takes the context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Translates a frontend destination to a backend: connect (TCP and UDP) and sendmsg (UDP).
#[inline(always)]
fn translate(ctx: &SockAddrContext, family: Family, sendmsg: bool) -> i32 {
    let proto = proto(ctx);
    if proto == 0 {
        return ALLOW;
    }
    if sendmsg {
        // SAFETY: `type` is readable in every sock_addr hook.
        let ty = unsafe { core::ptr::read_volatile(&(*sa(ctx)).type_) };
        if ty != SOCK_DGRAM {
            return ALLOW;
        }
    }
    let front = read_addr(ctx, family);
    let mut key = AddrPort { proto, ..front };
    let mut v = match service(&key) {
        Some(v) => v,
        None => return not_a_frontend(&front),
    };
    // An externalTrafficPolicy: Local frontend: the node's processes and pods use every
    // endpoint, listed under the frontend's socket view.
    if v.flags & FLAG_EXTERNAL_LOCAL != 0 {
        key.proto |= SOCKET_VIEW;
        v = match service(&key) {
            Some(v) => v,
            None => return ALLOW,
        };
    }
    if v.count == 0 {
        if v.flags & FLAG_DROP == 0 {
            // SAFETY: bpf_set_retval is allowed in cgroup hooks; the call fails with it.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return REJECT;
    }
    // The socket's network namespace stands for its client address (not known before
    // the socket is bound); Maglev frontends hash nothing here and pick at random.
    // SAFETY: bpf_get_netns_cookie is allowed in sock_addr hooks and takes the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let client = AffinityKey {
        client: [netns as u32, (netns >> 32) as u32, 0, 0],
        kind: CLIENT_NETNS,
        service: key,
    };
    // SAFETY: a helper without arguments.
    let hash = unsafe { bpf_get_prandom_u32() };
    let backend = match pick(&key, &v, hash, &client) {
        Some(b) => b,
        None => return ALLOW,
    };
    let rkey = RevNatKey {
        cookie: cookie(ctx),
        backend: AddrPort {
            proto: 0,
            ..backend
        },
        pad: 0,
    };
    // A full map only costs the reverse translation of old sockets (LRU).
    let _ = WEIR_REVNAT.insert(rkey, front, 0);
    write_addr(ctx, family, &backend);
    ALLOW
}

/// A destination no frontend has: refused when it is a ClusterIP (a port its Service does
/// not have, which nftables mode rejects); anything else goes on (an address in the
/// service CIDRs that no Service has is dropped at egress).
#[inline(always)]
fn not_a_frontend(front: &AddrPort) -> i32 {
    let k = IpKey {
        family: front.family as u32,
        addr: front.addr,
    };
    // SAFETY: only tested for presence.
    if unsafe { WEIR_CLUSTER_IPS.get(k) }.is_some() {
        // SAFETY: bpf_set_retval is allowed in cgroup hooks; the call fails with it.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    ALLOW
}

/// Reports the frontend instead of the backend a socket was translated to.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let backend = read_addr(ctx, family);
    let rkey = RevNatKey {
        cookie: cookie(ctx),
        backend,
        pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(front) = unsafe { WEIR_REVNAT.get(rkey) } {
        let front = *front;
        write_addr(ctx, family, &front);
    }
    ALLOW
}

/// connect() on IPv4 sockets (TCP and UDP).
#[cgroup_sock_addr(connect4)]
pub fn weir_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V4, false)
}

/// connect() on IPv6 sockets.
#[cgroup_sock_addr(connect6)]
pub fn weir_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, false)
}

/// sendmsg()/sendto() with an address on unconnected IPv4 UDP sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn weir_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V4, true)
}

/// sendmsg()/sendto() on unconnected IPv6 UDP sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn weir_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, true)
}

/// recvmsg()/recvfrom() on IPv4 UDP sockets: the reply's source becomes the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn weir_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4)
}

/// recvmsg()/recvfrom() on IPv6 UDP sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn weir_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6)
}

/// getpeername() on IPv4 sockets: reports the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn weir_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4)
}

/// getpeername() on IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn weir_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6)
}

const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;
/// Drop, reported to the sender as congestion: a UDP send still succeeds and a TCP SYN is
/// retransmitted, so the client sees what a dropped packet looks like (a timeout), not
/// the EPERM of [`SKB_DROP`].
const SKB_DROP_CN: i32 = 2;

/// Egress of sockets in the cgroup: a new flow to an address of the service CIDRs is
/// dropped (the hooks translated every frontend, so no Service has that address: nftables
/// mode drops it too, and the client times out); a packet the socket hooks sent to a
/// backend of a frontend with source ranges (found through the socket's reverse
/// translation) is dropped when its source, now known, is outside the ranges: the connect
/// hooks run before the kernel picks the source address. TCP is checked on its SYN (later
/// packets of a refused connection never exist), UDP on every datagram.
#[cgroup_skb(egress)]
pub fn weir_egress_source_ranges(ctx: SkBuffContext) -> i32 {
    egress_verdict(&ctx).unwrap_or(SKB_PASS)
}

/// The verdict on a packet; `None` when it is not one to check.
#[inline(always)]
fn egress_verdict(ctx: &SkBuffContext) -> Option<i32> {
    let ver: u8 = ctx.load(0).ok()?;
    let (saddr, daddr, proto, l4, family) = match ver >> 4 {
        4 => {
            let ihl = ((ver & 0x0f) as usize) * 4;
            let proto: u8 = ctx.load(9).ok()?;
            let s: u32 = ctx.load(12).ok()?;
            let d: u32 = ctx.load(16).ok()?;
            ([s, 0, 0, 0], [d, 0, 0, 0], proto, ihl, FAMILY_V4)
        }
        6 => {
            let proto: u8 = ctx.load(6).ok()?;
            let s: [u32; 4] = ctx.load(8).ok()?;
            let d: [u32; 4] = ctx.load(24).ok()?;
            (s, d, proto, 40, FAMILY_V6)
        }
        _ => return None,
    };
    if proto == PROTO_TCP {
        // SYN without ACK: a new connection.
        let flags: u8 = ctx.load(l4 + 13).ok()?;
        if flags & 0x12 != 0x02 {
            return None;
        }
    } else if proto != PROTO_UDP {
        return None;
    }
    let unallocated = LpmKey::new(
        IP_KEY_FAMILY_BITS + if family == FAMILY_V4 { 32 } else { 128 },
        IpKey {
            family: family as u32,
            addr: daddr,
        },
    );
    if WEIR_SERVICE_CIDRS.get(&unallocated).is_some() {
        return Some(SKB_DROP_CN);
    }
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let rkey = RevNatKey {
        // SAFETY: bpf_get_socket_cookie is allowed in cgroup_skb programs and takes the
        // skb.
        cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        backend: AddrPort {
            addr: daddr,
            port: dport,
            family,
            proto: 0,
        },
        pad: 0,
    };
    // SAFETY: copied out at once.
    let front = unsafe { WEIR_REVNAT.get(rkey) }.copied()?;
    let key = AddrPort { proto, ..front };
    let v = service(&key)?;
    Some(if source_allowed(&key, &v, &saddr) {
        SKB_PASS
    } else {
        SKB_DROP
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
