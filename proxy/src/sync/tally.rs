//! Per-Service figures a sync reports besides the dataplane: the healthCheckNodePort
//! servers' contents and the gauges' counts. Kept up to date from the [`ServiceDelta`]s of
//! each incremental sync, so a sync that changed one Service port costs work for that port
//! only; a full sync rebuilds them from the whole desired state. Pure: no I/O, no metrics.

use crate::http::healthcheck::HealthCheckService;
use crate::model::{DesiredState, ObjectKey, ServiceDelta, ServicePortName, ServicePortState};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Per-sync counts for the gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Service ports programmed.
    pub service_ports: usize,
    /// Endpoint entries over all ports (the cluster-wide plus the local list).
    pub endpoints: usize,
    /// Ports with `internalTrafficPolicy: Local` and no local endpoint, per family
    /// (IPv4, IPv6).
    pub no_local_internal: (usize, usize),
    /// Ports with `externalTrafficPolicy: Local` and no local endpoint, per family
    /// (IPv4, IPv6).
    pub no_local_external: (usize, usize),
}

/// `(a.0 + b.0, a.1 + b.1)`, or the saturating difference when `sub`.
fn pair(a: (usize, usize), b: (usize, usize), sub: bool) -> (usize, usize) {
    if sub {
        (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1))
    } else {
        (a.0 + b.0, a.1 + b.1)
    }
}

impl Gauges {
    /// What one port adds to the counts, as upstream's per-family proxiers count them: a
    /// port belongs to a family when it has a ClusterIP of it, and lacks local endpoints
    /// of that family when none of its local endpoints is of it.
    fn of_port(sp: &ServicePortState) -> Gauges {
        let no_local = |v4: bool| {
            sp.info.cluster_ips.iter().any(|ip| ip.is_ipv4() == v4)
                && !sp.local_endpoints.iter().any(|e| e.ip.is_ipv4() == v4)
        };
        let per_family = |policy: bool| {
            (
                usize::from(policy && no_local(true)),
                usize::from(policy && no_local(false)),
            )
        };
        Gauges {
            service_ports: 1,
            endpoints: sp.endpoints.len() + sp.local_endpoints.len(),
            no_local_internal: per_family(sp.info.internal_local),
            no_local_external: per_family(sp.info.external_local),
        }
    }

    fn add(&mut self, o: Gauges) {
        self.service_ports += o.service_ports;
        self.endpoints += o.endpoints;
        self.no_local_internal = pair(self.no_local_internal, o.no_local_internal, false);
        self.no_local_external = pair(self.no_local_external, o.no_local_external, false);
    }

    fn sub(&mut self, o: Gauges) {
        self.service_ports = self.service_ports.saturating_sub(o.service_ports);
        self.endpoints = self.endpoints.saturating_sub(o.endpoints);
        self.no_local_internal = pair(self.no_local_internal, o.no_local_internal, true);
        self.no_local_external = pair(self.no_local_external, o.no_local_external, true);
    }
}

/// Counts for the gauges over the whole desired state.
pub fn gauges(state: &DesiredState) -> Gauges {
    let mut g = Gauges::default();
    for sp in state.services.values() {
        g.add(Gauges::of_port(sp));
    }
    g
}

/// The health-check server each Service with a `healthCheckNodePort` needs, with its
/// number of local endpoints (distinct addresses over its ports), over the whole desired
/// state.
pub fn health_check_services(state: &DesiredState) -> BTreeMap<ObjectKey, HealthCheckService> {
    let mut ports: BTreeMap<ObjectKey, HealthPorts> = BTreeMap::new();
    for sp in state.services.values() {
        if let Some(hc) = HealthPort::of(sp) {
            ports
                .entry(service_key(&sp.info.name))
                .or_default()
                .insert(sp.info.name.clone(), hc);
        }
    }
    ports
        .iter()
        .filter_map(|(k, p)| Some((k.clone(), health_of(p)?)))
        .collect()
}

/// The Service a port belongs to.
fn service_key(name: &ServicePortName) -> ObjectKey {
    ObjectKey::new(name.namespace.clone(), name.name.clone())
}

/// What a port with a `healthCheckNodePort` tells its Service's health-check server.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HealthPort {
    /// The port's `healthCheckNodePort`.
    port: u16,
    /// Addresses of its ready local endpoints.
    local: Vec<IpAddr>,
}

impl HealthPort {
    fn of(sp: &ServicePortState) -> Option<HealthPort> {
        Some(HealthPort {
            port: sp.info.health_check_node_port?,
            local: sp.local_ready.clone(),
        })
    }
}

/// The ports with a `healthCheckNodePort` of one Service, in port-name order.
type HealthPorts = BTreeMap<ServicePortName, HealthPort>;

/// One Service's health-check entry: the first port's `healthCheckNodePort` (in port-name
/// order) and the distinct ready local endpoint addresses over its ports. None without
/// ports.
fn health_of(ports: &HealthPorts) -> Option<HealthCheckService> {
    let port = ports.values().next()?.port;
    let ips: BTreeSet<IpAddr> = ports
        .values()
        .flat_map(|p| p.local.iter().copied())
        .collect();
    Some(HealthCheckService {
        port,
        local_endpoints: ips.len(),
    })
}

/// The gauges' counts and the health-check servers' contents of a desired state, updated
/// per changed Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTally {
    gauges: Gauges,
    /// Ports with a `healthCheckNodePort`, per Service.
    health_ports: BTreeMap<ObjectKey, HealthPorts>,
    /// What the health-check servers should serve, derived from `health_ports`.
    health: BTreeMap<ObjectKey, HealthCheckService>,
    /// Bumped whenever `health` changes.
    health_version: u64,
}

impl ServiceTally {
    /// The tally of a whole desired state (a full sync).
    pub fn from_state(state: &DesiredState) -> Self {
        let mut t = ServiceTally::default();
        t.rebuild(state);
        t
    }

    /// Recomputes everything from `state` (a full sync); the health version moves on only
    /// when the health-check contents differ.
    pub fn rebuild(&mut self, state: &DesiredState) {
        let version = self.health_version;
        let before = std::mem::take(&mut self.health);
        self.gauges = Gauges::default();
        self.health_ports.clear();
        for sp in state.services.values() {
            self.add_port(sp);
        }
        self.health = self
            .health_ports
            .iter()
            .filter_map(|(k, p)| Some((k.clone(), health_of(p)?)))
            .collect();
        self.health_version = if self.health == before {
            version
        } else {
            version.wrapping_add(1)
        };
    }

    /// Applies one change of one Service port (as [`DesiredState::replace_service`]
    /// returns it), touching only that port's Service.
    pub fn apply(&mut self, d: &ServiceDelta) {
        let mut touched = None;
        if let Some(old) = &d.old {
            self.gauges.sub(Gauges::of_port(old));
            if old.info.health_check_node_port.is_some() {
                let key = service_key(&old.info.name);
                if let Some(ports) = self.health_ports.get_mut(&key) {
                    ports.remove(&old.info.name);
                    if ports.is_empty() {
                        self.health_ports.remove(&key);
                    }
                }
                touched = Some(key);
            }
        }
        if let Some(new) = &d.new {
            if self.add_port(new) {
                let key = service_key(&new.info.name);
                if touched.as_ref().is_some_and(|t| *t != key) {
                    // A port keeps its Service; this only guards against a malformed delta.
                    if let Some(t) = touched.take() {
                        self.refresh_health(t);
                    }
                }
                touched = Some(key);
            }
        }
        if let Some(key) = touched {
            self.refresh_health(key);
        }
    }

    /// Adds a port's counts and health-check port; returns whether it has one.
    fn add_port(&mut self, sp: &ServicePortState) -> bool {
        self.gauges.add(Gauges::of_port(sp));
        let Some(hc) = HealthPort::of(sp) else {
            return false;
        };
        self.health_ports
            .entry(service_key(&sp.info.name))
            .or_default()
            .insert(sp.info.name.clone(), hc);
        true
    }

    /// Re-derives one Service's health-check entry.
    fn refresh_health(&mut self, key: ObjectKey) {
        let want = self.health_ports.get(&key).and_then(health_of);
        let changed = match want {
            Some(svc) => self.health.insert(key, svc) != Some(svc),
            None => self.health.remove(&key).is_some(),
        };
        if changed {
            self.health_version = self.health_version.wrapping_add(1);
        }
    }

    /// The gauges' counts.
    pub fn gauges(&self) -> Gauges {
        self.gauges
    }

    /// What the health-check servers should serve.
    pub fn health_services(&self) -> &BTreeMap<ObjectKey, HealthCheckService> {
        &self.health
    }

    /// Changes whenever [`Self::health_services`] does (equal versions: equal contents).
    pub fn health_version(&self) -> u64 {
        self.health_version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol, ServiceInfo};

    /// Port `p<port>` of Service `svc-<n>`, ClusterIP `10.96.<n>.<port>`, endpoints
    /// `10.244.1.<e>` (local when even), with ETP Local (and a NodePort), ITP Local and
    /// a healthCheckNodePort when asked.
    fn port_state(c: &Change) -> ServicePortState {
        let name = ServicePortName {
            namespace: "d".into(),
            name: format!("svc-{}", c.n),
            port: format!("p{}", c.port),
            protocol: Protocol::Tcp,
        };
        let mut info = ServiceInfo::new(
            name,
            vec![format!("10.96.{}.{}", c.n, c.port).parse().unwrap()],
            80 + u16::from(c.port),
        );
        info.external_local = c.etp_local;
        // ETP Local matters to ports reachable from outside: give those a NodePort.
        info.node_port = c
            .etp_local
            .then(|| 30000 + 3 * u16::from(c.n) + u16::from(c.port));
        info.internal_local = c.itp_local;
        info.health_check_node_port = c.hc_port.map(|p| 32000 + u16::from(p));
        let eps = c
            .eps
            .iter()
            .map(|e| Endpoint {
                ip: format!("10.244.1.{e}").parse().unwrap(),
                port: 8080,
                is_local: e % 2 == 0,
            })
            .collect();
        ServicePortState::from_endpoints(info, eps)
    }

    /// One port of Service `svc-<n>` after a change.
    #[derive(Clone, Debug)]
    struct Change {
        n: u8,
        port: u8,
        eps: BTreeSet<u8>,
        etp_local: bool,
        itp_local: bool,
        hc_port: Option<u8>,
    }

    /// A change of one Service: its number and its ports after it (none: deleted).
    fn change() -> impl proptest::strategy::Strategy<Value = (u8, Vec<Change>)> {
        use proptest::prelude::*;
        let port = (
            0u8..3,
            proptest::collection::btree_set(0u8..10, 0..5),
            any::<bool>(),
            any::<bool>(),
            proptest::option::weighted(0.6, 0u8..3),
        );
        (0u8..6, proptest::collection::vec(port, 0..3)).prop_map(|(n, ports)| {
            let mut seen = BTreeSet::new();
            let ports = ports
                .into_iter()
                .filter(|p| seen.insert(p.0))
                .map(|(port, eps, etp_local, itp_local, hc_port)| Change {
                    n,
                    port,
                    eps,
                    etp_local,
                    itp_local,
                    hc_port,
                })
                .collect();
            (n, ports)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn updating_from_deltas_equals_counting_everything(
            batches in proptest::collection::vec(proptest::collection::vec(change(), 1..5), 1..12),
        ) {
            let mut state = DesiredState::default();
            let mut tally = ServiceTally::default();
            let mut version = tally.health_version();
            let mut last_health = tally.health_services().clone();
            for batch in batches {
                for (n, ports) in batch {
                    let key = ObjectKey::new("d", format!("svc-{n}"));
                    let ports = ports.iter().map(port_state).collect();
                    let (deltas, conflicts) = state.replace_service(&key, ports);
                    proptest::prop_assert!(conflicts.is_empty());
                    for d in &deltas {
                        tally.apply(d);
                    }
                }
                proptest::prop_assert_eq!(tally.gauges(), gauges(&state));
                proptest::prop_assert_eq!(tally.health_services(), &health_check_services(&state));
                proptest::prop_assert_eq!(&tally, &ServiceTally {
                    health_version: tally.health_version(),
                    ..ServiceTally::from_state(&state)
                });
                // Contents that changed come with a new version (the runner hands the
                // servers new contents only then).
                if tally.health_services() != &last_health {
                    proptest::prop_assert_ne!(tally.health_version(), version);
                }
                version = tally.health_version();
                last_health = tally.health_services().clone();
            }
        }
    }

    #[test]
    fn health_checks_count_distinct_local_addresses_over_a_services_ports() {
        let mut state = DesiredState::default();
        let mut tally = ServiceTally::default();
        let a = Change {
            n: 1,
            port: 0,
            eps: [0, 2, 3].into(),
            etp_local: true,
            itp_local: false,
            hc_port: Some(1),
        };
        let b = Change {
            port: 1,
            eps: [2, 4].into(),
            ..a.clone()
        };
        let key = ObjectKey::new("d", "svc-1");
        let (deltas, _) = state.replace_service(&key, vec![port_state(&a), port_state(&b)]);
        deltas.iter().for_each(|d| tally.apply(d));
        let hc = tally.health_services()[&key];
        // 10.244.1.0, .2 and .4 are local; .2 is behind both ports.
        assert_eq!((hc.port, hc.local_endpoints), (32001, 3));
        assert_eq!(tally.gauges().service_ports, 2);
        assert_eq!(tally.gauges().no_local_external, (0, 0));
        let v = tally.health_version();
        // Only the remote endpoint goes: the health-check contents stay.
        let a2 = Change {
            eps: [0, 2].into(),
            ..a.clone()
        };
        let (deltas, _) = state.replace_service(&key, vec![port_state(&a2), port_state(&b)]);
        deltas.iter().for_each(|d| tally.apply(d));
        assert_eq!(tally.health_version(), v);
        assert_eq!(tally.gauges().endpoints, gauges(&state).endpoints);
        // The Service goes: its health-check server goes.
        let (deltas, _) = state.replace_service(&key, Vec::new());
        deltas.iter().for_each(|d| tally.apply(d));
        assert!(tally.health_services().is_empty());
        assert_ne!(tally.health_version(), v);
        assert_eq!(tally.gauges(), Gauges::default());
    }
}
