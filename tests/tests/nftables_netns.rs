//! The foundation service scenarios with real packets, in nftables and in eBPF mode: a node
//! namespace running weir-proxy, pods behind routed veths, an external client. Each
//! scenario proves one behaviour and runs as `<scenario>::nftables` and `<scenario>::ebpf`
//! (see [`weir_e2e::mode`]); where eBPF mode behaves differently the eBPF variant asserts
//! that behaviour, or is left out with a comment naming the difference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::path::Path;
use weir_e2e::mode::{Dataplane, Mode};
use weir_e2e::*;

const METRICS: u16 = 10249;

struct Env {
    // Field order is drop order: the processes go before the eBPF cgroup and pins.
    topo: Topology,
    dir: tempfile::TempDir,
    proxy: u32,
    dp: Dataplane,
}

fn setup(mode: Mode, pods: usize, services: &str) -> Option<Env> {
    setup_with(mode, pods, services, &[])
}

/// [`setup`] with extra weir-proxy flags for eBPF mode (`--ebpf-interfaces ...`).
fn setup_with(mode: Mode, pods: usize, services: &str, ebpf_extra: &[&str]) -> Option<Env> {
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
    let dp = Dataplane::new(mode).expect("dataplane");
    let extra = if mode == Mode::Ebpf { ebpf_extra } else { &[] };
    let proxy = dp
        .start_proxy(&mut topo.node, dir.path(), METRICS, extra)
        .expect("weir-proxy");
    Some(Env {
        topo,
        dir,
        proxy,
        dp,
    })
}

impl Env {
    /// weir-probe from a namespace on the node (a pod or the node itself; in eBPF mode
    /// inside the test's cgroup).
    fn local(&self, ns: &Netns, args: &[&str]) -> Value {
        self.dp.probe(ns, args).unwrap()
    }
}

in_both_modes!(
    clusterip_spreads_over_all_ready_endpoints,
    nodeport_reaches_the_service_from_an_external_client,
    pod_reaches_itself_through_its_own_service_hairpin,
    service_without_endpoints_is_rejected_at_once,
    udp_service_answers,
    removed_endpoint_stops_receiving_new_connections,
    established_connection_survives_a_proxy_restart_and_rules_are_adopted,
    cleanup_leaves_no_weir_table,
    an_invalid_edit_of_a_manifest_keeps_what_is_programmed,
    internal_traffic_policy_local_sends_clusterip_traffic_only_to_local_endpoints,
    pod_source_is_preserved_to_a_clusterip_and_masqueraded_with_masquerade_all,
);

fn web(pods: &[usize]) -> String {
    service_yaml("web", "10.96.0.10", "TCP", 80, Some(30080), 8080, pods)
}

fn clusterip_spreads_over_all_ready_endpoints(mode: Mode) {
    let Some(env) = setup(mode, 3, &web(&[0, 1, 2])) else {
        return;
    };
    let r = env.local(&env.topo.node, &["tcp", "10.96.0.10:80", "300"]);
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

fn nodeport_reaches_the_service_from_an_external_client(mode: Mode) {
    let Some(env) = setup(mode, 2, &web(&[0, 1])) else {
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

fn pod_reaches_itself_through_its_own_service_hairpin(mode: Mode) {
    let Some(env) = setup(mode, 1, &web(&[0])) else {
        return;
    };
    let r = env.local(&env.topo.pods[0], &["tcp", "10.96.0.10:80", "20"]);
    assert_eq!(answers(&r), vec![("pod-0".to_owned(), 20)], "{r}");
}

fn service_without_endpoints_is_rejected_at_once(mode: Mode) {
    let Some(env) = setup(mode, 1, &web(&[])) else {
        return;
    };
    let started = std::time::Instant::now();
    let r = env.local(&env.topo.pods[0], &["tcp", "10.96.0.10:80", "5"]);
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

fn udp_service_answers(mode: Mode) {
    let svc = service_yaml("dns", "10.96.0.53", "UDP", 53, None, 5353, &[0, 1]);
    let Some(env) = setup(mode, 2, &svc) else {
        return;
    };
    let r = env.local(&env.topo.node, &["udp", "10.96.0.53:53", "20"]);
    assert_eq!(answers(&r).iter().map(|(_, n)| n).sum::<u64>(), 20, "{r}");
}

fn removed_endpoint_stops_receiving_new_connections(mode: Mode) {
    let Some(env) = setup(mode, 3, &web(&[0, 1, 2])) else {
        return;
    };
    let before = last_sync(&env.topo.node, METRICS).unwrap();
    write_manifests(env.dir.path(), &web(&[0, 1])).unwrap();
    wait_synced(&env.topo.node, METRICS, before).unwrap();
    let r = env.local(&env.topo.node, &["tcp", "10.96.0.10:80", "100"]);
    let a = answers(&r);
    assert!(
        a.iter().all(|(n, _)| n != "pod-2"),
        "pod-2 was removed: {r}"
    );
    assert_eq!(a.iter().map(|(_, n)| n).sum::<u64>(), 100, "{r}");
}

fn established_connection_survives_a_proxy_restart_and_rules_are_adopted(mode: Mode) {
    let Some(mut env) = setup(mode, 1, &web(&[0])) else {
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
    env.dp
        .start_proxy(&mut env.topo.node, env.dir.path(), METRICS, &[])
        .unwrap();
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

fn cleanup_leaves_no_weir_table(mode: Mode) {
    let Some(mut env) = setup(mode, 1, &web(&[0])) else {
        return;
    };
    let tables = env.topo.node.exec(&["nft", "list", "tables"]).unwrap();
    if mode == Mode::Nftables {
        assert!(String::from_utf8_lossy(&tables.stdout).contains("table ip weir"));
    }
    let pins = env.dp.bpf.as_ref().map(|b| b.0.clone());
    if let Some(pins) = &pins {
        // eBPF mode: --cleanup also removes the pinned links and maps.
        assert!(pins.read_dir().unwrap().count() >= 10, "{pins:?}");
    }
    env.topo.node.stop(env.proxy);
    let bin = workspace_bin("weir-proxy");
    let bin = bin.to_string_lossy();
    if mode == Mode::Nftables {
        env.topo.node.exec(&[&bin, "--cleanup"]).unwrap();
    } else {
        // nsenter keeps /sys (cgroup and bpffs) visible, which `ip netns exec` hides.
        let netns = format!("--net=/run/netns/{}", env.topo.node.name());
        let flags = env.dp.flags();
        let mut args = vec![netns.as_str(), &bin, "--cleanup"];
        args.extend(flags.iter().map(String::as_str));
        run("nsenter", &args).unwrap();
    }
    let tables = env.topo.node.exec(&["nft", "list", "tables"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("weir"),
        "{tables:?}"
    );
    if let Some(pins) = &pins {
        assert!(!pins.exists(), "the pin directory is gone");
        // No program stays attached: the ClusterIP is no longer translated.
        let r = env.local(&env.topo.pods[0], &["tcp", "10.96.0.10:80", "1"]);
        assert_eq!(total(&r), 0, "{r}");
    }
}

fn an_invalid_edit_of_a_manifest_keeps_what_is_programmed(mode: Mode) {
    let Some(env) = setup(mode, 2, &web(&[0, 1])) else {
        return;
    };
    let before = last_sync(&env.topo.node, METRICS).unwrap();
    // The Service's port becomes a string: the document is reported and skipped, and the
    // last good version stays programmed.
    let broken = web(&[0, 1]).replace("port: 80,", "port: eighty,");
    assert_ne!(broken, web(&[0, 1]));
    write_manifests(env.dir.path(), &broken).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let r = env.local(&env.topo.node, &["tcp", "10.96.0.10:80", "20"]);
    assert_eq!(answers(&r).iter().map(|(_, n)| n).sum::<u64>(), 20, "{r}");
    assert!(last_sync(&env.topo.node, METRICS).unwrap() >= before);
}

in_both_modes!(unallocated_service_address_is_dropped_and_an_unknown_port_rejected);

/// As kube-proxy, in both modes: a new connection to an address of
/// `--service-cluster-ip-range` no Service has is dropped (the client times out; eBPF
/// mode: the cgroup_skb egress program), one to a ClusterIP on a port its Service lacks is
/// refused at once (eBPF mode: at connect, from the ClusterIPs map).
fn unallocated_service_address_is_dropped_and_an_unknown_port_rejected(mode: Mode) {
    let Some(env) = setup(mode, 1, &web(&[0])) else {
        return;
    };
    let r = env.local(&env.topo.pods[0], &["tcp", "10.96.0.99:80", "1"]);
    assert_eq!(r["errors"]["timeout"].as_u64(), Some(1), "dropped: {r}");
    let r = env.local(&env.topo.pods[0], &["udp-each", "10.96.0.99:53", "2"]);
    assert_eq!(r["errors"]["timeout"].as_u64(), Some(2), "UDP dropped: {r}");
    let r = env.local(&env.topo.pods[0], &["tcp", "10.96.0.10:81", "3"]);
    assert_eq!(r["errors"]["refused"].as_u64(), Some(3), "rejected: {r}");
    let r = env.local(&env.topo.pods[0], &["tcp", "10.96.0.10:80", "3"]);
    assert_eq!(answers(&r).iter().map(|(_, n)| n).sum::<u64>(), 3, "{r}");
}

fn internal_traffic_policy_local_sends_clusterip_traffic_only_to_local_endpoints(mode: Mode) {
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
    // eBPF mode: replies of a remote endpoint arrive on an external interface, here veth1.
    let Some(env) = setup_with(mode, 2, &yaml, &["--ebpf-interfaces", "eth0,veth1"]) else {
        return;
    };
    let r = env.local(&env.topo.node, &["tcp", "10.96.0.10:80", "40"]);
    assert_eq!(answers(&r), vec![("pod-0".to_owned(), 40)], "{r}");
    // External traffic to the NodePort is not internal: both endpoints.
    let r = probe(&env.topo.client, &["tcp", "192.168.77.10:30080", "60"]).unwrap();
    assert_eq!(answers(&r).len(), 2, "{r}");
}

fn pod_source_is_preserved_to_a_clusterip_and_masqueraded_with_masquerade_all(mode: Mode) {
    let Some(env) = setup(mode, 2, &web(&[1])) else {
        return;
    };
    let r = env.local(&env.topo.pods[0], &["peer", "10.96.0.10:80"]);
    assert_eq!(
        r["peer"],
        pod_ip(0),
        "pod to ClusterIP keeps its source: {r}"
    );
    let r = probe(&env.topo.client, &["peer", "10.96.0.10:80"]).unwrap();
    if mode == Mode::Ebpf {
        // eBPF mode: a backend on this node sees the external client's own address, and
        // --masquerade-all does not apply (pods connect to the backend directly).
        assert_eq!(r["peer"], CLIENT_IP, "{r}");
    } else {
        // From outside the cluster CIDR: masqueraded.
        assert_ne!(r["peer"], CLIENT_IP, "{r}");
    }

    let Env {
        mut topo,
        dir,
        proxy,
        dp,
    } = env;
    topo.node.stop(proxy);
    dp.start_proxy(&mut topo.node, dir.path(), METRICS, &["--masquerade-all"])
        .unwrap();
    let r = dp.probe(&topo.pods[0], &["peer", "10.96.0.10:80"]).unwrap();
    if mode == Mode::Ebpf {
        assert_eq!(r["peer"], pod_ip(0), "--masquerade-all: {r}");
    } else {
        assert_ne!(r["peer"], pod_ip(0), "--masquerade-all: {r}");
    }
}
