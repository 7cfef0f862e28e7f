//! EndpointSlice -> the endpoints of each Service port.

use super::{ObjectKey, Protocol};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::net::IpAddr;
use std::sync::Arc;

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label marking slices of headless Services; kube-proxy ignores them.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// One endpoint address for one port, with its conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct EndpointInfo {
    /// The endpoint's address (upstream uses the first address only).
    pub ip: IpAddr,
    /// The port for this Service port.
    pub port: u16,
    /// `conditions.ready` (missing means ready).
    pub ready: bool,
    /// `conditions.serving` (missing means the value of ready).
    pub serving: bool,
    /// `conditions.terminating` (missing means false).
    pub terminating: bool,
    /// `nodeName`, when given.
    pub node_name: Option<Arc<str>>,
    /// `zone`, when given.
    pub zone: Option<Arc<str>>,
    /// Topology hints, when the slice gives any (boxed: most endpoints have none).
    pub hints: Option<Box<Hints>>,
}

/// An endpoint's topology hints.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Hints {
    /// `hints.forZones[].name`: zones whose nodes should use this endpoint.
    pub zones: Vec<Arc<str>>,
    /// `hints.forNodes[].name`: nodes that should use this endpoint.
    pub nodes: Vec<Arc<str>>,
}

impl EndpointInfo {
    /// `hints.forZones[].name`.
    pub fn zone_hints(&self) -> &[Arc<str>] {
        self.hints
            .as_deref()
            .map(|h| h.zones.as_slice())
            .unwrap_or_default()
    }

    /// `hints.forNodes[].name`.
    pub fn node_hints(&self) -> &[Arc<str>] {
        self.hints
            .as_deref()
            .map(|h| h.nodes.as_slice())
            .unwrap_or_default()
    }
}

/// The endpoints one slice gives one named port of its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Port name (matches the Service port's name; empty when unnamed).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Endpoints for this port.
    pub endpoints: Vec<EndpointInfo>,
}

/// An EndpointSlice read for the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceEndpoints {
    /// Deliberately ignored (headless, FQDN address type, no service-name label).
    Skipped(&'static str),
    /// The Service it belongs to and its ports.
    Ports {
        /// `namespace/name` of the owning Service.
        service: ObjectKey,
        /// One entry per slice port.
        ports: Vec<SlicePort>,
    },
}

/// An EndpointSlice that cannot be used, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("EndpointSlice {object}: field {field}: {message}")]
pub struct EndpointSliceError {
    /// `namespace/name` of the slice.
    pub object: ObjectKey,
    /// Path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SliceEndpoints {
    /// Makes equal node and zone names share one allocation (there are few distinct ones,
    /// and one per endpoint otherwise).
    pub fn intern(&mut self, names: &mut std::collections::BTreeSet<Arc<str>>) {
        let SliceEndpoints::Ports { ports, .. } = self else {
            return;
        };
        let mut shared = |n: &mut Option<Arc<str>>| {
            if let Some(v) = n {
                match names.get(v) {
                    Some(existing) => *v = existing.clone(),
                    None => {
                        names.insert(v.clone());
                    }
                }
            }
        };
        for p in ports {
            for e in &mut p.endpoints {
                shared(&mut e.node_name);
                shared(&mut e.zone);
                let hints = e.hints.as_deref_mut().into_iter();
                for h in hints.flat_map(|h| h.zones.iter_mut().chain(h.nodes.iter_mut())) {
                    let mut o = Some(h.clone());
                    shared(&mut o);
                    if let Some(v) = o {
                        *h = v;
                    }
                }
            }
        }
    }
}

/// Reads an EndpointSlice's endpoints per port.
pub fn slice_endpoints(slice: &EndpointSlice) -> Result<SliceEndpoints, EndpointSliceError> {
    let object = ObjectKey::of_meta(&slice.metadata, true);
    let err = |field: String, message: String| EndpointSliceError {
        object: object.clone(),
        field,
        message,
    };
    let labels = slice.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Ok(SliceEndpoints::Skipped("headless"));
    }
    let Some(service_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Ok(SliceEndpoints::Skipped(
            "no kubernetes.io/service-name label",
        ));
    };
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        "FQDN" => return Ok(SliceEndpoints::Skipped("FQDN address type")),
        other => {
            return Err(err(
                "addressType".into(),
                format!("unknown address type {other:?} (want IPv4, IPv6 or FQDN)"),
            ))
        }
    }
    let want_v4 = slice.address_type == "IPv4";
    let mut addrs: Vec<(IpAddr, &k8s_openapi::api::discovery::v1::Endpoint)> = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let Some(first) = ep.addresses.first() else {
            return Err(err(format!("endpoints[{i}].addresses"), "empty".into()));
        };
        let ip: IpAddr = first.parse().map_err(|_| {
            err(
                format!("endpoints[{i}].addresses[0]"),
                format!("{first:?} is not an IP address"),
            )
        })?;
        if ip.is_ipv4() != want_v4 {
            return Err(err(
                format!("endpoints[{i}].addresses[0]"),
                format!("{ip} does not match addressType {}", slice.address_type),
            ));
        }
        addrs.push((ip, ep));
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = Protocol::from_k8s(p.protocol.as_deref()).ok_or_else(|| {
            err(
                format!("ports[{i}].protocol"),
                format!(
                    "unknown protocol {:?}",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            )
        })?;
        let Some(raw_port) = p.port else {
            // Upstream: a slice port without a number means "all ports"; kube-proxy skips it.
            continue;
        };
        let port = u16::try_from(raw_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                err(
                    format!("ports[{i}].port"),
                    format!("{raw_port} is not a port in 1..65535"),
                )
            })?;
        let endpoints = addrs
            .iter()
            .map(|(ip, ep)| {
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                EndpointInfo {
                    ip: *ip,
                    port,
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node_name: ep.node_name.as_deref().map(Arc::from),
                    zone: ep.zone.as_deref().map(Arc::from),
                    hints: ep.hints.as_ref().and_then(|h| {
                        let zones: Vec<Arc<str>> = h
                            .for_zones
                            .iter()
                            .flatten()
                            .map(|z| Arc::from(z.name.as_str()))
                            .collect();
                        let nodes: Vec<Arc<str>> = h
                            .for_nodes
                            .iter()
                            .flatten()
                            .map(|n| Arc::from(n.name.as_str()))
                            .collect();
                        (!zones.is_empty() || !nodes.is_empty())
                            .then(|| Box::new(Hints { zones, nodes }))
                    }),
                }
            })
            .collect();
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            endpoints,
        });
    }
    Ok(SliceEndpoints::Ports {
        service: ObjectKey::new(object.namespace.clone(), service_name.clone()),
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn conditions_default_like_upstream() {
        let s = slice(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.11]
  nodeName: node1
- addresses: [10.244.1.12]
  conditions: {ready: false, serving: true, terminating: true}
"#,
        );
        let SliceEndpoints::Ports { service, ports } = slice_endpoints(&s).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(service.to_string(), "demo/web");
        assert_eq!(ports.len(), 1);
        let e = &ports[0].endpoints;
        assert!(e[0].ready && e[0].serving && !e[0].terminating);
        assert_eq!(e[0].node_name.as_deref(), Some("node1"));
        assert!(!e[1].ready && e[1].serving && e[1].terminating);
    }

    #[test]
    fn headless_and_fqdn_slices_are_skipped() {
        let h = slice("{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: a, labels: {kubernetes.io/service-name: x, service.kubernetes.io/headless: ''}}, addressType: IPv4}");
        assert!(matches!(
            slice_endpoints(&h).unwrap(),
            SliceEndpoints::Skipped(_)
        ));
        let f = slice("{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: a, labels: {kubernetes.io/service-name: x}}, addressType: FQDN}");
        assert!(matches!(
            slice_endpoints(&f).unwrap(),
            SliceEndpoints::Skipped(_)
        ));
    }

    #[test]
    fn bad_address_is_named_in_the_error() {
        let s = slice("{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: a, namespace: n, labels: {kubernetes.io/service-name: x}}, addressType: IPv4, endpoints: [{addresses: [10.0.0.1]}, {addresses: [nope]}]}");
        let e = slice_endpoints(&s).unwrap_err();
        assert_eq!(e.field, "endpoints[1].addresses[0]");
        assert!(e
            .to_string()
            .starts_with("EndpointSlice n/a: field endpoints[1].addresses[0]"));
    }
}
