//! Service semantics with real packets: external IPs, load-balancer source ranges and
//! `ipMode: Proxy`, `externalTrafficPolicy: Local`, ClientIP session affinity, terminating
//! endpoints, topology hints and named target ports. A node namespace runs weir-proxy,
//! pods sit behind routed veths, an external client (198.51.100.2) routes service and
//! load-balancer addresses through the node. Endpoints labeled `nodeName: node2` are pods
//! of this topology that weir treats as remote. Each test proves one behaviour and runs as
//! `<scenario>::nftables` and `<scenario>::ebpf` (see [`weir_e2e::mode`]); where eBPF mode
//! behaves differently the eBPF variant asserts that behaviour, or is left out with a comment
//! naming the difference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use weir_e2e::mode::{Dataplane, Mode};
use weir_e2e::*;

const METRICS: u16 = 10249;

struct Env {
    // Field order is drop order: the processes go before the eBPF cgroup and pins.
    topo: Topology,
    dir: tempfile::TempDir,
    dp: Dataplane,
}

/// `pods` pods answering `pod-I` on TCP `ports[I]` (8080 when `ports` is shorter), the
/// manifests (Node labeled `node_labels`) and weir-proxy in `mode`. In eBPF mode the veths
/// of the pods labeled node2 (`remote`) are external interfaces too, as a remote node's
/// replies arrive on one.
fn setup_with(
    mode: Mode,
    remote: &[usize],
    pods: usize,
    ports: &[u16],
    node_labels: &[(&str, &str)],
    services: &str,
) -> Option<Env> {
    if !require_privileges() {
        return None;
    }
    let mut topo = Topology::new(pods).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..pods {
        let port = ports.get(i).copied().unwrap_or(8080);
        topo.start_echo_on(i, echo, &format!("pod-{i}"), port, 5353)
            .expect("echo");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests_with_node_labels(dir.path(), node_labels, services).expect("manifests");
    let dp = Dataplane::new(mode).expect("dataplane");
    let interfaces = std::iter::once("eth0".to_owned())
        .chain(remote.iter().map(|p| format!("veth{p}")))
        .collect::<Vec<_>>()
        .join(",");
    let extra = match mode {
        Mode::Ebpf if !remote.is_empty() => vec!["--ebpf-interfaces", interfaces.as_str()],
        _ => Vec::new(),
    };
    dp.start_proxy(&mut topo.node, dir.path(), METRICS, &extra)
        .expect("weir-proxy");
    Some(Env { topo, dir, dp })
}

fn setup(mode: Mode, pods: usize, services: &str) -> Option<Env> {
    setup_with(mode, &[], pods, &[], &[], services)
}

impl Env {
    /// `nft list table ip weir` in the node.
    fn table(&self) -> String {
        nft_list(&self.topo.node, &["table", "ip", "weir"])
    }

    /// [`tcp`] from a pod (in eBPF mode inside the test's cgroup).
    fn tcp_local(&self, ns: &Netns, dst: &str, count: u32) -> Value {
        self.dp
            .probe(ns, &["tcp", dst, &count.to_string()])
            .unwrap()
    }

    /// Rewrites the manifests, waits for a sync and then until the ruleset satisfies
    /// `applied` (a sync alone could be a periodic one that predates the edit); in eBPF
    /// mode, until a sync has written map elements.
    fn rewrite(
        &self,
        node_labels: &[(&str, &str)],
        services: &str,
        applied: impl Fn(&str) -> bool,
    ) {
        const WRITES: &str = "weir_sync_plan_element_changes_total";
        let before = last_sync(&self.topo.node, METRICS).unwrap();
        let writes = metric(&self.topo.node, METRICS, WRITES).unwrap_or(0.0);
        write_manifests_with_node_labels(self.dir.path(), node_labels, services).unwrap();
        wait_synced(&self.topo.node, METRICS, before).unwrap();
        if self.dp.mode == Mode::Ebpf {
            wait_until("the edit in the eBPF maps", Duration::from_secs(15), || {
                metric(&self.topo.node, METRICS, WRITES).unwrap_or(0.0) > writes
            })
            .unwrap();
            return;
        }
        wait_until(
            "the edited manifests in the ruleset",
            Duration::from_secs(15),
            || applied(&self.table()),
        )
        .unwrap_or_else(|e| panic!("{e}; ruleset:\n{}", self.table()));
    }
}

in_both_modes!(
    external_ip_reaches_endpoints_from_outside_and_is_masqueraded,
    load_balancer_ip_honours_source_ranges,
    etp_local_nodeport_preserves_client_source_and_uses_only_local_endpoints,
    etp_local_without_local_endpoints_drops_external_traffic_but_pods_still_reach_the_service,
    session_affinity_client_ip_keeps_one_endpoint,
    terminating_endpoints_serve_only_when_nothing_is_ready,
    topology_hints_keep_traffic_in_the_node_zone,
    named_target_ports_resolve_per_endpoint,
);

fn tcp(ns: &Netns, dst: &str, count: u32) -> Value {
    probe(ns, &["tcp", dst, &count.to_string()]).unwrap()
}

fn peer(ns: &Netns, dst: &str) -> String {
    let r = probe(ns, &["peer", dst]).unwrap();
    r["peer"].as_str().unwrap_or_default().to_owned()
}

/// A Service `name` (namespace demo) with ClusterIP `cluster_ip`, the extra `spec` lines
/// and one TCP port named `p` (`port`: the rest of its flow mapping).
fn service(name: &str, cluster_ip: &str, spec: &[&str], port: &str) -> String {
    let extra: String = spec.iter().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {cluster_ip}\n{extra}  ports: [{{name: p, protocol: TCP, {port}}}]\n"
    )
}

/// One endpoint (pod `pod`) of an EndpointSlice, on node `node`, with `extra` fields.
fn ep(pod: usize, node: &str, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        "- {{addresses: [\"{}\"], nodeName: {node}{extra}}}\n",
        pod_ip(pod)
    )
}

/// An EndpointSlice `name` of Service `service` whose port `p` is `port`.
fn slice(service: &str, name: &str, port: u16, endpoints: &[String]) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: p, protocol: TCP, port: {port}}}]\nendpoints:\n{}",
        endpoints.concat()
    )
}

fn external_ip_reaches_endpoints_from_outside_and_is_masqueraded(mode: Mode) {
    let yaml = service(
        "extip",
        "10.96.0.90",
        &["externalIPs: [192.0.2.90]"],
        "port: 80, targetPort: 8080",
    ) + &slice(
        "extip",
        "extip-1",
        8080,
        &[ep(0, NODE_NAME, ""), ep(1, NODE_NAME, "")],
    );
    let Some(env) = setup(mode, 2, &yaml) else {
        return;
    };
    env.topo.client_route_via_node("192.0.2.90").unwrap();
    let r = tcp(&env.topo.client, "192.0.2.90:80", 40);
    assert_eq!(total(&r), 40, "{r}");
    assert_eq!(names(&r), ["pod-0", "pod-1"], "both endpoints: {r}");
    let seen = peer(&env.topo.client, "192.0.2.90:80");
    if mode == Mode::Ebpf {
        // eBPF mode: a backend on this node sees the client's own address.
        assert_eq!(seen, CLIENT_IP);
        return;
    }
    assert!(
        seen == NODE_IP || seen == NODE_CLIENT_SIDE_IP,
        "the endpoint sees a node address, not the client's ({CLIENT_IP}): {seen:?}"
    );
}

fn load_balancer_ip_honours_source_ranges(mode: Mode) {
    let lb = |ranges: &str| {
        service(
            "lb",
            "10.96.0.80",
            &[
                "type: LoadBalancer",
                &format!("loadBalancerSourceRanges: [{ranges}]"),
            ],
            "port: 80, targetPort: 8080, nodePort: 30080",
        ) + "status:\n  loadBalancer:\n    ingress: [{ip: 192.0.2.80}, {ip: 192.0.2.81, ipMode: Proxy}]\n"
            + &slice(
                "lb",
                "lb-1",
                8080,
                &[ep(0, NODE_NAME, ""), ep(1, NODE_NAME, "")],
            )
    };
    // pod-2 is no endpoint: the in-cluster client.
    let Some(env) = setup(mode, 3, &lb(&format!("{CLIENT_IP}/32"))) else {
        return;
    };
    let pod = &env.topo.pods[2];
    env.topo.client_route_via_node("192.0.2.80").unwrap();
    env.topo.client_route_via_node("192.0.2.81").unwrap();
    let r = tcp(&env.topo.client, "192.0.2.80:80", 10);
    assert_eq!(total(&r), 10, "the client is in the source ranges: {r}");
    assert_eq!(names(&r), ["pod-0", "pod-1"], "{r}");
    // A pod outside the ranges: its connection to the load-balancer IP is dropped.
    let r = env.tcp_local(pod, "192.0.2.80:80", 1);
    assert_eq!(
        errors(&r, "timeout"),
        1,
        "the pod is not in the ranges: {r}"
    );

    // ipMode Proxy: the load balancer delivers to the node itself; no DNAT.
    assert!(!env.table().contains("192.0.2.81"), "{}", env.table());
    let r = tcp(&env.topo.client, "192.0.2.81:80", 2);
    assert!(
        answers(&r).is_empty(),
        "no pod answers a Proxy-mode IP: {r}"
    );

    // Ranges without the client but with the pod: the load-balancer IP drops the client
    // and serves the pod.
    let ranges = format!("203.0.113.0/24, {}/32", pod_ip(2));
    env.rewrite(&[], &lb(&ranges), |t| {
        t.contains("203.0.113.0/24") && !t.contains(CLIENT_IP)
    });
    let r = tcp(&env.topo.client, "192.0.2.80:80", 2);
    assert!(answers(&r).is_empty(), "{r}");
    assert_eq!(errors(&r, "timeout"), 2, "dropped, not rejected: {r}");
    let r = env.tcp_local(pod, "192.0.2.80:80", 10);
    assert_eq!(total(&r), 10, "the pod is in the ranges: {r}");
    // The ClusterIP from a pod and the NodePort are not firewalled.
    let r = env.tcp_local(pod, "10.96.0.80:80", 10);
    assert_eq!(total(&r), 10, "ClusterIP from a pod: {r}");
    let r = tcp(&env.topo.client, &format!("{NODE_IP}:30080"), 10);
    assert_eq!(total(&r), 10, "NodePort: {r}");
}

/// NodePort 30080 to ClusterIP 10.96.0.10:80 with `externalTrafficPolicy: Local`.
fn etp_local(endpoints: &[String]) -> String {
    service(
        "web",
        "10.96.0.10",
        &["type: NodePort", "externalTrafficPolicy: Local"],
        "port: 80, targetPort: 8080, nodePort: 30080",
    ) + &slice("web", "web-1", 8080, endpoints)
}

fn etp_local_nodeport_preserves_client_source_and_uses_only_local_endpoints(mode: Mode) {
    let yaml = etp_local(&[
        ep(0, NODE_NAME, ""),
        ep(1, NODE_NAME, ""),
        ep(2, "node2", ""),
    ]);
    // pod-3 is no endpoint: the in-cluster client. (A pod labeled node2 cannot reach
    // itself through the service: weir rightly sets up no hairpin for remote endpoints.)
    let Some(env) = setup(mode, 4, &yaml) else {
        return;
    };
    let nodeport = format!("{NODE_IP}:30080");
    let r = tcp(&env.topo.client, &nodeport, 60);
    assert_eq!(total(&r), 60, "{r}");
    assert_eq!(
        names(&r),
        ["pod-0", "pod-1"],
        "only this node's endpoints: {r}"
    );
    for _ in 0..5 {
        assert_eq!(
            peer(&env.topo.client, &nodeport),
            CLIENT_IP,
            "the client's source is kept"
        );
    }
    let r = env.tcp_local(&env.topo.pods[3], "10.96.0.10:80", 150);
    assert_eq!(total(&r), 150, "{r}");
    assert_eq!(
        names(&r),
        ["pod-0", "pod-1", "pod-2"],
        "ClusterIP uses every endpoint: {r}"
    );
}

fn etp_local_without_local_endpoints_drops_external_traffic_but_pods_still_reach_the_service(
    mode: Mode,
) {
    let yaml = etp_local(&[ep(0, "node2", ""), ep(1, "node2", "")]);
    let Some(env) = setup(mode, 3, &yaml) else {
        return;
    };
    let nodeport = format!("{NODE_IP}:30080");
    let r = tcp(&env.topo.client, &nodeport, 2);
    assert!(answers(&r).is_empty(), "{r}");
    assert_eq!(errors(&r, "timeout"), 2, "dropped, not refused: {r}");
    let r = env.tcp_local(&env.topo.pods[2], &nodeport, 20);
    assert_eq!(total(&r), 20, "a pod uses every endpoint: {r}");
    let r = env.tcp_local(&env.topo.pods[2], "10.96.0.10:80", 20);
    assert_eq!(total(&r), 20, "ClusterIP: {r}");
}

fn session_affinity_client_ip_keeps_one_endpoint(mode: Mode) {
    const TIMEOUT_S: u64 = 3;
    let yaml = service(
        "web",
        "10.96.0.10",
        &[
            "sessionAffinity: ClientIP",
            &format!("sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {TIMEOUT_S}}}}}"),
        ],
        "port: 80, targetPort: 8080",
    ) + &slice(
        "web",
        "web-1",
        8080,
        &[
            ep(0, NODE_NAME, ""),
            ep(1, NODE_NAME, ""),
            ep(2, NODE_NAME, ""),
        ],
    );
    let Some(env) = setup(mode, 3, &yaml) else {
        return;
    };
    let client_key = format!("{CLIENT_IP} . 10.96.0.10 . tcp . 80");
    // Which affinity sets hold the client's entry (slot numbers).
    let slots_holding = || -> Vec<usize> {
        (0..3)
            .filter(|s| {
                nft_list(
                    &env.topo.node,
                    &["set", "ip", "weir", &format!("affinity_{s}")],
                )
                .contains(&client_key)
            })
            .collect()
    };

    let r = tcp(&env.topo.client, "10.96.0.10:80", 20);
    assert_eq!(total(&r), 20, "{r}");
    let first = names(&r);
    assert_eq!(first.len(), 1, "one endpoint for one client: {r}");

    if mode == Mode::Ebpf {
        // eBPF mode keeps the entry in an LRU map (no nftables sets): wait out the timeout.
        let mut seen = first.clone();
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(TIMEOUT_S * 1000 + 300));
            let r = tcp(&env.topo.client, "10.96.0.10:80", 5);
            assert_eq!(total(&r), 5, "{r}");
            assert_eq!(names(&r).len(), 1, "one endpoint within a round: {r}");
            seen.extend(names(&r));
            seen.sort();
            seen.dedup();
            if seen.len() > 1 {
                return;
            }
        }
        panic!("after expiry the client moves: {seen:?}");
    }
    // The entry lives in the set of the slot whose backend answered, with a timeout.
    let slots = slots_holding();
    assert_eq!(slots.len(), 1, "{}", env.table());
    let set = nft_list(
        &env.topo.node,
        &["set", "ip", "weir", &format!("affinity_{}", slots[0])],
    );
    let entry = set.lines().find(|l| l.contains(&client_key)).unwrap_or("");
    assert!(
        entry.contains(&format!("timeout {TIMEOUT_S}s")) && entry.contains("expires"),
        "{set}"
    );
    let backends = nft_list(
        &env.topo.node,
        &["map", "ip", "weir", &format!("backends_{}", slots[0])],
    );
    let pod: usize = first[0].trim_start_matches("pod-").parse().unwrap();
    assert!(
        backends.contains(&format!("10.96.0.10 . tcp . 80 : {} . 8080", pod_ip(pod))),
        "affinity slot {} is {}'s: {backends}",
        slots[0],
        first[0]
    );

    // Once the entry expires the client is placed again: over several rounds another
    // endpoint shows up, and within a round the client stays on one.
    let mut seen = first.clone();
    for _ in 0..12 {
        wait_until(
            "the affinity entry to expire",
            Duration::from_secs(TIMEOUT_S + 5),
            || slots_holding().is_empty(),
        )
        .unwrap();
        let r = tcp(&env.topo.client, "10.96.0.10:80", 5);
        assert_eq!(total(&r), 5, "{r}");
        assert_eq!(names(&r).len(), 1, "one endpoint within a round: {r}");
        seen.extend(names(&r));
        seen.sort();
        seen.dedup();
        if seen.len() > 1 {
            break;
        }
    }
    assert!(seen.len() > 1, "after expiry the client moves: {seen:?}");
}

fn terminating_endpoints_serve_only_when_nothing_is_ready(mode: Mode) {
    let web = |first: &str, second: &str| {
        service("web", "10.96.0.10", &[], "port: 80, targetPort: 8080")
            + &slice(
                "web",
                "web-1",
                8080,
                &[
                    ep(0, NODE_NAME, first),
                    ep(1, NODE_NAME, second),
                    ep(
                        2,
                        NODE_NAME,
                        "conditions: {ready: false, serving: false, terminating: true}",
                    ),
                ],
            )
    };
    let terminating = "conditions: {ready: false, serving: true, terminating: true}";
    let Some(env) = setup(mode, 3, &web("conditions: {ready: true}", terminating)) else {
        return;
    };
    let r = tcp(&env.topo.client, "10.96.0.10:80", 40);
    assert_eq!(
        answers(&r),
        [("pod-0".to_owned(), 40)],
        "only the ready one: {r}"
    );

    let frontend = "10.96.0.10 . tcp . 80 : ";
    env.rewrite(&[], &web("conditions: {ready: false}", terminating), |t| {
        t.contains(&format!("{frontend}{} . 8080", pod_ip(1)))
            && !t.contains(&format!("{frontend}{} . 8080", pod_ip(0)))
    });
    let r = tcp(&env.topo.client, "10.96.0.10:80", 40);
    assert_eq!(
        answers(&r),
        [("pod-1".to_owned(), 40)],
        "nothing ready: the serving terminating one: {r}"
    );

    // Nothing ready or serving: no endpoint (pod-2 is not serving), the service rejects.
    let not_serving = "conditions: {ready: false, serving: false, terminating: true}";
    env.rewrite(&[], &web("conditions: {ready: false}", not_serving), |t| {
        !t.contains(frontend)
    });
    let r = tcp(&env.topo.client, "10.96.0.10:80", 3);
    assert!(answers(&r).is_empty(), "{r}");
    assert_eq!(errors(&r, "refused") + errors(&r, "unreachable"), 3, "{r}");
}

fn topology_hints_keep_traffic_in_the_node_zone(mode: Mode) {
    const ZONE: &str = "topology.kubernetes.io/zone";
    let hinted = |zone: &str| format!("zone: {zone}, hints: {{forZones: [{{name: {zone}}}]}}");
    let yaml = service("web", "10.96.0.10", &[], "port: 80, targetPort: 8080")
        + &slice(
            "web",
            "web-1",
            8080,
            &[
                ep(0, NODE_NAME, &hinted("zone-a")),
                ep(1, NODE_NAME, &hinted("zone-a")),
                ep(2, "node2", &hinted("zone-b")),
            ],
        );
    let Some(env) = setup_with(mode, &[2], 3, &[], &[(ZONE, "zone-a")], &yaml) else {
        return;
    };
    let r = tcp(&env.topo.client, "10.96.0.10:80", 90);
    assert_eq!(total(&r), 90, "{r}");
    assert_eq!(
        names(&r),
        ["pod-0", "pod-1"],
        "zone-a's endpoints only: {r}"
    );

    // The node moves to zone-b: only zone-b's endpoint.
    let pod2 = format!("10.96.0.10 . tcp . 80 : {} . 8080", pod_ip(2));
    env.rewrite(&[(ZONE, "zone-b")], &yaml, |t| {
        t.contains(&pod2) && !t.contains(&format!("10.96.0.10 . tcp . 80 : {} ", pod_ip(0)))
    });
    let r = tcp(&env.topo.client, "10.96.0.10:80", 30);
    assert_eq!(answers(&r), [("pod-2".to_owned(), 30)], "{r}");
}

fn named_target_ports_resolve_per_endpoint(mode: Mode) {
    // targetPort `http` is 8080 in pod-0 and 9090 in pod-1 (which listens on nothing else);
    // each slice carries its pods' number for the Service port `p`.
    let yaml = service(
        "web",
        "10.96.0.10",
        &["type: NodePort"],
        "port: 80, targetPort: http, nodePort: 30080",
    ) + &slice("web", "web-a", 8080, &[ep(0, NODE_NAME, "")])
        + &slice("web", "web-b", 9090, &[ep(1, NODE_NAME, "")]);
    let Some(env) = setup_with(mode, &[], 2, &[8080, 9090], &[], &yaml) else {
        return;
    };
    for dst in ["10.96.0.10:80".to_owned(), format!("{NODE_IP}:30080")] {
        let r = tcp(&env.topo.client, &dst, 40);
        assert_eq!(total(&r), 40, "{dst}: {r}");
        assert_eq!(names(&r), ["pod-0", "pod-1"], "{dst}: {r}");
    }
}
