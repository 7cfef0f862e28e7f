//! The cluster tier: against the cluster `cargo xtask cluster up` made (real kubelets and
//! containerd on node namespaces, the pinned release's control plane, weir deployed from
//! deploy/weir.yaml), workloads made with kubectl the way users make them.
//!
//! These tests are `#[ignore]`d in a plain `cargo test`: `cargo xtask cluster test` (and
//! `cargo xtask test`) bring the cluster up and run them with `--ignored`, one at a time.
//! Without a cluster they fail under `CI=true` and skip otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use weir_e2e::cluster::{topology, Cluster};

fn cluster() -> Option<Cluster> {
    match Cluster::attach() {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the cluster tier must run under CI=true: {e:#}"
            );
            eprintln!("skipped: {e:#}");
            None
        }
    }
}

/// A namespace made for one test, deleted when dropped.
struct Ns<'a> {
    c: &'a Cluster,
    name: String,
}

impl<'a> Ns<'a> {
    fn new(c: &'a Cluster, name: &str) -> Ns<'a> {
        let _ = c.kubectl(&["delete", "namespace", name, "--wait=true", "--timeout=120s"]);
        c.kubectl(&["create", "namespace", name]).unwrap();
        Ns {
            c,
            name: name.to_owned(),
        }
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        self.c.kubectl(&a)
    }

    fn apply(&self, yaml: &str) {
        self.c
            .kubectl_stdin(&["-n", &self.name, "apply", "-f", "-"], yaml)
            .unwrap();
    }

    /// Runs `sh -c script` in the `client` pod.
    fn in_client(&self, script: &str) -> String {
        self.kubectl(&["exec", "client", "--", "sh", "-c", script])
            .unwrap_or_else(|e| format!("exec failed: {e:#}"))
    }

    /// Starts `sh -c script` in the `client` pod on a thread; its stdout when joined.
    fn in_client_background(&self, script: &str) -> std::thread::JoinHandle<String> {
        let args: Vec<String> = [
            "--kubeconfig",
            &self.c.kubeconfig().display().to_string(),
            "-n",
            &self.name,
            "exec",
            "client",
            "--",
            "sh",
            "-c",
            script,
        ]
        .map(String::from)
        .into();
        let kubectl = self.c.bins.kubectl.clone();
        std::thread::spawn(move || {
            std::process::Command::new(kubectl)
                .args(&args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        })
    }

    fn wait_rollout(&self, what: &str) {
        self.kubectl(&["rollout", "status", what, "--timeout=180s"])
            .unwrap_or_else(|e| panic!("{what}: {e:#}\n{}", self.c.diagnose()));
    }

    fn wait_pod_ready(&self, pod: &str) {
        self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=180s",
        ])
        .unwrap_or_else(|e| panic!("pod {pod}: {e:#}\n{}", self.c.diagnose()));
    }

    fn cluster_ip(&self, svc: &str) -> String {
        self.kubectl(&["get", "svc", svc, "-o", "jsonpath={.spec.clusterIP}"])
            .unwrap()
            .trim()
            .to_owned()
    }

    fn node_port(&self, svc: &str) -> String {
        self.kubectl(&[
            "get",
            "svc",
            svc,
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])
        .unwrap()
        .trim()
        .to_owned()
    }

    /// Pod name -> node name of the pods matching `selector` (not terminating).
    fn pods_by_node(&self, selector: &str) -> Vec<(String, String)> {
        let v: Value = serde_json::from_str(
            &self
                .kubectl(&["get", "pods", "-l", selector, "-o", "json"])
                .unwrap(),
        )
        .unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            // Pods on their way out are listed until they are gone.
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["spec"]["nodeName"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for Ns<'_> {
    fn drop(&mut self) {
        let _ = self
            .c
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A plain HTTP/1.0 GET from the host: (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_owned()))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match f() {
            Some(v) => return v,
            None if Instant::now() > deadline => {
                panic!("timed out waiting for {what} (last: {last:?})")
            }
            None => {}
        }
        last = Some(Instant::now());
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// agnhost netexec behind a Deployment spread over the nodes, a client pod, Services.
fn web_yaml(replicas: usize, image_arg: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 5
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: web}}}}}}
      containers:
      - name: netexec
        image: {agnhost}
        args: [netexec, --http-port=8080, --udp-port=8081, {image_arg}]
        readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
        lifecycle: {{preStop: {{sleep: {{seconds: 2}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-np}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - {{name: client, image: {agnhost}, args: [pause]}}
"#,
        agnhost = weir_e2e::cluster::images::AGNHOST_IMAGE
    )
}

fn hostnames(out: &str) -> BTreeSet<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("web-"))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn the_daemonset_is_ready_on_every_node_and_answers_on_10249() {
    let Some(c) = cluster() else { return };
    let ds: Value = c
        .get_json(&["-n", "kube-system", "daemonset", "weir"])
        .unwrap();
    assert_eq!(ds["status"]["desiredNumberScheduled"], c.nodes);
    assert_eq!(ds["status"]["numberReady"], c.nodes, "{}", ds["status"]);
    let nodes = c.get_json(&["nodes"]).unwrap();
    let ready = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| weir_e2e::cluster::node_is_ready(n))
        .count();
    assert_eq!(ready, c.nodes);
    let mode = mode();
    for n in 1..=c.nodes {
        let addr = format!("{}:10249", topology::node_ip(n));
        let (status, body) = http_get(&addr, "/proxyMode").unwrap();
        assert_eq!((status, body.as_str()), (200, mode.as_str()), "node{n}");
        let (status, metrics) = http_get(&addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        assert!(
            metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds"),
            "node{n} /metrics: {}",
            &metrics[..metrics.len().min(500)]
        );
        let (status, _) = http_get(&format!("{}:10256", topology::node_ip(n)), "/healthz").unwrap();
        assert_eq!(status, 200, "node{n} /healthz on 10256");
    }
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn clusterip_and_nodeport_reach_pods_on_every_node() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-reach");
    ns.apply(&web_yaml(2 * c.nodes, "--delay-shutdown=0"));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    let pods = ns.pods_by_node("app=web");
    let nodes: BTreeSet<&str> = pods.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        nodes.len(),
        c.nodes,
        "pods spread over every node: {pods:?}"
    );

    let ip = ns.cluster_ip("web");
    let seen = wait_for(
        "every pod answering through the ClusterIP",
        Duration::from_secs(60),
        || {
            let out = ns.in_client(&format!(
                "for i in $(seq 1 40); do curl -s -m 2 http://{ip}/hostname; echo; done"
            ));
            let got = hostnames(&out);
            (got.len() == pods.len()).then(|| format!("{got:?}"))
        },
    );
    eprintln!("ClusterIP {ip}: {seen}");

    let port = ns.node_port("web-np");
    for n in 1..=c.nodes {
        let url = format!("http://{}:{port}/hostname", topology::node_ip(n));
        let got = wait_for(
            &format!("NodePort on node{n}"),
            Duration::from_secs(60),
            || {
                let out = c
                    .client_exec(&[
                        "sh",
                        "-c",
                        &format!("for i in $(seq 1 20); do curl -s -m 2 {url}; echo; done"),
                    ])
                    .unwrap_or_default();
                let got = hostnames(&out);
                // ETP Cluster: pods of every node answer on every node.
                let nodes_answering: BTreeSet<&str> = pods
                    .iter()
                    .filter(|(p, _)| got.contains(p))
                    .map(|(_, node)| node.as_str())
                    .collect();
                (nodes_answering.len() == c.nodes).then(|| format!("{got:?}"))
            },
        );
        eprintln!("NodePort on node{n} from outside: {got}");
    }
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn scaling_to_zero_refuses_connections_and_scaling_back_serves_again() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-scale");
    ns.apply(&web_yaml(3, "--delay-shutdown=0"));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    let ip = ns.cluster_ip("web");
    let probe = format!(
        "curl -s -m 2 -o /dev/null -w '%{{http_code}}' http://{ip}/hostname; echo \" exit=$?\""
    );
    wait_for("the ClusterIP serving", Duration::from_secs(60), || {
        let out = ns.in_client(&probe);
        out.starts_with("200").then_some(out)
    });
    ns.kubectl(&["scale", "deployment/web", "--replicas=0"])
        .unwrap();
    // No endpoints: refused at once (kube-proxy's REJECT), curl's exit code 7.
    let refused = wait_for(
        "connections refused at 0 replicas",
        Duration::from_secs(60),
        || {
            let out = ns.in_client(&probe);
            out.contains("exit=7").then_some(out)
        },
    );
    eprintln!("at 0 replicas: {refused}");
    ns.kubectl(&["scale", "deployment/web", "--replicas=3"])
        .unwrap();
    ns.wait_rollout("deployment/web");
    let out = wait_for(
        "the ClusterIP serving again",
        Duration::from_secs(60),
        || {
            let out = ns.in_client(&format!(
                "for i in $(seq 1 30); do curl -s -m 2 http://{ip}/hostname; echo; done"
            ));
            (hostnames(&out).len() == 3).then_some(out)
        },
    );
    assert_eq!(hostnames(&out).len(), 3);
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn a_rolling_update_loses_no_request_of_a_client_looping_through_the_clusterip() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-roll");
    ns.apply(&web_yaml(2, "--delay-shutdown=3"));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    let ip = ns.cluster_ip("web");
    wait_for("the ClusterIP serving", Duration::from_secs(60), || {
        let out = ns.in_client(&format!("curl -s -m 2 http://{ip}/hostname"));
        out.starts_with("web-").then_some(out)
    });
    let before: BTreeSet<String> = ns
        .pods_by_node("app=web")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    // The client loops for 60 s (or until told to stop), one request per 100 ms.
    let script = format!(
        "ok=0; fail=0; end=$(( $(date +%s) + 60 )); \
         while [ $(date +%s) -lt $end ] && [ ! -e /tmp/stop ]; do \
         if curl -s -m 2 -o /dev/null http://{ip}/hostname; then ok=$((ok+1)); else fail=$((fail+1)); fi; \
         sleep 0.1; done; echo ok=$ok fail=$fail"
    );
    let looper = ns.in_client_background(&script);
    std::thread::sleep(Duration::from_secs(3));
    ns.kubectl(&["rollout", "restart", "deployment/web"])
        .unwrap();
    ns.wait_rollout("deployment/web");
    std::thread::sleep(Duration::from_secs(5));
    let _ = ns.in_client("touch /tmp/stop");
    let result = looper.join().unwrap();
    let after: BTreeSet<String> = ns
        .pods_by_node("app=web")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert!(
        before.is_disjoint(&after),
        "every pod replaced: {before:?} -> {after:?}"
    );
    let fail: usize = result
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fail="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no result from the client loop: {result:?}"));
    let ok: usize = result
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ok="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("rolling update: {result}");
    assert!(ok > 50, "{result}");
    assert_eq!(fail, 0, "requests lost during the rolling update: {result}");
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn network_policy_default_deny_plus_one_allow_is_enforced_on_every_node() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-netpol");
    ns.apply(&web_yaml(c.nodes, "--delay-shutdown=0"));
    // A second client, allowed by label; `client` is not.
    ns.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: allowed, labels: {{role: allowed}}}}\nspec:\n  \
         terminationGracePeriodSeconds: 0\n  containers:\n  - {{name: c, image: {}, args: [pause]}}\n",
        weir_e2e::cluster::images::AGNHOST_IMAGE
    ));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    ns.wait_pod_ready("allowed");
    let pods: Vec<(String, String)> = ns.pods_by_node("app=web");
    let ips: Vec<String> = pods
        .iter()
        .map(|(p, _)| {
            ns.kubectl(&["get", "pod", p, "-o", "jsonpath={.status.podIP}"])
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    let reach = |from: &str, ip: &str| -> bool {
        ns.kubectl(&[
            "exec",
            from,
            "--",
            "sh",
            "-c",
            &format!("curl -s -m 2 -o /dev/null -w '%{{http_code}}' http://{ip}:8080/hostname"),
        ])
        .is_ok_and(|o| o.starts_with("200"))
    };
    for ip in &ips {
        assert!(
            reach("client", ip),
            "before any policy, client reaches {ip}"
        );
    }
    ns.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny}\n\
         spec: {podSelector: {}, policyTypes: [Ingress]}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-role}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: allowed}}}]\n    ports: [{port: 8080}]\n",
    );
    for (ip, (pod, node)) in ips.iter().zip(&pods) {
        wait_for(
            &format!("{pod} on {node} denying client"),
            Duration::from_secs(30),
            || (!reach("client", ip)).then(String::new),
        );
        assert!(
            reach("allowed", ip),
            "{pod} on {node}: the allowed pod is let in"
        );
    }
    ns.kubectl(&["delete", "networkpolicy", "default-deny", "allow-role"])
        .unwrap();
    for ip in &ips {
        wait_for("the policies gone", Duration::from_secs(30), || {
            reach("client", ip).then(String::new)
        });
    }
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn deleting_a_weir_pod_keeps_established_connections_and_the_rules() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-restart");
    ns.apply(&web_yaml(2, "--delay-shutdown=0"));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    let client_node = ns
        .kubectl(&["get", "pod", "client", "-o", "jsonpath={.spec.nodeName}"])
        .unwrap();
    let n: usize = client_node
        .trim()
        .trim_start_matches("node")
        .parse()
        .unwrap();
    let ip = ns.cluster_ip("web");
    wait_for("the ClusterIP serving", Duration::from_secs(60), || {
        let out = ns.in_client(&format!("curl -s -m 2 http://{ip}/hostname"));
        out.starts_with("web-").then_some(out)
    });
    // One TCP connection held open across the restart: a netcat session speaking HTTP/1.1
    // keep-alive to netexec, one request a second for 20 s, replies counted. OpenBSD nc (the
    // agnhost image's, as upstream's) keeps the connection after its input ends unless told:
    // `-q 2` quits 2 s after the last request.
    let script = format!(
        "(for i in $(seq 1 20); do printf 'GET /echo?msg=r%s HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' $i; sleep 1; done) \
         | nc -q 2 {ip} 80 | grep -c '^r[0-9]'"
    );
    let looper = ns.in_client_background(&script);
    std::thread::sleep(Duration::from_secs(3));
    let before = programmed(&c, n, &ip);
    assert!(before.is_ok(), "node{n} before the restart: {before:?}");
    let pod = c
        .kubectl(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=weir",
            "--field-selector",
            &format!("spec.nodeName={}", client_node.trim()),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .unwrap();
    c.kubectl(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        pod.trim(),
        "--wait=false",
    ])
    .unwrap();
    // While the pod is replaced the node's rules (or maps) never go away.
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let now = programmed(&c, n, &ip);
        assert!(now.is_ok(), "node{n} during the restart: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let replies = looper.join().unwrap();
    assert_eq!(
        replies.trim(),
        "20",
        "replies on the connection held across the restart"
    );
    c.rollout_status().unwrap();
    let after = programmed(&c, n, &ip);
    assert!(after.is_ok(), "node{n} after the restart: {after:?}");
}

/// The cluster's proxy mode (`WEIR_CLUSTER_MODE`, as `cargo xtask cluster test` sets it).
fn mode() -> String {
    std::env::var("WEIR_CLUSTER_MODE").unwrap_or_else(|_| "nftables".to_owned())
}

/// Whether node `n` has the ClusterIP `ip` programmed: in nftables mode an element of its
/// `ip weir` table; in eBPF mode its pinned programs and maps under /sys/fs/bpf/weir.
fn programmed(c: &Cluster, n: usize, ip: &str) -> Result<(), String> {
    if mode() == "ebpf" {
        let pins = c
            .node_exec(n, &["sh", "-c", "ls /sys/fs/bpf/weir"])
            .map_err(|e| format!("{e:#}"))?;
        if pins.contains("link_") && pins.lines().count() > 3 {
            return Ok(());
        }
        return Err(format!("pins: {pins:?}"));
    }
    let table = c
        .node_exec(n, &["nft", "list", "table", "ip", "weir"])
        .map_err(|e| format!("{e:#}"))?;
    if table.contains(ip) {
        Ok(())
    } else {
        Err(format!("{ip} is not in the table"))
    }
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn etp_local_health_check_node_port_answers_per_node_and_headless_gets_no_rules() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-etp");
    let agnhost = weir_e2e::cluster::images::AGNHOST_IMAGE;
    ns.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: one}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: one}}}}
  template:
    metadata: {{labels: {{app: one}}}}
    spec:
      containers:
      - {{name: netexec, image: {agnhost}, args: [netexec, --http-port=8080]}}
---
apiVersion: v1
kind: Service
metadata: {{name: lb}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {{app: one}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: headless}}
spec:
  clusterIP: None
  selector: {{app: one}}
  ports: [{{port: 9797, targetPort: 8080}}]
"#
    ));
    ns.wait_rollout("deployment/one");
    let pods = ns.pods_by_node("app=one");
    let home = pods[0].1.clone();
    let hc = ns
        .kubectl(&[
            "get",
            "svc",
            "lb",
            "-o",
            "jsonpath={.spec.healthCheckNodePort}",
        ])
        .unwrap();
    assert!(
        !hc.trim().is_empty(),
        "an ETP Local LoadBalancer gets a healthCheckNodePort"
    );
    for n in 1..=c.nodes {
        let addr = format!("{}:{}", topology::node_ip(n), hc.trim());
        let want = if topology::node_name(n) == home {
            200
        } else {
            503
        };
        let body = wait_for(
            &format!("node{n}'s health check answering {want}"),
            Duration::from_secs(30),
            || {
                http_get(&addr, "/healthz")
                    .ok()
                    .filter(|(s, _)| *s == want)
                    .map(|(_, b)| b)
            },
        );
        assert!(body.contains("localEndpoints"), "node{n}: {body}");
    }
    // The headless Service has endpoints (the controller wrote its slice) but weir
    // programs nothing for it.
    let slices = ns
        .kubectl(&[
            "get",
            "endpointslice",
            "-l",
            "kubernetes.io/service-name=headless",
            "-o",
            "json",
        ])
        .unwrap();
    assert!(slices.contains("10.244."), "{slices}");
    // (eBPF mode's maps hold no port names to look for; the model's tests cover it.)
    for n in (1..=c.nodes).filter(|_| mode() == "nftables") {
        let table = c
            .node_exec(n, &["nft", "list", "table", "ip", "weir"])
            .unwrap();
        assert!(
            !table.contains("9797"),
            "node{n} programmed the headless Service"
        );
    }
}

/// Sets the ConfigMap's mode as an operator would (`kubectl edit`), then rolls the
/// DaemonSet (`kubectl -n kube-system rollout restart daemonset/weir`).
fn switch_mode(c: &Cluster, from: &str, to: &str) {
    let cm = c
        .get_json(&["-n", "kube-system", "configmap", "weir"])
        .unwrap();
    let conf = cm["data"]["config.conf"].as_str().unwrap();
    assert!(conf.contains(&format!("mode: {from}")), "{conf}");
    let mut cm = cm.clone();
    cm["data"]["config.conf"] =
        Value::String(conf.replace(&format!("mode: {from}"), &format!("mode: {to}")));
    c.kubectl_stdin(&["replace", "-f", "-"], &cm.to_string())
        .unwrap();
    c.kubectl(&["-n", "kube-system", "rollout", "restart", "daemonset/weir"])
        .unwrap();
    c.rollout_status().unwrap();
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn switching_the_mode_in_the_configmap_moves_every_node_and_leaves_nothing_behind() {
    let Some(c) = cluster() else { return };
    let start = mode();
    let other = if start == "nftables" {
        "ebpf"
    } else {
        "nftables"
    };
    let ns = Ns::new(&c, "t-mode");
    ns.apply(&web_yaml(c.nodes, "--delay-shutdown=0"));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    let ip = ns.cluster_ip("web");
    let serves = || {
        wait_for("the ClusterIP serving", Duration::from_secs(60), || {
            let out = ns.in_client(&format!(
                "for i in $(seq 1 10); do curl -s -m 2 http://{ip}/hostname; echo; done"
            ));
            (hostnames(&out).len() >= 2).then_some(out)
        })
    };
    let modes = |want: &str| {
        for n in 1..=c.nodes {
            let addr = format!("{}:10249", topology::node_ip(n));
            wait_for(
                &format!("node{n} /proxyMode {want}"),
                Duration::from_secs(60),
                || {
                    http_get(&addr, "/proxyMode")
                        .ok()
                        .filter(|(_, b)| b == want)
                        .map(|(_, b)| b)
                },
            );
        }
    };
    // What each mode leaves in a node: nftables mode its `weir` tables, eBPF mode its pins.
    let leftovers = |mode: &str, n: usize| -> String {
        match mode {
            "nftables" => c
                .node_exec(n, &["nft", "list", "tables"])
                .unwrap_or_default()
                .lines()
                .filter(|l| l.trim() == "table ip weir" || l.trim() == "table ip6 weir")
                .collect::<Vec<_>>()
                .join(","),
            _ => c
                .node_exec(n, &["sh", "-c", "ls /sys/fs/bpf/weir 2>/dev/null || true"])
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    };
    modes(&start);
    serves();
    for (from, to) in [(start.as_str(), other), (other, start.as_str())] {
        switch_mode(&c, from, to);
        modes(to);
        for n in 1..=c.nodes {
            let left = wait_for(
                &format!("node{n} free of {from} mode's state"),
                Duration::from_secs(60),
                || {
                    let l = leftovers(from, n);
                    l.is_empty().then_some(l)
                },
            );
            assert!(left.is_empty());
        }
        let out = serves();
        eprintln!("{to} mode: {:?}", hostnames(&out));
    }
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn exec_logs_and_port_forward_reach_the_kubelets_through_the_api_server() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-stream");
    ns.apply(&web_yaml(1, "--delay-shutdown=0"));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    let (pod, _) = ns.pods_by_node("app=web").remove(0);
    // exec: the client pod's hostname is its name.
    assert_eq!(ns.in_client("hostname").trim(), "client");
    // logs: netexec says where it listens.
    let logs = ns.kubectl(&["logs", &pod]).unwrap();
    assert!(logs.contains("8080"), "kubectl logs {pod}: {logs}");
    // port-forward: a local port on the host to the pod's 8080.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut pf = std::process::Command::new(&c.bins.kubectl)
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args([
            "-n",
            &ns.name,
            "port-forward",
            &format!("pod/{pod}"),
            &format!("{port}:8080"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let got = wait_for(
        "an answer through kubectl port-forward",
        Duration::from_secs(30),
        || {
            http_get(&format!("127.0.0.1:{port}"), "/hostname")
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|(_, b)| b)
        },
    );
    let _ = pf.kill();
    let _ = pf.wait();
    assert_eq!(got.trim(), pod);
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn services_are_reached_by_name_through_the_cluster_dns() {
    let Some(c) = cluster() else { return };
    let ns = Ns::new(&c, "t-dns");
    ns.apply(&web_yaml(c.nodes, "--delay-shutdown=0"));
    ns.wait_rollout("deployment/web");
    ns.wait_pod_ready("client");
    let ip = ns.cluster_ip("web");
    // kube-dns is itself a ClusterIP weir programs; CoreDNS answers from the API.
    let answer = wait_for(
        "web.t-dns.svc.cluster.local resolving",
        Duration::from_secs(60),
        || {
            let out = ns.in_client("nslookup web.t-dns.svc.cluster.local");
            out.contains(&ip).then_some(out)
        },
    );
    assert!(
        answer.contains("10.96.0.10"),
        "answered by kube-dns: {answer}"
    );
    // The short name through the pod's search path, over TCP to the endpoints.
    let out = wait_for("http://web/ by name", Duration::from_secs(60), || {
        let out =
            ns.in_client("for i in $(seq 1 10); do curl -s -m 2 http://web/hostname; echo; done");
        (!hostnames(&out).is_empty()).then_some(out)
    });
    eprintln!("by name: {:?}", hostnames(&out));
}

/// The real kube-proxy of the pinned release in a namespace of its own on the fabric
/// (192.168.77.200): it watches the same API as weir's node1 but programs nothing of the
/// nodes. Stopped and removed when dropped.
struct SideKubeProxy {
    child: std::process::Child,
    ns: &'static str,
}

impl SideKubeProxy {
    const NS: &'static str = "weir-cl-kpmetrics";
    const IP: &'static str = "192.168.77.200";

    fn start(c: &Cluster, mode: &str) -> SideKubeProxy {
        let _ = topology::detach_namespace(Self::NS);
        topology::attach_namespace(Self::NS, "kpm", Self::IP).unwrap();
        let kc = c.state.join("kube-proxy-metrics.conf");
        weir_e2e::cluster::control_plane::Pki::open(&c.state)
            .write_kubeconfig(&kc, "system:kube-proxy")
            .unwrap();
        let log_path = weir_e2e::cluster::process::log_path(&c.state, "kube-proxy-metrics");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", Self::NS])
            .arg(&c.bins.kube_proxy)
            .arg(format!("--kubeconfig={}", kc.display()))
            .args([
                "--hostname-override=node1",
                &format!("--proxy-mode={mode}"),
                "--cluster-cidr=10.244.0.0/16",
                "--nodeport-addresses=primary",
                "--metrics-bind-address=0.0.0.0:10249",
                "--healthz-bind-address=0.0.0.0:10256",
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0s",
                "--conntrack-tcp-timeout-close-wait=0s",
                "--v=2",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting kube-proxy");
        SideKubeProxy {
            child,
            ns: Self::NS,
        }
    }

    fn addr(port: u16) -> String {
        format!("{}:{port}", Self::IP)
    }
}

impl Drop for SideKubeProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = topology::detach_namespace(self.ns);
    }
}

/// /healthz and /livez once each (both servers count them), then /metrics.
fn scrape(metrics: &str, health: &str) -> String {
    for path in ["/healthz", "/livez"] {
        let _ = http_get(health, path);
    }
    let (status, body) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{metrics}/metrics");
    body
}

#[test]
#[ignore = "needs the cluster of `cargo xtask cluster test`"]
fn kube_proxys_metrics_are_served_by_weir_with_the_same_names_types_and_labels() {
    use weir_proxy::http::metrics::{KUBE_PROXY_METRICS, KUBE_PROXY_NOT_SERVED};
    let Some(c) = cluster() else { return };
    let mode = mode();
    // The same mode on the same cluster: kube-proxy has no eBPF mode: weir's eBPF
    // mode is compared with kube-proxy's nftables mode.
    let kp_mode = if mode == "ebpf" {
        "nftables"
    } else {
        mode.as_str()
    };
    let kp = SideKubeProxy::start(&c, kp_mode);
    let kp_health = SideKubeProxy::addr(10256);
    let kp_metrics = SideKubeProxy::addr(10249);
    // Synced once: its last-sync timestamp is set.
    let theirs = wait_for("kube-proxy's first sync", Duration::from_secs(90), || {
        let (_, body) = http_get(&kp_metrics, "/metrics").ok()?;
        body.lines()
            .any(|l| {
                l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                    && !l.trim_end().ends_with(" 0")
            })
            .then_some(body)
    });
    drop(theirs);
    let theirs = weir_e2e::prom::families(&scrape(&kp_metrics, &kp_health));
    let node1 = topology::node_ip(1);
    let ours = weir_e2e::prom::families(&scrape(
        &format!("{node1}:10249"),
        &format!("{node1}:10256"),
    ));
    drop(kp);
    let mut problems = Vec::new();
    for (name, f) in theirs.iter().filter(|(n, _)| n.starts_with("kubeproxy_")) {
        // Family names as weir_e2e::prom keys them: a counter's without `_total`.
        let listed = |n: &str| n == name || n.strip_suffix("_total") == Some(name.as_str());
        if KUBE_PROXY_NOT_SERVED.iter().any(|(n, _)| listed(n)) {
            continue;
        }
        if !KUBE_PROXY_METRICS.iter().any(|(n, _, _)| listed(n)) {
            problems.push(format!(
                "kube-proxy serves {name} ({}), which weir neither serves nor lists as not applicable",
                f.kind
            ));
            continue;
        }
        match ours.get(name) {
            None => problems.push(format!("weir does not serve {name}")),
            Some(o) if o.kind != f.kind => problems.push(format!(
                "{name}: kube-proxy's is a {}, weir's a {}",
                f.kind, o.kind
            )),
            Some(o) if f.has_samples && o.has_samples && o.labels != f.labels => {
                problems.push(format!(
                    "{name}: kube-proxy's labels {:?}, weir's {:?}",
                    f.labels, o.labels
                ))
            }
            Some(_) => {}
        }
    }
    for (name, kind, labels) in KUBE_PROXY_METRICS {
        let base = match *kind {
            "counter" => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        match ours.get(base) {
            None => problems.push(format!("weir does not serve the promised {name}")),
            Some(o) if o.kind != *kind => {
                problems.push(format!("{name}: promised a {kind}, served a {}", o.kind))
            }
            Some(o) if o.has_samples => {
                let want: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
                if o.labels != want {
                    problems.push(format!(
                        "{name}: promised labels {want:?}, served {:?}",
                        o.labels
                    ));
                }
            }
            Some(_) => {}
        }
    }
    let compared = theirs
        .keys()
        .filter(|n| n.starts_with("kubeproxy_"))
        .count();
    eprintln!("compared {compared} kube-proxy families ({kp_mode} mode) with weir's ({mode} mode)");
    assert!(
        compared >= 10,
        "kube-proxy exposed only {compared} families"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
