//! Several Kubernetes nodes on one machine, each a network namespace: a "fabric" namespace
//! holds a bridge that connects every node's `eth0` (node N is 192.168.77.N/24) and an
//! external client (192.168.77.100). Node N owns the pod CIDR 10.244.N.0/24; its pods are
//! fresh namespaces attached by weir-cni, which the CNI runtime ([`crate::cnitool`]) runs
//! inside the node's namespace. Each node runs its own weir-proxy (`--source dir:` with
//! its own manifest directory, `--hostname-override nodeN`, `--route-pod-cidrs`), which
//! installs host-gw routes to the other nodes' pod CIDRs. Nothing is created in the host's
//! root namespace; every namespace (and the processes in it) goes when the [`Cluster`] is
//! dropped, also on panic.

use crate::cnitool::{Attachment, CniRuntime};
use crate::{
    cni_path, probe, run, start_echo_in, start_proxy_as, wait_until, workspace_bin,
    write_file_atomically, HarnessError, Netns,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

type Result<T> = std::result::Result<T, HarnessError>;

/// The external client's address on the fabric.
pub const EXTERNAL_CLIENT_IP: &str = "192.168.77.100";
/// The pod network of the whole cluster (`--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The TCP port every pod's weir-echo listens on (UDP: [`ECHO_UDP_PORT`]).
pub const ECHO_PORT: u16 = 8080;
/// The UDP port of every pod's weir-echo.
pub const ECHO_UDP_PORT: u16 = 5353;

/// Node `n`'s name (`n` counts from 1).
pub fn node_name(n: usize) -> String {
    format!("node{n}")
}

/// Node `n`'s address on the fabric (its InternalIP).
pub fn node_ip(n: usize) -> String {
    format!("192.168.77.{n}")
}

/// Node `n`'s pod CIDR (`spec.podCIDRs`).
pub fn pod_cidr(n: usize) -> String {
    format!("10.244.{n}.0/24")
}

fn cmd_err(cmd: &str, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Command {
        cmd: cmd.to_owned(),
        msg: e.to_string(),
    }
}

/// A pod: a namespace attached to its node by weir-cni.
pub struct Pod {
    /// `pod-<node><letter>`, also the name its weir-echo answers with.
    pub name: String,
    /// The address weir-cni gave it.
    pub ip: String,
    /// The node it runs on (from 1).
    pub node: usize,
    /// Its network namespace.
    pub ns: Netns,
    attachment: Attachment,
}

/// A node namespace with its pods, CNI state, manifests and weir-proxy.
pub struct Node {
    /// Its pods (dropped before the node).
    pub pods: Vec<Pod>,
    /// The node's namespace (its weir-proxy is killed when it goes).
    pub ns: Netns,
    /// 1, 2, 3, ...
    pub index: usize,
    /// weir-proxy's PID once started.
    pub proxy_pid: Option<u32>,
    cni: CniRuntime,
    manifests: tempfile::TempDir,
    _cni_state: tempfile::TempDir,
    _cni_cache: tempfile::TempDir,
    /// The mode's state (eBPF: the node's cgroup and pins), dropped after the processes.
    dp: Option<crate::mode::Dataplane>,
}

impl Node {
    /// `nodeN`.
    pub fn name(&self) -> String {
        node_name(self.index)
    }

    /// 192.168.77.N.
    pub fn ip(&self) -> String {
        node_ip(self.index)
    }

    /// weir-proxy's manifest directory for this node.
    pub fn manifest_dir(&self) -> &Path {
        self.manifests.path()
    }

    /// The CNI runtime that attaches this node's pods (weir-cni run in the node).
    pub fn cni(&self) -> &CniRuntime {
        &self.cni
    }

    /// Runs weir-probe in `ns` (this node, or one of its pods) the way the node's mode
    /// needs: in eBPF mode inside the node's cgroup, which the node's socket hooks watch.
    pub fn probe(&self, ns: &Netns, args: &[&str]) -> Result<Value> {
        match &self.dp {
            Some(dp) => dp.probe(ns, args),
            None => probe(ns, args),
        }
    }

    /// [`requests`] from `ns` (this node or one of its pods), in the node's mode.
    pub fn requests(
        &self,
        ns: &Netns,
        addr: &str,
        count: u32,
    ) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
        let report = self.probe(ns, &["tcp", addr, &count.to_string()])?;
        Ok(tally(&report))
    }

    /// [`peer`] from `ns` (this node or one of its pods), in the node's mode.
    pub fn peer(&self, ns: &Netns, addr: &str) -> Result<String> {
        let report = self.probe(ns, &["peer", addr])?;
        report["peer"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| cmd_err(&format!("weir-probe peer {addr}"), report))
    }

    /// The node's host-gw routes (`ip route show proto 77`) as sorted `DST via GW` lines.
    pub fn pod_routes(&self) -> Vec<String> {
        let Ok(out) = self.ns.exec(&["ip", "route", "show", "proto", "77"]) else {
            return Vec::new();
        };
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect();
        lines.sort();
        lines
    }
}

/// The namespaces of a cluster of nodes on one fabric.
pub struct Cluster {
    /// The nodes, node1 first (dropped first, with their pods).
    pub nodes: Vec<Node>,
    /// The external client on the fabric ([`EXTERNAL_CLIENT_IP`]).
    pub client: Netns,
    /// The namespace holding the bridge `br0`.
    pub fabric: Netns,
}

/// Connects `a`'s new interface `a_if` to `b`'s new interface `b_if` with a veth pair
/// created directly inside the two namespaces (never in the host's).
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            "weirtmp0",
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            "weirtmp1",
            "netns",
            b.name(),
        ],
    )?;
    a.exec(&["ip", "link", "set", "weirtmp0", "name", a_if])?;
    b.exec(&["ip", "link", "set", "weirtmp1", "name", b_if])?;
    Ok(())
}

impl Cluster {
    /// Builds the fabric, the client, `nodes` nodes (1..=250) and `pods_per_node` pods on
    /// each (1..=26), attached with weir-cni (conflist name `weir`, the node's pod CIDR,
    /// a private state directory per node).
    pub fn new(nodes: usize, pods_per_node: usize) -> Result<Cluster> {
        if !(1..=250).contains(&nodes) || !(1..=26).contains(&pods_per_node) {
            return Err(cmd_err(
                "Cluster::new",
                "1 to 250 nodes, 1 to 26 pods per node",
            ));
        }
        let fabric = Netns::new("fabric")?;
        fabric.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        fabric.exec(&["ip", "link", "set", "br0", "up"])?;
        let client = Netns::new("client")?;
        veth(&fabric, "client", &client, "eth0")?;
        fabric.exec(&["ip", "link", "set", "client", "master", "br0", "up"])?;
        client.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{EXTERNAL_CLIENT_IP}/24"),
            "dev",
            "eth0",
        ])?;
        client.exec(&["ip", "link", "set", "eth0", "up"])?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            client,
            fabric,
        };
        for n in 1..=nodes {
            let node = cluster.add_node(n)?;
            cluster.nodes.push(node);
        }
        for n in 1..=nodes {
            for i in 0..pods_per_node {
                cluster.attach_pod(n, i)?;
            }
        }
        Ok(cluster)
    }

    fn add_node(&self, n: usize) -> Result<Node> {
        let ns = Netns::new(&node_name(n))?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ns.sysctl(k, v)?;
        }
        let port = format!("node{n}");
        veth(&self.fabric, &port, &ns, "eth0")?;
        self.fabric
            .exec(&["ip", "link", "set", &port, "master", "br0", "up"])?;
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", node_ip(n)),
            "dev",
            "eth0",
        ])?;
        ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        let tmp = |what: &str| tempfile::tempdir().map_err(|e| cmd_err(what, e));
        let state = tmp("CNI state directory")?;
        let cache = tmp("CNI cache directory")?;
        let manifests = tmp("manifest directory")?;
        let conflist = json!({
            "cniVersion": "1.1.0",
            "name": "weir",
            "plugins": [{
                "type": "weir-cni",
                "podCIDRs": [pod_cidr(n)],
                "mtu": 1500,
                "stateDir": state.path(),
            }],
        });
        let cni = CniRuntime::new(conflist, &cni_path(), cache.path())
            .map_err(|e| cmd_err("CNI runtime", e))?
            .in_netns(ns.name());
        Ok(Node {
            pods: Vec::new(),
            ns,
            index: n,
            proxy_pid: None,
            cni,
            manifests,
            _cni_state: state,
            _cni_cache: cache,
            dp: None,
        })
    }

    /// Creates pod `i` of node `n` (from 1) and attaches it with CNI ADD.
    fn attach_pod(&mut self, n: usize, i: usize) -> Result<()> {
        let letter = char::from(b'a' + i as u8);
        let name = format!("pod-{n}{letter}");
        let ns = Netns::new(&name)?;
        let node = &mut self.nodes[n - 1];
        let attachment = Attachment::new(&name, &format!("/run/netns/{}", ns.name()), "eth0")
            .arg("K8S_POD_NAMESPACE", "demo")
            .arg("K8S_POD_NAME", &name);
        let result = node
            .cni
            .add(&attachment)
            .map_err(|e| cmd_err(&format!("CNI ADD {name}"), e))?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .ok_or_else(|| cmd_err(&format!("CNI ADD {name}"), format!("no IP in {result}")))?
            .to_owned();
        node.pods.push(Pod {
            name,
            ip,
            node: n,
            ns,
            attachment,
        });
        Ok(())
    }

    /// Every pod, node1's first.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods().find(|p| p.name == name)
    }

    /// Starts weir-echo in every pod, answering with the pod's name on [`ECHO_PORT`].
    pub fn start_echo(&mut self) -> Result<()> {
        let bin = workspace_bin("weir-echo");
        for node in &mut self.nodes {
            for pod in &mut node.pods {
                start_echo_in(&mut pod.ns, &bin, &pod.name, ECHO_PORT, ECHO_UDP_PORT)?;
            }
        }
        Ok(())
    }

    /// The Node objects of every node: name, `spec.podCIDRs`, InternalIP.
    pub fn nodes_yaml(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDR: {cidr}, podCIDRs: [{cidr}]}}\nstatus: {{addresses: [{{type: InternalIP, address: \"{}\"}}]}}\n",
                    n.name(),
                    n.ip(),
                    cidr = pod_cidr(n.index)
                )
            })
            .collect()
    }

    /// Writes every node's manifest directory: `nodes.yaml` ([`Cluster::nodes_yaml`]) and
    /// `services.yaml` (Services and EndpointSlices).
    pub fn write_manifests(&self, services: &str) -> Result<()> {
        let nodes = self.nodes_yaml();
        for node in &self.nodes {
            let dir = node.manifest_dir();
            write_file_atomically(dir, "nodes.yaml", &nodes)
                .and_then(|()| write_file_atomically(dir, "services.yaml", services))
                .map_err(|e| cmd_err(&format!("writing {}", dir.display()), e))?;
        }
        Ok(())
    }

    /// Starts weir-proxy in every node in `mode` (`--hostname-override nodeN
    /// --route-pod-cidrs`, metrics on 127.0.0.1:`metrics_port` of the node's namespace;
    /// eBPF mode: a cgroup and pin directory per node), waits for each one's first sync,
    /// then until every node has routes to every other node's pod CIDR.
    pub fn start_proxies(&mut self, metrics_port: u16, mode: crate::mode::Mode) -> Result<()> {
        for node in &mut self.nodes {
            let name = node_name(node.index);
            let dp = crate::mode::Dataplane::new(mode)
                .map_err(|e| cmd_err("creating the node's cgroup", e))?;
            let mut flags = dp.flags();
            flags.push("--route-pod-cidrs".into());
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let pid = start_proxy_as(
                &mut node.ns,
                node.manifests.path(),
                metrics_port,
                &name,
                &flags,
            )?;
            node.proxy_pid = Some(pid);
            node.dp = Some(dp);
        }
        for node in &self.nodes {
            let want = self.expected_routes(node.index);
            wait_until(
                &format!("{}'s routes to the other nodes' pod CIDRs", node.name()),
                Duration::from_secs(15),
                || node.pod_routes() == want,
            )?;
        }
        Ok(())
    }

    /// The host-gw routes node `n` should have: every other node's pod CIDR via its
    /// address, sorted like [`Node::pod_routes`].
    pub fn expected_routes(&self, n: usize) -> Vec<String> {
        let mut want: Vec<String> = self
            .nodes
            .iter()
            .filter(|o| o.index != n)
            .map(|o| format!("{} via {}", pod_cidr(o.index), o.ip()))
            .collect();
        want.sort();
        want
    }

    /// Stops every weir-proxy, lets each remove what it programmed (`weir-proxy
    /// --cleanup`), and detaches every pod with CNI DEL. Dropping the cluster removes
    /// everything anyway; this is the orderly way, as on a real node.
    pub fn teardown(&mut self) -> Result<()> {
        let bin = workspace_bin("weir-proxy");
        for node in &mut self.nodes {
            if let Some(pid) = node.proxy_pid.take() {
                node.ns.stop(pid);
                node.ns.exec(&[&bin.to_string_lossy(), "--cleanup"])?;
            }
            for pod in &node.pods {
                node.cni
                    .del(&pod.attachment)
                    .map_err(|e| cmd_err(&format!("CNI DEL {}", pod.name), e))?;
            }
        }
        Ok(())
    }
}

/// A Service `name` (namespace demo) with ClusterIP `cluster_ip`, port 80 → `ECHO_PORT`
/// over TCP, a NodePort when `node_port` is given (`externalTrafficPolicy: Local` when
/// `local`), and one EndpointSlice with `endpoints` (ready, each on its pod's node).
pub fn service_yaml(
    name: &str,
    cluster_ip: &str,
    node_port: Option<u16>,
    local: bool,
    endpoints: &[&Pod],
) -> String {
    let ty = if node_port.is_some() {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let etp = if local {
        "  externalTrafficPolicy: Local\n"
    } else {
        ""
    };
    let np = node_port
        .map(|p| format!(", nodePort: {p}"))
        .unwrap_or_default();
    let eps = crate::endpoints_yaml(endpoints.iter().map(|p| (&p.ip, node_name(p.node))));
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  type: {ty}\n  clusterIP: {cluster_ip}\n{etp}  ports: [{{name: p, protocol: TCP, port: 80, targetPort: {ECHO_PORT}{np}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, protocol: TCP, port: {ECHO_PORT}}}]\nendpoints:{eps}"
    )
}

/// `count` HTTP GETs (one connection each) from `ns` to `addr` through weir-probe: how
/// many each backend answered, and errors by kind.
pub fn requests(
    ns: &Netns,
    addr: &str,
    count: u32,
) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
    let report: Value = probe(ns, &["tcp", addr, &count.to_string()])?;
    Ok(tally(&report))
}

/// A weir-probe report's answers per backend and errors per kind.
fn tally(report: &Value) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    (
        crate::counts(&report["answers"]).into_iter().collect(),
        crate::counts(&report["errors"]).into_iter().collect(),
    )
}

/// The source address a backend behind `addr` sees for a connection from `ns`.
pub fn peer(ns: &Netns, addr: &str) -> Result<String> {
    let report = probe(ns, &["peer", addr])?;
    report["peer"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| cmd_err(&format!("weir-probe peer {addr}"), report))
}
