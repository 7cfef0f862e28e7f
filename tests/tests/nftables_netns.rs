//! nftables mode with real packets: a node namespace running weir-proxy, pods behind routed
//! veths, an external client. Each test proves one behaviour.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::path::Path;
use weir_e2e::*;

const METRICS: u16 = 10249;

struct Env {
    topo: Topology,
    dir: tempfile::TempDir,
    proxy: u32,
}

fn setup(pods: usize, services: &str) -> Option<Env> {
    if !require_privileges() {
        return None;
    }
    let mut topo = Topology::new(pods).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..pods {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests(dir.path(), services).expect("manifests");
    let proxy = start_proxy(&mut topo.node, dir.path(), METRICS).expect("weir-proxy");
    Some(Env { topo, dir, proxy })
}

fn web(pods: &[usize]) -> String {
    service_yaml("web", "10.96.0.10", "TCP", 80, Some(30080), 8080, pods)
}

#[test]
fn clusterip_spreads_over_all_ready_endpoints() {
    let Some(env) = setup(3, &web(&[0, 1, 2])) else {
        return;
    };
    let r = probe(&env.topo.node, &["tcp", "10.96.0.10:80", "300"]).unwrap();
    let a = answers(&r);
    assert_eq!(a.len(), 3, "every backend answers: {r}");
    for (name, n) in &a {
        assert!(
            *n <= 200,
            "{name} got {n} of 300 (more than twice its share): {r}"
        );
    }
    assert_eq!(a.iter().map(|(_, n)| n).sum::<u64>(), 300, "{r}");
}

#[test]
fn nodeport_reaches_the_service_from_an_external_client() {
    let Some(env) = setup(2, &web(&[0, 1])) else {
        return;
    };
    let r = probe(&env.topo.client, &["tcp", "192.168.77.10:30080", "40"]).unwrap();
    assert_eq!(answers(&r).iter().map(|(_, n)| n).sum::<u64>(), 40, "{r}");
    let r = probe(&env.topo.client, &["tcp", "10.96.0.10:80", "20"]).unwrap();
    assert_eq!(
        answers(&r).iter().map(|(_, n)| n).sum::<u64>(),
        20,
        "ClusterIP from outside: {r}"
    );
}

#[test]
fn pod_reaches_itself_through_its_own_service_hairpin() {
    let Some(env) = setup(1, &web(&[0])) else {
        return;
    };
    let r = probe(&env.topo.pods[0], &["tcp", "10.96.0.10:80", "20"]).unwrap();
    assert_eq!(answers(&r), vec![("pod-0".to_owned(), 20)], "{r}");
}

#[test]
fn service_without_endpoints_is_rejected_at_once() {
    let Some(env) = setup(1, &web(&[])) else {
        return;
    };
    let started = std::time::Instant::now();
    let r = probe(&env.topo.pods[0], &["tcp", "10.96.0.10:80", "5"]).unwrap();
    assert!(answers(&r).is_empty(), "{r}");
    let refused = r["errors"]["refused"].as_u64().unwrap_or(0)
        + r["errors"]["unreachable"].as_u64().unwrap_or(0);
    assert_eq!(refused, 5, "rejected, not timed out: {r}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let r = probe(&env.topo.client, &["tcp", "192.168.77.10:30080", "3"]).unwrap();
    let refused = r["errors"]["refused"].as_u64().unwrap_or(0)
        + r["errors"]["unreachable"].as_u64().unwrap_or(0);
    assert_eq!(refused, 3, "NodePort without endpoints rejected: {r}");
}

#[test]
fn udp_service_answers() {
    let svc = service_yaml("dns", "10.96.0.53", "UDP", 53, None, 5353, &[0, 1]);
    let Some(env) = setup(2, &svc) else { return };
    let r = probe(&env.topo.node, &["udp", "10.96.0.53:53", "20"]).unwrap();
    assert_eq!(answers(&r).iter().map(|(_, n)| n).sum::<u64>(), 20, "{r}");
}

#[test]
fn removed_endpoint_stops_receiving_new_connections() {
    let Some(env) = setup(3, &web(&[0, 1, 2])) else {
        return;
    };
    let before = last_sync(&env.topo.node, METRICS).unwrap();
    write_manifests(env.dir.path(), &web(&[0, 1])).unwrap();
    wait_synced(&env.topo.node, METRICS, before).unwrap();
    let r = probe(&env.topo.node, &["tcp", "10.96.0.10:80", "100"]).unwrap();
    let a = answers(&r);
    assert!(
        a.iter().all(|(n, _)| n != "pod-2"),
        "pod-2 was removed: {r}"
    );
    assert_eq!(a.iter().map(|(_, n)| n).sum::<u64>(), 100, "{r}");
}

#[test]
fn established_connection_survives_a_proxy_restart_and_rules_are_adopted() {
    let Some(mut env) = setup(1, &web(&[0])) else {
        return;
    };
    let probe_bin = workspace_bin("weir-probe");
    let hold = env
        .topo
        .client
        .spawn(
            &[
                &probe_bin.to_string_lossy(),
                "hold",
                "10.96.0.10:80",
                "3000",
            ],
            std::process::Stdio::piped(),
        )
        .unwrap();
    let mut out = hold.stdout.take().unwrap();
    let mut first = [0u8; 10];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"connected\n");
    // Kill the proxy (rules stay), start a new one: it adopts the table without flushing.
    env.topo.node.stop(env.proxy);
    start_proxy(&mut env.topo.node, env.dir.path(), METRICS).unwrap();
    assert_eq!(
        metric(
            &env.topo.node,
            METRICS,
            "weir_sync_plan_element_changes_total"
        ),
        Some(0.0),
        "the restarted proxy found everything in place and changed no element"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let r: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");
    assert!(r["answers"]["pod-0"].as_u64().unwrap() >= 20, "{r}");
}

#[test]
fn cleanup_leaves_no_weir_table() {
    let Some(mut env) = setup(1, &web(&[0])) else {
        return;
    };
    let tables = env.topo.node.exec(&["nft", "list", "tables"]).unwrap();
    assert!(String::from_utf8_lossy(&tables.stdout).contains("table ip weir"));
    env.topo.node.stop(env.proxy);
    let bin = workspace_bin("weir-proxy");
    env.topo
        .node
        .exec(&[&bin.to_string_lossy(), "--cleanup"])
        .unwrap();
    let tables = env.topo.node.exec(&["nft", "list", "tables"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("weir"),
        "{tables:?}"
    );
}

#[test]
fn an_invalid_edit_of_a_manifest_keeps_what_is_programmed() {
    let Some(env) = setup(2, &web(&[0, 1])) else {
        return;
    };
    let before = last_sync(&env.topo.node, METRICS).unwrap();
    // The Service's port becomes a string: the document is reported and skipped, and the
    // last good version stays programmed.
    let broken = web(&[0, 1]).replace("port: 80,", "port: eighty,");
    assert_ne!(broken, web(&[0, 1]));
    write_manifests(env.dir.path(), &broken).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let r = probe(&env.topo.node, &["tcp", "10.96.0.10:80", "20"]).unwrap();
    assert_eq!(answers(&r).iter().map(|(_, n)| n).sum::<u64>(), 20, "{r}");
    assert!(last_sync(&env.topo.node, METRICS).unwrap() >= before);
}

#[test]
fn unallocated_service_address_is_dropped_and_an_unknown_port_rejected() {
    let Some(env) = setup(1, &web(&[0])) else {
        return;
    };
    let r = probe(&env.topo.pods[0], &["tcp", "10.96.0.99:80", "1"]).unwrap();
    assert_eq!(r["errors"]["timeout"].as_u64(), Some(1), "dropped: {r}");
    let r = probe(&env.topo.pods[0], &["tcp", "10.96.0.10:81", "3"]).unwrap();
    assert_eq!(r["errors"]["refused"].as_u64(), Some(3), "rejected: {r}");
    let r = probe(&env.topo.pods[0], &["tcp", "10.96.0.10:80", "3"]).unwrap();
    assert_eq!(answers(&r).iter().map(|(_, n)| n).sum::<u64>(), 3, "{r}");
}

#[test]
fn internal_traffic_policy_local_sends_clusterip_traffic_only_to_local_endpoints() {
    // pod-1 runs in this node's namespace, but its EndpointSlice entry names node2: to
    // weir it is a remote endpoint.
    let yaml = web(&[0, 1])
        .replace(
            "  type: NodePort\n",
            "  type: NodePort\n  internalTrafficPolicy: Local\n",
        )
        .replace(
            &format!("[\"{}\"], nodeName: node1", pod_ip(1)),
            &format!("[\"{}\"], nodeName: node2", pod_ip(1)),
        );
    assert!(yaml.contains("internalTrafficPolicy: Local") && yaml.contains("nodeName: node2"));
    let Some(env) = setup(2, &yaml) else {
        return;
    };
    let r = probe(&env.topo.node, &["tcp", "10.96.0.10:80", "40"]).unwrap();
    assert_eq!(answers(&r), vec![("pod-0".to_owned(), 40)], "{r}");
    // External traffic to the NodePort is not internal: both endpoints.
    let r = probe(&env.topo.client, &["tcp", "192.168.77.10:30080", "60"]).unwrap();
    assert_eq!(answers(&r).len(), 2, "{r}");
}

#[test]
fn pod_source_is_preserved_to_a_clusterip_and_masqueraded_with_masquerade_all() {
    let Some(env) = setup(2, &web(&[1])) else {
        return;
    };
    let r = probe(&env.topo.pods[0], &["peer", "10.96.0.10:80"]).unwrap();
    assert_eq!(
        r["peer"],
        pod_ip(0),
        "pod to ClusterIP keeps its source: {r}"
    );
    // From outside the cluster CIDR: masqueraded.
    let r = probe(&env.topo.client, &["peer", "10.96.0.10:80"]).unwrap();
    assert_ne!(r["peer"], CLIENT_IP, "{r}");

    let Env {
        mut topo,
        dir,
        proxy,
        ..
    } = env;
    topo.node.stop(proxy);
    start_proxy_with(&mut topo.node, dir.path(), METRICS, &["--masquerade-all"]).unwrap();
    let r = probe(&topo.pods[0], &["peer", "10.96.0.10:80"]).unwrap();
    assert_ne!(r["peer"], pod_ip(0), "--masquerade-all: {r}");
}
