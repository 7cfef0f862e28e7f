//! Three nodes on one machine ([`weir_e2e::multinode`]): node namespaces 192.168.77.1-3 on
//! a bridge in a "fabric" namespace, each with its own weir-proxy (`--route-pod-cidrs`,
//! manifests listing all three Nodes) and pods attached by weir-cni from its
//! 10.244.N.0/24. Pods reach pods on other nodes through the host-gw routes, a ClusterIP
//! reaches endpoints on every node from every node, a NodePort answers on every node,
//! and `externalTrafficPolicy: Local` keeps each node's NodePort to its own endpoints
//! with the client's address preserved; each in nftables and eBPF mode (pods' and nodes'
//! own clients then run in their node's cgroup, which its socket hooks watch). Every
//! namespace goes with the cluster guard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use weir_e2e::mode::Mode;
use weir_e2e::multinode::{
    node_ip, pod_cidr, requests, service_yaml, Cluster, Pod, ECHO_PORT, EXTERNAL_CLIENT_IP,
};
use weir_e2e::{in_both_modes, require_privileges};

const METRICS: u16 = 19460;
const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;

/// The cluster with weir-echo in every pod and weir-proxy on every node in `mode` reading
/// `services(cluster)`; `None` when privileges are missing (outside CI).
fn cluster(mode: Mode, services: impl Fn(&Cluster) -> String) -> Option<Cluster> {
    if !require_privileges() {
        return None;
    }
    for bin in ["weir-cni", "weir-proxy", "weir-echo", "weir-probe"] {
        let p = weir_e2e::workspace_bin(bin);
        assert!(
            p.exists(),
            "{} is missing: cargo build --workspace --bins (cargo xtask test does)",
            p.display()
        );
    }
    let mut c = Cluster::new(NODES, PODS_PER_NODE).unwrap();
    c.start_echo().unwrap();
    c.write_manifests(&services(&c)).unwrap();
    c.start_proxies(METRICS, mode).unwrap();
    Some(c)
}

fn names<'a>(pods: impl Iterator<Item = &'a Pod>) -> BTreeSet<String> {
    pods.map(|p| p.name.clone()).collect()
}

in_both_modes!(pods_get_addresses_from_their_node_and_reach_pods_on_other_nodes);

fn pods_get_addresses_from_their_node_and_reach_pods_on_other_nodes(mode: Mode) {
    let Some(c) = cluster(mode, |_| String::new()) else {
        return;
    };
    for node in &c.nodes {
        // Each node routes the other two pod CIDRs via their nodes (start_proxies waited
        // for exactly these), and nothing for its own.
        assert_eq!(node.pod_routes().len(), NODES - 1, "{}", node.name());
        let own = pod_cidr(node.index);
        assert!(!node.pod_routes().iter().any(|r| r.starts_with(&own)));
        let prefix = format!("10.244.{}.", node.index);
        for pod in &node.pods {
            assert!(pod.ip.starts_with(&prefix), "{} got {}", pod.name, pod.ip);
        }
    }
    let ips: BTreeSet<&str> = c.pods().map(|p| p.ip.as_str()).collect();
    assert_eq!(ips.len(), NODES * PODS_PER_NODE, "duplicate pod addresses");

    // Every pod to the first pod of every other node: the named backend answers every
    // request and sees the sender's own pod address (no NAT between pods).
    for from in c.pods() {
        let home = &c.nodes[from.node - 1];
        for node in c.nodes.iter().filter(|n| n.index != from.node) {
            let to = &node.pods[0];
            let addr = format!("{}:{ECHO_PORT}", to.ip);
            let (answers, errors) = home.requests(&from.ns, &addr, 5).unwrap();
            assert_eq!(
                answers.get(&to.name),
                Some(&5),
                "{} -> {} ({addr}): answers {answers:?}, errors {errors:?}",
                from.name,
                to.name
            );
            assert_eq!(home.peer(&from.ns, &addr).unwrap(), from.ip);
        }
    }
}

in_both_modes!(a_cluster_ip_reaches_endpoints_on_every_node_from_every_node);

fn a_cluster_ip_reaches_endpoints_on_every_node_from_every_node(mode: Mode) {
    let Some(c) = cluster(mode, |c| {
        let all: Vec<&Pod> = c.pods().collect();
        let remote: Vec<&Pod> = c.pods().filter(|p| p.node != 1).collect();
        service_yaml("web", "10.96.0.10", None, false, &all)
            + &service_yaml("remote", "10.96.0.11", None, false, &remote)
    }) else {
        return;
    };
    let all = names(c.pods());
    for node in &c.nodes {
        for pod in &node.pods {
            let (answers, errors) = node.requests(&pod.ns, "10.96.0.10:80", 120).unwrap();
            assert!(errors.is_empty(), "{}: errors {errors:?}", pod.name);
            assert_eq!(
                answers.keys().cloned().collect::<BTreeSet<_>>(),
                all,
                "{} -> 10.96.0.10:80 should reach the endpoints on every node",
                pod.name
            );
            assert_eq!(answers.values().sum::<u64>(), 120);
        }
    }
    // A backend on another node sees the calling pod's address: ClusterIP traffic from
    // inside --cluster-cidr is not masqueraded, and the return path is the host-gw route.
    // (Service `remote` has endpoints on node2 and node3 only; a pod reaching itself
    // through a ClusterIP is hairpin-masqueraded.)
    let from = &c.nodes[0].pods[0];
    let seen: BTreeSet<String> = (0..20)
        .map(|_| c.nodes[0].peer(&from.ns, "10.96.0.11:80").unwrap())
        .collect();
    assert_eq!(seen, BTreeSet::from([from.ip.clone()]));
}

in_both_modes!(a_node_port_answers_on_every_node_with_endpoints_on_every_node);

fn a_node_port_answers_on_every_node_with_endpoints_on_every_node(mode: Mode) {
    let Some(c) = cluster(mode, |c| {
        let all: Vec<&Pod> = c.pods().collect();
        service_yaml("np", "10.96.0.20", Some(30080), false, &all)
    }) else {
        return;
    };
    let all = names(c.pods());
    for node in &c.nodes {
        let addr = format!("{}:30080", node.ip());
        let (answers, errors) = requests(&c.client, &addr, 120).unwrap();
        assert!(errors.is_empty(), "client -> {addr}: errors {errors:?}");
        assert_eq!(
            answers.keys().cloned().collect::<BTreeSet<_>>(),
            all,
            "client -> {addr} should reach the endpoints on every node"
        );
    }
}

in_both_modes!(external_traffic_policy_local_keeps_each_node_port_to_its_own_endpoints);

fn external_traffic_policy_local_keeps_each_node_port_to_its_own_endpoints(mode: Mode) {
    // Endpoints on node1 and node2 only; node3 has none of its own.
    let Some(c) = cluster(mode, |c| {
        let eps: Vec<&Pod> = c.pods().filter(|p| p.node != 3).collect();
        service_yaml("local", "10.96.0.30", Some(30090), true, &eps)
    }) else {
        return;
    };
    for node in c.nodes.iter().filter(|n| n.index != 3) {
        let addr = format!("{}:30090", node.ip());
        let (answers, errors) = requests(&c.client, &addr, 60).unwrap();
        assert!(errors.is_empty(), "client -> {addr}: errors {errors:?}");
        assert_eq!(
            answers.keys().cloned().collect::<BTreeSet<_>>(),
            names(node.pods.iter()),
            "client -> {addr} must reach only {}'s endpoints",
            node.name()
        );
        // The source is preserved: the endpoint sees the client's own address.
        for _ in 0..5 {
            assert_eq!(
                weir_e2e::multinode::peer(&c.client, &addr).unwrap(),
                EXTERNAL_CLIENT_IP,
                "{addr}"
            );
        }
    }
    // node3 has no local endpoint: its NodePort answers nothing, although the Service has
    // endpoints elsewhere.
    let addr = format!("{}:30090", node_ip(3));
    let (answers, errors) = requests(&c.client, &addr, 2).unwrap();
    assert!(answers.is_empty(), "client -> {addr}: {answers:?}");
    assert_eq!(errors.values().sum::<u64>(), 2, "{errors:?}");
    // Traffic from inside the cluster is not external: node3's pods reach the endpoints on
    // node1 and node2 through the ClusterIP.
    let from = &c.nodes[2].pods[0];
    let (answers, errors) = c.nodes[2].requests(&from.ns, "10.96.0.30:80", 120).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        answers.keys().cloned().collect::<BTreeSet<_>>(),
        names(c.pods().filter(|p| p.node != 3))
    );
}
