//! Unit tests per rule kind and truth tables over upstream's netpol e2e model.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};

use super::*;

pub(crate) const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub(crate) const PODS: [&str; 3] = ["a", "b", "c"];
pub(crate) const PORTS: [u16; 2] = [80, 81];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Pod IP in the model: 10.0.<ns index + 1>.<pod index + 1>.
pub(crate) fn model_ip(ns: &str, pod: &str) -> String {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() + 1;
    let p = PODS.iter().position(|x| *x == pod).unwrap() + 1;
    format!("10.0.{n}.{p}")
}

pub(crate) fn pod(ns: &str, name: &str, labels: Value, ip: &str, ports: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    }))
    .unwrap()
}

pub(crate) fn namespace(name: &str) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"ns": name}}})).unwrap()
}

pub(crate) fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
        .unwrap()
}

/// Upstream's model: namespaces x, y, z (label ns=<name>), pods a, b, c (label
/// pod=<name>) serving TCP, UDP and SCTP on 80 and 81 via ports named serve-<port>-<proto>.
pub(crate) fn model() -> (Vec<Pod>, Vec<Namespace>) {
    let mut ports = Vec::new();
    for port in PORTS {
        for proto in Protocol::ALL {
            let lower = proto.to_string().to_lowercase();
            ports.push(json!({"name": format!("serve-{port}-{lower}"),
                "containerPort": port, "protocol": proto.to_string()}));
        }
    }
    let mut pods = Vec::new();
    for ns in NAMESPACES {
        for p in PODS {
            pods.push(pod(
                ns,
                p,
                json!({"pod": p}),
                &model_ip(ns, p),
                json!(ports),
            ));
        }
    }
    (pods, NAMESPACES.iter().map(|n| namespace(n)).collect())
}

pub(crate) fn model_keys() -> Vec<PodKey> {
    NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| PodKey::new(*n, *p)))
        .collect()
}

fn build(policies: &[NetworkPolicy]) -> PolicySet {
    let (pods, nss) = model();
    let (set, errors) = PolicySet::build(policies, &pods, &nss);
    assert!(errors.is_empty(), "{errors:?}");
    set
}

/// Compares the model's full truth table with `expect(src, dst, port, proto)` (loopback is
/// always expected allowed); on mismatch prints both matrices per port/protocol.
fn check(set: &PolicySet, expect: impl Fn(&PodKey, &PodKey, u16, Protocol) -> bool) {
    let keys = model_keys();
    let got = set.truth_table(&keys, &PORTS, &Protocol::ALL);
    let want: Vec<Probe> = got
        .iter()
        .map(|p| Probe {
            allowed: p.src == p.dst || expect(&p.src, &p.dst, p.port, p.protocol),
            ..p.clone()
        })
        .collect();
    if got != want {
        let mut msg = String::new();
        for proto in Protocol::ALL {
            for port in PORTS {
                let (g, w) = (
                    format_matrix(&got, port, proto),
                    format_matrix(&want, port, proto),
                );
                if g != w {
                    msg.push_str(&format!("expected:\n{w}observed:\n{g}\n"));
                }
            }
        }
        panic!("truth table mismatch\n{msg}");
    }
}

/// Every truth-table scenario's policies, by name (the model of [`model`]); the nftables
/// rendering is proven against them in `dataplane::nft::policy_tests`.
pub(crate) fn truth_table_scenarios() -> Vec<(&'static str, Vec<NetworkPolicy>)> {
    vec![
        ("no_policy_allows_all", Vec::new()),
        ("default_deny_ingress", sc_default_deny_ingress()),
        ("default_deny_egress", sc_default_deny_egress()),
        ("allow_from_same_namespace", sc_allow_from_same_namespace()),
        (
            "allow_from_namespace_by_label",
            sc_allow_from_namespace_by_label(),
        ),
        (
            "pod_and_namespace_selector_in_one_peer_is_and",
            sc_pod_and_namespace_selector_in_one_peer_is_and(),
        ),
        (
            "pod_and_namespace_selector_as_two_peers_is_or",
            sc_pod_and_namespace_selector_as_two_peers_is_or(),
        ),
        (
            "egress_ip_block_with_except",
            sc_egress_ip_block_with_except(),
        ),
        (
            "ingress_ip_block_matches_cluster_pods",
            sc_ingress_ip_block_matches_cluster_pods(),
        ),
        ("named_port", sc_named_port()),
        (
            "named_port_egress_resolves_per_destination",
            sc_named_port_egress_resolves_per_destination(),
        ),
        ("end_port_range", sc_end_port_range()),
        ("policies_add_up", sc_policies_add_up()),
        (
            "ingress_and_egress_both_required",
            sc_ingress_and_egress_both_required(),
        ),
        (
            "invalid_policy_fails_closed",
            sc_invalid_policy_fails_closed(),
        ),
        (
            "pod_selector_in_all_namespaces",
            sc_pod_selector_in_all_namespaces(),
        ),
    ]
}

fn is(k: &PodKey, ns: &str, pod: &str) -> bool {
    k.namespace == ns && k.name == pod
}

// ---- truth tables over the e2e model ----

#[test]
fn tt_no_policy_allows_all() {
    check(&build(&[]), |_, _, _, _| true);
}

fn sc_default_deny_ingress() -> Vec<NetworkPolicy> {
    vec![policy("x", "deny", json!({"podSelector": {}}))]
}

#[test]
fn tt_default_deny_ingress() {
    let set = build(&sc_default_deny_ingress());
    check(&set, |_, d, _, _| d.namespace != "x");
}

fn sc_default_deny_egress() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    )]
}

#[test]
fn tt_default_deny_egress() {
    let set = build(&sc_default_deny_egress());
    check(&set, |s, _, _, _| s.namespace != "x");
}

fn sc_allow_from_same_namespace() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "same-ns",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    )]
}

#[test]
fn tt_allow_from_same_namespace() {
    let set = build(&sc_allow_from_same_namespace());
    check(&set, |s, d, _, _| d.namespace != "x" || s.namespace == "x");
}

fn sc_allow_from_namespace_by_label() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions":
                [{"key": "ns", "operator": "In", "values": ["y"]}]}}]}]}),
    )]
}

#[test]
fn tt_allow_from_namespace_by_label() {
    let set = build(&sc_allow_from_namespace_by_label());
    check(&set, |s, d, _, _| !is(d, "x", "a") || s.namespace == "y");
}

fn sc_pod_and_namespace_selector_in_one_peer_is_and() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "and",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                   "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]
}

#[test]
fn tt_pod_and_namespace_selector_in_one_peer_is_and() {
    let set = build(&sc_pod_and_namespace_selector_in_one_peer_is_and());
    check(&set, |s, d, _, _| !is(d, "x", "a") || is(s, "y", "b"));
}

fn sc_pod_and_namespace_selector_as_two_peers_is_or() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "or",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                                  {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]
}

#[test]
fn tt_pod_and_namespace_selector_as_two_peers_is_or() {
    let set = build(&sc_pod_and_namespace_selector_as_two_peers_is_or());
    check(&set, |s, d, _, _| {
        !is(d, "x", "a") || s.namespace == "y" || is(s, "x", "b")
    });
}

// x/a may reach the whole pod range except namespace y's /24.
fn sc_egress_ip_block_with_except() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "cidr",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}]}]}),
    )]
}

#[test]
fn tt_egress_ip_block_with_except() {
    let set = build(&sc_egress_ip_block_with_except());
    check(&set, |s, d, _, _| !is(s, "x", "a") || d.namespace != "y");
}

fn sc_ingress_ip_block_matches_cluster_pods() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "cidr",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.3.0/24", "except": ["10.0.3.2/32"]}}]}]}),
    )]
}

#[test]
fn tt_ingress_ip_block_matches_cluster_pods() {
    let set = build(&sc_ingress_ip_block_matches_cluster_pods());
    check(&set, |s, d, _, _| {
        !is(d, "x", "a") || (s.namespace == "z" && s.name != "b")
    });
}

fn sc_named_port() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "named",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"port": "serve-80-tcp"},
                                   {"port": "serve-81-udp", "protocol": "UDP"},
                                   {"port": "serve-81-udp", "protocol": "TCP"}]}]}),
    )]
}

#[test]
fn tt_named_port() {
    let set = build(&sc_named_port());
    // The third entry names a UDP port with protocol TCP: it matches nothing.
    check(&set, |_, d, port, proto| {
        !is(d, "x", "a")
            || (port == 80 && proto == Protocol::Tcp)
            || (port == 81 && proto == Protocol::Udp)
    });
}

fn sc_named_port_egress_resolves_per_destination() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "named-egress",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "serve-81-sctp", "protocol": "SCTP"}]}]}),
    )]
}

#[test]
fn tt_named_port_egress_resolves_per_destination() {
    let set = build(&sc_named_port_egress_resolves_per_destination());
    check(&set, |s, _, port, proto| {
        !is(s, "x", "a") || (port == 81 && proto == Protocol::Sctp)
    });
}

fn sc_end_port_range() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "range",
        json!({"podSelector": {},
            "ingress": [{"ports": [{"port": 81, "endPort": 90, "protocol": "TCP"},
                                   {"port": 70, "endPort": 80, "protocol": "UDP"}]}]}),
    )]
}

#[test]
fn tt_end_port_range() {
    let set = build(&sc_end_port_range());
    check(&set, |_, d, port, proto| {
        d.namespace != "x"
            || (port == 81 && proto == Protocol::Tcp)
            || (port == 80 && proto == Protocol::Udp)
    });
}

fn sc_policies_add_up() -> Vec<NetworkPolicy> {
    vec![
        policy(
            "x",
            "from-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
        policy(
            "x",
            "from-z-b",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}},
                                       "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
    ]
}

#[test]
fn tt_policies_add_up() {
    let set = build(&sc_policies_add_up());
    check(&set, |s, d, _, _| {
        if is(d, "x", "a") {
            s.namespace == "y" || is(s, "z", "b")
        } else if is(d, "x", "b") {
            is(s, "z", "b")
        } else {
            true
        }
    });
}

// x/a may only send to y; y/b only accepts from x. So x/a -> y/b passes, x/b -> y/b passes,
// x/a -> x/* fails, z/* -> y/b fails.
fn sc_ingress_and_egress_both_required() -> Vec<NetworkPolicy> {
    vec![
        policy(
            "x",
            "egress-to-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
        policy(
            "y",
            "ingress-from-x",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
        ),
    ]
}

#[test]
fn tt_ingress_and_egress_both_required() {
    let set = build(&sc_ingress_and_egress_both_required());
    check(&set, |s, d, _, _| {
        (!is(s, "x", "a") || d.namespace == "y") && (!is(d, "y", "b") || s.namespace == "x")
    });
}

fn sc_invalid_policy_fails_closed() -> Vec<NetworkPolicy> {
    let bad_cidr = policy(
        "x",
        "bad-cidr",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}, {}]}),
    );
    let bad_proto = policy(
        "y",
        "bad-proto",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}, {}]}),
    );
    let bad_op = policy(
        "z",
        "bad-op",
        json!({"podSelector": {"matchLabels": {"pod": "c"}},
            "ingress": [{"from": [{"podSelector": {"matchExpressions":
                [{"key": "pod", "operator": "Equals", "values": ["a"]}]}}]}, {}]}),
    );
    vec![bad_cidr, bad_proto, bad_op]
}

#[test]
fn tt_invalid_policy_fails_closed() {
    let (pods, nss) = model();
    let (set, errors) = PolicySet::build(&sc_invalid_policy_fails_closed(), &pods, &nss);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        matches!(&errors[0], PolicyError::InvalidCidr { policy, field, .. }
        if policy == "x/bad-cidr" && field == "spec.ingress[0].from[0].ipBlock.cidr")
    );
    assert!(
        matches!(&errors[1], PolicyError::UnknownProtocol { policy, field, value }
        if policy == "y/bad-proto" && field == "spec.egress[0].ports[0].protocol" && value == "ICMP")
    );
    assert!(
        matches!(&errors[2], PolicyError::BadSelector { policy, field, .. }
        if policy == "z/bad-op" && field == "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator")
    );
    assert!(errors[0].to_string().contains("x/bad-cidr"));
    // The `{}` rules would allow everything; failed closed they allow nothing.
    check(&set, |s, d, _, _| {
        !is(d, "x", "a") && !is(s, "y", "b") && !is(d, "z", "c")
    });
}

// ---- unit tests per rule kind ----

pub(crate) fn two_pods() -> (Vec<Pod>, Vec<Namespace>) {
    let ports = json!([{"name": "http", "containerPort": 8080},
                       {"name": "dns", "containerPort": 53, "protocol": "UDP"}]);
    let other = json!([{"name": "http", "containerPort": 9090}]);
    (
        vec![
            pod(
                "x",
                "a",
                json!({"app": "web", "tier": "fe"}),
                "10.0.1.1",
                ports,
            ),
            pod("x", "b", json!({"app": "db"}), "10.0.1.2", other),
        ],
        vec![namespace("x")],
    )
}

fn pa() -> Endpoint {
    Endpoint::Pod(PodKey::new("x", "a"))
}
fn pb() -> Endpoint {
    Endpoint::Pod(PodKey::new("x", "b"))
}

fn one(spec: Value) -> (PolicySet, Vec<PolicyError>) {
    let (pods, nss) = two_pods();
    PolicySet::build(&[policy("x", "p", spec)], &pods, &nss)
}

#[test]
fn selector_operators() {
    let sel = |exprs: Value| {
        serde_json::from_value(json!({"matchExpressions": exprs}))
            .map(|s| types::Selector::parse(&s, "sel").unwrap())
    };
    let labels: types::Labels = [("app".to_string(), "web".to_string())].into();
    let ok = |e: Value| sel(e).unwrap().matches(&labels);
    assert!(ok(
        json!([{"key": "app", "operator": "In", "values": ["web", "x"]}])
    ));
    assert!(!ok(
        json!([{"key": "app", "operator": "NotIn", "values": ["web"]}])
    ));
    assert!(ok(
        json!([{"key": "tier", "operator": "NotIn", "values": ["fe"]}])
    ));
    assert!(ok(json!([{"key": "app", "operator": "Exists"}])));
    assert!(!ok(json!([{"key": "tier", "operator": "Exists"}])));
    assert!(ok(json!([{"key": "tier", "operator": "DoesNotExist"}])));
    assert!(ok(json!([])));
    let bad: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
        serde_json::from_value(json!({"matchExpressions": [{"key": "a", "operator": "In"}]}))
            .unwrap();
    assert!(types::Selector::parse(&bad, "s").is_err());
}

#[test]
fn implicit_policy_types() {
    // Egress rules present, no policyTypes: both directions isolated.
    let (set, errors) = one(json!({"podSelector": {"matchLabels": {"app": "web"}},
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]}));
    assert!(errors.is_empty());
    assert!(
        !set.allows(&pb(), &pa(), 80, Protocol::Tcp),
        "ingress isolated"
    );
    assert!(set.allows(&pa(), &pb(), 80, Protocol::Tcp));
    assert!(!set.allows(&pa(), &Endpoint::Ip(ip("1.1.1.1")), 80, Protocol::Tcp));
    // Empty egress list: ingress only.
    let (set, _) = one(json!({"podSelector": {}, "egress": []}));
    assert!(set.allows(&pa(), &Endpoint::Ip(ip("1.1.1.1")), 80, Protocol::Tcp));
    assert!(!set.allows(&Endpoint::Ip(ip("1.1.1.1")), &pa(), 80, Protocol::Tcp));
}

#[test]
fn empty_from_and_ports_allow_all() {
    let (set, _) = one(json!({"podSelector": {}, "ingress": [{"from": [], "ports": []}]}));
    assert!(set.allows(&Endpoint::Ip(ip("192.0.2.1")), &pa(), 1, Protocol::Sctp));
    let (set, _) = one(json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}));
    assert!(set.allows(&pb(), &pa(), 12345, Protocol::Udp));
    assert!(!set.allows(&pb(), &pa(), 12345, Protocol::Tcp));
}

#[test]
fn outside_endpoints_check_only_the_pod_side() {
    let (set, _) = one(json!({"podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]}]}));
    let out = |s: &str| Endpoint::Ip(ip(s));
    assert!(set.allows(&out("192.0.2.5"), &pa(), 80, Protocol::Tcp));
    assert!(!set.allows(&out("192.0.2.200"), &pa(), 80, Protocol::Tcp));
    assert!(!set.allows(&out("198.51.100.1"), &pa(), 80, Protocol::Tcp));
    assert!(set.allows(&out("198.51.100.1"), &pb(), 80, Protocol::Tcp));
    assert!(set.allows(&pa(), &out("198.51.100.1"), 80, Protocol::Tcp));
    // A pod's IP means the pod: x/b is not in the ipBlock.
    assert!(!set.allows(&out("10.0.1.2"), &pa(), 80, Protocol::Tcp));
}

#[test]
fn named_port_resolves_per_destination_pod() {
    let (set, _) = one(json!({"podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}));
    assert!(set.allows(&pb(), &pa(), 8080, Protocol::Tcp));
    assert!(!set.allows(&pb(), &pa(), 9090, Protocol::Tcp));
    assert!(set.allows(&pa(), &pb(), 9090, Protocol::Tcp));
    assert!(!set.allows(&pa(), &pb(), 8080, Protocol::Tcp));
    assert!(set.allows(&pb(), &pa(), 53, Protocol::Udp));
    assert!(!set.allows(&pb(), &pa(), 53, Protocol::Tcp));
    // No named port matches a non-pod destination.
    assert!(!set.allows(&pa(), &Endpoint::Ip(ip("192.0.2.1")), 8080, Protocol::Tcp));
}

#[test]
fn namespace_selector_by_name_label_without_namespace_object() {
    let (pods, _) = two_pods();
    let extra = pod("w", "q", json!({}), "10.9.0.1", json!([]));
    let all = [pods, vec![extra]].concat();
    let np = policy(
        "x",
        "p",
        json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "w"}}}]}]}),
    );
    let (set, errors) = PolicySet::build(&[np], &all, &[]);
    assert!(errors.is_empty());
    let q = Endpoint::Pod(PodKey::new("w", "q"));
    assert!(set.allows(&q, &pa(), 80, Protocol::Tcp));
    assert!(!set.allows(&pb(), &pa(), 80, Protocol::Tcp));
}

#[test]
fn validation_errors_name_the_field() {
    let cases = [
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            json!({"egress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "spec.egress[0].ports[0].endPort",
        ),
        (
            json!({"egress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
            "spec.egress[0].ports[0].endPort",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 0}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"from": [{}]}]}),
            "spec.ingress[0].from[0]",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["v"]}]}}),
            "spec.podSelector.matchExpressions[0].values",
        ),
        (json!({"policyTypes": ["Sideways"]}), "spec.policyTypes[0]"),
    ];
    for (spec, want) in cases {
        let (_, errors) = one(spec.clone());
        assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
        let field = match &errors[0] {
            PolicyError::InvalidCidr { field, .. }
            | PolicyError::UnknownProtocol { field, .. }
            | PolicyError::BadSelector { field, .. }
            | PolicyError::InvalidPort { field, .. }
            | PolicyError::Invalid { field, .. } => field,
        };
        assert_eq!(field, want, "{spec}");
    }
}

#[test]
fn bad_pod_selector_fails_closed_for_whole_namespace() {
    let (set, errors) = one(
        json!({"podSelector": {"matchExpressions": [{"key": "k", "operator": "Bogus"}]},
        "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}),
    );
    assert_eq!(errors.len(), 1);
    assert!(!set.allows(&pa(), &pb(), 80, Protocol::Tcp));
    assert!(!set.allows(&Endpoint::Ip(ip("192.0.2.1")), &pb(), 80, Protocol::Tcp));
    assert!(!set.allows(&pa(), &Endpoint::Ip(ip("192.0.2.1")), 80, Protocol::Tcp));
    assert!(set.policies()[0].policy.failed_closed);
}

#[test]
fn ipv6_ip_block() {
    let (pods, nss) = two_pods();
    let v6 = pod("x", "c", json!({}), "fd00::3", json!([]));
    let all = [pods, vec![v6]].concat();
    let np = policy(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/64", "except": ["fd00::/126"]}}]}]}),
    );
    let (set, errors) = PolicySet::build(&[np], &all, &nss);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!set.allows(
        &Endpoint::Pod(PodKey::new("x", "c")),
        &pa(),
        80,
        Protocol::Tcp
    ));
    assert!(set.allows(&Endpoint::Ip(ip("fd00::10")), &pa(), 80, Protocol::Tcp));
}

#[test]
fn matrix_print_format() {
    let set = build(&[policy("x", "deny", json!({"podSelector": {}}))]);
    let keys = vec![PodKey::new("x", "a"), PodKey::new("y", "a")];
    let m = format_matrix(
        &set.truth_table(&keys, &[80], &[Protocol::Tcp]),
        80,
        Protocol::Tcp,
    );
    assert_eq!(m, "TCP/80\n-\tx/a\ty/a\nx/a\t.\t.\ny/a\tX\t.\n");
}

#[test]
fn ip_block_host_bits_are_masked_like_the_api_server() {
    let (set, errors) = one(json!({"podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.77/24", "except": ["192.0.2.1/32"]}}]}]}));
    assert!(errors.is_empty(), "{errors:?}");
    assert!(set.allows(&Endpoint::Ip(ip("192.0.2.5")), &pa(), 80, Protocol::Tcp));
    assert!(!set.allows(&Endpoint::Ip(ip("192.0.2.1")), &pa(), 80, Protocol::Tcp));
}

#[test]
fn host_network_pods_are_outside() {
    let (mut pods, nss) = two_pods();
    let mut host: Pod = pod("x", "h", json!({"app": "web"}), "172.16.0.1", json!([]));
    if let Some(spec) = host.spec.as_mut() {
        spec.host_network = Some(true);
    }
    pods.push(host);
    let np = policy("x", "p", json!({"podSelector": {}}));
    let (set, _) = PolicySet::build(&[np], &pods, &nss);
    let h = Endpoint::Ip(ip("172.16.0.1"));
    // Not selected by the policy: its own traffic is unaffected; its IP is an outside IP.
    assert!(set.allows(&pa(), &h, 80, Protocol::Tcp));
    assert!(!set.allows(&h, &pa(), 80, Protocol::Tcp));
}

fn sc_pod_selector_in_all_namespaces() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "b-anywhere",
        json!({"podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {},
                                   "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]
}

#[test]
fn tt_pod_selector_in_all_namespaces() {
    let set = build(&sc_pod_selector_in_all_namespaces());
    check(&set, |s, d, _, _| d.namespace != "x" || s.name == "b");
}

#[test]
fn explicit_policy_types_ignore_other_direction_rules() {
    // policyTypes [Ingress] with egress rules: egress is not isolated.
    let (set, errors) = one(json!({"podSelector": {}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}]}));
    assert!(errors.is_empty());
    assert!(set.allows(&pa(), &Endpoint::Ip(ip("198.51.100.1")), 80, Protocol::Tcp));
    assert!(set.allows(&pb(), &pa(), 80, Protocol::Tcp));
    assert!(!set.allows(&pa(), &pb(), 80, Protocol::Tcp));
}
