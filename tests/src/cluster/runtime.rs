//! A node's containerd and kubelet: their configuration files and how they start inside
//! the node (see [`super::node`]).

use super::control_plane::Pki;
use super::node::NodeNamespaces;
use super::process::Daemon;
use super::topology;
use crate::k8s::Binaries;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The pause image the kubelet's sandboxes use (the tag the pinned release names).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.2";
/// The runc containerd runs (Debian's package).
pub const RUNC: &str = "/usr/sbin/runc";
/// Where containerd finds CNI plugins: weir-cni is installed into the node's /opt/cni/bin by
/// the DaemonSet's init container; loopback and portmap come from Debian's
/// containernetworking-plugins.
pub const CNI_BIN_DIRS: [&str; 2] = ["/opt/cni/bin", "/usr/lib/cni"];

/// containerd's configuration (version 3, containerd 2.x). Paths are the node's own (its
/// mount namespace holds private copies of them).
pub fn containerd_config() -> String {
    let bins: Vec<String> = CNI_BIN_DIRS.iter().map(|d| format!("'{d}'")).collect();
    format!(
        "version = 3\n\
         root = '/var/lib/containerd'\n\
         state = '/run/containerd'\n\
         \n\
         [grpc]\n  address = '/run/containerd/containerd.sock'\n\
         \n\
         [plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n\
         \n\
         [plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = '{PAUSE_IMAGE}'\n\
         \n\
         # This machine grants no CAP_SYS_RESOURCE: no process may lower an oom_score_adj\n\
         # below 0, so the sandboxes' -998 and critical pods' -997 are clamped to containerd's.\n\
         [plugins.'io.containerd.cri.v1.runtime']\n  enable_selinux = false\n  restrict_oom_score_adj = true\n\
         \n\
         [plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = [{}]\n  conf_dir = '/etc/cni/net.d'\n\
         \n\
         [plugins.'io.containerd.cri.v1.runtime'.containerd]\n  default_runtime_name = 'runc'\n\
         \n\
         [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n  runtime_type = 'io.containerd.runc.v2'\n\
         \n\
         [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n  BinaryName = '{RUNC}'\n  SystemdCgroup = false\n",
        bins.join(", ")
    )
}

/// The kubelet's configuration for node `n`.
pub fn kubelet_config(n: usize, ca: &Path) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1\n\
         kind: KubeletConfiguration\n\
         # This host's cgroup v1 controllers (cgroup2 holds none of them).\n\
         failCgroupV1: false\n\
         cgroupDriver: cgroupfs\n\
         cgroupRoot: /\n\
         containerRuntimeEndpoint: unix:///run/containerd/containerd.sock\n\
         address: {ip}\n\
         port: 10250\n\
         readOnlyPort: 0\n\
         healthzBindAddress: 127.0.0.1\n\
         healthzPort: 10248\n\
         authentication:\n  anonymous:\n    enabled: false\n  webhook:\n    enabled: false\n  x509:\n    clientCAFile: {ca}\n\
         authorization:\n  mode: AlwaysAllow\n\
         clusterDomain: cluster.local\n\
         clusterDNS: [{dns}]\n\
         resolvConf: /etc/resolv.conf\n\
         failSwapOn: false\n\
         # No CAP_SYS_RESOURCE here (see containerd's restrict_oom_score_adj).\n\
         oomScoreAdj: 0\n\
         # The host's disk and memory are shared by every node: no evictions for them.\n\
         evictionHard:\n  memory.available: 1Mi\n  nodefs.available: '1%'\n  imagefs.available: '1%'\n  nodefs.inodesFree: '1%'\n\
         imageGCHighThresholdPercent: 100\n\
         serializeImagePulls: false\n\
         maxPods: 110\n\
         registerNode: true\n\
         nodeStatusReportFrequency: 10s\n\
         nodeStatusUpdateFrequency: 5s\n\
         syncFrequency: 10s\n\
         fileCheckFrequency: 10s\n",
        ip = topology::node_ip(n),
        ca = ca.display(),
        dns = super::CLUSTER_DNS,
    )
}

/// Writes the node's files and starts its containerd, waiting for its socket.
pub fn start_containerd(state: &Path, node: &NodeNamespaces, bins: &Binaries) -> Result<Daemon> {
    let dir = state.join(format!("node{}", node.n));
    let conf = dir.join("containerd.toml");
    fs::write(&conf, containerd_config())?;
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bins.dir.display()
    );
    let d = node.spawn(
        state,
        "containerd",
        &[
            "env".to_owned(),
            format!("PATH={path}"),
            bins.containerd.display().to_string(),
            "--config".to_owned(),
            conf.display().to_string(),
        ],
    )?;
    let sock = super::node::node_dir(state, node.n, "/run/containerd").join("containerd.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        super::process::check_running(&d)?;
        if Instant::now() > deadline {
            bail!(
                "node{}'s containerd made no socket within 60 s; its log ends:\n{}",
                node.n,
                super::process::tail(&d.log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(d)
}

/// The host path of node `n`'s containerd socket.
pub fn containerd_socket(state: &Path, n: usize) -> PathBuf {
    super::node::node_dir(state, n, "/run/containerd").join("containerd.sock")
}

/// Imports image archives into node `n`'s containerd (namespace k8s.io), with ctr from
/// the host.
pub fn import_images(state: &Path, n: usize, bins: &Binaries, archives: &[PathBuf]) -> Result<()> {
    let sock = containerd_socket(state, n);
    for a in archives {
        super::process::run(
            std::process::Command::new(&bins.ctr)
                .arg("--address")
                .arg(&sock)
                .args(["-n", "k8s.io", "images", "import", "--local"])
                .arg(a),
        )
        .with_context(|| format!("importing {} into node{n}", a.display()))?;
    }
    Ok(())
}

/// Writes the kubelet's files and starts it.
pub fn start_kubelet(
    state: &Path,
    node: &NodeNamespaces,
    bins: &Binaries,
    pki: &Pki,
) -> Result<Daemon> {
    let n = node.n;
    let dir = state.join(format!("node{n}"));
    let conf = dir.join("kubelet.yaml");
    fs::write(&conf, kubelet_config(n, &pki.path("ca.crt")))?;
    let kc = dir.join("kubelet.conf");
    pki.write_kubeconfig(&kc, &format!("system:node:{}", topology::node_name(n)))?;
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bins.dir.display()
    );
    node.spawn(
        state,
        "kubelet",
        &[
            "env".to_owned(),
            format!("PATH={path}"),
            bins.kubelet.display().to_string(),
            format!("--config={}", conf.display()),
            format!("--kubeconfig={}", kc.display()),
            format!("--hostname-override={}", topology::node_name(n)),
            format!("--node-ip={}", topology::node_ip(n)),
            format!(
                "--node-labels=topology.kubernetes.io/zone={}",
                topology::node_zone(n)
            ),
            "--v=2".to_owned(),
        ],
    )
}

/// Starts the pinned release's kube-proxy inside node `n` in `mode` (`nftables` or
/// `iptables`), as the baseline weir is measured against: its default ports (10249,
/// 10256), its own default NodePort addresses for the mode (nftables: the node's primary
/// addresses, as weir's deploy/weir.yaml has; iptables: every local address, 127.0.0.1
/// included, which the `[Feature:LocalhostNodePorts]` specs exercise), and no change to the
/// conntrack table size or timeouts (global sysctls every node shares).
pub fn start_kube_proxy(
    state: &Path,
    node: &NodeNamespaces,
    bins: &Binaries,
    pki: &Pki,
    mode: &str,
) -> Result<Daemon> {
    let n = node.n;
    let kc = state.join(format!("node{n}")).join("kube-proxy.conf");
    pki.write_kubeconfig(&kc, "system:kube-proxy")?;
    node.spawn(
        state,
        "kube-proxy",
        &[
            "env".to_owned(),
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            bins.kube_proxy.display().to_string(),
            format!("--kubeconfig={}", kc.display()),
            format!("--hostname-override={}", topology::node_name(n)),
            format!("--proxy-mode={mode}"),
            "--cluster-cidr=10.244.0.0/16".to_owned(),
            "--metrics-bind-address=0.0.0.0:10249".to_owned(),
            "--healthz-bind-address=0.0.0.0:10256".to_owned(),
            "--conntrack-max-per-core=0".to_owned(),
            "--conntrack-tcp-timeout-established=0s".to_owned(),
            "--conntrack-tcp-timeout-close-wait=0s".to_owned(),
            "--v=2".to_owned(),
        ],
    )
}
