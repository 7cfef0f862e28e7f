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
    MapDecl, MapFlags, Match, Rule, Stmt, Table,
};
use crate::model::{DesiredState, Endpoint, ServicePortState};
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The packet mark bit that asks nat postrouting to masquerade (same bit as kube-proxy).
pub const MASQ_MARK: u32 = 0x4000;

/// Map and chain names.
pub mod names {
    /// Frontends: `addr . proto . port : goto pick_* / external_local`.
    pub const SERVICE_IPS: &str = "service_ips";
    /// `externalTrafficPolicy: Local` frontends, for pods and the node itself (they use
    /// the Service's cluster-wide endpoints): `addr . proto . port : goto pick_N`.
    pub const EXTERNAL_LOCAL_BYPASS: &str = "external_local_bypass";
    /// `externalTrafficPolicy: Local` frontends, for external clients (this node's
    /// endpoints, source preserved): `addr . proto . port : goto pick_local_N`.
    pub const LOCAL_SERVICE_IPS: &str = "local_service_ips";
    /// Prefix of the per-slot backend maps: `addr . proto . port : endpoint addr . port`.
    pub const BACKENDS_PREFIX: &str = "backends_";
    /// Prefix of the per-slot backend maps of this node's endpoints (Local policies).
    pub const LOCAL_BACKENDS_PREFIX: &str = "local_backends_";
    /// Prefix of the per-slot session-affinity sets (`client . frontend`, with timeouts).
    pub const AFFINITY_PREFIX: &str = "affinity_";
    /// Frontends of services without endpoints.
    pub const NO_ENDPOINT_SERVICES: &str = "no_endpoint_services";
    /// `endpoint . endpoint` pairs for hairpin masquerade.
    pub const HAIRPIN: &str = "hairpin";
    /// Frontends whose traffic policy is Local and that have no endpoint on this node.
    pub const NO_LOCAL_ENDPOINT_SERVICES: &str = "no_local_endpoint_services";
    /// Every ClusterIP: other ports on them are rejected.
    pub const CLUSTER_IPS: &str = "cluster_ips";
    /// Load-balancer frontends with `loadBalancerSourceRanges`.
    pub const FIREWALLED: &str = "firewalled";
    /// `frontend . source range` pairs allowed through [`FIREWALLED`] frontends.
    pub const FIREWALL_ALLOW: &str = "firewall_allow";
    /// Dispatch chain jumped to from the nat hooks.
    pub const SERVICES: &str = "services";
    /// Chain for `externalTrafficPolicy: Local` frontends.
    pub const EXTERNAL_LOCAL: &str = "external_local";
    /// Prefix of the per-endpoint-count chains for ClusterIP frontends.
    pub const PICK_PREFIX: &str = "pick_";
    /// Prefix of the per-endpoint-count chains for external frontends.
    pub const PICK_EXT_PREFIX: &str = "pick_ext_";
    /// Prefix of the per-endpoint-count chains for this node's endpoints.
    pub const PICK_LOCAL_PREFIX: &str = "pick_local_";
    /// Prefix of the per-slot DNAT chains.
    pub const SLOT_PREFIX: &str = "slot_";
    /// Prefix of the per-slot DNAT chains of this node's endpoints.
    pub const LOCAL_SLOT_PREFIX: &str = "local_slot_";
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
    /// IPVS mode: IPVS does the DNAT, so pick chains only set the masquerade mark (no
    /// slot chains, no affinity sets), and the checks that assume DNAT already happened in
    /// prerouting (reject other ports of a ClusterIP, drop unallocated service addresses)
    /// are left out. Rejects for Services without endpoints stay.
    pub ipvs: bool,
}

fn decl(key: &[FieldType], data: DataType) -> MapDecl {
    MapDecl {
        key: key.to_vec(),
        data,
        flags: MapFlags::None,
    }
}

fn base(kind: ChainType, hook: Hook, priority: i32) -> Option<BaseChain> {
    Some(BaseChain {
        kind,
        hook,
        priority,
    })
}

/// Which endpoint list a pick chain chooses from, and whether it masquerades.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PickKind {
    /// Cluster-wide endpoints; masquerade sources outside the cluster CIDR (or all, with
    /// `--masquerade-all`).
    Cluster,
    /// Cluster-wide endpoints for external traffic: always masquerade.
    External,
    /// This node's endpoints (Local policies): never masquerade.
    Local,
}

/// A pick chain: one per (kind, endpoint count, affinity timeout) in use, not per service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pick {
    /// Endpoint list and masquerade behaviour.
    pub kind: PickKind,
    /// Number of endpoints.
    pub n: usize,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity: Option<u32>,
}

impl Pick {
    /// The chain's name, e.g. `pick_3`, `pick_ext_2`, `pick_local_1_aff10800`.
    pub fn chain(&self) -> String {
        use names::*;
        let prefix = match self.kind {
            PickKind::Cluster => PICK_PREFIX,
            PickKind::External => PICK_EXT_PREFIX,
            PickKind::Local => PICK_LOCAL_PREFIX,
        };
        format!("{prefix}{}{}", self.n, aff_suffix(self.affinity))
    }

    fn local(&self) -> bool {
        self.kind == PickKind::Local
    }
}

fn aff_suffix(affinity: Option<u32>) -> String {
    affinity.map(|t| format!("_aff{t}")).unwrap_or_default()
}

fn slot_chain(local: bool, slot: usize, affinity: Option<u32>) -> String {
    let prefix = if local {
        names::LOCAL_SLOT_PREFIX
    } else {
        names::SLOT_PREFIX
    };
    format!("{prefix}{slot}{}", aff_suffix(affinity))
}

/// What one Service port puts into the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    /// Elements: map name, key, data.
    pub elements: Vec<(MapName, Key, Data)>,
    /// Pick chains used, one per frontend path with endpoints.
    pub picks: Vec<Pick>,
    /// Set elements several Service ports may need (hairpin pairs of local endpoints,
    /// ClusterIPs): reference-counted, present while any port needs them.
    pub shared: Vec<Shared>,
}

/// A set element several Service ports may need. Each is one address, so the reference
/// counts hold an address and a tag rather than a whole [`Key`] (at 10,000 Services x 10
/// local endpoints there are 100,000 hairpin pairs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shared {
    /// `hairpin`'s `ip . ip` of a local endpoint.
    Hairpin(IpAddr),
    /// `cluster_ips`' ClusterIP.
    ClusterIp(IpAddr),
}

impl Shared {
    /// The map and key of the element.
    pub fn element(self) -> (MapName, Key) {
        match self {
            Shared::Hairpin(ip) => (MapName::Hairpin, Key(vec![Atom::Addr(ip), Atom::Addr(ip)])),
            Shared::ClusterIp(ip) => (MapName::ClusterIps, Key(vec![Atom::Addr(ip)])),
        }
    }
}

/// A map elements go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapName {
    /// `service_ips`.
    ServiceIps,
    /// `external_local_bypass`.
    ExternalLocalBypass,
    /// `local_service_ips`.
    LocalServiceIps,
    /// `no_endpoint_services`.
    NoEndpointServices,
    /// `no_local_endpoint_services`.
    NoLocalEndpointServices,
    /// `hairpin`.
    Hairpin,
    /// `cluster_ips`.
    ClusterIps,
    /// `firewalled`.
    Firewalled,
    /// `firewall_allow`.
    FirewallAllow,
    /// `backends_I`.
    Backends(usize),
    /// `local_backends_I`.
    LocalBackends(usize),
}

impl std::fmt::Display for MapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use names::*;
        match self {
            MapName::ServiceIps => f.write_str(SERVICE_IPS),
            MapName::ExternalLocalBypass => f.write_str(EXTERNAL_LOCAL_BYPASS),
            MapName::LocalServiceIps => f.write_str(LOCAL_SERVICE_IPS),
            MapName::NoEndpointServices => f.write_str(NO_ENDPOINT_SERVICES),
            MapName::NoLocalEndpointServices => f.write_str(NO_LOCAL_ENDPOINT_SERVICES),
            MapName::Hairpin => f.write_str(HAIRPIN),
            MapName::ClusterIps => f.write_str(CLUSTER_IPS),
            MapName::Firewalled => f.write_str(FIREWALLED),
            MapName::FirewallAllow => f.write_str(FIREWALL_ALLOW),
            MapName::Backends(i) => write!(f, "{BACKENDS_PREFIX}{i}"),
            MapName::LocalBackends(i) => write!(f, "{LOCAL_BACKENDS_PREFIX}{i}"),
        }
    }
}

/// Which way traffic reaches a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// A ClusterIP.
    Internal,
    /// A NodePort on a node address, or an external IP.
    External,
    /// A load-balancer ingress IP (source ranges apply).
    LoadBalancer,
}

impl Contribution {
    /// Routes a frontend to `list` through a pick chain of `kind`: a `map` element, the
    /// per-slot backends, and the pick chain's reference.
    fn pick(
        &mut self,
        map: MapName,
        key: &Key,
        kind: PickKind,
        list: &[&Endpoint],
        affinity: Option<u32>,
    ) {
        let pick = Pick {
            kind,
            n: list.len(),
            affinity,
        };
        self.elements
            .push((map, key.clone(), Data::Goto(pick.chain())));
        self.picks.push(pick);
        for (slot, ep) in list.iter().enumerate() {
            let m = if pick.local() {
                MapName::LocalBackends(slot)
            } else {
                MapName::Backends(slot)
            };
            self.elements
                .push((m, key.clone(), Data::AddrPort(ep.ip, ep.port)));
        }
    }

    /// `loadBalancerSourceRanges` for one load-balancer frontend: the frontend is
    /// firewalled and each of [`ServiceInfo::allowed_lb_sources`] allowed.
    fn firewall(&mut self, key: &Key, allowed: Vec<IpNetwork>) {
        self.elements
            .push((MapName::Firewalled, key.clone(), Data::None));
        for n in allowed {
            let mut k = key.0.clone();
            k.push(Atom::prefix(n));
            self.elements
                .push((MapName::FirewallAllow, Key(k), Data::None));
        }
    }
}

/// The elements and chains one Service port needs.
pub fn contribution(sp: &ServicePortState, node_ips: &[IpAddr], family: Family) -> Contribution {
    let mut c = Contribution::default();
    let info = &sp.info;
    let proto = Atom::Proto(info.name.protocol);
    let in_family = |e: &&Endpoint| family.contains(&e.ip);
    let cluster: Vec<&Endpoint> = sp.endpoints.iter().filter(in_family).collect();
    let local: Vec<&Endpoint> = sp.local_endpoints.iter().filter(in_family).collect();
    let ips = |list: &[IpAddr], port: u16, reach: Reach| -> Vec<(IpAddr, u16, Reach)> {
        list.iter()
            .filter(|ip| family.contains(ip))
            .map(|ip| (*ip, port, reach))
            .collect()
    };
    // A Service serves a family only if it has a ClusterIP of it (single-stack Services
    // get no NodePorts or external IPs of the other family).
    if !info.cluster_ips.iter().any(|ip| family.contains(ip)) {
        return c;
    }
    let mut frontends = ips(&info.cluster_ips, info.port, Reach::Internal);
    if let Some(np) = info.node_port {
        frontends.extend(ips(node_ips, np, Reach::External));
    }
    frontends.extend(ips(&info.external_ips, info.port, Reach::External));
    frontends.extend(ips(&info.load_balancer_ips, info.port, Reach::LoadBalancer));
    let aff = info.affinity_timeout;
    for (ip, port, reach) in frontends {
        let key = Key(vec![Atom::Addr(ip), proto.clone(), Atom::Port(port)]);
        if reach == Reach::LoadBalancer && !info.source_ranges.is_empty() {
            c.firewall(
                &key,
                info.allowed_lb_sources(node_ips, family == Family::Ip),
            );
        }
        if !sp.has_endpoints_for(&ip) {
            // No usable endpoint anywhere: reject (ICMP port unreachable), as upstream.
            c.elements
                .push((MapName::NoEndpointServices, key, Data::None));
            continue;
        }
        match reach {
            Reach::Internal => {
                // internalTrafficPolicy Local: ClusterIP traffic only to this node's endpoints.
                let list = if info.internal_local {
                    &local
                } else {
                    &cluster
                };
                if list.is_empty() {
                    c.elements
                        .push((MapName::NoLocalEndpointServices, key, Data::None));
                } else {
                    c.pick(MapName::ServiceIps, &key, PickKind::Cluster, list, aff);
                }
            }
            _ if !info.external_local => {
                if cluster.is_empty() {
                    c.elements
                        .push((MapName::NoLocalEndpointServices, key, Data::None));
                } else {
                    c.pick(MapName::ServiceIps, &key, PickKind::External, &cluster, aff);
                }
            }
            _ => {
                // externalTrafficPolicy Local: pods and the node itself use the cluster-wide
                // endpoints; external clients only this node's, with their source kept.
                if !cluster.is_empty() {
                    let m = MapName::ExternalLocalBypass;
                    c.pick(m, &key, PickKind::Cluster, &cluster, aff);
                }
                if local.is_empty() {
                    c.elements
                        .push((MapName::NoLocalEndpointServices, key.clone(), Data::None));
                } else {
                    c.pick(MapName::LocalServiceIps, &key, PickKind::Local, &local, aff);
                }
                if !cluster.is_empty() || !local.is_empty() {
                    let to = Data::Goto(names::EXTERNAL_LOCAL.into());
                    c.elements.push((MapName::ServiceIps, key, to));
                }
            }
        }
    }
    let mut hairpin: Vec<IpAddr> = cluster
        .iter()
        .chain(&local)
        .filter(|e| e.is_local)
        .map(|e| e.ip)
        .collect();
    hairpin.sort();
    hairpin.dedup();
    c.shared = hairpin
        .into_iter()
        .map(Shared::Hairpin)
        .chain(
            info.cluster_ips
                .iter()
                .filter(|ip| family.contains(ip))
                .map(|ip| Shared::ClusterIp(*ip)),
        )
        .collect();
    c
}

/// Reference counts of the shared parts: pick chains and shared set elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    picks: BTreeMap<Pick, usize>,
    pub(super) shared: BTreeMap<Shared, usize>,
}

impl Counts {
    pub(super) fn add(&mut self, c: &Contribution) {
        for p in &c.picks {
            *self.picks.entry(*p).or_default() += 1;
        }
        for k in &c.shared {
            *self.shared.entry(*k).or_default() += 1;
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
    let verdicts = decl(&[Addr, Proto, Port], DataType::Verdict);
    for name in [SERVICE_IPS, EXTERNAL_LOCAL_BYPASS, LOCAL_SERVICE_IPS] {
        t.maps.insert(name.into(), empty(verdicts.clone()));
    }
    for name in [NO_ENDPOINT_SERVICES, NO_LOCAL_ENDPOINT_SERVICES, FIREWALLED] {
        t.maps.insert(name.into(), empty(frontend.clone()));
    }
    t.maps
        .insert(HAIRPIN.into(), empty(decl(&[Addr, Addr], DataType::None)));
    t.maps
        .insert(CLUSTER_IPS.into(), empty(decl(&[Addr], DataType::None)));
    t.maps.insert(
        FIREWALL_ALLOW.into(),
        empty(MapDecl {
            flags: MapFlags::Interval,
            ..decl(&[Addr, Proto, Port, Addr], DataType::None)
        }),
    );
    // Slots needed: per (local?, affinity) the largest endpoint count.
    let mut slots: BTreeMap<(bool, Option<u32>), usize> = BTreeMap::new();
    for p in counts.picks.keys() {
        let s = slots.entry((p.local(), p.affinity)).or_default();
        *s = (*s).max(p.n);
    }
    let max_of = |local: Option<bool>, affinity: bool| {
        slots
            .iter()
            .filter(|((l, a), _)| local.is_none_or(|want| *l == want) && (!affinity || a.is_some()))
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    };
    let cluster_slots = max_of(Some(false), false);
    let local_slots = max_of(Some(true), false);
    let affinity_slots = max_of(None, true);
    let backends = decl(&[Addr, Proto, Port], DataType::AddrPort);
    for slot in 0..cluster_slots {
        t.maps
            .insert(MapName::Backends(slot).to_string(), empty(backends.clone()));
    }
    for slot in 0..local_slots {
        t.maps.insert(
            MapName::LocalBackends(slot).to_string(),
            empty(backends.clone()),
        );
    }
    let client_frontend = vec![
        KeyExpr::SAddr,
        KeyExpr::DAddr,
        KeyExpr::L4Proto,
        KeyExpr::DPort,
    ];
    for slot in 0..affinity_slots {
        t.maps.insert(
            format!("{AFFINITY_PREFIX}{slot}"),
            empty(MapDecl {
                flags: MapFlags::DynamicTimeout,
                ..decl(&[Addr, Addr, Proto, Port], DataType::None)
            }),
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
    let vmap = |map: &str| Stmt::Vmap {
        key: front_key.clone(),
        map: map.into(),
    };
    let mut with_source = front_key.clone();
    with_source.push(KeyExpr::SAddr);
    chains.insert(
        SERVICES.into(),
        regular(vec![
            // loadBalancerSourceRanges: a firewalled frontend drops other sources.
            Rule::new(
                vec![
                    Match::InSet {
                        key: front_key.clone(),
                        set: FIREWALLED.into(),
                    },
                    Match::NotInSet {
                        key: with_source,
                        set: FIREWALL_ALLOW.into(),
                    },
                ],
                vec![Stmt::Drop],
            ),
            Rule::new(vec![], vec![vmap(SERVICE_IPS)]),
        ]),
    );
    // externalTrafficPolicy Local: the node itself (masqueraded) and pods use every
    // endpoint; everyone else only this node's, unmasqueraded.
    let mut ext_local = vec![
        Rule::new(vec![Match::FibSaddrLocal], vec![Stmt::MarkOr(MASQ_MARK)]),
        Rule::new(
            vec![Match::FibSaddrLocal],
            vec![vmap(EXTERNAL_LOCAL_BYPASS)],
        ),
    ];
    for cidr in cfg.cluster_cidrs.iter().filter(|c| family_of(c) == family) {
        ext_local.push(Rule::new(
            vec![Match::SAddrIn(*cidr)],
            vec![vmap(EXTERNAL_LOCAL_BYPASS)],
        ));
    }
    ext_local.push(Rule::new(vec![], vec![vmap(LOCAL_SERVICE_IPS)]));
    chains.insert(EXTERNAL_LOCAL.into(), regular(ext_local));
    for p in counts.picks.keys() {
        let mut rules = Vec::new();
        match p.kind {
            PickKind::External => rules.push(Rule::new(vec![], vec![Stmt::MarkOr(MASQ_MARK)])),
            PickKind::Cluster if cfg.masquerade_all => {
                rules.push(Rule::new(vec![], vec![Stmt::MarkOr(MASQ_MARK)]))
            }
            PickKind::Cluster => {
                for cidr in cfg.cluster_cidrs.iter().filter(|c| family_of(c) == family) {
                    rules.push(Rule::new(
                        vec![Match::SAddrNotIn(*cidr)],
                        vec![Stmt::MarkOr(MASQ_MARK)],
                    ));
                }
            }
            PickKind::Local => {}
        }
        if cfg.ipvs {
            chains.insert(p.chain(), regular(rules));
            continue;
        }
        if p.affinity.is_some() {
            // A client with a live affinity entry for slot I keeps slot I's endpoint.
            for slot in 0..p.n {
                rules.push(Rule::new(
                    vec![Match::InSet {
                        key: client_frontend.clone(),
                        set: format!("{AFFINITY_PREFIX}{slot}"),
                    }],
                    vec![Stmt::Goto(slot_chain(p.local(), slot, p.affinity))],
                ));
            }
        }
        let arms = (0..p.n)
            .map(|i| slot_chain(p.local(), i, p.affinity))
            .collect();
        rules.push(Rule::new(vec![], vec![Stmt::NumgenVmap { chains: arms }]));
        chains.insert(p.chain(), regular(rules));
    }
    for (&(local, affinity), &n) in slots.iter().filter(|_| !cfg.ipvs) {
        for slot in 0..n {
            let map = if local {
                MapName::LocalBackends(slot)
            } else {
                MapName::Backends(slot)
            };
            let mut stmts = Vec::new();
            if let Some(timeout) = affinity {
                stmts.push(Stmt::Update {
                    key: client_frontend.clone(),
                    set: format!("{AFFINITY_PREFIX}{slot}"),
                    timeout,
                });
            }
            stmts.push(Stmt::Dnat {
                key: front_key.clone(),
                map: map.to_string(),
            });
            chains.insert(
                slot_chain(local, slot, affinity),
                regular(vec![Rule::new(vec![], stmts)]),
            );
        }
    }
    // Hairpin: a pod sent to its own Service and was DNATed back to itself. IPVS does its
    // DNAT without marking the conntrack entry as DNATed (`ct status dnat` stays unset), so
    // in IPVS mode the pair alone decides: a packet whose source and destination are the
    // same local endpoint reaches the node only after a Service's DNAT.
    let mut hairpin_match = vec![Match::InSet {
        key: vec![KeyExpr::SAddr, KeyExpr::DAddr],
        set: HAIRPIN.into(),
    }];
    if !cfg.ipvs {
        hairpin_match.insert(0, Match::CtStatusDnat);
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
                Rule::new(hairpin_match, vec![Stmt::Masquerade]),
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
    let mut checks = vec![Rule::new(
        vec![
            Match::CtStateNew,
            Match::InSet {
                key: front_key.clone(),
                set: NO_LOCAL_ENDPOINT_SERVICES.into(),
            },
        ],
        vec![Stmt::Drop],
    )];
    if !cfg.ipvs {
        checks.push(Rule::new(
            vec![
                Match::CtStateNew,
                Match::InSet {
                    key: vec![KeyExpr::DAddr],
                    set: CLUSTER_IPS.into(),
                },
            ],
            vec![Stmt::Reject],
        ));
    }
    for cidr in cfg
        .service_cidrs
        .iter()
        .filter(|c| !cfg.ipvs && family_of(c) == family)
    {
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
    for (map, key) in counts.shared.into_keys().map(Shared::element) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn postrouting(ipvs: bool) -> Vec<Rule> {
        let cfg = RenderConfig {
            ipvs,
            ..RenderConfig::default()
        };
        let t = skeleton(&Counts::default(), &cfg, Family::Ip);
        t.chains["nat_postrouting"].rules.clone()
    }

    fn hairpin_rule(rules: &[Rule]) -> Option<&Rule> {
        rules.iter().find(|r| {
            r.matches
                .iter()
                .any(|m| matches!(m, Match::InSet { set, .. } if set == names::HAIRPIN))
        })
    }

    #[test]
    fn hairpin_masquerade_needs_no_dnat_status_in_ipvs_mode() {
        // nftables mode: only connections nftables DNATed are hairpin.
        let nft = postrouting(false);
        let rule = hairpin_rule(&nft).expect("a hairpin rule");
        assert!(rule.matches.contains(&Match::CtStatusDnat), "{rule:?}");
        // IPVS mode: IPVS's DNAT leaves `ct status dnat` unset; the pair alone decides.
        let ipvs = postrouting(true);
        let rule = hairpin_rule(&ipvs).expect("a hairpin rule");
        assert!(!rule.matches.contains(&Match::CtStatusDnat), "{rule:?}");
        assert_eq!(rule.stmts, vec![Stmt::Masquerade]);
    }
}
