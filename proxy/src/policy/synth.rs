//! A synthetic, deterministic cluster for benchmarks: pods with realistic labels and named
//! ports spread over namespaces, and a mix of NetworkPolicies (default denies, pod and
//! namespace selectors, ipBlocks with excepts, named and numeric ports and ranges, ingress
//! and egress). Pure: no randomness source, the same sizes always give the same objects.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};

/// Failures building the synthetic objects (only if the JSON shapes here were wrong).
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// A generated object did not deserialize.
    #[error("synthetic {kind} {name}: {source}")]
    Object {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The serde error.
        source: serde_json::Error,
    },
}

/// Sizes of a synthetic cluster.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Pods.
    pub pods: usize,
    /// NetworkPolicies.
    pub policies: usize,
    /// Namespaces.
    pub namespaces: usize,
    /// Pods on the node the policies are rendered for.
    pub local: usize,
}

/// The generated objects and this node's pod IPs.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Pods (dual-stack: 10.244.x.y and fd00:10:244::/56).
    pub pods: Vec<Pod>,
    /// Namespaces (labels `team`, `env`).
    pub namespaces: Vec<Namespace>,
    /// NetworkPolicies.
    pub policies: Vec<NetworkPolicy>,
    /// IPs (both families) of the pods on this node.
    pub local: BTreeSet<IpAddr>,
}

const APPS: [&str; 12] = [
    "web", "api", "auth", "cart", "search", "db", "cache", "queue", "worker", "dns", "mail",
    "report",
];
const TIERS: [&str; 3] = ["frontend", "backend", "data"];

fn pod_ips(i: usize) -> (String, String) {
    (
        format!("10.244.{}.{}", i / 250, i % 250 + 1),
        format!("fd00:10:244:{:x}::{:x}", i / 250, i % 250 + 1),
    )
}

fn pod_labels(i: usize, namespaces: usize, app_shift: usize) -> Value {
    let app = APPS[(i / namespaces.max(1) + app_shift) % APPS.len()];
    json!({"app": app, "tier": TIERS[i % 3], "version": format!("v{}", i % 4),
           "pod-template-hash": format!("{:08x}", i.wrapping_mul(2_654_435_761) % (1 << 32))})
}

fn pod_json(i: usize, namespaces: usize, app_shift: usize) -> Value {
    let (v4, v6) = pod_ips(i);
    let mut ports = vec![
        json!({"name": "http", "containerPort": 8080 + (i % 3), "protocol": "TCP"}),
        json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"}),
    ];
    if i.is_multiple_of(5) {
        ports.push(json!({"name": "grpc", "containerPort": 50051, "protocol": "TCP"}));
    }
    if i.is_multiple_of(7) {
        ports.push(json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}));
    }
    json!({
        "metadata": {"namespace": format!("ns{}", i % namespaces.max(1)), "name": format!("pod-{i}"),
                     "labels": pod_labels(i, namespaces, app_shift)},
        "spec": {"containers": [{"name": "main", "ports": ports}]},
        "status": {"podIP": v4, "podIPs": [{"ip": v4}, {"ip": v6}]},
    })
}

fn policy_spec(j: usize, namespaces: usize) -> Value {
    let app = APPS[j % APPS.len()];
    let other = APPS[(j / 3 + 1) % APPS.len()];
    let team = format!("t{}", j % 5);
    if j < namespaces {
        return json!({"podSelector": {}, "policyTypes": ["Ingress"]});
    }
    match j % 8 {
        0 => json!({"podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "frontend"}}}],
                         "ports": [{"port": "http"}]}]}),
        1 => json!({"podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": team}}}],
                         "ports": [{"port": 8080, "endPort": 8090}]}]}),
        2 => json!({"podSelector": {"matchLabels": {"app": app, "tier": "frontend"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16", "10.96.0.0/12"]}},
                                  {"ipBlock": {"cidr": "fd00::/8", "except": ["fd00:10:244::/56"]}}],
                         "ports": [{"port": 443}, {"port": 80}]}]}),
        3 => json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "dns"}}}],
                        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        4 => json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                            "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                        "ports": [{"port": 443}, {"port": 80}]},
                       {"to": [{"podSelector": {"matchLabels": {"app": other}}}],
                        "ports": [{"port": "grpc"}, {"port": "http"}]}]}),
        5 => {
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [app, other]}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}},
                                   "podSelector": {"matchLabels": {"app": "report"}}}],
                         "ports": [{"port": "metrics"}]}]})
        }
        6 => json!({"podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "backend"}}}],
                         "ports": [{"port": 5432}, {"port": 6379, "endPort": 6380}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
            "policyTypes": ["Ingress", "Egress"]}),
        _ => {
            json!({"podSelector": {"matchExpressions": [{"key": "version", "operator": "NotIn", "values": ["v0"]}]},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": other}}},
                                  {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
                                   "podSelector": {"matchLabels": {"tier": "backend"}}}]},
                        {"ports": [{"protocol": "UDP"}, {"port": 30000, "endPort": 32767}]}]})
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    name: String,
    v: Value,
) -> Result<T, SynthError> {
    serde_json::from_value(v).map_err(|source| SynthError::Object { kind, name, source })
}

/// Generates a cluster of the given sizes. Local pods are spread evenly over all pods.
pub fn generate(sizes: Sizes) -> Result<Cluster, SynthError> {
    let ns_count = sizes.namespaces.max(1);
    let pods = (0..sizes.pods)
        .map(|i| parse("Pod", format!("pod-{i}"), pod_json(i, ns_count, 0)))
        .collect::<Result<Vec<Pod>, _>>()?;
    let namespaces = (0..ns_count)
        .map(|n| {
            let env = if n.is_multiple_of(3) {
                "staging"
            } else {
                "prod"
            };
            parse(
                "Namespace",
                format!("ns{n}"),
                json!({"metadata": {"name": format!("ns{n}"),
                      "labels": {"team": format!("t{}", n % 5), "env": env}}}),
            )
        })
        .collect::<Result<Vec<Namespace>, _>>()?;
    let policies = (0..sizes.policies)
        .map(|j| {
            let name = format!("np-{j}");
            parse(
                "NetworkPolicy",
                name.clone(),
                json!({"metadata": {"namespace": format!("ns{}", j % ns_count), "name": name},
                       "spec": policy_spec(j, ns_count)}),
            )
        })
        .collect::<Result<Vec<NetworkPolicy>, _>>()?;
    let step = (sizes.pods / sizes.local.max(1)).max(1);
    let mut local = BTreeSet::new();
    for i in (0..sizes.pods).step_by(step).take(sizes.local) {
        let (v4, v6) = pod_ips(i);
        for ip in [v4, v6] {
            if let Ok(ip) = ip.parse() {
                local.insert(ip);
            }
        }
    }
    Ok(Cluster {
        pods,
        namespaces,
        policies,
        local,
    })
}

/// Gives pod `index` another `app` label (the next one in the list), as a deployment
/// relabel would.
pub fn relabel(cluster: &mut Cluster, index: usize, namespaces: usize) -> Result<(), SynthError> {
    if let Some(p) = cluster.pods.get_mut(index) {
        *p = parse(
            "Pod",
            format!("pod-{index}"),
            pod_json(index, namespaces.max(1), 1),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySet;

    #[test]
    fn synthetic_cluster_is_valid_and_deterministic() {
        let sizes = Sizes {
            pods: 100,
            policies: 40,
            namespaces: 5,
            local: 10,
        };
        let c = generate(sizes).unwrap();
        let (set, errors) = PolicySet::build(&c.policies, &c.pods, &c.namespaces);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(set.pods().len(), 100);
        assert_eq!(c.local.len(), 20);
        assert!(set.policies().iter().any(|p| p.egress.is_some()));
        assert_eq!(
            format!("{:?}", generate(sizes).unwrap().policies),
            format!("{:?}", c.policies)
        );
    }
}
