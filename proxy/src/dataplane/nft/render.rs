//! Pure rendering: [`DesiredState`] -> the desired [`Table`] -> a [`Plan`] against what is
//! realized. Nothing here touches the kernel.
//!
//! Layout (per family; names are stable because adoption after restart depends on them):
//! - `services` (jumped to from the nat prerouting and output hooks) looks the packet up in
//!   `service_ips` (`addr . proto . port : verdict`). ClusterIP frontends go to
//!   `pick_N`, NodePort frontends (node address . proto . nodePort) to `pick_ext_N`.
//! - `pick_N` / `pick_ext_N` exist once per endpoint count N in use (not per service): they
//!   mark for masquerade where needed and `numgen random mod N` to `slot_0` .. `slot_{N-1}`.
//! - `slot_I` DNATs through the shared map `backends_I` (`addr . proto . port : endpoint
//!   addr . port`), which holds the I-th endpoint of every frontend that has more than I.
//!   Each endpoint of each frontend is exactly one element.
//! - Frontends of services without endpoints are elements of `no_endpoint_services`,
//!   rejected in the filter hooks.
//! - Masquerade: mark bit [`MASQ_MARK`] for NodePort traffic and for ClusterIP traffic from
//!   outside the cluster CIDR (or all, with `--masquerade-all`), and hairpin pairs in
//!   `hairpin` (`endpoint . endpoint`).

use super::plan::{Op, Plan};
use super::table::{
    Atom, BaseChain, Chain, ChainType, Data, DataType, DumpedTable, Family, FieldType, Hook, Key,
    KeyExpr, Map, MapDecl, Match, Rule, Stmt, Table,
};
use crate::model::DesiredState;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};

/// The packet mark bit that asks nat postrouting to masquerade (same bit as kube-proxy).
pub const MASQ_MARK: u32 = 0x4000;

/// Map and chain names.
pub mod names {
    /// Frontends: `addr . proto . port : goto pick_N / pick_ext_N`.
    pub const SERVICE_IPS: &str = "service_ips";
    /// Prefix of the per-slot backend maps: `addr . proto . port : endpoint addr . port`.
    pub const BACKENDS_PREFIX: &str = "backends_";
    /// Frontends of services without endpoints.
    pub const NO_ENDPOINT_SERVICES: &str = "no_endpoint_services";
    /// `endpoint . endpoint` pairs for hairpin masquerade.
    pub const HAIRPIN: &str = "hairpin";
    /// Dispatch chain jumped to from the nat hooks.
    pub const SERVICES: &str = "services";
    /// Prefix of the per-endpoint-count chains for ClusterIP frontends.
    pub const PICK_PREFIX: &str = "pick_";
    /// Prefix of the per-endpoint-count chains for NodePort frontends.
    pub const PICK_EXT_PREFIX: &str = "pick_ext_";
    /// Prefix of the per-slot DNAT chains.
    pub const SLOT_PREFIX: &str = "slot_";
}

/// Node-level settings that shape the ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderConfig {
    /// `--cluster-cidr`: ClusterIP traffic from outside it is masqueraded.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// `--masquerade-all`: masquerade all ClusterIP traffic.
    pub masquerade_all: bool,
}

fn decl(key: &[FieldType], data: DataType) -> MapDecl {
    MapDecl {
        key: key.to_vec(),
        data,
    }
}

fn base(kind: ChainType, hook: Hook, priority: i32) -> Option<BaseChain> {
    Some(BaseChain {
        kind,
        hook,
        priority,
    })
}

/// The desired `weir` table for one family.
pub fn desired_table(state: &DesiredState, cfg: &RenderConfig, family: Family) -> Table {
    use names::*;
    use FieldType::{Addr, Port, Proto};
    let mut t = Table::new(family);
    let mut maps: BTreeMap<String, Map> = BTreeMap::new();
    let empty = |d: MapDecl| Map {
        decl: d,
        elements: BTreeMap::new(),
    };
    let frontend = decl(&[Addr, Proto, Port], DataType::None);
    maps.insert(
        SERVICE_IPS.into(),
        empty(decl(&[Addr, Proto, Port], DataType::Verdict)),
    );
    maps.insert(NO_ENDPOINT_SERVICES.into(), empty(frontend));
    maps.insert(HAIRPIN.into(), empty(decl(&[Addr, Addr], DataType::None)));

    let mut counts = BTreeSet::new();
    let mut ext_counts = BTreeSet::new();
    let node_ips: Vec<_> = state
        .node_ips
        .iter()
        .filter(|ip| family.contains(ip))
        .collect();
    for sp in state.services.values() {
        let proto = Atom::Proto(sp.info.name.protocol);
        let eps: Vec<_> = sp
            .endpoints
            .iter()
            .filter(|e| family.contains(&e.ip))
            .collect();
        let n = eps.len();
        let cluster = sp
            .info
            .cluster_ips
            .iter()
            .filter(|ip| family.contains(ip))
            .map(|ip| (*ip, sp.info.port, false));
        let external = sp
            .info
            .node_port
            .into_iter()
            .flat_map(|np| node_ips.iter().map(move |ip| (**ip, np, true)));
        for (ip, port, is_ext) in cluster.chain(external) {
            let key = Key(vec![Atom::Addr(ip), proto.clone(), Atom::Port(port)]);
            if n == 0 {
                insert(&mut maps, NO_ENDPOINT_SERVICES, key, Data::None);
                continue;
            }
            let pick = if is_ext {
                ext_counts.insert(n);
                format!("{PICK_EXT_PREFIX}{n}")
            } else {
                counts.insert(n);
                format!("{PICK_PREFIX}{n}")
            };
            insert(&mut maps, SERVICE_IPS, key.clone(), Data::Goto(pick));
            for (slot, ep) in eps.iter().enumerate() {
                let name = format!("{BACKENDS_PREFIX}{slot}");
                maps.entry(name.clone())
                    .or_insert_with(|| empty(decl(&[Addr, Proto, Port], DataType::AddrPort)));
                insert(
                    &mut maps,
                    &name,
                    key.clone(),
                    Data::AddrPort(ep.ip, ep.port),
                );
            }
        }
        for ep in eps.iter().filter(|e| e.is_local) {
            let pair = Key(vec![Atom::Addr(ep.ip), Atom::Addr(ep.ip)]);
            insert(&mut maps, HAIRPIN, pair, Data::None);
        }
    }
    let max_slots = counts.iter().chain(&ext_counts).max().copied().unwrap_or(0);
    t.maps = maps;

    let front_key = vec![KeyExpr::DAddr, KeyExpr::L4Proto, KeyExpr::DPort];
    let mut chains: BTreeMap<String, Chain> = BTreeMap::new();
    let regular = |rules: Vec<Rule>| Chain { base: None, rules };
    let jump_services = vec![Rule::new(vec![], vec![Stmt::Jump(SERVICES.into())])];
    chains.insert(
        "nat_prerouting".into(),
        Chain {
            base: base(ChainType::Nat, Hook::Prerouting, -100),
            rules: jump_services.clone(),
        },
    );
    chains.insert(
        "nat_output".into(),
        Chain {
            base: base(ChainType::Nat, Hook::Output, -100),
            rules: jump_services,
        },
    );
    let vmap = Stmt::Vmap {
        key: front_key.clone(),
        map: SERVICE_IPS.into(),
    };
    chains.insert(
        SERVICES.into(),
        regular(vec![Rule::new(vec![], vec![vmap])]),
    );
    let pick_rule = |n: usize| {
        let chains = (0..n).map(|i| format!("{SLOT_PREFIX}{i}")).collect();
        Rule::new(vec![], vec![Stmt::NumgenVmap { chains }])
    };
    for n in counts {
        let mut rules = Vec::new();
        if cfg.masquerade_all {
            rules.push(Rule::new(vec![], vec![Stmt::MarkOr(MASQ_MARK)]));
        } else {
            for cidr in cfg.cluster_cidrs.iter().filter(|c| family_of(c) == family) {
                rules.push(Rule::new(
                    vec![Match::SAddrNotIn(*cidr)],
                    vec![Stmt::MarkOr(MASQ_MARK)],
                ));
            }
        }
        rules.push(pick_rule(n));
        chains.insert(format!("{PICK_PREFIX}{n}"), regular(rules));
    }
    for n in ext_counts {
        let rules = vec![
            Rule::new(vec![], vec![Stmt::MarkOr(MASQ_MARK)]),
            pick_rule(n),
        ];
        chains.insert(format!("{PICK_EXT_PREFIX}{n}"), regular(rules));
    }
    for slot in 0..max_slots {
        let dnat = Stmt::Dnat {
            key: front_key.clone(),
            map: format!("{BACKENDS_PREFIX}{slot}"),
        };
        chains.insert(
            format!("{SLOT_PREFIX}{slot}"),
            regular(vec![Rule::new(vec![], vec![dnat])]),
        );
    }
    chains.insert(
        "nat_postrouting".into(),
        Chain {
            base: base(ChainType::Nat, Hook::Postrouting, 100),
            rules: vec![
                Rule::new(
                    vec![Match::MarkHas(MASQ_MARK)],
                    vec![Stmt::MarkXor(MASQ_MARK), Stmt::Masquerade],
                ),
                Rule::new(
                    vec![
                        Match::CtStatusDnat,
                        Match::InSet {
                            key: vec![KeyExpr::SAddr, KeyExpr::DAddr],
                            set: HAIRPIN.into(),
                        },
                    ],
                    vec![Stmt::Masquerade],
                ),
            ],
        },
    );
    let reject = Rule::new(
        vec![
            Match::CtStateNew,
            Match::InSet {
                key: front_key,
                set: NO_ENDPOINT_SERVICES.into(),
            },
        ],
        vec![Stmt::Reject],
    );
    for (name, hook) in [
        ("filter_input", Hook::Input),
        ("filter_forward", Hook::Forward),
        ("filter_output", Hook::Output),
    ] {
        chains.insert(
            name.into(),
            Chain {
                base: base(ChainType::Filter, hook, -1),
                rules: vec![reject.clone()],
            },
        );
    }
    t.chains = chains;
    t
}

fn insert(maps: &mut BTreeMap<String, Map>, name: &str, key: Key, data: Data) {
    if let Some(m) = maps.get_mut(name) {
        m.elements.insert(key, data);
    }
}

fn family_of(net: &IpNetwork) -> Family {
    match net {
        IpNetwork::V4(_) => Family::Ip,
        IpNetwork::V6(_) => Family::Ip6,
    }
}

/// The plan that turns `realized` into `desired` in one transaction.
///
/// Only changed elements are sent. Chains whose rules changed are flushed and refilled.
/// A set or map whose declaration changed, or a base chain whose hook changed, cannot be
/// altered in place: then the plan deletes and recreates the whole table in the same
/// transaction (established connections keep their conntrack NAT bindings).
pub fn plan(desired: &Table, realized: &DumpedTable) -> Plan {
    let want = desired.to_dump();
    let mut p = Plan::empty(desired.family);
    let incompatible = realized.maps.iter().any(|(name, m)| {
        want.maps
            .get(name)
            .is_some_and(|w| w.decl != m.decl || w.is_set != m.is_set)
    }) || realized
        .chains
        .iter()
        .any(|(name, c)| want.chains.get(name).is_some_and(|w| w.header != c.header));
    let empty = DumpedTable::empty(desired.family);
    let realized = if incompatible {
        p.ops.push(Op::AddTable);
        p.ops.push(Op::DeleteTable);
        &empty
    } else {
        realized
    };
    p.ops.push(Op::AddTable);
    for (name, m) in &desired.maps {
        if !realized.maps.contains_key(name) {
            p.ops.push(Op::AddMap {
                name: name.clone(),
                decl: m.decl.clone(),
            });
        }
    }
    for (name, c) in &desired.chains {
        if !realized.chains.contains_key(name) {
            p.ops.push(Op::AddChain {
                name: name.clone(),
                base: c.base,
            });
        }
    }
    // Deletions first, so a key whose data changed can be re-added and chains lose their
    // last references before they are deleted.
    for (name, m) in &desired.maps {
        let Some(have) = realized.maps.get(name) else {
            continue;
        };
        let keys: Vec<Key> = have
            .elements
            .iter()
            .filter(|(k, d)| m.elements.get(*k) != Some(*d))
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            p.ops.push(Op::DeleteElements {
                map: name.clone(),
                keys,
            });
        }
    }
    for (name, m) in &desired.maps {
        let have = realized.maps.get(name);
        let elements: Vec<(Key, Data)> = m
            .elements
            .iter()
            .filter(|(k, d)| have.and_then(|h| h.elements.get(*k)) != Some(*d))
            .map(|(k, d)| (k.clone(), d.clone()))
            .collect();
        if !elements.is_empty() {
            p.ops.push(Op::AddElements {
                map: name.clone(),
                elements,
            });
        }
    }
    for (name, c) in &desired.chains {
        let have_rules = realized.chains.get(name).map(|h| &h.rules);
        let want_rules = &want.chains[name].rules;
        if have_rules == Some(want_rules) {
            continue;
        }
        if have_rules.is_some_and(|r| !r.is_empty()) {
            p.ops.push(Op::FlushChain { name: name.clone() });
        }
        for rule in &c.rules {
            p.ops.push(Op::AddRule {
                chain: name.clone(),
                rule: rule.clone(),
            });
        }
    }
    let stale_chains: Vec<&String> = realized
        .chains
        .keys()
        .filter(|n| !desired.chains.contains_key(*n))
        .collect();
    for name in &stale_chains {
        if !realized.chains[*name].rules.is_empty() {
            p.ops.push(Op::FlushChain {
                name: (*name).clone(),
            });
        }
    }
    for name in stale_chains {
        p.ops.push(Op::DeleteChain { name: name.clone() });
    }
    for (name, m) in &realized.maps {
        if !desired.maps.contains_key(name) {
            p.ops.push(Op::DeleteMap {
                name: name.clone(),
                is_set: m.is_set,
            });
        }
    }
    // Only AddTable: nothing to do.
    if p.ops == [Op::AddTable] && !realized.chains.is_empty() {
        p.ops.clear();
    }
    p
}

/// The plan that removes weir's table (for `--cleanup`); empty when there is none.
pub fn cleanup_plan(realized: Option<&DumpedTable>, family: Family) -> Plan {
    let mut p = Plan::empty(family);
    if realized.is_some() {
        p.ops.push(Op::DeleteTable);
    }
    p
}
