//! [`compute`]: the store's records -> [`DesiredState`], pure and deterministic; and
//! [`compute_service`] for one Service, which incremental syncs use.

use super::endpoint::SliceEndpoints;
use super::service::ServicePorts;
use super::store::Store;
use super::topology::{categorize, is_local};
use super::{EndpointInfo, ObjectKey, Protocol, ServiceInfo, ServicePortName};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// This node's name (`--hostname-override`), to tell local endpoints apart.
    pub node_name: String,
    /// Where NodePorts are served.
    pub nodeport_addresses: NodePortAddresses,
    /// This node's local addresses (read from the kernel), for CIDR `--nodeport-addresses`.
    pub local_addrs: Vec<IpAddr>,
}

/// `--nodeport-addresses`: which of the node's addresses serve NodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's primary addresses (its Node object's InternalIP/ExternalIP): kube-proxy's
    /// default in nftables mode.
    #[default]
    Primary,
    /// Every local address inside one of these CIDRs.
    Cidrs(Vec<ipnetwork::IpNetwork>),
}

impl serde::Serialize for NodePortAddresses {
    /// As kube-proxy's configuration spells it: `["primary"]` or a list of CIDRs.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            NodePortAddresses::Primary => ["primary"].serialize(s),
            NodePortAddresses::Cidrs(c) => c.serialize(s),
        }
    }
}

/// One endpoint chosen to receive traffic for a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Endpoint {
    /// Endpoint address.
    pub ip: IpAddr,
    /// Endpoint port.
    pub port: u16,
    /// Whether the endpoint runs on this node (or its node is unknown).
    pub is_local: bool,
}

/// Desired state of one Service port: its frontends and the endpoints to use.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePortState {
    /// Frontends (cluster IPs, port, NodePort).
    /// Shared with the store's record of the Service (one copy per port in memory).
    pub info: std::sync::Arc<ServiceInfo>,
    /// Endpoints for cluster-wide traffic, without duplicates, in slot order: sorted when
    /// the port is first seen, then stable (an endpoint keeps its slot while it stays).
    /// Empty when no traffic to the port is cluster-wide.
    pub endpoints: Vec<Endpoint>,
    /// Endpoints on this node for traffic under a Local policy (same order rules).
    pub local_endpoints: Vec<Endpoint>,
    /// Addresses of this node's ready endpoints (sorted): what a `healthCheckNodePort`
    /// reports, as kube-proxy's does. Serving-but-terminating endpoints still receive Local
    /// traffic when nothing is ready (`local_endpoints`) but are not counted here, so a
    /// load balancer moves away from a node whose pods are all terminating.
    pub local_ready: Vec<IpAddr>,
    /// Whether a usable endpoint exists anywhere, per family (IPv4, IPv6): without one,
    /// traffic of that family is rejected; with one, traffic whose list is empty is dropped.
    pub has_endpoints: (bool, bool),
}

impl ServicePortState {
    /// Whether a usable endpoint of `ip`'s family exists anywhere.
    pub fn has_endpoints_for(&self, ip: &IpAddr) -> bool {
        if ip.is_ipv4() {
            self.has_endpoints.0
        } else {
            self.has_endpoints.1
        }
    }

    /// The state of a port whose usable endpoints (all ready) are `all`: cluster traffic
    /// uses all of them, Local traffic those on this node.
    pub fn from_endpoints(info: ServiceInfo, all: Vec<Endpoint>) -> Self {
        let info = std::sync::Arc::new(info);
        let local = if info.uses_local_endpoints() {
            all.iter().filter(|e| e.is_local).cloned().collect()
        } else {
            Vec::new()
        };
        ServicePortState {
            local_ready: local.iter().map(|e| e.ip).collect(),
            has_endpoints: (
                all.iter().any(|e| e.ip.is_ipv4()),
                all.iter().any(|e| e.ip.is_ipv6()),
            ),
            endpoints: if info.uses_cluster_endpoints() {
                all
            } else {
                Vec::new()
            },
            local_endpoints: local,
            info,
        }
    }
}

/// Everything the dataplane must implement, keyed deterministically.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DesiredState {
    /// Service ports by name.
    pub services: BTreeMap<ServicePortName, ServicePortState>,
    /// This node's addresses (from its Node object), where NodePorts are served.
    pub node_ips: Vec<IpAddr>,
    /// Which Service port owns each frontend.
    #[serde(skip)]
    pub(crate) frontends: BTreeMap<Frontend, ServicePortName>,
    /// Frontends another Service port wanted too (its port was left out).
    #[serde(skip)]
    pub(crate) contested: BTreeSet<Frontend>,
    /// Set when a contested frontend was released: only a full compute can hand it over.
    #[serde(skip)]
    pub(crate) needs_full: bool,
}

impl PartialEq for DesiredState {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services && self.node_ips == other.node_ips
    }
}

impl Eq for DesiredState {}

/// A frontend: (address, protocol, port); NodePorts use the unspecified address, since
/// they are served on every node address.
pub(crate) type Frontend = (IpAddr, Protocol, u16);

fn frontends_of(info: &ServiceInfo) -> Vec<Frontend> {
    let p = info.name.protocol;
    let mut f: Vec<Frontend> = info
        .cluster_ips
        .iter()
        .map(|ip| (*ip, p, info.port))
        .collect();
    if let Some(np) = info.node_port {
        f.push((IpAddr::from([0, 0, 0, 0]), p, np));
    }
    f
}

/// An object that could not be used in a sync (it is left out; everything else proceeds).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A Service failed validation.
    #[error(transparent)]
    Service(#[from] super::service::ServiceError),
    /// A Service port wants a frontend another Service port already has.
    #[error("Service {wanted_by}: frontend {frontend} is already used by {owner}; this port is left out")]
    FrontendConflict {
        /// The port left out.
        wanted_by: Box<ServicePortName>,
        /// The port that keeps the frontend.
        owner: Box<ServicePortName>,
        /// `address:port/protocol` (`*:port` for a NodePort).
        frontend: String,
    },
    /// An EndpointSlice failed validation.
    #[error(transparent)]
    EndpointSlice(#[from] super::endpoint::EndpointSliceError),
}

/// Computes the desired state of every Service. Invalid objects are left out and returned
/// as errors.
pub fn compute(store: &Store, cfg: &ModelConfig) -> (DesiredState, Vec<ModelError>) {
    let mut state = DesiredState::default();
    let errors = recompute(store, cfg, &mut state);
    (state, errors)
}

/// Recomputes every Service onto an existing state, so each port keeps the slot order of
/// its endpoints (see [`DesiredState::replace_service`]) across full syncs.
pub fn recompute(store: &Store, cfg: &ModelConfig, state: &mut DesiredState) -> Vec<ModelError> {
    recompute_with(store, cfg, state, &mut |_| {})
}

/// [`recompute`], handing each Service port whose state changed to `on_delta`.
pub fn recompute_with(
    store: &Store,
    cfg: &ModelConfig,
    state: &mut DesiredState,
    on_delta: &mut dyn FnMut(ServiceDelta),
) -> Vec<ModelError> {
    let mut errors: Vec<ModelError> = store
        .slices()
        .values()
        .filter_map(|r| r.as_ref().err().cloned().map(ModelError::from))
        .collect();
    state.node_ips = nodeport_ips(store, cfg);
    let gone: BTreeSet<ObjectKey> = state
        .services
        .keys()
        .map(|n| ObjectKey::new(n.namespace.clone(), n.name.clone()))
        .filter(|k| !store.services().contains_key(k))
        .collect();
    for key in &gone {
        state
            .replace_service(key, Vec::new())
            .0
            .into_iter()
            .for_each(&mut *on_delta);
    }
    for key in store.services().keys() {
        match compute_service(store, key, cfg) {
            Ok(ports) => {
                let (deltas, conflicts) = state.replace_service(key, ports);
                deltas.into_iter().for_each(&mut *on_delta);
                errors.extend(conflicts);
            }
            Err(e) => {
                let (deltas, _) = state.replace_service(key, Vec::new());
                deltas.into_iter().for_each(&mut *on_delta);
                errors.push(e)
            }
        }
    }
    state.needs_full = false;
    errors
}

/// The addresses NodePorts are served on.
pub fn nodeport_ips(store: &Store, cfg: &ModelConfig) -> Vec<IpAddr> {
    match &cfg.nodeport_addresses {
        NodePortAddresses::Primary => store.node_ips(&cfg.node_name),
        NodePortAddresses::Cidrs(cidrs) => {
            let set: BTreeSet<IpAddr> = cfg
                .local_addrs
                .iter()
                .filter(|a| cidrs.iter().any(|c| c.contains(**a)))
                .copied()
                .collect();
            set.into_iter().collect()
        }
    }
}

/// Orders `new` endpoints so that each one also in `old` keeps its position (its slot in
/// the dataplane), new ones fill the places of removed ones, and the list stays dense by
/// moving the last endpoints into remaining holes. Identity is address and port.
fn sticky_order(old: &[Endpoint], new: Vec<Endpoint>) -> Vec<Endpoint> {
    let id = |e: &Endpoint| (e.ip, e.port);
    let mut incoming: BTreeMap<(IpAddr, u16), Endpoint> =
        new.into_iter().map(|e| (id(&e), e)).collect();
    let mut slots: Vec<Option<Endpoint>> = old.iter().map(|e| incoming.remove(&id(e))).collect();
    let mut extra = incoming.into_values();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = extra.next();
    }
    slots.extend(extra.map(Some));
    // Fill holes from the end.
    let mut out: Vec<Option<Endpoint>> = Vec::with_capacity(slots.len());
    let mut tail: Vec<Endpoint> = Vec::new();
    let live = slots.iter().filter(|s| s.is_some()).count();
    for (i, s) in slots.into_iter().enumerate() {
        if i < live {
            out.push(s);
        } else if let Some(e) = s {
            tail.push(e);
        }
    }
    for slot in out.iter_mut().filter(|s| s.is_none()) {
        *slot = tail.pop();
    }
    out.into_iter().flatten().collect()
}

/// The desired state of one Service's ports (empty when it is skipped or gone).
pub fn compute_service(
    store: &Store,
    key: &ObjectKey,
    cfg: &ModelConfig,
) -> Result<Vec<ServicePortState>, ModelError> {
    let infos = match store.services().get(key) {
        None | Some(Ok(ServicePorts::Skipped(_))) => return Ok(Vec::new()),
        Some(Err(e)) => return Err(e.clone().into()),
        Some(Ok(ServicePorts::Ports(p))) => p,
    };
    // Endpoints per (port name, protocol), merged over all of the Service's slices; an
    // address:port in several slices counts once (the first slice's conditions win).
    type ByAddr<'a> = BTreeMap<(IpAddr, u16), &'a EndpointInfo>;
    let mut by_port: BTreeMap<(&str, Protocol), ByAddr> = BTreeMap::new();
    for slice in store.slices_of(key) {
        if let Ok(SliceEndpoints::Ports { ports, .. }) = slice {
            for p in ports {
                let m = by_port.entry((p.name.as_str(), p.protocol)).or_default();
                for e in &p.endpoints {
                    m.entry((e.ip, e.port)).or_insert(e);
                }
            }
        }
    }
    let zone = store.node(&cfg.node_name).and_then(|n| n.zone.as_deref());
    Ok(infos
        .iter()
        .map(|info| {
            let eps: Vec<&EndpointInfo> = by_port
                .get(&(info.name.port.as_str(), info.name.protocol))
                .map(|m| m.values().copied().collect())
                .unwrap_or_default();
            // Each family on its own, as upstream runs one proxier per family: topology
            // and fallbacks are decided among the endpoints of that family.
            let mut state = ServicePortState {
                info: info.clone(),
                endpoints: Vec::new(),
                local_endpoints: Vec::new(),
                local_ready: Vec::new(),
                has_endpoints: (false, false),
            };
            for v4 in [true, false] {
                let fam: Vec<&EndpointInfo> = eps
                    .iter()
                    .copied()
                    .filter(|e| e.ip.is_ipv4() == v4)
                    .collect();
                let c = categorize(&fam, info, &cfg.node_name, zone);
                let node = cfg.node_name.as_str();
                let chosen = |list: &[&EndpointInfo]| -> Vec<Endpoint> {
                    list.iter()
                        .map(|e| Endpoint {
                            ip: e.ip,
                            port: e.port,
                            is_local: is_local(e, node),
                        })
                        .collect()
                };
                state.endpoints.extend(chosen(&c.cluster));
                state.local_endpoints.extend(chosen(&c.local));
                state
                    .local_ready
                    .extend(c.local.iter().filter(|e| e.ready).map(|e| e.ip));
                if v4 {
                    state.has_endpoints.0 = c.has_any;
                } else {
                    state.has_endpoints.1 = c.has_any;
                }
            }
            for list in [&mut state.endpoints, &mut state.local_endpoints] {
                list.sort();
                list.dedup();
            }
            state.local_ready.sort();
            state.local_ready.dedup();
            state
        })
        .collect())
}

/// One Service port whose desired state changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDelta {
    /// The port.
    pub name: ServicePortName,
    /// Its state before (None: new).
    pub old: Option<ServicePortState>,
    /// Its state now (None: gone).
    pub new: Option<ServicePortState>,
}

impl DesiredState {
    /// Replaces the ports of one Service (`namespace/name`) and returns, for each port that
    /// changed, its old and new state, plus the ports left out because another Service
    /// port already has one of their frontends.
    pub fn replace_service(
        &mut self,
        key: &ObjectKey,
        ports: Vec<ServicePortState>,
    ) -> (Vec<ServiceDelta>, Vec<ModelError>) {
        let from = ServicePortName {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        let old_names: Vec<ServicePortName> = self
            .services
            .range(from..)
            .take_while(|(n, _)| n.namespace == key.namespace && n.name == key.name)
            .map(|(n, _)| n.clone())
            .collect();
        let mut old: BTreeMap<ServicePortName, ServicePortState> = old_names
            .into_iter()
            .filter_map(|n| self.services.remove_entry(&n))
            .collect();
        for prev in old.values() {
            for f in frontends_of(&prev.info) {
                self.frontends.remove(&f);
                if self.contested.remove(&f) {
                    self.needs_full = true;
                }
            }
        }
        let mut deltas = Vec::new();
        let mut conflicts = Vec::new();
        for p in ports {
            let name = p.info.name.clone();
            let fronts = frontends_of(&p.info);
            if let Some((f, owner)) = fronts
                .iter()
                .find_map(|f| self.frontends.get(f).map(|o| (*f, o.clone())))
            {
                self.contested.insert(f);
                let frontend = if f.0.is_unspecified() {
                    format!("*:{}/{}", f.2, f.1)
                } else {
                    format!("{}:{}/{}", f.0, f.2, f.1)
                };
                conflicts.push(ModelError::FrontendConflict {
                    wanted_by: Box::new(name),
                    owner: Box::new(owner),
                    frontend,
                });
                continue;
            }
            for f in fronts {
                self.frontends.insert(f, name.clone());
            }
            let prev = old.remove(&name);
            let mut p = p;
            if let Some(prev) = &prev {
                p.endpoints = sticky_order(&prev.endpoints, std::mem::take(&mut p.endpoints));
                p.local_endpoints = sticky_order(
                    &prev.local_endpoints,
                    std::mem::take(&mut p.local_endpoints),
                );
            }
            if prev.as_ref() != Some(&p) {
                deltas.push(ServiceDelta {
                    name: name.clone(),
                    old: prev,
                    new: Some(p.clone()),
                });
            }
            self.services.insert(name, p);
        }
        for (name, prev) in old {
            deltas.push(ServiceDelta {
                name,
                old: Some(prev),
                new: None,
            });
        }
        (deltas, conflicts)
    }

    /// Whether a frontend another port wanted was released: then only a full compute
    /// gives the right answer.
    pub fn needs_full_compute(&self) -> bool {
        self.needs_full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Object, SourceUpdate};
    use serde::Deserialize;

    fn store(yaml: &str) -> Store {
        let mut objects = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let v = serde_yaml_ng::Value::deserialize(doc).unwrap();
            objects.push(match v["kind"].as_str().unwrap() {
                "Service" => Object::Service(serde_yaml_ng::from_value(v).unwrap()),
                "Node" => Object::Node(serde_yaml_ng::from_value(v).unwrap()),
                _ => Object::EndpointSlice(serde_yaml_ng::from_value(v).unwrap()),
            });
        }
        let mut s = Store::default();
        s.record_all(
            SourceUpdate::listing(objects),
            std::time::SystemTime::UNIX_EPOCH,
        );
        s
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.12], nodeName: node1}
- {addresses: [10.244.1.11], nodeName: node2}
- {addresses: [10.244.1.13], conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node2}
- {addresses: [10.244.1.14], nodeName: node1}
"#;

    fn run(yaml: &str) -> (DesiredState, Vec<ModelError>) {
        compute(
            &store(yaml),
            &ModelConfig {
                node_name: "node1".into(),
                ..ModelConfig::default()
            },
        )
    }
    #[test]
    fn ready_endpoints_merge_across_slices_and_duplicates_count_once() {
        let (state, errors) = run(WEB);
        assert!(errors.is_empty());
        let sp = state.services.values().next().unwrap();
        let ips: Vec<String> = sp
            .endpoints
            .iter()
            .map(|e| format!("{}:{}:{}", e.ip, e.port, e.is_local))
            .collect();
        assert_eq!(
            ips,
            [
                "10.244.1.11:8080:false",
                "10.244.1.12:8080:true",
                "10.244.1.14:8080:true"
            ]
        );
    }

    #[test]
    fn terminating_local_endpoints_serve_local_traffic_but_are_not_counted_ready() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: etp, namespace: demo}
spec: {clusterIP: 10.96.0.20, type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 31000, ports: [{port: 80, nodePort: 30080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: etp-a, namespace: demo, labels: {kubernetes.io/service-name: etp}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.20], nodeName: node1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.20], nodeName: node2}
"#;
        let (state, errors) = run(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let sp = state.services.values().next().unwrap();
        let local: Vec<IpAddr> = sp.local_endpoints.iter().map(|e| e.ip).collect();
        assert_eq!(
            local,
            ["10.244.1.20".parse::<IpAddr>().unwrap()],
            "the fallback"
        );
        assert!(
            sp.local_ready.is_empty(),
            "the health check reports none ready"
        );
        let (state, _) = run(&yaml.replace(
            "ready: false, serving: true, terminating: true",
            "ready: true",
        ));
        let sp = state.services.values().next().unwrap();
        assert_eq!(sp.local_ready, ["10.244.1.20".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn service_without_slices_has_no_endpoints() {
        let (state, _) = run("{apiVersion: v1, kind: Service, metadata: {name: lonely}, spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}}");
        assert_eq!(state.services.len(), 1);
        assert!(state.services.values().all(|s| s.endpoints.is_empty()));
    }

    #[test]
    fn an_invalid_service_is_reported_and_the_others_still_compute() {
        let yaml = format!("{WEB}\n---\n{{apiVersion: v1, kind: Service, metadata: {{name: bad, namespace: demo}}, spec: {{clusterIP: nope, ports: [{{port: 80}}]}}}}\n");
        let (state, errors) = run(&yaml);
        assert_eq!(state.services.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("demo/bad"));
    }

    #[test]
    fn a_second_service_on_the_same_frontend_is_reported_and_left_out() {
        let yaml = format!("{WEB}\n---\n{{apiVersion: v1, kind: Service, metadata: {{name: web2, namespace: demo}}, spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}]}}}}\n");
        let (state, errors) = run(&yaml);
        assert_eq!(state.services.len(), 1);
        assert_eq!(
            errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["Service demo/web2:http/TCP: frontend 10.96.0.10:80/TCP is already used by demo/web:http/TCP; this port is left out"]
        );
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            ip: IpAddr::from([10, 244, 1, last]),
            port: 8080,
            is_local: true,
        }
    }

    #[test]
    fn endpoints_keep_their_slots_when_others_come_and_go() {
        let old = vec![ep(1), ep(2), ep(3), ep(4)];
        // 2 goes, 9 comes: 9 takes 2's slot; the others stay.
        assert_eq!(
            sticky_order(&old, vec![ep(1), ep(3), ep(4), ep(9)]),
            [ep(1), ep(9), ep(3), ep(4)]
        );
        // 1 goes: the last one moves into its slot, the list stays dense.
        assert_eq!(
            sticky_order(&old, vec![ep(2), ep(3), ep(4)]),
            [ep(4), ep(2), ep(3)]
        );
        // Growth appends.
        assert_eq!(
            sticky_order(&old[..2], vec![ep(1), ep(2), ep(5)]),
            [ep(1), ep(2), ep(5)]
        );
        // 1 and 3 go, nothing comes.
        assert_eq!(sticky_order(&old, vec![ep(2), ep(4)]), [ep(4), ep(2)]);
    }

    #[test]
    fn compute_is_deterministic() {
        let a = run(WEB).0;
        let b = run(WEB).0;
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
