//! The policy controller's store: Pods, Namespaces and NetworkPolicies reduced at ingest
//! (pods to [`PodInfo`], namespaces to labels, policies compiled once, with their errors
//! reported once), fed by the same [`SourceUpdate`]s as the service store, including
//! full and per-kind relists. Pure: no kernel, no I/O.

use std::collections::{BTreeMap, BTreeSet};

use super::compile::{compile, CompiledPolicy};
use super::types::{namespace_labels, Labels, PodInfo, PodKey};
use super::verdict::PolicySet;
use crate::model::ObjectKey;
use crate::objects::{Kind, Object, ObjectRef, SourceUpdate};

/// Reduced policy inputs with relist bookkeeping.
#[derive(Debug, Default)]
pub struct PolicyStore {
    pods: BTreeMap<PodKey, PodInfo>,
    namespaces: BTreeMap<String, Labels>,
    policies: BTreeMap<ObjectKey, CompiledPolicy>,
    /// Keys seen since `RelistStart` of each policy kind (Pod, Namespace, NetworkPolicy).
    kind_relist: [Option<BTreeSet<ObjectKey>>; 3],
    /// Policy versions received with errors (each kept failed closed).
    invalid_received: u64,
    /// Whether a complete listing has been seen.
    synced: bool,
}

fn slot(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Pod => Some(0),
        Kind::Namespace => Some(1),
        Kind::NetworkPolicy => Some(2),
        _ => None,
    }
}

fn pod_key(k: &ObjectKey) -> PodKey {
    PodKey::new(k.namespace.clone(), k.name.clone())
}

impl PolicyStore {
    /// Records one update; returns whether anything policy evaluation reads changed.
    /// Updates of the service proxy's kinds are ignored.
    pub fn record(&mut self, update: SourceUpdate) -> bool {
        match update {
            SourceUpdate::RelistItem(o) => {
                self.seen(o.kind(), o.key());
                self.record(SourceUpdate::Upsert(o))
            }
            SourceUpdate::RelistInvalid(r) => {
                self.seen(r.kind, r.key);
                false
            }
            SourceUpdate::RelistStart(kind) => {
                if let Some(i) = slot(kind) {
                    self.kind_relist[i] = Some(BTreeSet::new());
                }
                false
            }
            SourceUpdate::RelistDone(kind) => {
                let Some(seen) = slot(kind).and_then(|i| self.kind_relist[i].take()) else {
                    return false;
                };
                self.delete_unseen(kind, &seen)
            }
            SourceUpdate::Synced => {
                self.synced = true;
                false
            }
            SourceUpdate::BatchStart | SourceUpdate::BatchEnd => false,
            SourceUpdate::Upsert(o) => self.upsert(o),
            SourceUpdate::Delete(r) => self.delete(&r),
        }
    }

    /// Records a sequence of updates (a whole listing, say); returns whether anything
    /// changed.
    pub fn record_all(&mut self, updates: impl IntoIterator<Item = SourceUpdate>) -> bool {
        let mut changed = false;
        for u in updates {
            changed |= self.record(u);
        }
        changed
    }

    fn seen(&mut self, kind: Kind, key: ObjectKey) {
        let Some(i) = slot(kind) else { return };
        if let Some(seen) = &mut self.kind_relist[i] {
            seen.insert(key);
        }
    }

    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        match kind {
            Kind::Pod => self
                .pods
                .keys()
                .map(|k| ObjectKey::new(k.namespace.clone(), k.name.clone()))
                .collect(),
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjectKey::new("", n.clone()))
                .collect(),
            Kind::NetworkPolicy => self.policies.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    fn delete_unseen(&mut self, kind: Kind, seen: &BTreeSet<ObjectKey>) -> bool {
        let mut changed = false;
        for key in self.keys(kind) {
            if !seen.contains(&key) {
                changed |= self.delete(&ObjectRef { kind, key });
            }
        }
        changed
    }

    fn upsert(&mut self, o: Object) -> bool {
        match o {
            Object::Pod(p) => {
                let Some(info) = PodInfo::from_pod(&p) else {
                    // Host-network (or nameless) pods are not policy pods: a pod that
                    // moved to the host network is gone for policy.
                    let key = ObjectKey::of_meta(&p.metadata, true);
                    return self.pods.remove(&pod_key(&key)).is_some();
                };
                if self.pods.get(&info.key) == Some(&info) {
                    return false;
                }
                self.pods.insert(info.key.clone(), info);
                true
            }
            Object::Namespace(ns) => {
                let Some((name, labels)) = namespace_labels(&ns) else {
                    return false;
                };
                self.namespaces.insert(name, labels.clone()) != Some(labels)
            }
            Object::NetworkPolicy(np) => {
                let key = ObjectKey::of_meta(&np.metadata, true);
                let (compiled, errors) = compile(&np);
                if !errors.is_empty() {
                    self.invalid_received += 1;
                }
                for e in &errors {
                    tracing::warn!(policy = %key, error = %e, "invalid NetworkPolicy: failing closed for the pods it selects");
                }
                if self.policies.get(&key) == Some(&compiled) {
                    return false;
                }
                self.policies.insert(key, compiled);
                true
            }
            Object::Service(_) | Object::EndpointSlice(_) | Object::Node(_) => false,
        }
    }

    fn delete(&mut self, r: &ObjectRef) -> bool {
        match r.kind {
            Kind::Pod => self.pods.remove(&pod_key(&r.key)).is_some(),
            Kind::Namespace => self.namespaces.remove(&r.key.name).is_some(),
            Kind::NetworkPolicy => self.policies.remove(&r.key).is_some(),
            _ => false,
        }
    }

    /// Whether a complete listing has arrived (the kernel may be programmed).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Policy versions received with errors so far.
    pub fn invalid_received(&self) -> u64 {
        self.invalid_received
    }

    /// `(pods, namespaces, policies)` held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.pods.len(), self.namespaces.len(), self.policies.len())
    }

    /// Pods held (for deciding which are local).
    pub fn pods(&self) -> &BTreeMap<PodKey, PodInfo> {
        &self.pods
    }

    /// Resolves every policy against the current pods and namespaces.
    pub fn policy_set(&self) -> PolicySet {
        let policies: Vec<CompiledPolicy> = self.policies.values().cloned().collect();
        PolicySet::from_compiled(&policies, self.pods.clone(), self.namespaces.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Endpoint, Protocol};
    use serde_json::json;

    fn pod(ns: &str, name: &str, app: &str, ip: &str) -> Object {
        Object::Pod(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
                "spec": {"containers": [], "nodeName": "n1"},
                "status": {"podIP": ip},
            }))
            .unwrap(),
        )
    }

    fn deny_all(ns: &str, name: &str) -> Object {
        Object::NetworkPolicy(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name},
                "spec": {"podSelector": {}},
            }))
            .unwrap(),
        )
    }

    fn allows(store: &PolicyStore, from: &str, to: &str) -> bool {
        store.policy_set().allows(
            &Endpoint::Ip(from.parse().unwrap()),
            &Endpoint::Ip(to.parse().unwrap()),
            80,
            Protocol::Tcp,
        )
    }

    #[test]
    fn relists_delete_what_they_lack_and_unchanged_versions_are_not_changes() {
        let mut s = PolicyStore::default();
        assert!(s.record_all(SourceUpdate::listing(vec![
            pod("x", "a", "a", "10.0.0.1"),
            pod("x", "b", "b", "10.0.0.2"),
            deny_all("x", "deny"),
        ])));
        assert!(s.synced());
        assert!(!allows(&s, "10.0.0.1", "10.0.0.2"));
        // Same pod again, only an unread field differs: no change.
        assert!(!s.record(SourceUpdate::Upsert(pod("x", "a", "a", "10.0.0.1"))));
        // A policy relist without the policy deletes it; pods stay.
        s.record(SourceUpdate::RelistStart(Kind::NetworkPolicy));
        assert!(s.record(SourceUpdate::RelistDone(Kind::NetworkPolicy)));
        assert_eq!(s.counts(), (2, 0, 0));
        assert!(allows(&s, "10.0.0.1", "10.0.0.2"));
        // A relist of pods lacking b deletes b only.
        s.record(SourceUpdate::RelistStart(Kind::Pod));
        s.record(SourceUpdate::RelistItem(pod("x", "a", "a", "10.0.0.1")));
        assert!(s.record(SourceUpdate::RelistDone(Kind::Pod)));
        assert_eq!(s.counts(), (1, 0, 0));
    }

    #[test]
    fn an_invalid_policy_is_counted_and_kept_failed_closed() {
        let mut s = PolicyStore::default();
        let bad = Object::NetworkPolicy(
            serde_json::from_value(json!({
                "metadata": {"namespace": "x", "name": "bad"},
                "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                         "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
            }))
            .unwrap(),
        );
        s.record_all(SourceUpdate::listing(vec![
            pod("x", "a", "a", "10.0.0.1"),
            pod("x", "b", "b", "10.0.0.2"),
            bad,
        ]));
        assert_eq!(s.invalid_received(), 1);
        // b is isolated with nothing allowed; a is untouched.
        assert!(!allows(&s, "10.0.0.1", "10.0.0.2"));
        assert!(allows(&s, "10.0.0.2", "10.0.0.1"));
    }

    #[test]
    fn a_pod_moving_to_the_host_network_leaves_the_policy_pods() {
        let mut s = PolicyStore::default();
        s.record(SourceUpdate::Upsert(pod("x", "a", "a", "10.0.0.1")));
        let host = Object::Pod(
            serde_json::from_value(json!({
                "metadata": {"namespace": "x", "name": "a"},
                "spec": {"containers": [], "hostNetwork": true},
            }))
            .unwrap(),
        );
        assert!(s.record(SourceUpdate::Upsert(host)));
        assert_eq!(s.counts().0, 0);
    }

    #[test]
    fn namespace_labels_change_is_a_change() {
        let mut s = PolicyStore::default();
        let ns = |v: &str| {
            Object::Namespace(
                serde_json::from_value(json!({"metadata": {"name": "x", "labels": {"team": v}}}))
                    .unwrap(),
            )
        };
        assert!(s.record(SourceUpdate::Upsert(ns("a"))));
        assert!(!s.record(SourceUpdate::Upsert(ns("a"))));
        assert!(s.record(SourceUpdate::Upsert(ns("b"))));
        assert!(s.record(SourceUpdate::Delete(ObjectRef {
            kind: Kind::Namespace,
            key: ObjectKey::new("", "x"),
        })));
    }
}
