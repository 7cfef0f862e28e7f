//! Incremental rendering: only the changed Service ports' elements, plus the chains and maps
//! that come or go with them.

use super::diff::TableDelta;
use super::plan::Plan;
use super::render::{contribution, skeleton, Counts, MapName, RenderConfig, Shared};
use super::table::{Data, Family, Key, Table};
use crate::model::{DesiredState, ServiceDelta};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Incremental rendering: keeps the reference counts and the skeleton of what was last
/// applied, and turns the changed Service ports into a plan of only their elements (plus
/// the chains that come or go with them).
#[derive(Clone, Debug)]
pub struct Incremental {
    cfg: RenderConfig,
    family: Family,
    counts: Counts,
    skeleton: Table,
}

impl Incremental {
    /// The state after `state` has been applied in full.
    pub fn new(state: &DesiredState, cfg: &RenderConfig, family: Family) -> Self {
        let mut counts = Counts::default();
        for sp in state.services.values() {
            counts.add(&contribution(sp, &state.node_ips, family));
        }
        Incremental {
            skeleton: skeleton(&counts, cfg, family),
            cfg: cfg.clone(),
            family,
            counts,
        }
    }

    /// Chains, rules and maps beyond those of an empty table (for the object count).
    pub fn structure_objects(&self) -> usize {
        let empty = skeleton(&Counts::default(), &self.cfg, self.family);
        let count =
            |t: &Table| t.chains.values().map(|c| 1 + c.rules.len()).sum::<usize>() + t.maps.len();
        count(&self.skeleton).saturating_sub(count(&empty))
    }

    /// The plan for a set of changed Service ports (node addresses unchanged). Apply it,
    /// and on failure drop this state and plan in full.
    pub fn update(&mut self, deltas: &[ServiceDelta], node_ips: &[IpAddr]) -> Plan {
        let fam = self.family;
        let mut dels: BTreeMap<MapName, BTreeSet<Key>> = BTreeMap::new();
        let mut adds: BTreeMap<MapName, BTreeMap<Key, Data>> = BTreeMap::new();
        let mut shared_before: BTreeMap<Shared, bool> = BTreeMap::new();
        for d in deltas {
            let old = d
                .old
                .as_ref()
                .map(|s| contribution(s, node_ips, fam))
                .unwrap_or_default();
            let new = d
                .new
                .as_ref()
                .map(|s| contribution(s, node_ips, fam))
                .unwrap_or_default();
            for k in old.shared.iter().chain(&new.shared) {
                shared_before
                    .entry(*k)
                    .or_insert_with(|| self.counts.shared.contains_key(k));
            }
            self.counts.remove(&old);
            self.counts.add(&new);
            let old_el: BTreeMap<(MapName, &Key), &Data> =
                old.elements.iter().map(|(m, k, d)| ((*m, k), d)).collect();
            let new_el: BTreeMap<(MapName, &Key), &Data> =
                new.elements.iter().map(|(m, k, d)| ((*m, k), d)).collect();
            for (m, k, d) in &old.elements {
                if new_el.get(&(*m, k)) != Some(&d) {
                    dels.entry(*m).or_default().insert(k.clone());
                }
            }
            for (m, k, d) in &new.elements {
                if old_el.get(&(*m, k)) != Some(&d) {
                    adds.entry(*m).or_default().insert(k.clone(), d.clone());
                }
            }
        }
        for (shared, was) in shared_before {
            let now = self.counts.shared.contains_key(&shared);
            let (map, key) = shared.element();
            if was && !now {
                dels.entry(map).or_default().insert(key);
            } else if !was && now {
                adds.entry(map).or_default().insert(key, Data::None);
            }
        }
        let next = skeleton(&self.counts, &self.cfg, fam);
        let delta = TableDelta {
            dels: dels
                .into_iter()
                .map(|(m, k)| (m.to_string(), k.into_iter().collect()))
                .collect(),
            adds: adds
                .into_iter()
                .map(|(m, e)| (m.to_string(), e.into_iter().collect()))
                .collect(),
            ..TableDelta::between_skeletons(&self.skeleton, &next)
        };
        self.skeleton = next;
        delta.into_plan(fam, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nft::diff::{plan, plan_state};
    use crate::dataplane::nft::fake::FakeNft;
    use crate::dataplane::nft::render::desired_table;
    use crate::dataplane::nft::DumpedTable;
    use crate::model::ServicePortState;
    use crate::model::{Endpoint, ObjectKey, Protocol, ServiceInfo, ServicePortName};
    use proptest::prelude::*;

    fn cfg() -> RenderConfig {
        RenderConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            masquerade_all: false,
            ipvs: false,
        }
    }

    /// Service `i` of a generated state: unique cluster IP and NodePort; endpoints from a
    /// shared pool so hairpin pairs are shared between services.
    fn service(i: u8, proto: u8, nodeport: bool, eps: &[(u8, bool)]) -> ServicePortState {
        let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][usize::from(proto % 3)];
        let name = ServicePortName {
            namespace: "ns".into(),
            name: format!("s{i}"),
            port: String::new(),
            protocol,
        };
        let mut endpoints: Vec<Endpoint> = eps
            .iter()
            .map(|(e, local)| Endpoint {
                ip: IpAddr::from([10, 244, 1, e % 6 + 10]),
                port: 8080,
                is_local: *local || e % 2 == 0,
            })
            .collect();
        endpoints.sort();
        endpoints.dedup_by_key(|e| e.ip);
        ServicePortState::from_endpoints(
            ServiceInfo {
                node_port: nodeport.then_some(30000 + u16::from(i)),
                internal_local: proto % 2 == 1 && i % 2 == 1,
                ..ServiceInfo::new(name, vec![IpAddr::from([10, 96, 0, i + 1])], 80)
            },
            endpoints,
        )
    }

    type Spec = Vec<Option<(u8, bool, Vec<(u8, bool)>)>>;

    fn state(spec: &Spec) -> DesiredState {
        DesiredState {
            services: spec
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    s.as_ref()
                        .map(|(p, np, eps)| service(i as u8, *p, *np, eps))
                })
                .map(|sp| (sp.info.name.clone(), sp))
                .collect(),
            node_ips: vec![IpAddr::from([192, 168, 77, 10])],
            ..DesiredState::default()
        }
    }

    fn spec_strategy() -> impl Strategy<Value = Spec> {
        prop::collection::vec(
            prop::option::of((
                0u8..3,
                any::<bool>(),
                prop::collection::vec((0u8..6, any::<bool>()), 0..5),
            )),
            6,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Incremental plans, applied one after another to the fake (which rejects what the
        /// kernel rejects), always leave exactly the table a full render gives; re-planning
        /// after a full apply is empty; rendering is deterministic.
        #[test]
        fn incremental_updates_match_a_full_render(specs in prop::collection::vec(spec_strategy(), 2..5)) {
            let family = Family::Ip;
            let mut current = state(&specs[0]);
            let full = desired_table(&current, &cfg(), family);
            prop_assert_eq!(&full, &desired_table(&current, &cfg(), family));
            let mut fake = FakeNft::default();
            fake.apply(&plan(&full, &DumpedTable::empty(family))).unwrap();
            prop_assert!(plan(&full, &fake.dump(family).unwrap()).is_empty());
            let mut inc = Incremental::new(&current, &cfg(), family);
            for spec in &specs[1..] {
                let next = state(spec);
                let mut deltas = Vec::new();
                for i in 0..spec.len() {
                    let key = ObjectKey::new("ns", format!("s{i}"));
                    let ports: Vec<ServicePortState> = next
                        .services
                        .values()
                        .filter(|s| s.info.name.name == key.name)
                        .cloned()
                        .collect();
                    deltas.extend(current.replace_service(&key, ports).0);
                }
                // Same ports and endpoints as `next`; endpoints keep their slots (order).
                let as_sets = |s: &DesiredState| -> Vec<(String, BTreeSet<IpAddr>)> {
                    s.services.values().map(|p| (p.info.name.to_string(), p.endpoints.iter().map(|e| e.ip).collect())).collect()
                };
                prop_assert_eq!(as_sets(&current), as_sets(&next));
                let p = inc.update(&deltas, &current.node_ips);
                fake.apply(&p).map_err(|e| TestCaseError::fail(format!("{e}\n{}", p.to_script())))?;
                let want = desired_table(&current, &cfg(), family);
                prop_assert_eq!(fake.dump(family).unwrap().to_text(), want.to_dump().to_text());
                // The full-sync planner agrees: nothing to do against the same table, and
                // from nothing it builds the same table.
                let (again, _) = plan_state(&current, &cfg(), family, fake.dump(family).unwrap());
                prop_assert!(again.is_empty(), "{}", again.to_script());
                let mut fresh = FakeNft::default();
                let (p, _) = plan_state(&current, &cfg(), family, DumpedTable::empty(family));
                fresh.apply(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(fresh.dump(family).unwrap().to_text(), want.to_dump().to_text());
            }
        }
    }

    /// Six services with endpoints 0, 1, 2; service 3 then keeps only `kept`. Returns the
    /// incremental plan for that change.
    fn plan_for_s3_keeping(kept: Vec<(u8, bool)>) -> Plan {
        let family = Family::Ip;
        let spec: Spec = (0..6)
            .map(|_| Some((0, true, vec![(0, false), (1, false), (2, true)])))
            .collect();
        let mut current = state(&spec);
        let mut inc = Incremental::new(&current, &cfg(), family);
        let mut smaller = spec.clone();
        smaller[3] = Some((0, true, kept));
        let next = state(&smaller);
        let ports = next
            .services
            .values()
            .filter(|s| s.info.name.name == "s3")
            .cloned()
            .collect();
        let (deltas, _) = current.replace_service(&ObjectKey::new("ns", "s3"), ports);
        inc.update(&deltas, &current.node_ips)
    }

    #[test]
    fn removing_one_endpoint_sends_only_that_service_s_elements() {
        let p = plan_for_s3_keeping(vec![(0, false), (1, false)]);
        // ClusterIP and NodePort frontends: goto changes (2 deletes + 2 adds) and slot 2
        // goes away (2 deletes); no other service is touched.
        assert_eq!(p.element_changes(), 6, "{}", p.to_script());
        assert!(!p.to_script().contains("10.96.0.3 "), "{}", p.to_script());
    }

    #[test]
    fn removing_the_first_endpoint_moves_only_the_last_one_into_its_slot() {
        let p = plan_for_s3_keeping(vec![(1, false), (2, true)]);
        // Per frontend (ClusterIP, NodePort): slot 0 gets the last endpoint (2), slot 2 goes
        // (1), the goto changes (2). Slot 1 is untouched.
        assert_eq!(p.element_changes(), 10, "{}", p.to_script());
        assert!(!p.to_script().contains("backends_1"), "{}", p.to_script());
    }
}
