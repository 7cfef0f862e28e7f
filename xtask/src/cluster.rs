//! `cargo xtask cluster up | down | test | build`: a real Kubernetes cluster of the pinned
//! release on this machine, with weir deployed into it from deploy/ (see
//! `weir_e2e::cluster`).

use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;
use weir_e2e::cluster::{self, Cluster, UpOptions};
use weir_e2e::k8s;

/// `cargo xtask cluster` subcommands.
#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// Bring a cluster up (removing an earlier one's leftovers first) and deploy weir:
    /// prints `KUBECONFIG=<path>` and one `node <name> <ip>` line per node.
    Up(UpArgs),
    /// Stop every process and remove every namespace, cgroup, route and file it made.
    Down,
    /// Bring a cluster up, run the cluster tier's tests against it, take it down.
    Test(UpArgs),
    /// Only build (or find in the cache) the pinned release's programs.
    Build,
}

/// `cargo xtask cluster up` options.
#[derive(clap::Args, Clone)]
pub struct UpArgs {
    /// Number of nodes (1 to 6; node N is in zone-a, zone-b, zone-c in turn).
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// nftables or ebpf (weir's mode in the ConfigMap), or kube-proxy-nftables /
    /// kube-proxy-iptables (the real kube-proxy serves Services, weir the rest).
    #[arg(long, default_value = "nftables")]
    pub proxy_mode: String,
}

/// Builds weir's image (`cargo xtask image --save`) into target/cluster/.
fn weir_image(root: &Path) -> Result<std::path::PathBuf> {
    let dir = root.join("target/cluster");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("weir-image.tar");
    crate::image::image(
        crate::image::ImageArgs {
            save: Some(path.clone()),
        },
        root,
    )
    .context("building weir's image (cargo xtask image)")?;
    Ok(path)
}

/// Brings the cluster up as `args` says.
pub fn up(args: &UpArgs, root: &Path) -> Result<Cluster> {
    let started = Instant::now();
    let bins = k8s::ensure_built()?;
    eprintln!(
        "cluster: Kubernetes {} from {}",
        k8s::release(),
        bins.dir.display()
    );
    let image = weir_image(root)?;
    let opts = UpOptions {
        nodes: args.nodes,
        proxy_mode: args.proxy_mode.clone(),
        weir_image: image,
        manifest: root.join("deploy/weir.yaml"),
    };
    let up_started = Instant::now();
    let c = Cluster::up(&opts)?;
    eprintln!(
        "cluster: up in {:.0} s ({:.0} s with the builds)",
        up_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(c)
}

/// Runs a subcommand.
pub fn cluster(cmd: ClusterCmd, root: &Path) -> Result<()> {
    match cmd {
        ClusterCmd::Build => {
            let b = k8s::ensure_built()?;
            println!("{}", b.dir.display());
            Ok(())
        }
        ClusterCmd::Down => {
            let removed = cluster::down()?;
            if removed.is_empty() {
                eprintln!("cluster: nothing to remove");
            }
            for r in removed {
                eprintln!("removed {r}");
            }
            Ok(())
        }
        ClusterCmd::Up(args) => {
            let c = up(&args, root)?;
            println!("KUBECONFIG={}", c.kubeconfig().display());
            for n in 1..=c.nodes {
                println!(
                    "node {} {}",
                    cluster::topology::node_name(n),
                    cluster::topology::node_ip(n)
                );
            }
            println!(
                "kubectl: {} (export KUBECONFIG=...; `cargo xtask cluster down` removes it)",
                c.bins.kubectl.display()
            );
            Ok(())
        }
        ClusterCmd::Test(args) => tier(&args, root, None),
    }
}

/// What runs on the cluster after the tier's own tests.
pub type AfterTier<'a> = dyn Fn(&Cluster) -> Result<()> + 'a;

/// The cluster tier: a cluster up, the tier's tests against it, then `after` (the e2e
/// smoke, from `cargo xtask test`) on the same cluster; the cluster goes down whatever the
/// result.
pub fn tier(args: &UpArgs, root: &Path, after: Option<&AfterTier>) -> Result<()> {
    let c = up(args, root)?;
    let mut result = crate::step(
        "cluster tier",
        "cargo",
        &[
            "test",
            "-p",
            "weir-e2e",
            "--test",
            "cluster",
            "--",
            "--ignored",
            "--test-threads=1",
        ],
        &[
            ("WEIR_CLUSTER_NODES", c.nodes.to_string()),
            ("WEIR_CLUSTER_MODE", args.proxy_mode.clone()),
        ],
    );
    if let (Ok(()), Some(after)) = (&result, after) {
        result = after(&c);
    }
    if result.is_err() {
        eprintln!("{}", c.diagnose());
    }
    let down = cluster::down();
    result?;
    down.map(|_| ())
}
