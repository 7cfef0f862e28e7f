//! The model's store: every object reduced at ingest to the compact record the model needs
//! (a Service to its validated ports, a slice to its endpoints, a Node to its addresses),
//! kept in change trackers, with an index from each Service to its EndpointSlices so a
//! sync can recompute only the Services that changed.

use super::endpoint::{slice_endpoints, EndpointSliceError, SliceEndpoints};
use super::service::{service_ports, ServiceError, ServicePorts};
use super::{ChangeTracker, ObjectKey};
use crate::objects::{Kind, Object, ObjectRef, SourceUpdate};
use k8s_openapi::api::core::v1::Node;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::SystemTime;

/// A Service as the model keeps it.
pub type ServiceRecord = Result<ServicePorts, ServiceError>;
/// An EndpointSlice as the model keeps it.
pub type SliceRecord = Result<SliceEndpoints, EndpointSliceError>;
/// A Node as the model keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its InternalIP and ExternalIP addresses, sorted.
    pub ips: Vec<IpAddr>,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Its `spec.podCIDRs` (or `spec.podCIDR`); unparseable entries are left out.
    pub pod_cidrs: Vec<ipnetwork::IpNetwork>,
}

/// The Node label naming the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What changed since the last [`Store::take_changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services to recompute: changed themselves or one of their slices changed.
    pub services: BTreeSet<ObjectKey>,
    /// Whether any Node changed.
    pub nodes: bool,
}

/// Compact records of every object, with change tracking.
#[derive(Debug, Default)]
pub struct Store {
    services: ChangeTracker<ServiceRecord>,
    slices: ChangeTracker<SliceRecord>,
    nodes: ChangeTracker<NodeRecord>,
    /// Each Service's slices, sorted: a Vec, since a Service has one or a few (a BTreeSet
    /// allocates a whole node even for one, 0.5 MB per 1,000 Services).
    slices_by_service: BTreeMap<ObjectKey, Vec<ObjectKey>>,
    changed_services: BTreeSet<ObjectKey>,
    /// Keys seen since `RelistStart` of each kind (Service, EndpointSlice, Node).
    kind_relist: [Option<BTreeSet<ObjectKey>>; 3],
    /// Node and zone names, shared by every endpoint that names them.
    names: BTreeSet<std::sync::Arc<str>>,
    /// Invalid versions received: (Services, EndpointSlices).
    invalid_received: (u64, u64),
    /// Records held that failed validation (Services plus EndpointSlices), kept up to
    /// date on every upsert and deletion so reading it costs nothing per sync.
    invalid_held: usize,
}

fn node_record(node: &Node) -> NodeRecord {
    let ips: BTreeSet<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    NodeRecord {
        ips: ips.into_iter().collect(),
        zone: node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned(),
        pod_cidrs: node
            .spec
            .iter()
            .flat_map(|s| {
                let list = s.pod_cidrs.clone().unwrap_or_default();
                if list.is_empty() {
                    s.pod_cidr.clone().into_iter().collect()
                } else {
                    list
                }
            })
            .filter_map(|c| c.parse().ok())
            .collect(),
    }
}

fn unseen<T>(have: &BTreeMap<ObjectKey, T>, seen: &BTreeSet<ObjectKey>) -> Vec<ObjectKey> {
    have.keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect()
}

fn slice_service(r: &SliceRecord) -> Option<&ObjectKey> {
    match r {
        Ok(SliceEndpoints::Ports { service, .. }) => Some(service),
        _ => None,
    }
}

impl Store {
    /// Records one source update; returns how many objects changed.
    pub fn record(&mut self, update: SourceUpdate, now: SystemTime) -> usize {
        match update {
            SourceUpdate::RelistItem(o) => {
                self.seen(o.kind(), o.key());
                self.record(SourceUpdate::Upsert(o), now)
            }
            SourceUpdate::RelistInvalid(r) => {
                self.seen(r.kind, r.key);
                0
            }
            SourceUpdate::RelistStart(kind) if !kind.is_policy() => {
                self.kind_relist[kind.index()] = Some(BTreeSet::new());
                0
            }
            SourceUpdate::RelistStart(_) => 0,
            SourceUpdate::RelistDone(kind) if !kind.is_policy() => {
                let Some(seen) = self.kind_relist[kind.index()].take() else {
                    return 0;
                };
                let gone = match kind {
                    Kind::Service => unseen(self.services.objects(), &seen),
                    Kind::EndpointSlice => unseen(self.slices.objects(), &seen),
                    Kind::Node => unseen(self.nodes.objects(), &seen),
                    // The policy controller's kinds never reach this store.
                    _ => Vec::new(),
                };
                gone.into_iter()
                    .map(|key| self.record(SourceUpdate::Delete(ObjectRef { kind, key }), now))
                    .sum()
            }
            SourceUpdate::RelistDone(_)
            | SourceUpdate::Synced
            | SourceUpdate::BatchStart
            | SourceUpdate::BatchEnd => 0,
            SourceUpdate::Upsert(o) => {
                let key = o.key();
                usize::from(match o {
                    Object::Service(s) => self.upsert_service(key, service_ports(&s), now),
                    Object::EndpointSlice(s) => self.upsert_slice(key, slice_endpoints(&s), now),
                    Object::Node(n) => self.nodes.upsert(key, node_record(&n), now),
                    Object::Pod(_) | Object::Namespace(_) | Object::NetworkPolicy(_) => false,
                })
            }
            SourceUpdate::Delete(r) => usize::from(match r.kind {
                Kind::Service => self.delete_service(&r.key, now),
                Kind::EndpointSlice => self.delete_slice(&r.key, now),
                Kind::Node => self.nodes.delete(&r.key, now),
                _ => false,
            }),
        }
    }

    /// Records a sequence of updates (a whole listing, say); returns how many objects
    /// changed.
    pub fn record_all(
        &mut self,
        updates: impl IntoIterator<Item = SourceUpdate>,
        now: SystemTime,
    ) -> usize {
        updates.into_iter().map(|u| self.record(u, now)).sum()
    }

    /// Notes a key as listed in the relists under way.
    fn seen(&mut self, kind: Kind, key: ObjectKey) {
        if kind.is_policy() {
            return;
        }
        if let Some(seen) = &mut self.kind_relist[kind.index()] {
            seen.insert(key);
        }
    }

    fn upsert_service(&mut self, key: ObjectKey, r: ServiceRecord, now: SystemTime) -> bool {
        if let Err(e) = &r {
            self.invalid_received.0 += 1;
            tracing::warn!(error = %e, object = %key, field = %e.field, "invalid Service");
            if matches!(self.services.objects().get(&key), Some(Ok(_))) {
                tracing::warn!(error = %e, "invalid update; keeping the last good version");
                return false;
            }
        }
        let was_invalid = self
            .services
            .objects()
            .get(&key)
            .is_some_and(Result::is_err);
        let is_invalid = r.is_err();
        let changed = self.services.upsert(key.clone(), r, now);
        if changed {
            self.count_invalid(was_invalid, is_invalid);
            self.changed_services.insert(key);
        }
        changed
    }

    fn delete_service(&mut self, key: &ObjectKey, now: SystemTime) -> bool {
        let was_invalid = self.services.objects().get(key).is_some_and(Result::is_err);
        let changed = self.services.delete(key, now);
        if changed {
            self.count_invalid(was_invalid, false);
            self.changed_services.insert(key.clone());
        }
        changed
    }

    /// Updates the count of invalid records held after one record went from
    /// `was_invalid` to `is_invalid` (absent counts as valid).
    fn count_invalid(&mut self, was_invalid: bool, is_invalid: bool) {
        self.invalid_held =
            (self.invalid_held + usize::from(is_invalid)).saturating_sub(usize::from(was_invalid));
    }

    fn unindex_slice(&mut self, key: &ObjectKey) {
        if let Some(svc) = self
            .slices
            .objects()
            .get(key)
            .and_then(slice_service)
            .cloned()
        {
            if let Some(set) = self.slices_by_service.get_mut(&svc) {
                if let Ok(i) = set.binary_search(key) {
                    set.remove(i);
                }
                if set.is_empty() {
                    self.slices_by_service.remove(&svc);
                }
            }
            self.changed_services.insert(svc);
        }
    }

    fn upsert_slice(&mut self, key: ObjectKey, mut r: SliceRecord, now: SystemTime) -> bool {
        if let Ok(eps) = &mut r {
            eps.intern(&mut self.names);
        }
        if let Err(e) = &r {
            self.invalid_received.1 += 1;
            tracing::warn!(error = %e, object = %key, field = %e.field, "invalid EndpointSlice");
            if matches!(self.slices.objects().get(&key), Some(Ok(_))) {
                tracing::warn!(error = %e, "invalid update; keeping the last good version");
                return false;
            }
        }
        if self.slices.objects().get(&key) == Some(&r) {
            return false;
        }
        let was_invalid = self.slices.objects().get(&key).is_some_and(Result::is_err);
        let is_invalid = r.is_err();
        self.unindex_slice(&key);
        if let Some(svc) = slice_service(&r).cloned() {
            let set = self.slices_by_service.entry(svc.clone()).or_default();
            if let Err(i) = set.binary_search(&key) {
                set.insert(i, key.clone());
            }
            self.changed_services.insert(svc);
        }
        let changed = self.slices.upsert(key, r, now);
        if changed {
            self.count_invalid(was_invalid, is_invalid);
        }
        changed
    }

    fn delete_slice(&mut self, key: &ObjectKey, now: SystemTime) -> bool {
        let was_invalid = self.slices.objects().get(key).is_some_and(Result::is_err);
        self.unindex_slice(key);
        let changed = self.slices.delete(key, now);
        if changed {
            self.count_invalid(was_invalid, false);
        }
        changed
    }

    /// Clears and returns what changed.
    pub fn take_changes(&mut self) -> Changes {
        self.services.take_pending();
        self.slices.take_pending();
        let nodes = !self.nodes.take_pending().is_empty();
        Changes {
            services: std::mem::take(&mut self.changed_services),
            nodes,
        }
    }

    /// The Service records.
    pub fn services(&self) -> &BTreeMap<ObjectKey, ServiceRecord> {
        self.services.objects()
    }

    /// The slice records of one Service.
    pub fn slices_of<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a SliceRecord> + 'a {
        let keys = self.slices_by_service.get(service);
        keys.into_iter()
            .flatten()
            .filter_map(|k| self.slices.objects().get(k))
    }

    /// Whether `addr` is an endpoint of `port` in any of its Service's slices, whatever its
    /// conditions (ready, serving, terminating).
    pub fn endpoint_listed(
        &self,
        port: &super::ServicePortName,
        addr: std::net::SocketAddr,
    ) -> bool {
        let service = ObjectKey::new(port.namespace.clone(), port.name.clone());
        self.slices_of(&service).any(|r| match r {
            Ok(super::endpoint::SliceEndpoints::Ports { ports, .. }) => ports.iter().any(|p| {
                p.name == port.port
                    && p.protocol == port.protocol
                    && p.endpoints
                        .iter()
                        .any(|e| e.ip == addr.ip() && e.port == addr.port())
            }),
            _ => false,
        })
    }

    /// Every slice record (including invalid ones).
    pub fn slices(&self) -> &BTreeMap<ObjectKey, SliceRecord> {
        self.slices.objects()
    }

    /// Addresses of a node.
    pub fn node_ips(&self, node_name: &str) -> Vec<IpAddr> {
        self.node(node_name)
            .map(|n| n.ips.clone())
            .unwrap_or_default()
    }

    /// Every node's record, by name.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &NodeRecord)> {
        self.nodes
            .objects()
            .iter()
            .map(|(k, n)| (k.name.as_str(), n))
    }

    /// A node's record, if the source has it.
    pub fn node(&self, node_name: &str) -> Option<&NodeRecord> {
        self.nodes.objects().get(&ObjectKey::new("", node_name))
    }

    /// The oldest change not yet synced.
    pub fn oldest_pending(&self) -> Option<SystemTime> {
        [
            self.services.oldest_pending(),
            self.slices.oldest_pending(),
            self.nodes.oldest_pending(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Invalid versions received since start: (Services, EndpointSlices).
    pub fn invalid_received(&self) -> (u64, u64) {
        self.invalid_received
    }

    /// Changes recorded since start: (services, endpoint slices).
    pub fn total_changes(&self) -> (u64, u64) {
        (self.services.total_changes(), self.slices.total_changes())
    }

    /// Changes pending: (services, endpoint slices).
    pub fn pending_changes(&self) -> (usize, usize) {
        (self.services.pending().len(), self.slices.pending().len())
    }

    /// Number of objects that failed validation (kept up to date as records change).
    pub fn invalid_objects(&self) -> usize {
        self.invalid_held
    }

    /// [`Self::invalid_objects`] counted over every record, for tests.
    #[cfg(test)]
    fn count_invalid_objects(&self) -> usize {
        self.services
            .objects()
            .values()
            .filter(|r| r.is_err())
            .count()
            + self
                .slices
                .objects()
                .values()
                .filter(|r| r.is_err())
                .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Object;

    fn svc(name: &str, ip: &str) -> Object {
        Object::Service(serde_yaml_ng::from_str(&format!("{{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: d}}, spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}}}")).unwrap())
    }

    fn slice(name: &str, service: &str) -> Object {
        Object::EndpointSlice(serde_yaml_ng::from_str(&format!("{{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: {name}, namespace: d, labels: {{kubernetes.io/service-name: {service}}}}}, addressType: IPv4, endpoints: [{{addresses: [10.244.1.1]}}]}}")).unwrap())
    }

    #[test]
    fn relist_deletes_what_it_did_not_see_and_marks_only_changed_services() {
        let t = SystemTime::UNIX_EPOCH;
        let mut s = Store::default();
        s.record_all(
            SourceUpdate::listing(vec![
                svc("a", "10.96.0.1"),
                svc("b", "10.96.0.2"),
                slice("a-1", "a"),
                slice("b-1", "b"),
            ]),
            t,
        );
        s.take_changes();
        s.record_all(Kind::ALL.map(SourceUpdate::RelistStart), t);
        for o in [
            svc("a", "10.96.0.1"),
            svc("b", "10.96.0.2"),
            slice("b-1", "b"),
        ] {
            s.record(SourceUpdate::RelistItem(o), t);
        }
        assert!(
            s.take_changes().services.is_empty(),
            "nothing changed yet: the relist is open"
        );
        s.record_all(Kind::ALL.map(SourceUpdate::RelistDone), t);
        let changes = s.take_changes();
        assert_eq!(
            changes
                .services
                .into_iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>(),
            ["d/a"]
        );
        assert_eq!(s.slices_of(&ObjectKey::new("d", "a")).count(), 0);
        assert_eq!(s.slices_of(&ObjectKey::new("d", "b")).count(), 1);
    }

    #[test]
    fn a_slice_moving_to_another_service_changes_both() {
        let t = SystemTime::UNIX_EPOCH;
        let mut s = Store::default();
        s.record_all(
            SourceUpdate::listing(vec![
                svc("a", "10.96.0.1"),
                svc("b", "10.96.0.2"),
                slice("x", "a"),
            ]),
            t,
        );
        s.take_changes();
        s.record(SourceUpdate::Upsert(slice("x", "b")), t);
        let changed: Vec<String> = s
            .take_changes()
            .services
            .into_iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(changed, ["d/a", "d/b"]);
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_version() {
        let t = SystemTime::UNIX_EPOCH;
        let mut s = Store::default();
        s.record_all(SourceUpdate::listing(vec![svc("a", "10.96.0.1")]), t);
        s.take_changes();
        s.record(SourceUpdate::Upsert(svc("a", "not-an-ip")), t);
        assert!(s.take_changes().services.is_empty());
        assert!(matches!(
            s.services().get(&ObjectKey::new("d", "a")),
            Some(Ok(_))
        ));
        // A relist that could not read the object keeps it too.
        s.record_all(Kind::ALL.map(SourceUpdate::RelistStart), t);
        s.record(
            SourceUpdate::RelistInvalid(crate::objects::ObjectRef {
                kind: Kind::Service,
                key: ObjectKey::new("d", "a"),
            }),
            t,
        );
        s.record_all(Kind::ALL.map(SourceUpdate::RelistDone), t);
        assert!(s.take_changes().services.is_empty());
        assert_eq!(s.services().len(), 1);
    }
    /// A slice whose only address does not parse.
    fn bad_slice(name: &str, service: &str) -> Object {
        Object::EndpointSlice(serde_yaml_ng::from_str(&format!("{{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: {name}, namespace: d, labels: {{kubernetes.io/service-name: {service}}}}}, addressType: IPv4, endpoints: [{{addresses: [10.244.1.999]}}]}}")).unwrap())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn the_invalid_object_count_kept_per_change_equals_counting_every_record(
            batches in proptest::collection::vec(
                proptest::collection::vec(
                    (proptest::bool::ANY, 0u8..5, proptest::bool::weighted(0.6), proptest::bool::weighted(0.2)),
                    1..8,
                ),
                1..10,
            ),
            relist_every in 0usize..4,
        ) {
            let t = SystemTime::UNIX_EPOCH;
            let mut s = Store::default();
            for (i, batch) in batches.into_iter().enumerate() {
                // Some batches arrive as a whole relist (what is not listed goes).
                let relist = relist_every > 0 && i % relist_every == 0;
                if relist {
                    s.record_all(Kind::ALL.map(SourceUpdate::RelistStart), t);
                }
                // (a Service or a slice, which one, valid or not, deleted or not)
                for (is_service, n, valid, delete) in batch {
                    let (name, owner) = (format!("o{n}"), format!("o{}", n % 3));
                    let update = match (is_service, valid, delete) {
                        (true, _, true) => SourceUpdate::Delete(ObjectRef {
                            kind: Kind::Service,
                            key: ObjectKey::new("d", name),
                        }),
                        (false, _, true) => SourceUpdate::Delete(ObjectRef {
                            kind: Kind::EndpointSlice,
                            key: ObjectKey::new("d", name),
                        }),
                        (true, true, false) => SourceUpdate::Upsert(svc(&name, &format!("10.96.0.{n}"))),
                        (true, false, false) => SourceUpdate::Upsert(svc(&name, "10.96.0.300")),
                        (false, true, false) => SourceUpdate::Upsert(slice(&name, &owner)),
                        (false, false, false) => SourceUpdate::Upsert(bad_slice(&name, &owner)),
                    };
                    let update = match update {
                        SourceUpdate::Upsert(o) if relist => SourceUpdate::RelistItem(o),
                        u => u,
                    };
                    s.record(update, t);
                    proptest::prop_assert_eq!(s.invalid_objects(), s.count_invalid_objects());
                }
                if relist {
                    s.record_all(Kind::ALL.map(SourceUpdate::RelistDone), t);
                }
                proptest::prop_assert_eq!(s.invalid_objects(), s.count_invalid_objects());
                s.take_changes();
            }
        }
    }
}
