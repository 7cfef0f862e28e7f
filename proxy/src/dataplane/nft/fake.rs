//! A fake of the kernel's nftables for the pure layers' tests: it holds typed tables and
//! rejects what the kernel rejects (checked against this machine's kernel and nft 1.0.6):
//! references to missing chains, sets and maps; key and data types that do not match a
//! declaration; an element re-added with different data (EEXIST); deleting a missing
//! element (ENOENT); deleting a chain or map still in use (EBUSY); jumps to base chains.
//! A plan applies atomically: all of it or nothing.

use super::plan::{Op, Plan};
use super::table::{
    Atom, BaseChain, Chain, Data, DataType, DumpedTable, Family, FieldType, Key, KeyExpr, Map,
    MapDecl, MapFlags, Match, Rule, Stmt, Table,
};
use std::collections::BTreeMap;

/// What the fake rejected, naming the operation, the object and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FakeNftError {
    /// The object does not exist (kernel: ENOENT).
    #[error("{op}: {object}: does not exist")]
    NotFound {
        /// The operation.
        op: String,
        /// The object.
        object: String,
    },
    /// The object exists with other content (kernel: EEXIST).
    #[error("{op}: {object}: exists with different content")]
    Exists {
        /// The operation.
        op: String,
        /// The object.
        object: String,
    },
    /// The object is still referenced (kernel: EBUSY).
    #[error("{op}: {object}: still in use by {user}")]
    Busy {
        /// The operation.
        op: String,
        /// The object.
        object: String,
        /// What uses it.
        user: String,
    },
    /// Types do not match (nft: datatype mismatch) or the operation is not supported.
    #[error("{op}: {object}: {reason}")]
    Invalid {
        /// The operation.
        op: String,
        /// The object.
        object: String,
        /// Why.
        reason: String,
    },
}

/// The fake kernel state: one optional `weir` table per family.
#[derive(Clone, Debug, Default)]
pub struct FakeNft {
    tables: BTreeMap<Family, Table>,
}

fn key_expr_type(k: &KeyExpr) -> FieldType {
    match k {
        KeyExpr::SAddr | KeyExpr::DAddr => FieldType::Addr,
        KeyExpr::L4Proto => FieldType::Proto,
        KeyExpr::DPort => FieldType::Port,
    }
}

impl FakeNft {
    /// The table of a family, if it exists.
    pub fn table(&self, family: Family) -> Option<&Table> {
        self.tables.get(&family)
    }

    /// The table of a family as the kernel would list it.
    pub fn dump(&self, family: Family) -> Option<DumpedTable> {
        self.tables.get(&family).map(Table::to_dump)
    }

    /// Applies a plan atomically.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), FakeNftError> {
        let mut tables = self.tables.clone();
        for op in &plan.ops {
            apply_op(&mut tables, plan.family, op)?;
        }
        self.tables = tables;
        Ok(())
    }
}

/// A [`FakeNft`] shared between the sync runner and a test, counting what was done to it
/// and able to fail the next apply the way a kernel rejection would.
#[derive(Clone, Debug, Default)]
pub struct SharedFake {
    inner: std::sync::Arc<std::sync::Mutex<SharedState>>,
}

#[derive(Debug, Default)]
struct SharedState {
    fake: FakeNft,
    applies: usize,
    dumps: usize,
    fail_next: bool,
}

impl SharedFake {
    fn with<R>(&self, f: impl FnOnce(&mut SharedState) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Successful applies so far.
    pub fn applies(&self) -> usize {
        self.with(|s| s.applies)
    }

    /// Dumps so far (full syncs read the table back).
    pub fn dumps(&self) -> usize {
        self.with(|s| s.dumps)
    }

    /// The next apply fails and changes nothing.
    pub fn fail_next_apply(&self) {
        self.with(|s| s.fail_next = true);
    }

    /// The current table of a family.
    pub fn table(&self, family: Family) -> Option<Table> {
        self.with(|s| s.fake.table(family).cloned())
    }
}

impl super::NftBackend for SharedFake {
    fn dump(&self, family: Family) -> Result<Option<DumpedTable>, super::kernel::KernelError> {
        Ok(self.with(|s| {
            s.dumps += 1;
            s.fake.dump(family)
        }))
    }

    fn apply(&self, plan: &Plan) -> Result<(), super::kernel::KernelError> {
        self.with(|s| {
            let result = if std::mem::take(&mut s.fail_next) {
                Err("injected failure".to_owned())
            } else {
                s.fake.apply(plan).map_err(|e| e.to_string())
            };
            match result {
                Ok(()) => {
                    s.applies += 1;
                    Ok(())
                }
                Err(stderr) => Err(super::kernel::KernelError::Apply {
                    family: plan.family,
                    table: super::table::TABLE_NAME.to_owned(),
                    ops: plan.ops.len(),
                    stderr,
                }),
            }
        })
    }
}

fn not_found(op: &str, object: impl Into<String>) -> FakeNftError {
    FakeNftError::NotFound {
        op: op.to_owned(),
        object: object.into(),
    }
}

fn invalid(op: &str, object: impl Into<String>, reason: impl Into<String>) -> FakeNftError {
    FakeNftError::Invalid {
        op: op.to_owned(),
        object: object.into(),
        reason: reason.into(),
    }
}

fn apply_op(
    tables: &mut BTreeMap<Family, Table>,
    family: Family,
    op: &Op,
) -> Result<(), FakeNftError> {
    if let Op::AddTable = op {
        tables.entry(family).or_insert_with(|| Table::new(family));
        return Ok(());
    }
    let name = op_name(op);
    let Some(t) = tables.get_mut(&family) else {
        return Err(not_found(&name, format!("table {family} weir")));
    };
    match op {
        Op::AddTable => Ok(()),
        Op::DeleteTable => {
            tables.remove(&family);
            Ok(())
        }
        Op::AddChain { name: c, base } => add_chain(t, &name, c, *base),
        Op::FlushChain { name: c } => {
            let chain = t
                .chains
                .get_mut(c)
                .ok_or_else(|| not_found(&name, format!("chain {c}")))?;
            chain.rules.clear();
            Ok(())
        }
        Op::AddRule { chain, rule } => add_rule(t, &name, chain, rule),
        Op::DeleteChain { name: c } => delete_chain(t, &name, c),
        Op::AddMap { name: m, decl } => match t.maps.get(m) {
            Some(existing) if existing.decl == *decl => Ok(()),
            Some(_) => Err(FakeNftError::Exists {
                op: name,
                object: format!("map {m}"),
            }),
            None => {
                t.maps.insert(
                    m.clone(),
                    Map {
                        decl: decl.clone(),
                        elements: BTreeMap::new(),
                    },
                );
                Ok(())
            }
        },
        Op::DeleteMap { name: m, .. } => {
            if !t.maps.contains_key(m) {
                return Err(not_found(&name, format!("map {m}")));
            }
            for (cname, c) in &t.chains {
                if c.rules.iter().any(|r| r.referenced_maps().any(|x| x == m)) {
                    return Err(FakeNftError::Busy {
                        op: name,
                        object: format!("map {m}"),
                        user: format!("a rule of chain {cname}"),
                    });
                }
            }
            t.maps.remove(m);
            Ok(())
        }
        Op::AddElements { map, elements } => add_elements(t, &name, map, elements),
        Op::DeleteElements { map, keys } => {
            let m = t
                .maps
                .get_mut(map)
                .ok_or_else(|| not_found(&name, format!("map {map}")))?;
            for k in keys {
                if m.elements.remove(k).is_none() {
                    return Err(not_found(&name, format!("element {k} of {map}")));
                }
            }
            Ok(())
        }
    }
}

fn op_name(op: &Op) -> String {
    match op {
        Op::AddTable => "add table".into(),
        Op::DeleteTable => "delete table".into(),
        Op::AddChain { name, .. } => format!("add chain {name}"),
        Op::FlushChain { name } => format!("flush chain {name}"),
        Op::AddRule { chain, .. } => format!("add rule to chain {chain}"),
        Op::DeleteChain { name } => format!("delete chain {name}"),
        Op::AddMap { name, .. } => format!("add map {name}"),
        Op::DeleteMap { name, .. } => format!("delete map {name}"),
        Op::AddElements { map, .. } => format!("add element to map {map}"),
        Op::DeleteElements { map, .. } => format!("delete element from map {map}"),
    }
}

fn add_chain(
    t: &mut Table,
    op: &str,
    c: &str,
    base: Option<BaseChain>,
) -> Result<(), FakeNftError> {
    match t.chains.get(c) {
        Some(existing) if existing.base == base => Ok(()),
        Some(_) => Err(FakeNftError::Exists {
            op: op.to_owned(),
            object: format!("chain {c}"),
        }),
        None => {
            t.chains.insert(
                c.to_owned(),
                Chain {
                    base,
                    rules: Vec::new(),
                },
            );
            Ok(())
        }
    }
}

fn check_key(
    op: &str,
    t: &Table,
    key: &[KeyExpr],
    map: &str,
    want: DataType,
) -> Result<(), FakeNftError> {
    let m = t
        .maps
        .get(map)
        .ok_or_else(|| not_found(op, format!("map {map}")))?;
    let types: Vec<FieldType> = key.iter().map(key_expr_type).collect();
    if types != m.decl.key {
        return Err(invalid(
            op,
            format!("map {map}"),
            format!(
                "datatype mismatch: key {types:?}, declaration {:?}",
                m.decl.key
            ),
        ));
    }
    if m.decl.data != want {
        return Err(invalid(
            op,
            format!("map {map}"),
            format!(
                "datatype mismatch: want data {want:?}, declaration {:?}",
                m.decl.data
            ),
        ));
    }
    Ok(())
}

fn check_jump_target(op: &str, t: &Table, target: &str) -> Result<(), FakeNftError> {
    match t.chains.get(target) {
        None => Err(not_found(op, format!("chain {target}"))),
        Some(c) if c.base.is_some() => Err(invalid(
            op,
            format!("chain {target}"),
            "operation not supported: jump or goto to a base chain",
        )),
        Some(_) => Ok(()),
    }
}

fn add_rule(t: &mut Table, op: &str, chain: &str, rule: &Rule) -> Result<(), FakeNftError> {
    if !t.chains.contains_key(chain) {
        return Err(not_found(op, format!("chain {chain}")));
    }
    for m in &rule.matches {
        if let Match::InSet { key, set } = m {
            check_key(op, t, key, set, DataType::None)?;
        }
    }
    for s in &rule.stmts {
        match s {
            Stmt::Vmap { key, map } => check_key(op, t, key, map, DataType::Verdict)?,
            Stmt::Dnat { key, map } => check_key(op, t, key, map, DataType::AddrPort)?,
            _ => {}
        }
    }
    for target in rule.referenced_chains() {
        check_jump_target(op, t, target)?;
    }
    if let Some(c) = t.chains.get_mut(chain) {
        c.rules.push(rule.clone());
    }
    Ok(())
}

fn delete_chain(t: &mut Table, op: &str, c: &str) -> Result<(), FakeNftError> {
    let chain = t
        .chains
        .get(c)
        .ok_or_else(|| not_found(op, format!("chain {c}")))?;
    let busy = |user: String| FakeNftError::Busy {
        op: op.to_owned(),
        object: format!("chain {c}"),
        user,
    };
    if !chain.rules.is_empty() {
        return Err(busy("its own rules".into()));
    }
    for (name, other) in &t.chains {
        if other
            .rules
            .iter()
            .any(|r| r.referenced_chains().any(|x| x == c))
        {
            return Err(busy(format!("a rule of chain {name}")));
        }
    }
    for (name, m) in &t.maps {
        if m.elements
            .values()
            .any(|d| matches!(d, Data::Goto(x) if x == c))
        {
            return Err(busy(format!("an element of map {name}")));
        }
    }
    t.chains.remove(c);
    Ok(())
}

fn check_atoms(op: &str, map: &str, decl: &MapDecl, key: &Key) -> Result<(), FakeNftError> {
    if decl.flags != MapFlags::Interval && key.0.iter().any(Atom::is_interval) {
        return Err(invalid(
            op,
            format!("element {key} of {map}"),
            "a prefix or range needs a set with flags interval",
        ));
    }
    let types: Vec<FieldType> = key.0.iter().map(Atom::field_type).collect();
    if types != decl.key {
        return Err(invalid(
            op,
            format!("element {key} of {map}"),
            format!(
                "key has {} fields {types:?}, declaration has {} {:?}",
                types.len(),
                decl.key.len(),
                decl.key
            ),
        ));
    }
    Ok(())
}

fn add_elements(
    t: &mut Table,
    op: &str,
    map: &str,
    elements: &[(Key, Data)],
) -> Result<(), FakeNftError> {
    let decl = t
        .maps
        .get(map)
        .ok_or_else(|| not_found(op, format!("map {map}")))?
        .decl
        .clone();
    for (k, d) in elements {
        check_atoms(op, map, &decl, k)?;
        if d.data_type() != decl.data {
            return Err(invalid(
                op,
                format!("element {k} of {map}"),
                format!(
                    "data {:?} does not match declaration {:?}",
                    d.data_type(),
                    decl.data
                ),
            ));
        }
        if let Data::Goto(c) = d {
            check_jump_target(op, t, c)?;
        }
        let m = t
            .maps
            .get_mut(map)
            .ok_or_else(|| not_found(op, format!("map {map}")))?;
        if decl.flags == MapFlags::Interval {
            let conflict = m
                .elements
                .keys()
                .find(|have| *have != k && have.0.iter().zip(&k.0).all(|(a, b)| a.overlaps(b)));
            if let Some(have) = conflict {
                return Err(FakeNftError::Exists {
                    op: op.to_owned(),
                    object: format!("element {k} of {map} (conflicting intervals with {have})"),
                });
            }
        }
        match m.elements.get(k) {
            Some(existing) if existing != d => {
                return Err(FakeNftError::Exists {
                    op: op.to_owned(),
                    object: format!("element {k} of {map}"),
                })
            }
            _ => {
                m.elements.insert(k.clone(), d.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn plan(ops: Vec<Op>) -> Plan {
        Plan {
            family: Family::Ip,
            ops,
        }
    }

    fn frontend_decl(data: DataType) -> MapDecl {
        MapDecl {
            flags: Default::default(),
            key: vec![FieldType::Addr, FieldType::Proto, FieldType::Port],
            data,
        }
    }

    fn key(ip: &str, port: u16) -> Key {
        Key(vec![
            Atom::Addr(ip.parse().unwrap()),
            Atom::Proto(Protocol::Tcp),
            Atom::Port(port),
        ])
    }

    fn base_setup() -> FakeNft {
        let mut f = FakeNft::default();
        f.apply(&plan(vec![
            Op::AddTable,
            Op::AddChain {
                name: "slot_0".into(),
                base: None,
            },
            Op::AddMap {
                name: "vm".into(),
                decl: frontend_decl(DataType::Verdict),
            },
            Op::AddMap {
                name: "set".into(),
                decl: frontend_decl(DataType::None),
            },
        ]))
        .unwrap();
        f
    }

    #[test]
    fn ops_on_a_missing_table_are_rejected() {
        let mut f = FakeNft::default();
        let e = f
            .apply(&plan(vec![Op::AddChain {
                name: "x".into(),
                base: None,
            }]))
            .unwrap_err();
        assert!(matches!(e, FakeNftError::NotFound { .. }), "{e}");
        assert!(f.apply(&plan(vec![Op::DeleteTable])).is_err());
    }

    #[test]
    fn element_with_other_data_is_exists_and_same_data_is_fine() {
        let mut f = base_setup();
        let add = |c: &str| Op::AddElements {
            map: "vm".into(),
            elements: vec![(key("10.96.0.1", 80), Data::Goto(c.into()))],
        };
        f.apply(&plan(vec![add("slot_0")])).unwrap();
        f.apply(&plan(vec![add("slot_0")])).unwrap();
        f.apply(&plan(vec![Op::AddChain {
            name: "slot_1".into(),
            base: None,
        }]))
        .unwrap();
        let e = f.apply(&plan(vec![add("slot_1")])).unwrap_err();
        assert!(matches!(e, FakeNftError::Exists { .. }), "{e}");
    }

    #[test]
    fn interval_elements_need_an_interval_set_and_must_not_overlap() {
        let mut f = base_setup();
        let ports = MapDecl {
            key: vec![FieldType::Proto, FieldType::Port],
            data: DataType::None,
            flags: MapFlags::Interval,
        };
        let pk = |a, b| Key(vec![Atom::Proto(Protocol::Tcp), Atom::port_range(a, b)]);
        let add = |map: &str, k: Key| Op::AddElements {
            map: map.into(),
            elements: vec![(k, Data::None)],
        };
        f.apply(&plan(vec![Op::AddMap {
            name: "ports".into(),
            decl: ports,
        }]))
        .unwrap();
        f.apply(&plan(vec![
            add("ports", pk(80, 81)),
            add("ports", pk(82, 82)),
        ]))
        .unwrap();
        f.apply(&plan(vec![add("ports", pk(80, 81))])).unwrap();
        let e = f.apply(&plan(vec![add("ports", pk(81, 90))])).unwrap_err();
        assert!(e.to_string().contains("conflicting intervals"), "{e}");
        let udp = Key(vec![Atom::Proto(Protocol::Udp), Atom::port_range(0, 65535)]);
        f.apply(&plan(vec![add("ports", udp)])).unwrap();
        let ranged = Key(vec![
            Atom::Addr("10.96.0.1".parse().unwrap()),
            Atom::Proto(Protocol::Tcp),
            Atom::port_range(1, 2),
        ]);
        let e = f.apply(&plan(vec![add("set", ranged)])).unwrap_err();
        assert!(e.to_string().contains("flags interval"), "{e}");
    }

    #[test]
    fn deleting_a_missing_element_is_not_found() {
        let mut f = base_setup();
        let e = f
            .apply(&plan(vec![Op::DeleteElements {
                map: "set".into(),
                keys: vec![key("10.96.0.1", 80)],
            }]))
            .unwrap_err();
        assert!(matches!(e, FakeNftError::NotFound { .. }), "{e}");
    }

    #[test]
    fn key_arity_and_types_must_match_the_declaration() {
        let mut f = base_setup();
        let short = Key(vec![
            Atom::Addr("10.96.0.1".parse().unwrap()),
            Atom::Proto(Protocol::Tcp),
        ]);
        let e = f
            .apply(&plan(vec![Op::AddElements {
                map: "set".into(),
                elements: vec![(short, Data::None)],
            }]))
            .unwrap_err();
        assert!(e.to_string().contains("key has 2 fields"), "{e}");
        let e = f
            .apply(&plan(vec![Op::AddElements {
                map: "set".into(),
                elements: vec![(key("10.96.0.1", 80), Data::Goto("slot_0".into()))],
            }]))
            .unwrap_err();
        assert!(matches!(e, FakeNftError::Invalid { .. }), "{e}");
    }

    #[test]
    fn rules_need_existing_maps_of_the_right_kind_and_key() {
        let mut f = base_setup();
        let k = vec![KeyExpr::DAddr, KeyExpr::L4Proto, KeyExpr::DPort];
        let vmap_on_set = Rule::new(
            vec![],
            vec![Stmt::Vmap {
                key: k.clone(),
                map: "set".into(),
            }],
        );
        assert!(f
            .apply(&plan(vec![Op::AddRule {
                chain: "slot_0".into(),
                rule: vmap_on_set
            }]))
            .is_err());
        let wrong_key = Rule::new(
            vec![],
            vec![Stmt::Vmap {
                key: vec![KeyExpr::DAddr],
                map: "vm".into(),
            }],
        );
        assert!(f
            .apply(&plan(vec![Op::AddRule {
                chain: "slot_0".into(),
                rule: wrong_key
            }]))
            .is_err());
        let missing = Rule::new(
            vec![],
            vec![Stmt::Vmap {
                key: k.clone(),
                map: "nope".into(),
            }],
        );
        assert!(matches!(
            f.apply(&plan(vec![Op::AddRule {
                chain: "slot_0".into(),
                rule: missing
            }]))
            .unwrap_err(),
            FakeNftError::NotFound { .. }
        ));
        let ok = Rule::new(
            vec![],
            vec![Stmt::Vmap {
                key: k,
                map: "vm".into(),
            }],
        );
        f.apply(&plan(vec![Op::AddRule {
            chain: "slot_0".into(),
            rule: ok,
        }]))
        .unwrap();
    }

    #[test]
    fn jumps_to_base_chains_are_not_supported() {
        let mut f = base_setup();
        let base = BaseChain {
            kind: super::super::table::ChainType::Filter,
            hook: super::super::table::Hook::Forward,
            priority: 0,
        };
        f.apply(&plan(vec![Op::AddChain {
            name: "fwd".into(),
            base: Some(base),
        }]))
        .unwrap();
        let e = f
            .apply(&plan(vec![Op::AddRule {
                chain: "slot_0".into(),
                rule: Rule::new(vec![], vec![Stmt::Jump("fwd".into())]),
            }]))
            .unwrap_err();
        assert!(e.to_string().contains("base chain"), "{e}");
    }

    #[test]
    fn chains_and_maps_in_use_are_busy_and_a_failed_plan_changes_nothing() {
        let mut f = base_setup();
        f.apply(&plan(vec![Op::AddElements {
            map: "vm".into(),
            elements: vec![(key("10.96.0.1", 80), Data::Goto("slot_0".into()))],
        }]))
        .unwrap();
        let before = f.dump(Family::Ip);
        let e = f
            .apply(&plan(vec![
                Op::AddMap {
                    name: "new".into(),
                    decl: frontend_decl(DataType::None),
                },
                Op::DeleteChain {
                    name: "slot_0".into(),
                },
            ]))
            .unwrap_err();
        assert!(matches!(e, FakeNftError::Busy { .. }), "{e}");
        assert_eq!(
            f.dump(Family::Ip),
            before,
            "atomic: the map added first is not there"
        );
        // Deleting the element first, in the same transaction, frees the chain.
        f.apply(&plan(vec![
            Op::DeleteElements {
                map: "vm".into(),
                keys: vec![key("10.96.0.1", 80)],
            },
            Op::DeleteChain {
                name: "slot_0".into(),
            },
        ]))
        .unwrap();
        assert!(f.table(Family::Ip).unwrap().chains.is_empty());
        f.apply(&plan(vec![Op::AddRule {
            chain: "x".into(),
            rule: Rule::new(
                vec![Match::InSet {
                    key: vec![KeyExpr::DAddr, KeyExpr::L4Proto, KeyExpr::DPort],
                    set: "set".into(),
                }],
                vec![Stmt::Reject],
            ),
        }]))
        .unwrap_err();
    }
}
