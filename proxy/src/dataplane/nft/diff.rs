//! Turning a desired table into a plan against what is realized, in a safe order.

use super::plan::{Op, Plan};
use super::render::{contribution, skeleton, Counts, RenderConfig};
use super::table::{Chain, Data, DumpedTable, Family, Key, MapDecl, Table};
use crate::model::DesiredState;
use std::collections::BTreeMap;

/// Everything one transaction changes, before it is put in a safe order.
#[derive(Debug, Default)]
pub(super) struct TableDelta {
    pub(super) new_maps: Vec<(String, MapDecl)>,
    pub(super) new_chains: Vec<(String, Chain)>,
    pub(super) changed_chains: Vec<(String, Chain, bool)>,
    pub(super) gone_chains: Vec<(String, bool)>,
    pub(super) gone_maps: Vec<(String, bool)>,
    pub(super) dels: Vec<(String, Vec<Key>)>,
    pub(super) adds: Vec<(String, Vec<(Key, Data)>)>,
}

impl TableDelta {
    /// Structural differences between two skeletons.
    pub(super) fn between_skeletons(old: &Table, new: &Table) -> TableDelta {
        TableDelta::structure(new, &old.to_dump())
    }

    /// Chains, rules and maps `skel` has that `realized` lacks or holds differently, and
    /// those `realized` has that `skel` does not (elements are not compared here).
    fn structure(skel: &Table, realized: &DumpedTable) -> TableDelta {
        let fam = skel.family;
        let mut d = TableDelta::default();
        for (name, m) in &skel.maps {
            if !realized.maps.contains_key(name) {
                d.new_maps.push((name.clone(), m.decl.clone()));
            }
        }
        for (name, c) in &skel.chains {
            match realized.chains.get(name) {
                None => d.new_chains.push((name.clone(), c.clone())),
                Some(have) => {
                    let want: Vec<String> = c.rules.iter().map(|r| r.to_nft(fam)).collect();
                    if want != have.rules {
                        d.changed_chains
                            .push((name.clone(), c.clone(), !have.rules.is_empty()));
                    }
                }
            }
        }
        for (name, c) in &realized.chains {
            if !skel.chains.contains_key(name) {
                d.gone_chains.push((name.clone(), !c.rules.is_empty()));
            }
        }
        for (name, m) in &realized.maps {
            if !skel.maps.contains_key(name) {
                d.gone_maps.push((name.clone(), m.is_set));
            }
        }
        d
    }

    /// Orders the changes so every reference exists when it is made and is gone before
    /// what it points to is deleted.
    pub(super) fn into_plan(self, family: Family, add_table: bool) -> Plan {
        let mut p = Plan::empty(family);
        if add_table {
            p.ops.push(Op::AddTable);
        }
        for (name, decl) in self.new_maps {
            p.ops.push(Op::AddMap { name, decl });
        }
        for (name, c) in &self.new_chains {
            p.ops.push(Op::AddChain {
                name: name.clone(),
                base: c.base,
            });
        }
        for (name, c) in self.new_chains {
            for rule in c.rules {
                p.ops.push(Op::AddRule {
                    chain: name.clone(),
                    rule,
                });
            }
        }
        for (map, keys) in self.dels {
            if !keys.is_empty() {
                p.ops.push(Op::DeleteElements { map, keys });
            }
        }
        for (map, elements) in self.adds {
            if !elements.is_empty() {
                p.ops.push(Op::AddElements { map, elements });
            }
        }
        for (name, c, had_rules) in self.changed_chains {
            if had_rules {
                p.ops.push(Op::FlushChain { name: name.clone() });
            }
            for rule in c.rules {
                p.ops.push(Op::AddRule {
                    chain: name.clone(),
                    rule,
                });
            }
        }
        for (name, had_rules) in &self.gone_chains {
            if *had_rules {
                p.ops.push(Op::FlushChain { name: name.clone() });
            }
        }
        for (name, _) in self.gone_chains {
            p.ops.push(Op::DeleteChain { name });
        }
        for (name, is_set) in self.gone_maps {
            p.ops.push(Op::DeleteMap { name, is_set });
        }
        p
    }
}

/// The plan that turns `realized` into `desired` in one transaction.
///
/// Only changed elements are sent. Chains whose rules changed are flushed and refilled.
/// A set or map whose declaration changed, or a base chain whose hook changed, cannot be
/// altered in place: then the plan deletes and recreates the whole table in the same
/// transaction (established connections keep their conntrack NAT bindings).
pub fn plan(desired: &Table, realized: &DumpedTable) -> Plan {
    plan_owned(desired.clone(), realized)
}

/// [`plan`], consuming the desired table so its elements move into the plan.
pub fn plan_owned(mut desired: Table, realized: &DumpedTable) -> Plan {
    let mut elements = Vec::new();
    for (name, m) in &mut desired.maps {
        for (k, d) in std::mem::take(&mut m.elements) {
            elements.push((name.clone(), k, d));
        }
    }
    plan_from(&desired, elements, realized.clone()).0
}

/// The full-sync plan straight from the desired state: elements are produced one Service
/// port at a time and compared with (and removed from) the realized table, so the desired
/// table is never held in memory. Also returns the number of nftables objects desired.
pub fn plan_state(
    state: &DesiredState,
    cfg: &RenderConfig,
    family: Family,
    realized: DumpedTable,
) -> (Plan, usize) {
    let mut counts = Counts::default();
    for sp in state.services.values() {
        counts.add(&contribution(sp, &state.node_ips, family));
    }
    let skel = skeleton(&counts, cfg, family);
    let shared: Vec<(String, Key, Data)> = counts
        .shared
        .into_keys()
        .map(|s| {
            let (map, key) = s.element();
            (map.to_string(), key, Data::None)
        })
        .collect();
    let elements = state
        .services
        .values()
        .flat_map(|sp| contribution(sp, &state.node_ips, family).elements)
        .map(|(m, k, d)| (m.to_string(), k, d))
        .chain(shared);
    plan_from(&skel, elements, realized)
}

/// Diffs a skeleton (chains, rules, map declarations) plus a stream of desired elements
/// against the realized table, which is consumed as elements are matched.
fn plan_from(
    skel: &Table,
    elements: impl IntoIterator<Item = (String, Key, Data)>,
    realized: DumpedTable,
) -> (Plan, usize) {
    let fam = skel.family;
    let incompatible = realized.maps.iter().any(|(name, m)| {
        skel.maps
            .get(name)
            .is_some_and(|w| w.decl.to_nft(fam) != m.decl || w.decl.is_set() != m.is_set)
    }) || realized.chains.iter().any(|(name, c)| {
        skel.chains
            .get(name)
            .is_some_and(|w| w.base.map(|b| b.to_string()) != c.header)
    });
    let mut realized = if incompatible {
        DumpedTable::empty(fam)
    } else {
        realized
    };
    let mut d = TableDelta::structure(skel, &realized);
    let mut adds: BTreeMap<String, Vec<(Key, Data)>> = BTreeMap::new();
    let mut dels: BTreeMap<String, Vec<Key>> = BTreeMap::new();
    let mut element_count = 0;
    for (map, key, data) in elements {
        element_count += 1;
        match realized
            .maps
            .get_mut(&map)
            .and_then(|m| m.elements.remove(&key))
        {
            Some(have) if have == data => {}
            Some(_) => {
                dels.entry(map.clone()).or_default().push(key.clone());
                adds.entry(map).or_default().push((key, data));
            }
            None => adds.entry(map).or_default().push((key, data)),
        }
    }
    for (name, m) in realized
        .maps
        .iter_mut()
        .filter(|(n, _)| skel.maps.contains_key(*n))
    {
        dels.entry(name.clone())
            .or_default()
            .extend(std::mem::take(&mut m.elements).into_keys());
    }
    d.dels = dels.into_iter().collect();
    d.adds = adds.into_iter().collect();
    let objects = element_count
        + skel
            .chains
            .values()
            .map(|c| 1 + c.rules.len())
            .sum::<usize>()
        + skel.maps.len();
    let mut p = d.into_plan(fam, true);
    if incompatible {
        p.ops.splice(0..0, [Op::AddTable, Op::DeleteTable]);
    } else if p.ops == [Op::AddTable] && !realized.chains.is_empty() {
        p.ops.clear();
    }
    (p, objects)
}

/// The plan that removes weir's table (for `--cleanup`); empty when there is none.
pub fn cleanup_plan(realized: Option<&DumpedTable>, family: Family) -> Plan {
    let mut p = Plan::empty(family);
    if realized.is_some() {
        p.ops.push(Op::DeleteTable);
    }
    p
}
