//! eBPF mode (first slice) with real sockets: weir-proxy attaches its cgroup socket hooks to
//! a cgroup of the test's own (never the host's root cgroup) and pins under a bpffs
//! directory of the test's own; a client process placed in that cgroup, inside a pod
//! namespace, reaches ClusterIPs over TCP and UDP. The tc programs on the node's external
//! interface (`eth0`, found from the Node's address) serve the external client
//! (198.51.100.2): NodePorts, external IPs, session affinity, Maglev.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use weir_e2e::mode::{probe_in_cgroup, BpfDir, Cgroup};
use weir_e2e::*;

const METRICS: u16 = 10249;

struct Env {
    // Field order is drop order: the proxy and pods go before the cgroup and the pins.
    topo: Topology,
    dir: tempfile::TempDir,
    cgroup: Cgroup,
    bpf: BpfDir,
    proxy: u32,
    /// Extra weir-proxy flags.
    extra: Vec<String>,
}

impl Env {
    /// weir-probe in the client pod (the last pod), inside the test's cgroup.
    fn probe(&self, args: &[&str]) -> serde_json::Value {
        probe_in_cgroup(self.topo.pods.last().unwrap(), &self.cgroup, args).unwrap()
    }

    fn proxy_flags(&self) -> Vec<String> {
        vec![
            "--proxy-mode".into(),
            "ebpf".into(),
            "--ebpf-cgroup".into(),
            self.cgroup.0.display().to_string(),
            "--bpffs-dir".into(),
            self.bpf.0.display().to_string(),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect()
    }

    /// weir-probe in the external client's namespace.
    fn external(&self, args: &[&str]) -> serde_json::Value {
        probe(&self.topo.client, args).unwrap()
    }
}

fn services(web_pods: &[usize], dns_pods: &[usize]) -> String {
    let mut s = service_yaml("web", "10.96.0.10", "TCP", 80, None, 8080, web_pods);
    s.push_str(&service_yaml(
        "dns",
        "10.96.0.53",
        "UDP",
        53,
        None,
        5353,
        dns_pods,
    ));
    s.push_str(&service_yaml(
        "empty",
        "10.96.0.20",
        "TCP",
        80,
        None,
        8080,
        &[],
    ));
    s
}

/// `backends` echo pods plus one client pod, weir-proxy in eBPF mode.
fn setup(backends: usize) -> Option<Env> {
    let all: Vec<usize> = (0..backends).collect();
    setup_with(backends, &services(&all, &all), &[])
}

/// [`setup`] with these manifests and extra weir-proxy flags.
fn setup_with(backends: usize, manifests: &str, extra: &[&str]) -> Option<Env> {
    if !require_privileges() {
        return None;
    }
    let mut topo = Topology::new(backends + 1).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..backends {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests(dir.path(), manifests).expect("manifests");
    let mut env = Env {
        topo,
        dir,
        cgroup: Cgroup::new().unwrap(),
        bpf: BpfDir::unique(),
        proxy: 0,
        extra: extra.iter().map(|s| s.to_string()).collect(),
    };
    let flags = env.proxy_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    env.proxy =
        start_proxy_with(&mut env.topo.node, env.dir.path(), METRICS, &flags).expect("weir-proxy");
    Some(env)
}

fn assert_spread(r: &serde_json::Value, backends: usize, count: u64) {
    let a = answers(r);
    assert_eq!(a.len(), backends, "every backend answers: {r}");
    assert_eq!(total(r), count, "{r}");
    for (name, n) in &a {
        assert!(
            *n * backends as u64 <= count * 2,
            "{name} got {n} of {count}: {r}"
        );
    }
}

#[test]
fn verifier_accepts_every_program() {
    if !require_privileges() {
        return;
    }
    use weir_proxy::dataplane::ebpf::kernel::{ensure_bpffs_dir, load, program_names};
    let bpf = BpfDir::unique();
    ensure_bpffs_dir(&bpf.0).unwrap();
    let level = aya::VerifierLogLevel::DEBUG | aya::VerifierLogLevel::STATS;
    match load(&bpf.0, level) {
        Ok(ebpf) => {
            let names = program_names(&ebpf);
            assert_eq!(names.len(), 11, "{names:?}");
        }
        Err(e) => panic!("the verifier rejected a program:\n{e}"),
    }
}

#[test]
fn clusterip_tcp_and_udp_spread_over_all_endpoints_and_replies_come_from_the_clusterip() {
    let Some(env) = setup(3) else { return };
    let r = env.probe(&["tcp", "10.96.0.10:80", "150"]);
    assert_spread(&r, 3, 150);
    // Unconnected sockets: sendmsg translates, recvmsg reports the ClusterIP as source.
    let r = env.probe(&["udp-each", "10.96.0.53:53", "90"]);
    assert_eq!(errors(&r, "wrong_source"), 0, "{r}");
    assert_spread(&r, 3, 90);
    // Connected UDP socket: connect translates, replies still read from the ClusterIP.
    let r = env.probe(&["udp", "10.96.0.53:53", "10"]);
    assert_eq!(total(&r), 10, "{r}");
    let r = env.probe(&["peername", "10.96.0.10:80"]);
    assert_eq!(
        r["peername"], "10.96.0.10:80",
        "getpeername reports the ClusterIP"
    );
    let body = run(
        "ip",
        &[
            "netns",
            "exec",
            env.topo.node.name(),
            &workspace_bin("weir-probe").to_string_lossy(),
            "get",
            &format!("127.0.0.1:{METRICS}"),
            "/proxyMode",
        ],
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&body.stdout), "ebpf");
}

#[test]
fn service_without_endpoints_is_refused_at_once() {
    let Some(env) = setup(1) else { return };
    let started = std::time::Instant::now();
    let r = env.probe(&["tcp", "10.96.0.20:80", "5"]);
    assert_eq!(errors(&r, "refused"), 5, "ECONNREFUSED, not a timeout: {r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

#[test]
fn removed_endpoint_stops_receiving_new_connections() {
    let Some(env) = setup(3) else { return };
    let before = last_sync(&env.topo.node, METRICS).unwrap();
    write_manifests(env.dir.path(), &services(&[0, 1], &[0, 1])).unwrap();
    wait_synced(&env.topo.node, METRICS, before).unwrap();
    let r = env.probe(&["tcp", "10.96.0.10:80", "60"]);
    assert_eq!(total(&r), 60, "{r}");
    assert!(
        names(&r).iter().all(|n| n != "pod-2"),
        "pod-2 was removed: {r}"
    );
    let r = env.probe(&["udp-each", "10.96.0.53:53", "30"]);
    assert_eq!(total(&r), 30, "{r}");
    assert!(
        names(&r).iter().all(|n| n != "pod-2"),
        "pod-2 was removed: {r}"
    );
}

#[test]
fn a_restarted_daemon_adopts_the_maps_and_cleanup_leaves_no_programs_or_pins() {
    let Some(mut env) = setup(2) else { return };
    let r = env.probe(&["tcp", "10.96.0.10:80", "10"]);
    assert_eq!(total(&r), 10, "{r}");
    env.topo.node.stop(env.proxy);
    // The daemon is gone; the pinned links and maps keep translating.
    let r = env.probe(&["tcp", "10.96.0.10:80", "10"]);
    assert_eq!(total(&r), 10, "traffic flows while the daemon is down: {r}");
    let flags = env.proxy_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let pid = start_proxy_with(&mut env.topo.node, env.dir.path(), METRICS + 1, &flags).unwrap();
    let r = env.probe(&["tcp", "10.96.0.10:80", "10"]);
    assert_eq!(total(&r), 10, "{r}");
    env.topo.node.stop(pid);
    let pins: Vec<_> = std::fs::read_dir(&env.bpf.0).unwrap().flatten().collect();
    assert!(
        pins.len() >= 10,
        "9 links and the maps are pinned: {pins:?}"
    );
    let bin = workspace_bin("weir-proxy");
    let netns = format!("--net=/run/netns/{}", env.topo.node.name());
    let bpf = env.bpf.0.display().to_string();
    let cg = env.cgroup.0.display().to_string();
    run(
        "nsenter",
        &[
            &netns,
            &bin.to_string_lossy(),
            "--cleanup",
            "--proxy-mode",
            "ebpf",
            "--bpffs-dir",
            &bpf,
            "--ebpf-cgroup",
            &cg,
        ],
    )
    .unwrap();
    assert!(!env.bpf.0.exists(), "the pin directory is gone");
    // No program stays attached: without translation the ClusterIP goes nowhere.
    let r = env.probe(&["tcp", "10.96.0.10:80", "1"]);
    assert_eq!(total(&r), 0, "{r}");
}

#[test]
fn pinned_maps_of_another_layout_are_replaced_on_start() {
    let Some(mut env) = setup(2) else { return };
    env.topo.node.stop(env.proxy);
    // What an upgrade that changed a key type leaves: a map of another layout pinned under
    // the connection-tracking map's name (here the affinity map, moved there).
    let pin = |name: &str| env.bpf.0.join(name);
    std::fs::remove_file(pin("WEIR_CT")).unwrap();
    std::fs::rename(pin("WEIR_AFFINITY"), pin("WEIR_CT")).unwrap();
    let flags = env.proxy_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let pid = start_proxy_with(&mut env.topo.node, env.dir.path(), METRICS + 1, &flags)
        .expect("weir-proxy starts over a stale pin");
    let r = env.probe(&["tcp", "10.96.0.10:80", "10"]);
    assert_eq!(total(&r), 10, "{r}");
    assert!(pin("WEIR_AFFINITY").exists() && pin("WEIR_CT").exists());
    env.topo.node.stop(pid);
}

/// A Service `name` (namespace demo) with ClusterIP `cluster_ip`, the extra `spec` lines,
/// one port `protocol` `port` -> 8080 (TCP) or 5353 (UDP) with NodePort `node_port`, and
/// endpoints `(pod, node)`.
fn service(
    name: &str,
    cluster_ip: &str,
    spec: &[&str],
    protocol: &str,
    port: u16,
    node_port: u16,
    endpoints: &[(usize, &str)],
) -> String {
    let target = if protocol == "UDP" { 5353 } else { 8080 };
    let extra: String = spec.iter().map(|l| format!("  {l}\n")).collect();
    let eps = endpoints_yaml(endpoints.iter().map(|(pod, node)| (pod_ip(*pod), node)));
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: {cluster_ip}\n{extra}  ports: [{{name: p, protocol: {protocol}, port: {port}, targetPort: {target}, nodePort: {node_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, protocol: {protocol}, port: {target}}}]\nendpoints:{eps}"
    )
}

fn on_node1(pods: &[usize]) -> Vec<(usize, &'static str)> {
    pods.iter().map(|p| (*p, NODE_NAME)).collect()
}

#[test]
fn external_client_reaches_nodeport_and_external_ip_over_all_endpoints_through_tc() {
    let eps = on_node1(&[0, 1, 2]);
    let mut m = service(
        "web",
        "10.96.0.10",
        &["externalIPs: [192.0.2.90]"],
        "TCP",
        80,
        30080,
        &eps,
    );
    m.push_str(&service("dns", "10.96.0.53", &[], "UDP", 53, 30053, &eps));
    m.push_str(&service("empty", "10.96.0.20", &[], "TCP", 80, 30082, &[]));
    let Some(env) = setup_with(3, &m, &[]) else {
        return;
    };
    env.topo.client_route_via_node("192.0.2.90").unwrap();
    let nodeport = format!("{NODE_IP}:30080");
    let r = env.external(&["tcp", &nodeport, "150"]);
    assert_spread(&r, 3, 150);
    let r = env.external(&["tcp", "192.0.2.90:80", "90"]);
    assert_spread(&r, 3, 90);
    // The ClusterIP, routed to the node by the client, goes through the same path.
    let r = env.external(&["tcp", "10.96.0.10:80", "30"]);
    assert_spread(&r, 3, 30);
    // UDP: every reply comes back from the NodePort the client sent to.
    let r = env.external(&["udp-each", &format!("{NODE_IP}:30053"), "60"]);
    assert_eq!(errors(&r, "wrong_source"), 0, "{r}");
    assert_spread(&r, 3, 60);
    // Backends on this node see the client's own address (no SNAT in eBPF mode).
    let r = env.external(&["peer", &nodeport]);
    assert_eq!(
        r["peer"].as_str().unwrap().split(':').next(),
        Some(CLIENT_IP)
    );
    // No endpoints: the node's stack resets the connection (no listener on the port).
    let started = std::time::Instant::now();
    let r = env.external(&["tcp", &format!("{NODE_IP}:30082"), "3"]);
    assert_eq!(errors(&r, "refused"), 3, "{r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    let links: Vec<String> = std::fs::read_dir(&env.bpf.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link_tc_"))
        .collect();
    assert_eq!(links.len(), 2, "TCX links on eth0, pinned: {links:?}");
}

#[test]
fn etp_local_nodeport_preserves_the_source_and_uses_only_local_endpoints() {
    let eps = [(0, NODE_NAME), (1, "node2")];
    let m = service(
        "local",
        "10.96.0.10",
        &["externalTrafficPolicy: Local"],
        "TCP",
        80,
        30081,
        &eps,
    );
    let mut m2 = m.clone();
    m2.push_str(&service(
        "nolocal",
        "10.96.0.11",
        &["externalTrafficPolicy: Local"],
        "TCP",
        80,
        30083,
        &[(1, "node2")],
    ));
    let Some(env) = setup_with(2, &m2, &[]) else {
        return;
    };
    let nodeport = format!("{NODE_IP}:30081");
    let r = env.external(&["tcp", &nodeport, "40"]);
    assert_eq!(names(&r), vec!["pod-0".to_string()], "{r}");
    assert_eq!(total(&r), 40, "{r}");
    let r = env.external(&["peer", &nodeport]);
    assert_eq!(
        r["peer"].as_str().unwrap().split(':').next(),
        Some(CLIENT_IP)
    );
    // Endpoints only elsewhere: dropped (a timeout), as nftables mode does.
    let r = env.external(&["tcp", &format!("{NODE_IP}:30083"), "1"]);
    assert_eq!(errors(&r, "timeout"), 1, "{r}");
}

/// Empties the tc path's connection-tracking map (as if every flow had aged out).
fn flush_ct(bpf: &Path) {
    let data = aya::maps::MapData::from_pin(bpf.join("WEIR_CT")).unwrap();
    let mut ct: aya::maps::HashMap<_, [u8; 40], [u8; 48]> =
        aya::maps::Map::LruHashMap(data).try_into().unwrap();
    let keys: Vec<[u8; 40]> = ct.keys().flatten().collect();
    for k in keys {
        let _ = ct.remove(&k);
    }
}

#[test]
fn session_affinity_keeps_a_client_on_one_endpoint_until_the_timeout_on_both_paths() {
    let eps = on_node1(&[0, 1, 2]);
    let m = service(
        "sticky",
        "10.96.0.10",
        &[
            "sessionAffinity: ClientIP",
            "sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}",
        ],
        "TCP",
        80,
        30090,
        &eps,
    );
    let Some(env) = setup_with(3, &m, &[]) else {
        return;
    };
    let nodeport = format!("{NODE_IP}:30090");
    // tc path: the external client, keyed by its address.
    let r = env.external(&["tcp", &nodeport, "20"]);
    assert_eq!(total(&r), 20, "{r}");
    assert_eq!(names(&r).len(), 1, "one endpoint for one client: {r}");
    // Socket hooks: the client pod, keyed by its network namespace.
    let r = env.probe(&["tcp", "10.96.0.10:80", "20"]);
    assert_eq!(total(&r), 20, "{r}");
    assert_eq!(names(&r).len(), 1, "one endpoint for one client: {r}");
    // Once the entry expires the client is placed again: over several rounds another
    // endpoint shows up, and within a round the client stays on one.
    let (mut external, mut pod) = (Vec::new(), Vec::new());
    for _ in 0..12 {
        std::thread::sleep(std::time::Duration::from_millis(2300));
        let r = env.external(&["tcp", &nodeport, "4"]);
        assert_eq!(names(&r).len(), 1, "{r}");
        external.extend(names(&r));
        let r = env.probe(&["tcp", "10.96.0.10:80", "4"]);
        assert_eq!(names(&r).len(), 1, "{r}");
        pod.extend(names(&r));
        external.sort();
        external.dedup();
        pod.sort();
        pod.dedup();
        if external.len() > 1 && pod.len() > 1 {
            return;
        }
    }
    panic!("after expiry clients move: external {external:?}, pod {pod:?}");
}

#[test]
fn maglev_keeps_a_flow_on_its_backend_without_connection_tracking_state() {
    let eps = on_node1(&[0, 1, 2]);
    let m = service("dns", "10.96.0.53", &[], "UDP", 53, 30053, &eps);
    let Some(env) = setup_with(3, &m, &["--ebpf-lb-algorithm", "maglev"]) else {
        return;
    };
    let nodeport = format!("{NODE_IP}:30053");
    let mut seen = std::collections::BTreeSet::new();
    for port in 40000..40012u16 {
        let port = port.to_string();
        let mut first: Option<Vec<String>> = None;
        for _ in 0..3 {
            // Without the tracked flow the backend comes from the Maglev table again.
            flush_ct(&env.bpf.0);
            let r = env.external(&["udp", &nodeport, "3", "--source-port", &port]);
            assert_eq!(total(&r), 3, "{r}");
            let n = names(&r);
            assert_eq!(n.len(), 1, "{r}");
            match &first {
                None => first = Some(n),
                Some(f) => assert_eq!(f, &n, "source port {port} moved"),
            }
        }
        seen.extend(first.unwrap());
    }
    assert!(seen.len() > 1, "flows spread over backends: {seen:?}");
}

/// 1,000 addresses 10.244.100.0/22 spread over the pods `0..pods` (address j on pod
/// `j % pods`), routed from the node to their pod's veth.
fn add_many_addresses(topo: &Topology, pods: usize, n: usize) -> Vec<(String, usize)> {
    let addrs: Vec<(String, usize)> = (0..n)
        .map(|j| (format!("10.244.{}.{}", 100 + j / 256, j % 256), j % pods))
        .collect();
    let mut node_batch = String::new();
    let mut pod_batch = vec![String::new(); pods];
    for (a, p) in &addrs {
        node_batch.push_str(&format!("route add {a}/32 dev veth{p}\n"));
        pod_batch[*p].push_str(&format!("addr add {a}/32 dev eth0\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let batch = |ns: &Netns, name: &str, text: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        ns.exec(&["ip", "-batch", &f.to_string_lossy()]).unwrap();
    };
    batch(&topo.node, "node", &node_batch);
    for (p, text) in pod_batch.iter().enumerate() {
        batch(&topo.pods[p], &format!("pod{p}"), text);
    }
    addrs
}

#[test]
fn a_service_with_1000_endpoints_spreads_connections_from_pods_and_outside() {
    if !require_privileges() {
        return;
    }
    // Three echo pods answer on 1,000 addresses; the Service lists them in two slices.
    let mut topo = Topology::new(4).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..3 {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    let addrs = add_many_addresses(&topo, 3, 1000);
    let slice = |n: usize, eps: &[(String, usize)]| {
        let list = endpoints_yaml(eps.iter().map(|(a, _)| (a, NODE_NAME)));
        format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big-{n}, namespace: demo, labels: {{kubernetes.io/service-name: big}}}}\naddressType: IPv4\nports: [{{name: p, protocol: TCP, port: 8080}}]\nendpoints:{list}")
    };
    let manifests = |eps: &[(String, usize)]| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{{name: p, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}]\n{}{}",
            slice(1, &eps[..500]),
            slice(2, &eps[500..])
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests(dir.path(), &manifests(&addrs)).unwrap();
    let mut env = Env {
        topo,
        dir,
        cgroup: Cgroup::new().unwrap(),
        bpf: BpfDir::unique(),
        proxy: 0,
        extra: Vec::new(),
    };
    let flags = env.proxy_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    env.proxy = start_proxy_with(&mut env.topo.node, env.dir.path(), METRICS, &flags).unwrap();
    let r = env.probe(&["tcp", "10.96.0.10:80", "90"]);
    assert_spread(&r, 3, 90);
    let r = env.external(&["tcp", &format!("{NODE_IP}:30080"), "90"]);
    assert_spread(&r, 3, 90);
    // One endpoint replaced by another (on pod-1): traffic keeps flowing.
    let before = last_sync(&env.topo.node, METRICS).unwrap();
    let mut changed = addrs.clone();
    changed[7] = ("10.244.1.11".into(), 1);
    write_manifests(env.dir.path(), &manifests(&changed)).unwrap();
    wait_synced(&env.topo.node, METRICS, before).unwrap();
    let r = env.probe(&["tcp", "10.96.0.10:80", "60"]);
    assert_spread(&r, 3, 60);
}

#[test]
fn one_endpoint_change_in_a_1000_endpoint_service_is_a_fast_map_update() {
    if !require_privileges() {
        return;
    }
    use weir_proxy::dataplane::ebpf::kernel::{EbpfSettings, KernelMaps};
    use weir_proxy::dataplane::ebpf::render::{diff, render_with, LbAlgorithm};
    use weir_proxy::dataplane::ebpf::MapStore;
    use weir_proxy::model::{
        DesiredState, Endpoint, Protocol, ServiceInfo, ServicePortName, ServicePortState,
    };
    let cgroup = Cgroup::new().unwrap();
    let bpf = BpfDir::unique();
    let mut maps = KernelMaps::open(&EbpfSettings {
        cgroup: cgroup.0.clone(),
        cgroup_origin: weir_proxy::dataplane::ebpf::kernel::CgroupOrigin::Flag,
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        bpffs_dir: bpf.0.clone(),
        interfaces: Vec::new(),
    })
    .unwrap();
    let state = |eps: &[Endpoint]| {
        let name = ServicePortName {
            namespace: "demo".into(),
            name: "big".into(),
            port: "p".into(),
            protocol: Protocol::Tcp,
        };
        let mut info = ServiceInfo::new(name.clone(), vec!["10.96.0.10".parse().unwrap()], 80);
        info.node_port = Some(30080);
        let mut d = DesiredState::default();
        d.node_ips = vec![NODE_IP.parse().unwrap()];
        d.services
            .insert(name, ServicePortState::from_endpoints(info, eps.to_vec()));
        d
    };
    let eps: Vec<Endpoint> = (0..1000u32)
        .map(|j| Endpoint {
            ip: std::net::Ipv4Addr::from(0x0af4_6400 + j).into(),
            port: 8080,
            is_local: true,
        })
        .collect();
    for algorithm in [LbAlgorithm::Random, LbAlgorithm::Maglev] {
        let full = render_with(&state(&eps), algorithm);
        let current = maps.dump().unwrap();
        let started = std::time::Instant::now();
        maps.apply(&diff(&current, &full)).unwrap();
        let load = started.elapsed();
        assert_eq!(maps.dump().unwrap(), full);
        let mut changed = eps.clone();
        changed[500].ip = "10.244.110.1".parse().unwrap();
        let started = std::time::Instant::now();
        let desired = render_with(&state(&changed), algorithm);
        let rendered = started.elapsed();
        let plan = diff(&full, &desired);
        let started = std::time::Instant::now();
        maps.apply(&plan).unwrap();
        let update = started.elapsed();
        assert_eq!(maps.dump().unwrap(), desired);
        println!(
            "{algorithm:?}: 1000 endpoints x 2 frontends loaded in {load:?}; one endpoint \
             change: render {rendered:?}, {} map writes in {update:?}",
            plan.ops.len()
        );
    }
}

#[test]
fn a_remote_endpoint_is_reached_with_the_node_address_as_source_and_replies_come_back() {
    // pod-1 stands for another node's endpoint: its veth is listed as an external
    // interface, the way a remote node's replies arrive on one.
    let eps = [(1, "node2")];
    let mut m = service("remote", "10.96.0.10", &[], "TCP", 80, 30080, &eps);
    m.push_str(&service("dns", "10.96.0.53", &[], "UDP", 53, 30053, &eps));
    let Some(env) = setup_with(2, &m, &["--ebpf-interfaces", "eth0,veth1"]) else {
        return;
    };
    let nodeport = format!("{NODE_IP}:30080");
    let r = env.external(&["tcp", &nodeport, "20"]);
    assert_eq!(total(&r), 20, "{r}");
    assert_eq!(names(&r), vec!["pod-1".to_string()], "{r}");
    let r = env.external(&["peer", &nodeport]);
    assert_eq!(
        r["peer"].as_str().unwrap().split(':').next(),
        Some(NODE_IP),
        "masqueraded to the node's address: {r}"
    );
    let r = env.external(&["udp-each", &format!("{NODE_IP}:30053"), "20"]);
    assert_eq!(errors(&r, "wrong_source"), 0, "{r}");
    assert_eq!(total(&r), 20, "{r}");
}

/// A single-stack IPv6 NodePort Service `name` (ClusterIP `cluster_ip`, `protocol` `port`
/// -> 8080 (TCP) or 5353 (UDP), NodePort `node_port`) with IPv6 endpoints `(pod, node)`.
fn service6(
    name: &str,
    cluster_ip: &str,
    protocol: &str,
    port: u16,
    node_port: u16,
    endpoints: &[(usize, &str)],
) -> String {
    let target = if protocol == "UDP" { 5353 } else { 8080 };
    let eps = endpoints_yaml(endpoints.iter().map(|(pod, node)| (pod_ip6(*pod), node)));
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: \"{cluster_ip}\"\n  ipFamilies: [IPv6]\n  ports: [{{name: p, protocol: {protocol}, port: {port}, targetPort: {target}, nodePort: {node_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv6\nports: [{{name: p, protocol: {protocol}, port: {target}}}]\nendpoints:{eps}"
    )
}

/// [`setup_with`] on a dual-stack node (IPv6 addressing, the Node's InternalIPs
/// [`NODE_IP`] and [`NODE_IP6`], the IPv6 pod and Service ranges).
fn setup_ipv6(backends: usize, manifests: &str, extra: &[&str]) -> Option<Env> {
    if !require_privileges() {
        return None;
    }
    let mut topo = Topology::new(backends + 1).expect("topology");
    topo.add_ipv6().expect("IPv6 addressing");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..backends {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests_with_node(dir.path(), &[], &[NODE_IP, NODE_IP6], manifests).expect("manifests");
    let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    extra.extend(
        [
            "--cluster-cidr",
            "fd00:10:244::/56",
            "--service-cluster-ip-range",
            "fd00:10:96::/112",
        ]
        .map(String::from),
    );
    let mut env = Env {
        topo,
        dir,
        cgroup: Cgroup::new().unwrap(),
        bpf: BpfDir::unique(),
        proxy: 0,
        extra,
    };
    let flags = env.proxy_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    env.proxy =
        start_proxy_with(&mut env.topo.node, env.dir.path(), METRICS, &flags).expect("weir-proxy");
    Some(env)
}

#[test]
fn ipv6_nodeport_reaches_a_remote_endpoint_masqueraded_to_the_node_ipv6_address() {
    // pod-1 stands for another node's endpoint (its veth is an external interface), pod-0
    // is a local one.
    let mut m = service6(
        "remote6",
        "fd00:10:96::10",
        "TCP",
        80,
        30080,
        &[(1, "node2")],
    );
    m.push_str(&service6(
        "dns6",
        "fd00:10:96::53",
        "UDP",
        53,
        30053,
        &[(1, "node2")],
    ));
    m.push_str(&service6(
        "local6",
        "fd00:10:96::20",
        "TCP",
        80,
        30081,
        &[(0, NODE_NAME), (1, "node2")],
    ));
    let Some(env) = setup_ipv6(2, &m, &["--ebpf-interfaces", "eth0,veth1"]) else {
        return;
    };
    let nodeport = format!("[{NODE_IP6}]:30080");
    let r = env.external(&["tcp", &nodeport, "20"]);
    assert_eq!(total(&r), 20, "{r}");
    assert_eq!(names(&r), vec!["pod-1".to_string()], "{r}");
    let r = env.external(&["peer", &nodeport]);
    assert_eq!(
        r["peer"].as_str(),
        Some(NODE_IP6),
        "masqueraded to the node's IPv6 address: {r}"
    );
    // UDP: every reply comes back from the NodePort the client sent to.
    let r = env.external(&["udp-each", &format!("[{NODE_IP6}]:30053"), "20"]);
    assert_eq!(errors(&r, "wrong_source"), 0, "{r}");
    assert_eq!(total(&r), 20, "{r}");
    // A local endpoint sees the client's own IPv6 address; both endpoints answer.
    let r = env.external(&["tcp", &format!("[{NODE_IP6}]:30081"), "60"]);
    assert_eq!(total(&r), 60, "{r}");
    assert_eq!(names(&r), ["pod-0", "pod-1"], "{r}");
    // The IPv6 ClusterIP routed to the node from outside keeps the client's source.
    let r = env.external(&["tcp", "[fd00:10:96::10]:80", "10"]);
    assert_eq!(total(&r), 10, "{r}");
}

#[test]
fn frontends_without_endpoints_are_rejected_from_outside_as_in_nftables_mode() {
    // An external IP and ClusterIPs (IPv4 and IPv6, routed to the node by the client)
    // without endpoints: the tc program answers TCP RST / ICMP port unreachable itself.
    let mut m = service(
        "empty",
        "10.96.0.20",
        &["externalIPs: [192.0.2.91]"],
        "TCP",
        80,
        30082,
        &[],
    );
    m.push_str(&service(
        "empty-udp",
        "10.96.0.21",
        &["externalIPs: [192.0.2.91]"],
        "UDP",
        53,
        30054,
        &[],
    ));
    m.push_str(&service6("empty6", "fd00:10:96::20", "TCP", 80, 30084, &[]));
    m.push_str(&service6(
        "empty6-udp",
        "fd00:10:96::21",
        "UDP",
        53,
        30055,
        &[],
    ));
    let Some(env) = setup_ipv6(1, &m, &[]) else {
        return;
    };
    env.topo.client_route_via_node("192.0.2.91").unwrap();
    for dst in ["192.0.2.91:80", "10.96.0.20:80", "[fd00:10:96::20]:80"] {
        let r = env.external(&["tcp", dst, "3"]);
        assert_eq!(
            errors(&r, "refused"),
            3,
            "{dst}: rejected, not dropped: {r}"
        );
    }
    for dst in ["192.0.2.91:53", "10.96.0.21:53", "[fd00:10:96::21]:53"] {
        let r = env.external(&["udp", dst, "3"]);
        assert_eq!(total(&r), 0, "{dst}: {r}");
        assert!(
            errors(&r, "refused") >= 1 && errors(&r, "timeout") == 0,
            "{dst}: ICMP port unreachable: {r}"
        );
    }
    // The NodePorts are answered by the node's stack, as before.
    let r = env.external(&["tcp", &format!("[{NODE_IP6}]:30084"), "2"]);
    assert_eq!(errors(&r, "refused"), 2, "{r}");
}

#[test]
fn a_closed_tcp_flow_whose_5_tuple_is_reused_picks_a_backend_anew() {
    let eps = on_node1(&[0, 1, 2]);
    let m = service("web", "10.96.0.10", &[], "TCP", 80, 30080, &eps);
    let Some(env) = setup_with(3, &m, &[]) else {
        return;
    };
    // Every connection comes from source port 40080 and is closed (the backend's FIN, the
    // client's RST) before the next one: each new SYN on the same 5-tuple is a new flow,
    // placed at random again instead of following the closed flow's entry.
    let nodeport = format!("{NODE_IP}:30080");
    let r = env.external(&["tcp", &nodeport, "30", "--source-port", "40080"]);
    assert_eq!(total(&r), 30, "{r}");
    assert!(
        names(&r).len() > 1,
        "one 5-tuple reaches several backends once each flow is closed: {r}"
    );
}

#[test]
fn a_backends_icmp_port_unreachable_reaches_the_client_from_the_frontend() {
    // The endpoint's UDP port 5399 has no listener: the backend answers ICMP port
    // unreachable, which the tc program makes come from the NodePort and quote it.
    let eps = on_node1(&[0]);
    let m = service("closed", "10.96.0.53", &[], "UDP", 53, 30056, &eps)
        .replace("targetPort: 5353", "targetPort: 5399")
        .replace("port: 5353}", "port: 5399}");
    assert!(m.contains("5399"), "{m}");
    let Some(env) = setup_with(1, &m, &[]) else {
        return;
    };
    let r = env.external(&["udp", &format!("{NODE_IP}:30056"), "1"]);
    assert_eq!(
        errors(&r, "refused"),
        1,
        "the client's socket got the backend's ICMP error: {r}"
    );
}

/// A weir-proxy process killed (and reaped) when the test ends, however it ends.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// As a new user would start it: `ip netns exec` (a fresh /sys: no cgroup2 and no bpffs
/// mount is visible) in a cgroup namespace of its own, rooted at the test's cgroup, and
/// without `--ebpf-cgroup`: weir mounts a cgroup2 at /run/weir/cgroupv2 (that namespace's
/// root), logs that it did, and translates the sockets of the processes below it.
#[test]
fn under_ip_netns_exec_without_the_cgroup_flag_weir_mounts_its_own_cgroup2() {
    if !require_privileges() {
        return;
    }
    let mut topo = Topology::new(2).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    topo.start_echo(0, echo, "pod-0").expect("echo");
    let manifests = tempfile::tempdir().unwrap();
    write_manifests(manifests.path(), &services(&[0], &[0])).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("weir-proxy.log");
    let cgroup = Cgroup::new().unwrap();
    let bpf = BpfDir::unique();
    let source = format!("dir:{}", manifests.path().display());
    let bpffs = bpf.0.display().to_string();
    let args = proxy_args(
        &["--source", &source],
        METRICS,
        NODE_NAME,
        &["--proxy-mode", "ebpf", "--bpffs-dir", &bpffs],
    );
    let script = format!(
        "echo $$ > {} && exec unshare --cgroup ip netns exec {} \"$@\"",
        cgroup.0.join("cgroup.procs").display(),
        topo.node.name()
    );
    let _daemon = Daemon(
        std::process::Command::new("sh")
            .args(["-c", &script, "sh"])
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("weir-proxy"),
    );
    let synced = wait_synced(&topo.node, METRICS, 0.0);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    synced.unwrap_or_else(|e| panic!("weir-proxy did not sync: {e}\n{log}"));
    assert!(
        log.contains("weir's own cgroup2 mount") && log.contains("/run/weir/cgroupv2"),
        "the log names the cgroup and how it was chosen:\n{log}"
    );
    let r = probe_in_cgroup(&topo.pods[1], &cgroup, &["tcp", "10.96.0.10:80", "10"]).unwrap();
    assert_eq!(total(&r), 10, "{r}");
    assert_eq!(names(&r), vec!["pod-0"], "{r}");
}

/// A start-up failure is one message with its causes, and no backtrace even with
/// RUST_BACKTRACE set (backtraces are for panics).
#[test]
fn a_start_failure_is_one_clear_message_without_a_backtrace() {
    if !require_privileges() {
        return;
    }
    let manifests = tempfile::tempdir().unwrap();
    let source = format!("dir:{}", manifests.path().display());
    let bpf = BpfDir::unique();
    let bpffs = bpf.0.display().to_string();
    let args = proxy_args(
        &["--source", &source],
        METRICS,
        NODE_NAME,
        &[
            "--proxy-mode",
            "ebpf",
            "--ebpf-cgroup",
            "/tmp",
            "--bpffs-dir",
            &bpffs,
        ],
    );
    let node = Netns::new("cgerr").expect("netns");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.name()))
        .args(&args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("weir-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--ebpf-cgroup /tmp: not a cgroup v2 directory"),
        "{stderr}"
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
}

/// weir-probe `udp-hold` / `tcp-hold` in the client pod, its lines with when each came.
struct Holder {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<(std::time::Instant, String)>,
}

impl Holder {
    fn start(env: &Env, mode: &str, target: &str, millis: u64) -> Holder {
        let bin = workspace_bin("weir-probe");
        let procs = env.cgroup.0.join("cgroup.procs");
        let script = format!("echo $$ > {} && exec \"$@\"", procs.display());
        let netns = format!("--net=/run/netns/{}", env.topo.pods.last().unwrap().name());
        let mut child = std::process::Command::new("sh")
            .args(["-c", &script, "sh", "nsenter", &netns])
            .arg(&bin)
            .args([mode, target, &millis.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("weir-probe");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((std::time::Instant::now(), line));
            }
        });
        Holder { child, lines }
    }

    /// The first `answer NAME` line's name.
    fn first_answer(&self) -> String {
        loop {
            let (_, l) = self
                .lines
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("an answer");
            if let Some(name) = l.strip_prefix("answer ") {
                return name.to_owned();
            }
        }
    }

    /// Every further line, once the probe has ended.
    fn rest(mut self) -> Vec<(std::time::Instant, String)> {
        let _ = self.child.wait();
        self.lines.iter().collect()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The issue-19 scenario: one connected socket exchanging every 100 ms with the endpoint
/// the hook picked at connect; that endpoint leaves the EndpointSlice. Once the sync that
/// removes it is done, the removed pod never answers again, and the socket got an error
/// or reached a live endpoint (the probe reconnects after an error, as a resolver does).
fn a_connected_socket_leaves_a_removed_endpoint_within_one_sync(mode: &str, target: &str) {
    let Some(env) = setup(3) else { return };
    let holder = Holder::start(&env, mode, target, 4000);
    let first = holder.first_answer();
    let removed: usize = first
        .trim_start_matches("pod-")
        .parse()
        .expect("a pod name");
    let kept: Vec<usize> = (0..3).filter(|i| *i != removed).collect();
    let before = last_sync(&env.topo.node, METRICS).unwrap();
    write_manifests(env.dir.path(), &services(&kept, &kept)).unwrap();
    wait_synced(&env.topo.node, METRICS, before).unwrap();
    let synced = std::time::Instant::now();
    let after: Vec<String> = holder
        .rest()
        .into_iter()
        .filter(|(t, _)| *t > synced)
        .map(|(_, l)| l)
        .collect();
    assert!(after.len() >= 10, "the probe kept exchanging: {after:?}");
    assert!(
        !after.contains(&format!("answer {first}")),
        "{first} was removed, yet answered after the sync: {after:?}"
    );
    let live: Vec<String> = kept.iter().map(|i| format!("answer pod-{i}")).collect();
    assert!(
        after.iter().rev().take(5).all(|l| live.contains(l)),
        "the socket ends on a live endpoint: {after:?}"
    );
}

#[test]
fn a_connected_udp_socket_leaves_a_removed_endpoint_within_one_sync() {
    a_connected_socket_leaves_a_removed_endpoint_within_one_sync("udp-hold", "10.96.0.53:53");
}

#[test]
fn a_tcp_connection_to_an_endpoint_gone_from_the_slice_is_aborted_within_one_sync() {
    a_connected_socket_leaves_a_removed_endpoint_within_one_sync("tcp-hold", "10.96.0.10:80");
}
