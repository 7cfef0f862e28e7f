//! Host-gw pod routes (`--route-pod-cidrs`) installed by weir-proxy in a node namespace
//! from Node objects: added, changed, removed with the Nodes, and repaired when deleted
//! behind weir's back; this node's own pod CIDRs written for weir-cni
//! (`--cni-pod-cidrs-file`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;
use weir_e2e::{
    require_privileges, start_proxy_with, wait_until, write_file_atomically, write_manifests,
    Netns, Topology,
};

fn routes(node: &Netns) -> Vec<String> {
    let out = node.exec(&["ip", "route", "show", "proto", "77"]).unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

fn other_nodes(n3_cidr: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node2}}\nspec: {{podCIDR: 10.244.2.0/24, podCIDRs: [10.244.2.0/24]}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.77.11}}]}}\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: node3}}\nspec: {{podCIDRs: [{n3_cidr}]}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.77.12}}]}}\n"
    )
}

#[test]
fn pod_routes_follow_the_node_objects_and_are_repaired() {
    if !require_privileges() {
        return;
    }
    let mut topo = Topology::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_manifests(dir.path(), "").unwrap();
    // This node's own Node object, with its pod CIDR (written for weir-cni too).
    write_file_atomically(
        dir.path(),
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec: {podCIDRs: [10.244.1.0/24, 'fd00:10:244:1::/64']}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.10}]}\n",
    )
    .unwrap();
    write_file_atomically(dir.path(), "nodes.yaml", &other_nodes("10.244.3.0/24")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let cidrs_file = state.path().join("pod-cidrs.json");
    let cidrs_arg = cidrs_file.display().to_string();
    start_proxy_with(
        &mut topo.node,
        dir.path(),
        19310,
        &[
            "--route-pod-cidrs",
            "--sync-period",
            "2s",
            "--full-sync-period",
            "2s",
            "--cni-pod-cidrs-file",
            &cidrs_arg,
        ],
    )
    .unwrap();
    wait_until(
        "pod CIDRs written for weir-cni",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&cidrs_file)
                .is_ok_and(|t| t == r#"{"podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64"]}"#)
        },
    )
    .unwrap();
    let want = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let node = &topo.node;
    wait_until("routes to node2 and node3", Duration::from_secs(10), || {
        routes(node)
            == want(&[
                "10.244.2.0/24 via 192.168.77.11",
                "10.244.3.0/24 via 192.168.77.12",
            ])
    })
    .unwrap();
    // The route to this node's own CIDR is never installed, and no route of another
    // protocol was touched: the connected route of eth0 is still there.
    let all = node.exec(&["ip", "route", "show"]).unwrap();
    assert!(String::from_utf8_lossy(&all.stdout).contains("192.168.77.0/24 dev eth0"));

    // node3's CIDR changes.
    write_file_atomically(dir.path(), "nodes.yaml", &other_nodes("10.244.30.0/24")).unwrap();
    wait_until("node3's new CIDR", Duration::from_secs(10), || {
        routes(node)
            == want(&[
                "10.244.2.0/24 via 192.168.77.11",
                "10.244.30.0/24 via 192.168.77.12",
            ])
    })
    .unwrap();

    // Someone deletes a route: the next full sync puts it back.
    node.exec(&["ip", "route", "del", "10.244.2.0/24"]).unwrap();
    wait_until(
        "the deleted route is repaired",
        Duration::from_secs(10),
        || routes(node).contains(&"10.244.2.0/24 via 192.168.77.11".to_owned()),
    )
    .unwrap();

    // The other nodes go away: so do their routes.
    std::fs::remove_file(dir.path().join("nodes.yaml")).unwrap();
    wait_until("routes removed", Duration::from_secs(10), || {
        routes(node).is_empty()
    })
    .unwrap();
}
