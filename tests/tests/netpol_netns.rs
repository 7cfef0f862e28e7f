//! NetworkPolicy with real packets, the upstream e2e way ([`weir_e2e::netpol`]): a node
//! namespace running weir-proxy with its policy controller, namespaces x, y, z with pods
//! a, b, c attached by weir-cni, every pod serving TCP and UDP on 80 and 81. A scenario is
//! a list of steps; each step writes its NetworkPolicies, waits for a policy sync, and
//! compares the full probed matrix (9 × 9 pairs × {80, 81} × {TCP, UDP}) with an
//! expectation written by hand, which must also agree with weir's own policy model
//! (`every_scenario_agrees_with_weirs_policy_model` checks that for all scenarios without
//! root). Each netns test builds its own cluster; every namespace goes with it, also on
//! panic.
//!
//! Two tests prove the harness without any policy controller: every pair is reachable
//! with no policy, and the prober sees exactly the pairs a hand-written nft rule drops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use weir_e2e::netpol::{Expectation, Peer, PodIps, PolicyCluster, Reachability, Step};
use weir_e2e::require_privileges;
use weir_proxy::policy::Protocol;

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

fn step(c: &mut PolicyCluster, s: &Step) {
    if let Err(report) = c.run_step(s) {
        panic!("{report}");
    }
}

/// Runs every step of `scenario` on a fresh cluster.
fn run(scenario: Scenario) {
    let Some(mut c) = cluster() else { return };
    for s in scenario(&c.ips()) {
        step(&mut c, &s);
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

// ---- Scenarios: policies and hand-written expectations, given the pods' addresses. ----

fn default_deny_ingress_in_x(_: &PodIps) -> Vec<Step> {
    let mut r = Reachability::new(true);
    r.expect_peer(Peer::any(), Peer::ns("x"), false);
    vec![Step::new(
        policy(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        ),
        Expectation::same(&r),
    )]
}

fn default_deny_egress_in_x(_: &PodIps) -> Vec<Step> {
    let mut r = Reachability::new(true);
    r.expect_peer(Peer::ns("x"), Peer::any(), false);
    vec![Step::new(
        policy(
            "x",
            "deny-egress",
            "  podSelector: {}\n  policyTypes: [Egress]\n",
        ),
        Expectation::same(&r),
    )]
}

fn allow_from_same_namespace(_: &PodIps) -> Vec<Step> {
    let mut r = Reachability::new(true);
    r.expect_peer(Peer::any(), Peer::ns("x"), false);
    r.expect_peer(Peer::ns("x"), Peer::ns("x"), true);
    vec![Step::new(
        policy(
            "x",
            "allow-same-ns",
            "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n",
        ),
        Expectation::same(&r),
    )]
}

fn allow_from_namespace_by_label(_: &PodIps) -> Vec<Step> {
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    r.expect_peer(Peer::ns("y"), Peer::pod("x/a"), true);
    vec![Step::new(
        policy(
            "x",
            "allow-from-y",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n",
        ),
        Expectation::same(&r),
    )]
}

fn pod_and_namespace_selectors_and_vs_or(_: &PodIps) -> Vec<Step> {
    // One peer with both selectors: pods b of namespaces other than x.
    let and = policy(
        "x",
        "selectors",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}\n      podSelector: {matchLabels: {pod: b}}\n",
    );
    let mut r_and = Reachability::new(true);
    r_and.expect_all_ingress("x/a", false);
    r_and.expect("y/b", "x/a", true).expect("z/b", "x/a", true);
    // Two peers: every pod of y and z, or pod b of x (a podSelector alone is the policy's
    // own namespace).
    let or = policy(
        "x",
        "selectors",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}\n    - podSelector: {matchLabels: {pod: b}}\n",
    );
    let mut r_or = Reachability::new(true);
    r_or.expect_all_ingress("x/a", false);
    r_or.expect_peer(Peer::ns("y"), Peer::pod("x/a"), true)
        .expect_peer(Peer::ns("z"), Peer::pod("x/a"), true)
        .expect("x/b", "x/a", true);
    vec![
        Step::new(and, Expectation::same(&r_and)),
        Step::new(or, Expectation::same(&r_or)),
    ]
}

fn ip_block_with_except(ips: &PodIps) -> Vec<Step> {
    // x/a accepts the whole pod /24 except y/b's /32; y/c may send to the /24 except z/a.
    let ingress = policy(
        "x",
        "ipblock-ingress",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.244.1.0/24, except: [{}/32]}}\n",
            ips.ip("y/b")
        ),
    );
    let egress = policy(
        "y",
        "ipblock-egress",
        &format!(
            "  podSelector: {{matchLabels: {{pod: c}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: 10.244.1.0/24, except: [{}/32]}}\n",
            ips.ip("z/a")
        ),
    );
    let mut r = Reachability::new(true);
    r.expect("y/b", "x/a", false).expect("y/c", "z/a", false);
    vec![Step::new(
        format!("{ingress}{egress}"),
        Expectation::same(&r),
    )]
}

/// Everything into x blocked except on `open` (port, protocol) cases.
fn into_x_only_on(open: &'static [(u16, Protocol)]) -> Expectation {
    Expectation::each(move |port, proto| {
        let mut r = Reachability::new(true);
        if !open.contains(&(port, proto)) {
            r.expect_peer(Peer::any(), Peer::ns("x"), false);
        }
        r
    })
}

fn named_ports(_: &PodIps) -> Vec<Step> {
    let named = |port: &str, proto: &str| {
        policy(
            "x",
            "named-port",
            &format!(
                "  podSelector: {{}}\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n    ports:\n    - {{port: {port}{proto}}}\n"
            ),
        )
    };
    vec![
        Step::new(
            named("serve-81-tcp", ""),
            into_x_only_on(&[(81, Protocol::Tcp)]),
        ),
        Step::new(
            named("serve-80-udp", ", protocol: UDP"),
            into_x_only_on(&[(80, Protocol::Udp)]),
        ),
    ]
}

fn end_port_ranges(_: &PodIps) -> Vec<Step> {
    let range = |first: u16, last: u16| {
        policy(
            "x",
            "port-range",
            &format!(
                "  podSelector: {{}}\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n    ports:\n    - {{protocol: TCP, port: {first}, endPort: {last}}}\n"
            ),
        )
    };
    vec![
        Step::new(
            range(80, 81),
            into_x_only_on(&[(80, Protocol::Tcp), (81, Protocol::Tcp)]),
        ),
        Step::new(range(81, 90), into_x_only_on(&[(81, Protocol::Tcp)])),
    ]
}

/// x/a may send only to z/c on TCP `port`, x/a's other traffic out is blocked.
fn egress_only_to_zc(port: u16) -> Step {
    Step::new(
        policy(
            "x",
            "egress-to-zc",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {{matchLabels: {{ns: z}}}}\n      podSelector: {{matchLabels: {{pod: c}}}}\n    ports: [{{protocol: TCP, port: {port}}}]\n"
            ),
        ),
        Expectation::each(move |p, proto| {
            let mut r = Reachability::new(true);
            r.expect_all_egress("x/a", false);
            if (p, proto) == (port, Protocol::Tcp) {
                r.expect("x/a", "z/c", true);
            }
            r
        }),
    )
}

fn egress_to_endpoint_ports(_: &PodIps) -> Vec<Step> {
    vec![egress_only_to_zc(80), egress_only_to_zc(81)]
}

fn update_and_delete(_: &PodIps) -> Vec<Step> {
    let mut deny = Reachability::new(true);
    deny.expect_peer(Peer::any(), Peer::ns("y"), false);
    vec![
        // Deny all ingress into y.
        Step::new(
            policy("y", "ingress-y", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
            Expectation::same(&deny),
        ),
        // The same policy updated in place: x may reach y on TCP 81.
        Step::new(
            policy(
                "y",
                "ingress-y",
                "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: x}}\n    ports: [{protocol: TCP, port: 81}]\n",
            ),
            Expectation::each(|port, proto| {
                let mut r = Reachability::new(true);
                r.expect_peer(Peer::any(), Peer::ns("y"), false);
                if (port, proto) == (81, Protocol::Tcp) {
                    r.expect_peer(Peer::ns("x"), Peer::ns("y"), true);
                }
                r
            }),
        ),
        // Deleted: everything is allowed again.
        Step::new("", Expectation::all_allowed()),
    ]
}

fn invalid_policies_fail_closed(_: &PodIps) -> Vec<Step> {
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
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false)
        .expect_peer(Peer::ns("y"), Peer::pod("x/a"), true)
        .expect_all_egress("y/b", false);
    vec![Step {
        policies,
        expected: Expectation::same(&r),
        errors: vec!["invalid CIDR", "unknown protocol"],
    }]
}

/// A scenario: its steps, given the pods' addresses.
type Scenario = fn(&PodIps) -> Vec<Step>;

/// Every scenario, by name.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("default_deny_ingress_in_x", default_deny_ingress_in_x),
    ("default_deny_egress_in_x", default_deny_egress_in_x),
    ("allow_from_same_namespace", allow_from_same_namespace),
    (
        "allow_from_namespace_by_label",
        allow_from_namespace_by_label,
    ),
    (
        "pod_and_namespace_selectors_and_vs_or",
        pod_and_namespace_selectors_and_vs_or,
    ),
    ("ip_block_with_except", ip_block_with_except),
    ("named_ports", named_ports),
    ("end_port_ranges", end_port_ranges),
    ("egress_to_endpoint_ports", egress_to_endpoint_ports),
    ("update_and_delete", update_and_delete),
    ("invalid_policies_fail_closed", invalid_policies_fail_closed),
];

// ---- Tests ----

#[test]
fn every_scenario_agrees_with_weirs_policy_model() {
    // No root needed: catches a wrong hand-written expectation before any packet is sent.
    let ips = PodIps::fake();
    let mut failures = Vec::new();
    for (name, scenario) in SCENARIOS {
        for (i, s) in scenario(&ips).iter().enumerate() {
            if let Err(e) = s.check_model(&ips) {
                failures.push(format!("{name} step {i}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn no_policy_allows_every_pair_on_every_port_and_protocol() {
    let Some(c) = cluster() else { return };
    let started = Instant::now();
    if let Err(report) = c.check(&Expectation::all_allowed()) {
        panic!("{report}");
    }
    eprintln!(
        "model check and full matrix probe took {:?}",
        started.elapsed()
    );
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
    run(default_deny_ingress_in_x);
}

#[test]
fn default_deny_egress_in_x_blocks_tcp_and_udp_out_of_x() {
    run(default_deny_egress_in_x);
}

#[test]
fn allow_from_same_namespace_only() {
    run(allow_from_same_namespace);
}

#[test]
fn allow_from_a_namespace_by_label() {
    run(allow_from_namespace_by_label);
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and_in_two_peers_is_or() {
    run(pod_and_namespace_selectors_and_vs_or);
}

#[test]
fn ip_block_with_except_on_ingress_and_egress() {
    run(ip_block_with_except);
}

#[test]
fn named_ports_resolve_against_the_destination_pods_container_ports() {
    run(named_ports);
}

#[test]
fn end_port_ranges_allow_exactly_the_ports_in_range() {
    run(end_port_ranges);
}

#[test]
fn invalid_cidr_or_unknown_protocol_fails_closed_for_the_selected_pods() {
    run(invalid_policies_fail_closed);
}

#[test]
fn egress_to_a_cluster_ip_follows_the_policy_of_the_endpoint_after_dnat() {
    let Some(mut c) = cluster() else { return };
    const CLUSTER_IP: &str = "10.96.0.50";
    // Service z/svc-c: port 80 -> z/c:80, port 8081 -> z/c:81.
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
    // Egress allows only z/c TCP 80, then only 81. No rule names the ClusterIP: the
    // verdict is the endpoint's, after DNAT, on the endpoint's port.
    let [to_80, to_81]: [Step; 2] = egress_to_endpoint_ports(&c.ips()).try_into().unwrap();
    step(&mut c, &to_80);
    assert_eq!(
        via_service(&c),
        vec![answered.clone(), blocked.clone()],
        "egress allows z/c TCP 80"
    );
    step(&mut c, &to_81);
    assert_eq!(
        via_service(&c),
        vec![blocked, answered],
        "egress allows z/c TCP 81"
    );
}

#[test]
fn policy_updates_keep_a_held_connection_and_deletion_allows_everything_again() {
    let Some(mut c) = cluster() else { return };
    const HOLD: Duration = Duration::from_secs(15);
    let to = addr(c.ip("y/b"), 80);
    let held = c
        .hold("x/a", to, HOLD.as_millis() as u64)
        .expect("held connection x/a -> y/b:80");
    let started = Instant::now();
    // Ingress into y denied, then allowed from x on TCP 81 only, then deleted. The held
    // connection (TCP 80, established before) keeps working throughout, the way
    // conntrack-based CNIs behave; new connections follow each step's policy.
    for s in update_and_delete(&c.ips()) {
        step(&mut c, &s);
    }
    let during = started.elapsed();
    let report = held.finish().unwrap();
    assert!(
        during < HOLD,
        "the policy steps ({during:?}) outlasted the held connection; lengthen the hold"
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
fn held_connection_outlives_a_hand_written_drop_of_new_connections() {
    let Some(mut c) = cluster() else { return };
    // Harness check of the hold/conntrack mechanics, independent of weir's controller: a
    // rule of our own drops *new* connections to y/b TCP 80; the connection held from
    // before keeps answering while the prober sees exactly that column blocked.
    let to = addr(c.ip("y/b"), 80);
    let held = c
        .hold("x/a", to, 3_000)
        .expect("held connection x/a -> y/b:80");
    let rules = format!(
        "table ip weir_e2e_hold_check {{\n  chain forward {{\n    type filter hook forward priority -10; policy accept;\n    ct state new ip daddr {} tcp dport 80 drop\n  }}\n}}\n",
        c.ip("y/b")
    );
    let file = c.manifest_dir().join("hold-check.nft");
    std::fs::write(&file, rules).unwrap();
    c.node
        .exec(&["nft", "-f", &file.to_string_lossy()])
        .expect("nft -f");
    let expected = Expectation::each(|port, proto| {
        let mut r = Reachability::new(true);
        if (port, proto) == (80, Protocol::Tcp) {
            r.expect_all_ingress("y/b", false);
        }
        r
    });
    if let Err(report) = c.compare_probed(&expected) {
        panic!("{report}");
    }
    let report = held.finish().unwrap();
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(
        report["answers"]["y/b"].as_u64().unwrap_or(0) >= 20,
        "the held connection went quiet: {report}"
    );
}
