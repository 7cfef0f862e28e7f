//! Kernel nouns of the nftables backend: tables, chains, rules, maps and their elements.
//!
//! The desired [`Table`] holds typed rules (so the fake and the packet tracer can run
//! them); both the fake and the real kernel dump into a [`DumpedTable`], whose rules and
//! map declarations are nft's canonical text, so the two can be compared directly.

use crate::model::Protocol;
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Name of the one table weir owns in each family.
pub const TABLE_NAME: &str = "weir";

/// nftables address family of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// `ip` (IPv4).
    Ip,
    /// `ip6` (IPv6).
    Ip6,
}

impl Family {
    /// nft's keyword for the family.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }

    /// nft's name of the address type (`ipv4_addr` / `ipv6_addr`).
    pub fn addr_type(self) -> &'static str {
        match self {
            Family::Ip => "ipv4_addr",
            Family::Ip6 => "ipv6_addr",
        }
    }

    /// Whether an address belongs to this family.
    pub fn contains(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::Ip, IpAddr::V4(_)) | (Family::Ip6, IpAddr::V6(_))
        )
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Netfilter hooks a base chain can attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Before routing, for every incoming packet.
    Prerouting,
    /// Packets for a local address.
    Input,
    /// Routed packets.
    Forward,
    /// Locally generated packets.
    Output,
    /// Every outgoing packet, after routing.
    Postrouting,
}

impl Hook {
    fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// Base-chain types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainType {
    /// `type nat`: consulted for the first packet of a connection only.
    Nat,
    /// `type filter`.
    Filter,
}

/// Where a base chain attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BaseChain {
    /// Chain type.
    pub kind: ChainType,
    /// Hook.
    pub hook: Hook,
    /// Priority: `dstnat` is -100, `filter` 0, `srcnat` 100.
    pub priority: i32,
}

impl fmt::Display for BaseChain {
    /// nft's canonical header line, e.g. `type nat hook prerouting priority dstnat; policy accept;`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ChainType::Nat => "nat",
            ChainType::Filter => "filter",
        };
        // nft names priorities only where the name is defined for the hook: `dstnat` in
        // prerouting, `srcnat` in postrouting, `filter` everywhere; others print as numbers.
        let (base_name, base) = match (self.kind, self.hook) {
            (ChainType::Nat, Hook::Prerouting) => ("dstnat", -100),
            (ChainType::Nat, Hook::Postrouting) => ("srcnat", 100),
            (ChainType::Nat, _) => ("", 0),
            (ChainType::Filter, _) => ("filter", 0),
        };
        let prio = match self.priority - base {
            d if base_name.is_empty() => d.to_string(),
            0 => base_name.to_owned(),
            d if d > 0 => format!("{base_name} + {d}"),
            d => format!("{base_name} - {}", -d),
        };
        write!(
            f,
            "type {kind} hook {} priority {prio}; policy accept;",
            self.hook.as_str()
        )
    }
}

/// One part of a lookup key read from the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyExpr {
    /// Source address (`ip saddr` / `ip6 saddr`).
    SAddr,
    /// Destination address.
    DAddr,
    /// `meta l4proto`.
    L4Proto,
    /// Transport destination port (`th dport`).
    DPort,
}

impl KeyExpr {
    fn fmt_in(&self, family: Family, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyExpr::SAddr => write!(f, "{family} saddr"),
            KeyExpr::DAddr => write!(f, "{family} daddr"),
            KeyExpr::L4Proto => f.write_str("meta l4proto"),
            KeyExpr::DPort => f.write_str("th dport"),
        }
    }
}

/// A concatenated key expression rendered in one family.
struct KeyDisplay<'a>(Family, &'a [KeyExpr]);

impl fmt::Display for KeyDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in self.1.iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            k.fmt_in(self.0, f)?;
        }
        Ok(())
    }
}

/// A condition a rule checks before its statements run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Match {
    /// `ct state new`.
    CtStateNew,
    /// `ct state established,related`: a later packet of a known connection (never the
    /// first packet, which is all the tracer follows).
    CtStateEstablishedRelated,
    /// `ct status dnat`: the connection was destination-NATed.
    CtStatusDnat,
    /// `fib daddr type local`: the destination is an address of this host.
    FibDaddrLocal,
    /// `fib saddr type local`: the source is an address of this host.
    FibSaddrLocal,
    /// `ip saddr != CIDR`.
    SAddrNotIn(IpNetwork),
    /// `ip saddr CIDR`.
    SAddrIn(IpNetwork),
    /// `ip daddr CIDR`.
    DAddrIn(IpNetwork),
    /// `meta mark & BIT == BIT`.
    MarkHas(u32),
    /// `KEY @set`: the key is an element of the named set.
    InSet {
        /// Key read from the packet.
        key: Vec<KeyExpr>,
        /// Set name.
        set: String,
    },
    /// `KEY != @set`: the key is not an element of the named set.
    NotInSet {
        /// Key read from the packet.
        key: Vec<KeyExpr>,
        /// Set name.
        set: String,
    },
}

/// What a rule does once its matches hold.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stmt {
    /// `meta mark set meta mark | BIT`.
    MarkOr(u32),
    /// `meta mark set meta mark ^ BIT` (clears a bit known to be set).
    MarkXor(u32),
    /// `masquerade fully-random`.
    Masquerade,
    /// `reject` (ICMP port unreachable).
    Reject,
    /// `drop`.
    Drop,
    /// `accept`: ends this hook's base chain (later base chains of the hook still run).
    Accept,
    /// `jump CHAIN`.
    Jump(String),
    /// `goto CHAIN`.
    Goto(String),
    /// `KEY vmap @map`: jump or goto by lookup; a miss continues with the next rule.
    Vmap {
        /// Key read from the packet.
        key: Vec<KeyExpr>,
        /// Verdict map name.
        map: String,
    },
    /// `numgen random mod N vmap { 0 : goto C0, 1 : goto C1, ... }`: go to one of the
    /// chains, chosen uniformly at random (`chains.len()` is N).
    NumgenVmap {
        /// Chains by slot.
        chains: Vec<String>,
    },
    /// `update @set { KEY timeout Ns }`: add the key to a dynamic set, or refresh its
    /// timeout.
    Update {
        /// Key read from the packet.
        key: Vec<KeyExpr>,
        /// Set name (declared with [`MapFlags::DynamicTimeout`]).
        set: String,
        /// Seconds the element lives after its last update.
        timeout: u32,
    },
    /// `dnat ip to KEY map @map`: destination NAT to the looked-up address and port;
    /// a miss continues with the next rule.
    Dnat {
        /// Key read from the packet.
        key: Vec<KeyExpr>,
        /// Map from key to `address . port`.
        map: String,
    },
}

/// One rule: all matches, then the statements in order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Conditions, all of which must hold.
    pub matches: Vec<Match>,
    /// Statements run when they do.
    pub stmts: Vec<Stmt>,
}

impl Rule {
    /// A rule with matches and statements.
    pub fn new(matches: Vec<Match>, stmts: Vec<Stmt>) -> Self {
        Rule { matches, stmts }
    }

    /// nft's canonical text of the rule in a family (what `nft list` prints back).
    pub fn to_nft(&self, family: Family) -> String {
        RuleDisplay(family, self).to_string()
    }

    /// Names of the sets and maps the rule reads.
    pub fn referenced_maps(&self) -> impl Iterator<Item = &str> {
        let m = self.matches.iter().filter_map(|m| match m {
            Match::InSet { set, .. } | Match::NotInSet { set, .. } => Some(set.as_str()),
            _ => None,
        });
        let s = self.stmts.iter().filter_map(|s| match s {
            Stmt::Vmap { map, .. } | Stmt::Dnat { map, .. } | Stmt::Update { set: map, .. } => {
                Some(map.as_str())
            }
            _ => None,
        });
        m.chain(s)
    }

    /// Names of the chains the rule jumps or goes to.
    pub fn referenced_chains(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().flat_map(|s| match s {
            Stmt::Jump(c) | Stmt::Goto(c) => std::slice::from_ref(c).iter().map(String::as_str),
            Stmt::NumgenVmap { chains } => chains.iter().map(String::as_str),
            _ => [].iter().map(String::as_str),
        })
    }
}

struct RuleDisplay<'a>(Family, &'a Rule);

impl fmt::Display for RuleDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fam = self.0;
        let mut parts: Vec<String> = Vec::new();
        for m in &self.1.matches {
            parts.push(match m {
                Match::CtStateNew => "ct state new".to_owned(),
                Match::CtStateEstablishedRelated => "ct state established,related".to_owned(),
                Match::CtStatusDnat => "ct status dnat".to_owned(),
                Match::FibDaddrLocal => "fib daddr type local".to_owned(),
                Match::FibSaddrLocal => "fib saddr type local".to_owned(),
                Match::SAddrNotIn(net) => format!("{fam} saddr != {net}"),
                Match::SAddrIn(net) => format!("{fam} saddr {net}"),
                Match::DAddrIn(net) => format!("{fam} daddr {net}"),
                Match::MarkHas(bit) => format!("meta mark & {bit:#010x} == {bit:#010x}"),
                Match::InSet { key, set } => format!("{} @{set}", KeyDisplay(fam, key)),
                Match::NotInSet { key, set } => format!("{} != @{set}", KeyDisplay(fam, key)),
            });
        }
        for s in &self.1.stmts {
            parts.push(match s {
                Stmt::MarkOr(bit) => format!("meta mark set meta mark | {bit:#010x}"),
                Stmt::MarkXor(bit) => format!("meta mark set meta mark ^ {bit:#010x}"),
                Stmt::Masquerade => "masquerade fully-random".to_owned(),
                Stmt::Reject => "reject".to_owned(),
                Stmt::Drop => "drop".to_owned(),
                Stmt::Accept => "accept".to_owned(),
                Stmt::Jump(c) => format!("jump {c}"),
                Stmt::Goto(c) => format!("goto {c}"),
                Stmt::Vmap { key, map } => format!("{} vmap @{map}", KeyDisplay(fam, key)),
                Stmt::NumgenVmap { chains } => {
                    let arms: Vec<String> = chains
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!("{i} : goto {c}"))
                        .collect();
                    format!(
                        "numgen random mod {} vmap {{ {} }}",
                        chains.len(),
                        arms.join(", ")
                    )
                }
                Stmt::Dnat { key, map } => {
                    format!("dnat {fam} to {} map @{map}", KeyDisplay(fam, key))
                }
                Stmt::Update { key, set, timeout } => format!(
                    "update @{set} {{ {} timeout {} }}",
                    KeyDisplay(fam, key),
                    nft_duration(*timeout)
                ),
            });
        }
        f.write_str(&parts.join(" "))
    }
}

/// A duration as nft prints it: `3h`, `1m40s`, `1d2h`.
pub fn nft_duration(secs: u32) -> String {
    let mut out = String::new();
    let mut rest = secs;
    for (unit, len) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if rest >= len {
            out.push_str(&format!("{}{unit}", rest / len));
            rest %= len;
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// A chain: optionally attached to a hook, with its rules in order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Chain {
    /// Hook attachment for base chains; `None` for regular chains.
    pub base: Option<BaseChain>,
    /// Rules in evaluation order.
    pub rules: Vec<Rule>,
}

/// The type of one field of a map key or of map data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldType {
    /// An address of the table's family.
    Addr,
    /// An IP protocol (`inet_proto`).
    Proto,
    /// A port (`inet_service`).
    Port,
}

/// What a map maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataType {
    /// A set: no data.
    None,
    /// A verdict (`goto CHAIN`).
    Verdict,
    /// `address . port` for DNAT.
    AddrPort,
}

/// Flags of a named set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapFlags {
    /// Plain elements.
    #[default]
    None,
    /// `flags interval`: address fields of elements may be prefixes and port fields
    /// ranges; elements must not overlap (nft: conflicting intervals).
    Interval,
    /// `size N; flags dynamic,timeout`: filled from the packet path with per-element
    /// timeouts; its elements are the kernel's, never planned.
    DynamicTimeout,
}

/// Size of dynamic sets (session affinity entries).
pub const DYNAMIC_SET_SIZE: u32 = 262_144;

/// Declaration of a named set or map.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MapDecl {
    /// Key fields, concatenated.
    pub key: Vec<FieldType>,
    /// Data type.
    pub data: DataType,
    /// Flags.
    pub flags: MapFlags,
}

impl MapDecl {
    /// Whether this is a set (no data) rather than a map.
    pub fn is_set(&self) -> bool {
        self.data == DataType::None
    }

    /// The declaration line nft prints back (`type ...`).
    ///
    /// Plain `type` declarations only: nft 1.0.6 cannot reload a map whose `typeof` data
    /// mixes network and transport fields, and a `typeof` transport field in the data makes
    /// nft add a protocol dependency to rules that use the map.
    pub fn to_nft(&self, family: Family) -> String {
        let key: Vec<&str> = self
            .key
            .iter()
            .map(|t| match t {
                FieldType::Addr => family.addr_type(),
                FieldType::Proto => "inet_proto",
                FieldType::Port => "inet_service",
            })
            .collect();
        let data = match self.data {
            DataType::None => String::new(),
            DataType::Verdict => " : verdict".to_owned(),
            DataType::AddrPort => format!(" : {} . inet_service", family.addr_type()),
        };
        let flags = match self.flags {
            MapFlags::None => String::new(),
            MapFlags::Interval => "; flags interval".to_owned(),
            MapFlags::DynamicTimeout => {
                format!("; size {DYNAMIC_SET_SIZE}; flags dynamic,timeout")
            }
        };
        format!("type {}{data}{flags}", key.join(" . "))
    }
}

/// One field value of an element key or of element data.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Atom {
    /// An address.
    Addr(IpAddr),
    /// A protocol.
    Proto(Protocol),
    /// A port.
    Port(u16),
    /// An address prefix (in `flags interval` sets; a full-length prefix is an
    /// [`Atom::Addr`], as nft prints it).
    Net(IpNetwork),
    /// A port range `first-last` (in `flags interval` sets; nft prints a one-port range
    /// as a bare port, so build it with [`Atom::port_range`]).
    PortRange(u16, u16),
}

impl Atom {
    /// An address prefix as nft keeps it: a bare address when it covers one address.
    pub fn prefix(net: IpNetwork) -> Atom {
        let max = if net.is_ipv4() { 32 } else { 128 };
        if net.prefix() == max {
            Atom::Addr(net.ip())
        } else {
            Atom::Net(net)
        }
    }

    /// A port range as nft keeps it: a bare port when it covers one port.
    pub fn port_range(first: u16, last: u16) -> Atom {
        if first == last {
            Atom::Port(first)
        } else {
            Atom::PortRange(first, last)
        }
    }

    /// The field type this value has.
    pub fn field_type(&self) -> FieldType {
        match self {
            Atom::Addr(_) | Atom::Net(_) => FieldType::Addr,
            Atom::Proto(_) => FieldType::Proto,
            Atom::Port(_) | Atom::PortRange(..) => FieldType::Port,
        }
    }

    /// Whether the value covers more than one point (only allowed in interval sets).
    pub fn is_interval(&self) -> bool {
        matches!(self, Atom::Net(_) | Atom::PortRange(..))
    }

    /// Whether a packet's value (an [`Atom::Addr`], [`Atom::Port`] or [`Atom::Proto`]) is
    /// covered by this element value.
    pub fn covers(&self, value: &Atom) -> bool {
        match (self, value) {
            (Atom::Net(n), Atom::Addr(a)) => n.contains(*a),
            (Atom::PortRange(a, b), Atom::Port(p)) => (*a..=*b).contains(p),
            (e, v) => e == v,
        }
    }

    /// Whether two element values of the same field share a point.
    pub fn overlaps(&self, other: &Atom) -> bool {
        fn span(a: &Atom) -> Option<(u128, u128)> {
            let addr = |ip: &IpAddr| match ip {
                IpAddr::V4(v) => u128::from(u32::from(*v)),
                IpAddr::V6(v) => u128::from(*v),
            };
            Some(match a {
                Atom::Addr(ip) => (addr(ip), addr(ip)),
                Atom::Net(n) => {
                    let bits: u32 = if n.is_ipv4() { 32 } else { 128 };
                    let host = bits - u32::from(n.prefix());
                    let lo = addr(&n.network());
                    let size = if host >= 128 {
                        u128::MAX
                    } else {
                        (1u128 << host) - 1
                    };
                    (lo, lo.saturating_add(size))
                }
                Atom::Port(p) => (u128::from(*p), u128::from(*p)),
                Atom::PortRange(a, b) => (u128::from(*a), u128::from(*b)),
                Atom::Proto(_) => return None,
            })
        }
        match (span(self), span(other)) {
            (Some((a0, a1)), Some((b0, b1))) => {
                self.is_v6() == other.is_v6() && a0 <= b1 && b0 <= a1
            }
            _ => self == other,
        }
    }

    fn is_v6(&self) -> bool {
        matches!(self, Atom::Addr(IpAddr::V6(_))) || matches!(self, Atom::Net(n) if n.is_ipv6())
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Addr(a) => write!(f, "{a}"),
            Atom::Proto(p) => f.write_str(p.nft_name()),
            Atom::Port(p) => write!(f, "{p}"),
            Atom::Net(n) => write!(f, "{}/{}", n.network(), n.prefix()),
            Atom::PortRange(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// A (possibly concatenated) element key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub Vec<Atom>);

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// The data an element maps to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Data {
    /// Set element: no data.
    None,
    /// `goto CHAIN`.
    Goto(String),
    /// `address . port`.
    AddrPort(IpAddr, u16),
}

impl Data {
    /// The data type this value has.
    pub fn data_type(&self) -> DataType {
        match self {
            Data::None => DataType::None,
            Data::Goto(_) => DataType::Verdict,
            Data::AddrPort(..) => DataType::AddrPort,
        }
    }
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Data::None => Ok(()),
            Data::Goto(c) => write!(f, "goto {c}"),
            Data::AddrPort(a, p) => write!(f, "{a} . {p}"),
        }
    }
}

/// A named set or map with its elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Map {
    /// Declaration.
    pub decl: MapDecl,
    /// Elements, key to data.
    pub elements: BTreeMap<Key, Data>,
}

/// Everything weir wants in one family's `weir` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The family.
    pub family: Family,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
    /// Sets and maps by name.
    pub maps: BTreeMap<String, Map>,
}

impl Table {
    /// An empty table.
    pub fn new(family: Family) -> Self {
        Table {
            family,
            chains: BTreeMap::new(),
            maps: BTreeMap::new(),
        }
    }

    /// Number of nftables objects: chains, rules, sets/maps and elements.
    pub fn object_count(&self) -> usize {
        self.chains
            .values()
            .map(|c| 1 + c.rules.len())
            .sum::<usize>()
            + self
                .maps
                .values()
                .map(|m| 1 + m.elements.len())
                .sum::<usize>()
    }

    /// The table as the kernel would list it.
    pub fn to_dump(&self) -> DumpedTable {
        DumpedTable {
            family: self.family,
            chains: self
                .chains
                .iter()
                .map(|(name, c)| {
                    let dumped = DumpedChain {
                        header: c.base.map(|b| b.to_string()),
                        rules: c.rules.iter().map(|r| r.to_nft(self.family)).collect(),
                    };
                    (name.clone(), dumped)
                })
                .collect(),
            maps: self
                .maps
                .iter()
                .map(|(name, m)| {
                    let dumped = DumpedMap {
                        is_set: m.decl.is_set(),
                        decl: m.decl.to_nft(self.family),
                        elements: m.elements.clone(),
                    };
                    (name.clone(), dumped)
                })
                .collect(),
        }
    }
}

/// A chain as listed: its header line (base chains) and rules in nft's canonical text.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DumpedChain {
    /// `type ... hook ... priority ...; policy accept;` for base chains.
    pub header: Option<String>,
    /// Rules as nft prints them.
    pub rules: Vec<String>,
}

/// A set or map as listed: its declaration line and typed elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedMap {
    /// Whether it is a set (`set NAME`) rather than a map (`map NAME`).
    pub is_set: bool,
    /// The declaration line (`type ...`).
    pub decl: String,
    /// Elements.
    pub elements: BTreeMap<Key, Data>,
}

/// A table as listed by the kernel (or by the fake): what is realized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedTable {
    /// The family.
    pub family: Family,
    /// Chains by name.
    pub chains: BTreeMap<String, DumpedChain>,
    /// Sets and maps by name.
    pub maps: BTreeMap<String, DumpedMap>,
}

impl DumpedTable {
    /// An empty table (what exists before weir ever ran: nothing).
    pub fn empty(family: Family) -> Self {
        DumpedTable {
            family,
            chains: BTreeMap::new(),
            maps: BTreeMap::new(),
        }
    }

    /// A stable text rendering (for golden files and readable diffs) of weir's table.
    pub fn to_text(&self) -> String {
        self.to_text_named(TABLE_NAME)
    }

    /// [`DumpedTable::to_text`] with another table name in the header.
    pub fn to_text_named(&self, name: &str) -> String {
        let mut out = format!("table {} {name} {{\n", self.family);
        for (name, m) in &self.maps {
            let kind = if m.is_set { "set" } else { "map" };
            out.push_str(&format!("\t{kind} {name} {{\n\t\t{}\n", m.decl));
            for (k, d) in &m.elements {
                if m.is_set {
                    out.push_str(&format!("\t\t\t{k}\n"));
                } else {
                    out.push_str(&format!("\t\t\t{k} : {d}\n"));
                }
            }
            out.push_str("\t}\n");
        }
        for (name, c) in &self.chains {
            out.push_str(&format!("\tchain {name} {{\n"));
            if let Some(h) = &c.header {
                out.push_str(&format!("\t\t{h}\n"));
            }
            for r in &c.rules {
                out.push_str(&format!("\t\t{r}\n"));
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }
}
