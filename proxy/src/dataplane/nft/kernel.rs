//! Side effects: applying plans with `nft -f` and dumping weir's table back.

use super::plan::Plan;
use super::table::{Atom, Data, DumpedChain, DumpedMap, DumpedTable, Family, Key, TABLE_NAME};
use crate::model::Protocol;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// Failures talking to the kernel through `nft`.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `nft` could not be started.
    #[error("running {program}: {source} (is the nftables package installed?)")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel rejected a transaction; nothing of it was applied.
    #[error("nft -f rejected the {family} transaction of {ops} operations: {stderr}")]
    Apply {
        /// Family of the table.
        family: Family,
        /// Operations in the plan.
        ops: usize,
        /// What nft printed (first lines).
        stderr: String,
    },
    /// Listing the table failed.
    #[error("nft list table {family} {TABLE_NAME}: {message}")]
    List {
        /// Family of the table.
        family: Family,
        /// What went wrong.
        message: String,
    },
    /// The listing could not be understood.
    #[error("parsing nft's listing of {family} {TABLE_NAME}: {message}")]
    Parse {
        /// Family of the table.
        family: Family,
        /// What was not understood.
        message: String,
    },
}

/// The real nftables, driven through the `nft` binary.
#[derive(Clone, Debug)]
pub struct KernelNft {
    program: String,
    prefix: Vec<String>,
}

impl Default for KernelNft {
    fn default() -> Self {
        KernelNft {
            program: "nft".to_owned(),
            prefix: Vec::new(),
        }
    }
}

impl KernelNft {
    /// nftables of a named network namespace (runs `ip netns exec NAME nft`); for tests.
    pub fn in_netns(name: &str) -> Self {
        KernelNft {
            program: "ip".to_owned(),
            prefix: ["netns", "exec", name, "nft"].map(str::to_owned).to_vec(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.prefix);
        c
    }

    /// Applies a plan as one atomic `nft -f -` transaction.
    pub fn apply(&self, plan: &Plan) -> Result<(), KernelError> {
        if plan.is_empty() {
            return Ok(());
        }
        let script = plan.to_script();
        let mut child = self
            .command()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|source| self.spawn_error(source))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| self.spawn_error(source))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .take(12)
            .collect::<Vec<_>>()
            .join("\n");
        Err(KernelError::Apply {
            family: plan.family,
            ops: plan.ops.len(),
            stderr,
        })
    }

    /// Lists weir's table: `None` when it does not exist.
    pub fn dump(&self, family: Family) -> Result<Option<DumpedTable>, KernelError> {
        let fam = family.as_str();
        let out = self
            .command()
            .args(["-t", "list", "table", fam, TABLE_NAME])
            .output()
            .map_err(|source| self.spawn_error(source))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(KernelError::List {
                family,
                message: stderr.trim().to_owned(),
            });
        }
        let mut table = parse_terse(family, &String::from_utf8_lossy(&out.stdout))?;
        if !table.maps.is_empty() {
            let out = self
                .command()
                .args(["-j", "list", "table", fam, TABLE_NAME])
                .output()
                .map_err(|source| self.spawn_error(source))?;
            if !out.status.success() {
                return Err(KernelError::List {
                    family,
                    message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            fill_elements(&mut table, &String::from_utf8_lossy(&out.stdout))?;
        }
        Ok(Some(table))
    }

    fn spawn_error(&self, source: std::io::Error) -> KernelError {
        KernelError::Spawn {
            program: self.program.clone(),
            source,
        }
    }
}

/// Parses `nft -t list table` output: chains with their header and rules, set/map
/// declarations (elements are filled from the JSON listing).
pub fn parse_terse(family: Family, text: &str) -> Result<DumpedTable, KernelError> {
    enum Block {
        None,
        Chain(String, DumpedChain),
        Map(String, bool, Vec<String>),
    }
    let mut t = DumpedTable::empty(family);
    let mut block = Block::None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("table ") {
            continue;
        }
        if line == "}" {
            match std::mem::replace(&mut block, Block::None) {
                Block::Chain(name, c) => {
                    t.chains.insert(name, c);
                }
                Block::Map(name, is_set, decl) => {
                    t.maps.insert(
                        name,
                        DumpedMap {
                            is_set,
                            decl: decl.join("; "),
                            elements: BTreeMap::new(),
                        },
                    );
                }
                Block::None => {}
            }
            continue;
        }
        if let Some(rest) = line.strip_suffix(" {") {
            let mut words = rest.split_whitespace();
            let kind = words.next().unwrap_or_default();
            let name = words.next().unwrap_or_default().to_owned();
            block = match kind {
                "chain" => Block::Chain(name, DumpedChain::default()),
                "set" => Block::Map(name, true, Vec::new()),
                "map" => Block::Map(name, false, Vec::new()),
                other => {
                    return Err(KernelError::Parse {
                        family,
                        message: format!("unexpected block {other:?}"),
                    })
                }
            };
            continue;
        }
        match &mut block {
            Block::Chain(_, c) => {
                if line.starts_with("type ") && c.rules.is_empty() && c.header.is_none() {
                    c.header = Some(line.to_owned());
                } else {
                    c.rules.push(line.to_owned());
                }
            }
            Block::Map(_, _, decl) => decl.push(line.to_owned()),
            Block::None => {
                return Err(KernelError::Parse {
                    family,
                    message: format!("line outside any block: {line:?}"),
                })
            }
        }
    }
    Ok(t)
}

/// Fills set/map elements from `nft -j list table` output.
pub fn fill_elements(table: &mut DumpedTable, json: &str) -> Result<(), KernelError> {
    let family = table.family;
    let perr = |message: String| KernelError::Parse { family, message };
    let v: Value = serde_json::from_str(json).map_err(|e| perr(e.to_string()))?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| perr("no nftables array".into()))?;
    for item in items {
        let (obj, _is_set) = match (item.get("set"), item.get("map")) {
            (Some(s), _) => (s, true),
            (_, Some(m)) => (m, false),
            _ => continue,
        };
        let name = obj["name"].as_str().unwrap_or_default();
        let Some(dumped) = table.maps.get_mut(name) else {
            continue;
        };
        let key_types = type_list(&obj["type"]);
        let data_types = obj.get("map").map(type_list).unwrap_or_default();
        for elem in obj["elem"].as_array().into_iter().flatten() {
            let (k, d) = match elem.as_array() {
                Some(pair) if !dumped.is_set && pair.len() == 2 => (&pair[0], Some(&pair[1])),
                _ => (elem, None),
            };
            let key = Key(parse_atoms(k, &key_types).map_err(|m| perr(format!("{name}: {m}")))?);
            let data = match d {
                None => Data::None,
                Some(d) => parse_data(d, &data_types).map_err(|m| perr(format!("{name}: {m}")))?,
            };
            dumped.elements.insert(key, data);
        }
    }
    Ok(())
}

fn type_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split(" . ").map(str::to_owned).collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn parts(v: &Value) -> Vec<&Value> {
    match v.get("concat").and_then(Value::as_array) {
        Some(c) => c.iter().collect(),
        None => match v.get("elem") {
            Some(e) => parts(&e["val"]),
            None => vec![v],
        },
    }
}

fn parse_atoms(v: &Value, types: &[String]) -> Result<Vec<Atom>, String> {
    let ps = parts(v);
    if ps.len() != types.len() {
        return Err(format!(
            "element {v} does not match type {}",
            types.join(" . ")
        ));
    }
    ps.iter()
        .zip(types)
        .map(|(p, t)| parse_atom(p, t))
        .collect()
}

fn parse_atom(v: &Value, ty: &str) -> Result<Atom, String> {
    let bad = || format!("value {v} is not a valid {ty}");
    match ty {
        "ipv4_addr" | "ipv6_addr" => v
            .as_str()
            .and_then(|s| s.parse().ok())
            .map(Atom::Addr)
            .ok_or_else(bad),
        "inet_proto" => match v {
            Value::String(s) => Protocol::from_nft_name(s).map(Atom::Proto).ok_or_else(bad),
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .and_then(Protocol::from_number)
                .map(Atom::Proto)
                .ok_or_else(bad),
            _ => Err(bad()),
        },
        "inet_service" => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .map(Atom::Port)
            .ok_or_else(bad),
        _ => Err(format!("unsupported type {ty}")),
    }
}

fn parse_data(v: &Value, types: &[String]) -> Result<Data, String> {
    if types == ["verdict"] {
        let target = v["goto"]["target"]
            .as_str()
            .ok_or_else(|| format!("verdict {v} is not a goto"))?;
        return Ok(Data::Goto(target.to_owned()));
    }
    match parse_atoms(v, types)?.as_slice() {
        [Atom::Addr(a), Atom::Port(p)] => Ok(Data::AddrPort(*a, *p)),
        _ => Err(format!("unsupported map data {v}")),
    }
}
