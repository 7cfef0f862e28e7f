//! Service -> one [`ServiceInfo`] per port, with validation naming the offending field.

use super::{ObjectKey, Protocol, ServicePortName};
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
}

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
    Ports(Vec<ServiceInfo>),
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
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut out = Vec::with_capacity(ports.len());
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
        if out.iter().any(|o: &ServiceInfo| o.name == name) {
            return Err(err(
                field("name"),
                format!("duplicate port {:?}", name.port),
            ));
        }
        out.push(ServiceInfo {
            name,
            cluster_ips: cluster_ips.clone(),
            port,
            node_port,
            internal_local,
        });
    }
    Ok(ServicePorts::Ports(out))
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
