//! `cargo xtask`: the project's developer commands.
//!
//! - `cargo xtask test`: every test tier (fmt, clippy, unit, fake dataplane, netns).
//! - `cargo xtask demo`: weir-proxy on a namespace topology with real traffic.
//! - `cargo xtask demo --nodes 3`: three nodes on one machine, weir-cni pods, host-gw routes.
//! - `cargo xtask bench sync`: control-plane numbers at scale.
//! - `cargo xtask bench compare`: weir against upstream-shaped rulesets, CSV/JSON/plots.
//! - `cargo xtask bench check`: a quick compare against the committed baseline, by ratio.
//! - `cargo xtask bench policy`: the NetworkPolicy table at scale (build, render, apply).
//! - `cargo xtask vm-test ipvs`: the IPVS suite inside a qemu guest (Debian's kernel).
//! - `cargo xtask apiserver`: a real kube-apiserver + etcd on loopback (built and cached).

mod apiserver;
mod bench;
mod bench_compare;
mod bench_plot;
mod bench_policy;
mod demo;
mod image;
mod multinode;
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
    /// Run every test tier: fmt check, clippy -D warnings, build, unit + fake + netns tests.
    Test,
    /// The main job on an embedded default: a namespace topology, a Service from YAML,
    /// real traffic through its ClusterIP and NodePort, an endpoint removed, cleanup.
    /// With --nodes N: N nodes on one machine, pods attached by weir-cni, host-gw routes,
    /// traffic across nodes.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// A real kube-apiserver 1.20 + etcd on loopback until Ctrl-C, built from Debian's
    /// packages on first use and cached under /var/cache/weir/apiserver.
    Apiserver(apiserver::ApiserverArgs),
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
    Sync(bench::SyncArgs),
    /// NetworkPolicy: PolicySet::build, render, nft objects, kernel apply, one label change.
    Policy(bench_policy::PolicyArgs),
    /// weir's modes against rulesets in upstream kube-proxy's iptables and nftables
    /// shapes: control plane and data path at 1k/10k/30k services, CSV/JSON/PNG under
    /// docs/bench (about 10 minutes; --quick for one small size).
    Compare(bench_compare::CompareArgs),
    /// A quick compare checked against docs/bench/baseline.json by ratio (weir against the
    /// references of the same run); fails only on a regression above --tolerance.
    Check(bench_compare::CheckArgs),
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
    step("build", "cargo", &["build", "--workspace", "--bins"], &[])?;
    // The API server tier's binaries: built once from Debian's packages (minutes), then
    // cached; built here so the tests do not each wait for it.
    eprintln!("\n==> kube-apiserver for the API server tier (cached after the first build)");
    weir_e2e::apiserver::ensure_built()?;
    step(
        "tests (unit, fake dataplane, real kernel in network namespaces)",
        "cargo",
        &["test", "--workspace"],
        &[("WEIR_PROXY_BIN", proxy_bin)],
    )?;
    eprintln!("\nall test tiers passed");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test => test(),
        Cmd::Demo(a) => {
            toolchain::ensure_ebpf()?;
            demo::demo(&workspace_root(), a)
        }
        Cmd::Bench(BenchCmd::Sync(a)) => bench::sync(a, &workspace_root()),
        Cmd::Bench(BenchCmd::Policy(a)) => bench_policy::policy(a),
        Cmd::Bench(BenchCmd::Compare(a)) => bench_compare::compare(a, &workspace_root()),
        Cmd::Bench(BenchCmd::Check(a)) => bench_compare::check(a, &workspace_root()),
        Cmd::Apiserver(a) => apiserver::apiserver(a),
        Cmd::Image(a) => image::image(a, &workspace_root()),
        Cmd::VmTest(a) => vm::vm_test(a, &workspace_root()),
    }
}
