//! Renders a [`PolicySet`] into its own nftables table, [`POLICY_TABLE`], one per family.
//! Pure: the result is a typed [`Table`] that `dataplane::nft::diff::plan` turns into a
//! transaction, and that the fake and the packet tracer run.
//!
//! Layout (`P` is a policy's identifier, see [`policy_id`]; `k` a rule index):
//!
//! ```text
//! chain forward { type filter hook forward priority filter; policy accept;
//!     ct state established,related accept
//!     ip saddr . ip daddr @self accept            # a pod to itself (hairpin via a ClusterIP)
//!     ip saddr @egress_isolated jump egress       # egress ends in accept or drop
//!     jump ingress_check }
//! chain input { type filter hook input priority filter; policy accept;
//!     ct state established,related accept
//!     ip saddr @egress_isolated jump egress }     # pod -> node address; node -> pod is free
//! chain ingress_check { ip daddr @ingress_isolated jump ingress; accept }
//! chain ingress { ip daddr @P_sel jump P_in ...; drop }
//! chain egress  { ip saddr @P_sel jump P_eg ...; drop }
//! chain P_in { <peer> <port> accept ... }         # one rule per peer variant × port variant
//! chain P_eg { <peer> <port> jump ingress_check ... }
//! ```
//!
//! An allowed egress goes on to the destination's ingress check, whose verdict is final, so
//! pod-to-pod traffic on one node needs both. Peer variants of rule `k`: any (no match),
//! `ip saddr @P_ink_pods` (rendered whenever the rule has a pod/namespace peer, even when
//! it matches no pod now), `ip saddr @P_ink_cidrs` (interval set: every ipBlock of the
//! family, cidr minus excepts, as disjoint prefixes). Port variants: all (no match),
//! `meta l4proto . th dport @P_ink_ports` (interval set of protocol . port range; a port
//! entry without a port is `0-65535` of its protocol), `ip daddr . meta l4proto . th dport
//! @P_ink_named` (named ports resolved per destination pod: for ingress the selected local
//! pods, for egress every pod the rule's peers can reach). Egress rules read `daddr` for
//! peers and their sets are named `P_egk_*`.
//!
//! Selection sets (`P_sel`, `ingress_isolated`, `egress_isolated`, `self`) hold only local
//! pods' addresses; peer and named-port sets hold every pod's. The rules depend only on the
//! policies, never on pods or labels: a pod or label change is a change of set elements.
//! A failed-closed policy keeps its `P_sel` set and an empty chain (isolation, no allows).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::dataplane::nft::table::{
    Atom, BaseChain, Chain, ChainType, Data, DataType, FieldType, Hook, Key, KeyExpr, Map, MapDecl,
    MapFlags, Match, Rule, Stmt, Table,
};
use crate::dataplane::nft::Family;
use crate::model::Protocol;
use crate::policy::compile::{Peer, PortRef, PortSpec, ResolvedRule, Rule as PolicyRule};
use crate::policy::types::{PodInfo, Protocol as PolicyProtocol};
use crate::policy::PolicySet;

/// Name of the NetworkPolicy table in each family.
pub const POLICY_TABLE: &str = "weir_policy";

/// Longest policy identifier used as is; longer ones are cut and suffixed with a hash.
const MAX_ID: usize = 200;

/// The identifier of a policy in object names: `<namespace>_<name>`. Kubernetes names have
/// no `_`, so it is unambiguous. nft identifiers must start with a letter or `_` (a leading
/// digit gets a `_` prefix) and hold at most 255 characters: identifiers longer than 200,
/// or with characters nft does not take, become their first 183 characters (others turned
/// into `_`) plus `_h` and a 64-bit FNV-1a hash of the full identifier (201 characters, so
/// never equal to an unhashed one), leaving room for the longest suffix (`_eg<k>_named`).
pub fn policy_id(namespace: &str, name: &str) -> String {
    let raw = format!("{namespace}_{name}");
    let raw = if raw.starts_with(|c: char| c.is_ascii_alphabetic()) {
        raw
    } else {
        format!("_{raw}")
    };
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if raw.len() <= MAX_ID && raw.chars().all(ok) {
        return raw;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in raw.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let head: String = raw
        .chars()
        .take(183)
        .map(|c| if ok(c) { c } else { '_' })
        .collect();
    format!("{head:_<183}_h{hash:016x}")
}

fn proto(p: PolicyProtocol) -> Protocol {
    match p {
        PolicyProtocol::Tcp => Protocol::Tcp,
        PolicyProtocol::Udp => Protocol::Udp,
        PolicyProtocol::Sctp => Protocol::Sctp,
    }
}

fn set_decl(key: Vec<FieldType>, flags: MapFlags) -> MapDecl {
    MapDecl {
        key,
        data: DataType::None,
        flags,
    }
}

fn filter_base(hook: Hook) -> Option<BaseChain> {
    Some(BaseChain {
        kind: ChainType::Filter,
        hook,
        priority: 0,
    })
}

fn in_set(key: Vec<KeyExpr>, set: &str) -> Match {
    Match::InSet {
        key,
        set: set.to_owned(),
    }
}

/// Direction of a rule set, with what differs between the two.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    fn tag(self) -> &'static str {
        match self {
            Dir::Ingress => "in",
            Dir::Egress => "eg",
        }
    }

    /// The address of the remote end (the peer).
    fn peer_addr(self) -> KeyExpr {
        match self {
            Dir::Ingress => KeyExpr::SAddr,
            Dir::Egress => KeyExpr::DAddr,
        }
    }

    /// The address of the selected (local) pod.
    fn subject_addr(self) -> KeyExpr {
        match self {
            Dir::Ingress => KeyExpr::DAddr,
            Dir::Egress => KeyExpr::SAddr,
        }
    }

    fn verdict(self) -> Stmt {
        match self {
            Dir::Ingress => Stmt::Accept,
            Dir::Egress => Stmt::Jump("ingress_check".to_owned()),
        }
    }
}

struct Builder<'a> {
    set: &'a PolicySet,
    local: Option<&'a BTreeSet<IpAddr>>,
    family: Family,
    table: Table,
}

impl<'a> Builder<'a> {
    fn ips<'p>(&self, pod: &'p PodInfo) -> impl Iterator<Item = IpAddr> + 'p {
        let family = self.family;
        pod.ips
            .iter()
            .copied()
            .filter(move |ip| family.contains(ip))
    }

    fn local_ips(&self, pod: &PodInfo) -> Vec<IpAddr> {
        self.ips(pod)
            .filter(|ip| self.local.is_none_or(|l| l.contains(ip)))
            .collect()
    }

    fn add_set(&mut self, name: &str, decl: MapDecl, keys: impl IntoIterator<Item = Key>) {
        let elements = keys.into_iter().map(|k| (k, Data::None)).collect();
        self.table
            .maps
            .insert(name.to_owned(), Map { decl, elements });
    }

    fn add_chain(&mut self, name: &str, base: Option<BaseChain>, rules: Vec<Rule>) {
        self.table
            .chains
            .insert(name.to_owned(), Chain { base, rules });
    }

    fn pod(&self, key: &crate::policy::PodKey) -> Option<&'a PodInfo> {
        self.set.pods().get(key)
    }

    /// Renders one rule's sets and returns its nft rules.
    fn rule(
        &mut self,
        prefix: &str,
        dir: Dir,
        compiled: Option<&PolicyRule>,
        r: &ResolvedRule,
        subjects: &[&PodInfo],
    ) -> Vec<Rule> {
        let addr = Vec::from([FieldType::Addr]);
        // Peer variants.
        let mut peers: Vec<Option<Match>> = Vec::new();
        if r.any_peer {
            peers.push(None);
        }
        let has_pod_peer =
            compiled.is_some_and(|c| c.peers.iter().any(|p| matches!(p, Peer::Pods { .. })));
        if has_pod_peer {
            let name = format!("{prefix}_pods");
            let keys: Vec<Key> = r
                .peer_pods
                .iter()
                .filter_map(|k| self.pod(k))
                .flat_map(|p| self.ips(p).map(|ip| Key(vec![Atom::Addr(ip)])))
                .collect();
            self.add_set(&name, set_decl(addr.clone(), MapFlags::None), keys);
            peers.push(Some(in_set(vec![dir.peer_addr()], &name)));
        }
        let blocks: Vec<(IpNetwork, &[IpNetwork])> = r
            .ip_blocks
            .iter()
            .filter_map(|b| match b {
                Peer::IpBlock { cidr, except } => Some((*cidr, except.as_slice())),
                Peer::Pods { .. } => None,
            })
            .filter(|(c, _)| self.family.contains(&c.ip()))
            .collect();
        if !blocks.is_empty() {
            let name = format!("{prefix}_cidrs");
            let keys: Vec<Key> = block_prefixes(&blocks)
                .into_iter()
                .map(|n| Key(vec![Atom::prefix(n)]))
                .collect();
            self.add_set(&name, set_decl(addr, MapFlags::Interval), keys);
            peers.push(Some(in_set(vec![dir.peer_addr()], &name)));
        }
        // Port variants.
        let mut ports: Vec<Option<Match>> = Vec::new();
        if r.ports.is_empty() {
            ports.push(None);
        }
        let numeric: Vec<(Protocol, u16, u16)> = r
            .ports
            .iter()
            .filter_map(|s| match s.port {
                PortRef::Any => Some((proto(s.protocol), 0, u16::MAX)),
                PortRef::Range(a, b) => Some((proto(s.protocol), a, b)),
                PortRef::Named(_) => None,
            })
            .collect();
        if !numeric.is_empty() {
            let name = format!("{prefix}_ports");
            let keys: Vec<Key> = merge_port_ranges(numeric)
                .into_iter()
                .map(|(p, a, b)| Key(vec![Atom::Proto(p), Atom::port_range(a, b)]))
                .collect();
            let decl = set_decl(vec![FieldType::Proto, FieldType::Port], MapFlags::Interval);
            self.add_set(&name, decl, keys);
            ports.push(Some(in_set(vec![KeyExpr::L4Proto, KeyExpr::DPort], &name)));
        }
        let named: Vec<&PortSpec> = r
            .ports
            .iter()
            .filter(|s| matches!(s.port, PortRef::Named(_)))
            .collect();
        if !named.is_empty() {
            let name = format!("{prefix}_named");
            // Destinations whose container ports resolve the names.
            let dsts: Vec<&PodInfo> = match dir {
                Dir::Ingress => subjects.to_vec(),
                Dir::Egress if r.any_peer || !r.ip_blocks.is_empty() => {
                    let set: &'a PolicySet = self.set;
                    set.pods().values().collect()
                }
                Dir::Egress => r.peer_pods.iter().filter_map(|k| self.pod(k)).collect(),
            };
            let mut keys = BTreeSet::new();
            for pod in dsts {
                let ips: Vec<IpAddr> = match dir {
                    Dir::Ingress => self.local_ips(pod),
                    Dir::Egress => self.ips(pod).collect(),
                };
                for spec in &named {
                    let PortRef::Named(n) = &spec.port else {
                        continue;
                    };
                    if let Some(port) = pod.resolve_port(n, spec.protocol) {
                        for ip in &ips {
                            keys.insert(Key(vec![
                                Atom::Addr(*ip),
                                Atom::Proto(proto(spec.protocol)),
                                Atom::Port(port),
                            ]));
                        }
                    }
                }
            }
            let decl = set_decl(
                vec![FieldType::Addr, FieldType::Proto, FieldType::Port],
                MapFlags::None,
            );
            self.add_set(&name, decl, keys);
            ports.push(Some(in_set(
                vec![KeyExpr::DAddr, KeyExpr::L4Proto, KeyExpr::DPort],
                &name,
            )));
        }
        let mut out = Vec::new();
        for peer in &peers {
            for port in &ports {
                let matches = peer.iter().chain(port.iter()).cloned().collect();
                out.push(Rule::new(matches, vec![dir.verdict()]));
            }
        }
        out
    }
}

/// Renders `set` for this node into the family's [`POLICY_TABLE`]. `local` holds the IPs of
/// the pods attached on this node (`None`: every pod is local); only local pods are
/// selected (isolated) here, every pod can be a peer. Only addresses and ipBlocks of
/// `family` appear. See the module documentation for the layout.
pub fn render(set: &PolicySet, local: Option<&BTreeSet<IpAddr>>, family: Family) -> Table {
    let mut b = Builder {
        set,
        local,
        family,
        table: Table::new(family),
    };
    let addr = || vec![FieldType::Addr];
    // A pod to itself, also through its own ClusterIP (every pair of its addresses).
    let mut self_keys = Vec::new();
    for pod in set.pods().values() {
        let ips = b.local_ips(pod);
        for s in &ips {
            for d in &ips {
                self_keys.push(Key(vec![Atom::Addr(*s), Atom::Addr(*d)]));
            }
        }
    }
    b.add_set(
        "self",
        set_decl(vec![FieldType::Addr, FieldType::Addr], MapFlags::None),
        self_keys,
    );
    let mut ingress_isolated = BTreeSet::new();
    let mut egress_isolated = BTreeSet::new();
    let mut ingress_rules = Vec::new();
    let mut egress_rules = Vec::new();
    let mut used = BTreeSet::new();
    for p in set.policies() {
        // Names are unique in a cluster; should a snapshot hold one twice, the later copy
        // gets `_dup<n>` (no Kubernetes name has `_`, so this cannot collide).
        let mut id = policy_id(&p.policy.namespace, &p.policy.name);
        let base = id.clone();
        let mut n = 1;
        while !used.insert(id.clone()) {
            id = format!("{base}_dup{n}");
            n += 1;
        }
        let subjects: Vec<&PodInfo> = p
            .selected
            .iter()
            .filter_map(|k| set.pods().get(k))
            .collect();
        let sel: BTreeSet<IpAddr> = subjects.iter().flat_map(|s| b.local_ips(s)).collect();
        let sel_name = format!("{id}_sel");
        b.add_set(
            &sel_name,
            set_decl(addr(), MapFlags::None),
            sel.iter().map(|ip| Key(vec![Atom::Addr(*ip)])),
        );
        for (dir, resolved, compiled) in [
            (Dir::Ingress, &p.ingress, &p.policy.ingress),
            (Dir::Egress, &p.egress, &p.policy.egress),
        ] {
            let Some(rules) = resolved else { continue };
            let chain = format!("{id}_{}", dir.tag());
            let mut nft_rules = Vec::new();
            for (k, r) in rules.iter().enumerate() {
                let prefix = format!("{chain}{k}");
                let c = compiled.as_ref().and_then(|c| c.get(k));
                nft_rules.extend(b.rule(&prefix, dir, c, r, &subjects));
            }
            b.add_chain(&chain, None, nft_rules);
            let dispatch = Rule::new(
                vec![in_set(vec![dir.subject_addr()], &sel_name)],
                vec![Stmt::Jump(chain)],
            );
            match dir {
                Dir::Ingress => {
                    ingress_isolated.extend(sel.iter().copied());
                    ingress_rules.push(dispatch);
                }
                Dir::Egress => {
                    egress_isolated.extend(sel.iter().copied());
                    egress_rules.push(dispatch);
                }
            }
        }
    }
    ingress_rules.push(Rule::new(vec![], vec![Stmt::Drop]));
    egress_rules.push(Rule::new(vec![], vec![Stmt::Drop]));
    let keys = |s: BTreeSet<IpAddr>| s.into_iter().map(|ip| Key(vec![Atom::Addr(ip)]));
    b.add_set(
        "ingress_isolated",
        set_decl(addr(), MapFlags::None),
        keys(ingress_isolated),
    );
    b.add_set(
        "egress_isolated",
        set_decl(addr(), MapFlags::None),
        keys(egress_isolated),
    );
    b.add_chain("ingress", None, ingress_rules);
    b.add_chain("egress", None, egress_rules);
    b.add_chain(
        "ingress_check",
        None,
        vec![
            Rule::new(
                vec![in_set(vec![KeyExpr::DAddr], "ingress_isolated")],
                vec![Stmt::Jump("ingress".to_owned())],
            ),
            Rule::new(vec![], vec![Stmt::Accept]),
        ],
    );
    let established = Rule::new(vec![Match::CtStateEstablishedRelated], vec![Stmt::Accept]);
    let to_egress = Rule::new(
        vec![in_set(vec![KeyExpr::SAddr], "egress_isolated")],
        vec![Stmt::Jump("egress".to_owned())],
    );
    b.add_chain(
        "forward",
        filter_base(Hook::Forward),
        vec![
            established.clone(),
            Rule::new(
                vec![in_set(vec![KeyExpr::SAddr, KeyExpr::DAddr], "self")],
                vec![Stmt::Accept],
            ),
            to_egress.clone(),
            Rule::new(vec![], vec![Stmt::Jump("ingress_check".to_owned())]),
        ],
    );
    b.add_chain(
        "input",
        filter_base(Hook::Input),
        vec![established, to_egress],
    );
    b.table
}

/// Sorted, merged (overlapping or adjacent) port ranges per protocol: interval sets reject
/// overlapping elements.
fn merge_port_ranges(mut ranges: Vec<(Protocol, u16, u16)>) -> Vec<(Protocol, u16, u16)> {
    ranges.sort();
    let mut out: Vec<(Protocol, u16, u16)> = Vec::new();
    for (p, a, b) in ranges {
        match out.last_mut() {
            Some((lp, _, lb)) if *lp == p && u32::from(a) <= u32::from(*lb) + 1 => {
                *lb = (*lb).max(b);
            }
            _ => out.push((p, a, b)),
        }
    }
    out
}

fn to_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn net_range(n: &IpNetwork) -> (u128, u128) {
    let bits: u32 = if n.is_ipv4() { 32 } else { 128 };
    let host = bits - u32::from(n.prefix());
    let lo = to_num(n.network());
    let span = if host >= 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    };
    (lo, lo.saturating_add(span))
}

/// The union of every block's cidr minus its excepts, as the fewest disjoint prefixes.
/// All blocks must be of one family.
fn block_prefixes(blocks: &[(IpNetwork, &[IpNetwork])]) -> Vec<IpNetwork> {
    let Some((first, _)) = blocks.first() else {
        return Vec::new();
    };
    let v4 = first.is_ipv4();
    let mut ranges: Vec<(u128, u128)> = Vec::new();
    for (cidr, except) in blocks {
        let mut parts = vec![net_range(cidr)];
        for e in except.iter() {
            let (e0, e1) = net_range(e);
            let mut next = Vec::new();
            for (a, b) in parts {
                if e1 < a || e0 > b {
                    next.push((a, b));
                    continue;
                }
                if e0 > a {
                    next.push((a, e0 - 1));
                }
                if e1 < b {
                    next.push((e1 + 1, b));
                }
            }
            parts = next;
        }
        ranges.extend(parts);
    }
    ranges.sort();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some((_, lb)) if *lb == u128::MAX || a <= *lb + 1 => *lb = (*lb).max(b),
            _ => merged.push((a, b)),
        }
    }
    let bits: u32 = if v4 { 32 } else { 128 };
    let mut out = Vec::new();
    for (mut a, b) in merged {
        loop {
            // Largest aligned block at `a` that stays within `b`.
            let mut size_bits = if a == 0 {
                bits
            } else {
                a.trailing_zeros().min(bits)
            };
            while size_bits > 0 {
                let last = if size_bits >= 128 {
                    u128::MAX
                } else {
                    a + ((1u128 << size_bits) - 1)
                };
                if last <= b {
                    break;
                }
                size_bits -= 1;
            }
            let prefix = (bits - size_bits) as u8;
            let ip = if v4 {
                IpAddr::V4(std::net::Ipv4Addr::from(a as u32))
            } else {
                IpAddr::V6(std::net::Ipv6Addr::from(a))
            };
            if let Ok(n) = IpNetwork::new(ip, prefix) {
                out.push(n);
            }
            let last = if size_bits >= 128 {
                u128::MAX
            } else {
                a + ((1u128 << size_bits) - 1)
            };
            if last >= b {
                break;
            }
            a = last + 1;
        }
    }
    out
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_minus_excepts_becomes_disjoint_prefixes() {
        let ex = [n("10.0.2.0/24")];
        let got = block_prefixes(&[(n("10.0.0.0/16"), &ex)]);
        let want: Vec<IpNetwork> = [
            "10.0.0.0/23",
            "10.0.3.0/24",
            "10.0.4.0/22",
            "10.0.8.0/21",
            "10.0.16.0/20",
            "10.0.32.0/19",
            "10.0.64.0/18",
            "10.0.128.0/17",
        ]
        .iter()
        .map(|s| n(s))
        .collect();
        assert_eq!(got, want);
        // Overlapping blocks are merged; everything is one /0.
        let got = block_prefixes(&[(n("0.0.0.0/0"), &[]), (n("10.0.0.0/8"), &[])]);
        assert_eq!(got, [n("0.0.0.0/0")]);
        let got = block_prefixes(&[(n("::/0"), &[n("fd00::/8")])]);
        assert_eq!(got.len(), 8);
        assert!(!got.iter().any(|g| g.contains("fd00::1".parse().unwrap())));
        assert!(got.iter().any(|g| g.contains("ffff::1".parse().unwrap())));
    }

    #[test]
    fn port_ranges_merge_when_they_overlap_or_touch() {
        let got = merge_port_ranges(vec![
            (Protocol::Tcp, 80, 81),
            (Protocol::Tcp, 82, 82),
            (Protocol::Udp, 0, 65535),
            (Protocol::Tcp, 85, 90),
            (Protocol::Tcp, 86, 87),
        ]);
        assert_eq!(
            got,
            [
                (Protocol::Tcp, 80, 82),
                (Protocol::Tcp, 85, 90),
                (Protocol::Udp, 0, 65535)
            ]
        );
    }

    #[test]
    fn policy_ids_are_valid_nft_identifiers() {
        assert_eq!(policy_id("x", "allow-web.v1"), "x_allow-web.v1");
        assert_eq!(policy_id("1ns", "p"), "_1ns_p");
        let long = policy_id("x", &"a".repeat(253));
        assert_eq!(long.len(), 201);
        assert_ne!(long, policy_id("x", &"a".repeat(252)));
        assert!(long.starts_with("x_aaa"));
    }
}
