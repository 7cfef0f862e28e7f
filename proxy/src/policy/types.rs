//! Reduced, validated inputs of the policy model: label selectors, pods, namespaces,
//! protocols, and the single error type for rejected policy fields.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Label key that the API server sets on every namespace to its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Object labels.
pub type Labels = BTreeMap<String, String>;

pub use crate::objects::Protocol;

/// A pod identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl PodKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A named container port of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    /// Port name (IANA_SVC_NAME).
    pub name: String,
    /// Container port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// The parts of a Pod that policy evaluation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Identity.
    pub key: PodKey,
    /// Labels.
    pub labels: Labels,
    /// Pod IPs (status.podIPs, or status.podIP); empty until assigned.
    pub ips: Vec<IpAddr>,
    /// Named container ports, used to resolve named policy ports.
    pub named_ports: Vec<NamedPort>,
    /// `spec.nodeName`: the node the pod runs on, once scheduled.
    pub node_name: Option<String>,
}

impl PodInfo {
    /// Reduces a Pod. Unparsable IPs and unnamed or out-of-range ports are dropped
    /// (they cannot match anything). A pod without a name, or on the host network (its IP
    /// is the node's; policies do not apply to it, as with common CNIs), is ignored (`None`).
    pub fn from_pod(pod: &Pod) -> Option<PodInfo> {
        let name = pod.metadata.name.clone()?;
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
        {
            return None;
        }
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let mut ips = Vec::new();
        // A finished pod's addresses may already belong to a new pod: it has none here.
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if let Some(status) = pod.status.as_ref().filter(|_| !finished) {
            let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
            for ip in listed.chain(status.pod_ip.as_deref()) {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
        }
        let mut named_ports = Vec::new();
        if let Some(spec) = &pod.spec {
            let containers = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten());
            for cp in containers.flat_map(|c| c.ports.iter().flatten()) {
                let (Some(name), Ok(port), Some(protocol)) = (
                    cp.name.clone(),
                    u16::try_from(cp.container_port),
                    Protocol::from_k8s(cp.protocol.as_deref()),
                ) else {
                    continue;
                };
                named_ports.push(NamedPort {
                    name,
                    port,
                    protocol,
                });
            }
        }
        Some(PodInfo {
            key: PodKey { namespace, name },
            labels,
            ips,
            named_ports,
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        })
    }

    /// The container port named `name` with protocol `protocol`, if any.
    pub fn resolve_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// Namespace labels, always including [`NAMESPACE_NAME_LABEL`].
pub fn namespace_labels(ns: &Namespace) -> Option<(String, Labels)> {
    let name = ns.metadata.name.clone()?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels
        .entry(NAMESPACE_NAME_LABEL.to_string())
        .or_insert_with(|| name.clone());
    Some((name, labels))
}

/// One matchExpressions requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// Key present with a value in the set.
    In(String, BTreeSet<String>),
    /// Key absent, or present with a value outside the set.
    NotIn(String, BTreeSet<String>),
    /// Key present.
    Exists(String),
    /// Key absent.
    DoesNotExist(String),
}

/// A validated label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// matchLabels.
    pub match_labels: Labels,
    /// matchExpressions.
    pub expressions: Vec<Requirement>,
}

impl Selector {
    /// Validates an API selector. `field` names where it sits; the error is
    /// `(field path, reason)`.
    pub fn parse(sel: &LabelSelector, field: &str) -> Result<Selector, (String, String)> {
        let mut expressions = Vec::new();
        for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
            let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
            let at = format!("{field}.matchExpressions[{i}]");
            let r = match req.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    let reason = format!("values must be non-empty for {}", req.operator);
                    return Err((format!("{at}.values"), reason));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    let reason = format!("values must be empty for {}", req.operator);
                    return Err((format!("{at}.values"), reason));
                }
                "In" => Requirement::In(req.key.clone(), values),
                "NotIn" => Requirement::NotIn(req.key.clone(), values),
                "Exists" => Requirement::Exists(req.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(req.key.clone()),
                other => {
                    return Err((
                        format!("{at}.operator"),
                        format!("unknown operator {other:?}"),
                    ))
                }
            };
            expressions.push(r);
        }
        Ok(Selector {
            match_labels: sel.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    /// True when every matchLabels pair and every requirement holds for `labels`.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| match r {
                Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// A policy field that failed validation; the policy then fails closed. `policy` is
/// `namespace/name`, `field` the JSON path, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An ipBlock cidr or except entry that is not a CIDR, or an except outside its cidr.
    #[error("NetworkPolicy {policy}: {field}: invalid CIDR {value:?}: {reason}")]
    InvalidCidr {
        /// Policy `namespace/name`.
        policy: String,
        /// Offending field.
        field: String,
        /// The rejected text.
        value: String,
        /// Why.
        reason: String,
    },
    /// A port protocol other than TCP, UDP, SCTP.
    #[error("NetworkPolicy {policy}: {field}: unknown protocol {value:?}")]
    UnknownProtocol {
        /// Policy `namespace/name`.
        policy: String,
        /// Offending field.
        field: String,
        /// The rejected text.
        value: String,
    },
    /// A label selector with an unknown operator or inconsistent values.
    #[error("NetworkPolicy {policy}: {field}: bad selector: {reason}")]
    BadSelector {
        /// Policy `namespace/name`.
        policy: String,
        /// Offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A port number, name or endPort that cannot be used.
    #[error("NetworkPolicy {policy}: {field}: invalid port: {reason}")]
    InvalidPort {
        /// Policy `namespace/name`.
        policy: String,
        /// Offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// Anything else the API would reject (unknown policyType, empty peer).
    #[error("NetworkPolicy {policy}: {field}: {reason}")]
    Invalid {
        /// Policy `namespace/name`.
        policy: String,
        /// Offending field.
        field: String,
        /// Why.
        reason: String,
    },
}
