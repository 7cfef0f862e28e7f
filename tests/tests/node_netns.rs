//! Node-level features with real traffic, each in nftables and eBPF mode: the healthCheckNodePort server,
//! `--nodeport-addresses` CIDRs, stale UDP conntrack cleanup done by weir-proxy itself, and
//! IPv6 (dual-stack Services over an IPv6-addressed topology). A node namespace runs
//! weir-proxy, pods sit behind routed veths, an external client (198.51.100.2, and
//! fd00:77::2 with IPv6) routes service addresses through the node. Endpoints labeled
//! `nodeName: node2` are pods of this topology that weir treats as remote. Each test proves
//! one behaviour.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use weir_e2e::mode::{Dataplane, Mode};
use weir_e2e::*;

const METRICS: u16 = 10249;
const WAIT: Duration = Duration::from_secs(15);

struct Env {
    // Field order is drop order: the processes go before the eBPF cgroup and pins.
    topo: Topology,
    dir: tempfile::TempDir,
    proxy: u32,
    node_addresses: Vec<String>,
    dp: Dataplane,
}

/// How the node is set up before weir-proxy starts.
#[derive(Default)]
struct Opts<'a> {
    /// IPv6 addressing beside IPv4 ([`Topology::add_ipv6`]).
    ipv6: bool,
    /// The Node object's InternalIPs (default: [`NODE_IP`]).
    node_addresses: &'a [&'a str],
    /// Extra weir-proxy flags.
    flags: &'a [&'a str],
    /// Extra addresses (`ADDR/LEN`) on the node's client-facing `eth0`.
    node_eth0_addresses: &'a [&'a str],
    /// eBPF mode instead of nftables mode (see [`weir_e2e::mode`]).
    ebpf: bool,
}

/// `pods` pods answering `pod-I` (TCP 8080, UDP 5353), the manifests and weir-proxy.
fn setup(pods: usize, opts: Opts, services: &str) -> Option<Env> {
    if !require_privileges() {
        return None;
    }
    let mut topo = Topology::new(pods).expect("topology");
    if opts.ipv6 {
        topo.add_ipv6().expect("IPv6 addressing");
    }
    for a in opts.node_eth0_addresses {
        topo.node
            .exec(&["ip", "addr", "add", a, "dev", "eth0"])
            .expect("node address");
    }
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..pods {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    let node_addresses: Vec<String> = if opts.node_addresses.is_empty() {
        vec![NODE_IP.to_owned()]
    } else {
        opts.node_addresses.iter().map(|a| a.to_string()).collect()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = if opts.ebpf {
        Mode::Ebpf
    } else {
        Mode::Nftables
    };
    let mut env = Env {
        topo,
        dir,
        proxy: 0,
        node_addresses,
        dp: Dataplane::new(mode).expect("dataplane"),
    };
    env.write(services);
    env.proxy = env
        .dp
        .start_proxy(&mut env.topo.node, env.dir.path(), METRICS, opts.flags)
        .expect("weir-proxy");
    Some(env)
}

impl Env {
    fn write(&self, services: &str) {
        let addrs: Vec<&str> = self.node_addresses.iter().map(String::as_str).collect();
        write_manifests_with_node(self.dir.path(), &[], &addrs, services).expect("manifests");
    }

    /// `nft list table FAMILY weir` in the node.
    fn table(&self, family: &str) -> String {
        nft_list(&self.topo.node, &["table", family, "weir"])
    }

    /// Rewrites the manifests and waits for a sync after the edit and then, in nftables
    /// mode, until the ip ruleset satisfies `applied` (a sync alone could be a periodic one
    /// that predates it); eBPF mode's callers wait for the behaviour itself.
    fn rewrite(&self, services: &str, applied: impl Fn(&str) -> bool) {
        let before = last_sync(&self.topo.node, METRICS).unwrap();
        self.write(services);
        wait_synced(&self.topo.node, METRICS, before).unwrap();
        if self.dp.mode == Mode::Ebpf {
            return;
        }
        wait_until("the edited manifests in the ruleset", WAIT, || {
            applied(&self.table("ip"))
        })
        .unwrap_or_else(|e| panic!("{e}; ruleset:\n{}", self.table("ip")));
    }

    /// Stops weir-proxy and starts it again with `flags`; returns once it has synced.
    fn restart(&mut self, flags: &[&str]) {
        self.topo.node.stop(self.proxy);
        self.proxy = self
            .dp
            .start_proxy(&mut self.topo.node, self.dir.path(), METRICS, flags)
            .expect("weir-proxy restart");
    }

    fn metric(&self, name: &str) -> Option<f64> {
        metric(&self.topo.node, METRICS, name)
    }
}

fn tcp(ns: &Netns, dst: &str, count: u32) -> Value {
    probe(ns, &["tcp", dst, &count.to_string()]).unwrap()
}

/// `count` datagrams to `dst` from one socket bound to source port `sport`.
fn udp(ns: &Netns, dst: &str, sport: u16, count: u32) -> Value {
    probe(
        ns,
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

fn peer(ns: &Netns, dst: &str) -> String {
    let r = probe(ns, &["peer", dst]).unwrap();
    r["peer"].as_str().unwrap_or_default().to_owned()
}

/// One HTTP GET: `{"status", "headers", "body"}` or `{"error": KIND}`.
fn http(ns: &Netns, dst: &str, path: &str) -> Value {
    probe(ns, &["http", dst, path]).unwrap()
}

/// A Service `name` (namespace demo) with ClusterIP `cluster_ip`, the extra `spec` lines
/// and one port named `p` (`port`: the rest of its flow mapping).
fn service(name: &str, cluster_ip: &str, spec: &[&str], protocol: &str, port: &str) -> String {
    let extra: String = spec.iter().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {cluster_ip}\n{extra}  ports: [{{name: p, protocol: {protocol}, {port}}}]\n"
    )
}

/// One endpoint (address `addr`) of an EndpointSlice, ready, on node `node`.
fn ep(addr: &str, node: &str) -> String {
    format!("- {{addresses: [\"{addr}\"], nodeName: {node}, conditions: {{ready: true}}}}\n")
}

/// An EndpointSlice `name` of Service `service` (address type `family`) whose port `p` is
/// `protocol`/`port`.
fn slice(
    service: &str,
    name: &str,
    family: &str,
    protocol: &str,
    port: u16,
    endpoints: &[String],
) -> String {
    let endpoints = if endpoints.is_empty() {
        " []\n".to_owned()
    } else {
        format!("\n{}", endpoints.concat())
    };
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: [{{name: p, protocol: {protocol}, port: {port}}}]\nendpoints:{endpoints}"
    )
}

/// LoadBalancer `lb` (ClusterIP 10.96.0.80, NodePort 30080, ingress 192.0.2.80) with
/// `externalTrafficPolicy: Local` and healthCheckNodePort 32100; endpoints `(pod, node)`.
fn lb_local(endpoints: &[(usize, &str)]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|(p, n)| ep(&pod_ip(*p), n)).collect();
    service(
        "lb",
        "10.96.0.80",
        &[
            "type: LoadBalancer",
            "externalTrafficPolicy: Local",
            "healthCheckNodePort: 32100",
        ],
        "TCP",
        "port: 80, targetPort: 8080, nodePort: 30080",
    ) + "status:\n  loadBalancer:\n    ingress: [{ip: 192.0.2.80}]\n"
        + &slice("lb", "lb-1", "IPv4", "TCP", 8080, &eps)
}

const NO_LOCAL_EXTERNAL: &str = "kubeproxy_sync_proxy_rules_no_local_endpoints_total\
                                 {ip_family=\"IPv4\",traffic_policy=\"external\"}";

/// Stale IPv4 conntrack entries weir's cleanup deleted.
const CONNTRACK_DELETED_V4: &str =
    "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"}";

in_both_modes!(health_check_node_port_reports_local_endpoints);

fn health_check_node_port_reports_local_endpoints(mode: Mode) {
    let yaml = lb_local(&[(0, NODE_NAME), (1, NODE_NAME), (2, "node2")]);
    let opts = Opts {
        ebpf: mode == Mode::Ebpf,
        ..Opts::default()
    };
    let Some(env) = setup(3, opts, &yaml) else {
        return;
    };
    let hc = format!("{NODE_IP}:32100");
    let client = &env.topo.client;
    let expect_body = |local: u64| json!({"service": {"namespace": "demo", "name": "lb"}, "localEndpoints": local, "serviceProxyHealthy": true});
    let body = |r: &Value| -> Value {
        serde_json::from_str(r["body"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {r}"))
    };

    for path in ["/", "/any/path"] {
        let r = http(client, &hc, path);
        assert_eq!(r["status"], 200, "{path}: {r}");
        assert_eq!(
            r["headers"]["x-load-balancing-endpoint-weight"], "2",
            "{path}: {r}"
        );
        assert_eq!(body(&r), expect_body(2), "{path}: {r}");
    }
    // The dataplane agrees: the load-balancer IP uses this node's two endpoints.
    env.topo.client_route_via_node("192.0.2.80").unwrap();
    let r = tcp(client, "192.0.2.80:80", 40);
    assert_eq!(total(&r), 40, "{r}");
    assert_eq!(names(&r), ["pod-0", "pod-1"], "{r}");
    assert_eq!(env.metric(NO_LOCAL_EXTERNAL), Some(0.0));

    // Every endpoint moves to node2: 503, no local endpoints.
    env.rewrite(
        &lb_local(&[(0, "node2"), (1, "node2"), (2, "node2")]),
        |_| {
            nft_list(
                &env.topo.node,
                &["set", "ip", "weir", "no_local_endpoint_services"],
            )
            .contains("192.0.2.80 . tcp . 80")
        },
    );
    wait_until("the health check to report 503", WAIT, || {
        http(client, &hc, "/")["status"] == 503
    })
    .unwrap_or_else(|e| panic!("{e}: {}", http(client, &hc, "/")));
    let r = http(client, &hc, "/");
    assert_eq!(body(&r), expect_body(0), "{r}");
    assert_eq!(r["headers"]["x-load-balancing-endpoint-weight"], "0", "{r}");
    wait_until("no_local_endpoints{external} = 1", WAIT, || {
        env.metric(NO_LOCAL_EXTERNAL) == Some(1.0)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", metrics_text(&env.topo.node, METRICS)));
    wait_until("external traffic to be dropped", WAIT, || {
        errors(&tcp(client, "192.0.2.80:80", 1), "timeout") == 1
    })
    .unwrap();
    let r = tcp(client, "192.0.2.80:80", 2);
    assert_eq!(errors(&r, "timeout"), 2, "external traffic dropped: {r}");

    // The Service goes away (another one stays): the port closes.
    let other = service(
        "other",
        "10.96.0.81",
        &[],
        "TCP",
        "port: 80, targetPort: 8080",
    ) + &slice(
        "other",
        "other-1",
        "IPv4",
        "TCP",
        8080,
        &[ep(&pod_ip(0), NODE_NAME)],
    );
    env.rewrite(&other, |t| {
        t.contains("10.96.0.81") && !t.contains("10.96.0.80")
    });
    wait_until("the health-check port to close", WAIT, || {
        http(client, &hc, "/")["error"] == "refused"
    })
    .unwrap_or_else(|e| panic!("{e}: {}", http(client, &hc, "/")));
    assert_eq!(env.metric("weir_healthcheck_listeners"), Some(0.0));
    assert_eq!(env.metric(NO_LOCAL_EXTERNAL), Some(0.0));
}

/// The node's second address on `eth0`, in a prefix of its own.
const NODE_OTHER_IP: &str = "192.168.78.10";

in_both_modes!(nodeport_addresses_cidr_serves_only_matching_node_addresses);

fn nodeport_addresses_cidr_serves_only_matching_node_addresses(mode: Mode) {
    let yaml = service(
        "web",
        "10.96.0.10",
        &["type: NodePort"],
        "TCP",
        "port: 80, targetPort: 8080, nodePort: 30080",
    ) + &slice(
        "web",
        "web-1",
        "IPv4",
        "TCP",
        8080,
        &[ep(&pod_ip(0), NODE_NAME), ep(&pod_ip(1), NODE_NAME)],
    );
    let opts = Opts {
        flags: &["--nodeport-addresses", "192.168.77.0/24"],
        node_eth0_addresses: &["192.168.78.10/24"],
        ebpf: mode == Mode::Ebpf,
        ..Opts::default()
    };
    let Some(mut env) = setup(2, opts, &yaml) else {
        return;
    };
    env.topo
        .client
        .exec(&[
            "ip",
            "route",
            "add",
            "192.168.78.0/24",
            "via",
            NODE_CLIENT_SIDE_IP,
        ])
        .unwrap();
    let served = format!("{NODE_IP}:30080");
    let other = format!("{NODE_OTHER_IP}:30080");
    let frontend = |ip: &str| format!("{ip} . tcp . 30080");

    let check = |env: &Env, on: &str, off: &str| {
        if env.dp.mode == Mode::Nftables {
            let table = env.table("ip");
            assert!(
                table.contains(&frontend(on.split(':').next().unwrap()))
                    && !table.contains(&frontend(off.split(':').next().unwrap())),
                "{table}"
            );
        }
        let r = tcp(&env.topo.client, on, 40);
        assert_eq!(total(&r), 40, "{on}: {r}");
        assert_eq!(names(&r), ["pod-0", "pod-1"], "{on}: {r}");
        // Not a NodePort there: the node's own stack answers, and nothing listens.
        let r = tcp(&env.topo.client, off, 3);
        assert!(answers(&r).is_empty(), "{off}: {r}");
        assert_eq!(errors(&r, "refused"), 3, "{off} is refused: {r}");
    };
    check(&env, &served, &other);

    env.restart(&["--nodeport-addresses", "192.168.78.0/24"]);
    check(&env, &other, &served);
}

/// UDP Service `dns`: ClusterIP 10.96.0.53:53 and NodePort 30053 to port 5353 of `pods`.
fn dns(pods: &[usize]) -> String {
    let eps: Vec<String> = pods.iter().map(|p| ep(&pod_ip(*p), NODE_NAME)).collect();
    service(
        "dns",
        "10.96.0.53",
        &["type: NodePort"],
        "UDP",
        "port: 53, targetPort: 5353, nodePort: 30053",
    ) + &slice("dns", "dns-1", "IPv4", "UDP", 5353, &eps)
}

/// The single endpoint a UDP report got every answer from.
fn only_answer(report: &Value, count: u64) -> String {
    let a = answers(report);
    assert!(
        a.len() == 1 && a[0].1 == count,
        "{count} answers from one endpoint: {report}"
    );
    a[0].0.clone()
}

in_both_modes!(udp_client_moves_off_a_removed_endpoint_keeping_its_source_port);

/// Both modes keep a UDP flow from outside on its endpoint and move it once the endpoint
/// leaves: nftables mode by deleting the kernel's conntrack entries (asserted here), eBPF
/// mode by deleting the tc path's connection-tracking entries (its own map; the kernel's
/// conntrack holds nothing of the translation).
fn udp_client_moves_off_a_removed_endpoint_keeping_its_source_port(mode: Mode) {
    let opts = Opts {
        ebpf: mode == Mode::Ebpf,
        ..Opts::default()
    };
    let Some(env) = setup(2, opts, &dns(&[0, 1])) else {
        return;
    };
    let nft = mode == Mode::Nftables;
    let client = &env.topo.client;
    let node = &env.topo.node;
    let cluster_ip = "10.96.0.53:53";
    let nodeport = format!("{NODE_IP}:30053");
    const CIP_SPORT: u16 = 40053;

    // One flow to the ClusterIP sticks to its endpoint across probes (one conntrack entry).
    let stuck = only_answer(&udp(client, cluster_ip, CIP_SPORT, 10), 10);
    assert_eq!(
        only_answer(&udp(client, cluster_ip, CIP_SPORT, 10), 10),
        stuck
    );
    let pod: usize = stuck.trim_start_matches("pod-").parse().unwrap();
    let (gone_ip, kept) = (pod_ip(pod), 1 - pod);
    if nft {
        let entries = udp_conntrack_entries(node, 53, CIP_SPORT);
        assert!(
            entries.len() == 1 && entries[0].contains(&format!("src={gone_ip} ")),
            "{entries:?}"
        );
    }
    // A NodePort flow on the same endpoint: source ports are tried until one lands there.
    let np_sport = (40100..40140)
        .find(|s| only_answer(&udp(client, &nodeport, *s, 1), 1) == stuck)
        .expect("a NodePort flow to the same endpoint");
    assert_eq!(
        only_answer(&udp(client, &nodeport, np_sport, 5), 5),
        stuck,
        "the NodePort flow sticks too"
    );
    let deleted_before = env.metric(CONNTRACK_DELETED_V4).unwrap();

    // The endpoint leaves the slice (its pod still answers: a stale entry would reach it).
    env.rewrite(&dns(&[kept]), |t| !t.contains(&gone_ip));
    let now = format!("pod-{kept}");
    if !nft {
        for (dst, sport) in [
            (cluster_ip.to_owned(), CIP_SPORT),
            (nodeport.clone(), np_sport),
        ] {
            assert_eq!(
                only_answer(&udp(client, &dst, sport, 10), 10),
                now,
                "{dst}: same source port, the remaining endpoint, right after the sync"
            );
        }
        return;
    }
    wait_until("weir to delete the stale flows", WAIT, || {
        env.metric(CONNTRACK_DELETED_V4)
            .is_some_and(|n| n >= deleted_before + 2.0)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}; conntrack: {:?}",
            metrics_text(node, METRICS),
            udp_conntrack_entries(node, 53, CIP_SPORT)
        )
    });
    assert!(
        udp_conntrack_entries(node, 53, CIP_SPORT).is_empty(),
        "the ClusterIP flow's entry is gone"
    );
    assert!(
        udp_conntrack_entries(node, 30053, np_sport).is_empty(),
        "the NodePort flow's entry is gone"
    );

    assert_eq!(
        only_answer(&udp(client, cluster_ip, CIP_SPORT, 10), 10),
        now,
        "same source port, the remaining endpoint"
    );
    assert_eq!(
        only_answer(&udp(client, &nodeport, np_sport, 10), 10),
        now,
        "NodePort flow, same source port, the remaining endpoint"
    );
    let entries = udp_conntrack_entries(node, 53, CIP_SPORT);
    assert!(
        entries.len() == 1 && entries[0].contains(&format!("src={} ", pod_ip(kept))),
        "{entries:?}"
    );
}

/// Dual-stack `web`: ClusterIPs 10.96.0.10 and fd00:10:96::10, NodePort 30080; IPv4
/// endpoints pods 0 and 1, IPv6 endpoints pods 1 and 2.
fn dual_stack_web() -> String {
    service(
        "web",
        "10.96.0.10",
        &[
            "type: NodePort",
            "clusterIPs: [10.96.0.10, \"fd00:10:96::10\"]",
            "ipFamilies: [IPv4, IPv6]",
            "ipFamilyPolicy: RequireDualStack",
        ],
        "TCP",
        "port: 80, targetPort: 8080, nodePort: 30080",
    ) + &slice(
        "web",
        "web-v4",
        "IPv4",
        "TCP",
        8080,
        &[ep(&pod_ip(0), NODE_NAME), ep(&pod_ip(1), NODE_NAME)],
    ) + &slice(
        "web",
        "web-v6",
        "IPv6",
        "TCP",
        8080,
        &[ep(&pod_ip6(1), NODE_NAME), ep(&pod_ip6(2), NODE_NAME)],
    )
}

in_both_modes!(ipv6_clusterip_and_nodeport_reach_ipv6_endpoints);

fn ipv6_clusterip_and_nodeport_reach_ipv6_endpoints(mode: Mode) {
    // pod-3 is no endpoint: the in-cluster client.
    let opts = Opts {
        ipv6: true,
        node_addresses: &[NODE_IP, NODE_IP6],
        flags: &[
            "--cluster-cidr",
            "fd00:10:244::/56",
            "--service-cluster-ip-range",
            "fd00:10:96::/112",
        ],
        ebpf: mode == Mode::Ebpf,
        ..Opts::default()
    };
    let Some(env) = setup(4, opts, &dual_stack_web()) else {
        return;
    };
    if mode == Mode::Nftables {
        let table6 = env.table("ip6");
        for want in [
            "fd00:10:96::10 . tcp . 80".to_owned(),
            format!("{NODE_IP6} . tcp . 30080"),
            format!("{} . 8080", pod_ip6(1)),
            format!("{} . 8080", pod_ip6(2)),
        ] {
            assert!(table6.contains(&want), "ip6 weir has {want}:\n{table6}");
        }
        assert!(!table6.contains(&pod_ip6(0)), "{table6}");
    }

    let pod = &env.topo.pods[3];
    let client = &env.topo.client;
    let local = |dst: &str, args: &[&str]| {
        let mut a = args.to_vec();
        a.insert(1, dst);
        env.dp.probe(pod, &a).unwrap()
    };
    let cluster_ip6 = "[fd00:10:96::10]:80";
    let nodeport6 = format!("[{NODE_IP6}]:30080");
    let r = local(cluster_ip6, &["tcp", "60"]);
    assert_eq!(total(&r), 60, "{r}");
    assert_eq!(names(&r), ["pod-1", "pod-2"], "the IPv6 endpoints: {r}");
    assert_eq!(
        local(cluster_ip6, &["peer"])["peer"]
            .as_str()
            .unwrap_or_default(),
        pod_ip6(3),
        "a pod's source is kept (inside --cluster-cidr)"
    );
    let r = tcp(client, &nodeport6, 60);
    assert_eq!(total(&r), 60, "{r}");
    assert_eq!(names(&r), ["pod-1", "pod-2"], "the IPv6 endpoints: {r}");
    if mode == Mode::Ebpf {
        // eBPF mode: a backend on this node sees the external client's own address.
        assert_eq!(peer(client, &nodeport6), CLIENT_IP6);
        // The tc path also serves the IPv6 ClusterIP routed from outside.
        let r = tcp(client, cluster_ip6, 30);
        assert_eq!(total(&r), 30, "{r}");
        assert_eq!(names(&r), ["pod-1", "pod-2"], "{r}");
    } else {
        assert_eq!(
            peer(client, &nodeport6),
            NODE_IP6,
            "NodePort traffic is masqueraded"
        );
    }

    // IPv4 still uses the IPv4 endpoints.
    for (dst, r) in [
        (
            "10.96.0.10:80".to_owned(),
            local("10.96.0.10:80", &["tcp", "60"]),
        ),
        (
            format!("{NODE_IP}:30080"),
            tcp(client, &format!("{NODE_IP}:30080"), 60),
        ),
    ] {
        assert_eq!(total(&r), 60, "{dst}: {r}");
        assert_eq!(names(&r), ["pod-0", "pod-1"], "{dst}: {r}");
    }
}
