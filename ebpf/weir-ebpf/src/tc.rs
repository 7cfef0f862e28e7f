//! tc programs on the node's external interfaces (IPv4 and IPv6, TCP and UDP).
//!
//! Ingress: a packet to a frontend (NodePort on a node address, external IP, load-balancer
//! IP, or a ClusterIP routed to the node) has its destination rewritten to a backend; the
//! choice is kept in the connection-tracking map under the packet's 5-tuple (so every
//! packet of the flow goes to the same backend) together with the reply's 5-tuple. The
//! kernel then routes the packet to the backend. The client's source is kept.
//!
//! Egress: a backend's reply (found in the connection-tracking map) has its source
//! rewritten back to the frontend before it leaves.
//!
//! A remote backend (another node's endpoint, external traffic policy Cluster) is
//! masqueraded: the source becomes the node's address (the client's port is kept), so the
//! reply comes back to this node, where the ingress program (on the interface it arrives
//! on) restores the client as destination and the frontend as source and the kernel
//! forwards it to the client. Two clients using the same source port towards the same
//! remote backend share one reply entry (the later one wins).
//!
//! Connection tracking keeps a little TCP state: a FIN or RST in either direction marks
//! the flow closed, and a new SYN on its 5-tuple is a new flow (a backend is picked anew);
//! an entry idle past its timeout is not used. An ICMP error a local backend sends about
//! a translated IPv4 flow leaves with the frontend as its source and quoted destination.
//!
//! A frontend without endpoints is answered as a closed port (TCP RST, ICMP or ICMPv6 port
//! unreachable), as nftables mode's reject does: on a node address (NodePort) by the
//! node's stack (the packet is passed on), elsewhere (external, load-balancer and cluster
//! IPs) by the program itself, which turns the packet into the answer and sends it back
//! out. With endpoints elsewhere but none usable here (`externalTrafficPolicy: Local`) the
//! packet is dropped. A load-balancer IP with source ranges drops new flows from other
//! sources.

use crate::programs::{pick, service, source_allowed, WEIR_CT};
use aya_ebpf::bindings::{
    __sk_buff, bpf_adj_room_mode::BPF_ADJ_ROOM_NET, BPF_CSUM_LEVEL_RESET, BPF_F_MARK_MANGLED_0,
    BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
};
use aya_ebpf::helpers::generated::{
    bpf_csum_diff, bpf_csum_level, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail,
};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use weir_ebpf_common::{
    AddrPort, AffinityKey, Backend, CtKey, CtValue, ServiceValue, CLIENT_IP, CT_FORWARD, CT_REPLY,
    FAMILY_V4, FAMILY_V6, FLAG_DROP, FLAG_NODE_LOCAL,
};
use weir_ebpf_common::{
    BACKEND_REMOTE, CT_CLOSED, CT_SNAT, CT_TCP_CLOSED_TIMEOUT_S, CT_TCP_TIMEOUT_S, CT_UDP_TIMEOUT_S,
};

const ETH_HLEN: usize = 14;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
const IP6_HLEN: usize = 40;
const IP6_SADDR: usize = ETH_HLEN + 8;
const IP6_DADDR: usize = ETH_HLEN + 24;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// `bpf_l4_csum_replace` flag (kernel 6.16+): the pseudo-header is IPv6's, so a
/// CHECKSUM_COMPLETE packet's `skb->csum` is left alone. Older kernels refuse it (EINVAL)
/// and are called again without it.
const BPF_F_IPV6: u64 = 1 << 7;

/// An IPv4 or IPv6 TCP or UDP packet's 5-tuple and where its transport header starts.
#[derive(Default)]
struct Packet {
    key: CtKey,
    l4: usize,
    /// A TCP packet's flags (0 for UDP).
    tcp_flags: u8,
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

impl Packet {
    #[inline(always)]
    fn v6(&self) -> bool {
        self.key.family == FAMILY_V6
    }

    /// Offset of the source address.
    #[inline(always)]
    fn saddr_off(&self) -> usize {
        if self.v6() {
            IP6_SADDR
        } else {
            IP_SADDR
        }
    }

    /// Offset of the destination address.
    #[inline(always)]
    fn daddr_off(&self) -> usize {
        if self.v6() {
            IP6_DADDR
        } else {
            IP_DADDR
        }
    }
}

/// Reads the packet's 5-tuple into `out`; false for anything else (other protocols, IPv4
/// non-first fragments, IPv6 packets with extension headers). A function of its own (a
/// BPF-to-BPF call) to keep the programs' stacks small.
#[inline(never)]
fn parse(skb: *mut __sk_buff, out: &mut Packet) -> bool {
    match parse_packet(&TcContext::new(skb)) {
        Some(p) => {
            *out = p;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn parse_packet(ctx: &TcContext) -> Option<Packet> {
    let ethertype: u16 = ctx.load(12).ok()?;
    let ethertype = u16::from_be(ethertype);
    let (saddr, daddr, proto, l4, family) = if ethertype == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        if vihl >> 4 != 4 {
            return None;
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        let frag: u16 = ctx.load(ETH_HLEN + 6).ok()?;
        if u16::from_be(frag) & 0x1fff != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        let s: u32 = ctx.load(IP_SADDR).ok()?;
        let d: u32 = ctx.load(IP_DADDR).ok()?;
        ([s, 0, 0, 0], [d, 0, 0, 0], proto, ETH_HLEN + ihl, FAMILY_V4)
    } else if ethertype == ETH_P_IPV6 {
        let vtc: u8 = ctx.load(ETH_HLEN).ok()?;
        if vtc >> 4 != 6 {
            return None;
        }
        // The next header right after the fixed header: extension headers (hop-by-hop,
        // routing, fragment, ...) are not followed; such packets pass untouched.
        let proto: u8 = ctx.load(ETH_HLEN + 6).ok()?;
        let s: [u32; 4] = ctx.load(IP6_SADDR).ok()?;
        let d: [u32; 4] = ctx.load(IP6_DADDR).ok()?;
        (s, d, proto, ETH_HLEN + IP6_HLEN, FAMILY_V6)
    } else {
        return None;
    };
    if proto != TCP && proto != UDP {
        return None;
    }
    let tcp_flags = if proto == TCP {
        ctx.load(l4 + 13).ok()?
    } else {
        0
    };
    Some(Packet {
        key: CtKey {
            saddr,
            daddr,
            sport: ctx.load(l4).ok()?,
            dport: ctx.load(l4 + 2).ok()?,
            proto,
            dir: CT_FORWARD,
            family,
            pad: 0,
        },
        l4,
        tcp_flags,
    })
}

#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// A hash of the 5-tuple (the same for every packet of a flow).
#[inline(always)]
fn hash(k: &CtKey) -> u32 {
    let mut h = 0x9e37_79b9;
    for w in k.saddr {
        h = mix(h ^ w);
    }
    for w in k.daddr {
        h = mix(h ^ w);
    }
    h = mix(h ^ ((k.sport as u32) << 16 | k.dport as u32));
    mix(h ^ k.proto as u32)
}

/// Which end of the packet [`rewrite`] changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// Rewrites the packet's source or destination address and port (network byte order; the
/// old values are the packet's, in `p.key`), fixing the IPv4 header checksum and the
/// TCP/UDP checksum (pseudo-header included; an IPv4 UDP checksum of 0 stays 0). IPv6 has
/// no header checksum; its 16-byte address change enters the L4 checksum as one
/// difference. A function of its own (a BPF-to-BPF call) to keep the callers' stacks
/// small; 0 or a negative error.
#[inline(never)]
fn rewrite(skb: *mut __sk_buff, p: &Packet, end: End, new_addr: &[u32; 4], new_port: u16) -> i64 {
    let ctx = TcContext::new(skb);
    let (addr_off, old_addr, port_off, old_port) = match end {
        End::Source => (p.saddr_off(), &p.key.saddr, p.l4, p.key.sport),
        End::Destination => (p.daddr_off(), &p.key.daddr, p.l4 + 2, p.key.dport),
    };
    match rewrite_fields(
        &ctx, p, addr_off, old_addr, new_addr, port_off, old_port, new_port,
    ) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite_fields(
    ctx: &TcContext,
    p: &Packet,
    addr_off: usize,
    old_addr: &[u32; 4],
    new_addr: &[u32; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let (csum, mangled) = if p.key.proto == TCP {
        (p.l4 + 16, 0)
    } else {
        (p.l4 + 6, BPF_F_MARK_MANGLED_0 as u64)
    };
    if old_addr != new_addr {
        if p.v6() {
            let mut from = *old_addr;
            let mut to = *new_addr;
            // SAFETY: both pointers are to 16 bytes on this stack frame.
            let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
            if diff < 0 {
                return Err(diff);
            }
            let flags = BPF_F_PSEUDO_HDR as u64 | mangled;
            if ctx
                .l4_csum_replace(csum, 0, diff as u64, flags | BPF_F_IPV6)
                .is_err()
            {
                ctx.l4_csum_replace(csum, 0, diff as u64, flags)?;
            }
            ctx.store(addr_off, new_addr, 0)?;
        } else {
            let (old, new) = (old_addr[0], new_addr[0]);
            ctx.l4_csum_replace(
                csum,
                old as u64,
                new as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )?;
            ctx.l3_csum_replace(IP_CSUM, old as u64, new as u64, 4)?;
            ctx.store(addr_off, &new, 0)?;
        }
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// The backend for a client's packet: the tracked flow's, or a new choice (tracked in
/// both directions). `Err(action)` ends processing with that action. A function of its
/// own (a BPF-to-BPF call) to keep the ingress program's stack small.
#[inline(never)]
fn backend(p: &Packet) -> Result<CtValue, i32> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ct) = WEIR_CT.get_ptr_mut(p.key) {
        // SAFETY: the map's value for this key; the fields are written in place (another
        // CPU may do the same; a lost update only costs a refresh).
        let ct = unsafe { &mut *ct };
        let new_syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if fresh(p, ct, now) && !(new_syn && ct.flags & CT_CLOSED != 0) {
            if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                ct.flags |= CT_CLOSED;
            }
            ct.last_seen = now;
            return Ok(*ct);
        }
        // Idle past its timeout, or a closed flow's 5-tuple reused: a new flow.
    }
    let k = &p.key;
    let front = AddrPort {
        addr: k.daddr,
        port: k.dport,
        family: k.family,
        proto: k.proto,
    };
    let v = service(&front).ok_or(TC_ACT_OK)?;
    if !source_allowed(&front, &v, &k.saddr) {
        return Err(TC_ACT_SHOT);
    }
    if v.count == 0 {
        if v.flags & FLAG_DROP != 0 {
            return Err(TC_ACT_SHOT);
        }
        if v.flags & FLAG_NODE_LOCAL != 0 {
            return Err(TC_ACT_OK);
        }
        return Err(REJECT);
    }
    let client = AffinityKey {
        client: k.saddr,
        kind: CLIENT_IP,
        service: front,
    };
    let b = pick(&front, &v, hash(k), &client).ok_or(TC_ACT_SHOT)?;
    Ok(track(p, &v, &b, now))
}

/// Whether a flow's forward entry is still within its idle timeout.
#[inline(always)]
fn fresh(p: &Packet, ct: &CtValue, now: u64) -> bool {
    let timeout_s = if p.key.proto != TCP {
        CT_UDP_TIMEOUT_S
    } else if ct.flags & CT_CLOSED != 0 {
        CT_TCP_CLOSED_TIMEOUT_S
    } else {
        CT_TCP_TIMEOUT_S
    };
    now.wrapping_sub(ct.last_seen) < timeout_s * 1_000_000_000
}

/// A backend's FIN or RST (packet `p`, whose reply entry is `front`) closes the flow: its
/// forward entry (the client's 5-tuple, rebuilt from the reply) is marked [`CT_CLOSED`].
/// A function of its own (a BPF-to-BPF call) to keep the callers' stacks small.
#[inline(never)]
fn close_from_reply(p: &Packet, front: &CtValue) {
    if p.tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    let k = &p.key;
    let forward = CtKey {
        saddr: if front.flags & CT_SNAT != 0 {
            front.snat
        } else {
            k.daddr
        },
        daddr: front.addr,
        sport: k.dport,
        dport: front.port,
        proto: k.proto,
        dir: CT_FORWARD,
        family: k.family,
        pad: 0,
    };
    if let Some(ct) = WEIR_CT.get_ptr_mut(forward) {
        // SAFETY: the map's value for this key, one field written in place.
        unsafe { (*ct).flags |= CT_CLOSED };
    }
}

/// Records a new flow of `p` to backend `b` of a frontend whose value is `v` in both
/// directions and returns its forward translation. A function of its own (a BPF-to-BPF
/// call, after `pick` returned) to keep the deepest call chain's stack small.
#[inline(never)]
fn track(p: &Packet, v: &ServiceValue, b: &Backend, now: u64) -> CtValue {
    let k = &p.key;
    let snat = b.proto == BACKEND_REMOTE && v.snat != [0; 4];
    let ct = CtValue {
        addr: b.addr,
        port: b.port,
        flags: if snat { CT_SNAT } else { 0 },
        snat: if snat { v.snat } else { [0; 4] },
        pad: 0,
        last_seen: now,
    };
    // A masqueraded flow's reply comes to the node's address, else to the client.
    let reply = CtKey {
        saddr: b.addr,
        daddr: if snat { v.snat } else { k.saddr },
        sport: b.port,
        dport: k.sport,
        proto: k.proto,
        dir: CT_REPLY,
        family: k.family,
        pad: 0,
    };
    let front = CtValue {
        addr: k.daddr,
        port: k.dport,
        flags: ct.flags,
        snat: if snat { k.saddr } else { [0; 4] },
        pad: 0,
        last_seen: now,
    };
    // A full map evicts the least recently used flows.
    let _ = WEIR_CT.insert(reply, front, 0);
    let _ = WEIR_CT.insert(k, ct, 0);
    ct
}

/// `backend`'s answer for a frontend without endpoints that is not the node's own address:
/// the ingress program answers the client itself ([`reject`]).
const REJECT: i32 = -1;

/// The one's complement sum `sum` folded to 16 bits and inverted: a checksum field's value
/// (in memory order, like the words `bpf_csum_diff` summed).
#[inline(always)]
fn fold(sum: i64) -> u16 {
    let mut c = (sum as u64) & 0xffff_ffff;
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    !(c as u16)
}

/// The one's complement sum of `words` added to `seed`.
#[inline(always)]
fn csum(words: &mut [u32], seed: u32) -> Result<u32, i64> {
    // SAFETY: `words` is memory on this stack frame of `words.len() * 4` bytes; a null
    // `from` with size 0 is allowed.
    let r = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            words.as_mut_ptr(),
            (words.len() * 4) as u32,
            seed,
        )
    };
    if r < 0 {
        return Err(r);
    }
    Ok(r as u32)
}

/// The IPv4 header of an answer from `saddr` to `daddr` carrying `len` bytes of protocol
/// `proto`, with its checksum.
#[inline(always)]
fn ip4_header(saddr: u32, daddr: u32, proto: u8, len: u16) -> Result<[u32; 5], i64> {
    let mut h = [
        u32::from_ne_bytes([0x45, 0, 0, 0]) | u32::from(u16::to_be(20 + len)) << 16,
        u32::from_ne_bytes([0, 0, 0x40, 0]),
        u32::from_ne_bytes([64, proto, 0, 0]),
        saddr,
        daddr,
    ];
    let sum = fold(csum(&mut h, 0)? as i64);
    h[2] |= u32::from(sum) << 16;
    Ok(h)
}

/// The IPv6 header of an answer from `saddr` to `daddr` carrying `len` bytes of next
/// header `nh`.
#[inline(always)]
fn ip6_header(saddr: &[u32; 4], daddr: &[u32; 4], nh: u8, len: u16) -> [u32; 10] {
    let l = len.to_be_bytes();
    [
        u32::from_ne_bytes([0x60, 0, 0, 0]),
        u32::from_ne_bytes([l[0], l[1], nh, 64]),
        saddr[0],
        saddr[1],
        saddr[2],
        saddr[3],
        daddr[0],
        daddr[1],
        daddr[2],
        daddr[3],
    ]
}

/// The pseudo-header sum of a `len`-byte `proto` payload from `saddr` to `daddr`.
#[inline(always)]
fn pseudo_sum(
    k: &CtKey,
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    proto: u8,
    len: u16,
) -> Result<u32, i64> {
    if k.family == FAMILY_V6 {
        let mut p = [
            saddr[0],
            saddr[1],
            saddr[2],
            saddr[3],
            daddr[0],
            daddr[1],
            daddr[2],
            daddr[3],
            u32::from(len.to_be()) << 16,
            u32::from_ne_bytes([0, 0, 0, proto]),
        ];
        csum(&mut p, 0)
    } else {
        let l = len.to_be_bytes();
        let mut p = [
            saddr[0],
            daddr[0],
            u32::from_ne_bytes([0, proto, l[0], l[1]]),
        ];
        csum(&mut p, 0)
    }
}

/// Answers a packet to a frontend without endpoints the way a closed port is answered,
/// as nftables mode's reject does: a TCP RST (none for a RST), or for UDP an ICMP (ICMPv6)
/// port unreachable quoting the packet's IP header and 8 bytes. The packet itself is
/// turned into the answer (addresses and MACs swapped, trimmed or grown) and sent back out
/// the interface it came in on. IPv4 packets with options are dropped instead. A function
/// of its own (a BPF-to-BPF call), so its buffers do not add to the ingress program's stack.
#[inline(never)]
fn reject(skb: *mut __sk_buff, p: &Packet) -> i32 {
    let ctx = TcContext::new(skb);
    build_reject(&ctx, p).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn build_reject(ctx: &TcContext, p: &Packet) -> Result<i32, i64> {
    let k = &p.key;
    let l4 = p.l4;
    if !p.v6() && l4 != ETH_HLEN + 20 {
        return Ok(TC_ACT_SHOT);
    }
    let eth: [u16; 6] = ctx.load(0)?;
    let reply_len = if k.proto == TCP {
        let seq: u32 = ctx.load(l4 + 4)?;
        let ack: u32 = ctx.load(l4 + 8)?;
        let off_flags: [u8; 2] = ctx.load(l4 + 12)?;
        let flags = off_flags[1];
        if flags & TCP_RST != 0 {
            // Never answer a RST.
            return Ok(TC_ACT_SHOT);
        }
        let doff = ((off_flags[0] >> 4) as u32) * 4;
        let total: u16 = if p.v6() {
            let plen: u16 = ctx.load(ETH_HLEN + 4)?;
            u16::from_be(plen)
        } else {
            let tot: u16 = ctx.load(ETH_HLEN + 2)?;
            u16::from_be(tot).wrapping_sub(20)
        };
        let mut seg = (total as u32).wrapping_sub(doff);
        if flags & 0x02 != 0 {
            seg += 1;
        }
        if flags & 0x01 != 0 {
            seg += 1;
        }
        // RFC 9293 3.10.7.1: with an ACK the RST takes its number, else it acknowledges
        // the segment.
        let (rseq, rack, rflags) = if flags & 0x10 != 0 {
            (ack, 0u32, 0x04u8)
        } else {
            (0u32, u32::from_be(seq).wrapping_add(seg).to_be(), 0x14u8)
        };
        let mut tcp = [
            u32::from(k.dport) | u32::from(k.sport) << 16,
            rseq,
            rack,
            u32::from_ne_bytes([0x50, rflags, 0, 0]),
            0,
        ];
        let seed = pseudo_sum(k, &k.daddr, &k.saddr, TCP, 20)?;
        let sum = fold(csum(&mut tcp, seed)? as i64);
        tcp[4] = u32::from(sum);
        // SAFETY: the context's skb; the new length is within the packet.
        let r = unsafe { bpf_skb_change_tail(ctx.skb.skb, (l4 + 20) as u32, 0) };
        if r < 0 {
            return Err(r);
        }
        ctx.store(l4, &tcp, 0)?;
        20u16
    } else {
        // Room for the ICMP header and the quoted IP header, right after the IP header:
        // [IP][ICMP 8][quoted IP][the packet's UDP header, 8 bytes of it kept].
        let iph = if p.v6() { IP6_HLEN } else { 20 };
        let grow = 8 + iph;
        ctx.adjust_room(grow as i32, BPF_ADJ_ROOM_NET, 0)?;
        let quoted_udp = ETH_HLEN + iph + grow;
        let udp: [u32; 2] = ctx.load(quoted_udp)?;
        // SAFETY: the context's skb; the new length is within the packet.
        let r = unsafe { bpf_skb_change_tail(ctx.skb.skb, (quoted_udp + 8) as u32, 0) };
        if r < 0 {
            return Err(r);
        }
        let len = (8 + iph + 8) as u16;
        if p.v6() {
            let orig: [u32; 10] = ctx.load(ETH_HLEN)?;
            // ICMPv6 destination unreachable (1), port unreachable (4).
            let [o0, o1, o2, o3, o4, o5, o6, o7, o8, o9] = orig;
            let mut msg = [
                u32::from_ne_bytes([1, 4, 0, 0]),
                0,
                o0,
                o1,
                o2,
                o3,
                o4,
                o5,
                o6,
                o7,
                o8,
                o9,
                udp[0],
                udp[1],
            ];
            let seed = pseudo_sum(k, &k.daddr, &k.saddr, 58, len)?;
            msg[0] |= u32::from(fold(csum(&mut msg, seed)? as i64)) << 16;
            ctx.store(ETH_HLEN + IP6_HLEN, &msg, 0)?;
        } else {
            let orig: [u32; 5] = ctx.load(ETH_HLEN)?;
            // ICMP destination unreachable (3), port unreachable (3).
            let mut msg = [
                u32::from_ne_bytes([3, 3, 0, 0]),
                0,
                orig[0],
                orig[1],
                orig[2],
                orig[3],
                orig[4],
                udp[0],
                udp[1],
            ];
            msg[0] |= u32::from(fold(csum(&mut msg, 0)? as i64)) << 16;
            ctx.store(ETH_HLEN + 20, &msg, 0)?;
        }
        len
    };
    if p.v6() {
        let nh = if k.proto == TCP { TCP } else { 58 };
        let h = ip6_header(&k.daddr, &k.saddr, nh, reply_len);
        ctx.store(ETH_HLEN, &h, 0)?;
    } else {
        let proto = if k.proto == TCP { TCP } else { 1 };
        let h = ip4_header(k.daddr[0], k.saddr[0], proto, reply_len)?;
        ctx.store(ETH_HLEN, &h, 0)?;
    }
    let swapped = [eth[3], eth[4], eth[5], eth[0], eth[1], eth[2]];
    ctx.store(0, &swapped, 0)?;
    // SAFETY: the context's skb. Every checksum was computed whole: no offload state from
    // the original packet may apply to the answer.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_RESET as u64) };
    // SAFETY: the context's skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a helper taking plain integers; out of the interface the packet came in on.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Ingress on an external interface: frontend -> backend (and the source -> the node's
/// address for a remote backend); a masqueraded flow's reply -> from the frontend to the
/// client.
#[classifier]
pub fn weir_tc_ingress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let mut p = Packet::default();
    if !parse(skb, &mut p) {
        return TC_ACT_OK;
    }
    if let Some(action) = masqueraded_reply(skb, &p) {
        return action;
    }
    let to = match backend(&p) {
        Ok(to) => to,
        Err(REJECT) => return reject(skb, &p),
        Err(action) => return action,
    };
    let mut r = rewrite(skb, &p, End::Destination, &to.addr, to.port);
    if r == 0 && to.flags & CT_SNAT != 0 {
        r = rewrite(skb, &p, End::Source, &to.snat, p.key.sport);
    }
    if r == 0 {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// A masqueraded flow's reply (addressed to the node): from the frontend to the client.
/// `None` for any other packet. A function of its own (a BPF-to-BPF call) to keep the
/// ingress program's stack small.
#[inline(never)]
fn masqueraded_reply(skb: *mut __sk_buff, p: &Packet) -> Option<i32> {
    let reply = CtKey {
        dir: CT_REPLY,
        ..p.key
    };
    // SAFETY: copied out at once.
    let front = unsafe { WEIR_CT.get(reply) }.copied()?;
    if front.flags & CT_SNAT == 0 {
        return None;
    }
    close_from_reply(p, &front);
    let mut r = rewrite(skb, p, End::Destination, &front.snat, p.key.dport);
    if r == 0 {
        r = rewrite(skb, p, End::Source, &front.addr, front.port);
    }
    Some(if r == 0 { TC_ACT_OK } else { TC_ACT_SHOT })
}

/// Egress on an external interface: a backend's reply gets the frontend as its source.
#[classifier]
pub fn weir_tc_egress(ctx: TcContext) -> i32 {
    let mut p = Packet::default();
    if !parse(ctx.skb.skb, &mut p) {
        return icmp_error_to_client(ctx.skb.skb);
    }
    let reply = CtKey {
        dir: CT_REPLY,
        ..p.key
    };
    // SAFETY: copied out at once.
    let Some(front) = unsafe { WEIR_CT.get(reply) }.copied() else {
        return TC_ACT_OK;
    };
    if front.flags & CT_SNAT != 0 {
        return TC_ACT_OK;
    }
    close_from_reply(&p, &front);
    if rewrite(ctx.skb.skb, &p, End::Source, &front.addr, front.port) == 0 {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// Egress: an ICMP error (destination unreachable, e.g. port unreachable or fragmentation
/// needed; time exceeded) that a backend on this node sends about a translated flow (IPv4)
/// is made to come from the frontend, quoting the packet the client sent (to the
/// frontend), so the client's stack matches it to its socket. Anything else passes.
#[inline(never)]
fn icmp_error_to_client(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    match translate_icmp_error(&ctx) {
        Some(Err(_)) => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn translate_icmp_error(ctx: &TcContext) -> Option<Result<(), i64>> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if vihl != 0x45 || proto != 1 {
        return None;
    }
    let icmp = ETH_HLEN + 20;
    let ty: u8 = ctx.load(icmp).ok()?;
    if ty != 3 && ty != 11 {
        return None;
    }
    // The quoted packet: the client's, as the backend received it (client -> backend).
    let inner = icmp + 8;
    let ivihl: u8 = ctx.load(inner).ok()?;
    if ivihl != 0x45 {
        return None;
    }
    let iproto: u8 = ctx.load(inner + 9).ok()?;
    if iproto != TCP && iproto != UDP {
        return None;
    }
    let client: u32 = ctx.load(inner + 12).ok()?;
    let backend: u32 = ctx.load(inner + 16).ok()?;
    let csport: u16 = ctx.load(inner + 20).ok()?;
    let bport: u16 = ctx.load(inner + 22).ok()?;
    let reply = CtKey {
        saddr: [backend, 0, 0, 0],
        daddr: [client, 0, 0, 0],
        sport: bport,
        dport: csport,
        proto: iproto,
        dir: CT_REPLY,
        family: FAMILY_V4,
        pad: 0,
    };
    // SAFETY: copied out at once.
    let front = unsafe { WEIR_CT.get(reply) }.copied()?;
    if front.flags & CT_SNAT != 0 {
        return None;
    }
    Some(rewrite_icmp_error(ctx, icmp, backend, bport, &front))
}

/// Rewrites an IPv4 ICMP error from `backend` to come from `front` (its source, and the
/// quoted packet's destination and port), fixing the IPv4, quoted IPv4 and ICMP
/// checksums. The quoted transport checksum is left as it is (no stack checks it).
#[inline(always)]
fn rewrite_icmp_error(
    ctx: &TcContext,
    icmp: usize,
    backend: u32,
    bport: u16,
    front: &CtValue,
) -> Result<(), i64> {
    let inner = icmp + 8;
    let icsum_off = inner + 10;
    let f = front.addr[0];
    // The outer source: only the IPv4 header checksum covers it.
    ctx.l3_csum_replace(IP_CSUM, backend as u64, f as u64, 4)?;
    ctx.store(IP_SADDR, &f, 0)?;
    // The quoted destination: the quoted header's checksum and the ICMP checksum.
    let old_icsum: u16 = ctx.load(icsum_off)?;
    ctx.l3_csum_replace(icsum_off, backend as u64, f as u64, 4)?;
    let new_icsum: u16 = ctx.load(icsum_off)?;
    ctx.store(inner + 16, &f, 0)?;
    ctx.l4_csum_replace(icmp + 2, backend as u64, f as u64, 4)?;
    ctx.l4_csum_replace(icmp + 2, old_icsum as u64, new_icsum as u64, 2)?;
    // The quoted destination port.
    if bport != front.port {
        ctx.store(inner + 22, &front.port, 0)?;
        ctx.l4_csum_replace(icmp + 2, bport as u64, front.port as u64, 2)?;
    }
    Ok(())
}
