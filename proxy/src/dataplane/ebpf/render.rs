//! [`render`]: a [`DesiredState`] -> the contents the services and backends maps should
//! hold (pure); [`diff`]: current contents -> desired contents as a [`MapPlan`] that touches
//! only the keys that change, in an order that never leaves a frontend pointing at a
//! missing slot.

use crate::model::{
    DesiredState, Endpoint, Protocol, ServiceDelta, ServicePortName, ServicePortState,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use weir_ebpf_common::{
    AddrPort, Backend, BackendKey, ServiceKey, ServiceValue, SourceRange, BACKEND_REMOTE,
    FAMILY_V4, FAMILY_V6, FLAG_DROP, FLAG_EXTERNAL_LOCAL, FLAG_MAGLEV, FLAG_NODE_LOCAL,
    FLAG_SOURCE_RANGES, MAGLEV_TABLE_SIZE, PROTO_TCP, PROTO_UDP, SOCKET_VIEW,
    SOURCE_RANGE_FRONTEND_BITS,
};

/// `--ebpf-lb-algorithm`: how a frontend's backend is picked for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    /// A random slot per new connection (socket hooks) or flow (tc path).
    #[default]
    Random,
    /// Maglev consistent hashing of the packet's 5-tuple on the tc path: the same flow
    /// lands on the same backend even without connection-tracking state, and removing a
    /// backend moves few other flows. The socket hooks (no source port before connect)
    /// still pick at random.
    Maglev,
}

/// What the services and backends maps hold (or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// Frontend -> slot count.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// (frontend, slot) -> backend.
    pub backends: BTreeMap<BackendKey, Backend>,
    /// (frontend, Maglev table index) -> slot, for frontends with [`FLAG_MAGLEV`].
    pub maglev: BTreeMap<BackendKey, u32>,
    /// The source ranges map's entries (prefix length, frontend and source prefix), for
    /// frontends with [`FLAG_SOURCE_RANGES`].
    pub source_ranges: BTreeSet<(u32, SourceRange)>,
}

impl MapContents {
    /// Entries in all maps.
    pub fn len(&self) -> usize {
        self.services.len() + self.backends.len() + self.maglev.len() + self.source_ranges.len()
    }

    /// Whether both maps are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The maps as text, one entry a line in key order (golden files, debugging):
    /// `service FRONTEND/PROTO count=N flags=.. affinity=S snat=ADDR`,
    /// `backend FRONTEND/PROTO #SLOT ADDR:PORT [remote]`,
    /// `source-range FRONTEND/PROTO PREFIX/LEN`, and the number of Maglev entries.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let frontend = |k: &ServiceKey| {
            let proto = match k.proto & !SOCKET_VIEW {
                PROTO_TCP => "tcp",
                PROTO_UDP => "udp",
                _ => "?",
            };
            // The cluster-wide view a node's own sockets get of an ETP-Local frontend.
            let view = if k.proto & SOCKET_VIEW != 0 {
                " socket-view"
            } else {
                ""
            };
            format!("{}/{proto}{view}", socket_addr(k))
        };
        let mut out = String::new();
        for (k, v) in &self.services {
            let snat = if v.snat == [0; 4] {
                "-".to_owned()
            } else {
                socket_addr(&AddrPort {
                    addr: v.snat,
                    family: k.family,
                    ..AddrPort::default()
                })
                .ip()
                .to_string()
            };
            let _ = writeln!(
                out,
                "service {} count={} flags={:#x} affinity={} snat={snat}",
                frontend(k),
                v.count,
                v.flags,
                v.affinity_timeout
            );
        }
        for (k, b) in &self.backends {
            let remote = if b.proto == BACKEND_REMOTE {
                " remote"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "backend {} #{} {}{remote}",
                frontend(&k.service),
                k.slot,
                socket_addr(b)
            );
        }
        for (len, r) in &self.source_ranges {
            let bits = len.saturating_sub(SOURCE_RANGE_FRONTEND_BITS);
            let prefix = socket_addr(&AddrPort {
                addr: r.source,
                family: r.frontend.family,
                ..AddrPort::default()
            })
            .ip();
            let _ = writeln!(
                out,
                "source-range {} {prefix}/{bits}",
                frontend(&r.frontend)
            );
        }
        if !self.maglev.is_empty() {
            let _ = writeln!(out, "maglev entries {}", self.maglev.len());
        }
        out
    }

    /// Applies a plan's writes, as the maps would.
    pub fn apply(&mut self, plan: &MapPlan) {
        for op in &plan.ops {
            match op {
                MapOp::UpsertBackend(k, v) => {
                    self.backends.insert(*k, *v);
                }
                MapOp::UpsertService(k, v) => {
                    self.services.insert(*k, *v);
                }
                MapOp::DeleteService(k) => {
                    self.services.remove(k);
                }
                MapOp::DeleteBackend(k) => {
                    self.backends.remove(k);
                }
                MapOp::UpsertMaglev(k, v) => {
                    self.maglev.insert(*k, *v);
                }
                MapOp::DeleteMaglev(k) => {
                    self.maglev.remove(k);
                }
                MapOp::InsertSourceRange(len, k) => {
                    self.source_ranges.insert((*len, *k));
                }
                MapOp::DeleteSourceRange(len, k) => {
                    self.source_ranges.remove(&(*len, *k));
                }
            }
        }
    }
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or replace a backend slot.
    UpsertBackend(BackendKey, Backend),
    /// Insert or replace a frontend.
    UpsertService(ServiceKey, ServiceValue),
    /// Delete a frontend.
    DeleteService(ServiceKey),
    /// Delete a backend slot.
    DeleteBackend(BackendKey),
    /// Insert or replace a Maglev table entry.
    UpsertMaglev(BackendKey, u32),
    /// Delete a Maglev table entry.
    DeleteMaglev(BackendKey),
    /// Insert an allowed source prefix of a frontend (prefix length, key data).
    InsertSourceRange(u32, SourceRange),
    /// Delete an allowed source prefix of a frontend.
    DeleteSourceRange(u32, SourceRange),
}

/// Map writes, in the order they must be applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPlan {
    /// The writes.
    pub ops: Vec<MapOp>,
}

impl MapPlan {
    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// An address and port as the maps hold them (network byte order, see
/// `weir-ebpf-common`).
pub fn addr_port(ip: IpAddr, port: u16, proto: u8) -> AddrPort {
    let (addr, family) = match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    };
    AddrPort {
        addr,
        port: u16::from_ne_bytes(port.to_be_bytes()),
        family,
        proto,
    }
}

/// The address and port an [`AddrPort`] holds (for logs and tests).
pub fn socket_addr(a: &AddrPort) -> std::net::SocketAddr {
    let port = u16::from_be_bytes(a.port.to_ne_bytes());
    let ip: IpAddr = if a.family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in a.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o.into()
    } else {
        a.addr[0].to_ne_bytes().into()
    };
    std::net::SocketAddr::new(ip, port)
}

/// The maps' contents with random backend selection (see [`render_with`]).
pub fn render(desired: &DesiredState) -> MapContents {
    render_with(desired, LbAlgorithm::Random)
}

/// The maps' contents for every TCP and UDP Service port (see [`render_port`]).
pub fn render_with(desired: &DesiredState, algorithm: LbAlgorithm) -> MapContents {
    let mut out = MapContents::default();
    for sp in desired.services.values() {
        render_port(sp, &desired.node_ips, algorithm, &mut out);
    }
    out
}

/// Adds one Service port's frontends to `out`, one frontend per address:
/// - each cluster IP, whose slots are the endpoints of that IP's family in slot order
///   (`internalTrafficPolicy: Local` uses only this node's);
/// - the NodePort on each of the node's addresses `node_ips` ([`FLAG_NODE_LOCAL`]), each
///   external IP and each load-balancer IP, whose slots are the endpoints for external
///   traffic (`externalTrafficPolicy: Local` uses only this node's). A load-balancer IP of
///   a Service with `loadBalancerSourceRanges` carries [`FLAG_SOURCE_RANGES`] and its
///   [`ServiceInfo::allowed_lb_sources`] in the source ranges map.
///
/// External frontends masquerade flows to remote endpoints ([`BACKEND_REMOTE`]) to the
/// node's address of their family (`snat`) unless the external traffic policy is Local.
/// A frontend without endpoints has `count` 0 (refused); with endpoints elsewhere but none
/// usable here it also carries [`FLAG_DROP`]. `affinity_timeout` is the ClientIP affinity
/// timeout. With [`LbAlgorithm::Maglev`] each frontend with endpoints carries
/// [`FLAG_MAGLEV`] and its [`maglev_table`]. An external frontend of an
/// `externalTrafficPolicy: Local` port carries [`FLAG_EXTERNAL_LOCAL`] and has a
/// [`socket_view`] twin whose slots are all the port's endpoints: the socket hooks serve
/// the node's own processes and pods, which (as in nftables mode and kube-proxy) use every
/// endpoint. SCTP ports are left out (the programs do not handle SCTP yet).
///
/// The result depends only on the port's state, `node_ips` and `algorithm`, so a sync can
/// re-render just the ports that changed.
pub fn render_port(
    sp: &ServicePortState,
    node_ips: &[IpAddr],
    algorithm: LbAlgorithm,
    out: &mut MapContents,
) {
    let proto = match sp.info.name.protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Sctp => return,
    };
    let info = &sp.info;
    let internal: &[Endpoint] = if info.internal_local {
        &sp.local_endpoints
    } else {
        &sp.endpoints
    };
    let external: &[Endpoint] = if info.external_local {
        &sp.local_endpoints
    } else {
        &sp.endpoints
    };
    // External traffic to remote endpoints is masqueraded to the node's address of the
    // frontend's family (ETP Cluster); ClusterIP traffic from outside keeps its source.
    let masq = !info.external_local;
    let ext_flags = if info.external_local {
        FLAG_EXTERNAL_LOCAL
    } else {
        0
    };
    let mut frontends: Vec<(AddrPort, &[Endpoint], u32, bool)> = info
        .cluster_ips
        .iter()
        .map(|ip| (addr_port(*ip, info.port, proto), internal, 0, false))
        .collect();
    let mut external_keys = Vec::new();
    if let Some(np) = info.node_port {
        for ip in node_ips {
            external_keys.push((addr_port(*ip, np, proto), FLAG_NODE_LOCAL | ext_flags));
        }
    }
    for ip in &info.external_ips {
        external_keys.push((addr_port(*ip, info.port, proto), ext_flags));
    }
    let firewalled = if info.source_ranges.is_empty() {
        0
    } else {
        FLAG_SOURCE_RANGES
    };
    for ip in &info.load_balancer_ips {
        external_keys.push((addr_port(*ip, info.port, proto), ext_flags | firewalled));
    }
    for (key, flags) in external_keys {
        frontends.push((key, external, flags, masq));
        if info.external_local {
            frontends.push((socket_view(key), &sp.endpoints, 0, false));
        }
    }
    for (key, eps, flags, masq) in frontends {
        let v4 = key.family == FAMILY_V4;
        let snat = if masq {
            snat_address(node_ips, v4)
        } else {
            [0; 4]
        };
        if flags & FLAG_SOURCE_RANGES != 0 {
            for source in info.allowed_lb_sources(node_ips, v4) {
                let entry = SourceRange {
                    frontend: key,
                    source: addr_port(source.network(), 0, 0).addr,
                };
                let len = SOURCE_RANGE_FRONTEND_BITS + u32::from(source.prefix());
                out.source_ranges.insert((len, entry));
            }
        }
        let eps: Vec<&Endpoint> = eps.iter().filter(|e| e.ip.is_ipv4() == v4).collect();
        for (slot, e) in (0u32..).zip(&eps) {
            let remote = if snat != [0; 4] && !e.is_local {
                BACKEND_REMOTE
            } else {
                0
            };
            out.backends.insert(
                BackendKey { service: key, slot },
                addr_port(e.ip, e.port, remote),
            );
        }
        let count = eps.len() as u32;
        let mut flags = flags;
        if count == 0 && sp.has_endpoints_for(&socket_addr(&key).ip()) {
            flags |= FLAG_DROP;
        }
        // The socket view is only ever used by the socket hooks, which pick at random.
        if algorithm == LbAlgorithm::Maglev && count > 0 && key.proto & SOCKET_VIEW == 0 {
            flags |= FLAG_MAGLEV;
            let names: Vec<String> = eps.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect();
            for (index, slot) in (0u32..).zip(maglev_table(&names, MAGLEV_TABLE_SIZE)) {
                out.maglev.insert(
                    BackendKey {
                        service: key,
                        slot: index,
                    },
                    slot,
                );
            }
        }
        out.services.insert(
            key,
            ServiceValue {
                count,
                flags,
                affinity_timeout: info.affinity_timeout.unwrap_or(0),
                snat,
            },
        );
    }
}

/// The node's first address of the IPv4 (`v4`) or IPv6 family as the maps hold it (all
/// zero when the node has none): the source of masqueraded flows to remote backends.
fn snat_address(node_ips: &[IpAddr], v4: bool) -> [u32; 4] {
    node_ips
        .iter()
        .find(|n| n.is_ipv4() == v4)
        .map(|n| addr_port(*n, 0, 0).addr)
        .unwrap_or_default()
}

/// The key of an external frontend's twin that the socket hooks use (see [`render_port`]):
/// the same address and port with [`SOCKET_VIEW`] set in `proto`, a value no packet has.
pub fn socket_view(key: ServiceKey) -> ServiceKey {
    ServiceKey {
        proto: key.proto | SOCKET_VIEW,
        ..key
    }
}

/// The writes for the Service ports that changed in `deltas` (the desired state was
/// already updated), with `current` (what the maps hold) updated to match: only those
/// ports are re-rendered, before and after, and only the keys whose values differ are
/// written. Their frontends are owned by one port at a time, so rendering the old and new
/// states of all changed ports together and diffing them is exact even when a frontend
/// moves from one port to another.
pub fn update_ports(
    current: &mut MapContents,
    deltas: &[ServiceDelta],
    node_ips: &[IpAddr],
    algorithm: LbAlgorithm,
) -> MapPlan {
    // A port changed twice counts once: its first old state to its last new state.
    let mut changed: BTreeMap<
        &ServicePortName,
        (Option<&ServicePortState>, Option<&ServicePortState>),
    > = BTreeMap::new();
    for d in deltas {
        changed.entry(&d.name).or_insert((d.old.as_ref(), None)).1 = d.new.as_ref();
    }
    let mut before = MapContents::default();
    let mut after = MapContents::default();
    for (old, new) in changed.into_values() {
        if let Some(old) = old {
            render_port(old, node_ips, algorithm, &mut before);
        }
        if let Some(new) = new {
            render_port(new, node_ips, algorithm, &mut after);
        }
    }
    let plan = diff(&before, &after);
    current.apply(&plan);
    plan
}

/// 64-bit FNV-1a of `bytes` after `seed` (stable across builds and runs, unlike std's
/// hasher).
fn fnv1a(seed: u8, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(&seed).chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Maglev's lookup table (Eisenbud et al., NSDI 2016) of `size` entries (a prime) over
/// `backends` (their names, e.g. `ip:port`): entry -> index into `backends`. Each backend
/// fills its own permutation of the table in turn, so every backend owns `size / n`
/// entries give or take one, and a backend's permutation depends only on its name, so
/// removing one backend moves few entries of the others. Empty without backends.
pub fn maglev_table(backends: &[String], size: u32) -> Vec<u32> {
    let n = backends.len();
    let m = u64::from(size);
    if n == 0 || m < 2 {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let offset = fnv1a(0x5a, b.as_bytes()) % m;
            let skip = fnv1a(0xa5, b.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == table.len() {
                return table;
            }
        }
    }
}

/// The writes that turn `current` into `desired`, touching only changed keys: new and
/// changed backend slots, Maglev entries and allowed source prefixes first, then frontends
/// (so a grown count never points at a missing slot, and a newly firewalled frontend
/// already finds its prefixes), then deleted frontends, then deleted Maglev entries,
/// source prefixes and slots (a shrunk count stops using them first; a Maglev entry past
/// the count is taken modulo the count by the programs).
pub fn diff(current: &MapContents, desired: &MapContents) -> MapPlan {
    let mut ops = Vec::new();
    for (k, v) in &desired.backends {
        if current.backends.get(k) != Some(v) {
            ops.push(MapOp::UpsertBackend(*k, *v));
        }
    }
    for (k, v) in &desired.maglev {
        if current.maglev.get(k) != Some(v) {
            ops.push(MapOp::UpsertMaglev(*k, *v));
        }
    }
    for (len, k) in desired.source_ranges.difference(&current.source_ranges) {
        ops.push(MapOp::InsertSourceRange(*len, *k));
    }
    for (k, v) in &desired.services {
        if current.services.get(k) != Some(v) {
            ops.push(MapOp::UpsertService(*k, *v));
        }
    }
    for k in current.services.keys() {
        if !desired.services.contains_key(k) {
            ops.push(MapOp::DeleteService(*k));
        }
    }
    for k in current.maglev.keys() {
        if !desired.maglev.contains_key(k) {
            ops.push(MapOp::DeleteMaglev(*k));
        }
    }
    for (len, k) in current.source_ranges.difference(&desired.source_ranges) {
        ops.push(MapOp::DeleteSourceRange(*len, *k));
    }
    for k in current.backends.keys() {
        if !desired.backends.contains_key(k) {
            ops.push(MapOp::DeleteBackend(*k));
        }
    }
    MapPlan { ops }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ebpf::fake::FakeMaps;
    use crate::dataplane::ebpf::MapStore;
    use crate::model::ServiceInfo;

    fn name(n: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: "d".into(),
            name: n.into(),
            port: String::new(),
            protocol,
        }
    }

    fn ep(ip: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            is_local: true,
        }
    }

    fn state(services: &[(&str, &[&str], Protocol, &[&str])]) -> DesiredState {
        let mut d = DesiredState::default();
        for (n, ips, proto, eps) in services {
            let info = ServiceInfo::new(
                name(n, *proto),
                ips.iter().map(|i| i.parse().unwrap()).collect(),
                80,
            );
            let sp = ServicePortState::from_endpoints(info, eps.iter().map(|e| ep(e)).collect());
            d.services.insert(name(n, *proto), sp);
        }
        d
    }

    fn frontend(ip: &str, proto: u8) -> ServiceKey {
        addr_port(ip.parse().unwrap(), 80, proto)
    }

    fn apply(fake: &mut FakeMaps, d: &DesiredState) -> MapPlan {
        let plan = diff(&fake.dump().unwrap(), &render(d));
        fake.apply(&plan).unwrap();
        plan
    }

    #[test]
    fn addresses_and_ports_are_kept_in_network_byte_order() {
        let a = addr_port("10.96.0.10".parse().unwrap(), 80, PROTO_TCP);
        assert_eq!(a.addr[0].to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(a.port.to_ne_bytes(), [0, 80]);
        assert_eq!(socket_addr(&a), "10.96.0.10:80".parse().unwrap());
        let b = addr_port("fd00:10:96::a".parse().unwrap(), 53, PROTO_UDP);
        assert_eq!(b.family, FAMILY_V6);
        assert_eq!(socket_addr(&b), "[fd00:10:96::a]:53".parse().unwrap());
    }

    #[test]
    fn each_cluster_ip_gets_the_endpoints_of_its_family_in_slot_order() {
        let d = state(&[(
            "web",
            &["10.96.0.10", "fd00:10:96::10"],
            Protocol::Tcp,
            &["10.244.1.1", "fd00:10:244::1", "10.244.1.2"],
        )]);
        let m = render(&d);
        let v4 = frontend("10.96.0.10", PROTO_TCP);
        let v6 = frontend("fd00:10:96::10", PROTO_TCP);
        assert_eq!(m.services[&v4].count, 2);
        assert_eq!(m.services[&v6].count, 1);
        let slot = |service, slot| socket_addr(&m.backends[&BackendKey { service, slot }]);
        assert_eq!(slot(v4, 0), "10.244.1.1:8080".parse().unwrap());
        assert_eq!(slot(v4, 1), "10.244.1.2:8080".parse().unwrap());
        assert_eq!(slot(v6, 0), "[fd00:10:244::1]:8080".parse().unwrap());
        assert_eq!(m.backends.len(), 3);
    }

    #[test]
    fn a_service_without_endpoints_has_a_frontend_with_no_slots_and_sctp_is_left_out() {
        let d = state(&[
            ("empty", &["10.96.0.11"], Protocol::Udp, &[]),
            ("sctp", &["10.96.0.12"], Protocol::Sctp, &["10.244.1.1"]),
        ]);
        let m = render(&d);
        assert_eq!(m.services.len(), 1);
        assert_eq!(
            m.services[&frontend("10.96.0.11", PROTO_UDP)],
            ServiceValue {
                count: 0,
                flags: 0,
                affinity_timeout: 0,
                snat: [0; 4]
            }
        );
        assert!(m.backends.is_empty());
    }

    #[test]
    fn re_rendering_after_apply_changes_nothing() {
        let mut fake = FakeMaps::default();
        let d = state(&[
            (
                "a",
                &["10.96.0.1"],
                Protocol::Tcp,
                &["10.244.1.1", "10.244.1.2"],
            ),
            ("b", &["10.96.0.2"], Protocol::Udp, &["10.244.1.3"]),
        ]);
        let first = apply(&mut fake, &d);
        assert_eq!(first.ops.len(), 5);
        assert_eq!(fake.contents(), render(&d));
        assert!(diff(&fake.dump().unwrap(), &render(&d)).is_empty());
    }

    #[test]
    fn removing_an_endpoint_writes_only_the_changed_keys_in_a_safe_order() {
        let mut fake = FakeMaps::default();
        let eps = ["10.244.1.1", "10.244.1.2", "10.244.1.3"];
        apply(
            &mut fake,
            &state(&[("a", &["10.96.0.1"], Protocol::Tcp, &eps)]),
        );
        apply(
            &mut fake,
            &state(&[("z", &["10.96.0.9"], Protocol::Tcp, &eps)]),
        );
        let writes = fake.writes();
        // The model keeps slots sticky: 10.244.1.3 moves into the removed endpoint's slot.
        let d = state(&[(
            "z",
            &["10.96.0.9"],
            Protocol::Tcp,
            &["10.244.1.1", "10.244.1.3"],
        )]);
        let plan = apply(&mut fake, &d);
        let z = frontend("10.96.0.9", PROTO_TCP);
        assert_eq!(
            plan.ops,
            vec![
                MapOp::UpsertBackend(
                    BackendKey {
                        service: z,
                        slot: 1
                    },
                    addr_port("10.244.1.3".parse().unwrap(), 8080, 0)
                ),
                MapOp::UpsertService(
                    z,
                    ServiceValue {
                        count: 2,
                        flags: 0,
                        affinity_timeout: 0,
                        snat: [0; 4]
                    }
                ),
                MapOp::DeleteBackend(BackendKey {
                    service: z,
                    slot: 2
                }),
            ]
        );
        assert_eq!(fake.writes() - writes, 3);
        assert_eq!(fake.contents(), render(&d));
    }

    #[test]
    fn the_fake_rejects_what_a_bpf_hash_map_rejects() {
        let mut fake = FakeMaps::with_capacity(1, 2);
        let d = state(&[
            ("a", &["10.96.0.1"], Protocol::Tcp, &["10.244.1.1"]),
            ("b", &["10.96.0.2"], Protocol::Tcp, &["10.244.1.2"]),
        ]);
        let e = fake
            .apply(&diff(&MapContents::default(), &render(&d)))
            .unwrap_err();
        assert!(e.to_string().contains("E2BIG"), "{e}");
        let e = fake
            .apply(&MapPlan {
                ops: vec![MapOp::DeleteService(frontend("10.96.0.7", PROTO_TCP))],
            })
            .unwrap_err();
        assert!(e.to_string().contains("ENOENT"), "{e}");
        // Replacing an existing key in a full map is fine.
        let mut fake = FakeMaps::with_capacity(1, 1);
        let one = state(&[("a", &["10.96.0.1"], Protocol::Tcp, &["10.244.1.1"])]);
        apply(&mut fake, &one);
        let moved = state(&[("a", &["10.96.0.1"], Protocol::Tcp, &["10.244.1.9"])]);
        apply(&mut fake, &moved);
        assert_eq!(fake.contents(), render(&moved));
    }

    #[test]
    fn a_half_applied_plan_is_repaired_by_diffing_against_what_the_maps_hold() {
        let mut fake = FakeMaps::default();
        let d = state(&[(
            "a",
            &["10.96.0.1"],
            Protocol::Tcp,
            &["10.244.1.1", "10.244.1.2"],
        )]);
        fake.fail_next_apply();
        assert!(fake
            .apply(&diff(&MapContents::default(), &render(&d)))
            .is_err());
        assert_eq!(fake.contents().len(), 1, "one write went through");
        apply(&mut fake, &d);
        assert_eq!(fake.contents(), render(&d));
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.1.{i}:8080")).collect()
    }

    #[test]
    fn maglev_gives_every_backend_an_equal_share_of_the_table() {
        for n in [1, 3, 10, 37] {
            let t = maglev_table(&names(n), MAGLEV_TABLE_SIZE);
            assert_eq!(t.len(), MAGLEV_TABLE_SIZE as usize);
            let mut counts = vec![0u32; n];
            for e in &t {
                counts[*e as usize] += 1;
            }
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {counts:?}");
        }
        assert_eq!(
            maglev_table(&names(5), 13),
            maglev_table(&names(5), 13),
            "deterministic"
        );
        assert!(maglev_table(&[], 13).is_empty());
    }

    #[test]
    fn removing_a_maglev_backend_moves_few_entries_of_the_others() {
        let before_names = names(10);
        let before = maglev_table(&before_names, MAGLEV_TABLE_SIZE);
        let mut after_names = before_names.clone();
        after_names.remove(3);
        let after = maglev_table(&after_names, MAGLEV_TABLE_SIZE);
        let (mut moved, mut kept) = (0, 0);
        for (b, a) in before.iter().zip(&after) {
            let b = &before_names[*b as usize];
            if b == &before_names[3] {
                continue;
            }
            if &after_names[*a as usize] == b {
                kept += 1;
            } else {
                moved += 1;
            }
        }
        let share = moved as f64 / (moved + kept) as f64;
        assert!(
            share < 0.05,
            "{moved} of {} others' entries moved",
            moved + kept
        );
    }

    #[test]
    fn external_frontends_nodeports_affinity_and_maglev_are_rendered() {
        let mut d = DesiredState {
            node_ips: vec!["192.168.77.10".parse().unwrap()],
            ..DesiredState::default()
        };
        let mut info = ServiceInfo::new(
            name("web", Protocol::Tcp),
            vec!["10.96.0.10".parse().unwrap()],
            80,
        );
        info.node_port = Some(30080);
        info.external_ips = vec!["192.0.2.90".parse().unwrap()];
        info.load_balancer_ips = vec!["192.0.2.80".parse().unwrap()];
        info.external_local = true;
        info.affinity_timeout = Some(30);
        let mut remote = ep("10.244.1.2");
        remote.is_local = false;
        let sp = ServicePortState::from_endpoints(info, vec![ep("10.244.1.1"), remote]);
        d.services.insert(name("web", Protocol::Tcp), sp);
        let m = render_with(&d, LbAlgorithm::Random);
        let np = addr_port("192.168.77.10".parse().unwrap(), 30080, PROTO_TCP);
        assert_eq!(
            m.services[&np],
            ServiceValue {
                count: 1,
                flags: FLAG_NODE_LOCAL | FLAG_EXTERNAL_LOCAL,
                affinity_timeout: 30,
                snat: [0; 4]
            },
            "ETP Local: only the local endpoint"
        );
        assert_eq!(m.services[&frontend("10.96.0.10", PROTO_TCP)].count, 2);
        assert_eq!(m.services[&frontend("192.0.2.90", PROTO_TCP)].count, 1);
        assert_eq!(m.services[&frontend("192.0.2.80", PROTO_TCP)].count, 1);
        assert!(m.maglev.is_empty());
        let m = render_with(&d, LbAlgorithm::Maglev);
        assert_eq!(
            m.services[&np].flags,
            FLAG_NODE_LOCAL | FLAG_EXTERNAL_LOCAL | FLAG_MAGLEV
        );
        assert_eq!(m.maglev.len(), 4 * MAGLEV_TABLE_SIZE as usize);
        let mut fake = FakeMaps::default();
        fake.apply(&diff(&MapContents::default(), &m)).unwrap();
        assert_eq!(fake.contents(), m);
        // Source ranges: the load-balancer IP is firewalled, with its allowed prefixes;
        // the external IP is not.
        let sp = d.services.values_mut().next().unwrap();
        let mut info = (*sp.info).clone();
        info.source_ranges = vec![
            "198.51.100.7/24".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ];
        sp.info = std::sync::Arc::new(info);
        let m = render_with(&d, LbAlgorithm::Random);
        let lb = frontend("192.0.2.80", PROTO_TCP);
        assert_eq!(
            m.services[&lb].flags,
            FLAG_EXTERNAL_LOCAL | FLAG_SOURCE_RANGES
        );
        assert_eq!(
            m.services[&frontend("192.0.2.90", PROTO_TCP)].flags,
            FLAG_EXTERNAL_LOCAL
        );
        let net = addr_port("198.51.100.0".parse().unwrap(), 0, 0).addr;
        assert_eq!(
            m.source_ranges.iter().collect::<Vec<_>>(),
            [&(
                SOURCE_RANGE_FRONTEND_BITS + 24,
                SourceRange {
                    frontend: lb,
                    source: net
                }
            )],
            "the IPv4 range, host bits cleared"
        );
        let mut fake = FakeMaps::default();
        fake.apply(&diff(&MapContents::default(), &m)).unwrap();
        assert_eq!(fake.contents(), m);
        // Ranges gone: the prefixes are deleted after the frontend stops using them.
        let sp = d.services.values_mut().next().unwrap();
        let mut info = (*sp.info).clone();
        info.source_ranges.clear();
        sp.info = std::sync::Arc::new(info);
        let plan = diff(&fake.contents(), &render_with(&d, LbAlgorithm::Random));
        assert!(matches!(
            plan.ops.as_slice(),
            [MapOp::UpsertService(..), MapOp::DeleteSourceRange(..)]
        ));
        fake.apply(&plan).unwrap();
        assert!(fake.contents().source_ranges.is_empty());
    }

    #[test]
    fn the_source_ranges_trie_refuses_a_prefix_longer_than_its_key() {
        // Every kept prefix fits the trie's key.
        let mut fake = FakeMaps::default();
        let e = fake
            .apply(&MapPlan {
                ops: vec![MapOp::InsertSourceRange(
                    weir_ebpf_common::SOURCE_RANGE_BITS + 1,
                    SourceRange::default(),
                )],
            })
            .unwrap_err();
        assert!(e.to_string().contains("EINVAL"), "{e}");
    }

    /// One Service `svc-<n>` with a TCP port on ClusterIP `10.96.0.<ip>` (shared between
    /// Services, so frontends conflict and move), endpoints `10.244.1.<e>` (local when
    /// even), a NodePort and ETP Local when asked.
    fn port_state(n: u8, ip: u8, eps: &[u8], node_port: bool, local: bool) -> ServicePortState {
        let mut info = ServiceInfo::new(
            name(&format!("svc-{n}"), Protocol::Tcp),
            vec![format!("10.96.0.{ip}").parse().unwrap()],
            80,
        );
        if node_port {
            info.node_port = Some(30000 + u16::from(n));
            info.external_ips = vec![format!("192.0.2.{ip}").parse().unwrap()];
        }
        info.external_local = local;
        let eps = eps
            .iter()
            .map(|e| Endpoint {
                ip: format!("10.244.1.{e}").parse().unwrap(),
                port: 8080,
                is_local: e % 2 == 0,
            })
            .collect();
        ServicePortState::from_endpoints(info, eps)
    }

    /// A change of one Service: (n, ip, endpoints, node port, ETP Local, deleted).
    type Change = (u8, u8, std::collections::BTreeSet<u8>, bool, bool, bool);

    fn change() -> impl proptest::strategy::Strategy<Value = Change> {
        (
            0u8..6,
            1u8..8,
            proptest::collection::btree_set(0u8..12, 0..5),
            proptest::bool::ANY,
            proptest::bool::ANY,
            proptest::bool::weighted(0.2),
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn updating_only_changed_ports_equals_rendering_everything(
            // Each batch of changes is one sync (frontends may move between Services
            // within a batch).
            batches in proptest::collection::vec(proptest::collection::vec(change(), 1..4), 1..15),
            maglev in proptest::bool::weighted(0.25),
        ) {
            let algorithm = if maglev { LbAlgorithm::Maglev } else { LbAlgorithm::Random };
            let mut d = DesiredState {
                node_ips: vec!["192.168.77.10".parse().unwrap()],
                ..DesiredState::default()
            };
            let mut current = MapContents::default();
            let mut fake = FakeMaps::default();
            for batch in batches {
                let mut deltas = Vec::new();
                for (n, ip, eps, node_port, local, delete) in batch {
                    let key = crate::model::ObjectKey {
                        namespace: "d".into(),
                        name: format!("svc-{n}"),
                    };
                    let eps: Vec<u8> = eps.into_iter().collect();
                    let ports = if delete {
                        Vec::new()
                    } else {
                        vec![port_state(n, ip, &eps, node_port, local)]
                    };
                    deltas.extend(d.replace_service(&key, ports).0);
                }
                if d.needs_full_compute() {
                    // A contested frontend was released: the runner syncs in full.
                    return Ok(());
                }
                let plan = update_ports(&mut current, &deltas, &d.node_ips, algorithm);
                fake.apply(&plan).unwrap();
                proptest::prop_assert_eq!(&current, &render_with(&d, algorithm));
                proptest::prop_assert_eq!(fake.contents(), current.clone());
            }
        }
    }

    #[test]
    fn an_etp_local_frontend_has_a_socket_view_over_every_endpoint() {
        let d = DesiredState {
            node_ips: vec!["192.168.77.10".parse().unwrap()],
            services: [(
                name("svc-1", Protocol::Tcp),
                port_state(1, 10, &[1, 3], true, true),
            )]
            .into(),
            ..DesiredState::default()
        };
        let m = render(&d);
        let np = addr_port("192.168.77.10".parse().unwrap(), 30001, PROTO_TCP);
        // No local endpoint: outside traffic is dropped, the node's own sockets use both.
        assert_eq!(m.services[&np].count, 0);
        assert_eq!(
            m.services[&np].flags,
            FLAG_NODE_LOCAL | FLAG_EXTERNAL_LOCAL | FLAG_DROP
        );
        let view = socket_view(np);
        assert_eq!(view.proto, PROTO_TCP | SOCKET_VIEW);
        assert_eq!(m.services[&view].count, 2);
        assert_eq!(m.services[&view].flags, 0);
        assert_eq!(m.services[&view].snat, [0; 4]);
        let ext = socket_view(frontend("192.0.2.10", PROTO_TCP));
        assert_eq!(m.services[&ext].count, 2);
        // ETP Cluster: no twins.
        let d = DesiredState {
            node_ips: d.node_ips.clone(),
            services: [(
                name("svc-1", Protocol::Tcp),
                port_state(1, 10, &[1, 3], true, false),
            )]
            .into(),
            ..DesiredState::default()
        };
        let m = render(&d);
        assert!(m.services.keys().all(|k| k.proto & SOCKET_VIEW == 0));
        assert_eq!(m.services[&np].flags, FLAG_NODE_LOCAL);
    }

    #[test]
    fn external_traffic_to_a_remote_endpoint_is_masqueraded_to_the_node_address() {
        let mut d = DesiredState {
            node_ips: vec!["192.168.77.10".parse().unwrap()],
            ..DesiredState::default()
        };
        let mut info = ServiceInfo::new(
            name("web", Protocol::Tcp),
            vec!["10.96.0.10".parse().unwrap()],
            80,
        );
        info.node_port = Some(30080);
        let mut remote = ep("10.244.1.2");
        remote.is_local = false;
        let sp = ServicePortState::from_endpoints(info, vec![ep("10.244.1.1"), remote]);
        d.services.insert(name("web", Protocol::Tcp), sp);
        let m = render(&d);
        let np = addr_port("192.168.77.10".parse().unwrap(), 30080, PROTO_TCP);
        assert_eq!(m.services[&np].snat[0].to_ne_bytes(), [192, 168, 77, 10]);
        let slot = |service, slot| m.backends[&BackendKey { service, slot }].proto;
        assert_eq!((slot(np, 0), slot(np, 1)), (0, BACKEND_REMOTE));
        let cip = frontend("10.96.0.10", PROTO_TCP);
        assert_eq!(
            m.services[&cip].snat, [0; 4],
            "ClusterIP traffic keeps its source"
        );
        assert_eq!((slot(cip, 0), slot(cip, 1)), (0, 0));
    }
}
