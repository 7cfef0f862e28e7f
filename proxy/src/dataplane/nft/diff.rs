//! Turning a desired table into a plan against what is realized, in a safe order.

use super::plan::{Op, Plan};
use super::table::{Chain, Data, DumpedTable, Family, Key, MapDecl, Table};

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
    /// Structural differences between two skeletons (typed rules on both sides).
    pub(super) fn between_skeletons(old: &Table, new: &Table) -> TableDelta {
        let mut d = TableDelta::default();
        for (name, m) in &new.maps {
            if !old.maps.contains_key(name) {
                d.new_maps.push((name.clone(), m.decl.clone()));
            }
        }
        for (name, m) in &old.maps {
            if !new.maps.contains_key(name) {
                d.gone_maps.push((name.clone(), m.decl.is_set()));
            }
        }
        for (name, c) in &new.chains {
            match old.chains.get(name) {
                None => d.new_chains.push((name.clone(), c.clone())),
                Some(o) if o.rules != c.rules => {
                    d.changed_chains
                        .push((name.clone(), c.clone(), !o.rules.is_empty()))
                }
                Some(_) => {}
            }
        }
        for (name, c) in &old.chains {
            if !new.chains.contains_key(name) {
                d.gone_chains.push((name.clone(), !c.rules.is_empty()));
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

/// [`plan`], consuming the desired table so its elements move into the plan (a full sync at
/// scale then holds them once, not twice).
pub fn plan_owned(mut desired: Table, realized: &DumpedTable) -> Plan {
    let fam = desired.family;
    let incompatible = realized.maps.iter().any(|(name, m)| {
        desired
            .maps
            .get(name)
            .is_some_and(|w| w.decl.to_nft(fam) != m.decl || w.decl.is_set() != m.is_set)
    }) || realized.chains.iter().any(|(name, c)| {
        desired
            .chains
            .get(name)
            .is_some_and(|w| w.base.map(|b| b.to_string()) != c.header)
    });
    let empty = DumpedTable::empty(fam);
    let realized = if incompatible { &empty } else { realized };
    let mut d = TableDelta::default();
    for (name, m) in &mut desired.maps {
        let elements = std::mem::take(&mut m.elements);
        match realized.maps.get(name) {
            None => {
                d.new_maps.push((name.clone(), m.decl.clone()));
                d.adds.push((name.clone(), elements.into_iter().collect()));
            }
            Some(have) => {
                let dels = have
                    .elements
                    .iter()
                    .filter(|(k, v)| elements.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .collect();
                d.dels.push((name.clone(), dels));
                let adds = elements
                    .into_iter()
                    .filter(|(k, v)| have.elements.get(k) != Some(v))
                    .collect();
                d.adds.push((name.clone(), adds));
            }
        }
    }
    for (name, c) in &desired.chains {
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
        if !desired.chains.contains_key(name) {
            d.gone_chains.push((name.clone(), !c.rules.is_empty()));
        }
    }
    for (name, m) in &realized.maps {
        if !desired.maps.contains_key(name) {
            d.gone_maps.push((name.clone(), m.is_set));
        }
    }
    let mut p = d.into_plan(fam, true);
    if incompatible {
        p.ops.splice(0..0, [Op::AddTable, Op::DeleteTable]);
    } else if p.ops == [Op::AddTable] && !realized.chains.is_empty() {
        p.ops.clear();
    }
    p
}

/// The plan that removes weir's table (for `--cleanup`); empty when there is none.
pub fn cleanup_plan(realized: Option<&DumpedTable>, family: Family) -> Plan {
    let mut p = Plan::empty(family);
    if realized.is_some() {
        p.ops.push(Op::DeleteTable);
    }
    p
}
