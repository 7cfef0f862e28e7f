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
use crate::model::{DesiredState, Endpoint, ServiceDelta, ServicePortState};
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

/// IPVS as text, as `ipvsadm -Ln` lists it (golden files, debugging): a virtual server
/// a line (`PROTO ADDR:PORT SCHEDULER [persistent S]`), then its real servers
/// (`  -> ADDR:PORT weight W`).
pub fn to_text(state: &IpvsState) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (key, s) in state {
        let persistent = s
            .server
            .persistent_timeout
            .map(|t| format!(" persistent {t}"))
            .unwrap_or_default();
        let _ = writeln!(out, "{key} {}{persistent}", s.server.scheduler);
        for d in s.dests.values() {
            let _ = writeln!(out, "  -> {} weight {}", d.addr, d.weight);
        }
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

/// The addresses one Service port puts on the dummy interface (node addresses included;
/// [`Rendered`] leaves those out).
fn port_addresses(sp: &ServicePortState) -> impl Iterator<Item = IpAddr> + '_ {
    let info = &sp.info;
    info.cluster_ips
        .iter()
        .chain(&info.external_ips)
        .chain(&info.load_balancer_ips)
        .copied()
}

/// What [`Rendered::update`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Virtual servers added, changed or removed.
    pub keys: BTreeSet<ServiceKey>,
    /// Addresses the dummy interface gains.
    pub bind: BTreeSet<IpAddr>,
    /// Addresses the dummy interface loses.
    pub unbind: BTreeSet<IpAddr>,
}

/// The desired virtual servers and dummy-interface addresses, kept up to date one changed
/// Service port at a time, so that a sync renders only what changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// Every desired virtual server ([`desired`] of the state).
    pub servers: IpvsState,
    /// How many Service ports use each Service address.
    refs: BTreeMap<IpAddr, usize>,
    /// The node's addresses (never bound to the dummy interface).
    node_ips: BTreeSet<IpAddr>,
}

impl Rendered {
    /// Renders every Service port of `state`.
    pub fn new(state: &DesiredState, cfg: &IpvsConfig) -> Self {
        let mut r = Rendered {
            servers: desired(state, cfg),
            refs: BTreeMap::new(),
            node_ips: state.node_ips.iter().copied().collect(),
        };
        for sp in state.services.values() {
            for ip in port_addresses(sp) {
                *r.refs.entry(ip).or_default() += 1;
            }
        }
        r
    }

    /// The addresses bound to the dummy interface (as [`bound_addresses`]).
    pub fn bound(&self) -> BTreeSet<IpAddr> {
        self.refs
            .keys()
            .filter(|ip| !self.node_ips.contains(ip))
            .copied()
            .collect()
    }

    /// Applies the changes of Service ports (the node's addresses unchanged) and returns
    /// what they touched.
    pub fn update(&mut self, deltas: &[ServiceDelta], cfg: &IpvsConfig) -> Touched {
        let node_ips: Vec<IpAddr> = self.node_ips.iter().copied().collect();
        let mut touched = Touched::default();
        let mut before: BTreeMap<IpAddr, bool> = BTreeMap::new();
        for d in deltas {
            if let Some(old) = &d.old {
                for key in service_port(old, &node_ips, cfg).into_keys() {
                    self.servers.remove(&key);
                    touched.keys.insert(key);
                }
                for ip in port_addresses(old) {
                    let n = self.refs.entry(ip).or_default();
                    before.entry(ip).or_insert(*n > 0);
                    *n = n.saturating_sub(1);
                }
            }
            if let Some(new) = &d.new {
                let servers = service_port(new, &node_ips, cfg);
                touched.keys.extend(servers.keys().copied());
                self.servers.extend(servers);
                for ip in port_addresses(new) {
                    let n = self.refs.entry(ip).or_default();
                    before.entry(ip).or_insert(*n > 0);
                    *n += 1;
                }
            }
        }
        for (ip, was) in before {
            let now = self.refs.get(&ip).is_some_and(|n| *n > 0);
            if !now {
                self.refs.remove(&ip);
            }
            if self.node_ips.contains(&ip) || was == now {
                continue;
            }
            if now {
                touched.bind.insert(ip);
            } else {
                touched.unbind.insert(ip);
            }
        }
        touched
    }
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

    #[test]
    fn rendering_changed_ports_matches_rendering_everything() {
        let web = |ports: &[u16], eps: &[&str]| -> Vec<ServicePortState> {
            ports
                .iter()
                .map(|p| {
                    let mut n = name("web", Protocol::Tcp);
                    n.port = p.to_string();
                    let mut info = ServiceInfo::new(n, vec!["10.96.0.10".parse().unwrap()], *p);
                    info.load_balancer_ips = vec!["192.0.2.10".parse().unwrap()];
                    let eps = eps.iter().map(|e| ep(e, true)).collect();
                    ServicePortState::from_endpoints(info, eps)
                })
                .collect()
        };
        let before = state(web(&[80, 443], &["10.244.1.10"]));
        let cfg = IpvsConfig::default();
        let mut r = Rendered::new(&before, &cfg);
        assert_eq!(r.bound(), bound_addresses(&before));
        // Port 80 gains an endpoint, port 443 goes: its ClusterIP stays bound (port 80
        // still uses it).
        let after = state(web(&[80], &["10.244.1.10", "10.244.1.11"]));
        let deltas: Vec<ServiceDelta> = before
            .services
            .iter()
            .map(|(n, old)| ServiceDelta {
                name: n.clone(),
                old: Some(old.clone()),
                new: after.services.get(n).cloned(),
            })
            .collect();
        let t = r.update(&deltas, &cfg);
        assert_eq!(r, Rendered::new(&after, &cfg));
        assert_eq!(t.keys.len(), 4, "two frontends of each port: {t:?}");
        assert!(t.bind.is_empty() && t.unbind.is_empty(), "{t:?}");
        // The last port goes: both addresses are unbound.
        let gone: Vec<ServiceDelta> = after
            .services
            .iter()
            .map(|(n, old)| ServiceDelta {
                name: n.clone(),
                old: Some(old.clone()),
                new: None,
            })
            .collect();
        let t = r.update(&gone, &cfg);
        assert_eq!(r, Rendered::new(&state(vec![]), &cfg));
        assert_eq!(t.unbind.len(), 2, "{t:?}");
        assert!(r.bound().is_empty());
    }
}
