//! Event -> rule-live latency through the real API server: 1,000 updates of one
//! EndpointSlice (each moves the endpoint to a new port), each timed from just before the
//! PATCH is sent to the moment `nft monitor` in the node namespace reports the new backend
//! element. Prints p50/p99 beside what weir's own
//! `kubeproxy_network_programming_duration_seconds` says. A benchmark that prints numbers:
//! it asserts only that every update went live.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use weir_e2e::apiserver::{ApiServer, ApiServerOptions};
use weir_e2e::forward::Forwarder;
use weir_e2e::prom::histogram_quantile;
use weir_e2e::*;

const METRICS: u16 = 10449;
const UPDATES: u16 = 1000;

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: lat, namespace: default}
spec: {clusterIP: 10.96.0.60, ports: [{port: 80, targetPort: 20000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lat-1, namespace: default, labels: {kubernetes.io/service-name: lat}}
addressType: IPv4
ports: [{port: 20000, protocol: TCP}]
endpoints: [{addresses: ["10.244.1.10"], nodeName: node1, conditions: {ready: true}}]
"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn event_to_rule_live_latency_over_1000_endpoint_updates() {
    if !require_privileges() {
        return;
    }
    let Some(api) = ApiServer::start_or_skip(ApiServerOptions::default()) else {
        return;
    };
    let mut topo = Topology::new(1).unwrap();
    let target: SocketAddr = format!("127.0.0.1:{}", api.port()).parse().unwrap();
    let _fwd = Forwarder::start(topo.node.name(), api.port(), target).unwrap();
    api.apply_yaml(SERVICE).unwrap();

    // nft monitor first, so no element change is missed.
    let mut monitor = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            topo.node.name(),
            "nft",
            "monitor",
            "new",
            "elements",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = monitor.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });

    let kc = api.kubeconfig_path().display().to_string();
    start_proxy_from(
        &mut topo.node,
        &["--kubeconfig", &kc],
        METRICS,
        NODE_NAME,
        &["--min-sync-period", "0s"],
    )
    .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let slices: kube::Api<EndpointSlice> = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(api.kubeconfig_path()).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Api::namespaced(kube::Client::try_from(cfg).unwrap(), "default")
    });
    let mut latencies = Vec::with_capacity(usize::from(UPDATES));
    for i in 1..=UPDATES {
        let port = 20000 + i;
        let patch = serde_json::json!({"ports": [{"port": port, "protocol": "TCP"}]});
        // Drop element events of earlier updates still queued.
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        rt.block_on(slices.patch("lat-1", &PatchParams::default(), &Patch::Merge(&patch)))
            .unwrap();
        let want = format!(": 10.244.1.10 . {port} }}");
        let deadline = t0 + Duration::from_secs(10);
        let live = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((at, line)) if line.contains(&want) => break at,
                Ok(_) => continue,
                Err(_) => panic!("update {i} (port {port}) never went live"),
            }
        };
        latencies.push(live.duration_since(t0));
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    latencies.sort();
    let text = metrics_text(&topo.node, METRICS);
    let name = "kubeproxy_network_programming_duration_seconds";
    let (p50, n) = histogram_quantile(&text, name, 0.5).unwrap();
    let (p99, _) = histogram_quantile(&text, name, 0.99).unwrap();
    println!(
        "event -> rule live over {UPDATES} EndpointSlice updates (--min-sync-period 0s): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; weir's {name} ({n} observations): \
         p50 <= {p50} s, p99 <= {p99} s (bucket upper bounds)",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
    );
    assert_eq!(latencies.len(), usize::from(UPDATES));
    assert!(
        n >= f64::from(UPDATES),
        "weir observed {n} programming latencies"
    );
}
