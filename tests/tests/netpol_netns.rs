//! NetworkPolicy with real packets, the upstream e2e way ([`weir_e2e::netpol`]): a node
//! namespace running weir-proxy with its policy controller, namespaces x, y, z with pods
//! a, b, c attached by weir-cni, every pod serving TCP and UDP on 80 and 81. Each scenario
//! writes its NetworkPolicies, waits for a policy sync, and compares the full probed
//! matrix (9 × 9 pairs × {80, 81} × {TCP, UDP}) with an expectation written by hand, which
//! must also agree with weir's own policy model. Each test builds its own cluster; every
//! namespace goes with it, also on panic.
//!
//! Two tests prove the harness without any policy controller: every pair is reachable
//! with no policy, and the prober sees exactly the pairs a hand-written nft rule drops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use weir_e2e::netpol::{Expectation, Peer, PolicyCluster, Reachability};
use weir_e2e::require_privileges;
use weir_proxy::policy::{PolicyError, Protocol};

/// weir-proxy's metrics port inside each test's node namespace.
const METRICS: u16 = 19470;

fn cluster() -> Option<PolicyCluster> {
    if !require_privileges() {
        return None;
    }
    Some(PolicyCluster::new(METRICS).expect("the x/y/z cluster"))
}

/// A NetworkPolicy document: `spec` is the block under `spec:` (indented two spaces).
fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

fn apply(c: &mut PolicyCluster, policies: &str) -> Vec<PolicyError> {
    c.set_policies(policies).expect("policies written and synced")
}

fn verify(c: &PolicyCluster, expected: &Expectation) {
    if let Err(report) = c.check(expected) {
        panic!("{report}");
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

#[test]
fn no_policy_allows_every_pair_on_every_port_and_protocol() {
    let Some(c) = cluster() else { return };
    let started = Instant::now();
    verify(&c, &Expectation::all_allowed());
    eprintln!("model check and full matrix probe took {:?}", started.elapsed());
}

#[test]
fn prober_sees_exactly_the_pairs_a_hand_written_nft_rule_drops() {
    let Some(c) = cluster() else { return };
    // Harness check, independent of weir's policy controller: a table of our own in the
    // node drops x/a -> y/b TCP 80 and y/c -> z/a UDP 81, nothing else.
    let rules = format!(
        "table ip weir_e2e_probe_check {{\n  chain forward {{\n    type filter hook forward priority -10; policy accept;\n    ip saddr {} ip daddr {} tcp dport 80 drop\n    ip saddr {} ip daddr {} udp dport 81 drop\n  }}\n}}\n",
        c.ip("x/a"),
        c.ip("y/b"),
        c.ip("y/c"),
        c.ip("z/a"),
    );
    let file = c.manifest_dir().join("probe-check.nft");
    std::fs::write(&file, rules).unwrap();
    c.node
        .exec(&["nft", "-f", &file.to_string_lossy()])
        .expect("nft -f");
    let expected = Expectation::each(|port, proto| {
        let mut r = Reachability::new(true);
        match (port, proto) {
            (80, Protocol::Tcp) => r.expect("x/a", "y/b", false),
            (81, Protocol::Udp) => r.expect("y/c", "z/a", false),
            _ => &mut r,
        };
        r
    });
    let started = Instant::now();
    let observed = c.probe_matrix().unwrap();
    let took = started.elapsed();
    if let Some(d) = expected.diff(&observed, "observed") {
        panic!("the prober does not see exactly the nft drops:{d}");
    }
    // 324 probes, two of them timing out: one timeout's worth, not a sequence of them.
    assert!(took < Duration::from_secs(5), "full matrix took {took:?}");
    eprintln!("full matrix probe took {took:?}");
    // And the harness's failure print-out names the mismatch.
    let d = Expectation::all_allowed()
        .diff(&observed, "observed")
        .expect("a drop is a mismatch");
    assert!(d.contains("TCP/80") && d.contains("UDP/81"), "{d}");
}

#[test]
fn default_deny_ingress_in_x_blocks_everything_into_x() {
    let Some(mut c) = cluster() else { return };
    let errors = apply(
        &mut c,
        &policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    );
    assert!(errors.is_empty(), "{errors:?}");
    let mut r = Reachability::new(true);
    r.expect_peer(Peer::any(), Peer::ns("x"), false);
    verify(&c, &Expectation::same(&r));
}

#[test]
fn default_deny_egress_in_x_blocks_tcp_and_udp_out_of_x() {
    let Some(mut c) = cluster() else { return };
    apply(
        &mut c,
        &policy(
            "x",
            "deny-egress",
            "  podSelector: {}\n  policyTypes: [Egress]\n",
        ),
    );
    let mut r = Reachability::new(true);
    r.expect_peer(Peer::ns("x"), Peer::any(), false);
    verify(&c, &Expectation::same(&r));
}

#[test]
fn allow_from_same_namespace_only() {
    let Some(mut c) = cluster() else { return };
    apply(
        &mut c,
        &policy(
            "x",
            "allow-same-ns",
            "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n",
        ),
    );
    let mut r = Reachability::new(true);
    r.expect_peer(Peer::any(), Peer::ns("x"), false);
    r.expect_peer(Peer::ns("x"), Peer::ns("x"), true);
    verify(&c, &Expectation::same(&r));
}

#[test]
fn allow_from_a_namespace_by_label() {
    let Some(mut c) = cluster() else { return };
    apply(
        &mut c,
        &policy(
            "x",
            "allow-from-y",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n",
        ),
    );
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect_peer(Peer::ns("y"), Peer::pod("x/a"), true);
    verify(&c, &Expectation::same(&r));
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and_in_two_peers_is_or() {
    let Some(mut c) = cluster() else { return };
    let and = policy(
        "x",
        "selectors",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}\n      podSelector: {matchLabels: {pod: b}}\n",
    );
    apply(&mut c, &and);
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect("y/b", "x/a", true).expect("z/b", "x/a", true);
    verify(&c, &Expectation::same(&r));

    let or = policy(
        "x",
        "selectors",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}\n    - podSelector: {matchLabels: {pod: b}}\n",
    );
    apply(&mut c, &or);
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect_peer(Peer::ns("y"), Peer::pod("x/a"), true)
        .expect_peer(Peer::ns("z"), Peer::pod("x/a"), true)
        .expect("x/b", "x/a", true);
    verify(&c, &Expectation::same(&r));
}

#[test]
fn ip_block_with_except_on_ingress_and_egress() {
    let Some(mut c) = cluster() else { return };
    // x/a accepts the whole pod /24 except y/b's /32; y/c may send to the /24 except z/a.
    let ingress = policy(
        "x",
        "ipblock-ingress",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.244.1.0/24, except: [{}/32]}}\n",
            c.ip("y/b")
        ),
    );
    let egress = policy(
        "y",
        "ipblock-egress",
        &format!(
            "  podSelector: {{matchLabels: {{pod: c}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: 10.244.1.0/24, except: [{}/32]}}\n",
            c.ip("z/a")
        ),
    );
    apply(&mut c, &format!("{ingress}{egress}"));
    let mut r = Reachability::new(true);
    r.expect("y/b", "x/a", false).expect("y/c", "z/a", false);
    verify(&c, &Expectation::same(&r));
}

#[test]
fn named_ports_resolve_against_the_destination_pods_container_ports() {
    let Some(mut c) = cluster() else { return };
    let named = |port: &str, proto: &str| {
        policy(
            "x",
            "named-port",
            &format!(
                "  podSelector: {{}}\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n    ports:\n    - {{port: {port}{proto}}}\n"
            ),
        )
    };
    apply(&mut c, &named("serve-81-tcp", ""));
    verify(
        &c,
        &Expectation::each(|port, proto| {
            let mut r = Reachability::new(true);
            if (port, proto) != (81, Protocol::Tcp) {
                r.expect_peer(Peer::any(), Peer::ns("x"), false);
            }
            r
        }),
    );
    apply(&mut c, &named("serve-80-udp", ", protocol: UDP"));
    verify(
        &c,
        &Expectation::each(|port, proto| {
            let mut r = Reachability::new(true);
            if (port, proto) != (80, Protocol::Udp) {
                r.expect_peer(Peer::any(), Peer::ns("x"), false);
            }
            r
        }),
    );
}

#[test]
fn end_port_ranges_allow_exactly_the_ports_in_range() {
    let Some(mut c) = cluster() else { return };
    let range = |first: u16, last: u16| {
        policy(
            "x",
            "port-range",
            &format!(
                "  podSelector: {{}}\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n    ports:\n    - {{protocol: TCP, port: {first}, endPort: {last}}}\n"
            ),
        )
    };
    let only = |open: &'static [u16]| {
        Expectation::each(move |port, proto| {
            let mut r = Reachability::new(true);
            if proto != Protocol::Tcp || !open.contains(&port) {
                r.expect_peer(Peer::any(), Peer::ns("x"), false);
            }
            r
        })
    };
    apply(&mut c, &range(80, 81));
    verify(&c, &only(&[80, 81]));
    apply(&mut c, &range(81, 90));
    verify(&c, &only(&[81]));
}

#[test]
fn egress_to_a_cluster_ip_follows_the_policy_of_the_endpoint_after_dnat() {
    let Some(mut c) = cluster() else { return };
    const CLUSTER_IP: &str = "10.96.0.50";
    let services = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-c, namespace: z}}\nspec:\n  clusterIP: {CLUSTER_IP}\n  ports:\n  - {{name: web, protocol: TCP, port: 80, targetPort: 80}}\n  - {{name: alt, protocol: TCP, port: 8081, targetPort: 81}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-c-1, namespace: z, labels: {{kubernetes.io/service-name: svc-c}}}}\naddressType: IPv4\nports: [{{name: web, protocol: TCP, port: 80}}, {{name: alt, protocol: TCP, port: 81}}]\nendpoints:\n- {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: true}}}}\n",
        c.ip("z/c"),
        weir_e2e::NODE_NAME
    );
    c.set_services(&services).unwrap();
    let via_service = |c: &PolicyCluster| {
        c.probe_from(
            "x/a",
            &[
                (Protocol::Tcp, addr(CLUSTER_IP, 80)),
                (Protocol::Tcp, addr(CLUSTER_IP, 8081)),
            ],
        )
        .unwrap()
        .into_iter()
        .map(|r| r.outcome)
        .collect::<Vec<_>>()
    };
    let answered = Ok("z/c".to_owned());
    let blocked = Err("timeout".to_owned());
    // Without policy both Service ports reach z/c (the harness's ClusterIP path works).
    assert_eq!(
        via_service(&c),
        vec![answered.clone(), answered.clone()],
        "no policy"
    );

    let egress_to_zc = |port: u16| {
        policy(
            "x",
            "egress-to-zc",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {{matchLabels: {{ns: z}}}}\n      podSelector: {{matchLabels: {{pod: c}}}}\n    ports: [{{protocol: TCP, port: {port}}}]\n"
            ),
        )
    };
    let expect_only_zc = |open: u16| {
        Expectation::each(move |port, proto| {
            let mut r = Reachability::new(true);
            r.expect_all_egress("x/a", false);
            if (port, proto) == (open, Protocol::Tcp) {
                r.expect("x/a", "z/c", true);
            }
            r
        })
    };
    // Egress allows z/c:80: the ClusterIP port 80 (-> 80) passes, 8081 (-> 81) does not;
    // no rule names the ClusterIP itself, so the verdict is the endpoint's after DNAT.
    apply(&mut c, &egress_to_zc(80));
    verify(&c, &expect_only_zc(80));
    assert_eq!(
        via_service(&c),
        vec![answered.clone(), blocked.clone()],
        "egress allows z/c TCP 80"
    );
    apply(&mut c, &egress_to_zc(81));
    verify(&c, &expect_only_zc(81));
    assert_eq!(
        via_service(&c),
        vec![blocked, answered],
        "egress allows z/c TCP 81"
    );
}

#[test]
fn policy_updates_keep_a_held_connection_and_deletion_allows_everything_again() {
    let Some(mut c) = cluster() else { return };
    let to = addr(c.ip("y/b"), 80);
    let held = c.hold("x/a", to, 12_000).expect("held connection x/a -> y/b:80");
    let started = Instant::now();

    // Deny all ingress into y: new connections into y are blocked, the held one is
    // established (conntrack) and keeps working.
    apply(
        &mut c,
        &policy(
            "y",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
    );
    let mut r = Reachability::new(true);
    r.expect_peer(Peer::any(), Peer::ns("y"), false);
    verify(&c, &Expectation::same(&r));

    // Updated in place: x may reach y on TCP 81 only.
    apply(
        &mut c,
        &policy(
            "y",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: x}}\n    ports: [{protocol: TCP, port: 81}]\n",
        ),
    );
    verify(
        &c,
        &Expectation::each(|port, proto| {
            let mut r = Reachability::new(true);
            r.expect_peer(Peer::any(), Peer::ns("y"), false);
            if (port, proto) == (81, Protocol::Tcp) {
                r.expect_peer(Peer::ns("x"), Peer::ns("y"), true);
            }
            r
        }),
    );

    // Deleted: everything is allowed again.
    apply(&mut c, "");
    verify(&c, &Expectation::all_allowed());

    let during = started.elapsed();
    let report = held.finish().unwrap();
    assert!(
        during < Duration::from_secs(12),
        "the policy changes ({during:?}) outlasted the held connection; lengthen the hold"
    );
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "the held connection broke: {report}"
    );
    assert!(
        report["answers"]["y/b"].as_u64().unwrap_or(0) >= 60,
        "the held connection went quiet: {report}"
    );
}

#[test]
fn invalid_cidr_or_unknown_protocol_fails_closed_for_the_selected_pods() {
    let Some(mut c) = cluster() else { return };
    // bad-cidr would open x/a to everything if only its broken except were dropped;
    // bad-protocol would open y/b's egress if only its broken port were dropped. Both are
    // skipped as a whole and only isolate the pods they select; allow-from-y still counts.
    let policies = [
        policy(
            "x",
            "bad-cidr",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - ipBlock: {cidr: 0.0.0.0/0, except: [10.244.1.0/33]}\n",
        ),
        policy(
            "x",
            "allow-from-y",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n",
        ),
        policy(
            "y",
            "bad-protocol",
            "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{protocol: ICMP, port: 80}]\n",
        ),
    ]
    .concat();
    let errors = apply(&mut c, &policies);
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, PolicyError::InvalidCidr { .. })),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, PolicyError::UnknownProtocol { .. })),
        "{errors:?}"
    );
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false)
        .expect_peer(Peer::ns("y"), Peer::pod("x/a"), true)
        .expect_all_egress("y/b", false);
    verify(&c, &Expectation::same(&r));
}
