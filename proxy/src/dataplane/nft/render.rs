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
use crate::model::{DesiredState, ServiceDelta, ServicePortState};
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
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

/// What one Service port puts into the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    /// Elements: map name, key, data.
    pub elements: Vec<(MapName, Key, Data)>,
    /// Pick chains used, one per frontend with endpoints: (external?, endpoint count).
    pub picks: Vec<(bool, usize)>,
    /// Local endpoints (hairpin pairs), shared between services and so reference-counted.
    pub hairpin: Vec<IpAddr>,
}

/// A map elements go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapName {
    /// `service_ips`.
    ServiceIps,
    /// `no_endpoint_services`.
    NoEndpointServices,
    /// `hairpin`.
    Hairpin,
    /// `backends_I`.
    Backends(usize),
}

impl std::fmt::Display for MapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapName::ServiceIps => f.write_str(names::SERVICE_IPS),
            MapName::NoEndpointServices => f.write_str(names::NO_ENDPOINT_SERVICES),
            MapName::Hairpin => f.write_str(names::HAIRPIN),
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
    let n = eps.len();
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
        if n == 0 {
            c.elements
                .push((MapName::NoEndpointServices, key, Data::None));
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
    c.hairpin = eps.iter().filter(|e| e.is_local).map(|e| e.ip).collect();
    c
}

/// Reference counts of the shared parts: pick chains per (external?, N) and hairpin pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    picks: BTreeMap<(bool, usize), usize>,
    hairpin: BTreeMap<IpAddr, usize>,
}

impl Counts {
    fn add(&mut self, c: &Contribution) {
        for p in &c.picks {
            *self.picks.entry(*p).or_default() += 1;
        }
        for ip in &c.hairpin {
            *self.hairpin.entry(*ip).or_default() += 1;
        }
    }

    fn remove(&mut self, c: &Contribution) {
        for p in &c.picks {
            if let Some(v) = self.picks.get_mut(p) {
                *v -= 1;
                if *v == 0 {
                    self.picks.remove(p);
                }
            }
        }
        for ip in &c.hairpin {
            if let Some(v) = self.hairpin.get_mut(ip) {
                *v -= 1;
                if *v == 0 {
                    self.hairpin.remove(ip);
                }
            }
        }
    }
}

fn hairpin_key(ip: IpAddr) -> Key {
    Key(vec![Atom::Addr(ip), Atom::Addr(ip)])
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
    if let Some(m) = t.maps.get_mut(names::HAIRPIN) {
        m.elements = counts
            .hairpin
            .keys()
            .map(|ip| (hairpin_key(*ip), Data::None))
            .collect();
    }
    t
}

/// Incremental rendering: keeps the reference counts and the skeleton of what was last
/// applied, and turns the changed Service ports into a plan of only their elements (plus
/// the chains that come or go with them).
#[derive(Clone, Debug)]
pub struct Incremental {
    cfg: RenderConfig,
    family: Family,
    counts: Counts,
    skeleton: Table,
}

impl Incremental {
    /// The state after `state` has been applied in full.
    pub fn new(state: &DesiredState, cfg: &RenderConfig, family: Family) -> Self {
        let mut counts = Counts::default();
        for sp in state.services.values() {
            counts.add(&contribution(sp, &state.node_ips, family));
        }
        Incremental {
            skeleton: skeleton(&counts, cfg, family),
            cfg: cfg.clone(),
            family,
            counts,
        }
    }

    /// The plan for a set of changed Service ports (node addresses unchanged). Apply it,
    /// and on failure drop this state and plan in full.
    pub fn update(&mut self, deltas: &[ServiceDelta], node_ips: &[IpAddr]) -> Plan {
        let fam = self.family;
        let mut dels: BTreeMap<MapName, BTreeSet<Key>> = BTreeMap::new();
        let mut adds: BTreeMap<MapName, BTreeMap<Key, Data>> = BTreeMap::new();
        let mut hairpin_before: BTreeMap<IpAddr, bool> = BTreeMap::new();
        for d in deltas {
            let old = d
                .old
                .as_ref()
                .map(|s| contribution(s, node_ips, fam))
                .unwrap_or_default();
            let new = d
                .new
                .as_ref()
                .map(|s| contribution(s, node_ips, fam))
                .unwrap_or_default();
            for ip in old.hairpin.iter().chain(&new.hairpin) {
                hairpin_before
                    .entry(*ip)
                    .or_insert_with(|| self.counts.hairpin.contains_key(ip));
            }
            self.counts.remove(&old);
            self.counts.add(&new);
            let old_el: BTreeMap<(MapName, &Key), &Data> =
                old.elements.iter().map(|(m, k, d)| ((*m, k), d)).collect();
            let new_el: BTreeMap<(MapName, &Key), &Data> =
                new.elements.iter().map(|(m, k, d)| ((*m, k), d)).collect();
            for (m, k, d) in &old.elements {
                if new_el.get(&(*m, k)) != Some(&d) {
                    dels.entry(*m).or_default().insert(k.clone());
                }
            }
            for (m, k, d) in &new.elements {
                if old_el.get(&(*m, k)) != Some(&d) {
                    adds.entry(*m).or_default().insert(k.clone(), d.clone());
                }
            }
        }
        for (ip, was) in hairpin_before {
            let now = self.counts.hairpin.contains_key(&ip);
            if was && !now {
                dels.entry(MapName::Hairpin)
                    .or_default()
                    .insert(hairpin_key(ip));
            } else if !was && now {
                adds.entry(MapName::Hairpin)
                    .or_default()
                    .insert(hairpin_key(ip), Data::None);
            }
        }
        let next = skeleton(&self.counts, &self.cfg, fam);
        let delta = TableDelta {
            dels: dels
                .into_iter()
                .map(|(m, k)| (m.to_string(), k.into_iter().collect()))
                .collect(),
            adds: adds
                .into_iter()
                .map(|(m, e)| (m.to_string(), e.into_iter().collect()))
                .collect(),
            ..TableDelta::between_skeletons(&self.skeleton, &next)
        };
        self.skeleton = next;
        delta.into_plan(fam, false)
    }
}

/// Everything one transaction changes, before it is put in a safe order.
#[derive(Debug, Default)]
struct TableDelta {
    new_maps: Vec<(String, MapDecl)>,
    new_chains: Vec<(String, Chain)>,
    changed_chains: Vec<(String, Chain, bool)>,
    gone_chains: Vec<(String, bool)>,
    gone_maps: Vec<(String, bool)>,
    dels: Vec<(String, Vec<Key>)>,
    adds: Vec<(String, Vec<(Key, Data)>)>,
}

impl TableDelta {
    /// Structural differences between two skeletons (typed rules on both sides).
    fn between_skeletons(old: &Table, new: &Table) -> TableDelta {
        let mut d = TableDelta::default();
        for (name, m) in &new.maps {
            if !old.maps.contains_key(name) {
                d.new_maps.push((name.clone(), m.decl.clone()));
            }
        }
        for (name, m) in &old.maps {
            if !new.maps.contains_key(name) {
                d.gone_maps.push((name.clone(), m.decl.is_set()));
            }
        }
        for (name, c) in &new.chains {
            match old.chains.get(name) {
                None => d.new_chains.push((name.clone(), c.clone())),
                Some(o) if o.rules != c.rules => {
                    d.changed_chains
                        .push((name.clone(), c.clone(), !o.rules.is_empty()))
                }
                Some(_) => {}
            }
        }
        for (name, c) in &old.chains {
            if !new.chains.contains_key(name) {
                d.gone_chains.push((name.clone(), !c.rules.is_empty()));
            }
        }
        d
    }

    /// Orders the changes so every reference exists when it is made and is gone before
    /// what it points to is deleted.
    fn into_plan(self, family: Family, add_table: bool) -> Plan {
        let mut p = Plan::empty(family);
        if add_table {
            p.ops.push(Op::AddTable);
        }
        for (name, decl) in self.new_maps {
            p.ops.push(Op::AddMap { name, decl });
        }
        for (name, c) in &self.new_chains {
            p.ops.push(Op::AddChain {
                name: name.clone(),
                base: c.base,
            });
        }
        for (name, c) in self.new_chains {
            for rule in c.rules {
                p.ops.push(Op::AddRule {
                    chain: name.clone(),
                    rule,
                });
            }
        }
        for (map, keys) in self.dels {
            if !keys.is_empty() {
                p.ops.push(Op::DeleteElements { map, keys });
            }
        }
        for (map, elements) in self.adds {
            if !elements.is_empty() {
                p.ops.push(Op::AddElements { map, elements });
            }
        }
        for (name, c, had_rules) in self.changed_chains {
            if had_rules {
                p.ops.push(Op::FlushChain { name: name.clone() });
            }
            for rule in c.rules {
                p.ops.push(Op::AddRule {
                    chain: name.clone(),
                    rule,
                });
            }
        }
        for (name, had_rules) in &self.gone_chains {
            if *had_rules {
                p.ops.push(Op::FlushChain { name: name.clone() });
            }
        }
        for (name, _) in self.gone_chains {
            p.ops.push(Op::DeleteChain { name });
        }
        for (name, is_set) in self.gone_maps {
            p.ops.push(Op::DeleteMap { name, is_set });
        }
        p
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
    plan_owned(desired.clone(), realized)
}

/// [`plan`], consuming the desired table so its elements move into the plan (a full sync at
/// scale then holds them once, not twice).
pub fn plan_owned(mut desired: Table, realized: &DumpedTable) -> Plan {
    let fam = desired.family;
    let incompatible = realized.maps.iter().any(|(name, m)| {
        desired
            .maps
            .get(name)
            .is_some_and(|w| w.decl.to_nft(fam) != m.decl || w.decl.is_set() != m.is_set)
    }) || realized.chains.iter().any(|(name, c)| {
        desired
            .chains
            .get(name)
            .is_some_and(|w| w.base.map(|b| b.to_string()) != c.header)
    });
    let empty = DumpedTable::empty(fam);
    let realized = if incompatible { &empty } else { realized };
    let mut d = TableDelta::default();
    for (name, m) in &mut desired.maps {
        let elements = std::mem::take(&mut m.elements);
        match realized.maps.get(name) {
            None => {
                d.new_maps.push((name.clone(), m.decl.clone()));
                d.adds.push((name.clone(), elements.into_iter().collect()));
            }
            Some(have) => {
                let dels = have
                    .elements
                    .iter()
                    .filter(|(k, v)| elements.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .collect();
                d.dels.push((name.clone(), dels));
                let adds = elements
                    .into_iter()
                    .filter(|(k, v)| have.elements.get(k) != Some(v))
                    .collect();
                d.adds.push((name.clone(), adds));
            }
        }
    }
    for (name, c) in &desired.chains {
        match realized.chains.get(name) {
            None => d.new_chains.push((name.clone(), c.clone())),
            Some(have) => {
                let want: Vec<String> = c.rules.iter().map(|r| r.to_nft(fam)).collect();
                if want != have.rules {
                    d.changed_chains
                        .push((name.clone(), c.clone(), !have.rules.is_empty()));
                }
            }
        }
    }
    for (name, c) in &realized.chains {
        if !desired.chains.contains_key(name) {
            d.gone_chains.push((name.clone(), !c.rules.is_empty()));
        }
    }
    for (name, m) in &realized.maps {
        if !desired.maps.contains_key(name) {
            d.gone_maps.push((name.clone(), m.is_set));
        }
    }
    let mut p = d.into_plan(fam, true);
    if incompatible {
        p.ops.splice(0..0, [Op::AddTable, Op::DeleteTable]);
    } else if p.ops == [Op::AddTable] && !realized.chains.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nft::fake::FakeNft;
    use crate::model::{Endpoint, ObjectKey, Protocol, ServiceInfo, ServicePortName};
    use proptest::prelude::*;

    fn cfg() -> RenderConfig {
        RenderConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            masquerade_all: false,
        }
    }

    /// Service `i` of a generated state: unique cluster IP and NodePort; endpoints from a
    /// shared pool so hairpin pairs are shared between services.
    fn service(i: u8, proto: u8, nodeport: bool, eps: &[(u8, bool)]) -> ServicePortState {
        let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][usize::from(proto % 3)];
        let name = ServicePortName {
            namespace: "ns".into(),
            name: format!("s{i}"),
            port: String::new(),
            protocol,
        };
        let mut endpoints: Vec<Endpoint> = eps
            .iter()
            .map(|(e, local)| Endpoint {
                ip: IpAddr::from([10, 244, 1, e % 6 + 10]),
                port: 8080,
                is_local: *local || e % 2 == 0,
            })
            .collect();
        endpoints.sort();
        endpoints.dedup_by_key(|e| e.ip);
        ServicePortState {
            info: ServiceInfo {
                name,
                cluster_ips: vec![IpAddr::from([10, 96, 0, i + 1])],
                port: 80,
                node_port: nodeport.then_some(30000 + u16::from(i)),
            },
            endpoints,
        }
    }

    type Spec = Vec<Option<(u8, bool, Vec<(u8, bool)>)>>;

    fn state(spec: &Spec) -> DesiredState {
        DesiredState {
            services: spec
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    s.as_ref()
                        .map(|(p, np, eps)| service(i as u8, *p, *np, eps))
                })
                .map(|sp| (sp.info.name.clone(), sp))
                .collect(),
            node_ips: vec![IpAddr::from([192, 168, 77, 10])],
            ..DesiredState::default()
        }
    }

    fn spec_strategy() -> impl Strategy<Value = Spec> {
        prop::collection::vec(
            prop::option::of((
                0u8..3,
                any::<bool>(),
                prop::collection::vec((0u8..6, any::<bool>()), 0..5),
            )),
            6,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Incremental plans, applied one after another to the fake (which rejects what the
        /// kernel rejects), always leave exactly the table a full render gives; re-planning
        /// after a full apply is empty; rendering is deterministic.
        #[test]
        fn incremental_updates_match_a_full_render(specs in prop::collection::vec(spec_strategy(), 2..5)) {
            let family = Family::Ip;
            let mut current = state(&specs[0]);
            let full = desired_table(&current, &cfg(), family);
            prop_assert_eq!(&full, &desired_table(&current, &cfg(), family));
            let mut fake = FakeNft::default();
            fake.apply(&plan(&full, &DumpedTable::empty(family))).unwrap();
            prop_assert!(plan(&full, &fake.dump(family).unwrap()).is_empty());
            let mut inc = Incremental::new(&current, &cfg(), family);
            for spec in &specs[1..] {
                let next = state(spec);
                let mut deltas = Vec::new();
                for i in 0..spec.len() {
                    let key = ObjectKey::new("ns", format!("s{i}"));
                    let ports: Vec<ServicePortState> = next
                        .services
                        .values()
                        .filter(|s| s.info.name.name == key.name)
                        .cloned()
                        .collect();
                    deltas.extend(current.replace_service(&key, ports).0);
                }
                prop_assert_eq!(&current, &next);
                let p = inc.update(&deltas, &current.node_ips);
                fake.apply(&p).map_err(|e| TestCaseError::fail(format!("{e}\n{}", p.to_script())))?;
                let want = desired_table(&next, &cfg(), family);
                prop_assert_eq!(fake.dump(family).unwrap().to_text(), want.to_dump().to_text());
            }
        }
    }

    #[test]
    fn removing_one_endpoint_sends_only_that_service_s_elements() {
        let family = Family::Ip;
        let spec: Spec = (0..6)
            .map(|_| Some((0, true, vec![(0, false), (1, false), (2, true)])))
            .collect();
        let mut current = state(&spec);
        let mut inc = Incremental::new(&current, &cfg(), family);
        let mut smaller = spec.clone();
        smaller[3] = Some((0, true, vec![(0, false), (1, false)]));
        let next = state(&smaller);
        let key = ObjectKey::new("ns", "s3");
        let ports = next
            .services
            .values()
            .filter(|s| s.info.name.name == "s3")
            .cloned()
            .collect();
        let (deltas, _) = current.replace_service(&key, ports);
        let p = inc.update(&deltas, &current.node_ips);
        // ClusterIP and NodePort frontends: goto changes (2 deletes + 2 adds) and slot 2
        // goes away (2 deletes); no other service is touched.
        assert_eq!(p.element_changes(), 6, "{}", p.to_script());
        assert!(!p.to_script().contains("10.96.0.3 "), "{}", p.to_script());
    }
}
