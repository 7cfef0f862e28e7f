//! `cargo xtask bench sync`: weir-proxy's control plane at scale, in a scratch namespace.
//!
//! For each size it writes N Services × E endpoints as manifests, starts a release build
//! of weir-proxy on them, and reports the full-sync time (from weir's own
//! `kubeproxy_sync_full_proxy_rules_duration_seconds`), the time to apply one endpoint
//! change (`..._partial_...`), the number of nftables objects and peak RSS. With
//! `--reference` it also loads a ruleset shaped like upstream kube-proxy's nftables mode
//! (a chain per service and per endpoint, anonymous numgen vmaps) of the same size.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use weir_e2e::Netns;

/// Options of `bench sync`.
#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// Service counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    services: Vec<usize>,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Also load the upstream-shaped reference ruleset for sizes up to --reference-max.
    #[arg(long)]
    reference: bool,
    /// Largest size the reference is loaded at (it grows quadratically: 10000 takes minutes).
    #[arg(long, default_value_t = 1000)]
    reference_max: usize,
}

/// Endpoint removals measured per size.
const CHANGES: usize = 5;

fn service_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn endpoint_ip(i: usize, e: usize) -> String {
    let n = i * 64 + e;
    format!("10.{}.{}.{}", 128 + n / 65536, (n / 256) % 256, n % 256)
}

/// Writes the manifests: one file per 500 services, so one change rewrites a small file.
fn write_manifests(dir: &Path, services: usize, endpoints: usize, changed: &[usize]) -> Result<()> {
    std::fs::write(
        dir.join("node.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.10}]}\n",
    )?;
    for chunk in 0..services.div_ceil(500) {
        if !changed.is_empty() && changed.iter().all(|c| c / 500 != chunk) {
            continue;
        }
        let mut y = String::new();
        for i in chunk * 500..((chunk + 1) * 500).min(services) {
            let np = 30000 + (i % 2768);
            let eps: Vec<String> = (0..endpoints)
                .filter(|e| !changed.contains(&i) || *e != 0)
                .map(|e| {
                    format!(
                        "{{addresses: [\"{}\"], nodeName: node{}}}",
                        endpoint_ip(i, e),
                        e % 3
                    )
                })
                .collect();
            let ty = if i % 10 == 0 {
                format!("NodePort, ports: [{{name: p, port: 80, nodePort: {np}}}]")
            } else {
                "ClusterIP, ports: [{name: p, port: 80}]".into()
            };
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec: {{clusterIP: {}, type: {ty}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{}]\n",
                service_ip(i),
                eps.join(", ")
            );
        }
        let tmp = dir.join(format!(".c{chunk}.tmp"));
        std::fs::write(&tmp, y)?;
        std::fs::rename(&tmp, dir.join(format!("c{chunk:03}.yaml")))?;
    }
    Ok(())
}

fn wait_metric(ns: &Netns, probe: &str, name: &str, above: f64, limit: Duration) -> Result<f64> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(v) = get_metric(ns, probe, name) {
            if v > above {
                return Ok(v);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {name} > {above}")
}

fn get_metric(ns: &Netns, probe: &str, name: &str) -> Option<f64> {
    let out = ns
        .exec(&[probe, "get", "127.0.0.1:10249", "/metrics"])
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The reference ruleset in upstream kube-proxy's nftables shape.
fn reference_ruleset(services: usize, endpoints: usize) -> String {
    let mut s = String::from("table ip kube-proxy {\n");
    s.push_str("  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n");
    s.push_str("  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n");
    for i in 0..services {
        let mut arms = Vec::new();
        for e in 0..endpoints {
            let _ = writeln!(
                s,
                "  chain endpoint-{i}-{e} {{ ip saddr {ip} jump mark-for-masquerade; meta l4proto tcp dnat to {ip}:8080; }}",
                ip = endpoint_ip(i, e)
            );
            arms.push(format!("{e} : goto endpoint-{i}-{e}"));
        }
        let _ = writeln!(
            s,
            "  chain service-{i} {{ ip daddr {} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade; numgen random mod {endpoints} vmap {{ {} }}; }}",
            service_ip(i),
            arms.join(", ")
        );
    }
    s.push_str("  chain mark-for-masquerade { meta mark set meta mark or 0x4000; }\n}\n");
    // Elements after the chains they point to.
    let mut els = Vec::new();
    for i in 0..services {
        els.push(format!("{} . tcp . 80 : goto service-{i}", service_ip(i)));
    }
    for chunk in els.chunks(4096) {
        let _ = writeln!(
            s,
            "add element ip kube-proxy service-ips {{ {} }}",
            chunk.join(", ")
        );
    }
    s
}

/// Runs `bench sync`.
pub fn sync(args: SyncArgs, root: &Path) -> Result<()> {
    crate::bench::rig::build_release(root)?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let proxy = target.join("release/weir-proxy").display().to_string();
    let probe = target.join("release/weir-probe").display().to_string();
    println!(
        "{:>9} {:>9} {:>14} {:>16} {:>12} {:>13} {:>16}",
        "services",
        "endpoints",
        "full sync (s)",
        "1 change (ms)",
        "nft objects",
        "peak RSS MiB",
        "reference (s)"
    );
    for &n in &args.services {
        let mut ns = Netns::new("bench").context("creating a scratch namespace (needs root)")?;
        let dir = std::env::temp_dir().join(format!("weir-bench-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        write_manifests(&dir, n, args.endpoints, &[])?;
        let source = format!("dir:{}", dir.display());
        let pid = ns
            .spawn(
                &[
                    &proxy,
                    "--source",
                    &source,
                    "--hostname-override",
                    "node1",
                    "--cluster-cidr",
                    "10.244.0.0/16",
                    // kube-proxy's default: a change waits for a burst to settle.
                    "--min-sync-period",
                    "1s",
                    "--sync-period",
                    "1h",
                ],
                Stdio::null(),
            )?
            .id();
        let full = wait_metric(
            &ns,
            &probe,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}",
            0.0,
            Duration::from_secs(300),
        )?;
        let objects = get_metric(&ns, &probe, "weir_nftables_objects").unwrap_or(0.0);
        let last = get_metric(
            &ns,
            &probe,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        )
        .unwrap_or(0.0);
        // One endpoint of one service removed, five times (services spread over files);
        // the mean partial sync is reported.
        let mut last = last;
        let mut removed = Vec::new();
        for k in 0..CHANGES {
            removed.push((n / 2 + k * 97) % n);
            write_manifests(&dir, n, args.endpoints, &removed)?;
            last = wait_metric(
                &ns,
                &probe,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
                last,
                Duration::from_secs(60),
            )?;
        }
        let metric = |name| get_metric(&ns, &probe, name).unwrap_or(f64::NAN);
        let partial =
            metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}")
                / metric(
                    "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
                );
        let mib = |field| {
            status_kib(pid, field)
                .map(|k| k as f64 / 1024.0)
                .unwrap_or(f64::NAN)
        };
        let rss = mib("VmHWM:");
        eprintln!("   (resident after the change: {:.1} MiB)", mib("VmRSS:"));
        ns.stop(pid);
        let _ = std::fs::remove_dir_all(&dir);
        let reference = if args.reference && n <= args.reference_max {
            let rs = reference_ruleset(n, args.endpoints);
            let file =
                std::env::temp_dir().join(format!("weir-bench-ref-{}.nft", std::process::id()));
            std::fs::write(&file, rs)?;
            let ref_ns = Netns::new("ref")?;
            let t = Instant::now();
            ref_ns.exec(&["nft", "-f", &file.display().to_string()])?;
            let took = t.elapsed().as_secs_f64();
            let _ = std::fs::remove_file(&file);
            format!("{took:.2} ({:.0}x)", took / full)
        } else {
            "-".into()
        };
        println!(
            "{n:>9} {:>9} {full:>14.3} {:>16.1} {objects:>12} {rss:>13.1} {reference:>16}",
            args.endpoints,
            partial * 1000.0
        );
        drop(ns);
    }
    Ok(())
}
