//! Packet-tracer tests of Service semantics: YAML -> compute -> render -> plan, applied to
//! the fake nftables (which validates it like the kernel), then first packets traced through
//! what the fake holds. One test per rule path of the features kube-proxy operators expect.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use weir_proxy::dataplane::nft::tracer::{
    apply_updates, trace, Host, Origin, Outcome, Packet, Verdict,
};
use weir_proxy::dataplane::nft::{Family, Table};
use weir_proxy::model::Protocol;
use weir_proxy::testing;

const NODE_IP: &str = "192.168.77.10";
const POD: &str = "10.244.1.99";
const OUTSIDE: &str = "198.51.100.7";

fn programmed(yaml: &str) -> Table {
    testing::programmed(
        yaml,
        &testing::model_config(),
        &testing::render_config(),
        Family::Ip,
    )
}

fn fixture() -> Table {
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/basic.yaml"),
    )
    .unwrap();
    programmed(&yaml)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn host() -> Host {
    Host {
        local_addrs: vec![ip(NODE_IP), ip("127.0.0.1")],
    }
}

fn send(t: &Table, src: &str, dst: &str, dport: u16, origin: Origin) -> BTreeSet<Outcome> {
    trace(
        t,
        &host(),
        &Packet {
            src: ip(src),
            dst: ip(dst),
            protocol: Protocol::Tcp,
            dport,
            origin,
        },
    )
    .unwrap()
}

/// `"Accept 10.244.1.40:8443 masq=false"` per outcome.
fn ends(out: &BTreeSet<Outcome>) -> Vec<String> {
    out.iter()
        .map(|o| {
            format!(
                "{:?} {} masq={}",
                o.verdict,
                o.dnat.map(|(i, p)| format!("{i}:{p}")).unwrap_or_default(),
                o.masquerade
            )
        })
        .collect()
}

#[test]
fn external_ip_from_outside_reaches_endpoints_masqueraded() {
    let t = fixture();
    let out = send(&t, OUTSIDE, "192.0.2.90", 80, Origin::Forwarded);
    // extip has one serving+terminating endpoint and one non-serving one.
    assert_eq!(ends(&out), ["Accept 10.244.2.50:80 masq=true"]);
    // From the node itself too.
    let out = send(&t, NODE_IP, "192.0.2.90", 80, Origin::Local);
    assert_eq!(ends(&out), ["Accept 10.244.2.50:80 masq=true"]);
    // Another port on the external IP is left alone.
    assert_eq!(
        ends(&send(&t, OUTSIDE, "192.0.2.90", 81, Origin::Forwarded)),
        ["Accept  masq=false"]
    );
}

#[test]
fn terminating_endpoint_serves_when_none_is_ready_and_non_serving_never() {
    let t = fixture();
    let out = send(&t, POD, "10.96.0.90", 80, Origin::Forwarded);
    assert_eq!(ends(&out), ["Accept 10.244.2.50:80 masq=false"]);
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let t = fixture();
    // 198.51.100.0/24 is allowed: ETP Local, so only the local endpoint, source kept.
    assert_eq!(
        ends(&send(&t, OUTSIDE, "192.0.2.80", 443, Origin::Forwarded)),
        ["Accept 10.244.1.40:8443 masq=false"]
    );
    // 203.0.113.7/32 is allowed, its neighbour is not.
    assert_eq!(
        send(&t, "203.0.113.7", "192.0.2.80", 443, Origin::Forwarded).len(),
        1
    );
    assert_eq!(
        ends(&send(
            &t,
            "203.0.113.8",
            "192.0.2.80",
            443,
            Origin::Forwarded
        )),
        ["Drop  masq=false"]
    );
    // Source ranges apply to the load-balancer IP only, not to the NodePort.
    assert_eq!(
        ends(&send(&t, "203.0.113.8", NODE_IP, 30443, Origin::Forwarded)),
        ["Accept 10.244.1.40:8443 masq=false"]
    );
}

#[test]
fn ip_mode_proxy_ingress_ip_is_not_programmed() {
    let t = fixture();
    assert_eq!(
        ends(&send(&t, OUTSIDE, "192.0.2.81", 443, Origin::Forwarded)),
        ["Accept  masq=false"]
    );
}

#[test]
fn etp_local_external_traffic_reaches_only_local_endpoints_with_source_kept() {
    let t = fixture();
    let out = send(&t, OUTSIDE, NODE_IP, 30443, Origin::Forwarded);
    assert_eq!(ends(&out), ["Accept 10.244.1.40:8443 masq=false"]);
}

#[test]
fn etp_local_pods_and_the_node_reach_every_endpoint() {
    let t = fixture();
    let all = ["10.244.1.40:8443", "10.244.2.40:8443", "10.244.2.41:8443"];
    let from_pod = send(&t, POD, NODE_IP, 30443, Origin::Forwarded);
    assert_eq!(
        ends(&from_pod),
        all.map(|e| format!("Accept {e} masq=false"))
    );
    let from_node = send(&t, NODE_IP, "192.0.2.80", 443, Origin::Local);
    assert_eq!(
        ends(&from_node),
        all.map(|e| format!("Accept {e} masq=true"))
    );
    // The ClusterIP is not affected by the external policy.
    assert_eq!(send(&t, POD, "10.96.0.80", 443, Origin::Forwarded).len(), 3);
}

const ETP_LOCAL_REMOTE_ONLY: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1}
status: {addresses: [{type: InternalIP, address: 192.168.77.10}]}
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.81
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: far-a, namespace: demo, labels: {kubernetes.io/service-name: far}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- {addresses: [10.244.2.60], nodeName: node2}
"#;

#[test]
fn etp_local_without_local_endpoints_drops_external_traffic_but_not_pods() {
    let t = programmed(ETP_LOCAL_REMOTE_ONLY);
    assert_eq!(
        ends(&send(&t, OUTSIDE, NODE_IP, 30081, Origin::Forwarded)),
        ["Drop  masq=false"]
    );
    assert_eq!(
        ends(&send(&t, POD, NODE_IP, 30081, Origin::Forwarded)),
        ["Accept 10.244.2.60:80 masq=false"]
    );
}

#[test]
fn session_affinity_keeps_a_client_on_its_endpoint() {
    let mut t = fixture();
    let first = send(&t, POD, "10.96.0.80", 443, Origin::Forwarded);
    assert_eq!(first.len(), 3, "a new client may land on any endpoint");
    for o in &first {
        // Each path records the client in the affinity set of the slot it chose.
        assert_eq!(o.updates.len(), 1, "{o:?}");
        assert_eq!(o.updates[0].2, 600);
    }
    let chosen = first.iter().nth(1).unwrap().clone();
    apply_updates(&mut t, &chosen);
    let again = send(&t, POD, "10.96.0.80", 443, Origin::Forwarded);
    assert_eq!(
        again.iter().map(|o| o.dnat).collect::<Vec<_>>(),
        [chosen.dnat],
        "the same client keeps its endpoint"
    );
    // Another client is not affected.
    assert_eq!(
        send(&t, "10.244.1.98", "10.96.0.80", 443, Origin::Forwarded).len(),
        3
    );
    // Services without affinity record nothing.
    assert!(send(&t, POD, "10.96.0.10", 80, Origin::Forwarded)
        .iter()
        .all(|o| o.updates.is_empty()));
}

#[test]
fn affinity_through_the_local_path_keeps_external_clients_too() {
    let mut t = fixture();
    let first = send(&t, OUTSIDE, "192.0.2.80", 443, Origin::Forwarded);
    let o = first.iter().next().unwrap().clone();
    assert_eq!(o.updates.len(), 1);
    apply_updates(&mut t, &o);
    assert_eq!(
        ends(&send(&t, OUTSIDE, "192.0.2.80", 443, Origin::Forwarded)),
        ["Accept 10.244.1.40:8443 masq=false"]
    );
}

#[test]
fn service_without_endpoints_is_rejected_on_every_frontend() {
    let t = fixture();
    for (dst, port) in [("10.96.0.20", 80), (NODE_IP, 30081)] {
        let v: Vec<Verdict> = send(&t, OUTSIDE, dst, port, Origin::Forwarded)
            .iter()
            .map(|o| o.verdict)
            .collect();
        assert_eq!(v, [Verdict::Reject], "{dst}:{port}");
    }
}
