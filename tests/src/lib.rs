//! weir's test harness: network namespaces removed by guards (also on panic), the standard
//! node/pod/client topology from the design's IP plan, the weir-proxy process, and a
//! cnitool-like CNI runtime ([`cnitool`]).

pub mod cnitool;

pub mod apiserver;
pub mod cluster;
pub mod forward;
pub mod k8s;
pub mod mode;
pub mod multinode;
pub mod netpol;
pub mod prom;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use weir_proxy::testing::ScratchNetns;

/// Harness failures.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A command failed.
    #[error("{cmd}: {msg}")]
    Command {
        /// The command line.
        cmd: String,
        /// What went wrong.
        msg: String,
    },
    /// Something did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

type Result<T> = std::result::Result<T, HarnessError>;

/// Runs a command and fails with its stderr if it does not succeed.
pub fn run(cmd: &str, args: &[&str]) -> Result<Output> {
    let line = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| HarnessError::Command {
            cmd: line.clone(),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            cmd: line,
            msg: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// [`run`] with `input` on the command's stdin.
pub fn run_with_input(cmd: &str, args: &[&str], input: &str) -> Result<Output> {
    use std::io::Write;
    let line = format!("{cmd} {}", args.join(" "));
    let fail = |msg: String| HarnessError::Command {
        cmd: line.clone(),
        msg,
    };
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} (input:\n{input})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// Whether privileged tests can run. Under `CI=true` a missing privilege is a failure,
/// never a silent skip.
pub fn require_privileges() -> bool {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let probe = format!("weir-{}-{n}-check", std::process::id());
    let ok = run("ip", &["netns", "add", &probe]).is_ok();
    if ok {
        let _ = run("ip", &["netns", "del", &probe]);
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root and network namespaces; under CI=true it must not be skipped"
    );
    eprintln!("skipped: needs root and network namespaces");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that is deleted (with the processes started in it) when dropped:
/// weir-proxy's scratch namespace guard plus the processes started inside.
pub struct Netns {
    ns: ScratchNetns,
    children: Vec<Child>,
}

impl Netns {
    /// Creates `weir-<pid>-<n>-<role>` with `lo` up.
    pub fn new(role: &str) -> Result<Netns> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("weir-{}-{n}-{role}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns {
            ns: ScratchNetns::adopt(name),
            children: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates `weir-<pid>-<n>-<role>` for each role with one `ip -batch` (`lo` stays
    /// down: the caller's own batch brings it up).
    fn many(roles: &[String]) -> Result<Vec<Netns>> {
        let out: Vec<Netns> = roles
            .iter()
            .map(|role| {
                let n = COUNTER.fetch_add(1, Ordering::SeqCst);
                Netns {
                    ns: ScratchNetns::adopt(format!("weir-{}-{n}-{role}", std::process::id())),
                    children: Vec::new(),
                }
            })
            .collect();
        let script: String = out
            .iter()
            .map(|ns| format!("netns add {}\n", ns.name()))
            .collect();
        run_with_input("ip", &["-batch", "-"], &script)?;
        Ok(out)
    }

    /// Runs `ip` commands (one per line) inside the namespace in one process.
    pub fn batch(&self, commands: &str) -> Result<()> {
        run_with_input("ip", &["-n", self.ns.name(), "-batch", "-"], commands).map(|_| ())
    }

    /// Sets several sysctls inside the namespace in one process.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        if settings.is_empty() {
            return Ok(());
        }
        let kv: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut cmd = vec!["sysctl", "-qw"];
        cmd.extend(kv.iter().map(String::as_str));
        self.exec(&cmd).map(|_| ())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["netns", "exec", self.ns.name()];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    /// Starts a background process inside the namespace (killed on drop).
    pub fn spawn(&mut self, cmd: &[&str], stdout: Stdio) -> Result<&mut Child> {
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .args(cmd)
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| HarnessError::Command {
                cmd: cmd.join(" "),
                msg: e.to_string(),
            })?;
        self.children.push(child);
        let last = self.children.len() - 1;
        Ok(&mut self.children[last])
    }

    /// Starts a background process inside the namespace with `nsenter --net`, which keeps
    /// the host's mounts (`ip netns exec` mounts a fresh /sys, hiding the cgroup v2 and
    /// bpffs mounts that eBPF mode needs); killed on drop.
    pub fn spawn_keeping_mounts(&mut self, cmd: &[&str], stdout: Stdio) -> Result<&mut Child> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name()))
            .args(cmd)
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| HarnessError::Command {
                cmd: cmd.join(" "),
                msg: e.to_string(),
            })?;
        self.children.push(child);
        let last = self.children.len() - 1;
        Ok(&mut self.children[last])
    }

    /// Stops one process this namespace started (SIGKILL), by PID; other processes,
    /// including other namespaces' weir-proxy, are untouched.
    pub fn stop(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The namespace itself goes with `self.ns`, after its processes.
    }
}

/// The node's address on the client-facing link.
pub const NODE_IP: &str = "192.168.77.10";
/// The node's address on the client's subnet (the client's next hop to the node).
pub const NODE_CLIENT_SIDE_IP: &str = "198.51.100.1";
/// The external client's address.
pub const CLIENT_IP: &str = "198.51.100.2";

/// Pod i's address (node 1 owns 10.244.1.0/24).
pub fn pod_ip(i: usize) -> String {
    format!("10.244.1.{}", 10 + i)
}

/// The node's IPv6 address on the client-facing link (see [`Topology::add_ipv6`]).
pub const NODE_IP6: &str = "fd00:77::10";
/// The external client's IPv6 address, on the node's link.
pub const CLIENT_IP6: &str = "fd00:77::2";

/// Pod i's IPv6 address (node 1 owns fd00:10:244:1::/64).
pub fn pod_ip6(i: usize) -> String {
    format!("fd00:10:244:1::{}", 10 + i)
}

/// A node namespace with routed-veth pods and an external client.
pub struct Topology {
    /// Pods (dropped first).
    pub pods: Vec<Netns>,
    /// The external client.
    pub client: Netns,
    /// The node.
    pub node: Netns,
}

impl Topology {
    /// Builds the node, `pods` pod namespaces and the client.
    ///
    /// A handful of processes do it (one `ip -batch` per namespace, one `sysctl` per
    /// group of settings), which matters where each process costs tens of milliseconds
    /// (the IPVS suite's TCG guest). The veth pairs are created inside the node namespace
    /// with their peers placed straight into the client's or the pod's, so no temporary
    /// interface name ever appears in the host namespace.
    pub fn new(pods: usize) -> Result<Topology> {
        let mut roles = vec!["node".to_owned(), "client".to_owned()];
        roles.extend((0..pods).map(|i| format!("pod{i}")));
        let mut all = Netns::many(&roles)?.into_iter();
        let (Some(node), Some(client)) = (all.next(), all.next()) else {
            return Err(HarnessError::Timeout("namespaces".into()));
        };
        let pod_ns: Vec<Netns> = all.collect();
        // Before the interfaces exist, so that they inherit the defaults.
        node.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ])?;
        // node eth0 <-> client eth0; node vethI <-> pod I eth0 (routed, proxy ARP).
        let mut b = format!(
            "link set lo up\n\
             link add eth0 type veth peer name eth0 netns {client}\n\
             addr add {NODE_IP}/24 dev eth0\n\
             addr add {NODE_CLIENT_SIDE_IP}/24 dev eth0\n\
             link set eth0 up\n\
             route add default via {CLIENT_IP}\n",
            client = client.name()
        );
        for (i, pod) in pod_ns.iter().enumerate() {
            b.push_str(&format!(
                "link add veth{i} type veth peer name eth0 netns {pod}\n\
                 link set veth{i} up\n\
                 route add {ip}/32 dev veth{i}\n",
                pod = pod.name(),
                ip = pod_ip(i)
            ));
        }
        node.batch(&b)?;
        let proxy_arp: Vec<(String, &str)> = (0..pods)
            .map(|i| (format!("net.ipv4.conf.veth{i}.proxy_arp"), "1"))
            .collect();
        let proxy_arp: Vec<(&str, &str)> =
            proxy_arp.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        node.sysctls(&proxy_arp)?;
        client.batch(&format!(
            "link set lo up\n\
             addr add {CLIENT_IP}/24 dev eth0\n\
             link set eth0 up\n\
             route add 192.168.77.0/24 via {NODE_CLIENT_SIDE_IP}\n\
             route add 10.96.0.0/16 via {NODE_CLIENT_SIDE_IP}\n"
        ))?;
        for (i, pod) in pod_ns.iter().enumerate() {
            pod.batch(&format!(
                "link set lo up\n\
                 addr add {ip}/32 dev eth0\n\
                 link set eth0 up\n\
                 route add 169.254.1.1 dev eth0 scope link\n\
                 route add default via 169.254.1.1 dev eth0\n",
                ip = pod_ip(i)
            ))?;
        }
        Ok(Topology {
            pods: pod_ns,
            client,
            node,
        })
    }

    /// Adds IPv6 beside the IPv4 plan: the node forwards IPv6, its `eth0` gets
    /// [`NODE_IP6`]/64 and the client [`CLIENT_IP6`]/64 on that link, with a route to the
    /// IPv6 Service range `fd00:10:96::/112` through the node; pod i gets [`pod_ip6`]`(i)`/128
    /// behind its routed veth, whose node end has the link-local `fe80::1` (the pods'
    /// default route). Every address is added `nodad`, so it is usable at once.
    pub fn add_ipv6(&self) -> Result<()> {
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let add6 = |ns: &Netns, addr: &str, dev: &str| {
            ns.exec(&["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
                .map(|_| ())
        };
        add6(&self.node, &format!("{NODE_IP6}/64"), "eth0")?;
        add6(&self.client, &format!("{CLIENT_IP6}/64"), "eth0")?;
        self.client.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:10:96::/112",
            "via",
            NODE_IP6,
        ])?;
        for (i, pod) in self.pods.iter().enumerate() {
            let host_if = format!("veth{i}");
            add6(&self.node, "fe80::1/64", &host_if)?;
            self.node.exec(&[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{}/128", pod_ip6(i)),
                "dev",
                &host_if,
            ])?;
            add6(pod, &format!("{}/128", pod_ip6(i)), "eth0")?;
            add6(pod, "fe80::2/64", "eth0")?;
            pod.exec(&[
                "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])?;
        }
        Ok(())
    }

    /// Starts `weir-echo NAME 8080 5353` in pod i and waits until it listens.
    pub fn start_echo(&mut self, i: usize, echo_bin: &Path, name: &str) -> Result<()> {
        self.start_echo_on(i, echo_bin, name, 8080, 5353)
    }

    /// Starts `weir-echo NAME TCP_PORT UDP_PORT` in pod i and waits until it listens.
    pub fn start_echo_on(
        &mut self,
        i: usize,
        echo_bin: &Path,
        name: &str,
        tcp_port: u16,
        udp_port: u16,
    ) -> Result<()> {
        start_echo_in(&mut self.pods[i], echo_bin, name, tcp_port, udp_port)
    }

    /// Makes the external client route `dst` (an address or prefix, e.g. an external or
    /// load-balancer IP) through the node.
    pub fn client_route_via_node(&self, dst: &str) -> Result<()> {
        self.client
            .exec(&["ip", "route", "add", dst, "via", NODE_CLIENT_SIDE_IP])
            .map(|_| ())
    }
}

/// Starts `weir-echo NAME TCP_PORT UDP_PORT` in `ns` and waits until it listens.
pub fn start_echo_in(
    ns: &mut Netns,
    echo_bin: &Path,
    name: &str,
    tcp_port: u16,
    udp_port: u16,
) -> Result<()> {
    start_echo_ports(ns, echo_bin, name, &[tcp_port], &[udp_port])
}

/// Starts weir-echo in `ns` answering `name` on every port of `tcp` and `udp` (at least
/// one TCP port), and waits until it listens.
pub fn start_echo_ports(
    ns: &mut Netns,
    echo_bin: &Path,
    name: &str,
    tcp: &[u16],
    udp: &[u16],
) -> Result<()> {
    use std::io::BufRead;
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let bin = echo_bin.to_string_lossy().into_owned();
    let (tcp, udp) = (list(tcp), list(udp));
    let mut cmd = vec![bin.as_str(), name, &tcp];
    if !udp.is_empty() {
        cmd.push(&udp);
    }
    let child = ns.spawn(&cmd, Stdio::piped())?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| HarnessError::Timeout("echo stdout".into()))?;
    let mut line = String::new();
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| HarnessError::Timeout(format!("weir-echo ready: {e}")))?;
    if line.trim() != "ready" {
        return Err(HarnessError::Timeout(format!("weir-echo said {line:?}")));
    }
    Ok(())
}

/// Path of a workspace binary: `$WEIR_PROXY_BIN` for weir-proxy, else `target/debug/NAME`.
pub fn workspace_bin(name: &str) -> PathBuf {
    if name == "weir-proxy" {
        if let Ok(p) = std::env::var("WEIR_PROXY_BIN") {
            return PathBuf::from(p);
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug").join(name)
}

/// Where a CNI runtime finds plugins in tests: the workspace's binaries (weir-cni) first,
/// then Debian's containernetworking-plugins.
pub fn cni_path() -> Vec<PathBuf> {
    let own = workspace_bin("weir-cni")
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default();
    vec![own, PathBuf::from("/usr/lib/cni")]
}

/// The node name weir-proxy is given (`--hostname-override`) and its Node object has.
pub const NODE_NAME: &str = "node1";

/// Writes manifests for the node and one Service into `dir`.
pub fn write_manifests(dir: &Path, services: &str) -> std::io::Result<()> {
    write_manifests_with_node_labels(dir, &[], services)
}

/// [`write_manifests`] with labels on the Node object (e.g. its topology zone).
pub fn write_manifests_with_node_labels(
    dir: &Path,
    node_labels: &[(&str, &str)],
    services: &str,
) -> std::io::Result<()> {
    write_manifests_with_node(dir, node_labels, &[NODE_IP], services)
}

/// [`write_manifests`] with labels on the Node object and its InternalIP `addresses`
/// (e.g. [`NODE_IP`] and [`NODE_IP6`] for a dual-stack node).
pub fn write_manifests_with_node(
    dir: &Path,
    node_labels: &[(&str, &str)],
    addresses: &[&str],
    services: &str,
) -> std::io::Result<()> {
    let addresses: Vec<String> = addresses
        .iter()
        .map(|a| format!("{{type: InternalIP, address: \"{a}\"}}"))
        .collect();
    let addresses = addresses.join(", ");
    let labels = if node_labels.is_empty() {
        String::new()
    } else {
        let l: Vec<String> = node_labels
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!(", labels: {{{}}}", l.join(", "))
    };
    write_file_atomically(
        dir,
        "node.yaml",
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}{labels}}}\nstatus:\n  addresses: [{addresses}]\n"
        ),
    )?;
    write_file_atomically(dir, "services.yaml", services)
}

/// Writes `dir/name` through a hidden temporary file and a rename, so the watcher never
/// sees half a file.
pub fn write_file_atomically(dir: &Path, name: &str, content: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(tmp, dir.join(name))
}

/// A Service with one port and an EndpointSlice whose endpoints are `pods` (indices).
pub fn service_yaml(
    name: &str,
    cluster_ip: &str,
    protocol: &str,
    port: u16,
    node_port: Option<u16>,
    target: u16,
    pods: &[usize],
) -> String {
    let ty = if node_port.is_some() {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let np = node_port
        .map(|p| format!(", nodePort: {p}"))
        .unwrap_or_default();
    let eps = endpoints_yaml(pods.iter().map(|i| (pod_ip(*i), NODE_NAME)));
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  type: {ty}\n  clusterIP: {cluster_ip}\n  ports: [{{name: p, protocol: {protocol}, port: {port}, targetPort: {target}{np}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, protocol: {protocol}, port: {target}}}]\nendpoints:{eps}"
    )
}

/// The value of an EndpointSlice's `endpoints:` key for ready endpoints `(address, node)`,
/// written right after the key: a block list starting on the next line, or ` []`.
pub fn endpoints_yaml<A, N>(eps: impl IntoIterator<Item = (A, N)>) -> String
where
    A: std::fmt::Display,
    N: std::fmt::Display,
{
    let list: String = eps
        .into_iter()
        .map(|(a, n)| {
            format!("- {{addresses: [\"{a}\"], nodeName: {n}, conditions: {{ready: true}}}}\n")
        })
        .collect();
    if list.is_empty() {
        " []\n".to_owned()
    } else {
        format!("\n{list}")
    }
}

/// Starts weir-proxy in the node namespace reading `dir`, waits for its first sync, and
/// returns its PID.
pub fn start_proxy(node: &mut Netns, dir: &Path, metrics_port: u16) -> Result<u32> {
    start_proxy_with(node, dir, metrics_port, &[])
}

/// [`start_proxy`] with extra flags.
pub fn start_proxy_with(
    node: &mut Netns,
    dir: &Path,
    metrics_port: u16,
    extra: &[&str],
) -> Result<u32> {
    start_proxy_as(node, dir, metrics_port, NODE_NAME, extra)
}

/// [`start_proxy_with`] for the node named `hostname` (`--hostname-override`).
pub fn start_proxy_as(
    node: &mut Netns,
    dir: &Path,
    metrics_port: u16,
    hostname: &str,
    extra: &[&str],
) -> Result<u32> {
    let source = format!("dir:{}", dir.display());
    start_proxy_from(node, &["--source", &source], metrics_port, hostname, extra)
}

/// Starts weir-proxy in `node` with the test plan's flags, the source flags given
/// (`--source dir:...`, or `--kubeconfig PATH` for the API) and `extra` (which may override
/// `--min-sync-period`), and waits for its first sync.
pub fn start_proxy_from(
    node: &mut Netns,
    source_args: &[&str],
    metrics_port: u16,
    hostname: &str,
    extra: &[&str],
) -> Result<u32> {
    let bin = workspace_bin("weir-proxy");
    if !bin.exists() {
        return Err(HarnessError::Command {
            cmd: bin.display().to_string(),
            msg: "missing: build it with cargo build -p weir-proxy (cargo xtask test does)".into(),
        });
    }
    let args = proxy_args(source_args, metrics_port, hostname, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ebpf = extra.windows(2).any(|w| w == ["--proxy-mode", "ebpf"]);
    let pid = if ebpf {
        node.spawn_keeping_mounts(&args, Stdio::null())?.id()
    } else {
        node.spawn(&args, Stdio::null())?.id()
    };
    wait_synced(node, metrics_port, 0.0)?;
    Ok(pid)
}

/// weir-proxy's command line as the tests run it: the binary, the test plan's flags (mode
/// nftables unless `extra` names one, the cluster and Service CIDRs, metrics on
/// 127.0.0.1:`metrics_port`, health on the port 7 above, `--min-sync-period 100ms` unless
/// `extra` has one), `source_args` and `extra`.
pub fn proxy_args(
    source_args: &[&str],
    metrics_port: u16,
    hostname: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![workspace_bin("weir-proxy").to_string_lossy().into_owned()];
    if !extra.contains(&"--proxy-mode") {
        args.extend(["--proxy-mode".into(), "nftables".into()]);
    }
    args.extend(source_args.iter().map(|s| s.to_string()));
    args.extend([
        "--hostname-override".into(),
        hostname.into(),
        "--cluster-cidr".into(),
        "10.244.0.0/16".into(),
        "--service-cluster-ip-range".into(),
        "10.96.0.0/16".into(),
        "--metrics-bind-address".into(),
        format!("127.0.0.1:{metrics_port}"),
        "--healthz-bind-address".into(),
        format!("127.0.0.1:{}", metrics_port + 7),
    ]);
    if !extra.contains(&"--min-sync-period") {
        args.extend(["--min-sync-period".into(), "100ms".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The value of `kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}` (every
/// sync programs both families, so either tells when the last one finished).
pub fn last_sync(node: &Netns, metrics_port: u16) -> Option<f64> {
    metric(
        node,
        metrics_port,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
    )
}

/// weir-proxy's `/metrics` page (empty when it cannot be read).
pub fn metrics_text(node: &Netns, metrics_port: u16) -> String {
    let probe = workspace_bin("weir-probe");
    node.exec(&[
        &probe.to_string_lossy(),
        "get",
        &format!("127.0.0.1:{metrics_port}"),
        "/metrics",
    ])
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default()
}

/// The value of a metric from weir-proxy's `/metrics`: `name` is the metric's name, with
/// its labels when it has any (`name{label="value"}`, as the page prints them).
pub fn metric(node: &Netns, metrics_port: u16, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    metrics_text(node, metrics_port)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until a sync newer than `after` has happened.
pub fn wait_synced(node: &Netns, metrics_port: u16, after: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if last_sync(node, metrics_port).is_some_and(|t| t > after) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(HarnessError::Timeout("weir-proxy's first sync".into()))
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout(what.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `nft list ARGS` inside a namespace, as text (empty when the command fails).
pub fn nft_list(ns: &Netns, args: &[&str]) -> String {
    let mut cmd = vec!["nft", "list"];
    cmd.extend_from_slice(args);
    ns.exec(&cmd)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs weir-probe in a namespace and returns its JSON report.
pub fn probe(ns: &Netns, args: &[&str]) -> Result<serde_json::Value> {
    let bin = workspace_bin("weir-probe");
    let mut cmd = vec![bin.to_string_lossy().into_owned()];
    cmd.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = ns.exec(&refs)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("{}");
    serde_json::from_str(last).map_err(|e| HarnessError::Command {
        cmd: cmd.join(" "),
        msg: format!("bad report {last:?}: {e}"),
    })
}

/// `(pod name, answers)` of a weir-probe report.
pub fn answers(report: &serde_json::Value) -> Vec<(String, u64)> {
    counts(&report["answers"])
}

/// The `name: count` pairs of a JSON object (a weir-probe report's `answers` or `errors`).
pub fn counts(map: &serde_json::Value) -> Vec<(String, u64)> {
    map.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The pod names that answered a weir-probe run.
pub fn names(report: &serde_json::Value) -> Vec<String> {
    answers(report)
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(n, _)| n)
        .collect()
}

/// How many requests of a weir-probe run were answered.
pub fn total(report: &serde_json::Value) -> u64 {
    answers(report).iter().map(|(_, n)| n).sum()
}

/// How many requests of a weir-probe run failed with error `kind`.
pub fn errors(report: &serde_json::Value, kind: &str) -> u64 {
    report["errors"][kind].as_u64().unwrap_or(0)
}

/// The namespace's UDP conntrack entries (`conntrack -L` lines) with this original
/// destination port and source port. Panics when `conntrack` cannot run (an empty answer
/// must mean "no entries").
pub fn udp_conntrack_entries(ns: &Netns, dport: u16, sport: u16) -> Vec<String> {
    let out = ns.exec(&[
        "conntrack",
        "-L",
        "-p",
        "udp",
        "--dport",
        &dport.to_string(),
        "--sport",
        &sport.to_string(),
    ]);
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        Err(e) => panic!("conntrack -L: {e}"),
    }
}
