//! The cluster's network and placement: a bridge in a fabric namespace joins every node's `eth0`
//! (node N is 192.168.77.N/24), an external client (192.168.77.100) and the host, which
//! runs the control plane and reaches the bridge through one veth (192.168.77.254). No
//! namespace has a default route: nothing they send can leave the machine (nodes route
//! the Service CIDR on-link, so host-network clients can connect before the proxy's DNAT
//! picks an endpoint; an address no Service has is never answered). Every
//! name starts with [`NS_PREFIX`] (namespaces) or is [`HOST_LINK`] (the host's veth), so
//! `down` finds them all after a crash.

use super::process::run;
use crate::apiserver::SERVICE_CIDR;
use anyhow::Result;
use std::process::Command;

/// Every namespace of the cluster starts with this.
pub const NS_PREFIX: &str = "weir-cl-";
/// The fabric namespace holding the bridge.
pub const FABRIC_NS: &str = "weir-cl-fabric";
/// The external client's namespace.
pub const CLIENT_NS: &str = "weir-cl-client";
/// The external client's address.
pub const CLIENT_IP: &str = "192.168.77.100";
/// The host's veth to the fabric.
pub const HOST_LINK: &str = "weircl0";
/// The host's address on the fabric: the API server's.
pub const HOST_IP: &str = "192.168.77.254";
/// The route protocol number of the host's routes to the nodes' pod CIDRs (`ip route ...
/// proto 78`), so `down` removes exactly those.
pub const HOST_ROUTE_PROTO: &str = "78";

/// Node `n`'s name (from 1).
pub fn node_name(n: usize) -> String {
    format!("node{n}")
}

/// The zones nodes are spread over, in turn (node 1 in `zone-a`, node 4 in `zone-a` again).
pub const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// Node `n`'s `topology.kubernetes.io/zone` label, which its kubelet sets: nodes 1, 2, 3
/// are in three zones, so upstream's topology and trafficDistribution specs run.
pub fn node_zone(n: usize) -> &'static str {
    ZONES[(n.max(1) - 1) % ZONES.len()]
}

/// Node `n`'s namespace.
pub fn node_ns(n: usize) -> String {
    format!("{NS_PREFIX}node{n}")
}

/// Node `n`'s InternalIP.
pub fn node_ip(n: usize) -> String {
    format!("192.168.77.{n}")
}

fn ip_batch(netns: Option<&str>, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}-batch:\n{script}\n{}",
            netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sets sysctls inside a namespace (`ip netns exec` gives the namespace's own /proc/sys/net).
pub fn sysctls(netns: &str, kv: &[(&str, &str)]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "sysctl", "-qw"]);
    for (k, v) in kv {
        cmd.arg(format!("{k}={v}"));
    }
    run(&mut cmd).map(|_| ())
}

/// Creates the fabric, the host's veth, `nodes` node namespaces and the client.
pub fn create(nodes: usize) -> Result<()> {
    let mut names = vec![FABRIC_NS.to_owned(), CLIENT_NS.to_owned()];
    names.extend((1..=nodes).map(node_ns));
    let script: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
    ip_batch(None, &script)?;

    // Host <-> fabric.
    ip_batch(
        None,
        &format!(
            "link add {HOST_LINK} type veth peer name host netns {FABRIC_NS}\n\
             addr add {HOST_IP}/24 dev {HOST_LINK}\n\
             link set {HOST_LINK} up\n"
        ),
    )?;
    let mut fabric = String::from("link set lo up\nlink add br0 type bridge\nlink set br0 up\n");
    fabric.push_str("link set host master br0\nlink set host up\n");
    // Every port is added from the fabric side: peers are created here and moved out.
    let mut ends = vec![(
        CLIENT_NS.to_owned(),
        "client".to_owned(),
        CLIENT_IP.to_owned(),
    )];
    ends.extend((1..=nodes).map(|n| (node_ns(n), format!("n{n}"), node_ip(n))));
    for (ns, port, _) in &ends {
        fabric.push_str(&format!(
            "link add {port} type veth peer name eth0 netns {ns}\n\
             link set {port} master br0\nlink set {port} up\n"
        ));
    }
    ip_batch(Some(FABRIC_NS), &fabric)?;
    for (ns, _, ip) in &ends {
        let mut script = format!("link set lo up\naddr add {ip}/24 dev eth0\nlink set eth0 up\n");
        if ns != CLIENT_NS {
            script.push_str(&format!("route add {SERVICE_CIDR} dev eth0\n"));
        }
        ip_batch(Some(ns), &script)?;
    }
    for n in 1..=nodes {
        sysctls(
            &node_ns(n),
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
                ("net.ipv4.conf.eth0.send_redirects", "0"),
            ],
        )?;
    }
    Ok(())
}

/// Routes from the host to node `n`'s pod CIDRs (the host runs the control plane: replies
/// from the API server to pods, and the API server's webhooks or proxies to pod IPs).
pub fn route_pod_cidrs(n: usize, cidrs: &[String]) -> Result<()> {
    let script: String = cidrs
        .iter()
        .filter(|c| !c.contains(':'))
        .map(|c| {
            format!(
                "route replace {c} via {} dev {HOST_LINK} proto {HOST_ROUTE_PROTO}\n",
                node_ip(n)
            )
        })
        .collect();
    if script.is_empty() {
        return Ok(());
    }
    ip_batch(None, &script)
}

/// A further namespace `ns` (its name must start with [`NS_PREFIX`], so that [`remove`]
/// finds it after a crash) on the fabric at `ip`, through the bridge port `port`: for a
/// program that talks to the API server but must program nothing of the nodes (the real
/// kube-proxy whose metrics are compared with weir's). [`detach_namespace`] removes it.
pub fn attach_namespace(ns: &str, port: &str, ip: &str) -> Result<()> {
    if !ns.starts_with(NS_PREFIX) {
        anyhow::bail!("namespace {ns}: a cluster namespace's name starts with {NS_PREFIX}");
    }
    ip_batch(None, &format!("netns add {ns}\n"))?;
    ip_batch(
        Some(FABRIC_NS),
        &format!(
            "link add {port} type veth peer name eth0 netns {ns}\n\
             link set {port} master br0\nlink set {port} up\n"
        ),
    )?;
    ip_batch(
        Some(ns),
        &format!("link set lo up\naddr add {ip}/24 dev eth0\nlink set eth0 up\n"),
    )
}

/// Removes a namespace of [`attach_namespace`] (its veth goes with it).
pub fn detach_namespace(ns: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "del", ns])).map(|_| ())
}

/// The cluster's namespaces that exist now.
pub fn existing_namespaces() -> Vec<String> {
    let out = run(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Removes the host's routes and veth and every cluster namespace (idempotent).
pub fn remove() -> Vec<String> {
    let mut removed = Vec::new();
    let _ = run(Command::new("ip").args([
        "route",
        "flush",
        "proto",
        HOST_ROUTE_PROTO,
        "dev",
        HOST_LINK,
    ]));
    if run(Command::new("ip").args(["link", "del", HOST_LINK])).is_ok() {
        removed.push(format!("link {HOST_LINK}"));
    }
    for ns in existing_namespaces() {
        if run(Command::new("ip").args(["netns", "del", &ns])).is_ok() {
            removed.push(format!("netns {ns}"));
        }
    }
    removed
}
