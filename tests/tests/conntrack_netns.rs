//! Stale UDP conntrack entries deleted over ctnetlink, with real packets and without
//! weir-proxy: the node namespace DNATs with a plain `nft` table, the external client keeps
//! its source port across probes (one UDP flow), and `weir-probe conntrack-delete` runs
//! weir's `dataplane::conntrack` inside the node namespace. The `conntrack` CLI is used
//! only to look at the table.
//!
//! No proxy mode runs here: the suite tests the ctnetlink code itself against hand-written
//! NAT rules. What each mode does with a stale UDP flow through weir-proxy is tested in
//! both modes by node_netns (`udp_client_moves_off_a_removed_endpoint_keeping_its_source_port`:
//! nftables mode deletes the kernel's entries, eBPF mode its tc path's own) and by
//! ebpf_netns (connected sockets destroyed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::path::Path;
use weir_e2e::*;

/// Two pods (10.244.1.10 "pod-0", 10.244.1.11 "pod-1") answering UDP on 5353.
fn setup() -> Option<Topology> {
    if !require_privileges() {
        return None;
    }
    let mut topo = Topology::new(2).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..2 {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    Some(topo)
}

/// Replaces the node's test table with a nat prerouting chain of `rules`, atomically.
fn nat_rules(node: &Netns, rules: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rules.nft");
    let body: String = rules.iter().map(|r| format!("    {r}\n")).collect();
    std::fs::write(
        &path,
        format!(
            "table ip weirct {{}}\ndelete table ip weirct\ntable ip weirct {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{body}  }}\n}}\n"
        ),
    )
    .expect("write rules");
    node.exec(&["nft", "-f", &path.to_string_lossy()])
        .expect("nft -f");
}

/// One UDP probe of `count` datagrams from the client, from `sport`.
fn udp(client: &Netns, dst: &str, sport: u16, count: u32) -> Value {
    probe(
        client,
        &[
            "udp",
            dst,
            &count.to_string(),
            "--source-port",
            &sport.to_string(),
        ],
    )
    .unwrap()
}

fn answered(report: &Value, name: &str) -> u64 {
    report["answers"][name].as_u64().unwrap_or(0)
}

/// Runs `weir-probe conntrack-delete ARGS` in `ns`; returns how many entries it deleted.
fn conntrack_delete(ns: &Netns, args: &[&str]) -> u64 {
    let bin = env!("CARGO_BIN_EXE_weir-probe");
    let mut cmd = vec![bin, "conntrack-delete"];
    cmd.extend_from_slice(args);
    let out = ns.exec(&cmd).expect("weir-probe conntrack-delete");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap();
    report["deleted"].as_u64().expect("deleted count")
}

#[test]
fn stale_udp_flow_to_a_removed_endpoint_is_deleted_and_other_flows_kept() {
    let Some(topo) = setup() else { return };
    let (client, node) = (&topo.client, &topo.node);
    nat_rules(
        node,
        &[
            "ip daddr 10.96.0.53 udp dport 53 dnat to 10.244.1.10:5353",
            "ip daddr 10.96.0.54 udp dport 53 dnat to 10.244.1.10:5353",
        ],
    );
    let r = udp(client, "10.96.0.53:53", 40053, 3);
    assert_eq!(answered(&r, "pod-0"), 3, "{r}");
    let r = udp(client, "10.96.0.54:53", 40054, 1);
    assert_eq!(answered(&r, "pod-0"), 1, "unrelated flow: {r}");
    let stale = udp_conntrack_entries(node, 53, 40053);
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert!(
        stale[0].contains("dst=10.96.0.53") && stale[0].contains("src=10.244.1.10 "),
        "{stale:?}"
    );

    // Endpoint pod-0 goes away from 10.96.0.53: the rule now DNATs to pod-1.
    nat_rules(
        node,
        &[
            "ip daddr 10.96.0.53 udp dport 53 dnat to 10.244.1.11:5353",
            "ip daddr 10.96.0.54 udp dport 53 dnat to 10.244.1.10:5353",
        ],
    );
    let r = udp(client, "10.96.0.53:53", 40055, 1);
    assert_eq!(answered(&r, "pod-1"), 1, "a new flow follows the rule: {r}");
    let r = udp(client, "10.96.0.53:53", 40053, 2);
    assert_eq!(
        answered(&r, "pod-0"),
        2,
        "the old flow is stuck on its entry: {r}"
    );

    let deleted = conntrack_delete(
        node,
        &[
            "--proto",
            "udp",
            "--orig-dst",
            "10.96.0.53",
            "--orig-dport",
            "53",
            "--reply-src",
            "10.244.1.10",
        ],
    );
    assert_eq!(deleted, 1);
    assert!(udp_conntrack_entries(node, 53, 40053).is_empty());

    let r = udp(client, "10.96.0.53:53", 40053, 2);
    assert_eq!(answered(&r, "pod-1"), 2, "same source port, now pod-1: {r}");
    let kept = udp_conntrack_entries(node, 53, 40054);
    assert_eq!(kept.len(), 1, "the other frontend's flow stays: {kept:?}");
    assert!(
        kept[0].contains("dst=10.96.0.54") && kept[0].contains("src=10.244.1.10 "),
        "{kept:?}"
    );
    let kept = udp_conntrack_entries(node, 53, 40055);
    assert_eq!(kept.len(), 1, "the flow to pod-1 stays: {kept:?}");
    let r = udp(client, "10.96.0.54:53", 40054, 1);
    assert_eq!(answered(&r, "pod-0"), 1, "{r}");
}

#[test]
fn first_endpoint_clears_nodeport_flows_tracked_before_the_dnat() {
    let Some(topo) = setup() else { return };
    let (client, node) = (&topo.client, &topo.node);
    // NodePort 30053 has no endpoint yet (no rule: the node itself refuses it); 30054 is
    // another service's NodePort.
    nat_rules(
        node,
        &["fib daddr type local udp dport 30054 dnat to 10.244.1.11:5353"],
    );
    let r = udp(client, "192.168.77.10:30053", 40053, 2);
    assert_eq!(r["errors"]["refused"].as_u64(), Some(2), "{r}");
    let r = udp(client, "192.168.77.10:30054", 40054, 1);
    assert_eq!(answered(&r, "pod-1"), 1, "{r}");
    let stale = udp_conntrack_entries(node, 30053, 40053);
    assert_eq!(stale.len(), 1, "tracked without DNAT: {stale:?}");
    assert!(stale[0].contains("src=192.168.77.10 "), "{stale:?}");

    // The service gets its first endpoint, pod-0.
    nat_rules(
        node,
        &[
            "fib daddr type local udp dport 30053 dnat to 10.244.1.10:5353",
            "fib daddr type local udp dport 30054 dnat to 10.244.1.11:5353",
        ],
    );
    let r = udp(client, "192.168.77.10:30053", 40053, 2);
    assert_eq!(
        r["errors"]["refused"].as_u64(),
        Some(2),
        "the old flow is stuck on its entry: {r}"
    );

    // (None, 30053) without reply_src: what filters_for_change gives a first endpoint.
    let deleted = conntrack_delete(node, &["--proto", "udp", "--orig-dport", "30053"]);
    assert_eq!(deleted, 1);

    let r = udp(client, "192.168.77.10:30053", 40053, 2);
    assert_eq!(answered(&r, "pod-0"), 2, "same source port, now pod-0: {r}");
    let kept = udp_conntrack_entries(node, 30054, 40054);
    assert_eq!(kept.len(), 1, "the other NodePort's flow stays: {kept:?}");
}
