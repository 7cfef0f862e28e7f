//! weir-cni driven by a CNI runtime ([`weir_e2e::cnitool`]) in network namespaces. The
//! plugin runs inside a "node" namespace (`ip netns exec`), pods are fresh namespaces, an
//! external client sits behind the node. Nothing touches the real host network; every
//! namespace is removed by its guard, also on panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weir_e2e::cnitool::{Attachment, CniRunError, CniRuntime};
use weir_e2e::*;

const POD_CIDR_V4: &str = "10.244.1.0/24";
const POD_CIDR_V6: &str = "fd00:10:244:1::/64";
const MTU: u64 = 1450;

/// A node namespace (with a client behind it), pod namespaces and the plugin's state.
struct Env {
    pods: Vec<Netns>,
    client: Netns,
    node: Netns,
    state: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Env {
    fn new(pods: usize) -> Option<Env> {
        if !require_privileges() {
            return None;
        }
        let bin = workspace_bin("weir-cni");
        assert!(
            bin.exists(),
            "{} is missing: build it with cargo build -p weir-cni (cargo xtask test does)",
            bin.display()
        );
        let node = Netns::new("cninode").unwrap();
        let client = Netns::new("cniclient").unwrap();
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            node.sysctl(k, v).unwrap();
        }
        run(
            "ip",
            &[
                "link",
                "add",
                "weirtmp0",
                "netns",
                node.name(),
                "type",
                "veth",
                "peer",
                "name",
                "weirtmp1",
                "netns",
                client.name(),
            ],
        )
        .unwrap();
        node.exec(&["ip", "link", "set", "weirtmp0", "name", "eth0"])
            .unwrap();
        client
            .exec(&["ip", "link", "set", "weirtmp1", "name", "eth0"])
            .unwrap();
        for a in [&format!("{NODE_IP}/24"), "198.51.100.1/24"] {
            node.exec(&["ip", "addr", "add", a, "dev", "eth0"]).unwrap();
        }
        node.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
        client
            .exec(&[
                "ip",
                "addr",
                "add",
                &format!("{CLIENT_IP}/24"),
                "dev",
                "eth0",
            ])
            .unwrap();
        client.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
        client
            .exec(&[
                "ip",
                "route",
                "add",
                "192.168.77.0/24",
                "via",
                NODE_CLIENT_SIDE_IP,
            ])
            .unwrap();
        let pods = (0..pods)
            .map(|i| Netns::new(&format!("cnipod{i}")).unwrap())
            .collect();
        Some(Env {
            pods,
            client,
            node,
            state: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        })
    }

    fn weir_plugin(&self, cidrs: &[&str]) -> Value {
        json!({"type": "weir-cni", "podCIDRs": cidrs, "mtu": MTU, "stateDir": self.state.path()})
    }

    fn conflist(&self, version: &str, cidrs: &[&str]) -> Value {
        json!({"cniVersion": version, "name": "weir", "plugins": [self.weir_plugin(cidrs)]})
    }

    fn runtime(&self, conflist: Value) -> CniRuntime {
        CniRuntime::new(conflist, &cni_path(), self.cache.path())
            .unwrap()
            .in_netns(self.node.name())
    }

    fn dual_stack(&self) -> CniRuntime {
        self.runtime(self.conflist("1.1.0", &[POD_CIDR_V4, POD_CIDR_V6]))
    }

    fn netns_path(&self, i: usize) -> String {
        format!("/run/netns/{}", self.pods[i].name())
    }

    fn attachment(&self, i: usize) -> Attachment {
        Attachment::new(&format!("ctr{i}"), &self.netns_path(i), "eth0")
    }

    fn network_dir(&self) -> PathBuf {
        self.state.path().join("weir")
    }

    /// `(ip, container id, ifname)` of every allocation in the IPAM database.
    fn allocations(&self) -> Vec<(String, String, String)> {
        let Ok(text) = std::fs::read_to_string(self.network_dir().join("ipam.json")) else {
            return Vec::new();
        };
        let db: Value = serde_json::from_str(&text).unwrap();
        db["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["ip"].as_str().unwrap().to_owned(),
                    a["containerID"].as_str().unwrap().to_owned(),
                    a["ifname"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The attachment record files.
    fn records(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.network_dir().join("attachments"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn record(&self, id: &str) -> Value {
        let p = self
            .network_dir()
            .join(format!("attachments/{id}@eth0.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// Names of the node's `weir*` veths.
    fn host_veths(&self) -> BTreeSet<String> {
        let out = self
            .node
            .exec(&["ip", "-j", "link", "show", "type", "veth"])
            .unwrap();
        let links: Value = serde_json::from_slice(&out.stdout).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("weir"))
            .map(str::to_owned)
            .collect()
    }

    /// The node's routes into the pod CIDRs (`dst dev`).
    fn pod_routes(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for fam in ["-4", "-6"] {
            let o = self.node.exec(&["ip", "-j", fam, "route", "show"]).unwrap();
            let routes: Value = serde_json::from_slice(&o.stdout).unwrap();
            for r in routes.as_array().unwrap() {
                let dst = r["dst"].as_str().unwrap_or_default();
                if dst.starts_with("10.244.") || dst.starts_with("fd00:10:244:") {
                    out.insert(format!("{dst} {}", r["dev"].as_str().unwrap_or_default()));
                }
            }
        }
        out
    }

    /// Everything weir-cni may leave behind, to compare before and after a failure.
    fn footprint(&self) -> Footprint {
        Footprint {
            veths: self.host_veths(),
            routes: self.pod_routes(),
            allocations: self.allocations(),
            records: self.records(),
        }
    }

    fn pod_has(&self, i: usize, ifname: &str) -> bool {
        self.pods[i].exec(&["ip", "link", "show", ifname]).is_ok()
    }

    fn ping(&self, from: &Netns, ip: &str) -> bool {
        from.exec(&["ping", "-c", "1", "-W", "2", ip]).is_ok()
    }
}

/// What weir-cni leaves on a node: host veths, routes into the pod CIDRs, IPAM
/// allocations, attachment records.
#[derive(Debug, Default, PartialEq, Eq)]
struct Footprint {
    veths: BTreeSet<String>,
    routes: BTreeSet<String>,
    allocations: Vec<(String, String, String)>,
    records: BTreeSet<String>,
}

/// The address (without prefix) of the `n`th entry of a result's `ips`.
fn result_ip(result: &Value, n: usize) -> String {
    let a = result["ips"][n]["address"].as_str().unwrap();
    a.split('/').next().unwrap().to_owned()
}

/// Starts weir-echo in `ns` answering `name` on TCP `port`, waits until it listens.
fn start_echo(ns: &mut Netns, name: &str, port: u16) {
    let bin = env!("CARGO_BIN_EXE_weir-echo");
    let port = port.to_string();
    let child = ns.spawn(&[bin, name, &port], Stdio::piped()).unwrap();
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
}

/// How many of `count` TCP requests from `ns` to `addr` a backend named `name` answered.
fn tcp_answers(ns: &Netns, addr: &str, count: u32, name: &str) -> u64 {
    let report = probe(ns, &["tcp", addr, &count.to_string()]).unwrap();
    report["answers"][name].as_u64().unwrap_or(0)
}

#[test]
fn two_pods_reach_each_other_through_the_node_and_del_removes_everything() {
    let Some(mut env) = Env::new(2) else { return };
    let rt = env.dual_stack();
    let a0 = env
        .attachment(0)
        .arg("IgnoreUnknown", "1")
        .arg("K8S_POD_NAMESPACE", "demo")
        .arg("K8S_POD_NAME", "web-0");
    let a1 = env.attachment(1);
    let r0 = rt.add(&a0).unwrap();
    let r1 = rt.add(&a1).unwrap();
    let (p0v4, p0v6) = (result_ip(&r0, 0), result_ip(&r0, 1));
    let (p1v4, p1v6) = (result_ip(&r1, 0), result_ip(&r1, 1));
    assert!(
        p0v4.starts_with("10.244.1.") && p0v6.starts_with("fd00:10:244:1::"),
        "{r0}"
    );
    assert_ne!(p0v4, p1v4);

    // Pod to pod and node to pod, both families, through the node's routes.
    for (from, to) in [(0, &p1v4), (0, &p1v6), (1, &p0v4), (1, &p0v6)] {
        assert!(env.ping(&env.pods[from], to), "pod{from} -> {to}");
    }
    assert!(env.ping(&env.node, &p0v4));
    assert!(env.ping(&env.node, &p1v6));
    start_echo(&mut env.pods[1], "pod-1", 8080);
    assert_eq!(
        tcp_answers(&env.pods[0], &format!("{p1v4}:8080"), 5, "pod-1"),
        5
    );

    // What the pod sees: its /32 and /128, the MTU, the default routes via the
    // link-local gateway.
    let addr = env.pods[0]
        .exec(&["ip", "-j", "addr", "show", "eth0"])
        .unwrap();
    let addr: Value = serde_json::from_slice(&addr.stdout).unwrap();
    assert_eq!(addr[0]["mtu"], MTU);
    let local: BTreeSet<String> = addr[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(
        local,
        BTreeSet::from([format!("{p0v4}/32"), format!("{p0v6}/128")])
    );
    let routes = env.pods[0]
        .exec(&["ip", "route", "show", "default"])
        .unwrap();
    assert!(String::from_utf8_lossy(&routes.stdout).contains("default via 169.254.1.1 dev eth0"));
    let routes = env.pods[0]
        .exec(&["ip", "-6", "route", "show", "default"])
        .unwrap();
    assert!(String::from_utf8_lossy(&routes.stdout).contains("default via fe80::1 dev eth0"));

    rt.check(&a0).unwrap();
    rt.check(&a1).unwrap();
    // CHECK notices what is missing.
    env.pods[1]
        .exec(&["ip", "-6", "route", "del", "default"])
        .unwrap();
    let e = rt.check(&a1).unwrap_err();
    assert_eq!(e.code(), Some(102), "{e}");
    assert!(e.to_string().contains("::/0"), "{e}");

    // The record weir-proxy will read.
    let rec = env.record("ctr0");
    assert_eq!(rec["podNamespace"], "demo");
    assert_eq!(rec["podName"], "web-0");
    assert_eq!(rec["ips"], json!([p0v4, p0v6]));
    assert_eq!(rec["hostInterface"], r0["interfaces"][0]["name"]);
    assert_eq!(rec["netns"], env.netns_path(0));
    assert_eq!(env.record("ctr1")["podName"], Value::Null);
    let host0 = r0["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(env.pod_routes().contains(&format!("{p0v4} {host0}")));
    assert!(env.pod_routes().contains(&format!("{p0v6} {host0}")));

    rt.del(&a0).unwrap();
    rt.del(&a1).unwrap();
    assert_eq!(env.footprint(), Default::default());
    assert!(!env.pod_has(0, "eth0") && !env.pod_has(1, "eth0"));
    // DEL again, and DEL of a container never added, without a netns: still success.
    rt.del(&a0).unwrap();
    rt.del(&Attachment::new("never-added", "", "eth0")).unwrap();
    rt.del(&Attachment::new(
        "gone",
        "/run/netns/weir-no-such-netns",
        "eth0",
    ))
    .unwrap();
    assert_eq!(env.footprint(), Default::default());
}

#[test]
fn each_cni_version_gets_its_own_result_format() {
    let Some(env) = Env::new(1) else { return };
    let a = env.attachment(0);
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let rt = env.runtime(env.conflist(v, &[POD_CIDR_V4, POD_CIDR_V6]));
        let version = rt.plugin_version("weir-cni").unwrap();
        assert_eq!(version["cniVersion"], v);
        assert_eq!(
            version["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );

        let r = rt.add(&a).unwrap();
        assert_eq!(r["cniVersion"], v, "{r}");
        let ifs = r["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 2, "{r}");
        assert!(
            ifs[0]["name"].as_str().unwrap().starts_with("weir") && ifs[0].get("sandbox").is_none()
        );
        assert_eq!(ifs[1]["name"], "eth0");
        assert_eq!(ifs[1]["sandbox"], env.netns_path(0));
        for i in ifs {
            assert!(i["mac"].as_str().unwrap().len() == 17, "{r}");
            assert_eq!(i.get("mtu").is_some(), v == "1.1.0", "{v}: {r}");
        }
        let ips = r["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2);
        for (ip, fam, gw) in [(&ips[0], "4", "169.254.1.1"), (&ips[1], "6", "fe80::1")] {
            assert_eq!(ip["interface"], 1);
            assert_eq!(ip["gateway"], gw);
            match v {
                "0.3.0" | "0.3.1" | "0.4.0" => assert_eq!(ip["version"], fam, "{v}: {r}"),
                _ => assert!(ip.get("version").is_none(), "{v}: {r}"),
            }
        }
        assert!(ips[0]["address"].as_str().unwrap().ends_with("/32"));
        assert!(ips[1]["address"].as_str().unwrap().ends_with("/128"));
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}])
        );
        match v {
            "0.3.0" | "0.3.1" => assert_eq!(rt.check(&a).unwrap_err().code(), Some(1), "{v}"),
            _ => rt.check(&a).unwrap(),
        }
        let status = rt.status();
        match v {
            "1.1.0" => status.unwrap(),
            _ => assert_eq!(status.unwrap_err().code(), Some(1), "{v}"),
        }
        rt.del(&a).unwrap();
        assert_eq!(env.footprint(), Default::default(), "{v}");
    }
}

#[test]
fn a_previous_plugins_result_is_kept_and_extended() {
    let Some(env) = Env::new(1) else { return };
    let rt = env.dual_stack();
    let a = env.attachment(0);
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "lo", "sandbox": env.netns_path(0)}],
        "ips": [{"address": "127.0.0.1/8", "interface": 0}],
        "routes": [{"dst": "192.0.2.0/24"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    });
    let conf = rt.request_config(&rt.plugins()[0], Some(&a), Some(&prev));
    let r = rt
        .exec_plugin("weir-cni", "ADD", Some(&a), &conf)
        .unwrap()
        .unwrap();
    let names: Vec<&str> = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{r}");
    assert_eq!((names[0], names[2]), ("lo", "eth0"));
    assert_eq!(
        r["ips"][0],
        json!({"address": "127.0.0.1/8", "interface": 0})
    );
    assert_eq!(r["ips"][1]["interface"], 2);
    assert_eq!(r["ips"][2]["interface"], 2);
    assert_eq!(r["routes"][0], json!({"dst": "192.0.2.0/24"}));
    assert_eq!(r["routes"].as_array().unwrap().len(), 3);
    assert_eq!(r["dns"], json!({"nameservers": ["10.96.0.10"]}));

    let conf = rt.request_config(&rt.plugins()[0], Some(&a), Some(&r));
    rt.exec_plugin("weir-cni", "CHECK", Some(&a), &conf)
        .unwrap();
    rt.exec_plugin("weir-cni", "DEL", Some(&a), &conf).unwrap();
    assert_eq!(env.footprint(), Footprint::default());
}

#[test]
fn a_second_network_on_the_same_pod_keeps_the_first_ones_default_routes() {
    let Some(env) = Env::new(1) else { return };
    let rt = env.dual_stack();
    let second = env.runtime(json!({"cniVersion": "1.1.0", "name": "weir2", "plugins": [
        {"type": "weir-cni", "podCIDRs": ["10.244.2.0/24"], "mtu": MTU, "stateDir": env.state.path()}
    ]}));
    let a = env.attachment(0);
    let a2 = Attachment::new("ctr0", &env.netns_path(0), "net1");
    rt.add(&a).unwrap();
    let r2 = second.add(&a2).unwrap();
    assert_eq!(r2["interfaces"][1]["name"], "net1");
    assert!(result_ip(&r2, 0).starts_with("10.244.2."), "{r2}");
    assert_eq!(r2["routes"], json!([]), "the default route belongs to eth0");
    let routes = env.pods[0]
        .exec(&["ip", "route", "show", "default"])
        .unwrap();
    assert!(String::from_utf8_lossy(&routes.stdout).contains("dev eth0"));
    rt.check(&a).unwrap();
    second.check(&a2).unwrap();

    // GC of one network leaves the other network's attachment alone.
    rt.gc(&[]).unwrap();
    assert!(env.pod_has(0, "net1"));
    second.check(&a2).unwrap();
    second.del(&a2).unwrap();
    let db = std::fs::read_to_string(env.state.path().join("weir2/ipam.json")).unwrap();
    let db: Value = serde_json::from_str(&db).unwrap();
    assert_eq!(db["allocations"], json!([]));
    assert_eq!(env.footprint(), Footprint::default());
}

fn expect_code(r: Result<Option<Value>, CniRunError>, code: u64, needle: &str) -> Value {
    match r {
        Err(CniRunError::Plugin(f)) => {
            let raw = f.raw;
            assert_eq!(f.code, code, "{raw}");
            assert!(f.msg.contains(needle), "{needle:?} not in {raw}");
            assert!(raw["details"].is_string(), "{raw}");
            raw
        }
        other => panic!("expected error code {code}, got {other:?}"),
    }
}

#[test]
fn bad_input_gets_the_right_error_code_and_leaves_nothing_behind() {
    let Some(env) = Env::new(4) else { return };
    let rt = env.dual_stack();
    let weir = |v: Value| rt.request_config(&v, None, None);
    let good = weir(env.weir_plugin(&[POD_CIDR_V4, POD_CIDR_V6]));
    let a = env.attachment(0);
    let add = |conf: &Value, a: &Attachment| rt.exec_plugin("weir-cni", "ADD", Some(a), conf);
    let baseline = env.footprint();

    let e = expect_code(
        rt.exec_plugin_raw("weir-cni", "ADD", Some(&a), b"{\"cniVersion\": "),
        6,
        "decoding",
    );
    assert_eq!(e["cniVersion"], "1.1.0");
    for v in ["0.2.0", "2.0.0", "1.1"] {
        let mut c = good.clone();
        c["cniVersion"] = json!(v);
        expect_code(add(&c, &a), 1, v);
    }
    for key in ["name", "cniVersion"] {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(key);
        expect_code(add(&c, &a), 7, key);
    }
    // Without podCIDRs the node's come from weir-proxy's file in the state directory; not
    // written yet: try again later (11).
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("podCIDRs");
    expect_code(add(&c, &a), 11, "podCIDRs");
    let mut c = good.clone();
    c["podCIDRs"] = json!(["10.244.1.0/24", "10.244.2.0/24"]);
    expect_code(add(&c, &a), 7, "podCIDRs[1]");
    let mut c = good.clone();
    c["mtu"] = json!("jumbo");
    expect_code(add(&c, &a), 6, "mtu");
    let mut c = good.clone();
    c["ipam"] = json!({"type": "host-local", "subnet": "10.1.0.0/16"});
    expect_code(add(&c, &a), 2, "host-local");
    let mut c = good.clone();
    c["cniVersion"] = json!("1.0.0");
    let e = expect_code(
        add(&c, &Attachment::new("ctr0", "", "eth0")),
        4,
        "CNI_NETNS",
    );
    assert_eq!(e["cniVersion"], "1.0.0");
    expect_code(
        add(&good, &Attachment::new("-bad", &env.netns_path(0), "eth0")),
        4,
        "CNI_CONTAINERID",
    );
    expect_code(
        add(
            &good,
            &Attachment::new("ctr0", &env.netns_path(0), "bad/name"),
        ),
        4,
        "CNI_IFNAME",
    );
    expect_code(
        add(
            &good,
            &Attachment::new("ctr0", "/run/netns/weir-no-such-netns", "eth0"),
        ),
        3,
        "does not exist",
    );
    assert_eq!(env.footprint(), baseline);

    // CNI_IFNAME taken in the pod.
    env.pods[0]
        .exec(&["ip", "link", "add", "eth0", "type", "bridge"])
        .unwrap();
    expect_code(add(&good, &a), 101, "already exists");
    assert_eq!(env.footprint(), baseline);
    env.pods[0].exec(&["ip", "link", "del", "eth0"]).unwrap();

    // A failure after the veth exists (IPv6 disabled in the pod): rolled back completely.
    env.pods[1]
        .sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        .unwrap();
    env.pods[1]
        .sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        .unwrap();
    let e = expect_code(add(&good, &env.attachment(1)), 100, "kernel");
    assert!(
        e["details"].as_str().unwrap().contains("fd00:10:244:1::"),
        "{e}"
    );
    assert_eq!(env.footprint(), baseline);
    assert!(!env.pod_has(1, "eth0"));

    // The host end's name taken by another kind of link: it is left alone.
    let r = add(&good, &a).unwrap().unwrap();
    let host = r["interfaces"][0]["name"].as_str().unwrap().to_owned();
    rt.exec_plugin("weir-cni", "DEL", Some(&a), &good).unwrap();
    env.node
        .exec(&["ip", "link", "add", &host, "type", "bridge"])
        .unwrap();
    expect_code(add(&good, &a), 100, "kernel");
    assert_eq!(env.allocations(), baseline.allocations);
    assert!(env.node.exec(&["ip", "link", "show", &host]).is_ok());
    env.node.exec(&["ip", "link", "del", &host]).unwrap();
    assert_eq!(env.footprint(), baseline);

    // An exhausted pool (a /30 holds two pods).
    let small = weir(env.weir_plugin(&["10.244.9.0/30"]));
    add(&small, &env.attachment(2)).unwrap();
    add(&small, &env.attachment(3)).unwrap();
    let full = env.footprint();
    let e = expect_code(add(&small, &env.attachment(0)), 11, "exhausted");
    assert!(
        e["details"].as_str().unwrap().contains("10.244.9.0/30"),
        "{e}"
    );
    assert_eq!(env.footprint(), full);
    assert!(!env.pod_has(0, "eth0"));
    let status = rt.exec_plugin("weir-cni", "STATUS", None, &small);
    expect_code(status, 50, "exhausted");
    rt.exec_plugin("weir-cni", "DEL", Some(&env.attachment(3)), &small)
        .unwrap();
    rt.exec_plugin("weir-cni", "STATUS", None, &small).unwrap();
    add(&small, &env.attachment(0)).unwrap();
    for i in [0, 2] {
        rt.exec_plugin("weir-cni", "DEL", Some(&env.attachment(i)), &small)
            .unwrap();
    }
    assert_eq!(env.footprint(), baseline);
}

#[test]
fn gc_removes_what_is_not_in_valid_attachments() {
    let Some(env) = Env::new(3) else { return };
    let rt = env.dual_stack();
    let (a0, a1, a2) = (env.attachment(0), env.attachment(1), env.attachment(2));
    let r0 = rt.add(&a0).unwrap();
    rt.add(&a1).unwrap();
    // ctr2 is attached behind the runtime's back (as if it crashed before caching the
    // result): only the plugin's GC can find it.
    let conf = rt.request_config(&rt.plugins()[0], Some(&a2), None);
    rt.exec_plugin("weir-cni", "ADD", Some(&a2), &conf).unwrap();
    // And a temporary file of a record writer that was killed.
    std::fs::write(
        env.network_dir()
            .join("attachments/.ctr9@eth0.json.4242.tmp"),
        b"{",
    )
    .unwrap();
    std::fs::write(env.network_dir().join(".ipam.json.4243.tmp"), b"{").unwrap();
    assert_eq!(env.allocations().len(), 6);

    let valid = vec![
        ("ctr0".to_owned(), "eth0".to_owned()),
        ("ctr1".to_owned(), "eth0".to_owned()),
    ];
    rt.gc(&valid).unwrap();
    assert!(!env.network_dir().join(".ipam.json.4243.tmp").exists());
    assert_eq!(env.allocations().len(), 4);
    assert!(env.allocations().iter().all(|(_, id, _)| id != "ctr2"));
    assert_eq!(
        env.records(),
        BTreeSet::from(["ctr0@eth0.json".to_owned(), "ctr1@eth0.json".to_owned()])
    );
    assert_eq!(env.host_veths().len(), 2);
    assert!(!env.pod_has(2, "eth0"));
    rt.check(&a0).unwrap();
    rt.check(&a1).unwrap();
    assert!(env.ping(&env.pods[1], &result_ip(&r0, 0)));

    // No valid attachments left: the runtime DELs its cached ones, the plugin GCs the rest.
    rt.gc(&[]).unwrap();
    assert_eq!(env.footprint(), Default::default());
}

#[test]
fn a_vanished_netns_does_not_block_del() {
    let Some(mut env) = Env::new(1) else { return };
    let rt = env.dual_stack();
    let a = env.attachment(0);
    rt.add(&a).unwrap();
    // The container runtime removed the namespace first: the pod end dies with it and
    // takes the host end along; DEL still has the allocation and the record to release.
    let pod = env.pods.remove(0);
    drop(pod);
    wait_until(
        "the veth to go with the netns",
        Duration::from_secs(10),
        || env.host_veths().is_empty(),
    )
    .unwrap();
    assert_eq!(env.allocations().len(), 2);
    rt.del(&a).unwrap();
    assert_eq!(env.footprint(), Default::default());
}

#[test]
fn chained_with_portmap_and_tuning_from_containernetworking_plugins() {
    let Some(mut env) = Env::new(2) else { return };
    for p in ["portmap", "tuning", "loopback"] {
        assert!(
            Path::new("/usr/lib/cni").join(p).exists(),
            "/usr/lib/cni/{p} is missing: apt-get install containernetworking-plugins"
        );
    }
    // Debian's plugins (1.1.1) speak up to 1.0.0.
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "weir",
        "disableCheck": true,
        "plugins": [
            env.weir_plugin(&[POD_CIDR_V4, POD_CIDR_V6]),
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "tuning", "capabilities": {"mac": true},
             "sysctl": {"net.ipv4.conf.eth0.accept_redirects": "0"}},
        ],
    });
    let rt = env.runtime(conflist);
    let lo = env
        .runtime(json!({"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]}));
    let mac = "02:42:0a:f4:01:63";
    let a0 = env
        .attachment(0)
        .capability(
            "portMappings",
            json!([{"hostPort": 8080, "containerPort": 9090, "protocol": "tcp"}]),
        )
        .capability("mac", json!(mac));
    let a1 = env.attachment(1);
    env.pods[0]
        .exec(&["ip", "link", "set", "lo", "down"])
        .unwrap();
    lo.add(&Attachment::new("ctr0", &env.netns_path(0), "lo"))
        .unwrap();
    let r0 = rt.add(&a0).unwrap();
    let r1 = rt.add(&a1).unwrap();

    // weir's part passed through portmap and tuning; tuning recorded the new MAC.
    assert_eq!(r0["cniVersion"], "1.0.0");
    assert!(
        r0["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .starts_with("weir"),
        "{r0}"
    );
    assert_eq!(r0["interfaces"][1]["mac"], mac, "{r0}");
    let link = env.pods[0]
        .exec(&["ip", "-j", "link", "show", "eth0"])
        .unwrap();
    let link: Value = serde_json::from_slice(&link.stdout).unwrap();
    assert_eq!(link[0]["address"], mac);
    let sysctl = env.pods[0]
        .exec(&["sysctl", "-n", "net.ipv4.conf.eth0.accept_redirects"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "0");

    // The host port reaches the pod from outside the node, and pods still reach each other.
    start_echo(&mut env.pods[0], "pod-0", 9090);
    assert_eq!(
        tcp_answers(&env.client, &format!("{NODE_IP}:8080"), 3, "pod-0"),
        3
    );
    assert!(env.ping(&env.pods[1], &result_ip(&r0, 0)));
    assert!(env.ping(&env.pods[0], &result_ip(&r1, 1)));

    // Debian's portmap 1.1.1 fails every CHECK where ip6tables works (it looks for its
    // IPv4 rules with ip6tables too), so the list sets disableCheck and the runtime skips
    // CHECK; weir-cni and tuning are checked as the runtime would, with the cached result.
    rt.check(&a0).unwrap();
    for a in [&a0, &a1] {
        let prev = rt.cached_result(a).unwrap();
        for (i, t) in [(0, "weir-cni"), (2, "tuning")] {
            let conf = rt.request_config(&rt.plugins()[i], Some(a), Some(&prev));
            rt.exec_plugin(t, "CHECK", Some(a), &conf).unwrap();
        }
    }

    rt.del(&a0).unwrap();
    rt.del(&a1).unwrap();
    lo.del(&Attachment::new("ctr0", &env.netns_path(0), "lo"))
        .unwrap();
    assert_eq!(env.footprint(), Default::default());
    let nat = env.node.exec(&["iptables", "-t", "nat", "-S"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&nat.stdout).contains("CNI-DN-"),
        "portmap left rules"
    );
    assert_eq!(
        tcp_answers(&env.client, &format!("{NODE_IP}:8080"), 1, "pod-0"),
        0
    );
}

/// A small deterministic generator (xorshift64*), seeded from `WEIR_TEST_SEED` or the clock.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Default)]
struct Ledger {
    /// Attachments whose ADD succeeded and that no DEL was started for: container → IPs.
    live: BTreeMap<usize, Vec<String>>,
    /// Their ADD results (for CHECK).
    results: BTreeMap<usize, Value>,
    kills: usize,
    runs: usize,
}

/// Runs one plugin, SIGKILLing it after a random delay now and then; `None` when killed.
fn invoke(
    rt: &CniRuntime,
    plugin: &Value,
    ledger: &Mutex<Ledger>,
    rng: &mut Rng,
    verb: &str,
    a: &Attachment,
    prev: Option<&Value>,
) -> Option<Result<Option<Value>, CniRunError>> {
    let conf = rt.request_config(plugin, Some(a), prev);
    let mut child = rt.spawn_plugin("weir-cni", verb, Some(a), &conf).unwrap();
    ledger.lock().unwrap().runs += 1;
    if rng.chance(35) {
        std::thread::sleep(Duration::from_millis(rng.below(45)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            ledger.lock().unwrap().kills += 1;
            return None;
        }
    }
    Some(rt.finish("weir-cni", verb, child))
}

#[test]
fn parallel_add_del_with_kill_9_then_gc_leaves_no_leaks_or_duplicates() {
    const CONTAINERS: usize = 150;
    const RUNS: usize = 200;
    const WORKERS: usize = 8;
    let Some(env) = Env::new(CONTAINERS) else {
        return;
    };
    let rt = env.dual_stack();
    let plugin = rt.plugins()[0].clone();
    let seed = std::env::var("WEIR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("seed {seed} (WEIR_TEST_SEED to repeat)");
    let next = AtomicUsize::new(0);
    let ledger = Mutex::new(Ledger::default());
    let started = Instant::now();

    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (env, rt, plugin, next, ledger) = (&env, &rt, &plugin, &next, &ledger);
            s.spawn(move || {
                let mut rng =
                    Rng(seed.wrapping_add((w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
                loop {
                    if ledger.lock().unwrap().runs >= RUNS {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= CONTAINERS {
                        break;
                    }
                    let a = env.attachment(i);
                    let added = match invoke(rt, plugin, ledger, &mut rng, "ADD", &a, None) {
                        Some(Ok(Some(r))) => Some(r),
                        Some(other) => panic!("ADD ctr{i}: {other:?}"),
                        None => None,
                    };
                    if let Some(r) = &added {
                        let ips = vec![result_ip(r, 0), result_ip(r, 1)];
                        let mut l = ledger.lock().unwrap();
                        for (other, theirs) in &l.live {
                            for ip in &ips {
                                assert!(
                                    !theirs.contains(ip),
                                    "{ip} given to ctr{i} while ctr{other} holds it"
                                );
                            }
                        }
                        l.live.insert(i, ips);
                        l.results.insert(i, r.clone());
                    }
                    // A failed (killed) ADD is usually followed by DEL, as the spec asks of
                    // runtimes; sometimes the runtime "crashes" and only GC is left.
                    let del = match &added {
                        Some(_) => rng.chance(70),
                        None => rng.chance(50),
                    };
                    if !del {
                        continue;
                    }
                    ledger.lock().unwrap().live.remove(&i);
                    let prev = added.as_ref();
                    match invoke(rt, plugin, ledger, &mut rng, "DEL", &a, prev) {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => panic!("DEL ctr{i}: {e}"),
                        None if rng.chance(50) => {
                            if let Some(Err(e)) =
                                invoke(rt, plugin, ledger, &mut rng, "DEL", &a, prev)
                            {
                                panic!("DEL again ctr{i}: {e}");
                            }
                        }
                        None => {}
                    }
                }
            });
        }
    });
    let ledger = ledger.into_inner().unwrap();
    eprintln!(
        "{} plugin runs, {} killed, {} attachments left valid, {:?}",
        ledger.runs,
        ledger.kills,
        ledger.live.len(),
        started.elapsed()
    );
    assert!(ledger.runs >= RUNS, "only {} runs", ledger.runs);
    let valid: Vec<(String, String)> = ledger
        .live
        .keys()
        .map(|i| (format!("ctr{i}"), "eth0".to_owned()))
        .collect();
    eprintln!(
        "before GC: {} allocations, {} veths, {} routes, {} records for {} valid attachments",
        env.allocations().len(),
        env.host_veths().len(),
        env.pod_routes().len(),
        env.records().len(),
        valid.len()
    );
    rt.gc(&valid).unwrap();

    // Exactly the valid attachments remain, each with its own two addresses.
    let allocs = env.allocations();
    let ips: BTreeSet<&String> = allocs.iter().map(|(ip, _, _)| ip).collect();
    assert_eq!(
        ips.len(),
        allocs.len(),
        "an address is allocated twice: {allocs:?}"
    );
    let mut want_ips = BTreeSet::new();
    let mut want_veths = BTreeSet::new();
    let mut want_routes = BTreeSet::new();
    let mut want_records = BTreeSet::new();
    for (i, ips) in &ledger.live {
        let host = ledger.results[i]["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        for ip in ips {
            want_ips.insert((ip.clone(), format!("ctr{i}"), "eth0".to_owned()));
            want_routes.insert(format!("{ip} {host}"));
        }
        want_veths.insert(host);
        want_records.insert(format!("ctr{i}@eth0.json"));
    }
    assert_eq!(
        allocs.into_iter().collect::<BTreeSet<_>>(),
        want_ips,
        "leaked or lost allocations"
    );
    assert_eq!(env.host_veths(), want_veths, "stray or missing veths");
    assert_eq!(env.pod_routes(), want_routes, "stray or missing routes");
    assert_eq!(env.records(), want_records, "stray or missing records");
    for dir in [env.network_dir(), env.network_dir().join("attachments")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "{name} left in {}", dir.display());
        }
    }
    for i in 0..CONTAINERS {
        assert_eq!(
            env.pod_has(i, "eth0"),
            ledger.live.contains_key(&i),
            "ctr{i}"
        );
    }
    for (i, r) in &ledger.results {
        if ledger.live.contains_key(i) {
            let a = env.attachment(*i);
            let conf = rt.request_config(&plugin, Some(&a), Some(r));
            rt.exec_plugin("weir-cni", "CHECK", Some(&a), &conf)
                .unwrap();
        }
    }
    let live: Vec<&usize> = ledger.live.keys().collect();
    if live.len() >= 2 {
        let (x, y) = (*live[0], *live[live.len() - 1]);
        assert!(env.ping(&env.pods[x], &ledger.live[&y][0]));
        assert!(env.ping(&env.pods[y], &ledger.live[&x][1]));
    }

    // DEL the rest, GC with nothing valid: nothing at all is left.
    for (i, r) in &ledger.results {
        if ledger.live.contains_key(i) {
            let a = env.attachment(*i);
            let conf = rt.request_config(&plugin, Some(&a), Some(r));
            rt.exec_plugin("weir-cni", "DEL", Some(&a), &conf).unwrap();
        }
    }
    rt.gc(&[]).unwrap();
    assert_eq!(env.footprint(), Default::default());
}
