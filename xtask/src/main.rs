//! `cargo xtask`: the project's developer commands.
//!
//! - `cargo xtask test`: every test tier (fmt, clippy, unit, fake dataplane, netns, the
//!   benchmark regression check, the IPVS suite in a VM).
//! - `cargo xtask demo`: weir-proxy on a namespace topology with real traffic.
//! - `cargo xtask demo --nodes 3`: three nodes on one machine, weir-cni pods, host-gw routes.
//! - `cargo xtask bench sync`: control-plane numbers at scale.
//! - `cargo xtask bench compare`: weir against upstream-shaped rulesets, CSV/JSON/plots.
//! - `cargo xtask bench datapath`: ClusterIP against pod IP per mode and service count.
//! - `cargo xtask bench check`: a quick compare against the committed baseline, by ratio.
//! - `cargo xtask bench policy`: the NetworkPolicy table at scale (build, render, apply).
//! - `cargo xtask vm-test ipvs`: the IPVS suite inside a qemu guest (Debian's kernel).
//! - `cargo xtask apiserver`: a real kube-apiserver + etcd on loopback (built and cached).
//! - `cargo xtask cluster up | down | test | build`: a real cluster with weir deployed.

mod apiserver;
mod bench;
mod cluster;
mod conformance;
mod demo;
mod image;
mod junit;
mod multinode;
mod terminal;
mod toolchain;
mod vm;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::process::Command;

#[derive(Parser)]
#[command(name = "xtask", about = "weir developer commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every test tier: fmt check, clippy -D warnings, build, unit + fake + netns + API
    /// tests, the cluster tier, the benchmark regression check, then the IPVS suite inside
    /// a qemu guest.
    Test,
    /// The main job on an embedded default: a namespace topology, a Service from YAML,
    /// real traffic through its ClusterIP and NodePort, an endpoint removed, cleanup.
    /// With --nodes N: N nodes on one machine, pods attached by weir-cni, host-gw routes,
    /// traffic across nodes.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// A real kube-apiserver + etcd of the pinned release on loopback until Ctrl-C, built
    /// from the Go module proxy on first use and cached under /var/cache/weir/k8s.
    Apiserver(apiserver::ApiserverArgs),
    /// A real Kubernetes cluster of the pinned release on this machine (control plane on
    /// the host, nodes in namespaces with containerd and kubelet), weir deployed from
    /// deploy/weir.yaml: `up [--nodes N] [--proxy-mode M]`, `down`, `test`, `build`.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Upstream's e2e suite (sig-network, the pinned release's e2e.test) against a 2-node
    /// cluster in one mode (weir's nftables or ebpf, or the real kube-proxy's nftables or
    /// iptables as the baseline); JUnit into target/conformance/<mode>/.
    Conformance(conformance::ConformanceArgs),
    /// Build weir's container image (deploy/Containerfile) with podman and smoke-test it,
    /// with a locally made Debian base (no registry).
    Image(image::ImageArgs),
    /// Boot a qemu guest with Debian's kernel (which has IPVS) and run a suite inside:
    /// `cargo xtask vm-test ipvs`.
    VmTest(vm::VmTestArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Full sync, one endpoint change, nft objects and peak RSS at N services × E endpoints.
    Sync(bench::sync::SyncArgs),
    /// NetworkPolicy: PolicySet::build, render, nft objects, kernel apply, one label change.
    Policy(bench::policy::PolicyArgs),
    /// weir's modes against rulesets in upstream kube-proxy's iptables and nftables
    /// shapes: control plane and data path at 1k/10k/30k services, CSV/JSON/PNG under
    /// docs/bench (about 10 minutes; --quick for one small size).
    Compare(bench::compare::CompareArgs),
    /// weir against the real kube-proxy (the pinned release, nftables and iptables modes),
    /// each fed by one kube-apiserver with the same Services and EndpointSlices: time to
    /// live, endpoint change p50/p99, peak RSS, CPU; api.json/api.csv under docs/bench.
    Api(bench::api::ApiArgs),
    /// weir fed by `--source dir:` with every object in one file: rename to live, one
    /// endpoint change in that file to traffic following (p50/p99), peak RSS; dir.json
    /// under docs/bench.
    Dir(bench::dirsource::DirArgs),
    /// ClusterIP against the same backend pods by pod IP (connect and request p50/p99,
    /// requests per second), per mode and service count, measured interleaved; ratios,
    /// CSV/JSON under docs/bench.
    Datapath(bench::datapath::DatapathArgs),
    /// Repeated same-run ratios (weir against kube-proxy's iptables load, ClusterIP against
    /// pod IP, peak RSS) compared by median with docs/bench/baseline.json; fails only when a
    /// gated ratio regresses beyond --tolerance.
    Check(bench::check::CheckArgs),
}

fn step(title: &str, program: &str, args: &[&str], envs: &[(&str, String)]) -> Result<()> {
    eprintln!("\n==> {title}: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{title} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_owned())
        .unwrap_or_default()
}

fn test() -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let proxy_bin = target.join("debug/weir-proxy").display().to_string();
    toolchain::ensure_ebpf()?;
    toolchain::ensure_test_packages()?;
    step("format", "cargo", &["fmt", "--all", "--", "--check"], &[])?;
    step(
        "clippy",
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // The eBPF programs are not a default member (they build only for the BPF target, as
    // proxy/build.rs does): linted for that target with the nightly, flags as aya-build's.
    step(
        "clippy (eBPF programs, bpfel-unknown-none)",
        "rustup",
        &[
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "weir-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
        &[
            (
                "CARGO_ENCODED_RUSTFLAGS",
                format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
            ),
            (
                "CARGO_TARGET_DIR",
                target.join("bpf-clippy").display().to_string(),
            ),
        ],
    )?;
    step("build", "cargo", &["build", "--workspace", "--bins"], &[])?;
    // The pinned Kubernetes release (API server and cluster tiers): built once from the Go
    // module proxy (about 25 minutes cold), then cached; built here so the tests do not
    // each wait for it.
    eprintln!(
        "\n==> Kubernetes {} for the API server tier (cached after the first build)",
        weir_e2e::k8s::release()
    );
    weir_e2e::k8s::ensure_built()?;
    step(
        "tests (unit, fake dataplane, real kernel in network namespaces)",
        "cargo",
        &["test", "--workspace"],
        &[("WEIR_PROXY_BIN", proxy_bin)],
    )?;
    // The cluster tier: a real cluster of the pinned release with weir deployed from
    // deploy/weir.yaml (two nodes, nftables mode; the mode-switch test also runs eBPF mode
    // under the DaemonSet), torn down afterwards. A cluster that does not come up fails
    // the run with the failing component's log tail.
    // Then upstream's own e2e suite on the same cluster: a smoke of 14 sig-network specs
    // (cargo xtask conformance --smoke); the full runs are `cargo xtask conformance`,
    // committed in docs/conformance.md.
    eprintln!("\n==> cluster tier: cargo xtask cluster test --nodes 2, then the e2e smoke");
    let smoke = |c: &weir_e2e::cluster::Cluster| {
        let mut a = conformance::ConformanceArgs::smoke(root.join("target/conformance/smoke"));
        a.proxy_mode = "nftables".to_owned();
        conformance::run_on(c, &a, &root)
            .map(|_| ())
            .context("the upstream e2e smoke (cargo xtask conformance --smoke)")
    };
    cluster::tier(
        &cluster::UpArgs {
            nodes: 2,
            proxy_mode: "nftables".to_owned(),
        },
        &root,
        Some(&smoke),
    )
    .context("the cluster tier (cargo xtask cluster test; cargo xtask conformance --smoke)")?;
    // The benchmark regression check: the debug binaries just built (no release build),
    // a few minutes; fails only
    // when a gated ratio (ClusterIP ÷ pod IP latency, peak RSS) is more than 25% worse than
    // docs/bench/baseline.json, never on an absolute time (docs/bench/README.md).
    eprintln!("\n==> benchmark regression check: cargo xtask bench check");
    bench::check::check(bench::check::CheckArgs::on_debug_build(), &root)
        .context("the benchmark regression check (cargo xtask bench check)")?;
    // IPVS: the host kernel has none, so the suite runs in a qemu guest (Debian's
    // kernel). A failing suite always fails; a guest that cannot be prepared or booted
    // (no qemu, no network for the kernel package) fails only under CI=true.
    eprintln!("\n==> IPVS suite in a VM: cargo xtask vm-test ipvs");
    if let Err(e) = vm::vm_test(vm::VmTestArgs::ipvs(), &root) {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        if ci || e.downcast_ref::<vm::SuiteFailed>().is_some() {
            return Err(e.context("the IPVS VM tier"));
        }
        eprintln!("warning: skipping the IPVS VM tier (set CI=true to make this fatal): {e:#}");
    }
    eprintln!("\nall test tiers passed");
    Ok(())
}

/// Removes what `cargo run` set for xtask itself (`CARGO_PKG_NAME=xtask`,
/// `CARGO_MANIFEST_DIR`, ...) from the environment the nested cargo commands inherit: build
/// scripts such as ring's declare `rerun-if-env-changed` on them, so the nested builds and
/// the next `cargo xtask` would otherwise rebuild ring, rustls and kube each time (about a
/// minute).
fn clean_cargo_env() {
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let own = k.starts_with("CARGO_PKG_")
            || matches!(
                k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            );
        if own {
            std::env::remove_var(k);
        }
    }
}

fn main() -> Result<()> {
    // Single-threaded here: nothing else reads the environment yet.
    clean_cargo_env();
    match Cli::parse().cmd {
        Cmd::Test => test(),
        Cmd::Demo(a) => {
            toolchain::ensure_ebpf()?;
            demo::demo(&workspace_root(), a)
        }
        Cmd::Bench(BenchCmd::Sync(a)) => bench::sync::sync(a, &workspace_root()),
        Cmd::Bench(BenchCmd::Policy(a)) => bench::policy::policy(a),
        Cmd::Bench(BenchCmd::Compare(a)) => bench::compare::compare(a, &workspace_root()),
        Cmd::Bench(BenchCmd::Api(a)) => bench::api::api(a, &workspace_root()),
        Cmd::Bench(BenchCmd::Dir(a)) => bench::dirsource::dir(a, &workspace_root()),
        Cmd::Bench(BenchCmd::Datapath(a)) => bench::datapath::datapath(a, &workspace_root()),
        Cmd::Bench(BenchCmd::Check(a)) => bench::check::check(a, &workspace_root()),
        Cmd::Apiserver(a) => apiserver::apiserver(a),
        Cmd::Image(a) => image::image(a, &workspace_root()),
        Cmd::Cluster(c) => {
            toolchain::ensure_ebpf()?;
            cluster::cluster(c, &workspace_root())
        }
        Cmd::Conformance(a) => {
            toolchain::ensure_ebpf()?;
            toolchain::ensure_test_packages()?;
            conformance::conformance(a, &workspace_root())
        }
        Cmd::VmTest(a) => vm::vm_test(a, &workspace_root()),
    }
}
