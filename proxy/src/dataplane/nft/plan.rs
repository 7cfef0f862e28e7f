//! A [`Plan`]: the ordered operations of one nftables transaction, and its nft script.

use super::table::{BaseChain, Data, Family, Key, MapDecl, MapFlags, Rule, TABLE_NAME};
use std::fmt::Write as _;

/// One operation on weir's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create the table if it does not exist.
    AddTable,
    /// Delete the whole table (only `--cleanup` and a rebuild of an incompatible table).
    DeleteTable,
    /// Create a chain if it does not exist.
    AddChain {
        /// Chain name.
        name: String,
        /// Hook attachment for base chains.
        base: Option<BaseChain>,
    },
    /// Remove every rule of a chain.
    FlushChain {
        /// Chain name.
        name: String,
    },
    /// Append a rule to a chain.
    AddRule {
        /// Chain name.
        chain: String,
        /// The rule.
        rule: Rule,
    },
    /// Delete an empty, unreferenced chain.
    DeleteChain {
        /// Chain name.
        name: String,
    },
    /// Create a set or map if it does not exist.
    AddMap {
        /// Set or map name.
        name: String,
        /// Declaration.
        decl: MapDecl,
    },
    /// Delete an unreferenced set or map.
    DeleteMap {
        /// Set or map name.
        name: String,
        /// Whether it is a set (`delete set`) or a map (`delete map`).
        is_set: bool,
    },
    /// Add elements (a key already present with the same data is not an error).
    AddElements {
        /// Set or map name.
        map: String,
        /// Keys and their data ([`Data::None`] for sets).
        elements: Vec<(Key, Data)>,
    },
    /// Delete elements (each must exist).
    DeleteElements {
        /// Set or map name.
        map: String,
        /// Keys to delete.
        keys: Vec<Key>,
    },
}

/// The operations of one atomic transaction on one family's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The family of the table the plan changes.
    pub family: Family,
    /// Operations in order.
    pub ops: Vec<Op>,
}

/// Elements per `add element` / `delete element` command in the script.
const ELEMENTS_PER_COMMAND: usize = 4096;

impl Plan {
    /// A plan with no operations.
    pub fn empty(family: Family) -> Self {
        Plan {
            family,
            ops: Vec::new(),
        }
    }

    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of elements the plan adds and deletes.
    pub fn element_changes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::AddElements { elements, .. } => elements.len(),
                Op::DeleteElements { keys, .. } => keys.len(),
                _ => 0,
            })
            .sum()
    }

    /// Elements added minus elements deleted.
    pub fn element_delta(&self) -> i64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::AddElements { elements, .. } => elements.len() as i64,
                Op::DeleteElements { keys, .. } => -(keys.len() as i64),
                _ => 0,
            })
            .sum()
    }

    /// Splits off the element additions to the maps `plain` says are plain (written
    /// without nft, see [`super::NftBackend::add_elements`]): returns the rest, in its
    /// order, and those additions. The rest goes first: it creates what the elements name.
    pub fn split_elements(self, plain: impl Fn(&str) -> bool) -> (Plan, Plan) {
        let (elements, rest): (Vec<Op>, Vec<Op>) = self
            .ops
            .into_iter()
            .partition(|op| matches!(op, Op::AddElements { map, .. } if plain(map)));
        (
            Plan {
                family: self.family,
                ops: rest,
            },
            Plan {
                family: self.family,
                ops: elements,
            },
        )
    }

    /// The names of the plain sets and maps (no flags) the plan creates.
    pub fn plain_maps(&self) -> impl Iterator<Item = &str> {
        self.ops.iter().filter_map(|op| match op {
            Op::AddMap { name, decl } if decl.flags == MapFlags::None => Some(name.as_str()),
            _ => None,
        })
    }

    /// The plan as an `nft -f` script (one transaction) on weir's table.
    pub fn to_script(&self) -> String {
        self.to_script_in(TABLE_NAME)
    }

    /// The plan as an `nft -f` script on the table named `table`.
    pub fn to_script_in(&self, table: &str) -> String {
        let fam = self.family;
        let t = format!("{fam} {table}");
        let mut out = String::new();
        for op in &self.ops {
            // Writing to a String cannot fail.
            let _ = match op {
                Op::AddTable => writeln!(out, "add table {t}"),
                Op::DeleteTable => writeln!(out, "delete table {t}"),
                Op::AddChain { name, base: None } => writeln!(out, "add chain {t} {name}"),
                Op::AddChain {
                    name,
                    base: Some(b),
                } => writeln!(out, "add chain {t} {name} {{ {b} }}"),
                Op::FlushChain { name } => writeln!(out, "flush chain {t} {name}"),
                Op::AddRule { chain, rule } => {
                    writeln!(out, "add rule {t} {chain} {}", rule.to_nft(fam))
                }
                Op::DeleteChain { name } => writeln!(out, "delete chain {t} {name}"),
                Op::AddMap { name, decl } => {
                    let kind = if decl.is_set() { "set" } else { "map" };
                    writeln!(out, "add {kind} {t} {name} {{ {}; }}", decl.to_nft(fam))
                }
                Op::DeleteMap { name, is_set } => {
                    let kind = if *is_set { "set" } else { "map" };
                    writeln!(out, "delete {kind} {t} {name}")
                }
                Op::AddElements { map, elements } => {
                    for chunk in elements.chunks(ELEMENTS_PER_COMMAND) {
                        let _ = write!(out, "add element {t} {map} {{ ");
                        for (i, (k, d)) in chunk.iter().enumerate() {
                            let sep = if i > 0 { ", " } else { "" };
                            let _ = match d {
                                Data::None => write!(out, "{sep}{k}"),
                                d => write!(out, "{sep}{k} : {d}"),
                            };
                        }
                        let _ = writeln!(out, " }}");
                    }
                    Ok(())
                }
                Op::DeleteElements { map, keys } => {
                    for chunk in keys.chunks(ELEMENTS_PER_COMMAND) {
                        let _ = write!(out, "delete element {t} {map} {{ ");
                        for (i, k) in chunk.iter().enumerate() {
                            let sep = if i > 0 { ", " } else { "" };
                            let _ = write!(out, "{sep}{k}");
                        }
                        let _ = writeln!(out, " }}");
                    }
                    Ok(())
                }
            };
        }
        out
    }
}
