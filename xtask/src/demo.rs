//! `cargo xtask demo`: the main job on an embedded default, no cluster needed.
//! `cargo xtask demo --nodes N`: N nodes on one machine with weir-cni pods, host-gw routes,
//! a ClusterIP, a NodePort and an `externalTrafficPolicy: Local` NodePort across them.

use crate::terminal::{say, share_table_for};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use weir_e2e::{
    last_sync, probe, service_yaml, start_proxy, wait_synced, workspace_bin, write_manifests,
    Topology,
};

const METRICS: u16 = 10249;
const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];

/// Installs the Debian packages the demo needs, showing apt's progress.
fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = ["nftables", "iproute2", "conntrack", "procps"]
        .into_iter()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        say("packages: nftables, iproute2, conntrack, procps present");
        return Ok(());
    }
    say(&format!("installing {}", missing.join(" ")));
    let install = |list: &[&str]| {
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(list)
            .status()
    };
    if !install(&missing)?.success() {
        Command::new("apt-get").arg("update").status()?;
        if !install(&missing)?.success() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    Ok(())
}

/// `cargo xtask demo` options.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Run N nodes on one machine (node namespaces on a bridge, each with weir-proxy
    /// and weir-cni pods) instead of the single-node demo.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=20))]
    nodes: Option<u16>,
}

fn share_table(title: &str, report: &Value) {
    share_table_for(title, report, &PODS);
}

fn http_get(topo: &Topology, path: &str) -> Result<String> {
    let probe_bin = workspace_bin("weir-probe");
    let out = topo.node.exec(&[
        &probe_bin.to_string_lossy(),
        "get",
        &format!("127.0.0.1:{METRICS}"),
        path,
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the demo.
pub fn demo(root: &Path, args: DemoArgs) -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the demo's network namespaces");
        remove_own_namespaces();
        std::process::exit(130);
    })?;
    ensure_packages()?;
    // weir-proxy inherits this: keep its log to warnings so the demo's output stays readable.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let result = match args.nodes {
        None => {
            say("building weir-proxy and the test tools");
            let st = Command::new("cargo")
                .current_dir(root)
                .args(["build", "-p", "weir-proxy", "-p", "weir-e2e", "--bins"])
                .status()?;
            if !st.success() {
                bail!("cargo build failed");
            }
            run_demo()
        }
        Some(nodes) => {
            say("building weir-proxy, weir-cni and the test tools");
            let st = Command::new("cargo")
                .current_dir(root)
                .args([
                    "build",
                    "-p",
                    "weir-proxy",
                    "-p",
                    "weir-cni",
                    "-p",
                    "weir-e2e",
                    "--bins",
                ])
                .status()?;
            if !st.success() {
                bail!("cargo build failed");
            }
            crate::multinode::run(usize::from(nodes))
        }
    };
    // Guards have removed namespaces and processes by now, also after an error.
    remove_own_namespaces();
    result
}

fn remove_own_namespaces() {
    let prefix = format!("weir-{}-", std::process::id());
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(&prefix))
            {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

fn run_demo() -> Result<()> {
    say("creating namespaces: node, 3 pods on routed veths (10.244.1.10-12), client 198.51.100.2");
    let mut topo = Topology::new(3).context("building the topology (run as root)")?;
    let echo = workspace_bin("weir-echo");
    for (i, name) in PODS.iter().enumerate() {
        topo.start_echo(i, &echo, name)?;
    }
    let dir = tempfile::tempdir()?;
    let web =
        |pods: &[usize]| service_yaml("web", "10.96.0.10", "TCP", 80, Some(30080), 8080, pods);
    write_manifests(dir.path(), &web(&[0, 1, 2]))?;
    say(&format!(
        "manifests in {}: Service demo/web 10.96.0.10:80 -> 8080, NodePort 30080, 3 endpoints",
        dir.path().display()
    ));
    say("starting weir-proxy --proxy-mode nftables --source dir:... in the node namespace");
    let pid = start_proxy(&mut topo.node, dir.path(), METRICS)?;

    let r = probe(&topo.node, &["tcp", "10.96.0.10:80", "300"])?;
    share_table("300 requests node -> ClusterIP 10.96.0.10:80", &r);
    let r = probe(&topo.client, &["tcp", "192.168.77.10:30080", "300"])?;
    share_table("300 requests client -> NodePort 192.168.77.10:30080", &r);

    println!("\n  GET /proxyMode -> {:?}", http_get(&topo, "/proxyMode")?);
    println!("  GET /metrics (excerpt):");
    let metrics = http_get(&topo, "/metrics")?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_count")
            || l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_sum")
            || l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
            || l.starts_with("kubeproxy_sync_proxy_rules_endpoint_changes_total")
            || l.starts_with("weir_nftables_objects")
    }) {
        println!("    {line}");
    }

    say("removing pod-c from the EndpointSlice");
    let before = last_sync(&topo.node, METRICS).unwrap_or(0.0);
    write_manifests(dir.path(), &web(&[0, 1]))?;
    wait_synced(&topo.node, METRICS, before)?;
    let r = probe(&topo.node, &["tcp", "10.96.0.10:80", "300"])?;
    share_table("300 requests node -> ClusterIP after the change", &r);
    if r["answers"]["pod-c"].as_u64().unwrap_or(0) != 0 {
        bail!("pod-c still received traffic after it was removed");
    }

    say("cleaning up: weir-proxy --cleanup, namespaces removed");
    topo.node.stop(pid);
    let bin = workspace_bin("weir-proxy");
    topo.node.exec(&[&bin.to_string_lossy(), "--cleanup"])?;
    drop(topo);
    say("done");
    Ok(())
}
