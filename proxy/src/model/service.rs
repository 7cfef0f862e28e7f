//! Service -> one [`ServiceInfo`] per port, with validation naming the offending field.

use super::{ObjectKey, Protocol, ServicePortName};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Service;
use std::net::IpAddr;

/// Label that hands a Service to another proxy; weir skips Services carrying it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// One port of a Service, as the dataplane needs it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceInfo {
    /// `namespace/name:port/protocol`.
    pub name: ServicePortName,
    /// The Service's cluster IPs (one per family).
    pub cluster_ips: Vec<IpAddr>,
    /// The Service port.
    pub port: u16,
    /// The NodePort, for NodePort and LoadBalancer Services that have one.
    pub node_port: Option<u16>,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic goes only to endpoints on this
    /// node, and is dropped when there are none here.
    pub internal_local: bool,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of LoadBalancer Services, without the ones whose
    /// `ipMode` is `Proxy` (the load balancer delivers those to the node itself).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`: when set, only these sources reach the
    /// load-balancer IPs.
    pub source_ranges: Vec<IpNetwork>,
    /// `externalTrafficPolicy: Local` on an externally reachable Service: external traffic
    /// goes only to endpoints on this node, with the client's source address preserved.
    pub external_local: bool,
    /// `spec.healthCheckNodePort` (set with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its endpoint.
    pub affinity_timeout: Option<u32>,
}

impl ServiceInfo {
    /// A plain ClusterIP port: no NodePort, Cluster traffic policies, no affinity.
    pub fn new(name: ServicePortName, cluster_ips: Vec<IpAddr>, port: u16) -> Self {
        ServiceInfo {
            name,
            cluster_ips,
            port,
            node_port: None,
            internal_local: false,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            external_local: false,
            health_check_node_port: None,
            affinity_timeout: None,
        }
    }

    /// The source prefixes of the IPv4 (`v4`) or IPv6 family allowed to reach this port's
    /// load-balancer IPs when it has `loadBalancerSourceRanges`: the ranges (host bits
    /// cleared) and, when a range holds one of the node's addresses `node_ips`, the
    /// load-balancer IPs themselves, as upstream allows them (a node that routes its own
    /// load balancer's VIP locally reaches it from that VIP). No prefix covered by another
    /// is kept, so the result loads into an interval set or an LPM trie as is.
    pub fn allowed_lb_sources(&self, node_ips: &[IpAddr], v4: bool) -> Vec<IpNetwork> {
        let in_family = |ip: &IpAddr| ip.is_ipv4() == v4;
        let ranges: Vec<IpNetwork> = self
            .source_ranges
            .iter()
            .filter(|r| in_family(&r.ip()))
            .filter_map(|r| IpNetwork::new(r.network(), r.prefix()).ok())
            .collect();
        let mut allowed = ranges.clone();
        let from_node = node_ips
            .iter()
            .any(|ip| in_family(ip) && ranges.iter().any(|r| r.contains(*ip)));
        if from_node {
            allowed.extend(
                self.load_balancer_ips
                    .iter()
                    .filter(|ip| in_family(ip))
                    .map(|ip| IpNetwork::from(*ip)),
            );
        }
        allowed.sort_by_key(|n| (n.prefix(), n.network()));
        let mut kept: Vec<IpNetwork> = Vec::new();
        for n in allowed {
            if !kept.iter().any(|k| k.contains(n.network())) {
                kept.push(n);
            }
        }
        kept
    }

    /// Whether traffic from outside reaches the Service (NodePort, external or
    /// load-balancer IPs).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Whether some traffic uses endpoints anywhere in the cluster.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || (self.externally_accessible() && !self.external_local)
    }

    /// Whether some traffic uses only this node's endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.externally_accessible() && self.external_local)
    }
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// Largest `timeoutSeconds` the API server accepts (one day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// Why a Service is deliberately not programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// `clusterIP: None`.
    Headless,
    /// `type: ExternalName`.
    ExternalName,
    /// Labelled `service.kubernetes.io/service-proxy-name`.
    OtherProxy(String),
}

/// Result of reading a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServicePorts {
    /// Skipped as upstream kube-proxy skips it.
    Skipped(SkipReason),
    /// The ports to program.
    Ports(Vec<std::sync::Arc<ServiceInfo>>),
}

/// A Service that cannot be programmed, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Service {object}: field {field}: {message}")]
pub struct ServiceError {
    /// `namespace/name` of the Service.
    pub object: ObjectKey,
    /// Path of the offending field, e.g. `spec.ports[1].port`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Reads a Service into per-port [`ServiceInfo`]s, or says why it is skipped.
pub fn service_ports(svc: &Service) -> Result<ServicePorts, ServiceError> {
    let object = ObjectKey::of_meta(&svc.metadata, true);
    let err = |field: String, message: String| ServiceError {
        object: object.clone(),
        field,
        message,
    };
    if object.name.is_empty() {
        return Err(err("metadata.name".into(), "must not be empty".into()));
    }
    if let Some(proxy) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
    {
        return Ok(ServicePorts::Skipped(SkipReason::OtherProxy(proxy.clone())));
    }
    let Some(spec) = &svc.spec else {
        return Err(err("spec".into(), "missing".into()));
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match svc_type {
        "ExternalName" => return Ok(ServicePorts::Skipped(SkipReason::ExternalName)),
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => {
            return Err(err(
                "spec.type".into(),
                format!(
                "unknown type {other:?} (want ClusterIP, NodePort, LoadBalancer or ExternalName)"
            ),
            ))
        }
    }
    let raw_ips: Vec<(String, &str)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        (_, Some(ip)) => vec![("spec.clusterIP".to_owned(), ip.as_str())],
        _ => Vec::new(),
    };
    if raw_ips.iter().any(|(_, ip)| *ip == "None") {
        return Ok(ServicePorts::Skipped(SkipReason::Headless));
    }
    let mut cluster_ips = Vec::new();
    for (field, raw) in raw_ips {
        if raw.is_empty() {
            continue;
        }
        let ip: IpAddr = raw
            .parse()
            .map_err(|_| err(field, format!("{raw:?} is not an IP address")))?;
        cluster_ips.push(ip);
    }
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(err(
                "spec.internalTrafficPolicy".into(),
                format!("unknown policy {other:?} (want Cluster or Local)"),
            ))
        }
    };
    let mut external_ips = Vec::new();
    for (i, raw) in spec.external_ips.iter().flatten().enumerate() {
        let ip: IpAddr = raw.parse().map_err(|_| {
            err(
                format!("spec.externalIPs[{i}]"),
                format!("{raw:?} is not an IP address"),
            )
        })?;
        external_ips.push(ip);
    }
    let mut load_balancer_ips = Vec::new();
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(raw) = ing.ip.as_deref().filter(|r| !r.is_empty()) else {
                continue; // hostname-only ingress: nothing to program
            };
            let ip: IpAddr = raw.parse().map_err(|_| {
                err(
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{raw:?} is not an IP address"),
                )
            })?;
            match ing.ip_mode.as_deref() {
                None | Some("VIP") => load_balancer_ips.push(ip),
                Some("Proxy") => {}
                Some(other) => {
                    return Err(err(
                        format!("status.loadBalancer.ingress[{i}].ipMode"),
                        format!("unknown ipMode {other:?} (want VIP or Proxy)"),
                    ))
                }
            }
        }
    }
    let mut source_ranges = Vec::new();
    for (i, raw) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        let net: IpNetwork = raw.trim().parse().map_err(|_| {
            err(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{raw:?} is not a CIDR"),
            )
        })?;
        // Normalise to the network address, as the API server's validation implies.
        let net = IpNetwork::new(net.network(), net.prefix()).unwrap_or(net);
        source_ranges.push(net);
    }
    let externally_accessible = svc_type != "ClusterIP" || !external_ips.is_empty();
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => externally_accessible,
        Some(other) => {
            return Err(err(
                "spec.externalTrafficPolicy".into(),
                format!("unknown policy {other:?} (want Cluster or Local)"),
            ))
        }
    };
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if external_local && svc_type == "LoadBalancer" => {
            Some(valid_port(p).ok_or_else(|| {
                err(
                    "spec.healthCheckNodePort".into(),
                    format!("{p} is not a port in 1..65535"),
                )
            })?)
        }
        _ => None,
    };
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let raw = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            let t = u32::try_from(raw)
                .ok()
                .filter(|t| (1..=MAX_AFFINITY_TIMEOUT).contains(t))
                .ok_or_else(|| {
                    err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{raw} is not in 1..{MAX_AFFINITY_TIMEOUT}"),
                    )
                })?;
            Some(t)
        }
        Some(other) => {
            return Err(err(
                "spec.sessionAffinity".into(),
                format!("unknown affinity {other:?} (want None or ClientIP)"),
            ))
        }
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut out: Vec<std::sync::Arc<ServiceInfo>> = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let protocol = Protocol::from_k8s(p.protocol.as_deref()).ok_or_else(|| {
            err(
                field("protocol"),
                format!(
                    "unknown protocol {:?} (want TCP, UDP or SCTP)",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            )
        })?;
        let port = valid_port(p.port).ok_or_else(|| {
            err(
                field("port"),
                format!("{} is not a port in 1..65535", p.port),
            )
        })?;
        let node_port = match (svc_type, p.node_port) {
            ("NodePort" | "LoadBalancer", Some(np)) => Some(valid_port(np).ok_or_else(|| {
                err(field("nodePort"), format!("{np} is not a port in 1..65535"))
            })?),
            _ => None,
        };
        let name = ServicePortName {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            port: p.name.clone().unwrap_or_default(),
            protocol,
        };
        if out
            .iter()
            .any(|o| o.port == port && o.name.protocol == protocol)
        {
            return Err(err(
                field("port"),
                format!("duplicate port {port}/{protocol}"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(err(
                field("name"),
                format!("duplicate port {:?}", name.port),
            ));
        }
        out.push(std::sync::Arc::new(ServiceInfo {
            name,
            cluster_ips: cluster_ips.clone(),
            port,
            node_port,
            internal_local,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            source_ranges: source_ranges.clone(),
            external_local,
            health_check_node_port,
            affinity_timeout,
        }));
    }
    Ok(ServicePorts::Ports(out))
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(ranges: &[&str], lb_ips: &[&str]) -> ServiceInfo {
        let mut info = ServiceInfo::new(
            ServicePortName {
                namespace: "d".into(),
                name: "lb".into(),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            vec!["10.96.0.10".parse().unwrap()],
            80,
        );
        info.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        info.load_balancer_ips = lb_ips.iter().map(|i| i.parse().unwrap()).collect();
        info
    }

    fn nets(v: &[&str]) -> Vec<IpNetwork> {
        v.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn load_balancer_ips_are_allowed_sources_when_a_range_holds_a_node_address() {
        let info = lb(
            &[
                "192.168.0.0/16",
                "192.168.77.0/24",
                "10.1.2.3/8",
                "fd00:77::/64",
            ],
            &["192.0.2.80", "fd00:1::80"],
        );
        let nodes: Vec<IpAddr> = vec!["192.168.77.10".parse().unwrap()];
        assert_eq!(
            info.allowed_lb_sources(&nodes, true),
            nets(&["10.0.0.0/8", "192.168.0.0/16", "192.0.2.80/32"]),
            "host bits cleared, the covered /24 dropped, the VIP added"
        );
        assert_eq!(
            info.allowed_lb_sources(&nodes, false),
            nets(&["fd00:77::/64"]),
            "no IPv6 node address in an IPv6 range: the IPv6 VIP is not added"
        );
        let nodes: Vec<IpAddr> = vec![
            "203.0.113.1".parse().unwrap(),
            "fd00:77::10".parse().unwrap(),
        ];
        assert_eq!(
            info.allowed_lb_sources(&nodes, true),
            nets(&["10.0.0.0/8", "192.168.0.0/16"]),
            "no node address in a range: the ranges only"
        );
        assert_eq!(
            info.allowed_lb_sources(&nodes, false),
            nets(&["fd00:77::/64", "fd00:1::80/128"])
        );
    }

    fn svc(yaml: &str) -> Service {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn nodeport_service_yields_one_info_per_port() {
        let s = svc(r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
"#);
        let ServicePorts::Ports(ports) = service_ports(&s).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].name.to_string(), "demo/web:http/TCP");
        assert_eq!(ports[0].node_port, Some(30080));
        assert_eq!(ports[1].name.protocol, Protocol::Udp);
        assert_eq!(
            ports[1].cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn headless_externalname_and_other_proxy_services_are_skipped() {
        let headless = svc("{apiVersion: v1, kind: Service, metadata: {name: h}, spec: {clusterIP: None, ports: [{port: 80}]}}");
        assert_eq!(
            service_ports(&headless).unwrap(),
            ServicePorts::Skipped(SkipReason::Headless)
        );
        let ext = svc("{apiVersion: v1, kind: Service, metadata: {name: e}, spec: {type: ExternalName, externalName: example.org}}");
        assert_eq!(
            service_ports(&ext).unwrap(),
            ServicePorts::Skipped(SkipReason::ExternalName)
        );
        let other = svc("{apiVersion: v1, kind: Service, metadata: {name: o, labels: {service.kubernetes.io/service-proxy-name: foo}}, spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}}");
        assert_eq!(
            service_ports(&other).unwrap(),
            ServicePorts::Skipped(SkipReason::OtherProxy("foo".into()))
        );
    }

    #[test]
    fn invalid_fields_are_named_in_the_error() {
        let bad_ip = svc("{apiVersion: v1, kind: Service, metadata: {name: b, namespace: x}, spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}}");
        let e = service_ports(&bad_ip).unwrap_err();
        assert_eq!(e.field, "spec.clusterIP");
        assert_eq!(
            e.to_string(),
            "Service x/b: field spec.clusterIP: \"10.96.0.300\" is not an IP address"
        );
        let bad_port = svc("{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {clusterIP: 10.96.0.3, ports: [{port: 80}, {name: x, port: 70000}]}}");
        assert_eq!(
            service_ports(&bad_port).unwrap_err().field,
            "spec.ports[1].port"
        );
        let bad_proto = svc("{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {clusterIP: 10.96.0.3, ports: [{port: 80, protocol: ICMP}]}}");
        assert_eq!(
            service_ports(&bad_proto).unwrap_err().field,
            "spec.ports[0].protocol"
        );
        let bad_type =
            svc("{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {type: Magic}}");
        assert_eq!(service_ports(&bad_type).unwrap_err().field, "spec.type");
        let bad_itp = svc("{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {clusterIP: 10.96.0.3, internalTrafficPolicy: Nearby, ports: [{port: 80}]}}");
        assert_eq!(
            service_ports(&bad_itp).unwrap_err().field,
            "spec.internalTrafficPolicy"
        );
    }

    #[test]
    fn clusterip_service_has_no_nodeport_even_if_one_is_given() {
        let s = svc("{apiVersion: v1, kind: Service, metadata: {name: c}, spec: {clusterIP: 10.96.0.3, ports: [{port: 80, nodePort: 30001}]}}");
        let ServicePorts::Ports(p) = service_ports(&s).unwrap() else {
            panic!()
        };
        assert_eq!(p[0].node_port, None);
    }
}
