//! The IPVS suite: weir-proxy in `--proxy-mode ipvs` on the standard node/pod/client
//! topology, with real TCP and UDP traffic. It runs only inside the VM that
//! `cargo xtask vm-test ipvs` boots (`WEIR_IN_VM=1`; the host kernel has no IPVS): every
//! test is `#[ignore]`d, so a host `cargo test` reports them as ignored rather than passed,
//! and the VM runs them with `--include-ignored`; run anywhere else, they fail.
//!
//! Building namespaces and starting processes is what costs time under TCG, so the suite
//! builds one dual-stack topology (node, client, three pods with weir-echo) and keeps one
//! weir-proxy running on it: each test adds its own Services (own ClusterIPs and NodePorts,
//! own manifest file) and removes them when it ends. weir-proxy is restarted only when a test
//! needs other flags. Tests about node-wide settings (sysctls, IPVS timeouts, `--cleanup`)
//! use a bare node namespace of their own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use weir_e2e::*;
use weir_proxy::dataplane::ipvs::netlink::KernelIpvs;
use weir_proxy::dataplane::ipvs::{IpvsBackend, IpvsState, ServiceKey, Timeouts};
use weir_proxy::model::Protocol;

const METRICS: u16 = 10249;
const WAIT: Duration = Duration::from_secs(15);
const PODS: usize = 3;

/// Checks that this process runs inside the IPVS VM (always true when it returns).
fn in_vm() -> bool {
    assert_eq!(
        std::env::var("WEIR_IN_VM").as_deref(),
        Ok("1"),
        "the IPVS suite runs inside the VM only: cargo xtask vm-test ipvs"
    );
    true
}

/// IPVS of a namespace, through generic netlink from a thread that entered it (the socket
/// stays in that namespace).
fn ipvs_of(ns: &Netns) -> KernelIpvs {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            KernelIpvs::open().unwrap()
        })
        .join()
        .unwrap()
    })
}

/// The suite's node: the topology, the manifest directory and the running weir-proxy.
struct Node {
    topo: Topology,
    dir: tempfile::TempDir,
    ipvs: KernelIpvs,
    /// weir-proxy's PID and the flags it runs with.
    proxy: Option<(u32, Vec<String>)>,
}

static NODE: Mutex<Option<Node>> = Mutex::new(None);

/// A test's hold on the shared node; its manifest file is removed when it ends.
struct Env {
    node: MutexGuard<'static, Option<Node>>,
    /// The test's manifest file (`None`: kept when the test ends).
    file: Option<String>,
}

/// The shared node with weir-proxy running with `flags` (after `--proxy-mode ipvs`), for
/// the test whose Services go to `<file>.yaml`.
fn env(file: &str, flags: &[&str]) -> Env {
    let mut guard = NODE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let mut topo = Topology::new(PODS).expect("topology");
        // Dual-stack addressing: the IPv6 test uses it, the others ignore it.
        topo.add_ipv6().expect("IPv6 addressing");
        let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
        for i in 0..PODS {
            topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        write_manifests_with_node(dir.path(), &[], &[NODE_IP, NODE_IP6], "").expect("manifests");
        let ipvs = ipvs_of(&topo.node);
        *guard = Some(Node {
            topo,
            dir,
            ipvs,
            proxy: None,
        });
    }
    let node = guard.as_mut().unwrap();
    let want: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    if node.proxy.as_ref().map(|(_, f)| f) != Some(&want) {
        if let Some((pid, _)) = node.proxy.take() {
            node.topo.node.stop(pid);
        }
        let mut all = vec![
            "--proxy-mode",
            "ipvs",
            "--network-policy",
            "false",
            // The IPv6 ranges beside the IPv4 ones the harness passes.
            "--cluster-cidr",
            "fd00:10:244::/56",
            "--service-cluster-ip-range",
            "fd00:10:96::/112",
        ];
        all.extend_from_slice(flags);
        let pid = start_proxy_with(&mut node.topo.node, node.dir.path(), METRICS, &all)
            .expect("weir-proxy");
        node.proxy = Some((pid, want));
    }
    Env {
        node: guard,
        file: Some(format!("{file}.yaml")),
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let (Some(n), Some(f)) = (self.node.as_ref(), &self.file) {
            let _ = std::fs::remove_file(n.dir.path().join(f));
        }
    }
}

impl Env {
    fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    fn client(&self) -> &Netns {
        &self.node().topo.client
    }

    /// Writes this test's Services.
    fn services(&self, yaml: &str) {
        let file = self.file.as_deref().expect("the test's manifest file");
        write_file_atomically(self.node().dir.path(), file, yaml).expect("manifest");
    }

    fn dump(&mut self) -> IpvsState {
        self.node.as_mut().unwrap().ipvs.dump().expect("IPVS dump")
    }

    /// Waits until the node's IPVS table satisfies `ok`.
    fn wait_ipvs(&mut self, what: &str, ok: impl Fn(&IpvsState) -> bool) -> IpvsState {
        let mut last = IpvsState::new();
        let r = wait_until(what, WAIT, || {
            last = self.dump();
            ok(&last)
        });
        if let Err(e) = r {
            panic!("{e}; IPVS: {last:#?}");
        }
        last
    }
}

fn key(addr: &str, protocol: Protocol, port: u16) -> ServiceKey {
    ServiceKey {
        addr: addr.parse().unwrap(),
        protocol,
        port,
    }
}

fn tcp_key(addr: &str, port: u16) -> ServiceKey {
    key(addr, Protocol::Tcp, port)
}

fn pod(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(pod_ip(i).parse().unwrap(), port)
}

fn tcp(ns: &Netns, dst: &str, count: u32) -> Value {
    probe(ns, &["tcp", dst, &count.to_string()]).unwrap()
}

/// Waits until every one of `count` connections from `ns` to `dst` is answered, by
/// exactly `want` (sorted names): a run that overlaps a sync (some refused, some answered)
/// does not count.
fn wait_answers(ns: &Netns, dst: &str, count: u32, want: &[&str]) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(&format!("{dst} answered by {want:?}"), WAIT, || {
        last = tcp(ns, dst, count);
        let mut n = names(&last);
        n.sort();
        n == want && total(&last) == u64::from(count)
    });
    if let Err(e) = ok {
        panic!("{e}; last report {last}");
    }
    last
}

fn probe_get(node: &Netns, path: &str) -> String {
    let bin = workspace_bin("weir-probe");
    let out = node
        .exec(&[
            &bin.to_string_lossy(),
            "get",
            &format!("127.0.0.1:{METRICS}"),
            path,
        ])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn clusterip_and_nodeport_spread_over_every_endpoint_and_proxy_mode_is_ipvs() {
    if !in_vm() {
        return;
    }
    let mut env = env("spread", &[]);
    env.services(&service_yaml(
        "spread",
        "10.96.1.10",
        "TCP",
        80,
        Some(30081),
        8080,
        &[0, 1, 2],
    ));
    let vip = tcp_key("10.96.1.10", 80);
    let t = env.wait_ipvs("the ClusterIP virtual server", |t| {
        t.get(&vip).is_some_and(|s| s.dests.len() == 3)
    });
    assert_eq!(t[&vip].server.scheduler, "rr");
    assert!(t.contains_key(&tcp_key(NODE_IP, 30081)), "{t:#?}");
    let all = ["pod-0", "pod-1", "pod-2"];
    let r = wait_answers(env.client(), "10.96.1.10:80", 30, &all);
    assert_eq!(total(&r), 30, "{r}");
    let r = wait_answers(env.client(), &format!("{NODE_IP}:30081"), 30, &all);
    assert_eq!(total(&r), 30, "{r}");
    // rr: an even spread.
    for (name, n) in answers(&r) {
        assert_eq!(n, 10, "{name} in {r}");
    }
    let node = &env.node().topo.node;
    assert_eq!(probe_get(node, "/proxyMode"), "ipvs");
    // The ClusterIP is bound to weir-ipvs0.
    let addrs = node
        .exec(&["ip", "-o", "addr", "show", "dev", "weir-ipvs0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&addrs.stdout).contains("10.96.1.10/32"));
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn every_scheduler_is_programmed_and_source_hashing_keeps_a_client_on_one_endpoint() {
    if !in_vm() {
        return;
    }
    let svc = service_yaml("sched", "10.96.2.10", "TCP", 80, None, 8080, &[0, 1, 2]);
    let vip = tcp_key("10.96.2.10", 80);
    // One topology; weir-proxy restarts with each scheduler and adopts the virtual server
    // the previous run left (IPVS_CMD_SET_SERVICE changes its scheduler).
    for sched in ["wrr", "lc", "wlc", "dh", "mh", "sh"] {
        let mut env = env("sched", &["--ipvs-scheduler", sched]);
        env.services(&svc);
        env.wait_ipvs(&format!("the virtual server with {sched}"), |t| {
            t.get(&vip)
                .is_some_and(|s| s.server.scheduler == sched && s.dests.len() == 3)
        });
        let r = tcp(env.client(), "10.96.2.10:80", 12);
        assert_eq!(total(&r), 12, "{sched}: {r}");
        let n = names(&r);
        match sched {
            // Hashing schedulers: one client (sh, mh) or one destination (dh) -> one pod.
            "sh" | "dh" | "mh" => assert_eq!(n.len(), 1, "{sched}: {r}"),
            _ => assert_eq!(n.len(), 3, "{sched}: {r}"),
        }
        // Kept for the next round (the next weir-proxy adopts it).
        env.file = None;
    }
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn a_service_without_endpoints_is_rejected() {
    if !in_vm() {
        return;
    }
    let mut env = env("empty", &[]);
    env.services(&service_yaml(
        "empty",
        "10.96.3.20",
        "TCP",
        80,
        None,
        8080,
        &[],
    ));
    let vip = tcp_key("10.96.3.20", 80);
    env.wait_ipvs("the empty virtual server", |t| t.contains_key(&vip));
    let r = tcp(env.client(), "10.96.3.20:80", 3);
    assert_eq!(errors(&r, "refused"), 3, "{r}");
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn a_removed_endpoint_gets_no_new_connections() {
    if !in_vm() {
        return;
    }
    let mut env = env("removed", &[]);
    let svc = |pods: &[usize]| service_yaml("removed", "10.96.4.10", "TCP", 80, None, 8080, pods);
    env.services(&svc(&[0, 1, 2]));
    wait_answers(
        env.client(),
        "10.96.4.10:80",
        30,
        &["pod-0", "pod-1", "pod-2"],
    );
    env.services(&svc(&[0, 1]));
    let r = wait_answers(env.client(), "10.96.4.10:80", 30, &["pod-0", "pod-1"]);
    assert_eq!(total(&r), 30, "{r}");
    // Graceful termination: the real server stays at weight 0 while its (TIME_WAIT)
    // connections drain; it is deleted once they are gone or after the drain timeout.
    let vip = tcp_key("10.96.4.10", 80);
    env.wait_ipvs("pod-2's real server at weight 0 or deleted", |t| {
        t.get(&vip)
            .is_some_and(|s| s.dests.get(&pod(2, 8080)).is_none_or(|d| d.weight == 0))
    });
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn a_removed_endpoint_without_connections_is_deleted_after_its_drain_check() {
    if !in_vm() {
        return;
    }
    let mut env = env("drained", &[]);
    let svc = |pods: &[usize]| service_yaml("drained", "10.96.4.30", "TCP", 80, None, 8080, pods);
    env.services(&svc(&[0, 1, 2]));
    let vip = tcp_key("10.96.4.30", 80);
    env.wait_ipvs("three real servers", |t| {
        t.get(&vip).is_some_and(|s| s.dests.len() == 3)
    });
    // No traffic: the removed real server goes to weight 0, and the re-check sync (which
    // reads only this virtual server back) finds no connection and deletes it.
    env.services(&svc(&[0, 1]));
    env.wait_ipvs("pod-2's real server deleted, the others kept", |t| {
        t.get(&vip).is_some_and(|s| {
            s.dests.keys().copied().collect::<Vec<_>>() == [pod(0, 8080), pod(1, 8080)]
                && s.dests.values().all(|d| d.weight == 1)
        })
    });
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn udp_reaches_the_endpoints_and_a_removed_udp_endpoint_is_deleted_at_once() {
    if !in_vm() {
        return;
    }
    let mut env = env("dns", &[]);
    let svc = |pods: &[usize]| service_yaml("dns", "10.96.5.53", "UDP", 53, None, 5353, pods);
    env.services(&svc(&[0, 1]));
    let vip = key("10.96.5.53", Protocol::Udp, 53);
    env.wait_ipvs("the UDP virtual server", |t| {
        t.get(&vip).is_some_and(|s| s.dests.len() == 2)
    });
    let mut last = Value::Null;
    wait_until("UDP answers", WAIT, || {
        last = probe(env.client(), &["udp", "10.96.5.53:53", "10"]).unwrap();
        total(&last) == 10
    })
    .unwrap_or_else(|e| panic!("{e}; {last}"));
    // UDP has no connection end to wait for: the real server goes at once (kube-proxy
    // does the same), its flows end on their next packet (expire_nodest_conn).
    env.services(&svc(&[0]));
    let t = env.wait_ipvs("pod-1's UDP real server deleted", |t| {
        t.get(&vip).is_some_and(|s| s.dests.len() == 1)
    });
    assert!(t[&vip].dests.contains_key(&pod(0, 5353)), "{t:#?}");
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn session_affinity_is_a_persistent_virtual_server() {
    if !in_vm() {
        return;
    }
    let mut env = env("affinity", &[]);
    env.services(
        &service_yaml("affinity", "10.96.6.10", "TCP", 80, None, 8080, &[0, 1, 2]).replace(
            "  type: ClusterIP\n",
            "  type: ClusterIP\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 120}}\n",
        ),
    );
    let vip = tcp_key("10.96.6.10", 80);
    env.wait_ipvs("a persistent virtual server with 3 real servers", |t| {
        // Netlink reports the timeout in seconds (/proc/net/ip_vs prints jiffies).
        t.get(&vip)
            .is_some_and(|s| s.server.persistent_timeout == Some(120) && s.dests.len() == 3)
    });
    let r = tcp(env.client(), "10.96.6.10:80", 20);
    assert_eq!(total(&r), 20, "{r}");
    assert_eq!(names(&r).len(), 1, "one client, one endpoint: {r}");
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn etp_local_nodeport_reaches_only_this_nodes_endpoints() {
    if !in_vm() {
        return;
    }
    let env = env("etp", &[]);
    // Pods 0 and 1 are local, pod 2 is labelled as node2's.
    env.services(
        &service_yaml(
            "etp",
            "10.96.7.10",
            "TCP",
            80,
            Some(30087),
            8080,
            &[0, 1, 2],
        )
        .replace(
            "  type: NodePort\n",
            "  type: NodePort\n  externalTrafficPolicy: Local\n",
        )
        .replacen(
            &format!("[\"{}\"], nodeName: {NODE_NAME}", pod_ip(2)),
            &format!("[\"{}\"], nodeName: node2", pod_ip(2)),
            1,
        ),
    );
    let r = wait_answers(
        env.client(),
        &format!("{NODE_IP}:30087"),
        30,
        &["pod-0", "pod-1"],
    );
    assert_eq!(total(&r), 30, "{r}");
    wait_answers(
        env.client(),
        "10.96.7.10:80",
        30,
        &["pod-0", "pod-1", "pod-2"],
    );
}

/// A LoadBalancer Service on 192.0.2.90 (ClusterIP 10.96.9.10, NodePort 30089) with pods 0
/// and 1 behind it, admitting only `range`.
fn load_balancer(range: &str) -> String {
    service_yaml("lb", "10.96.9.10", "TCP", 80, Some(30089), 8080, &[0, 1])
        .replace(
            "  type: NodePort\n",
            &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [\"{range}\"]\n"),
        )
        .replacen(
            "\n---\napiVersion: discovery.k8s.io/v1",
            "\nstatus:\n  loadBalancer:\n    ingress: [{ip: 192.0.2.90}]\n---\napiVersion: discovery.k8s.io/v1",
            1,
        )
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn load_balancer_ip_admits_only_clients_in_its_source_ranges() {
    if !in_vm() {
        return;
    }
    let mut env = env("lb", &[]);
    // The external client reaches the load-balancer IP through the node (as if the load
    // balancer delivered it there); pod-2, no endpoint, is the other client.
    let _ = env.node().topo.client_route_via_node("192.0.2.90/32");
    env.services(&load_balancer(&format!("{CLIENT_IP}/32")));
    let lb = tcp_key("192.0.2.90", 80);
    env.wait_ipvs("the load-balancer virtual server", |t| {
        t.get(&lb).is_some_and(|s| s.dests.len() == 2)
    });
    let both = ["pod-0", "pod-1"];
    wait_answers(env.client(), "192.0.2.90:80", 10, &both);
    let pod2 = &env.node().topo.pods[2];
    let r = tcp(pod2, "192.0.2.90:80", 2);
    assert!(answers(&r).is_empty(), "pod-2 is outside the range: {r}");
    assert_eq!(errors(&r, "timeout"), 2, "dropped, not rejected: {r}");
    // The ClusterIP is not firewalled.
    let r = tcp(pod2, "10.96.9.10:80", 10);
    assert_eq!(total(&r), 10, "ClusterIP from pod-2: {r}");

    // Now only pod-2's address is in the range: the roles swap.
    env.services(&load_balancer(&format!("{}/32", pod_ip(2))));
    let pod2 = &env.node().topo.pods[2];
    wait_answers(pod2, "192.0.2.90:80", 10, &both);
    let r = tcp(env.client(), "192.0.2.90:80", 2);
    assert!(
        answers(&r).is_empty(),
        "the client is outside the range: {r}"
    );
    assert_eq!(errors(&r, "timeout"), 2, "dropped, not rejected: {r}");
    let r = tcp(env.client(), &format!("{NODE_IP}:30089"), 10);
    assert_eq!(total(&r), 10, "the NodePort is not firewalled: {r}");
}

/// An IPv6 single-stack Service: ClusterIP fd00:10:96::20, NodePort 30090, pods 0 and 1's
/// IPv6 addresses behind it.
fn ipv6_service() -> String {
    let eps = endpoints_yaml([0, 1].iter().map(|i| (pod_ip6(*i), NODE_NAME)));
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web6, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: \"fd00:10:96::20\"\n  clusterIPs: [\"fd00:10:96::20\"]\n  ipFamilies: [IPv6]\n  ports: [{{name: p, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web6-1, namespace: demo, labels: {{kubernetes.io/service-name: web6}}}}\naddressType: IPv6\nports: [{{name: p, protocol: TCP, port: 8080}}]\nendpoints:{eps}"
    )
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn ipv6_clusterip_and_nodeport_reach_ipv6_endpoints() {
    if !in_vm() {
        return;
    }
    let mut env = env("web6", &[]);
    env.services(&ipv6_service());
    let vip = tcp_key("fd00:10:96::20", 80);
    let np = tcp_key(NODE_IP6, 30090);
    let t = env.wait_ipvs("the IPv6 virtual servers", |t| {
        [vip, np]
            .iter()
            .all(|k| t.get(k).is_some_and(|s| s.dests.len() == 2))
    });
    let want: Vec<SocketAddr> = [0, 1]
        .iter()
        .map(|i| SocketAddr::new(pod_ip6(*i).parse().unwrap(), 8080))
        .collect();
    assert_eq!(t[&vip].dests.keys().copied().collect::<Vec<_>>(), want);
    // No IPv4 virtual server for a single-stack IPv6 Service.
    assert!(!t.contains_key(&tcp_key(NODE_IP, 30090)), "{t:#?}");
    let node = &env.node().topo.node;
    let addrs = node
        .exec(&["ip", "-o", "-6", "addr", "show", "dev", "weir-ipvs0"])
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains("fd00:10:96::20/128"), "{addrs}");
    let both = ["pod-0", "pod-1"];
    let r = wait_answers(env.client(), "[fd00:10:96::20]:80", 20, &both);
    assert_eq!(total(&r), 20, "{r}");
    let r = wait_answers(env.client(), &format!("[{NODE_IP6}]:30090"), 20, &both);
    assert_eq!(total(&r), 20, "{r}");
    // From a pod (pod-2 is no endpoint), inside the IPv6 cluster CIDR.
    let pod2 = &env.node().topo.pods[2];
    let r = wait_answers(pod2, "[fd00:10:96::20]:80", 20, &both);
    assert_eq!(total(&r), 20, "{r}");
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn pod_reaches_itself_through_its_own_service_hairpin() {
    if !in_vm() {
        return;
    }
    let mut env = env("hairpin", &[]);
    env.services(&service_yaml(
        "hairpin",
        "10.96.10.10",
        "TCP",
        80,
        None,
        8080,
        &[0],
    ));
    let vip = tcp_key("10.96.10.10", 80);
    env.wait_ipvs("the hairpin virtual server", |t| {
        t.get(&vip).is_some_and(|s| s.dests.len() == 1)
    });
    // pod-0 is the only endpoint: IPVS sends its connection back to itself, and only a
    // masquerade (to the node's address) makes the answer come back through the node.
    let pod0 = &env.node().topo.pods[0];
    let r = wait_answers(pod0, "10.96.10.10:80", 10, &["pod-0"]);
    assert_eq!(total(&r), 10, "{r}");
}

/// A node namespace without pods or client: for node-wide settings.
struct BareNode {
    ns: Netns,
    dir: tempfile::TempDir,
    ipvs: KernelIpvs,
}

fn bare_node(services: &str) -> BareNode {
    let ns = Netns::new("bare").expect("netns");
    // The node address (NodePorts are served on it).
    ns.exec(&["ip", "link", "add", "eth0", "type", "dummy"])
        .unwrap();
    ns.exec(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])
        .unwrap();
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests(dir.path(), services).expect("manifests");
    let ipvs = ipvs_of(&ns);
    BareNode { ns, dir, ipvs }
}

fn sysctl(ns: &Netns, key: &str) -> String {
    let out = ns.exec(&["cat", &format!("/proc/sys/{key}")]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn strict_arp_and_ipvs_timeouts_are_set_from_flags() {
    if !in_vm() {
        return;
    }
    let mut n = bare_node("");
    assert_eq!(sysctl(&n.ns, "net/ipv4/conf/all/arp_ignore"), "0");
    let before = n.ipvs.timeouts().unwrap();
    assert_ne!(before.tcp, 1234, "{before:?}");
    start_proxy_with(
        &mut n.ns,
        n.dir.path(),
        METRICS,
        &[
            "--proxy-mode",
            "ipvs",
            "--network-policy",
            "false",
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout",
            "1234s",
            "--ipvs-tcpfin-timeout",
            "56s",
            "--ipvs-udp-timeout",
            "78s",
        ],
    )
    .expect("weir-proxy");
    assert_eq!(sysctl(&n.ns, "net/ipv4/conf/all/arp_ignore"), "1");
    assert_eq!(sysctl(&n.ns, "net/ipv4/conf/all/arp_announce"), "2");
    assert_eq!(
        n.ipvs.timeouts().unwrap(),
        Timeouts {
            tcp: 1234,
            tcp_fin: 56,
            udp: 78
        }
    );
}

#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn virtual_servers_that_are_not_weirs_survive_syncs_and_cleanup() {
    if !in_vm() {
        return;
    }
    use weir_proxy::dataplane::ipvs::{Op, VirtualServer};
    let svc = service_yaml("own", "10.96.8.10", "TCP", 80, Some(30088), 8080, &[0]);
    let mut n = bare_node(&svc);
    // Someone else's: a VIP not on weir-ipvs0, a node-address port outside the NodePort
    // range.
    let foreign = [tcp_key("192.0.2.1", 80), tcp_key(NODE_IP, 8443)];
    for k in foreign {
        n.ipvs
            .apply(&Op::AddService(VirtualServer {
                key: k,
                scheduler: "rr".into(),
                persistent_timeout: None,
            }))
            .unwrap();
    }
    let pid = start_proxy_with(
        &mut n.ns,
        n.dir.path(),
        METRICS,
        &["--proxy-mode", "ipvs", "--network-policy", "false"],
    )
    .expect("weir-proxy");
    let ours = [tcp_key("10.96.8.10", 80), tcp_key(NODE_IP, 30088)];
    let mut last = IpvsState::new();
    wait_until("weir's virtual servers beside the others", WAIT, || {
        last = n.ipvs.dump().unwrap();
        ours.iter().chain(&foreign).all(|k| last.contains_key(k))
    })
    .unwrap_or_else(|e| panic!("{e}: {last:#?}"));
    // The Service goes: weir deletes its virtual servers, not the others.
    write_manifests(n.dir.path(), "").unwrap();
    wait_until("weir's virtual servers gone", WAIT, || {
        last = n.ipvs.dump().unwrap();
        ours.iter().all(|k| !last.contains_key(k))
    })
    .unwrap_or_else(|e| panic!("{e}: {last:#?}"));
    assert!(foreign.iter().all(|k| last.contains_key(k)), "{last:#?}");
    // --cleanup after a run that left a Service behind.
    write_manifests(n.dir.path(), &svc).unwrap();
    wait_until("weir's virtual servers back", WAIT, || {
        last = n.ipvs.dump().unwrap();
        ours.iter().all(|k| last.contains_key(k))
    })
    .unwrap_or_else(|e| panic!("{e}: {last:#?}"));
    n.ns.stop(pid);
    let bin = workspace_bin("weir-proxy");
    n.ns.exec(&[&bin.to_string_lossy(), "--cleanup"])
        .expect("weir-proxy --cleanup");
    let left: Vec<ServiceKey> = n.ipvs.dump().unwrap().into_keys().collect();
    assert_eq!(left, foreign.to_vec());
    let links = n.ns.exec(&["ip", "-o", "link"]).unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains("weir-ipvs0"));
    // The node address is still there (only weir-ipvs0's were removed).
    let addrs = n.ns.exec(&["ip", "-o", "addr"]).unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains(NODE_IP), "{addrs}");
}

/// `services` ClusterIP Services (10.96.x.y:80) with ten endpoints each; the first `extra`
/// have an eleventh.
fn many_services(services: u32, extra: u32) -> weir_proxy::model::DesiredState {
    use weir_proxy::model::{
        DesiredState, Endpoint, ServiceInfo, ServicePortName, ServicePortState,
    };
    let mut state = DesiredState::default();
    for i in 0..services {
        let name = ServicePortName {
            namespace: "cost".into(),
            name: format!("s{i}"),
            port: "p".into(),
            protocol: Protocol::Tcp,
        };
        let ip = std::net::Ipv4Addr::from(u32::from_be_bytes([10, 96, 0, 0]) + 256 + i);
        let info = ServiceInfo::new(name.clone(), vec![ip.into()], 80);
        let count = if i < extra { 11 } else { 10 };
        let eps = (0..count)
            .map(|d| Endpoint {
                ip: std::net::Ipv4Addr::new(10, 244, (i % 250) as u8, d as u8 + 1).into(),
                port: 8080,
                is_local: false,
            })
            .collect();
        state
            .services
            .insert(name, ServicePortState::from_endpoints(info, eps));
    }
    state
}

/// Not a behaviour test: what an idle sync and a one-endpoint change cost against the
/// guest kernel's IPVS at 1,000 and 10,000 Services x 10 endpoints, next to an idle sync
/// that dumps (what every sync did before). It runs only when asked for by name (the suite
/// stays fast): `cargo xtask vm-test ipvs --filter ipvs_sync_cost`.
#[test]
#[ignore = "runs inside the IPVS VM: cargo xtask vm-test ipvs"]
fn ipvs_sync_cost() {
    if !in_vm() {
        return;
    }
    if !std::env::args().any(|a| a.contains("ipvs_sync_cost")) {
        eprintln!("ipvs_sync_cost: a measurement; run it with --filter ipvs_sync_cost");
        return;
    }
    use std::time::Instant;
    use weir_proxy::dataplane::ipvs::apply::{Changed, IpvsOptions, IpvsSync};
    use weir_proxy::dataplane::ipvs::render::IpvsConfig;
    use weir_proxy::model::ServiceDelta;
    for n in [1_000u32, 10_000] {
        let ns = Netns::new("cost").expect("netns");
        let path = format!("/run/netns/{}", ns.name());
        let line = std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).unwrap();
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut sync =
                        IpvsSync::new(IpvsConfig::default(), IpvsOptions::default()).unwrap();
                    let base = many_services(n, 0);
                    let t = Instant::now();
                    let r = sync.sync(&base, true, Changed::Everything).await.unwrap();
                    let first = t.elapsed();
                    assert_eq!(r.failed, 0);
                    let rounds = 5u32;
                    let t = Instant::now();
                    for _ in 0..rounds {
                        let r = sync.sync(&base, false, Changed::Nothing).await.unwrap();
                        assert!(!r.dumped && r.ops == 0, "{r:?}");
                    }
                    let idle = t.elapsed() / rounds;
                    // A sync told that something changed when nothing did: the render and
                    // diff of every Service, without a dump.
                    let t = Instant::now();
                    for _ in 0..rounds {
                        let r = sync.sync(&base, false, Changed::Everything).await.unwrap();
                        assert!(!r.dumped && r.ops == 0, "{r:?}");
                    }
                    let rendered = t.elapsed() / rounds;
                    let t = Instant::now();
                    for _ in 0..2 {
                        let r = sync.sync(&base, true, Changed::Everything).await.unwrap();
                        assert!(r.dumped && r.ops == 0, "{r:?}");
                    }
                    let dumping = t.elapsed() / 2;
                    // Each round adds one endpoint to one more Service (a removal would
                    // start a drain, during which syncs dump to read the counters), as the
                    // runner reports it: that one Service port's change.
                    let states: Vec<_> = (0..=rounds).map(|k| many_services(n, k)).collect();
                    let deltas: Vec<Vec<ServiceDelta>> = (1..=rounds as usize)
                        .map(|k| {
                            let want = format!("s{}", k - 1);
                            let name = states[k].services.keys().find(|n| n.name == want).unwrap();
                            vec![ServiceDelta {
                                name: name.clone(),
                                old: Some(states[k - 1].services[name].clone()),
                                new: Some(states[k].services[name].clone()),
                            }]
                        })
                        .collect();
                    let t = Instant::now();
                    for (k, d) in deltas.iter().enumerate() {
                        let r = sync
                            .sync(&states[k + 1], false, Changed::Ports(d))
                            .await
                            .unwrap();
                        assert_eq!((r.dumped, r.ops, r.failed), (false, 1, 0), "{r:?}");
                    }
                    let change = t.elapsed() / rounds;
                    // The kernel holds what a full render wants.
                    let r = sync
                        .sync(&states[rounds as usize], true, Changed::Everything)
                        .await
                        .unwrap();
                    assert_eq!((r.dumped, r.ops), (true, 0), "{r:?}");
                    format!(
                        "ipvs_sync_cost: {n} services x 10 endpoints: first sync {first:?}, \
                         idle sync {idle:?}, no-op sync rendering every Service {rendered:?}, \
                         the same with a dump {dumping:?}, one endpoint added {change:?}"
                    )
                })
            })
            .join()
            .unwrap()
        });
        // Straight to stderr: libtest captures eprintln! of passing tests.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}
