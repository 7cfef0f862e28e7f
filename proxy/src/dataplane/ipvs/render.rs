//! Pure rendering: [`DesiredState`] -> the desired virtual servers ([`IpvsState`]) and the
//! addresses to bind to the dummy interface. Nothing here touches the kernel.
//!
//! One virtual server per frontend, as kube-proxy's IPVS mode: each ClusterIP, the
//! NodePort on each node address, each external IP and load-balancer IP. ClusterIPs use
//! the cluster-wide endpoints (this node's with `internalTrafficPolicy: Local`); external
//! frontends the cluster-wide ones, or this node's with `externalTrafficPolicy: Local`.
//! A frontend without endpoints still gets its virtual server (nftables rejects its new
//! connections before IPVS sees them). Session affinity becomes the `persistent` flag with
//! the affinity timeout.

use super::{IpvsState, RealServer, Scheduler, ServiceKey, ServiceState, VirtualServer};
use crate::model::{DesiredState, Endpoint, ServicePortState};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// Node-level IPVS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpvsConfig {
    /// `--ipvs-scheduler`.
    pub scheduler: Scheduler,
}

/// The weight of every real server (kube-proxy uses 1).
pub const WEIGHT: u32 = 1;

/// The virtual servers one Service port needs.
pub fn service_port(sp: &ServicePortState, node_ips: &[IpAddr], cfg: &IpvsConfig) -> IpvsState {
    let info = &sp.info;
    let mut out = IpvsState::new();
    for family_v4 in [true, false] {
        let fam = |ip: &&IpAddr| ip.is_ipv4() == family_v4;
        // Single-stack Services serve only the family of their ClusterIPs.
        if !info.cluster_ips.iter().any(|ip| fam(&ip)) {
            continue;
        }
        let eps = |list: &[Endpoint]| -> BTreeMap<SocketAddr, RealServer> {
            list.iter()
                .filter(|e| e.ip.is_ipv4() == family_v4)
                .map(|e| {
                    let a = SocketAddr::new(e.ip, e.port);
                    (a, RealServer::new(a, WEIGHT))
                })
                .collect()
        };
        let internal = eps(if info.internal_local {
            &sp.local_endpoints
        } else {
            &sp.endpoints
        });
        let external = eps(if info.external_local {
            &sp.local_endpoints
        } else {
            &sp.endpoints
        });
        let mut add = |addr: IpAddr, port: u16, dests: &BTreeMap<SocketAddr, RealServer>| {
            let key = ServiceKey {
                addr,
                protocol: info.name.protocol,
                port,
            };
            out.insert(
                key,
                ServiceState {
                    server: VirtualServer {
                        key,
                        scheduler: cfg.scheduler.as_str().to_owned(),
                        persistent_timeout: info.affinity_timeout,
                    },
                    dests: dests.clone(),
                },
            );
        };
        for ip in info.cluster_ips.iter().filter(fam) {
            add(*ip, info.port, &internal);
        }
        if let Some(np) = info.node_port {
            for ip in node_ips.iter().filter(fam) {
                add(*ip, np, &external);
            }
        }
        for ip in info
            .external_ips
            .iter()
            .chain(&info.load_balancer_ips)
            .filter(fam)
        {
            add(*ip, info.port, &external);
        }
    }
    out
}

/// Every virtual server of the desired state.
pub fn desired(state: &DesiredState, cfg: &IpvsConfig) -> IpvsState {
    let mut out = IpvsState::new();
    for sp in state.services.values() {
        out.extend(service_port(sp, &state.node_ips, cfg));
    }
    out
}

/// The addresses bound to the dummy interface: every virtual server address that is not
/// one of the node's own.
pub fn bound_addresses(state: &DesiredState) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for sp in state.services.values() {
        let info = &sp.info;
        out.extend(info.cluster_ips.iter().copied());
        out.extend(info.external_ips.iter().copied());
        out.extend(info.load_balancer_ips.iter().copied());
    }
    for ip in &state.node_ips {
        out.remove(ip);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::{Protocol, ServiceInfo, ServicePortName};

    fn name(n: &str, proto: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: "demo".into(),
            name: n.into(),
            port: "p".into(),
            protocol: proto,
        }
    }

    fn ep(ip: &str, local: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            is_local: local,
        }
    }

    fn state(sps: Vec<ServicePortState>) -> DesiredState {
        let mut s = DesiredState {
            node_ips: vec!["192.168.77.10".parse().unwrap()],
            ..Default::default()
        };
        for sp in sps {
            s.services.insert(sp.info.name.clone(), sp);
        }
        s
    }

    #[test]
    fn nodeport_service_gets_a_virtual_server_per_frontend_with_every_endpoint() {
        let mut info = ServiceInfo::new(
            name("web", Protocol::Tcp),
            vec!["10.96.0.10".parse().unwrap()],
            80,
        );
        info.node_port = Some(30080);
        info.external_ips = vec!["203.0.113.5".parse().unwrap()];
        let sp = ServicePortState::from_endpoints(
            info,
            vec![ep("10.244.1.10", true), ep("10.244.2.10", false)],
        );
        let st = state(vec![sp]);
        let d = desired(&st, &IpvsConfig::default());
        let keys: Vec<String> = d.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            [
                "10.96.0.10:80/tcp",
                "192.168.77.10:30080/tcp",
                "203.0.113.5:80/tcp"
            ]
        );
        for s in d.values() {
            assert_eq!(s.dests.len(), 2);
            assert_eq!(s.server.scheduler, "rr");
            assert_eq!(s.server.persistent_timeout, None);
        }
        let bound: Vec<String> = bound_addresses(&st).iter().map(|a| a.to_string()).collect();
        assert_eq!(bound, ["10.96.0.10", "203.0.113.5"]);
    }

    #[test]
    fn etp_local_nodeport_uses_only_local_endpoints_and_affinity_is_persistence() {
        let mut info = ServiceInfo::new(
            name("web", Protocol::Udp),
            vec!["10.96.0.11".parse().unwrap()],
            53,
        );
        info.node_port = Some(30053);
        info.external_local = true;
        info.affinity_timeout = Some(60);
        let sp = ServicePortState::from_endpoints(
            info,
            vec![ep("10.244.1.10", true), ep("10.244.2.10", false)],
        );
        let cfg = IpvsConfig {
            scheduler: Scheduler::Sh,
        };
        let d = desired(&state(vec![sp]), &cfg);
        let cluster = d.values().find(|s| s.server.key.port == 53).unwrap();
        let node = d.values().find(|s| s.server.key.port == 30053).unwrap();
        assert_eq!(cluster.dests.len(), 2);
        assert_eq!(
            node.dests.keys().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["10.244.1.10:8080"]
        );
        assert_eq!(node.server.persistent_timeout, Some(60));
        assert_eq!(node.server.scheduler, "sh");
        assert_eq!(node.server.key.protocol, Protocol::Udp);
    }
}
