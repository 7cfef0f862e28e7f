//! Proof of the nftables rendering against the model: every truth-table scenario and random
//! policies are rendered, loaded into the fake (which validates them like the kernel), and
//! every flow is traced through the table: accepted exactly when [`PolicySet::allows`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::policy::{render, POLICY_TABLE};
use crate::dataplane::nft::diff::plan;
use crate::dataplane::nft::fake::FakeNft;
use crate::dataplane::nft::plan::Op;
use crate::dataplane::nft::table::Table;
use crate::dataplane::nft::tracer::{trace, trace_tables, Host, Origin, Packet, Verdict};
use crate::dataplane::nft::{DumpedTable, Family};
use crate::model::Protocol as NftProtocol;
use crate::policy::tests::{model, namespace, pod, policy, truth_table_scenarios};
use crate::policy::*;

const NODE_IP: &str = "192.168.77.10";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn host() -> Host {
    Host {
        local_addrs: vec![ip(NODE_IP)],
    }
}

fn nft_proto(p: Protocol) -> NftProtocol {
    match p {
        Protocol::Tcp => NftProtocol::Tcp,
        Protocol::Udp => NftProtocol::Udp,
        Protocol::Sctp => NftProtocol::Sctp,
    }
}

/// Renders, loads into a fake (validated like the kernel), checks that re-planning is
/// empty, and returns what the fake holds.
fn programmed(set: &PolicySet, local: Option<&BTreeSet<IpAddr>>, family: Family) -> Table {
    let want = render(set, local, family);
    let mut fake = FakeNft::default();
    let p = plan(&want, &DumpedTable::empty(family));
    fake.apply(&p)
        .unwrap_or_else(|e| panic!("{e}\n{}", p.to_script_in(POLICY_TABLE)));
    let again = plan(&want, &fake.dump(family).unwrap());
    assert!(again.is_empty(), "{again:?}");
    fake.table(family).unwrap().clone()
}

/// The verdict of the first packet of a flow through `tables`; it must be unique.
fn verdict(tables: &[&Table], src: IpAddr, dst: IpAddr, port: u16, proto: Protocol) -> Verdict {
    let p = Packet {
        src,
        dst,
        protocol: nft_proto(proto),
        dport: port,
        origin: Origin::Forwarded,
    };
    let out = trace_tables(tables, &host(), &p).unwrap();
    let verdicts: BTreeSet<Verdict> = out.iter().map(|o| o.verdict).collect();
    assert_eq!(verdicts.len(), 1, "{p:?}: {out:?}");
    verdicts.into_iter().next().unwrap()
}

/// Every flow between `ends` on ports 80, 81 and 1234, every protocol: the table accepts
/// exactly what the model allows (each end as an address: per-family ipBlocks).
fn prove(set: &PolicySet, table: &Table, ends: &[IpAddr], what: &str) -> usize {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for &proto in &Protocol::ALL {
        for port in [80, 81, 1234] {
            for &s in ends {
                for &d in ends {
                    let want = set.allows(&Endpoint::Ip(s), &Endpoint::Ip(d), port, proto);
                    let got = verdict(&[table], s, d, port, proto) == Verdict::Accept;
                    checked += 1;
                    if got != want {
                        wrong.push(format!(
                            "{s} -> {d} {proto}/{port}: model {want}, nft {got}"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: {} of {checked} flows differ:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        table.to_dump().to_text_named(POLICY_TABLE)
    );
    checked
}

fn model_set(policies: &[NetworkPolicy]) -> PolicySet {
    let (pods, nss) = model();
    PolicySet::build(policies, &pods, &nss).0
}

fn pod_ips(set: &PolicySet, family: Family) -> Vec<IpAddr> {
    set.pods()
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .filter(|i| family.contains(i))
        .collect()
}

#[test]
fn every_truth_table_scenario_renders_to_a_table_that_agrees_with_the_model() {
    for (name, policies) in truth_table_scenarios() {
        let set = model_set(&policies);
        let table = programmed(&set, None, Family::Ip);
        let mut ends = pod_ips(&set, Family::Ip);
        ends.push(ip("198.51.100.7"));
        prove(&set, &table, &ends, name);
    }
}

#[test]
fn enforcement_split_over_two_nodes_equals_the_model() {
    // Node 1 has namespace x and y/a, node 2 the rest: a flow crosses the source's node
    // (egress) and the destination's node (ingress).
    for (name, policies) in truth_table_scenarios() {
        let set = model_set(&policies);
        let all: Vec<IpAddr> = pod_ips(&set, Family::Ip);
        let on1: BTreeSet<IpAddr> = set
            .pods()
            .values()
            .filter(|p| p.key.namespace == "x" || (p.key.namespace == "y" && p.key.name == "a"))
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let on2: BTreeSet<IpAddr> = all.iter().copied().filter(|i| !on1.contains(i)).collect();
        let n1 = programmed(&set, Some(&on1), Family::Ip);
        let n2 = programmed(&set, Some(&on2), Family::Ip);
        let node_of = |i: &IpAddr| if on1.contains(i) { &n1 } else { &n2 };
        for &proto in &Protocol::ALL {
            for port in [80, 81] {
                for s in &all {
                    for d in &all {
                        let want = set.allows(&Endpoint::Ip(*s), &Endpoint::Ip(*d), port, proto);
                        let (ns, nd) = (node_of(s), node_of(d));
                        let mut got = verdict(&[ns], *s, *d, port, proto) == Verdict::Accept;
                        if !std::ptr::eq(ns, nd) {
                            got &= verdict(&[nd], *s, *d, port, proto) == Verdict::Accept;
                        }
                        assert_eq!(got, want, "{name}: {s} -> {d} {proto}/{port}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_pod_to_a_node_address_is_checked_for_egress_only() {
    for (name, policies) in truth_table_scenarios() {
        let set = model_set(&policies);
        let table = programmed(&set, None, Family::Ip);
        for src in pod_ips(&set, Family::Ip) {
            for &proto in &Protocol::ALL {
                for port in [80, 10250] {
                    let want =
                        set.allows(&Endpoint::Ip(src), &Endpoint::Ip(ip(NODE_IP)), port, proto);
                    let got = verdict(&[&table], src, ip(NODE_IP), port, proto) == Verdict::Accept;
                    assert_eq!(got, want, "{name}: {src} -> node {proto}/{port}");
                }
            }
        }
    }
}

#[test]
fn established_connections_and_the_node_itself_are_not_filtered() {
    let set = model_set(&[policy(
        "x",
        "deny",
        json!({"podSelector": {},
        "policyTypes": ["Ingress", "Egress"]}),
    )]);
    let table = programmed(&set, None, Family::Ip);
    let fwd = &table.chains["forward"];
    assert_eq!(
        fwd.rules[0].to_nft(Family::Ip),
        "ct state established,related accept"
    );
    // The node talking to an isolated pod (kubelet probes) leaves through output: allowed.
    let p = Packet {
        src: ip(NODE_IP),
        dst: ip("10.0.1.1"),
        protocol: NftProtocol::Tcp,
        dport: 80,
        origin: Origin::Local,
    };
    let out = trace(&table, &host(), &p).unwrap();
    assert!(out.iter().all(|o| o.verdict == Verdict::Accept), "{out:?}");
    assert_eq!(
        verdict(&[&table], ip("10.0.1.1"), ip("10.0.2.1"), 80, Protocol::Tcp),
        Verdict::Drop
    );
}

/// weir's own `weir` table with one Service 10.96.0.10 (TCP and UDP port 80) whose only
/// endpoint is x/a (10.0.1.1) on target port 81.
fn proxy_table() -> Table {
    use crate::dataplane::nft::render::{desired_table, RenderConfig};
    use crate::model::{DesiredState, ServiceInfo, ServicePortName, ServicePortState};
    let services = [NftProtocol::Tcp, NftProtocol::Udp]
        .into_iter()
        .map(|protocol| {
            let n = ServicePortName {
                namespace: "x".into(),
                name: "svc".into(),
                port: protocol.nft_name().into(),
                protocol,
            };
            let info = ServiceInfo::new(n.clone(), vec![ip("10.96.0.10")], 80);
            let eps = vec![crate::model::Endpoint {
                ip: ip("10.0.1.1"),
                port: 81,
                is_local: true,
            }];
            (n, ServicePortState::from_endpoints(info, eps))
        })
        .collect();
    let state = DesiredState {
        services,
        node_ips: vec![ip(NODE_IP)],
        ..DesiredState::default()
    };
    let cfg = RenderConfig {
        cluster_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        masquerade_all: false,
        ipvs: false,
    };
    let want = desired_table(&state, &cfg, Family::Ip);
    let mut fake = FakeNft::default();
    fake.apply(&plan(&want, &DumpedTable::empty(Family::Ip)))
        .unwrap();
    fake.table(Family::Ip).unwrap().clone()
}

#[test]
fn a_pod_to_a_cluster_ip_is_judged_on_the_endpoint_after_dnat() {
    let weir = proxy_table();
    let a = PodKey::new("x", "a");
    for (name, policies) in truth_table_scenarios() {
        let set = model_set(&policies);
        let pol = programmed(&set, None, Family::Ip);
        for src in set.pods().values() {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                let want = set.allows(
                    &Endpoint::Pod(src.key.clone()),
                    &Endpoint::Pod(a.clone()),
                    81,
                    proto,
                );
                let p = Packet {
                    src: src.ips[0],
                    dst: ip("10.96.0.10"),
                    protocol: nft_proto(proto),
                    dport: 80,
                    origin: Origin::Forwarded,
                };
                let out = trace_tables(&[&weir, &pol], &host(), &p).unwrap();
                assert_eq!(out.len(), 1, "{out:?}");
                let o = out.iter().next().unwrap();
                assert_eq!(o.dnat, Some((ip("10.0.1.1"), 81)));
                assert_eq!(
                    o.verdict == Verdict::Accept,
                    want,
                    "{name}: {} -> ClusterIP {proto}/80 (x/a:81)",
                    src.key
                );
            }
        }
    }
}

fn relabelled(pods: &[Pod], key: (&str, &str), labels: Value) -> Vec<Pod> {
    pods.iter()
        .map(|p| {
            let mut p = p.clone();
            if p.metadata.namespace.as_deref() == Some(key.0)
                && p.metadata.name.as_deref() == Some(key.1)
            {
                p.metadata.labels = serde_json::from_value(labels.clone()).unwrap();
            }
            p
        })
        .collect()
}

#[test]
fn a_pod_label_change_changes_set_elements_only() {
    let policies: Vec<NetworkPolicy> = truth_table_scenarios()
        .into_iter()
        .flat_map(|(_, p)| p)
        .collect();
    let (pods, nss) = model();
    let before = PolicySet::build(&policies, &pods, &nss).0;
    let mut fake = FakeNft::default();
    fake.apply(&plan(
        &render(&before, None, Family::Ip),
        &DumpedTable::empty(Family::Ip),
    ))
    .unwrap();
    // x/b becomes an `a`: selected by more policies, a peer of others.
    let after = PolicySet::build(
        &policies,
        &relabelled(&pods, ("x", "b"), json!({"pod": "a"})),
        &nss,
    )
    .0;
    let want = render(&after, None, Family::Ip);
    let p = plan(&want, &fake.dump(Family::Ip).unwrap());
    assert!(p.element_changes() > 0);
    // `add table` is the idempotent create every plan starts with.
    assert!(
        p.ops.iter().all(|op| matches!(
            op,
            Op::AddTable | Op::AddElements { .. } | Op::DeleteElements { .. }
        )),
        "{}",
        p.to_script_in(POLICY_TABLE)
    );
    fake.apply(&p).unwrap();
    let table = fake.table(Family::Ip).unwrap().clone();
    assert_eq!(table.to_dump(), want.to_dump());
    prove(
        &after,
        &table,
        &pod_ips(&after, Family::Ip),
        "after relabel",
    );
}

#[test]
fn named_ports_ranges_and_ip_blocks_render_as_interval_and_concatenated_sets() {
    let set = model_set(&[policy(
        "x",
        "mixed",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}},
                                  {"podSelector": {"matchLabels": {"pod": "b"}}}],
                         "ports": [{"port": 80, "endPort": 81}, {"port": "serve-80-udp", "protocol": "UDP"},
                                   {"protocol": "SCTP"}]}]}),
    )]);
    let t = render(&set, None, Family::Ip);
    let rules: Vec<String> = t.chains["x_mixed_in"]
        .rules
        .iter()
        .map(|r| r.to_nft(Family::Ip))
        .collect();
    assert_eq!(
        rules,
        [
            "ip saddr @x_mixed_in0_pods meta l4proto . th dport @x_mixed_in0_ports accept",
            "ip saddr @x_mixed_in0_pods ip daddr . meta l4proto . th dport @x_mixed_in0_named accept",
            "ip saddr @x_mixed_in0_cidrs meta l4proto . th dport @x_mixed_in0_ports accept",
            "ip saddr @x_mixed_in0_cidrs ip daddr . meta l4proto . th dport @x_mixed_in0_named accept",
        ]
    );
    let keys =
        |m: &str| -> Vec<String> { t.maps[m].elements.keys().map(|k| k.to_string()).collect() };
    assert_eq!(keys("x_mixed_in0_ports"), ["tcp . 80-81", "sctp . 0-65535"]);
    assert_eq!(keys("x_mixed_in0_named"), ["10.0.1.1 . udp . 80"]);
    assert_eq!(keys("x_mixed_in0_pods"), ["10.0.1.2"]);
    assert_eq!(keys("x_mixed_sel"), ["10.0.1.1"]);
    assert!(keys("x_mixed_in0_cidrs").contains(&"10.0.3.0/24".to_owned()));
    // No IPv6 ipBlock: the IPv6 table has no cidr rule at all.
    let t6 = render(&set, None, Family::Ip6);
    assert_eq!(t6.chains["x_mixed_in"].rules.len(), 2);
}

// ---- random policies ----

const OUTSIDE4: &str = "198.51.100.7";
const OUTSIDE6: &str = "2001:db8::7";

fn arb_selector() -> impl Strategy<Value = Value> {
    let value = prop::sample::select(vec!["web", "db", "api"]);
    prop_oneof![
        Just(json!({})),
        value
            .clone()
            .prop_map(|v| json!({"matchLabels": {"app": v}})),
        prop::sample::subsequence(vec!["web", "db", "api"], 1..=2).prop_map(
            |vs| json!({"matchExpressions": [{"key": "app", "operator": "In", "values": vs}]})
        ),
        value.prop_map(
            |v| json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [v]}]})
        ),
        Just(json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]})),
        Just(json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]})),
    ]
}

fn arb_ns_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        prop::sample::select(vec!["x", "y", "z"]).prop_map(|n| json!({"matchLabels": {"ns": n}})),
        Just(json!({"matchLabels": {"team": "blue"}})),
    ]
}

fn arb_ip_block() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!({"cidr": "10.1.0.0/29"}),
        json!({"cidr": "10.1.0.0/24", "except": ["10.1.0.2/31"]}),
        json!({"cidr": "10.1.0.0/24", "except": ["10.1.0.4/30", "10.1.0.1/32"]}),
        json!({"cidr": "0.0.0.0/0", "except": ["10.1.0.0/30"]}),
        json!({"cidr": "198.51.100.0/24"}),
        json!({"cidr": "fd00::/120", "except": ["fd00::2/127"]}),
        json!({"cidr": "::/0", "except": ["fd00::4/126"]}),
        json!({"cidr": "2001:db8::/32"}),
    ])
}

fn arb_peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        arb_selector().prop_map(|s| json!({"podSelector": s})),
        arb_ns_selector().prop_map(|n| json!({"namespaceSelector": n})),
        (arb_ns_selector(), arb_selector())
            .prop_map(|(n, s)| json!({"namespaceSelector": n, "podSelector": s})),
        arb_ip_block().prop_map(|b| json!({"ipBlock": b})),
    ]
}

fn arb_port() -> impl Strategy<Value = Value> {
    let proto = prop::sample::select(vec!["TCP", "UDP", "SCTP"]);
    prop_oneof![
        (proto.clone(), prop::sample::select(vec![80, 81, 1234]))
            .prop_map(|(p, n)| json!({"protocol": p, "port": n})),
        (
            proto.clone(),
            prop::sample::select(vec![(79, 80), (81, 90), (80, 81), (1000, 2000)])
        )
            .prop_map(|(p, (a, b))| json!({"protocol": p, "port": a, "endPort": b})),
        (
            proto.clone(),
            prop::sample::select(vec!["http", "metrics", "dns"])
        )
            .prop_map(|(p, n)| json!({"protocol": p, "port": n})),
        proto.prop_map(|p| json!({"protocol": p})),
    ]
}

fn arb_rule(peer_key: &'static str) -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(arb_peer(), 0..3),
        prop::collection::vec(arb_port(), 0..3),
    )
        .prop_map(move |(peers, ports)| {
            let mut r = serde_json::Map::new();
            if !peers.is_empty() {
                r.insert(peer_key.into(), json!(peers));
            }
            if !ports.is_empty() {
                r.insert("ports".into(), json!(ports));
            }
            Value::Object(r)
        })
}

fn arb_policy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        prop::sample::select(vec!["x", "y", "z"]),
        arb_selector(),
        prop::sample::select(vec![
            json!(null),
            json!(["Ingress"]),
            json!(["Egress"]),
            json!(["Ingress", "Egress"]),
        ]),
        prop::collection::vec(arb_rule("from"), 0..3),
        prop::collection::vec(arb_rule("to"), 0..3),
    )
        .prop_map(move |(ns, sel, types, ingress, egress)| {
            let mut spec = json!({"podSelector": sel, "ingress": ingress, "egress": egress});
            if !types.is_null() {
                spec["policyTypes"] = types;
            }
            policy(ns, &format!("p{i}"), spec)
        })
}

/// Pods p0..p5 in random namespaces with random labels and named ports; even pods are
/// dual-stack. Pod i has 10.1.0.<i+1> (and fd00::<i+1>).
fn arb_pods() -> impl Strategy<Value = (Vec<Pod>, Vec<Namespace>)> {
    let one = (
        prop::sample::select(vec!["x", "y", "z"]),
        prop::sample::select(vec!["web", "db", "api"]),
        any::<bool>(),
        prop::sample::select(vec![80u16, 81]),
        prop::sample::select(vec!["TCP", "UDP", "SCTP"]),
    );
    (
        prop::collection::vec(one, 6),
        prop::sample::subsequence(vec!["x", "y", "z"], 0..=3),
    )
        .prop_map(|(specs, blue)| {
            let pods = specs
                .into_iter()
                .enumerate()
                .map(|(i, (ns, app, tier, port, proto))| {
                    let mut labels = json!({"app": app});
                    if tier {
                        labels["tier"] = json!("fe");
                    }
                    let ports = json!([{"name": "http", "containerPort": port, "protocol": proto},
                                       {"name": "metrics", "containerPort": 161 - port, "protocol": "TCP"},
                                       {"name": "dns", "containerPort": 81, "protocol": "UDP"}]);
                    let mut p = pod(ns, &format!("p{i}"), labels, &format!("10.1.0.{}", i + 1), ports);
                    if i % 2 == 0 {
                        if let Some(st) = p.status.as_mut() {
                            st.pod_ips = Some(serde_json::from_value(json!([
                                {"ip": format!("10.1.0.{}", i + 1)},
                                {"ip": format!("fd00::{}", i + 1)}
                            ])).unwrap());
                        }
                    }
                    p
                })
                .collect();
            let nss = ["x", "y", "z"]
                .into_iter()
                .map(|n| {
                    let mut ns = namespace(n);
                    if blue.contains(&n) {
                        let labels = ns.metadata.labels.get_or_insert_with(BTreeMap::new);
                        labels.insert("team".into(), "blue".into());
                    }
                    ns
                })
                .collect();
            (pods, nss)
        })
}

fn arb_policies() -> impl Strategy<Value = Vec<NetworkPolicy>> {
    (0usize..5).prop_flat_map(|n| (0..n).map(arb_policy).collect::<Vec<_>>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_policies_render_to_tables_that_agree_with_the_model(
        (pods, nss) in arb_pods(),
        policies in arb_policies(),
    ) {
        let (set, errors) = PolicySet::build(&policies, &pods, &nss);
        prop_assert!(errors.is_empty(), "{errors:?}");
        for (family, outside) in [(Family::Ip, OUTSIDE4), (Family::Ip6, OUTSIDE6)] {
            let table = programmed(&set, None, family);
            let mut ends = pod_ips(&set, family);
            ends.push(ip(outside));
            prove(&set, &table, &ends, &format!("{family}"));
        }
    }
}
