//! `cargo xtask demo --nodes N`: N nodes on one machine ([`weir_e2e::multinode`]), each a
//! network namespace on a bridge with its own weir-proxy and pods attached by weir-cni;
//! host-gw routes between the nodes' pod CIDRs, then traffic pod to pod across nodes,
//! through a ClusterIP, a NodePort and an `externalTrafficPolicy: Local` NodePort.

use crate::terminal::{say, share_table_for};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use weir_e2e::multinode::{
    node_ip, peer, pod_cidr, requests, service_yaml, Cluster, Pod, ECHO_PORT, EXTERNAL_CLIENT_IP,
};
use weir_e2e::probe;

const METRICS: u16 = 10249;
const PODS_PER_NODE: usize = 2;

/// Runs the multi-node demo with `nodes` nodes.
pub fn run(nodes: usize) -> Result<()> {
    say(&format!(
        "creating {nodes} node namespaces on bridge br0 (its own \"fabric\" namespace), nodes 192.168.77.1-{nodes}, external client {EXTERNAL_CLIENT_IP}"
    ));
    say(&format!(
        "attaching {PODS_PER_NODE} pods per node with weir-cni (CNI ADD run inside each node namespace)"
    ));
    let mut c = Cluster::new(nodes, PODS_PER_NODE).context("building the nodes (run as root)")?;
    println!();
    println!("  {:<7} {:<15} {:<16} pods", "node", "address", "pod CIDR");
    for node in &c.nodes {
        let pods: Vec<String> = node
            .pods
            .iter()
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect();
        println!(
            "  {:<7} {:<15} {:<16} {}",
            node.name(),
            node.ip(),
            pod_cidr(node.index),
            pods.join(", ")
        );
    }
    c.start_echo()?;

    let all: Vec<&Pod> = c.pods().collect();
    let services = service_yaml("web", "10.96.0.10", None, false, &all)
        + &service_yaml("web-np", "10.96.0.20", Some(30080), false, &all)
        + &service_yaml("web-local", "10.96.0.30", Some(30090), true, &all);
    c.write_manifests(&services)?;
    say(&format!(
        "manifests per node: {nodes} Node objects (spec.podCIDRs, InternalIP); Services demo/web ClusterIP 10.96.0.10:80, demo/web-np NodePort 30080, demo/web-local NodePort 30090 externalTrafficPolicy Local; every pod an endpoint"
    ));
    say("starting weir-proxy --source dir:... --hostname-override nodeN --route-pod-cidrs on every node");
    c.start_proxies(METRICS, weir_e2e::mode::Mode::Nftables)?;
    println!();
    for node in &c.nodes {
        println!(
            "  {} routes (proto 77): {}",
            node.name(),
            node.pod_routes().join(", ")
        );
    }

    say("pod to pod across nodes (TCP to weir-echo on port 8080)");
    for from in c.nodes.iter().map(|n| &n.pods[0]) {
        for to in c
            .nodes
            .iter()
            .filter(|n| n.index != from.node)
            .map(|n| &n.pods[0])
        {
            let addr = format!("{}:{ECHO_PORT}", to.ip);
            let (answers, errors) = requests(&from.ns, &addr, 1)?;
            let answer = answers.into_keys().next().unwrap_or_default();
            if !errors.is_empty() {
                bail!("{} -> {addr}: {errors:?}", from.name);
            }
            let seen = peer(&from.ns, &addr)?;
            println!(
                "  {} ({}) -> {addr}: answered by {answer}, which sees source {seen}",
                from.name, from.ip
            );
            if answer != to.name || seen != from.ip {
                bail!("{} -> {}: unexpected answer", from.name, to.name);
            }
        }
    }

    let names: Vec<&str> = c.pods().map(|p| p.name.as_str()).collect();
    for node in &c.nodes {
        let from = &node.pods[0];
        let r = probe(&from.ns, &["tcp", "10.96.0.10:80", "300"])?;
        share_table_for(
            &format!(
                "300 requests {} on {} -> ClusterIP 10.96.0.10:80",
                from.name,
                node.name()
            ),
            &r,
            &names,
        );
        every_backend_answered(&r, &names)?;
    }
    for node in &c.nodes {
        let r = probe(&c.client, &["tcp", &format!("{}:30080", node.ip()), "300"])?;
        share_table_for(
            &format!("300 requests client -> NodePort {}:30080", node.ip()),
            &r,
            &names,
        );
        every_backend_answered(&r, &names)?;
    }
    say("externalTrafficPolicy Local: each node's NodePort 30090 keeps to that node's pods and the client's address");
    for node in &c.nodes {
        let addr = format!("{}:30090", node_ip(node.index));
        let r = probe(&c.client, &["tcp", &addr, "100"])?;
        share_table_for(&format!("100 requests client -> {addr}"), &r, &names);
        let seen = peer(&c.client, &addr)?;
        println!("  the endpoint sees source {seen}");
        let answered: BTreeSet<String> = r["answers"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let own: BTreeSet<String> = node.pods.iter().map(|p| p.name.clone()).collect();
        if answered != own || seen != EXTERNAL_CLIENT_IP {
            bail!(
                "{addr}: answered by {answered:?} (want {own:?}), source {seen} (want {EXTERNAL_CLIENT_IP})"
            );
        }
    }

    say("cleaning up: weir-proxy --cleanup and CNI DEL on every node, namespaces removed");
    c.teardown()?;
    drop(c);
    say("done");
    Ok(())
}

/// Fails unless every backend in `names` answered and nothing failed.
fn every_backend_answered(report: &serde_json::Value, names: &[&str]) -> Result<()> {
    let silent: Vec<&&str> = names
        .iter()
        .filter(|n| report["answers"][**n].as_u64().unwrap_or(0) == 0)
        .collect();
    if !silent.is_empty() || report["errors"].as_object().is_some_and(|e| !e.is_empty()) {
        bail!("no answers from {silent:?}, errors {}", report["errors"]);
    }
    Ok(())
}
