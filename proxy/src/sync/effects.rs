//! What a sync does besides programming nftables: healthCheckNodePort servers, stale UDP
//! conntrack cleanup and the per-Service gauges. The pure parts are functions of the
//! desired state: which flows here, which health-check ports and counts in
//! [`crate::sync::tally`].

use crate::dataplane::conntrack::{filters_for_change, CleanupPass, Conntrack, FlowFilter};
use crate::dataplane::ipvs::apply::{Changed, IpvsSync};
use crate::dataplane::nft::Family;
use crate::http::healthcheck::HealthCheckServer;
use crate::http::metrics::Metrics;
use crate::model::{DesiredState, Protocol, ServiceDelta, ServicePortState, Store};
use crate::routes::{desired_routes, PodRoute, RouteController};
use crate::sync::tally::ServiceTally;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use tracing::{info, warn};

/// Side effects the runner performs after each successful sync.
#[derive(Default)]
pub struct SideEffects {
    /// The healthCheckNodePort servers (`externalTrafficPolicy: Local` Services).
    pub healthcheck: Option<Arc<HealthCheckServer>>,
    /// The conntrack table, for deleting stale UDP flows.
    pub conntrack: Option<Conntrack>,
    /// Host-gw routes to other nodes' pod CIDRs.
    pub routes: Option<RouteController>,
    /// IPVS mode: the virtual servers and the dummy interface's addresses.
    pub ipvs: Option<IpvsSync>,
    ipvs_draining: bool,
    /// The tally's health version the health-check servers were last given (None: never).
    last_health: Option<u64>,
    /// The pod routes last installed.
    last_routes: Option<BTreeSet<PodRoute>>,
    /// Where this node's pod CIDRs are written for weir-cni (`--cni-pod-cidrs-file`).
    pub cni_cidrs_file: Option<std::path::PathBuf>,
    /// The pod CIDRs last written there.
    last_cni_cidrs: Option<Vec<ipnetwork::IpNetwork>>,
}

impl SideEffects {
    /// Effects with health-check servers and conntrack cleanup (either may be absent).
    pub fn new(healthcheck: Option<Arc<HealthCheckServer>>, conntrack: Option<Conntrack>) -> Self {
        SideEffects {
            healthcheck,
            conntrack,
            routes: None,
            ipvs: None,
            ipvs_draining: false,
            last_health: None,
            last_routes: None,
            cni_cidrs_file: None,
            last_cni_cidrs: None,
        }
    }

    /// Also writes this node's pod CIDRs for weir-cni to `path`.
    pub fn with_cni_cidrs_file(mut self, path: std::path::PathBuf) -> Self {
        self.cni_cidrs_file = Some(path);
        self
    }

    /// Writes this node's `spec.podCIDRs` as `{"podCIDRs": [...]}` where weir-cni reads
    /// them when its configuration has none; only when they changed, atomically.
    pub fn write_cni_cidrs(&mut self, store: &Store, me: &str) {
        let Some(path) = &self.cni_cidrs_file else {
            return;
        };
        let cidrs = store
            .node(me)
            .map(|n| n.pod_cidrs.clone())
            .unwrap_or_default();
        if cidrs.is_empty() || self.last_cni_cidrs.as_ref() == Some(&cidrs) {
            return;
        }
        let body = weir_cni_formats::NodePodCidrs {
            pod_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        };
        match write_atomically(path, body.to_json().as_bytes()) {
            Ok(()) => {
                info!(file = %path.display(), pod_cidrs = ?cidrs, "wrote this node's pod CIDRs for weir-cni");
                self.last_cni_cidrs = Some(cidrs);
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "writing the pod CIDRs for weir-cni failed")
            }
        }
    }

    /// Also installs host-gw pod routes.
    pub fn with_routes(mut self, routes: RouteController) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Brings the pod routes in line with the Node objects: when they changed, and on every
    /// full sync (which repairs routes removed behind weir's back).
    pub async fn sync_routes(&mut self, store: &Store, me: &str, full: bool) {
        let Some(rc) = &self.routes else { return };
        let want = desired_routes(store.nodes(), me);
        if !full && self.last_routes.as_ref() == Some(&want) {
            return;
        }
        match rc.sync(&want).await {
            Ok((added, removed)) => {
                if added + removed > 0 {
                    info!(added, removed, routes = want.len(), "pod routes synced");
                }
                self.last_routes = Some(want);
            }
            Err(e) => {
                warn!(error = %e, "syncing pod routes failed; retrying next sync");
                self.last_routes = None;
            }
        }
    }

    /// Programs IPVS for `state` (IPVS mode; nothing otherwise); a `full` sync reads the
    /// kernel back first, other syncs apply what `changed`. Returns false when the runner
    /// should sync again soon (a failure).
    pub async fn sync_ipvs(
        &mut self,
        state: &DesiredState,
        full: bool,
        changed: Changed<'_>,
    ) -> bool {
        let Some(ipvs) = &mut self.ipvs else {
            return true;
        };
        match ipvs.sync(state, full, changed).await {
            Ok(r) => {
                self.ipvs_draining = r.draining;
                r.failed == 0
            }
            Err(e) => {
                warn!(error = %e, "IPVS sync failed; retrying");
                false
            }
        }
    }

    /// Whether removed IPVS real servers are still draining after the last sync (a later
    /// sync deletes them once their connections are gone).
    pub fn ipvs_draining(&self) -> bool {
        self.ipvs_draining
    }

    /// Runs after the rules for `state` are in place: deletes the flows `filters` select
    /// and brings the health-check servers and gauges up to date from `tally` (the
    /// servers are given new contents only when the tally's health version moved).
    pub fn after_sync(&mut self, tally: &ServiceTally, filters: &[FlowFilter], metrics: &Metrics) {
        if let (Some(ct), false) = (&mut self.conntrack, filters.is_empty()) {
            let on_pass =
                |p: CleanupPass| metrics.observe_conntrack_pass(p.family, p.deleted, p.took);
            match ct.delete_matching_reporting(filters, on_pass) {
                Ok(n) => {
                    if n > 0 {
                        info!(
                            deleted = n,
                            filters = filters.len(),
                            "deleted stale UDP flows"
                        );
                    }
                }
                Err(e) => warn!(error = %e, "deleting stale UDP conntrack flows failed"),
            }
        }
        if let Some(hc) = &self.healthcheck {
            let version = tally.health_version();
            if self.last_health != Some(version) {
                for e in hc.sync(tally.health_services().clone()) {
                    warn!(error = %e, "healthCheckNodePort server");
                }
                self.last_health = Some(version);
            }
            metrics
                .healthcheck_listeners
                .set(hc.listening_ports().len() as i64);
        }
        let g = tally.gauges();
        metrics.service_ports.set(g.service_ports as i64);
        metrics.endpoints.set(g.endpoints as i64);
        for (family, internal, external) in [
            (Family::Ip, g.no_local_internal.0, g.no_local_external.0),
            (Family::Ip6, g.no_local_internal.1, g.no_local_external.1),
        ] {
            metrics.set_no_local_endpoints(family, "internal", internal);
            metrics.set_no_local_endpoints(family, "external", external);
        }
    }
}

/// Writes `path` through a temporary file in the same directory, fsynced, then renamed.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("pod-cidrs")
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Every address a port's traffic can be DNATed to.
fn endpoint_addrs(sp: &ServicePortState) -> Vec<std::net::SocketAddr> {
    let set: BTreeSet<std::net::SocketAddr> = sp
        .endpoints
        .iter()
        .chain(&sp.local_endpoints)
        .map(|e| std::net::SocketAddr::new(e.ip, e.port))
        .collect();
    set.into_iter().collect()
}

/// Frontends of a port as conntrack sees them: `(Some(ip), port)` for ClusterIPs,
/// external and load-balancer IPs, `(None, nodePort)` for the NodePort.
fn frontends(sp: &ServicePortState) -> Vec<(Option<IpAddr>, u16)> {
    let i = &sp.info;
    let mut f: Vec<(Option<IpAddr>, u16)> = i
        .cluster_ips
        .iter()
        .chain(&i.external_ips)
        .chain(&i.load_balancer_ips)
        .map(|ip| (Some(*ip), i.port))
        .collect();
    if let Some(np) = i.node_port {
        f.push((None, np));
    }
    f
}

/// The stale-flow filters one changed Service port calls for (UDP only): flows to
/// endpoints that went away, and flows tracked before the port had any endpoint.
pub fn flow_filters(d: &ServiceDelta) -> Vec<FlowFilter> {
    let sp = d.new.as_ref().or(d.old.as_ref());
    let Some(sp) = sp.filter(|sp| sp.info.name.protocol == Protocol::Udp) else {
        return Vec::new();
    };
    let old = d.old.as_ref().map(endpoint_addrs).unwrap_or_default();
    let new = d.new.as_ref().map(endpoint_addrs).unwrap_or_default();
    // Frontends of both versions: a removed port's flows go too.
    let mut fronts: Vec<(Option<IpAddr>, u16)> = d
        .old
        .iter()
        .chain(d.new.iter())
        .flat_map(frontends)
        .collect();
    fronts.sort();
    fronts.dedup();
    filters_for_change(&old, &new, &fronts, sp.info.name.protocol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceInfo, ServicePortName};
    use crate::sync::tally::{gauges, health_check_services};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn port(proto: Protocol, eps: &[&str], local: bool) -> ServicePortState {
        let name = ServicePortName {
            namespace: "ns".into(),
            name: "dns".into(),
            port: String::new(),
            protocol: proto,
        };
        let info = ServiceInfo {
            node_port: Some(30053),
            external_local: local,
            health_check_node_port: local.then_some(32000),
            ..ServiceInfo::new(name, vec![ip("10.96.0.53")], 53)
        };
        let all = eps
            .iter()
            .map(|e| Endpoint {
                ip: ip(e),
                port: 5353,
                is_local: e.starts_with("10.244.1."),
            })
            .collect();
        ServicePortState::from_endpoints(info, all)
    }

    fn delta(old: Option<ServicePortState>, new: Option<ServicePortState>) -> ServiceDelta {
        ServiceDelta {
            name: old.as_ref().or(new.as_ref()).unwrap().info.name.clone(),
            old,
            new,
        }
    }

    #[test]
    fn a_removed_udp_endpoint_clears_its_flows_on_every_frontend() {
        let d = delta(
            Some(port(Protocol::Udp, &["10.244.1.5", "10.244.2.5"], false)),
            Some(port(Protocol::Udp, &["10.244.1.5"], false)),
        );
        let f = flow_filters(&d);
        let got: Vec<String> = f
            .iter()
            .map(|f| format!("{:?} {:?} {:?}", f.orig_dst, f.orig_dport, f.reply_src))
            .collect();
        assert_eq!(
            got,
            [
                "None Some(30053) Some(10.244.2.5)",
                "Some(10.96.0.53) Some(53) Some(10.244.2.5)"
            ]
        );
    }

    #[test]
    fn first_endpoints_clear_flows_to_the_frontends_and_tcp_needs_nothing() {
        let d = delta(
            Some(port(Protocol::Udp, &[], false)),
            Some(port(Protocol::Udp, &["10.244.1.5"], false)),
        );
        assert_eq!(flow_filters(&d).len(), 2);
        assert!(flow_filters(&d).iter().all(|f| f.reply_src.is_none()));
        let tcp = delta(
            Some(port(Protocol::Tcp, &["10.244.1.5"], false)),
            Some(port(Protocol::Tcp, &[], false)),
        );
        assert!(flow_filters(&tcp).is_empty());
    }

    #[test]
    fn health_checks_count_local_endpoints_per_service() {
        let mut state = DesiredState::default();
        let sp = port(
            Protocol::Udp,
            &["10.244.1.5", "10.244.1.6", "10.244.2.5"],
            true,
        );
        state.services.insert(sp.info.name.clone(), sp);
        let hc = health_check_services(&state);
        let (k, v) = hc.iter().next().unwrap();
        assert_eq!(k.to_string(), "ns/dns");
        assert_eq!((v.port, v.local_endpoints), (32000, 2));
        let g = gauges(&state);
        // 3 cluster-wide entries and 2 local ones.
        assert_eq!(
            (g.service_ports, g.endpoints, g.no_local_external),
            (1, 5, (0, 0))
        );
        let none = port(Protocol::Udp, &["10.244.2.5"], true);
        state.services.insert(none.info.name.clone(), none);
        assert_eq!(gauges(&state).no_local_external, (1, 0));
        assert_eq!(
            health_check_services(&state)
                .values()
                .next()
                .unwrap()
                .local_endpoints,
            0
        );
    }
}
