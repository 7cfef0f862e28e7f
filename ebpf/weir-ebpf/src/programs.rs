//! The programs and maps (built only for the BPF target).
//!
//! Return values follow the cgroup sock_addr convention: 1 lets the call proceed (with the
//! address as the program left it), 0 rejects it with the error set by `bpf_set_retval`
//! (EPERM when none is set). recvmsg and getpeername programs must return 1.

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval};
use aya_ebpf::macros::{cgroup_sock_addr, map};
use aya_ebpf::maps::{HashMap, LruHashMap};
use aya_ebpf::programs::SockAddrContext;
use weir_ebpf_common::{
    AddrPort, Backend, BackendKey, RevNatKey, RevNatValue, ServiceKey, ServiceValue, BACKENDS_MAX,
    FAMILY_V4, FAMILY_V6, FLAG_DROP, PROTO_TCP, PROTO_UDP, REVNAT_MAX, SERVICES_MAX,
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
    let mut key = read_addr(ctx, family);
    key.proto = proto;
    // SAFETY: the value is copied out at once; userspace replaces values whole.
    let (count, flags) = match unsafe { WEIR_SERVICES.get(&key) } {
        Some(v) => (v.count, v.flags),
        None => return ALLOW,
    };
    if count == 0 {
        if flags & FLAG_DROP == 0 {
            // SAFETY: bpf_set_retval is allowed in cgroup hooks; the call fails with it.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return REJECT;
    }
    // SAFETY: a helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % count;
    let bkey = BackendKey { service: key, slot };
    // SAFETY: as above.
    let backend = match unsafe { WEIR_BACKENDS.get(&bkey) } {
        Some(b) => *b,
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
    let front = AddrPort { proto: 0, ..key };
    // A full map only costs the reverse translation of old sockets (LRU).
    let _ = WEIR_REVNAT.insert(&rkey, &front, 0);
    write_addr(ctx, family, &backend);
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
    if let Some(front) = unsafe { WEIR_REVNAT.get(&rkey) } {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
