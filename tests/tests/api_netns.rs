//! The API tier with real packets: a real kube-apiserver + etcd of the pinned release (built
//! from the Go module proxy), weir-proxy in a node namespace watching it (`--kubeconfig`, reached through a
//! forwarder on the node's loopback), pods behind routed veths.
//!
//! Proves: API changes drive the rules and the traffic; an API server restart (watches
//! expire, 410 -> relist) flushes nothing and keeps connections; a 60 s outage leaves the
//! rules serving, turns /healthz to 503 with `sourceHealthy: false`, and everything catches
//! up after; under RBAC the ClusterRole from deploy/weir.yaml is enough (and grants no
//! writes), and every object in deploy/weir.yaml passes the API server's own validation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use weir_e2e::apiserver::{ApiServer, ApiServerOptions};
use weir_e2e::forward::Forwarder;
use weir_e2e::*;

const METRICS: u16 = 10349;
/// The health port [`start_proxy_from`] gives weir-proxy.
const HEALTH: u16 = METRICS + 7;

fn web(pods: &[usize]) -> String {
    service_yaml("web", "10.96.0.50", "TCP", 80, None, 8080, pods)
}

/// The answering pods of 60 connections from pod-3 to the ClusterIP.
fn reached(topo: &Topology) -> Vec<String> {
    let mut n = names(&probe(&topo.pods[3], &["tcp", "10.96.0.50:80", "60"]).unwrap());
    n.sort();
    n
}

fn wait_reached(topo: &Topology, want: &[&str], what: &str) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    wait_until(what, Duration::from_secs(20), || reached(topo) == want).unwrap();
}

/// Starts weir-proxy in the node namespace against the API server.
fn start_weir(topo: &mut Topology, kubeconfig: &Path) -> u32 {
    let kc = kubeconfig.display().to_string();
    start_proxy_from(
        &mut topo.node,
        &["--kubeconfig", &kc],
        METRICS,
        NODE_NAME,
        &["--sync-period", "5s"],
    )
    .unwrap()
}

fn healthz(topo: &Topology) -> Value {
    let addr = format!("127.0.0.1:{HEALTH}");
    probe(&topo.node, &["http", &addr, "/healthz"]).unwrap()
}

fn setup(api: &ApiServer) -> (Topology, Forwarder) {
    api.kubectl(&["create", "namespace", "demo"]).unwrap();
    let mut topo = Topology::new(4).expect("topology");
    let echo = Path::new(env!("CARGO_BIN_EXE_weir-echo"));
    for i in 0..4 {
        topo.start_echo(i, echo, &format!("pod-{i}")).expect("echo");
    }
    let target: SocketAddr = format!("127.0.0.1:{}", api.port()).parse().unwrap();
    let fwd = Forwarder::start(topo.node.name(), api.port(), target).expect("forwarder");
    (topo, fwd)
}

fn table_handle(topo: &Topology) -> String {
    let out = topo
        .node
        .exec(&["nft", "-a", "list", "table", "ip", "weir"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn api_changes_drive_rules_and_traffic_through_restart_and_outage() {
    if !require_privileges() {
        return;
    }
    let Some(mut api) = ApiServer::start_or_skip(ApiServerOptions::default()) else {
        return;
    };
    let (mut topo, _fwd) = setup(&api);
    api.apply_yaml(&web(&[0, 1])).unwrap();
    start_weir(&mut topo, &api.kubeconfig_path());
    wait_reached(&topo, &["pod-0", "pod-1"], "the Service from the API");

    // An endpoint added through the API.
    api.apply_yaml(&web(&[0, 1, 2])).unwrap();
    wait_reached(&topo, &["pod-0", "pod-1", "pod-2"], "pod-2 added");

    // API server restart: watches expire and relist; nothing is flushed, a connection
    // held across it keeps answering.
    let handle = table_handle(&topo);
    let probe_bin = workspace_bin("weir-probe");
    let hold = topo
        .pods
        .get_mut(3)
        .unwrap()
        .spawn(
            &[
                &probe_bin.to_string_lossy(),
                "hold",
                "10.96.0.50:80",
                "12000",
            ],
            Stdio::piped(),
        )
        .unwrap();
    let mut out = hold.stdout.take().unwrap();
    let mut first = [0u8; 10];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"connected\n");
    api.restart().unwrap();
    // After the relist, a change still arrives (the watch is live again).
    api.apply_yaml(&web(&[1, 2])).unwrap();
    wait_reached(
        &topo,
        &["pod-1", "pod-2"],
        "pod-0 removed after the restart",
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let r: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert!(
        r["errors"].as_object().unwrap().is_empty(),
        "the held connection failed across the restart: {r}"
    );
    assert_eq!(
        table_handle(&topo),
        handle,
        "the table was never deleted and recreated"
    );

    // A 60 s outage: rules keep serving; health turns stale; then everything catches up.
    api.stop_apiserver().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    assert_eq!(
        reached(&topo),
        ["pod-1", "pod-2"],
        "rules stay during the outage"
    );
    let h = healthz(&topo);
    assert_eq!(h["status"], 503, "stale after 2 x sync period: {h}");
    assert!(
        h["body"]
            .as_str()
            .unwrap()
            .contains("\"sourceHealthy\":false"),
        "{h}"
    );
    api.start_apiserver().unwrap();
    api.apply_yaml(&web(&[0, 1, 2])).unwrap();
    wait_reached(
        &topo,
        &["pod-0", "pod-1", "pod-2"],
        "caught up after the outage",
    );
    wait_until("healthy again", Duration::from_secs(20), || {
        healthz(&topo)["status"] == 200
    })
    .unwrap();
}

#[test]
fn deploy_manifests_pass_api_validation_and_the_cluster_role_is_enough_and_minimal() {
    if !require_privileges() {
        return;
    }
    let opts = ApiServerOptions::rbac().with_service_account("kube-system", "weir");
    let Some(api) = ApiServer::start_or_skip(opts) else {
        return;
    };
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/weir.yaml");
    let path = manifests.display().to_string();
    // Every object passes the API server's validation (server-side dry run)...
    let out = api
        .kubectl(&["apply", "--dry-run=server", "-f", &path])
        .unwrap();
    for kind in [
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "configmap",
        "daemonset",
    ] {
        assert!(
            out.contains(kind),
            "{kind} missing in dry run output:\n{out}"
        );
    }
    // ...and is really created.
    api.kubectl(&["apply", "-f", &path]).unwrap();
    let user = "system:serviceaccount:kube-system:weir";
    // The ClusterRole allows no writes and no reads beyond list/watch.
    for args in [
        ["auth", "can-i", "create", "services"],
        ["auth", "can-i", "delete", "endpointslices.discovery.k8s.io"],
        ["auth", "can-i", "get", "secrets"],
        ["auth", "can-i", "update", "nodes"],
        ["auth", "can-i", "get", "configmaps"],
        [
            "auth",
            "can-i",
            "create",
            "networkpolicies.networking.k8s.io",
        ],
        ["auth", "can-i", "delete", "pods"],
    ] {
        // `kubectl auth can-i` prints "no" and exits 1 when denied.
        let denied = match api.kubectl_as(user, &args) {
            Ok(s) => s.trim() == "no",
            Err(e) => {
                let e = e.to_string();
                !e.contains("Unauthorized") && !e.contains("Unable to connect")
            }
        };
        assert!(denied, "{args:?} must be denied");
    }
    for args in [
        ["auth", "can-i", "watch", "services"],
        ["auth", "can-i", "list", "endpointslices.discovery.k8s.io"],
        ["auth", "can-i", "watch", "nodes"],
        ["auth", "can-i", "watch", "pods"],
        ["auth", "can-i", "list", "namespaces"],
        [
            "auth",
            "can-i",
            "watch",
            "networkpolicies.networking.k8s.io",
        ],
    ] {
        assert_eq!(
            api.kubectl_as(user, &args).unwrap().trim(),
            "yes",
            "{args:?}"
        );
    }
    // weir-proxy with only that identity lists everything it needs and programs a Service.
    let (mut topo, _fwd) = setup(&api);
    api.apply_yaml(&web(&[0, 1])).unwrap();
    let kc = api.user_kubeconfig(user).unwrap().to_owned();
    start_weir(&mut topo, &kc);
    wait_reached(
        &topo,
        &["pod-0", "pod-1"],
        "the Service through the weir identity",
    );
}

/// A Pod object for topology pod `i` (namespace demo, label app=pod-i, on this node).
fn pod_object(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: demo, labels: {{app: pod-{i}}}}}\nspec: {{nodeName: {NODE_NAME}, automountServiceAccountToken: false, containers: [{{name: c, image: none, ports: [{{name: http, containerPort: 8080}}]}}]}}\n"
    )
}

/// Sets pod `i`'s status (its address) through the status subresource, as the kubelet does.
fn set_pod_ip(api: &ApiServer, i: usize) {
    let mut pod = api.get("pod", Some("demo"), &format!("pod-{i}")).unwrap();
    pod["status"] = serde_json::json!({
        "phase": "Running",
        "podIP": pod_ip(i),
        "podIPs": [{"ip": pod_ip(i)}],
    });
    api.kubectl_stdin(
        &[
            "replace",
            "--raw",
            &format!("/api/v1/namespaces/demo/pods/pod-{i}/status"),
            "-f",
            "-",
        ],
        &pod.to_string(),
    )
    .unwrap();
}

/// Whether one TCP request from topology pod `from` to pod `to`'s own address is answered.
fn pod_reaches(topo: &Topology, from: usize, to: usize) -> bool {
    let addr = format!("{}:8080", pod_ip(to));
    total(&probe(&topo.pods[from], &["tcp", &addr, "1"]).unwrap()) == 1
}

#[test]
fn network_policies_from_the_api_isolate_this_nodes_pods() {
    if !require_privileges() {
        return;
    }
    let Some(api) = ApiServer::start_or_skip(ApiServerOptions::default()) else {
        return;
    };
    let (mut topo, _fwd) = setup(&api);
    for i in 0..4 {
        api.apply_yaml(&pod_object(i)).unwrap();
        set_pod_ip(&api, i);
    }
    start_weir(&mut topo, &api.kubeconfig_path());
    wait_until("policy table programmed", Duration::from_secs(20), || {
        metric(
            &topo.node,
            METRICS,
            "weir_policy_sync_last_timestamp_seconds",
        )
        .unwrap_or(0.0)
            > 0.0
    })
    .unwrap();
    assert!(pod_reaches(&topo, 3, 0), "no policy: everything is allowed");
    // Only pod-1 may reach pod-0.
    api.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-1, namespace: demo}\nspec:\n  podSelector: {matchLabels: {app: pod-0}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: pod-1}}}], ports: [{port: http}]}]\n",
    )
    .unwrap();
    wait_until("pod-3 blocked from pod-0", Duration::from_secs(20), || {
        !pod_reaches(&topo, 3, 0)
    })
    .unwrap();
    assert!(pod_reaches(&topo, 1, 0), "pod-1 is allowed by the policy");
    assert!(pod_reaches(&topo, 3, 2), "pod-2 is not selected");
    // A label change through the API moves pod-3 into the allowed peers.
    api.kubectl(&[
        "label",
        "pod",
        "pod-3",
        "-n",
        "demo",
        "--overwrite",
        "app=pod-1",
    ])
    .unwrap();
    wait_until("relabelled pod-3 allowed", Duration::from_secs(20), || {
        pod_reaches(&topo, 3, 0)
    })
    .unwrap();
    api.delete("networkpolicy", Some("demo"), "only-1").unwrap();
    wait_until("policy deleted", Duration::from_secs(20), || {
        pod_reaches(&topo, 2, 0)
    })
    .unwrap();
}
