//! [`compute`]: Services + EndpointSlices + Nodes -> [`DesiredState`], pure and deterministic.

use super::endpoint::{slice_endpoints, SliceEndpoints};
use super::service::{service_ports, ServicePorts};
use super::{EndpointInfo, ObjectKey, ServiceInfo, ServicePortName};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The objects a sync computes from (borrowed from the change trackers).
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    /// Services by `namespace/name`.
    pub services: &'a BTreeMap<ObjectKey, Service>,
    /// EndpointSlices by `namespace/name`.
    pub slices: &'a BTreeMap<ObjectKey, EndpointSlice>,
    /// Nodes by name.
    pub nodes: &'a BTreeMap<ObjectKey, Node>,
}

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// This node's name (`--hostname-override`), to tell local endpoints apart.
    pub node_name: String,
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
    pub info: ServiceInfo,
    /// Endpoints that receive new connections, sorted and without duplicates.
    pub endpoints: Vec<Endpoint>,
}

/// Everything the dataplane must implement, keyed deterministically.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DesiredState {
    /// Service ports by name.
    pub services: BTreeMap<ServicePortName, ServicePortState>,
    /// This node's addresses (from its Node object), where NodePorts are served.
    pub node_ips: Vec<IpAddr>,
}

/// An object that could not be used in a sync (it is left out; everything else proceeds).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A Service failed validation.
    #[error(transparent)]
    Service(#[from] super::service::ServiceError),
    /// An EndpointSlice failed validation.
    #[error(transparent)]
    EndpointSlice(#[from] super::endpoint::EndpointSliceError),
}

/// Computes the desired state. Invalid objects are left out and returned as errors.
pub fn compute(snapshot: Snapshot<'_>, cfg: &ModelConfig) -> (DesiredState, Vec<ModelError>) {
    let mut errors = Vec::new();
    // Endpoints per (service, port name, protocol), merged over all slices.
    let mut by_port: BTreeMap<(ObjectKey, String, super::Protocol), BTreeSet<EndpointInfo>> =
        BTreeMap::new();
    for slice in snapshot.slices.values() {
        match slice_endpoints(slice) {
            Ok(SliceEndpoints::Ports { service, ports }) => {
                for p in ports {
                    by_port
                        .entry((service.clone(), p.name, p.protocol))
                        .or_default()
                        .extend(p.endpoints);
                }
            }
            Ok(SliceEndpoints::Skipped(_)) => {}
            Err(e) => errors.push(e.into()),
        }
    }
    let mut state = DesiredState {
        node_ips: node_ips(snapshot.nodes, &cfg.node_name),
        ..DesiredState::default()
    };
    for svc in snapshot.services.values() {
        let infos = match service_ports(svc) {
            Ok(ServicePorts::Ports(p)) => p,
            Ok(ServicePorts::Skipped(_)) => continue,
            Err(e) => {
                errors.push(e.into());
                continue;
            }
        };
        for info in infos {
            let key = (
                ObjectKey::new(info.name.namespace.clone(), info.name.name.clone()),
                info.name.port.clone(),
                info.name.protocol,
            );
            let endpoints = by_port
                .get(&key)
                .map(|eps| select_endpoints(eps, &cfg.node_name))
                .unwrap_or_default();
            state
                .services
                .insert(info.name.clone(), ServicePortState { info, endpoints });
        }
    }
    (state, errors)
}

/// InternalIP and ExternalIP addresses of this node's Node object, sorted.
fn node_ips(nodes: &BTreeMap<ObjectKey, Node>, node_name: &str) -> Vec<IpAddr> {
    let Some(node) = nodes.get(&ObjectKey::new("", node_name)) else {
        return Vec::new();
    };
    let ips: BTreeSet<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    ips.into_iter().collect()
}

/// Ready endpoints, each address:port once (a duplicate across slices counts once).
fn select_endpoints(eps: &BTreeSet<EndpointInfo>, node_name: &str) -> Vec<Endpoint> {
    let chosen: BTreeSet<Endpoint> = eps
        .iter()
        .filter(|e| e.ready)
        .map(|e| Endpoint {
            ip: e.ip,
            port: e.port,
            is_local: e.node_name.as_deref().is_none_or(|n| n == node_name),
        })
        .collect();
    chosen.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Object;

    fn objects(
        yaml: &str,
    ) -> (
        BTreeMap<ObjectKey, Service>,
        BTreeMap<ObjectKey, EndpointSlice>,
    ) {
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let v = serde_yaml_ng::Value::deserialize(doc).unwrap();
            let obj = match v["kind"].as_str().unwrap() {
                "Service" => Object::Service(serde_yaml_ng::from_value(v).unwrap()),
                _ => Object::EndpointSlice(serde_yaml_ng::from_value(v).unwrap()),
            };
            match obj {
                Object::Service(s) => {
                    services.insert(ObjectKey::of_meta(&s.metadata, true), s);
                }
                Object::EndpointSlice(s) => {
                    slices.insert(ObjectKey::of_meta(&s.metadata, true), s);
                }
                Object::Node(_) => {}
            }
        }
        (services, slices)
    }
    use serde::Deserialize;

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
        let (services, slices) = objects(yaml);
        let nodes = BTreeMap::new();
        let snap = Snapshot {
            services: &services,
            slices: &slices,
            nodes: &nodes,
        };
        compute(
            snap,
            &ModelConfig {
                node_name: "node1".into(),
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
    fn compute_is_deterministic() {
        let a = run(WEB).0;
        let b = run(WEB).0;
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
