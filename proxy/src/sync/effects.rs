//! What a sync does besides programming the dataplane: healthCheckNodePort servers, stale
//! UDP conntrack cleanup, the per-Service gauges, pod routes and weir-cni's pod CIDRs. The
//! pure parts are functions of the desired state: which flows in
//! [`crate::dataplane::flows`], which health-check ports and counts in
//! [`crate::sync::tally`].

use crate::dataplane::conntrack::{CleanupPass, Conntrack, FlowFilter};
use crate::dataplane::nft::Family;
use crate::http::healthcheck::HealthCheckServer;
use crate::http::metrics::Metrics;
use crate::model::Store;
use crate::routes::{desired_routes, PodRoute, RouteController};
use crate::sync::tally::ServiceTally;
use std::collections::BTreeSet;
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

#[cfg(test)]
mod tests {
    use crate::model::{DesiredState, Protocol};
    use crate::sync::tally::{gauges, health_check_services};
    use crate::testing::dns_port as port;

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
