//! The IPVS suite: weir-proxy in `--proxy-mode ipvs` on the standard node/pod/client
//! topology, with real TCP and UDP traffic. It runs only inside the VM that
//! `cargo xtask vm-test ipvs` boots (`WEIR_IN_VM=1`; the host kernel has no IPVS);
//! elsewhere each test returns at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use weir_e2e::*;

const METRICS: u16 = 10249;
const WAIT: Duration = Duration::from_secs(15);

/// Whether this process runs inside the IPVS VM.
fn in_vm() -> bool {
    if std::env::var("WEIR_IN_VM").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: runs inside `cargo xtask vm-test ipvs` only");
    false
}

struct Env {
    topo: Topology,
    dir: tempfile::TempDir,
    proxy: u32,
}

/// `pods` pods answering `pod-I` (TCP 8080, UDP 5353), the manifests, weir-proxy in IPVS
/// mode with `flags`.
fn setup(pods: usize, flags: &[&str], services: &str) -> Env {
    let mut topo = Topology::new(pods).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..pods {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests(dir.path(), services).expect("manifests");
    let mut all = vec!["--proxy-mode", "ipvs"];
    all.extend_from_slice(flags);
    let proxy = start_proxy_with(&mut topo.node, dir.path(), METRICS, &all).expect("weir-proxy");
    Env { topo, dir, proxy }
}

impl Env {
    /// `/proc/net/ip_vs` of the node.
    fn ipvs(&self) -> String {
        self.topo
            .node
            .exec(&["cat", "/proc/net/ip_vs"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the node's IPVS table satisfies `ok`.
    fn wait_ipvs(&self, what: &str, ok: impl Fn(&str) -> bool) {
        wait_until(what, WAIT, || ok(&self.ipvs()))
            .unwrap_or_else(|e| panic!("{e}; IPVS:\n{}", self.ipvs()));
    }

    fn rewrite(&self, services: &str) {
        write_manifests(self.dir.path(), services).expect("manifests");
    }
}

fn tcp(ns: &Netns, dst: &str, count: u32) -> Value {
    probe(ns, &["tcp", dst, &count.to_string()]).unwrap()
}

/// Hex form `/proc/net/ip_vs` uses for an IPv4 address and port (`0A600001:0050`).
fn hex(addr: &str, port: u16) -> String {
    let ip: std::net::Ipv4Addr = addr.parse().unwrap();
    format!("{:08X}:{port:04X}", u32::from(ip))
}

/// Waits until traffic from `ns` to `dst` is answered by exactly `want` (sorted names).
fn wait_answers(ns: &Netns, dst: &str, count: u32, want: &[&str]) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(&format!("{dst} answered by {want:?}"), WAIT, || {
        last = tcp(ns, dst, count);
        let mut n = names(&last);
        n.sort();
        n == want
    });
    if let Err(e) = ok {
        panic!("{e}; last report {last}");
    }
    last
}

#[test]
fn guest_kernel_has_ipvs_and_namespaces() {
    if !in_vm() {
        return;
    }
    let ns = Netns::new("probe").expect("netns");
    let out = ns
        .exec(&["cat", "/proc/net/ip_vs"])
        .expect("/proc/net/ip_vs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("IP Virtual Server"));
}

#[test]
fn clusterip_and_nodeport_spread_over_every_endpoint_and_proxy_mode_is_ipvs() {
    if !in_vm() {
        return;
    }
    let svc = service_yaml(
        "web",
        "10.96.0.10",
        "TCP",
        80,
        Some(30080),
        8080,
        &[0, 1, 2],
    );
    let env = setup(3, &[], &svc);
    env.wait_ipvs("the ClusterIP virtual server", |t| {
        t.contains(&hex("10.96.0.10", 80)) && t.contains(" rr")
    });
    let all = ["pod-0", "pod-1", "pod-2"];
    let r = wait_answers(&env.topo.client, "10.96.0.10:80", 30, &all);
    assert_eq!(total(&r), 30, "{r}");
    let r = wait_answers(&env.topo.client, "192.168.77.10:30080", 30, &all);
    assert_eq!(total(&r), 30, "{r}");
    // rr: an even spread.
    for (name, n) in answers(&r) {
        assert_eq!(n, 10, "{name} in {r}");
    }
    let mode = probe_get(&env.topo.node, "/proxyMode");
    assert_eq!(mode, "ipvs");
    // The ClusterIP is bound to weir-ipvs0.
    let addrs = env
        .topo
        .node
        .exec(&["ip", "-o", "addr", "show", "dev", "weir-ipvs0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&addrs.stdout).contains("10.96.0.10/32"));
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
fn every_scheduler_is_programmed_and_source_hashing_keeps_a_client_on_one_endpoint() {
    if !in_vm() {
        return;
    }
    let svc = service_yaml("web", "10.96.0.10", "TCP", 80, None, 8080, &[0, 1, 2]);
    let mut env = setup(3, &[], &svc);
    // One topology; weir-proxy restarts with each scheduler and adopts the virtual server
    // the previous run left (IPVS_CMD_SET_SERVICE changes its scheduler).
    for sched in ["wrr", "lc", "wlc", "dh", "mh", "sh"] {
        let pid = env.proxy;
        env.topo.node.stop(pid);
        env.proxy = start_proxy_with(
            &mut env.topo.node,
            env.dir.path(),
            METRICS,
            &["--proxy-mode", "ipvs", "--ipvs-scheduler", sched],
        )
        .expect("weir-proxy restart");
        env.wait_ipvs(&format!("the virtual server with {sched}"), |t| {
            t.contains(&hex("10.96.0.10", 80)) && t.contains(&format!(" {sched} "))
        });
        let r = tcp(&env.topo.client, "10.96.0.10:80", 12);
        assert_eq!(total(&r), 12, "{sched}: {r}");
        let n = names(&r);
        match sched {
            // Hashing schedulers: one client (sh, mh) or one destination (dh) -> one pod.
            "sh" | "dh" | "mh" => assert_eq!(n.len(), 1, "{sched}: {r}"),
            _ => assert_eq!(n.len(), 3, "{sched}: {r}"),
        }
    }
}

#[test]
fn a_service_without_endpoints_is_rejected() {
    if !in_vm() {
        return;
    }
    let svc = service_yaml("empty", "10.96.0.20", "TCP", 80, None, 8080, &[]);
    let env = setup(1, &[], &svc);
    env.wait_ipvs("the empty virtual server", |t| {
        t.contains(&hex("10.96.0.20", 80))
    });
    let r = tcp(&env.topo.client, "10.96.0.20:80", 3);
    assert_eq!(errors(&r, "refused"), 3, "{r}");
}

#[test]
fn a_removed_endpoint_gets_no_new_connections() {
    if !in_vm() {
        return;
    }
    let env = setup(
        3,
        &[],
        &service_yaml("web", "10.96.0.10", "TCP", 80, None, 8080, &[0, 1, 2]),
    );
    wait_answers(
        &env.topo.client,
        "10.96.0.10:80",
        30,
        &["pod-0", "pod-1", "pod-2"],
    );
    env.rewrite(&service_yaml(
        "web",
        "10.96.0.10",
        "TCP",
        80,
        None,
        8080,
        &[0, 1],
    ));
    let r = wait_answers(&env.topo.client, "10.96.0.10:80", 30, &["pod-0", "pod-1"]);
    assert_eq!(total(&r), 30, "{r}");
    // Graceful termination: the real server stays at weight 0 while its (TIME_WAIT)
    // connections drain; it is deleted once they are gone or after the drain timeout.
    let gone = hex(&pod_ip(2), 8080);
    env.wait_ipvs("pod-2's real server at weight 0 or deleted", |t| {
        t.lines()
            .find(|l| l.contains(&gone))
            .is_none_or(|l| l.split_whitespace().nth(3) == Some("0"))
    });
}

#[test]
fn udp_clusterip_reaches_the_endpoints() {
    if !in_vm() {
        return;
    }
    let env = setup(
        2,
        &[],
        &service_yaml("dns", "10.96.0.53", "UDP", 53, None, 5353, &[0, 1]),
    );
    env.wait_ipvs("the UDP virtual server", |t| {
        t.contains("UDP") && t.contains(&hex("10.96.0.53", 53))
    });
    let mut last = Value::Null;
    wait_until("UDP answers", WAIT, || {
        last = probe(&env.topo.client, &["udp", "10.96.0.53:53", "10"]).unwrap();
        total(&last) == 10
    })
    .unwrap_or_else(|e| panic!("{e}; {last}"));
}

#[test]
fn session_affinity_is_a_persistent_virtual_server() {
    if !in_vm() {
        return;
    }
    let svc = service_yaml("web", "10.96.0.10", "TCP", 80, None, 8080, &[0, 1, 2]).replace(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 120}}\n",
    );
    let env = setup(3, &[], &svc);
    env.wait_ipvs("a persistent virtual server", |t| {
        // /proc/net/ip_vs prints the timeout in jiffies (120 s x HZ).
        t.contains(" persistent ")
    });
    let r = tcp(&env.topo.client, "10.96.0.10:80", 20);
    assert_eq!(total(&r), 20, "{r}");
    assert_eq!(names(&r).len(), 1, "one client, one endpoint: {r}");
}

#[test]
fn etp_local_nodeport_reaches_only_this_nodes_endpoints() {
    if !in_vm() {
        return;
    }
    // Pods 0 and 1 are local, pod 2 is labelled as node2's.
    let svc = service_yaml(
        "web",
        "10.96.0.10",
        "TCP",
        80,
        Some(30080),
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
    );
    let env = setup(3, &[], &svc);
    let r = wait_answers(
        &env.topo.client,
        "192.168.77.10:30080",
        30,
        &["pod-0", "pod-1"],
    );
    assert_eq!(total(&r), 30, "{r}");
    wait_answers(
        &env.topo.client,
        "10.96.0.10:80",
        30,
        &["pod-0", "pod-1", "pod-2"],
    );
}
