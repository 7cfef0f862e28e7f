//! Side effects: applying plans with `nft -f` and dumping weir's table back.

use super::plan::{Op, Plan};
use super::table::{Atom, Data, DumpedChain, DumpedMap, DumpedTable, Family, Key, TABLE_NAME};
use crate::model::Protocol;
use crate::sys::libnftables::LibNft;
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
    #[error(
        "nft -f rejected the transaction of {ops} operations on table {family} {table}: {stderr}"
    )]
    Apply {
        /// Family of the table.
        family: Family,
        /// Name of the table.
        table: String,
        /// Operations in the plan.
        ops: usize,
        /// What nft printed (first lines).
        stderr: String,
    },
    /// Listing the table failed.
    #[error("nft list table {family} {table}: {message}")]
    List {
        /// Family of the table.
        family: Family,
        /// Name of the table.
        table: String,
        /// What went wrong.
        message: String,
    },
    /// Adding elements through nfnetlink failed; the batch that failed was not applied.
    #[error("adding elements to table {family} {table}: {source}")]
    Elements {
        /// Family of the table.
        family: Family,
        /// Name of the table.
        table: String,
        /// What failed.
        source: super::elements::ElementsError,
    },
    /// The listing could not be understood.
    #[error("parsing nft's listing of {family} {table}: {message}")]
    Parse {
        /// Family of the table.
        family: Family,
        /// Name of the table.
        table: String,
        /// What was not understood.
        message: String,
    },
}

/// Transactions with more element changes than this use the `nft` binary.
const LIB_MAX_ELEMENTS: usize = 5000;

/// The real nftables: transactions through libnftables in-process when it loads (else the
/// `nft` binary), listings through the `nft` binary. An instance works on one table name
/// per family: weir's [`TABLE_NAME`] unless [`KernelNft::for_table`] says otherwise.
#[derive(Clone, Debug)]
pub struct KernelNft {
    program: String,
    prefix: Vec<String>,
    lib: Option<std::sync::Arc<LibNft>>,
    table: String,
    /// The network namespace element loads enter (`None`: this process's).
    netns: Option<std::path::PathBuf>,
}

impl Default for KernelNft {
    fn default() -> Self {
        KernelNft {
            program: "nft".to_owned(),
            prefix: Vec::new(),
            lib: None,
            table: TABLE_NAME.to_owned(),
            netns: None,
        }
    }
}

impl KernelNft {
    /// nftables of this process's network namespace, applying through libnftables when it
    /// can be loaded (falls back to the `nft` binary, with a warning).
    pub fn with_library() -> Self {
        let lib = match LibNft::load() {
            Ok(l) => Some(std::sync::Arc::new(l)),
            Err(e) => {
                tracing::warn!(error = %e, "libnftables unavailable; applying through the nft binary");
                None
            }
        };
        KernelNft {
            lib,
            ..KernelNft::default()
        }
    }

    /// nftables of a named network namespace (runs `ip netns exec NAME nft`); for tests.
    pub fn in_netns(name: &str) -> Self {
        KernelNft {
            program: "ip".to_owned(),
            prefix: ["netns", "exec", name, "nft"].map(str::to_owned).to_vec(),
            lib: None,
            table: TABLE_NAME.to_owned(),
            netns: Some(std::path::Path::new("/run/netns").join(name)),
        }
    }

    /// The same nftables, listing and applying plans to the table named `name` instead.
    pub fn for_table(self, name: &str) -> Self {
        KernelNft {
            table: name.to_owned(),
            ..self
        }
    }

    /// The name of the table this instance works on.
    pub fn table_name(&self) -> &str {
        &self.table
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
        let script = plan.to_script_in(&self.table);
        // Large transactions (full syncs) go through the nft binary: its parse of a big
        // script is transient memory of a child process rather than a cache in ours.
        if let Some(lib) = self
            .lib
            .as_ref()
            .filter(|_| plan.element_changes() < LIB_MAX_ELEMENTS)
        {
            return lib.run(&script).map_err(|e| KernelError::Apply {
                family: plan.family,
                table: self.table.clone(),
                ops: plan.ops.len(),
                stderr: e.to_string(),
            });
        }
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
            table: self.table.clone(),
            ops: plan.ops.len(),
            stderr,
        })
    }

    /// Adds the elements of a plan of [`Op::AddElements`] on plain sets and maps through
    /// nfnetlink, without nft parsing them; large loads go in several transactions.
    pub fn add_elements(&self, plan: &Plan) -> Result<(), KernelError> {
        let maps = plan.ops.iter().filter_map(|op| match op {
            Op::AddElements { map, elements } => Some((map.as_str(), elements.as_slice())),
            _ => None,
        });
        if let Some(other) = plan
            .ops
            .iter()
            .find(|op| !matches!(op, Op::AddElements { .. }))
        {
            return Err(KernelError::Apply {
                family: plan.family,
                table: self.table.clone(),
                ops: plan.ops.len(),
                stderr: format!("not an element addition: {other:?}"),
            });
        }
        super::elements::add(self.netns.as_deref(), plan.family, &self.table, maps)
            .map(|_| ())
            .map_err(|source| KernelError::Elements {
                family: plan.family,
                table: self.table.clone(),
                source,
            })
    }

    /// Lists this instance's table (weir's by default): `None` when it does not exist.
    pub fn dump(&self, family: Family) -> Result<Option<DumpedTable>, KernelError> {
        let fam = family.as_str();
        let out = self
            .command()
            .args(["list", "table", fam, &self.table])
            .output()
            .map_err(|source| self.spawn_error(source))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(KernelError::List {
                family,
                table: self.table.clone(),
                message: stderr.trim().to_owned(),
            });
        }
        parse_listing_in(family, &self.table, &String::from_utf8_lossy(&out.stdout)).map(Some)
    }

    fn spawn_error(&self, source: std::io::Error) -> KernelError {
        KernelError::Spawn {
            program: self.program.clone(),
            source,
        }
    }
}

/// Parses `nft list table` output of weir's table: chains with their header and rules,
/// sets and maps with their declaration and elements (read with the declared types).
pub fn parse_listing(family: Family, text: &str) -> Result<DumpedTable, KernelError> {
    parse_listing_in(family, TABLE_NAME, text)
}

/// [`parse_listing`] of the table named `table` (the name only labels errors).
pub fn parse_listing_in(
    family: Family,
    table: &str,
    text: &str,
) -> Result<DumpedTable, KernelError> {
    enum Block {
        None,
        Chain(String, DumpedChain),
        Map(String, DumpedMap, Option<String>),
    }
    let perr = |message: String| KernelError::Parse {
        family,
        table: table.to_owned(),
        message,
    };
    let mut t = DumpedTable::empty(family);
    let mut block = Block::None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Inside a multi-line `elements = { ... }`.
        if let Block::Map(name, m, Some(buf)) = &mut block {
            buf.push(' ');
            buf.push_str(line);
            if line.ends_with('}') {
                let all = std::mem::take(buf);
                fill_map(m, &all).map_err(|e| perr(format!("map {name}: {e}")))?;
                block = match std::mem::replace(&mut block, Block::None) {
                    Block::Map(n, m, _) => Block::Map(n, m, None),
                    other => other,
                };
            }
            continue;
        }
        if line.starts_with("table ") {
            continue;
        }
        if line == "}" {
            match std::mem::replace(&mut block, Block::None) {
                Block::Chain(name, c) => drop(t.chains.insert(name, c)),
                Block::Map(name, m, _) => drop(t.maps.insert(name, m)),
                Block::None => {}
            }
            continue;
        }
        if let Some(rest) = line.strip_suffix(" {") {
            let mut words = rest.split_whitespace();
            let kind = words.next().unwrap_or_default();
            let name = words.next().unwrap_or_default().to_owned();
            let map = |is_set| DumpedMap {
                is_set,
                decl: String::new(),
                elements: BTreeMap::new(),
            };
            block = match kind {
                "chain" => Block::Chain(name, DumpedChain::default()),
                "set" => Block::Map(name, map(true), None),
                "map" => Block::Map(name, map(false), None),
                other => return Err(perr(format!("unexpected block {other:?}"))),
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
            Block::Map(name, m, pending) => {
                if let Some(rest) = line.strip_prefix("elements = ") {
                    if rest.ends_with('}') {
                        fill_map(m, rest).map_err(|e| perr(format!("map {name}: {e}")))?;
                    } else {
                        *pending = Some(rest.to_owned());
                    }
                } else if m.decl.is_empty() {
                    m.decl = line.to_owned();
                } else {
                    m.decl = format!("{}; {line}", m.decl);
                }
            }
            Block::None => return Err(perr(format!("line outside any block: {line:?}"))),
        }
    }
    Ok(t)
}

/// Reads `{ k . k : d . d, ... }` with the types of the map's `type ...` declaration.
fn fill_map(m: &mut DumpedMap, text: &str) -> Result<(), String> {
    if m.decl.contains("flags dynamic") {
        // Filled by the packet path (session affinity); not weir's to plan.
        return Ok(());
    }
    let decl = m.decl.split(';').next().unwrap_or_default();
    let types = decl
        .strip_prefix("type ")
        .ok_or_else(|| format!("declaration {decl:?} is not `type ...`"))?;
    let (key_types, data_types) = match types.split_once(" : ") {
        Some((k, d)) => (k, Some(d)),
        None => (types, None),
    };
    let key_types: Vec<&str> = key_types.split(" . ").collect();
    let data_types: Option<Vec<&str>> = data_types.map(|d| d.split(" . ").collect());
    let inner = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("elements {text:?} are not in braces"))?;
    for el in inner.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (k, d) = match el.split_once(" : ") {
            Some((k, d)) => (k, Some(d)),
            None => (el, None),
        };
        let key = Key(parse_atoms(k, &key_types)?);
        let data = match (d, &data_types) {
            (None, _) => Data::None,
            (Some(d), Some(t)) if t.as_slice() == ["verdict"] => match d.strip_prefix("goto ") {
                Some(c) => Data::Goto(c.to_owned()),
                None => return Err(format!("verdict {d:?} is not a goto")),
            },
            (Some(d), Some(t)) => match parse_atoms(d, t)?.as_slice() {
                [Atom::Addr(a), Atom::Port(p)] => Data::AddrPort(*a, *p),
                _ => return Err(format!("unsupported data {d:?}")),
            },
            (Some(d), None) => return Err(format!("data {d:?} in a set")),
        };
        m.elements.insert(key, data);
    }
    Ok(())
}

fn parse_atoms(text: &str, types: &[&str]) -> Result<Vec<Atom>, String> {
    let parts: Vec<&str> = text.split(" . ").map(str::trim).collect();
    if parts.len() != types.len() {
        return Err(format!(
            "element {text:?} does not match type {}",
            types.join(" . ")
        ));
    }
    parts
        .iter()
        .zip(types)
        .map(|(p, t)| {
            let bad = || format!("{p:?} is not a valid {t}");
            match *t {
                "ipv4_addr" | "ipv6_addr" if p.contains('/') => p
                    .parse::<ipnetwork::IpNetwork>()
                    .map(Atom::prefix)
                    .map_err(|_| bad()),
                "ipv4_addr" | "ipv6_addr" => p.parse().map(Atom::Addr).map_err(|_| bad()),
                "inet_proto" => Protocol::from_nft_name(p)
                    .or_else(|| p.parse().ok().and_then(Protocol::from_number))
                    .map(Atom::Proto)
                    .ok_or_else(bad),
                "inet_service" => match p.split_once('-') {
                    Some((a, b)) => match (a.parse(), b.parse()) {
                        (Ok(a), Ok(b)) if a <= b => Ok(Atom::port_range(a, b)),
                        _ => Err(bad()),
                    },
                    None => p.parse().map(Atom::Port).map_err(|_| bad()),
                },
                other => Err(format!("unsupported type {other}")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_with_multiline_elements_is_read_with_declared_types() {
        let text = "table ip weir {\n\tmap b {\n\t\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n\t\telements = { 10.96.0.7 . sctp . 9000 : 10.244.9.9 . 9000,\n\t\t\t     10.96.0.6 . udp . 53 : 10.244.9.9 . 53 }\n\t}\n\n\tmap v {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements = { 10.96.0.5 . tcp . 80 : goto c }\n\t}\n\n\tset e {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t}\n\n\tchain c {\n\t\ttype filter hook forward priority filter - 1; policy accept;\n\t\tjump d\n\t}\n}\n";
        let t = parse_listing(Family::Ip, text).unwrap();
        assert_eq!(t.maps["b"].elements.len(), 2);
        assert!(t.maps["e"].is_set && t.maps["e"].elements.is_empty());
        assert_eq!(
            t.maps["v"].elements.values().next(),
            Some(&Data::Goto("c".into()))
        );
        let c = &t.chains["c"];
        assert_eq!(
            c.header.as_deref(),
            Some("type filter hook forward priority filter - 1; policy accept;")
        );
        assert_eq!(c.rules, ["jump d"]);
    }

    #[test]
    fn interval_sets_read_prefixes_port_ranges_and_single_ports() {
        let text = "table ip weir_policy {\n\tset p {\n\t\ttype inet_proto . inet_service\n\t\tflags interval\n\t\telements = { tcp . 80-81,\n\t\t\t     tcp . 83,\n\t\t\t     udp . 0-65535 }\n\t}\n\n\tset c {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.0.0.0/24, 10.9.9.9 }\n\t}\n}\n";
        let t = parse_listing_in(Family::Ip, "weir_policy", text).unwrap();
        let keys: Vec<String> = t.maps["p"].elements.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["tcp . 83", "tcp . 80-81", "udp . 0-65535"]);
        assert_eq!(
            t.maps["p"].decl,
            "type inet_proto . inet_service; flags interval"
        );
        let keys: Vec<String> = t.maps["c"].elements.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["10.9.9.9", "10.0.0.0/24"]);
        let e = parse_listing_in(Family::Ip, "weir_policy", &text.replace("80-81", "81-80"))
            .unwrap_err();
        assert!(e.to_string().contains("ip weir_policy"), "{e}");
    }

    #[test]
    fn malformed_elements_are_reported() {
        let text = "table ip weir {\n\tset s {\n\t\ttype ipv4_addr . inet_service\n\t\telements = { 10.0.0.1 }\n\t}\n}\n";
        let e = parse_listing(Family::Ip, text).unwrap_err();
        assert!(e.to_string().contains("map s"), "{e}");
    }
}
