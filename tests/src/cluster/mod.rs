//! A real Kubernetes cluster on one machine, of the pinned release ([`crate::k8s`]): the
//! control plane on the host, and 1 to 6 nodes (two in each of three zones), each a network namespace on a bridge with
//! its own mount, UTS and cgroup namespaces, containerd and kubelet ([`node`],
//! [`runtime`]). No kube-proxy and no other CNI: weir is deployed into it from
//! `deploy/weir.yaml` as a user would, and provides both. In the baseline modes
//! (`kube-proxy-nftables`, `kube-proxy-iptables`) the release's real kube-proxy serves
//! Services on every node instead, and weir runs with `--run-service-proxy=false` (the CNI's
//! pod CIDRs, the routes and NetworkPolicy), on ports 10349 and 10356 ([`baseline_manifest`]).
//!
//! Everything the cluster makes is named so that [`down`] finds it after a crash: the state
//! directory ([`state_dir`], default `/var/lib/weir-cluster`), the pid files in it, the
//! etcd directory on /dev/shm, namespaces starting with `weir-cl-`, the host's veth
//! `weircl0` and its routes, and the cgroups `weir-cl-nodeN`. [`Cluster::up`] runs
//! [`down`] first.

pub mod control_plane;
pub mod images;
pub mod node;
pub mod process;
pub mod runtime;
pub mod topology;

use crate::k8s::{self, Binaries};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The kube-dns Service's ClusterIP, every kubelet's `clusterDNS`.
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// The cluster's DNS (CoreDNS), applied once weir serves Services.
pub const COREDNS_MANIFEST: &str = include_str!("coredns.yaml");

/// The most nodes a cluster has: two in each of the three zones (the 2-core machine runs
/// every kubelet and containerd).
pub const MAX_NODES: usize = 6;

/// Where the cluster keeps its state: `$WEIR_CLUSTER_DIR`, else `/var/lib/weir-cluster`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("WEIR_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/weir-cluster"))
}

/// The modes a cluster's Services can be served in: weir's, and the real kube-proxy's.
pub const PROXY_MODES: [&str; 4] = [
    "nftables",
    "ebpf",
    "kube-proxy-nftables",
    "kube-proxy-iptables",
];

/// The real kube-proxy's mode of a baseline mode (`kube-proxy-nftables` -> `nftables`).
pub fn kube_proxy_mode(mode: &str) -> Option<&str> {
    mode.strip_prefix("kube-proxy-")
}

/// How to bring a cluster up.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of nodes (1 to [`MAX_NODES`]).
    pub nodes: usize,
    /// One of [`PROXY_MODES`]: weir's proxy mode (`nftables` or `ebpf`), written into the
    /// ConfigMap before apply, or `kube-proxy-<mode>` for the real kube-proxy.
    pub proxy_mode: String,
    /// weir's image archive (`cargo xtask image --save`), imported on every node.
    pub weir_image: PathBuf,
    /// The manifest applied (deploy/weir.yaml).
    pub manifest: PathBuf,
}

/// A running cluster (made by [`Cluster::up`], or found by [`Cluster::attach`]).
pub struct Cluster {
    /// The state directory.
    pub state: PathBuf,
    /// Number of nodes.
    pub nodes: usize,
    /// The release's programs.
    pub bins: Binaries,
}

fn say(msg: &str) {
    eprintln!("cluster: {msg}");
}

impl Cluster {
    /// Removes leftovers of an earlier cluster, then brings a new one up and deploys weir
    /// (see the module docs). On failure, what was made is removed again unless
    /// `WEIR_CLUSTER_KEEP` is set; the error carries the failing component's log tail.
    pub fn up(opts: &UpOptions) -> Result<Cluster> {
        if !(1..=MAX_NODES).contains(&opts.nodes) {
            bail!(
                "--nodes {}: a cluster has 1 to {MAX_NODES} nodes",
                opts.nodes
            );
        }
        if !PROXY_MODES.contains(&opts.proxy_mode.as_str()) {
            bail!(
                "--proxy-mode {}: want one of {}",
                opts.proxy_mode,
                PROXY_MODES.join(", ")
            );
        }
        let removed = down()?;
        if !removed.is_empty() {
            say(&format!(
                "removed leftovers of an earlier cluster: {}",
                removed.join(", ")
            ));
        }
        let bins = k8s::ensure_built()?;
        let state = state_dir();
        fs::create_dir_all(&state)?;
        fs::write(state.join("nodes"), opts.nodes.to_string())?;
        let cluster = Cluster {
            state,
            nodes: opts.nodes,
            bins,
        };
        match cluster.bring_up(opts) {
            Ok(()) => Ok(cluster),
            Err(e) => {
                if std::env::var_os("WEIR_CLUSTER_KEEP").is_none() {
                    let _ = down();
                } else {
                    say(&format!(
                        "kept {} (WEIR_CLUSTER_KEEP)",
                        cluster.state.display()
                    ));
                }
                Err(e)
            }
        }
    }

    fn bring_up(&self, opts: &UpOptions) -> Result<()> {
        let started = Instant::now();
        let state = &self.state;
        say("network: fabric bridge, host veth 192.168.77.254, node namespaces");
        topology::create(self.nodes)?;
        let pki = control_plane::Pki::create(state, self.nodes)?;
        say("control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler");
        control_plane::start(state, &self.bins, &pki)?;
        say("images: pause, agnhost, CoreDNS and the e2e suite's (local OCI archives)");
        let mut archives = images::write_test_images(&self.bins, &state.join("images"))?;
        archives.push(opts.weir_image.clone());
        let hs = node::hierarchies()?;
        for n in 1..=self.nodes {
            say(&format!("node{n}: namespaces, containerd, images, kubelet"));
            let ns = node::NodeNamespaces::start(state, n, &hs)?;
            runtime::start_containerd(state, &ns, &self.bins)?;
            runtime::import_images(state, n, &self.bins, &archives)?;
            runtime::start_kubelet(state, &ns, &self.bins, &pki)?;
            if let Some(mode) = kube_proxy_mode(&opts.proxy_mode) {
                say(&format!("node{n}: the real kube-proxy, {mode} mode"));
                runtime::start_kube_proxy(state, &ns, &self.bins, &pki, mode)?;
            }
        }
        self.wait_nodes_registered()?;
        say("deploying weir: kubectl apply -f deploy/weir.yaml");
        self.deploy(opts)?;
        self.wait_nodes_ready()?;
        say("cluster DNS: CoreDNS behind kube-dns 10.96.0.10");
        self.kubectl_stdin(&["apply", "-f", "-"], COREDNS_MANIFEST)?;
        self.kubectl(&[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment/coredns",
            "--timeout=180s",
        ])
        .map_err(|e| e.context(self.diagnose()))?;
        say(&format!(
            "up in {:.0} s: {} nodes Ready, daemonset/weir ready, CoreDNS ready",
            started.elapsed().as_secs_f64(),
            self.nodes
        ));
        Ok(())
    }

    /// The cluster [`Cluster::up`] left running.
    pub fn attach() -> Result<Cluster> {
        let state = state_dir();
        let nodes: usize = fs::read_to_string(state.join("nodes"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| {
                format!("no cluster in {} (cargo xtask cluster up)", state.display())
            })?;
        Ok(Cluster {
            state,
            nodes,
            bins: k8s::ensure_built()?,
        })
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        control_plane::admin_kubeconfig(&self.state)
    }

    /// Runs kubectl as the admin; its stdout, or its stderr in the error.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, "")
    }

    /// Runs kubectl as the admin with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        kubectl(
            Command::new(&self.bins.kubectl)
                .arg("--kubeconfig")
                .arg(self.kubeconfig()),
            args,
            input,
        )
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a)?;
        serde_json::from_str(&out).context("kubectl get printed no JSON")
    }

    /// Runs a command inside node `n` (its network and mount namespaces).
    pub fn node_exec(&self, n: usize, argv: &[&str]) -> Result<String> {
        node::exec_in(&self.state, n, argv)
    }

    /// Runs a command in the external client's namespace.
    pub fn client_exec(&self, argv: &[&str]) -> Result<String> {
        process::run(
            Command::new("ip")
                .args(["netns", "exec", topology::CLIENT_NS])
                .args(argv),
        )
    }

    /// The last lines of a component's log (`kube-apiserver`, `node1-kubelet`, ...).
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        process::tail(&process::log_path(&self.state, name), n)
    }

    /// The log tails of every component that is not running, or of all when all run.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        let Ok(rd) = fs::read_dir(process::pid_dir(&self.state)) else {
            return out;
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                e.path()
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .collect();
        names.sort();
        for name in names {
            let running =
                process::read_pid_file(&process::pid_dir(&self.state).join(format!("{name}.pid")))
                    .is_some();
            if !running || name.ends_with("kubelet") {
                out.push_str(&format!(
                    "--- {name} ({}) log ends:\n{}\n",
                    if running { "running" } else { "NOT running" },
                    self.log_tail(&name, 25)
                ));
            }
        }
        out
    }

    fn wait_nodes_registered(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut routed = vec![false; self.nodes + 1];
        loop {
            if let Ok(v) = self.get_json(&["nodes"]) {
                for item in v["items"].as_array().into_iter().flatten() {
                    let name = item["metadata"]["name"].as_str().unwrap_or("");
                    let Some(n) = (1..=self.nodes).find(|n| topology::node_name(*n) == name) else {
                        continue;
                    };
                    let cidrs: Vec<String> = item["spec"]["podCIDRs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.as_str().map(str::to_owned))
                        .collect();
                    if !routed[n] && !cidrs.is_empty() {
                        topology::route_pod_cidrs(n, &cidrs)?;
                        routed[n] = true;
                    }
                }
            }
            if routed[1..].iter().all(|r| *r) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not every node registered with a pod CIDR within 180 s:\n{}",
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// deploy/README.md's steps: the API server's own address for weir, read from the
    /// `kubernetes` Service's EndpointSlice (its ClusterIP works only once weir runs) into
    /// the `weir-apiserver` ConfigMap; `kubectl apply -f deploy/weir.yaml` (the
    /// ConfigMap's mode set first); `kubectl -n kube-system rollout status`.
    fn deploy(&self, opts: &UpOptions) -> Result<()> {
        let manifest = fs::read_to_string(&opts.manifest)
            .with_context(|| format!("reading {}", opts.manifest.display()))?;
        let manifest = match kube_proxy_mode(&opts.proxy_mode) {
            Some(_) => baseline_manifest(&manifest)?,
            None => set_mode(&manifest, &opts.proxy_mode)?,
        };
        let slice = |path: &str| {
            self.kubectl(&[
                "get",
                "endpointslice",
                "-n",
                "default",
                "-l",
                "kubernetes.io/service-name=kubernetes",
                "-o",
                &format!("jsonpath={{.items[0].{path}}}"),
            ])
        };
        let host = slice("endpoints[0].addresses[0]")?;
        let port = slice("ports[0].port")?;
        if host.trim().is_empty() || port.trim().is_empty() {
            bail!("the `kubernetes` Service has no EndpointSlice endpoint yet");
        }
        self.kubectl(&[
            "-n",
            "kube-system",
            "create",
            "configmap",
            "weir-apiserver",
            &format!("--from-literal=KUBERNETES_SERVICE_HOST={}", host.trim()),
            &format!("--from-literal=KUBERNETES_SERVICE_PORT={}", port.trim()),
        ])?;
        self.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
        self.rollout_status()
    }

    /// `kubectl -n kube-system rollout status daemonset/weir` (5 minutes at most); on
    /// failure, the weir pods' state and the kubelets' logs are in the error.
    pub fn rollout_status(&self) -> Result<()> {
        match self.kubectl(&[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/weir",
            "--timeout=300s",
        ]) {
            Ok(_) => Ok(()),
            Err(e) => {
                let pods = self
                    .kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"])
                    .unwrap_or_default();
                let events = self
                    .kubectl(&[
                        "-n",
                        "kube-system",
                        "get",
                        "events",
                        "--sort-by=.lastTimestamp",
                    ])
                    .unwrap_or_default();
                let events: Vec<&str> = events.lines().rev().take(20).collect();
                Err(e.context(format!(
                    "daemonset/weir did not become ready:\n{pods}\nevents:\n{}\n{}",
                    events.join("\n"),
                    self.diagnose()
                )))
            }
        }
    }

    fn wait_nodes_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let ready = self
                .get_json(&["nodes"])
                .map(|v| {
                    v["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|item| node_is_ready(item))
                        .count()
                })
                .unwrap_or(0);
            if ready == self.nodes {
                return Ok(());
            }
            if Instant::now() > deadline {
                let nodes = self
                    .kubectl(&["get", "nodes", "-o", "wide"])
                    .unwrap_or_default();
                bail!(
                    "{ready} of {} nodes Ready after 180 s:\n{nodes}\n{}",
                    self.nodes,
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Runs `cmd` (kubectl with its global flags) with `args` and `input` on stdin; its stdout,
/// or its stderr in the error.
pub fn kubectl(cmd: &mut Command, args: &[&str], input: &str) -> Result<String> {
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kubectl")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a Node object's Ready condition is True.
pub fn node_is_ready(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The manifest with the ConfigMap's `mode:` line set to `mode`, as an operator edits it.
pub fn set_mode(manifest: &str, mode: &str) -> Result<String> {
    let mut found = 0;
    let out: Vec<String> = manifest
        .lines()
        .map(|l| {
            let trimmed = l.trim_start();
            if trimmed.starts_with("mode: ") {
                found += 1;
                let indent = &l[..l.len() - trimmed.len()];
                format!("{indent}mode: {mode}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    if found != 1 {
        bail!("the manifest has {found} `mode:` lines; expected the ConfigMap's one");
    }
    Ok(out.join("\n") + "\n")
}

/// deploy/weir.yaml for a cluster whose Services the real kube-proxy serves: weir with
/// `--run-service-proxy=false`, its metrics and health servers moved to 10349 and 10356
/// (kube-proxy holds 10249 and 10256 on the same host network), probes following.
pub fn baseline_manifest(manifest: &str) -> Result<String> {
    let edits: [(&str, &str); 5] = [
        (
            "metricsBindAddress: 0.0.0.0:10249",
            "metricsBindAddress: 0.0.0.0:10349",
        ),
        (
            "healthzBindAddress: 0.0.0.0:10256",
            "healthzBindAddress: 0.0.0.0:10356",
        ),
        ("containerPort: 10249", "containerPort: 10349"),
        ("containerPort: 10256", "containerPort: 10356"),
        ("port: 10256,", "port: 10356,"),
    ];
    let mut out = manifest.to_owned();
    for (from, to) in edits {
        if !out.contains(from) {
            bail!("deploy/weir.yaml has no `{from}` to move for the kube-proxy baseline");
        }
        out = out.replace(from, to);
    }
    let flag = "- --route-pod-cidrs";
    let Some(line) = out.lines().find(|l| l.trim() == flag).map(str::to_owned) else {
        bail!("deploy/weir.yaml has no `{flag}` line to add --run-service-proxy=false after");
    };
    let indent = &line[..line.len() - line.trim_start().len()];
    Ok(out.replacen(
        &line,
        &format!("{line}\n{indent}- --run-service-proxy=false"),
        1,
    ))
}

/// Stops and removes everything a cluster made (see the module docs); what it removed.
/// Safe to call when there is nothing.
pub fn down() -> Result<Vec<String>> {
    let state = state_dir();
    let mut removed: Vec<String> = process::stop_all(&state, Duration::from_secs(10))?
        .into_iter()
        .map(|n| format!("process {n}"))
        .collect();
    if let Ok(hs) = node::hierarchies() {
        for n in 1..=MAX_NODES {
            removed.extend(node::remove_cgroups(&hs, n));
        }
    }
    removed.extend(topology::remove());
    let etcd = control_plane::etcd_dir(&state);
    if etcd.exists() {
        fs::remove_dir_all(&etcd).with_context(|| format!("removing {}", etcd.display()))?;
        removed.push(format!("dir {}", etcd.display()));
    }
    if state.exists() {
        remove_tree(&state)?;
        removed.push(format!("dir {}", state.display()));
    }
    Ok(removed)
}

/// `rm -rf --one-file-system`: the node directories held mounts only inside the nodes'
/// mount namespaces, gone with their processes; never cross into a mount left behind.
fn remove_tree(dir: &Path) -> Result<()> {
    process::run(
        Command::new("rm")
            .args(["-rf", "--one-file-system"])
            .arg(dir),
    )
    .map(|_| ())
    .with_context(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_set_in_the_configmap_line_only() {
        let m = "data:\n  config.conf: |\n    kind: KubeProxyConfiguration\n    mode: nftables\n    clusterCIDR: x\n";
        let out = set_mode(m, "ebpf").unwrap();
        assert!(out.contains("    mode: ebpf\n"));
        assert!(!out.contains("nftables"));
        assert!(set_mode("a: b\n", "ebpf").is_err());
    }

    #[test]
    fn the_deploy_manifest_has_one_mode_line() {
        let m = include_str!("../../../deploy/weir.yaml");
        assert!(set_mode(m, "ebpf").unwrap().contains("mode: ebpf"));
    }

    #[test]
    fn the_baseline_manifest_leaves_services_and_kube_proxys_ports_to_kube_proxy() {
        let m = include_str!("../../../deploy/weir.yaml");
        let b = baseline_manifest(m).unwrap();
        assert!(b.contains("        - --run-service-proxy=false\n"));
        for old in ["10249", "10256"] {
            assert!(!b.contains(old), "{old} is still in the baseline manifest");
        }
        assert_eq!(b.matches("port: 10356,").count(), 2, "both probes");
        assert!(baseline_manifest("a: b\n").is_err());
        assert_eq!(kube_proxy_mode("kube-proxy-iptables"), Some("iptables"));
        assert_eq!(kube_proxy_mode("nftables"), None);
    }

    #[test]
    fn node_readiness_reads_the_ready_condition() {
        let v: Value = serde_json::from_str(
            r#"{"status":{"conditions":[{"type":"MemoryPressure","status":"False"},{"type":"Ready","status":"True"}]}}"#,
        )
        .unwrap();
        assert!(node_is_ready(&v));
        let v: Value = serde_json::from_str(
            r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
        )
        .unwrap();
        assert!(!node_is_ready(&v));
    }
}
