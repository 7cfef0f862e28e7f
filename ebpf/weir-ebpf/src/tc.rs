//! tc programs on the node's external interfaces (IPv4, TCP and UDP).
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
//! A frontend without endpoints: the packet is dropped, except on a node address without
//! the drop flag (NodePort), where the node's stack answers it as a closed port (TCP RST,
//! ICMP port unreachable), as nftables mode's reject does.

use crate::programs::{pick, service, WEIR_CT};
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use weir_ebpf_common::{
    AddrPort, AffinityKey, CtKey, CtValue, CLIENT_IP, CT_FORWARD, CT_REPLY, FAMILY_V4, FLAG_DROP,
    FLAG_NODE_LOCAL,
};
use weir_ebpf_common::{BACKEND_REMOTE, CT_SNAT};

const ETH_HLEN: usize = 14;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// An IPv4 TCP or UDP packet's 5-tuple and where its transport header starts.
struct Packet {
    key: CtKey,
    l4: usize,
}

/// The packet's 5-tuple, or `None` for anything else (other protocols, IPv6, non-first
/// fragments).
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if u16::from_be(ethertype) != 0x0800 {
        return None;
    }
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
    if proto != TCP && proto != UDP {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    Some(Packet {
        key: CtKey {
            saddr: ctx.load(IP_SADDR).ok()?,
            daddr: ctx.load(IP_DADDR).ok()?,
            sport: ctx.load(l4).ok()?,
            dport: ctx.load(l4 + 2).ok()?,
            proto,
            dir: CT_FORWARD,
            pad: 0,
        },
        l4,
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
    let mut h = mix(0x9e37_79b9 ^ k.saddr);
    h = mix(h ^ k.daddr);
    h = mix(h ^ ((k.sport as u32) << 16 | k.dport as u32));
    mix(h ^ k.proto as u32)
}

/// Rewrites the address at `addr_off` and the port at `port_off` (both in network byte
/// order), fixing the IPv4 header checksum and the TCP/UDP checksum (pseudo-header
/// included; a UDP checksum of 0 stays 0).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
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
        ctx.l4_csum_replace(
            csum,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// The backend for a client's packet: the tracked flow's, or a new choice (tracked in
/// both directions). `Err(action)` ends processing with that action.
#[inline(always)]
fn backend(p: &Packet) -> Result<CtValue, i32> {
    // SAFETY: copied out at once.
    if let Some(ct) = unsafe { WEIR_CT.get(&p.key) }.copied() {
        return Ok(ct);
    }
    let k = &p.key;
    let front = AddrPort {
        addr: [k.daddr, 0, 0, 0],
        port: k.dport,
        family: FAMILY_V4,
        proto: k.proto,
    };
    let v = service(&front).ok_or(TC_ACT_OK as i32)?;
    if v.count == 0 {
        if v.flags & FLAG_DROP == 0 && v.flags & FLAG_NODE_LOCAL != 0 {
            return Err(TC_ACT_OK as i32);
        }
        return Err(TC_ACT_SHOT as i32);
    }
    let client = AffinityKey {
        client: [k.saddr, 0, 0, 0],
        kind: CLIENT_IP,
        service: front,
    };
    let b = pick(&front, &v, hash(k), &client).ok_or(TC_ACT_SHOT as i32)?;
    let snat = b.proto == BACKEND_REMOTE && v.snat_v4 != 0;
    let ct = CtValue {
        addr: b.addr[0],
        port: b.port,
        flags: if snat { CT_SNAT } else { 0 },
        snat: if snat { v.snat_v4 } else { 0 },
    };
    // A masqueraded flow's reply comes to the node's address, else to the client.
    let reply = CtKey {
        saddr: b.addr[0],
        daddr: if snat { v.snat_v4 } else { k.saddr },
        sport: b.port,
        dport: k.sport,
        proto: k.proto,
        dir: CT_REPLY,
        pad: 0,
    };
    let front = CtValue {
        addr: k.daddr,
        port: k.dport,
        flags: ct.flags,
        snat: if snat { k.saddr } else { 0 },
    };
    // A full map evicts the least recently used flows.
    let _ = WEIR_CT.insert(&reply, &front, 0);
    let _ = WEIR_CT.insert(&p.key, &ct, 0);
    Ok(ct)
}

/// Ingress on an external interface: frontend -> backend (and the source -> the node's
/// address for a remote backend); a masqueraded flow's reply -> from the frontend to the
/// client.
#[classifier]
pub fn weir_tc_ingress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK as i32;
    };
    let k = p.key;
    let reply = CtKey { dir: CT_REPLY, ..k };
    // SAFETY: copied out at once.
    if let Some(front) = unsafe { WEIR_CT.get(&reply) }.copied() {
        if front.flags & CT_SNAT != 0 {
            let r = rewrite(
                &ctx,
                &p,
                IP_DADDR,
                k.daddr,
                front.snat,
                p.l4 + 2,
                k.dport,
                k.dport,
            )
            .and_then(|()| {
                rewrite(
                    &ctx, &p, IP_SADDR, k.saddr, front.addr, p.l4, k.sport, front.port,
                )
            });
            return match r {
                Ok(()) => TC_ACT_OK as i32,
                Err(_) => TC_ACT_SHOT as i32,
            };
        }
    }
    let to = match backend(&p) {
        Ok(to) => to,
        Err(action) => return action,
    };
    let mut r = rewrite(
        &ctx,
        &p,
        IP_DADDR,
        k.daddr,
        to.addr,
        p.l4 + 2,
        k.dport,
        to.port,
    );
    if r.is_ok() && to.flags & CT_SNAT != 0 {
        r = rewrite(&ctx, &p, IP_SADDR, k.saddr, to.snat, p.l4, k.sport, k.sport);
    }
    match r {
        Ok(()) => TC_ACT_OK as i32,
        Err(_) => TC_ACT_SHOT as i32,
    }
}

/// Egress on an external interface: a backend's reply gets the frontend as its source.
#[classifier]
pub fn weir_tc_egress(ctx: TcContext) -> i32 {
    let Some(mut p) = parse(&ctx) else {
        return TC_ACT_OK as i32;
    };
    p.key.dir = CT_REPLY;
    // SAFETY: copied out at once.
    let Some(front) = unsafe { WEIR_CT.get(&p.key) }.copied() else {
        return TC_ACT_OK as i32;
    };
    if front.flags & CT_SNAT != 0 {
        return TC_ACT_OK as i32;
    }
    let k = p.key;
    match rewrite(
        &ctx, &p, IP_SADDR, k.saddr, front.addr, p.l4, k.sport, front.port,
    ) {
        Ok(()) => TC_ACT_OK as i32,
        Err(_) => TC_ACT_SHOT as i32,
    }
}
