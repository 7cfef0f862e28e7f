//! A packet tracer over a typed [`Table`] (what the fake holds): given the first packet of a
//! connection, every way it can end (random choices are enumerated, so the answer is a set).
//! Unit tests state traffic expectations with it the way upstream's packet-flow tests do.

use super::table::{Atom, ChainType, Data, Hook, Key, KeyExpr, MapFlags, Match, Rule, Stmt, Table};
use crate::model::Protocol;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Where a packet comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Arrives on an interface (from a pod or from outside).
    Forwarded,
    /// Sent by a process on this host.
    Local,
}

/// The first packet of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub dport: u16,
    /// Where it comes from.
    pub origin: Origin,
}

/// The host the table runs on.
#[derive(Clone, Debug, Default)]
pub struct Host {
    /// Addresses of this host (`fib daddr type local`; routing to input vs. forward).
    pub local_addrs: Vec<IpAddr>,
}

/// The final verdict on a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Delivered or forwarded.
    Accept,
    /// Dropped silently.
    Drop,
    /// Rejected (ICMP port unreachable).
    Reject,
}

/// One possible end of a packet's path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Outcome {
    /// Verdict.
    pub verdict: Verdict,
    /// Where DNAT sent it, if anywhere.
    pub dnat: Option<(IpAddr, u16)>,
    /// Whether it is masqueraded.
    pub masquerade: bool,
    /// Elements the packet added to dynamic sets (`update @set`), with their timeouts:
    /// apply them with [`apply_updates`] to trace a later packet of the same client.
    pub updates: Vec<(String, Key, u32)>,
}

/// Adds what a traced packet put into dynamic sets to the table (as the kernel would).
pub fn apply_updates(table: &mut Table, outcome: &Outcome) {
    for (set, key, _) in &outcome.updates {
        if let Some(m) = table.maps.get_mut(set) {
            m.elements.insert(key.clone(), Data::None);
        }
    }
}

/// The table cannot be traced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// A jump or goto leads to a chain that does not exist.
    #[error("chain {0} does not exist")]
    MissingChain(String),
    /// Jumps nest too deep (a loop).
    #[error("jumps nest deeper than {0} (a loop?)")]
    TooDeep(usize),
}

const MAX_DEPTH: usize = 64;

#[derive(Clone, Debug)]
struct State {
    dst: IpAddr,
    dport: u16,
    mark: u32,
    dnat: Option<(IpAddr, u16)>,
    masquerade: bool,
    updates: Vec<(String, Key, u32)>,
}

/// How evaluating a chain ended.
#[derive(Clone, Debug)]
enum Flow {
    /// Fell off the end (or `return`): continue in the caller.
    Continue(State),
    /// A terminal verdict for this hook's base chain (accept) or for the packet.
    Done(State, Verdict),
    /// A goto's target ended: the base chain ends with its policy.
    EndBase(State),
}

/// Traces `packet` through `table` on `host`.
pub fn trace(table: &Table, host: &Host, packet: &Packet) -> Result<BTreeSet<Outcome>, TraceError> {
    trace_tables(&[table], host, packet)
}

/// Traces `packet` through several tables of one family on `host` (e.g. weir's NAT table
/// and the NetworkPolicy filter table): at each hook, the base chains of every table run in
/// priority order (ties: in the order of `tables`, then by chain name). An `accept` ends
/// only its own base chain; a drop or reject ends the packet.
pub fn trace_tables(
    tables: &[&Table],
    host: &Host,
    packet: &Packet,
) -> Result<BTreeSet<Outcome>, TraceError> {
    let start = State {
        dst: packet.dst,
        dport: packet.dport,
        mark: 0,
        dnat: None,
        masquerade: false,
        updates: Vec::new(),
    };
    let first = match packet.origin {
        Origin::Forwarded => Hook::Prerouting,
        Origin::Local => Hook::Output,
    };
    let mut out = BTreeSet::new();
    for st in run_hook(tables, host, packet, first, start)? {
        let (st, v) = st;
        if v != Verdict::Accept {
            out.insert(outcome(&st, v));
            continue;
        }
        let second = match packet.origin {
            Origin::Local => vec![Hook::Postrouting],
            Origin::Forwarded if host.local_addrs.contains(&st.dst) => vec![Hook::Input],
            Origin::Forwarded => vec![Hook::Forward, Hook::Postrouting],
        };
        let mut states = vec![(st, Verdict::Accept)];
        for hook in second {
            let mut next = Vec::new();
            for (st, v) in states {
                if v != Verdict::Accept {
                    next.push((st, v));
                    continue;
                }
                next.extend(run_hook(tables, host, packet, hook, st)?);
            }
            states = next;
        }
        for (st, v) in states {
            out.insert(outcome(&st, v));
        }
    }
    Ok(out)
}

fn outcome(st: &State, verdict: Verdict) -> Outcome {
    Outcome {
        verdict,
        dnat: st.dnat,
        masquerade: st.masquerade,
        updates: st.updates.clone(),
    }
}

/// Runs every base chain of a hook, over all tables, in priority order.
fn run_hook(
    tables: &[&Table],
    host: &Host,
    p: &Packet,
    hook: Hook,
    st: State,
) -> Result<Vec<(State, Verdict)>, TraceError> {
    let mut bases: Vec<(i32, usize, &String, ChainType)> = tables
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| {
            t.chains.iter().filter_map(move |(n, c)| {
                c.base
                    .filter(|b| b.hook == hook)
                    .map(|b| (b.priority, ti, n, b.kind))
            })
        })
        .collect();
    bases.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let mut states = vec![(st, Verdict::Accept)];
    for (_, ti, name, kind) in bases {
        let table = tables[ti];
        let mut next = Vec::new();
        for (st, v) in states {
            // nat chains see only packets not yet NATed in this direction.
            if v != Verdict::Accept
                || (kind == ChainType::Nat && st.dnat.is_some() && hook != Hook::Postrouting)
            {
                next.push((st, v));
                continue;
            }
            for flow in run_chain(table, host, p, name, st, 0)? {
                next.push(match flow {
                    Flow::Continue(s) | Flow::EndBase(s) => (s, Verdict::Accept),
                    Flow::Done(s, v) => (s, v),
                });
            }
        }
        states = next;
    }
    Ok(states)
}

fn run_chain(
    table: &Table,
    host: &Host,
    p: &Packet,
    chain: &str,
    st: State,
    depth: usize,
) -> Result<Vec<Flow>, TraceError> {
    if depth > MAX_DEPTH {
        return Err(TraceError::TooDeep(MAX_DEPTH));
    }
    let c = table
        .chains
        .get(chain)
        .ok_or_else(|| TraceError::MissingChain(chain.to_owned()))?;
    run_rules(table, host, p, &c.rules, st, depth)
}

fn run_rules(
    table: &Table,
    host: &Host,
    p: &Packet,
    rules: &[Rule],
    st: State,
    depth: usize,
) -> Result<Vec<Flow>, TraceError> {
    let Some((rule, rest)) = rules.split_first() else {
        return Ok(vec![Flow::Continue(st)]);
    };
    if !rule.matches.iter().all(|m| matches(table, host, p, &st, m)) {
        return run_rules(table, host, p, rest, st, depth);
    }
    let mut out = Vec::new();
    for flow in run_stmts(table, host, p, &rule.stmts, st, depth)? {
        match flow {
            Flow::Continue(s) => out.extend(run_rules(table, host, p, rest, s, depth)?),
            other => out.push(other),
        }
    }
    Ok(out)
}

fn key_of(p: &Packet, st: &State, key: &[KeyExpr]) -> Key {
    Key(key
        .iter()
        .map(|k| match k {
            KeyExpr::SAddr => Atom::Addr(p.src),
            KeyExpr::DAddr => Atom::Addr(st.dst),
            KeyExpr::L4Proto => Atom::Proto(p.protocol),
            KeyExpr::DPort => Atom::Port(st.dport),
        })
        .collect())
}

fn lookup<'t>(table: &'t Table, map: &str, key: &Key) -> Option<&'t Data> {
    let m = table.maps.get(map)?;
    if m.decl.flags != MapFlags::Interval {
        return m.elements.get(key);
    }
    let covers =
        |el: &Key| el.0.len() == key.0.len() && el.0.iter().zip(&key.0).all(|(e, k)| e.covers(k));
    m.elements.iter().find(|(el, _)| covers(el)).map(|(_, d)| d)
}

fn matches(table: &Table, host: &Host, p: &Packet, st: &State, m: &Match) -> bool {
    match m {
        Match::CtStateNew => true,
        Match::CtStateEstablishedRelated => false,
        Match::CtStatusDnat => st.dnat.is_some(),
        Match::FibDaddrLocal => host.local_addrs.contains(&st.dst),
        Match::FibSaddrLocal => host.local_addrs.contains(&p.src),
        Match::SAddrNotIn(net) => !net.contains(p.src),
        Match::SAddrIn(net) => net.contains(p.src),
        Match::NotInSet { key, set } => lookup(table, set, &key_of(p, st, key)).is_none(),
        Match::DAddrIn(net) => net.contains(st.dst),
        Match::MarkHas(bit) => st.mark & bit == *bit,
        Match::InSet { key, set } => lookup(table, set, &key_of(p, st, key)).is_some(),
    }
}

/// Runs statements; a lookup miss stops the rule (continue with the next rule).
fn run_stmts(
    table: &Table,
    host: &Host,
    p: &Packet,
    stmts: &[Stmt],
    mut st: State,
    depth: usize,
) -> Result<Vec<Flow>, TraceError> {
    let Some((s, rest)) = stmts.split_first() else {
        return Ok(vec![Flow::Continue(st)]);
    };
    let goto = |st: State, target: &str| -> Result<Vec<Flow>, TraceError> {
        Ok(run_chain(table, host, p, target, st, depth + 1)?
            .into_iter()
            .map(|f| match f {
                Flow::Continue(s) => Flow::EndBase(s),
                other => other,
            })
            .collect())
    };
    match s {
        Stmt::MarkOr(bit) => st.mark |= bit,
        Stmt::MarkXor(bit) => st.mark ^= bit,
        Stmt::Update { key, set, timeout } => {
            let k = key_of(p, &st, key);
            st.updates.push((set.clone(), k, *timeout));
        }
        Stmt::Masquerade => {
            st.masquerade = true;
            return Ok(vec![Flow::Done(st, Verdict::Accept)]);
        }
        Stmt::Reject => return Ok(vec![Flow::Done(st, Verdict::Reject)]),
        Stmt::Drop => return Ok(vec![Flow::Done(st, Verdict::Drop)]),
        Stmt::Accept => return Ok(vec![Flow::Done(st, Verdict::Accept)]),
        Stmt::Jump(target) => {
            let mut out = Vec::new();
            for f in run_chain(table, host, p, target, st, depth + 1)? {
                match f {
                    Flow::Continue(s) => out.extend(run_stmts(table, host, p, rest, s, depth)?),
                    other => out.push(other),
                }
            }
            return Ok(out);
        }
        Stmt::Goto(target) => return goto(st, target),
        Stmt::Vmap { key, map } => {
            return match lookup(table, map, &key_of(p, &st, key)) {
                Some(Data::Goto(target)) => goto(st, target),
                // A miss ends the rule; evaluation goes on with the next rule.
                _ => Ok(vec![Flow::Continue(st)]),
            };
        }
        Stmt::NumgenVmap { chains } => {
            let mut out = Vec::new();
            for target in chains {
                out.extend(goto(st.clone(), target)?);
            }
            return Ok(out);
        }
        Stmt::Dnat { key, map } => {
            return Ok(match lookup(table, map, &key_of(p, &st, key)) {
                Some(Data::AddrPort(ip, port)) => {
                    st.dnat = Some((*ip, *port));
                    st.dst = *ip;
                    st.dport = *port;
                    vec![Flow::Done(st, Verdict::Accept)]
                }
                _ => vec![Flow::Continue(st)],
            });
        }
    }
    run_stmts(table, host, p, rest, st, depth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nft::diff::plan;
    use crate::dataplane::nft::render::{desired_table, RenderConfig};
    use crate::dataplane::nft::{fake::FakeNft, DumpedTable, Family};
    use crate::model::{DesiredState, Endpoint, ServiceInfo, ServicePortName, ServicePortState};
    use std::collections::BTreeMap;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(
        name: &str,
        cip: &str,
        port: u16,
        protocol: Protocol,
        np: Option<u16>,
        eps: &[(&str, bool)],
    ) -> (ServicePortName, ServicePortState) {
        let n = ServicePortName {
            namespace: "ns".into(),
            name: name.into(),
            port: String::new(),
            protocol,
        };
        let endpoints = eps
            .iter()
            .map(|(e, local)| Endpoint {
                ip: ip(e),
                port: 8080,
                is_local: *local,
            })
            .collect();
        (
            n.clone(),
            ServicePortState::from_endpoints(
                ServiceInfo {
                    node_port: np,
                    internal_local: name.starts_with("local"),
                    ..ServiceInfo::new(n, vec![ip(cip)], port)
                },
                endpoints,
            ),
        )
    }

    /// Renders, applies to the fake (which validates it like the kernel) and returns the table.
    fn programmed(state: &DesiredState) -> Table {
        let cfg = RenderConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            masquerade_all: false,
            ipvs: false,
        };
        let want = desired_table(state, &cfg, Family::Ip);
        let mut fake = FakeNft::default();
        fake.apply(&plan(&want, &DumpedTable::empty(Family::Ip)))
            .unwrap();
        // Re-planning against what the fake holds changes nothing.
        assert!(plan(&want, &fake.dump(Family::Ip).unwrap()).is_empty());
        fake.table(Family::Ip).unwrap().clone()
    }

    fn state() -> DesiredState {
        DesiredState {
            services: BTreeMap::from([
                svc(
                    "web",
                    "10.96.0.10",
                    80,
                    Protocol::Tcp,
                    Some(30080),
                    &[
                        ("10.244.1.10", true),
                        ("10.244.1.11", true),
                        ("10.244.2.10", false),
                    ],
                ),
                svc(
                    "dns",
                    "10.96.0.53",
                    53,
                    Protocol::Udp,
                    None,
                    &[("10.244.1.11", true)],
                ),
                svc(
                    "sctp",
                    "10.96.0.60",
                    9000,
                    Protocol::Sctp,
                    Some(30900),
                    &[("10.244.2.11", false)],
                ),
                svc("empty", "10.96.0.20", 80, Protocol::Tcp, Some(30081), &[]),
                svc(
                    "local-web",
                    "10.96.0.30",
                    80,
                    Protocol::Tcp,
                    Some(30082),
                    &[("10.244.1.12", true), ("10.244.2.12", false)],
                ),
                svc(
                    "local-none",
                    "10.96.0.31",
                    80,
                    Protocol::Tcp,
                    None,
                    &[("10.244.2.13", false)],
                ),
            ]),
            node_ips: vec![ip("192.168.77.10")],
            ..DesiredState::default()
        }
    }

    fn host() -> Host {
        Host {
            local_addrs: vec![ip("192.168.77.10"), ip("127.0.0.1")],
        }
    }

    fn pkt(src: &str, dst: &str, protocol: Protocol, dport: u16, origin: Origin) -> Packet {
        Packet {
            src: ip(src),
            dst: ip(dst),
            protocol,
            dport,
            origin,
        }
    }

    fn dnats(out: &BTreeSet<Outcome>) -> Vec<String> {
        out.iter()
            .map(|o| {
                format!(
                    "{:?} {} masq={}",
                    o.verdict,
                    o.dnat.map(|(i, p)| format!("{i}:{p}")).unwrap_or_default(),
                    o.masquerade
                )
            })
            .collect()
    }

    #[test]
    fn clusterip_from_a_pod_reaches_every_endpoint_without_masquerade() {
        let t = programmed(&state());
        let out = trace(
            &t,
            &host(),
            &pkt(
                "10.244.1.10",
                "10.96.0.10",
                Protocol::Tcp,
                80,
                Origin::Forwarded,
            ),
        )
        .unwrap();
        assert_eq!(
            dnats(&out),
            [
                "Accept 10.244.1.10:8080 masq=true", // hairpin: the client itself
                "Accept 10.244.1.11:8080 masq=false",
                "Accept 10.244.2.10:8080 masq=false",
            ]
        );
    }

    #[test]
    fn clusterip_from_outside_the_cluster_cidr_is_masqueraded() {
        let t = programmed(&state());
        let out = trace(
            &t,
            &host(),
            &pkt(
                "198.51.100.2",
                "10.96.0.10",
                Protocol::Tcp,
                80,
                Origin::Forwarded,
            ),
        )
        .unwrap();
        assert_eq!(out.len(), 3);
        assert!(
            out.iter()
                .all(|o| o.masquerade && o.verdict == Verdict::Accept),
            "{out:?}"
        );
    }

    #[test]
    fn nodeport_on_the_node_address_is_masqueraded_and_other_ports_untouched() {
        let t = programmed(&state());
        let out = trace(
            &t,
            &host(),
            &pkt(
                "198.51.100.2",
                "192.168.77.10",
                Protocol::Sctp,
                30900,
                Origin::Forwarded,
            ),
        )
        .unwrap();
        assert_eq!(dnats(&out), ["Accept 10.244.2.11:8080 masq=true"]);
        let out = trace(
            &t,
            &host(),
            &pkt(
                "198.51.100.2",
                "192.168.77.10",
                Protocol::Tcp,
                30900,
                Origin::Forwarded,
            ),
        )
        .unwrap();
        assert_eq!(
            dnats(&out),
            ["Accept  masq=false"],
            "TCP on the SCTP NodePort is not a service"
        );
    }

    #[test]
    fn services_without_endpoints_are_rejected_from_pods_the_host_and_outside() {
        let t = programmed(&state());
        for p in [
            pkt(
                "10.244.1.10",
                "10.96.0.20",
                Protocol::Tcp,
                80,
                Origin::Forwarded,
            ),
            pkt(
                "192.168.77.10",
                "10.96.0.20",
                Protocol::Tcp,
                80,
                Origin::Local,
            ),
            pkt(
                "198.51.100.2",
                "192.168.77.10",
                Protocol::Tcp,
                30081,
                Origin::Forwarded,
            ),
        ] {
            let out = trace(&t, &host(), &p).unwrap();
            assert_eq!(dnats(&out), ["Reject  masq=false"], "{p:?}");
        }
    }

    #[test]
    fn host_to_clusterip_goes_through_output_and_is_masqueraded() {
        let t = programmed(&state());
        let out = trace(
            &t,
            &host(),
            &pkt(
                "192.168.77.10",
                "10.96.0.53",
                Protocol::Udp,
                53,
                Origin::Local,
            ),
        )
        .unwrap();
        assert_eq!(dnats(&out), ["Accept 10.244.1.11:8080 masq=true"]);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_clusterip_traffic_on_this_node() {
        let t = programmed(&state());
        let p = pkt(
            "10.244.1.10",
            "10.96.0.30",
            Protocol::Tcp,
            80,
            Origin::Forwarded,
        );
        assert_eq!(
            dnats(&trace(&t, &host(), &p).unwrap()),
            ["Accept 10.244.1.12:8080 masq=false"]
        );
        // The NodePort of the same Service is not internal traffic: every endpoint.
        let p = pkt(
            "198.51.100.2",
            "192.168.77.10",
            Protocol::Tcp,
            30082,
            Origin::Forwarded,
        );
        assert_eq!(
            dnats(&trace(&t, &host(), &p).unwrap()),
            [
                "Accept 10.244.1.12:8080 masq=true",
                "Accept 10.244.2.12:8080 masq=true"
            ]
        );
        // Endpoints only elsewhere: dropped, not rejected.
        let p = pkt(
            "10.244.1.10",
            "10.96.0.31",
            Protocol::Tcp,
            80,
            Origin::Forwarded,
        );
        assert_eq!(
            dnats(&trace(&t, &host(), &p).unwrap()),
            ["Drop  masq=false"]
        );
    }

    #[test]
    fn a_port_the_service_does_not_have_is_rejected() {
        let t = programmed(&state());
        let p = pkt(
            "10.244.1.10",
            "10.96.0.53",
            Protocol::Tcp,
            53,
            Origin::Forwarded,
        );
        assert_eq!(
            dnats(&trace(&t, &host(), &p).unwrap()),
            ["Reject  masq=false"]
        );
        let p = pkt(
            "192.168.77.10",
            "10.96.0.10",
            Protocol::Tcp,
            81,
            Origin::Local,
        );
        assert_eq!(
            dnats(&trace(&t, &host(), &p).unwrap()),
            ["Reject  masq=false"]
        );
    }

    #[test]
    fn an_unallocated_address_in_the_service_range_is_dropped_and_others_pass() {
        let t = programmed(&state());
        let p = pkt(
            "10.244.1.10",
            "10.96.0.99",
            Protocol::Tcp,
            80,
            Origin::Forwarded,
        );
        assert_eq!(
            dnats(&trace(&t, &host(), &p).unwrap()),
            ["Drop  masq=false"]
        );
        let p = pkt(
            "10.244.1.10",
            "10.97.0.1",
            Protocol::Tcp,
            80,
            Origin::Forwarded,
        );
        assert_eq!(
            dnats(&trace(&t, &host(), &p).unwrap()),
            ["Accept  masq=false"],
            "outside the service range: not ours"
        );
    }
}
