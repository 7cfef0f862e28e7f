//! Which endpoints each kind of traffic to a Service port uses: traffic policies,
//! topology hints and the terminating-endpoint fallback, as upstream kube-proxy decides.
//!
//! - Cluster traffic (ClusterIP without `internalTrafficPolicy: Local`, external traffic
//!   without `externalTrafficPolicy: Local`) uses ready endpoints, narrowed by topology
//!   hints when every ready endpoint has them and some are for this node (`forNodes`) or
//!   its zone (`forZones`); with no ready endpoint it falls back to serving+terminating
//!   ones.
//! - Local traffic uses this node's ready endpoints, or its serving+terminating ones when
//!   none is ready. Hints do not apply.
//! - Endpoints that are neither ready nor serving+terminating are never used.

use super::endpoint::EndpointInfo;
use super::ServiceInfo;

/// The endpoints of one Service port, per kind of traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized<'a> {
    /// For cluster-wide traffic (empty when no traffic uses it).
    pub cluster: Vec<&'a EndpointInfo>,
    /// For Local-policy traffic (empty when no traffic uses it).
    pub local: Vec<&'a EndpointInfo>,
    /// Whether any usable endpoint exists anywhere: if not, traffic is rejected; if so,
    /// traffic whose list is empty is dropped.
    pub has_any: bool,
}

/// Which topology narrowing applies to cluster traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every ready endpoint has node hints and one is for this node.
    SameNode,
    /// Every ready endpoint has zone hints and one is for this node's zone.
    SameZone,
    /// Hints are missing somewhere or do not cover this node: use every endpoint.
    None,
}

fn topology_mode(eps: &[&EndpointInfo], node: &str, zone: Option<&str>) -> Topology {
    let ready = || eps.iter().copied().filter(|e| e.ready);
    if ready().next().is_none() {
        return Topology::None;
    }
    let all_node_hints = ready().all(|e| !e.node_hints().is_empty());
    if all_node_hints && ready().any(|e| e.node_hints().iter().any(|h| &**h == node)) {
        return Topology::SameNode;
    }
    let all_zone_hints = ready().all(|e| !e.zone_hints().is_empty());
    if let Some(zone) = zone {
        if all_zone_hints && ready().any(|e| e.zone_hints().iter().any(|h| &**h == zone)) {
            return Topology::SameZone;
        }
    }
    Topology::None
}

/// Whether an endpoint runs on this node (an endpoint without a node name counts as local,
/// as upstream treats it).
pub fn is_local(e: &EndpointInfo, node: &str) -> bool {
    e.node_name.as_deref().is_none_or(|n| n == node)
}

/// Splits the endpoints of one Service port by the traffic that uses them.
pub fn categorize<'a>(
    eps: &[&'a EndpointInfo],
    info: &ServiceInfo,
    node: &str,
    zone: Option<&str>,
) -> Categorized<'a> {
    let mut out = Categorized::default();
    let serving_terminating = |e: &&EndpointInfo| e.serving && e.terminating;
    if info.uses_cluster_endpoints() {
        let topo = topology_mode(eps, node, zone);
        let for_us = |e: &EndpointInfo| match topo {
            Topology::SameNode => e.node_hints().iter().any(|h| &**h == node),
            Topology::SameZone => zone.is_some_and(|z| e.zone_hints().iter().any(|h| &**h == z)),
            Topology::None => true,
        };
        out.cluster = eps
            .iter()
            .copied()
            .filter(|e| e.ready && for_us(e))
            .collect();
        if out.cluster.is_empty() {
            out.cluster = eps.iter().copied().filter(serving_terminating).collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !info.uses_local_endpoints() {
        return out;
    }
    out.has_any |= eps.iter().any(|e| e.ready || serving_terminating(e));
    let here: Vec<&EndpointInfo> = eps.iter().copied().filter(|e| is_local(e, node)).collect();
    out.local = here.iter().copied().filter(|e| e.ready).collect();
    if out.local.is_empty() {
        out.local = here.into_iter().filter(serving_terminating).collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};
    use std::net::IpAddr;
    use std::sync::Arc;

    /// `spec`: "ip node [ready|serving|terminating]* [z:zone]* [n:node]*".
    fn ep(spec: &str) -> EndpointInfo {
        let mut it = spec.split_whitespace();
        let ip: IpAddr = it.next().unwrap().parse().unwrap();
        let node = it.next().unwrap();
        let mut e = EndpointInfo {
            ip,
            port: 80,
            ready: false,
            serving: false,
            terminating: false,
            node_name: Some(Arc::from(node)),
            zone: None,
            hints: None,
        };
        for w in it {
            match w {
                "ready" => {
                    e.ready = true;
                    e.serving = true;
                }
                "serving" => e.serving = true,
                "terminating" => e.terminating = true,
                z if z.starts_with("z:") => e
                    .hints
                    .get_or_insert_default()
                    .zones
                    .push(Arc::from(&z[2..])),
                n if n.starts_with("n:") => e
                    .hints
                    .get_or_insert_default()
                    .nodes
                    .push(Arc::from(&n[2..])),
                other => panic!("bad word {other}"),
            }
        }
        e
    }

    fn info(itp_local: bool, etp_local: bool, node_port: bool) -> ServiceInfo {
        ServiceInfo {
            name: ServicePortName {
                namespace: "ns".into(),
                name: "s".into(),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            cluster_ips: vec![IpAddr::from([10, 96, 0, 1])],
            port: 80,
            node_port: node_port.then_some(30080),
            internal_local: itp_local,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            external_local: etp_local && node_port,
            health_check_node_port: None,
            affinity_timeout: None,
        }
    }

    fn categorize<'a>(
        eps: &'a [EndpointInfo],
        info: &ServiceInfo,
        node: &str,
        zone: Option<&str>,
    ) -> Categorized<'a> {
        let refs: Vec<&EndpointInfo> = eps.iter().collect();
        super::categorize(&refs, info, node, zone)
    }

    fn ips(list: &[&EndpointInfo]) -> Vec<String> {
        list.iter().map(|e| e.ip.to_string()).collect()
    }

    #[test]
    fn cluster_traffic_uses_ready_endpoints_only() {
        let eps = [
            ep("10.0.0.1 n1 ready"),
            ep("10.0.0.2 n2 serving terminating"),
            ep("10.0.0.3 n2"),
        ];
        let c = categorize(&eps, &info(false, false, false), "n1", None);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
        assert!(c.local.is_empty());
        assert!(c.has_any);
    }

    #[test]
    fn with_nothing_ready_cluster_traffic_falls_back_to_serving_terminating_never_to_non_serving() {
        let eps = [
            ep("10.0.0.1 n1 terminating"),
            ep("10.0.0.2 n2 serving terminating"),
            ep("10.0.0.3 n2 serving"),
        ];
        let c = categorize(&eps, &info(false, false, false), "n1", None);
        assert_eq!(ips(&c.cluster), ["10.0.0.2"]);
        let none = [ep("10.0.0.1 n1 terminating"), ep("10.0.0.3 n2")];
        let c = categorize(&none, &info(false, false, false), "n1", None);
        assert!(c.cluster.is_empty());
        assert!(!c.has_any, "nothing usable: traffic is rejected");
    }

    #[test]
    fn local_traffic_uses_local_ready_then_local_serving_terminating() {
        let eps = [
            ep("10.0.0.1 n1 serving terminating"),
            ep("10.0.0.2 n2 ready"),
        ];
        let c = categorize(&eps, &info(true, false, false), "n1", None);
        assert!(c.cluster.is_empty(), "ITP Local without external access");
        assert_eq!(ips(&c.local), ["10.0.0.1"]);
        let eps = [
            ep("10.0.0.1 n1 serving terminating"),
            ep("10.0.0.4 n1 ready"),
        ];
        let c = categorize(&eps, &info(true, false, false), "n1", None);
        assert_eq!(ips(&c.local), ["10.0.0.4"]);
    }

    #[test]
    fn no_local_endpoint_but_some_elsewhere_means_drop_not_reject() {
        let eps = [ep("10.0.0.2 n2 ready")];
        let c = categorize(&eps, &info(true, false, false), "n1", None);
        assert!(c.local.is_empty());
        assert!(c.has_any);
    }

    #[test]
    fn etp_local_service_uses_both_lists() {
        let eps = [ep("10.0.0.1 n1 ready"), ep("10.0.0.2 n2 ready")];
        let c = categorize(&eps, &info(false, true, true), "n1", None);
        assert_eq!(ips(&c.cluster), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(ips(&c.local), ["10.0.0.1"]);
    }

    #[test]
    fn zone_hints_narrow_cluster_traffic_when_they_cover_this_zone() {
        let eps = [
            ep("10.0.0.1 n1 ready z:a"),
            ep("10.0.0.2 n2 ready z:b"),
            ep("10.0.0.3 n3 ready z:a"),
        ];
        let i = info(false, false, false);
        assert_eq!(
            ips(&categorize(&eps, &i, "n1", Some("a")).cluster),
            ["10.0.0.1", "10.0.0.3"]
        );
        // This zone has no hint: every endpoint.
        assert_eq!(categorize(&eps, &i, "n1", Some("c")).cluster.len(), 3);
        // The node has no zone label: every endpoint.
        assert_eq!(categorize(&eps, &i, "n1", None).cluster.len(), 3);
        // One ready endpoint lacks hints: every endpoint.
        let partial = [ep("10.0.0.1 n1 ready z:a"), ep("10.0.0.2 n2 ready")];
        assert_eq!(categorize(&partial, &i, "n1", Some("a")).cluster.len(), 2);
    }

    #[test]
    fn node_hints_win_over_zone_hints_and_fall_back_to_zones() {
        let eps = [
            ep("10.0.0.1 n1 ready z:a n:n1"),
            ep("10.0.0.2 n2 ready z:a n:n2"),
            ep("10.0.0.3 n3 ready z:b n:n3"),
        ];
        let i = info(false, false, false);
        assert_eq!(
            ips(&categorize(&eps, &i, "n1", Some("a")).cluster),
            ["10.0.0.1"]
        );
        // No endpoint for node n4: zone hints decide.
        assert_eq!(
            ips(&categorize(&eps, &i, "n4", Some("a")).cluster),
            ["10.0.0.1", "10.0.0.2"]
        );
    }

    #[test]
    fn hints_do_not_apply_to_local_traffic() {
        let eps = [ep("10.0.0.1 n1 ready z:b"), ep("10.0.0.2 n2 ready z:a")];
        let c = categorize(&eps, &info(true, false, false), "n1", Some("a"));
        assert_eq!(ips(&c.local), ["10.0.0.1"]);
    }
}
