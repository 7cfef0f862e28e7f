//! Pure rendering: [`DesiredState`] -> the desired [`Table`]. Nothing here touches the
//! kernel; [`super::diff`] turns tables into plans, [`super::incremental`] renders only what
//! changed.
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

use super::table::{
    Atom, BaseChain, Chain, ChainType, Data, DataType, Family, FieldType, Hook, Key, KeyExpr, Map,
    MapDecl, Match, Rule, Stmt, Table,
};
use crate::model::{DesiredState, ServicePortState};
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::net::IpAddr;

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
    /// Frontends whose traffic policy is Local and that have no endpoint on this node.
    pub const NO_LOCAL_ENDPOINT_SERVICES: &str = "no_local_endpoint_services";
    /// Every ClusterIP: other ports on them are rejected.
    pub const CLUSTER_IPS: &str = "cluster_ips";
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
    /// `--service-cluster-ip-range`: traffic to unallocated addresses in it is dropped.
    pub service_cidrs: Vec<IpNetwork>,
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

/// What one Service port puts into the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    /// Elements: map name, key, data.
    pub elements: Vec<(MapName, Key, Data)>,
    /// Pick chains used, one per frontend with endpoints: (external?, endpoint count).
    pub picks: Vec<(bool, usize)>,
    /// Set elements several Service ports may need (hairpin pairs of local endpoints,
    /// ClusterIPs): reference-counted, present while any port needs them.
    pub shared: Vec<(MapName, Key)>,
}

/// A map elements go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapName {
    /// `service_ips`.
    ServiceIps,
    /// `no_endpoint_services`.
    NoEndpointServices,
    /// `no_local_endpoint_services`.
    NoLocalEndpointServices,
    /// `hairpin`.
    Hairpin,
    /// `cluster_ips`.
    ClusterIps,
    /// `backends_I`.
    Backends(usize),
}

impl std::fmt::Display for MapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapName::ServiceIps => f.write_str(names::SERVICE_IPS),
            MapName::NoEndpointServices => f.write_str(names::NO_ENDPOINT_SERVICES),
            MapName::NoLocalEndpointServices => f.write_str(names::NO_LOCAL_ENDPOINT_SERVICES),
            MapName::Hairpin => f.write_str(names::HAIRPIN),
            MapName::ClusterIps => f.write_str(names::CLUSTER_IPS),
            MapName::Backends(i) => write!(f, "{}{i}", names::BACKENDS_PREFIX),
        }
    }
}

/// The elements and chains one Service port needs.
pub fn contribution(sp: &ServicePortState, node_ips: &[IpAddr], family: Family) -> Contribution {
    use names::*;
    let mut c = Contribution::default();
    let proto = Atom::Proto(sp.info.name.protocol);
    let eps: Vec<_> = sp
        .endpoints
        .iter()
        .filter(|e| family.contains(&e.ip))
        .collect();
    let local: Vec<_> = eps.iter().copied().filter(|e| e.is_local).collect();
    let cluster = sp
        .info
        .cluster_ips
        .iter()
        .filter(|ip| family.contains(ip))
        .map(|ip| (*ip, sp.info.port, false));
    let external = sp.info.node_port.into_iter().flat_map(|np| {
        node_ips
            .iter()
            .filter(|ip| family.contains(ip))
            .map(move |ip| (*ip, np, true))
    });
    for (ip, port, is_ext) in cluster.chain(external) {
        let key = Key(vec![Atom::Addr(ip), proto.clone(), Atom::Port(port)]);
        // internalTrafficPolicy Local: ClusterIP traffic only to endpoints on this node.
        let eps = if sp.info.internal_local && !is_ext {
            &local
        } else {
            &eps
        };
        let n = eps.len();
        if n == 0 {
            // No endpoint at all: reject; none here under a Local policy: drop (as upstream).
            let set = if sp.endpoints.is_empty() {
                MapName::NoEndpointServices
            } else {
                MapName::NoLocalEndpointServices
            };
            c.elements.push((set, key, Data::None));
            continue;
        }
        c.picks.push((is_ext, n));
        let prefix = if is_ext { PICK_EXT_PREFIX } else { PICK_PREFIX };
        c.elements.push((
            MapName::ServiceIps,
            key.clone(),
            Data::Goto(format!("{prefix}{n}")),
        ));
        for (slot, ep) in eps.iter().enumerate() {
            c.elements.push((
                MapName::Backends(slot),
                key.clone(),
                Data::AddrPort(ep.ip, ep.port),
            ));
        }
    }
    c.shared = local
        .iter()
        .map(|e| {
            (
                MapName::Hairpin,
                Key(vec![Atom::Addr(e.ip), Atom::Addr(e.ip)]),
            )
        })
        .chain(
            sp.info
                .cluster_ips
                .iter()
                .filter(|ip| family.contains(ip))
                .map(|ip| (MapName::ClusterIps, Key(vec![Atom::Addr(*ip)]))),
        )
        .collect();
    c
}

/// Reference counts of the shared parts: pick chains per (external?, N) and shared set
/// elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    picks: BTreeMap<(bool, usize), usize>,
    pub(super) shared: BTreeMap<(MapName, Key), usize>,
}

impl Counts {
    pub(super) fn add(&mut self, c: &Contribution) {
        for p in &c.picks {
            *self.picks.entry(*p).or_default() += 1;
        }
        for k in &c.shared {
            *self.shared.entry(k.clone()).or_default() += 1;
        }
    }

    pub(super) fn remove(&mut self, c: &Contribution) {
        for p in &c.picks {
            if let Some(v) = self.picks.get_mut(p) {
                *v -= 1;
                if *v == 0 {
                    self.picks.remove(p);
                }
            }
        }
        for k in &c.shared {
            if let Some(v) = self.shared.get_mut(k) {
                *v -= 1;
                if *v == 0 {
                    self.shared.remove(k);
                }
            }
        }
    }
}

/// Chains and (empty) maps for the pick chains and slots in use.
pub fn skeleton(counts: &Counts, cfg: &RenderConfig, family: Family) -> Table {
    use names::*;
    use FieldType::{Addr, Port, Proto};
    let mut t = Table::new(family);
    let empty = |d: MapDecl| Map {
        decl: d,
        elements: BTreeMap::new(),
    };
    let frontend = decl(&[Addr, Proto, Port], DataType::None);
    t.maps.insert(
        SERVICE_IPS.into(),
        empty(decl(&[Addr, Proto, Port], DataType::Verdict)),
    );
    t.maps.insert(NO_ENDPOINT_SERVICES.into(), empty(frontend));
    t.maps
        .insert(HAIRPIN.into(), empty(decl(&[Addr, Addr], DataType::None)));
    t.maps
        .insert(CLUSTER_IPS.into(), empty(decl(&[Addr], DataType::None)));
    t.maps.insert(
        NO_LOCAL_ENDPOINT_SERVICES.into(),
        empty(decl(&[Addr, Proto, Port], DataType::None)),
    );
    let max_slots = counts.picks.keys().map(|(_, n)| *n).max().unwrap_or(0);
    for slot in 0..max_slots {
        t.maps.insert(
            MapName::Backends(slot).to_string(),
            empty(decl(&[Addr, Proto, Port], DataType::AddrPort)),
        );
    }

    let front_key = vec![KeyExpr::DAddr, KeyExpr::L4Proto, KeyExpr::DPort];
    let chains = &mut t.chains;
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
    for &(is_ext, n) in counts.picks.keys() {
        let mut rules = Vec::new();
        if is_ext || cfg.masquerade_all {
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
        let prefix = if is_ext { PICK_EXT_PREFIX } else { PICK_PREFIX };
        chains.insert(format!("{prefix}{n}"), regular(rules));
    }
    for slot in 0..max_slots {
        let dnat = Stmt::Dnat {
            key: front_key.clone(),
            map: MapName::Backends(slot).to_string(),
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
                key: front_key.clone(),
                set: NO_ENDPOINT_SERVICES.into(),
            },
        ],
        vec![Stmt::Reject],
    );
    // What is still addressed to a ClusterIP here was not DNATed: a port the Service does
    // not have. What is addressed to the service range but no ClusterIP is unallocated.
    let mut checks = vec![
        Rule::new(
            vec![
                Match::CtStateNew,
                Match::InSet {
                    key: front_key.clone(),
                    set: NO_LOCAL_ENDPOINT_SERVICES.into(),
                },
            ],
            vec![Stmt::Drop],
        ),
        Rule::new(
            vec![
                Match::CtStateNew,
                Match::InSet {
                    key: vec![KeyExpr::DAddr],
                    set: CLUSTER_IPS.into(),
                },
            ],
            vec![Stmt::Reject],
        ),
    ];
    for cidr in cfg.service_cidrs.iter().filter(|c| family_of(c) == family) {
        checks.push(Rule::new(
            vec![Match::CtStateNew, Match::DAddrIn(*cidr)],
            vec![Stmt::Drop],
        ));
    }
    for (name, hook) in [
        ("filter_input", Hook::Input),
        ("filter_forward", Hook::Forward),
        ("filter_output", Hook::Output),
    ] {
        chains.insert(
            name.into(),
            Chain {
                base: base(ChainType::Filter, hook, -1),
                rules: std::iter::once(reject.clone())
                    .chain(checks.iter().cloned())
                    .collect(),
            },
        );
    }
    t
}

/// The desired `weir` table for one family.
pub fn desired_table(state: &DesiredState, cfg: &RenderConfig, family: Family) -> Table {
    let contributions: Vec<Contribution> = state
        .services
        .values()
        .map(|sp| contribution(sp, &state.node_ips, family))
        .collect();
    let mut counts = Counts::default();
    for c in &contributions {
        counts.add(c);
    }
    let mut t = skeleton(&counts, cfg, family);
    for c in contributions {
        for (map, key, data) in c.elements {
            if let Some(m) = t.maps.get_mut(&map.to_string()) {
                m.elements.insert(key, data);
            }
        }
    }
    for (map, key) in counts.shared.into_keys() {
        if let Some(m) = t.maps.get_mut(&map.to_string()) {
            m.elements.insert(key, Data::None);
        }
    }
    t
}

fn family_of(net: &IpNetwork) -> Family {
    match net {
        IpNetwork::V4(_) => Family::Ip,
        IpNetwork::V6(_) => Family::Ip6,
    }
}
