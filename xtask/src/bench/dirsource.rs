//! `cargo xtask bench dir`: weir-proxy fed by `--source dir:` with every object in one
//! manifest file, as an operator generating one file would run it.
//!
//! Per size and mode, in a fresh namespace topology (the node, E backend pods running
//! weir-echo, a client pod), weir-proxy starts, with its own default sync periods, on an
//! empty directory. Then:
//! - time to live: one file of N Services × E endpoints (block-style YAML, as
//!   `kubectl get -o yaml` writes it) is renamed into the directory, timed from the rename
//!   to the last Service answering through its ClusterIP from the client pod;
//! - one endpoint change, `--changes` times, `--change-gap-ms` apart: the file is written
//!   again (to a temporary name, then renamed over it) with the last Service's
//!   EndpointSlice holding one other backend pod, timed from the rename to the first new
//!   connection that pod answers; p50 and p99;
//! - peak RSS (VmHWM) and CPU seconds until live.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use weir_e2e::pod_ip;

use crate::bench::api::quantile;
use crate::bench::report::opt;
use crate::bench::rig::{
    build_release, cpu_seconds, endpoint_ip, loadavg, machine, metric, now_utc, release_dir,
    service_ip, start_weir_with, status_kib, topology, wait_backend, EbpfScratch, Machine, LAST,
};

/// Options of `bench dir`.
#[derive(clap::Args, Debug, Clone)]
pub struct DirArgs {
    /// Service counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    sizes: Vec<usize>,
    /// Proxy modes: nftables, ebpf.
    #[arg(long, value_delimiter = ',', default_value = "nftables,ebpf")]
    modes: Vec<String>,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes timed per mode.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Milliseconds between one change going live and the next: beyond the default 1 s
    /// `--min-sync-period`, so the rate limit does not add to the latency.
    #[arg(long, default_value_t = 1100)]
    change_gap_ms: u64,
    /// Seconds to wait for the file's Services to answer.
    #[arg(long, default_value_t = 120)]
    limit: u64,
    /// Where dir.json goes.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
}

/// One mode at one size.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct DirRow {
    /// Services in the file.
    pub services: usize,
    /// Endpoints per Service.
    pub endpoints: usize,
    /// `weir-nftables` or `weir-ebpf`.
    pub program: String,
    /// `ok`, or what went wrong.
    pub status: String,
    /// The file's size (MB).
    pub file_mb: f64,
    /// Seconds from the file's rename to the last Service answering.
    pub live_s: Option<f64>,
    /// One endpoint change, rename to traffic following: p50 and p99 in ms.
    pub change_p50_ms: Option<f64>,
    /// See `change_p50_ms`.
    pub change_p99_ms: Option<f64>,
    /// Every change's latency in ms.
    pub change_ms: Vec<f64>,
    /// Peak RSS (MiB).
    pub peak_rss_mib: Option<f64>,
    /// CPU seconds from start to live.
    pub cpu_to_live_s: Option<f64>,
}

/// One run of `bench dir`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DirReport {
    /// When it ran (UTC).
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// Load average before and after.
    pub load: (String, String),
    /// Every row.
    pub rows: Vec<DirRow>,
}

/// The one manifest file's name.
const FILE: &str = "cluster.yaml";

/// The manifests of `n` Services × `eps` endpoints in one text, block-style; the last
/// Service's EndpointSlice holds backend pod `pod` alone (all its pods when None).
pub fn one_file(n: usize, eps: usize, pod: Option<usize>) -> String {
    let mut y = String::with_capacity(n * (900 + 130 * eps));
    y.push_str("apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.77.10\n");
    for i in 0..n {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\n  namespace: bench\n  labels:\n    app: s{i}\nspec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs:\n  - {ip}\n  ipFamilies:\n  - IPv4\n  ipFamilyPolicy: SingleStack\n  internalTrafficPolicy: Cluster\n  sessionAffinity: None\n  selector:\n    app: s{i}\n  ports:\n  - name: p\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-a\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: s{i}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\naddressType: IPv4\nports:\n- name: p\n  port: 8080\n  protocol: TCP\nendpoints:\n",
            ip = service_ip(i)
        );
        let addrs: Vec<String> = match pod {
            Some(p) if i + 1 == n => vec![pod_ip(p)],
            _ => (0..eps).map(|e| endpoint_ip(n, i, e)).collect(),
        };
        for a in addrs {
            let _ = write!(
                y,
                "- addresses:\n  - {a}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: node1\n"
            );
        }
    }
    y
}

/// Writes `text` to a temporary name in `dir`, then renames it to the manifest file;
/// returns the moment of the rename.
fn put(dir: &Path, text: &str) -> Result<Instant> {
    let tmp = dir.join(format!(".{FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    let t = Instant::now();
    std::fs::rename(&tmp, dir.join(FILE))?;
    Ok(t)
}

/// Runs `bench dir`.
pub fn dir(args: DirArgs, root: &Path) -> Result<()> {
    build_release(root)?;
    let bin = release_dir(root);
    let logs = root.join("target/bench-dir");
    std::fs::create_dir_all(&logs)?;
    let load_before = loadavg();
    let mut rows = Vec::new();
    for &n in &args.sizes {
        for mode in &args.modes {
            eprintln!("==> {n} Services x {} endpoints, {mode}", args.endpoints);
            let row = measure(&bin, &logs, &args, n, mode).unwrap_or_else(|e| DirRow {
                services: n,
                endpoints: args.endpoints,
                program: format!("weir-{mode}"),
                status: format!("failed: {e:#}"),
                ..DirRow::default()
            });
            eprintln!(
                "    {}: live {} s, change p50/p99 {}/{} ms, peak RSS {} MiB, CPU to live {} s",
                row.status,
                opt(row.live_s, 2),
                opt(row.change_p50_ms, 1),
                opt(row.change_p99_ms, 1),
                opt(row.peak_rss_mib, 1),
                opt(row.cpu_to_live_s, 2)
            );
            rows.push(row);
        }
    }
    let report = DirReport {
        date: now_utc(),
        machine: machine(),
        load: (load_before, loadavg()),
        rows,
    };
    let out = root.join(&args.out);
    std::fs::create_dir_all(&out)?;
    let json = out.join("dir.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    print!("{}", to_markdown(&report));
    eprintln!("==> wrote {}", json.display());
    Ok(())
}

fn measure(bin: &Path, logs: &Path, args: &DirArgs, n: usize, mode: &str) -> Result<DirRow> {
    let eps = args.endpoints;
    let mut row = DirRow {
        services: n,
        endpoints: eps,
        program: format!("weir-{mode}"),
        status: "ok".into(),
        ..DirRow::default()
    };
    let topo = topology(bin, eps)?;
    let scratch = match mode {
        "ebpf" => Some(EbpfScratch::new(&format!("dir{n}"))?),
        _ => None,
    };
    let client = topo.pods.last().context("no client pod")?;
    let cgroup = scratch.as_ref().map(|s| s.cgroup.as_path());
    for pod in 0..eps {
        wait_backend(
            bin,
            client,
            cgroup,
            &format!("{}:8080", pod_ip(pod)),
            &format!("pod-{pod}"),
            Duration::from_secs(10),
        )
        .with_context(|| format!("pod-{pod} by pod IP"))?;
    }
    let work = tempfile::tempdir()?;
    let manifests = work.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    let source = format!("dir:{}", manifests.display());
    let log = logs.join(format!("{mode}-{n}.log"));
    let weir = start_weir_with(
        bin,
        &topo.node,
        mode,
        &["--source", &source],
        scratch.as_ref(),
        &log,
    )?;
    // Up and watching the empty directory: its metrics answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(bin, &topo.node, LAST).is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "weir-proxy did not sync the empty directory; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = one_file(n, eps, None);
    row.file_mb = text.len() as f64 / 1e6;
    let svc = format!("{}:80", service_ip(n - 1));
    let t0 = put(&manifests, &text)?;
    drop(text);
    let limit = Duration::from_secs(args.limit);
    if let Err(e) = wait_backend(bin, client, cgroup, &svc, "-", limit) {
        row.status = format!("not live within {} s: {e:#}", args.limit);
        return Ok(row);
    }
    row.live_s = Some(t0.elapsed().as_secs_f64());
    row.cpu_to_live_s = cpu_seconds(weir.pid);
    // The slice holds one pod at a time: pod 0 first (not timed), then each change moves
    // it to the next pod.
    let follow = |pod: usize| -> Result<Duration> {
        let text = one_file(n, eps, Some(pod));
        let t0 = put(&manifests, &text)?;
        drop(text);
        wait_backend(
            bin,
            client,
            cgroup,
            &svc,
            &format!("pod-{pod}"),
            Duration::from_secs(30),
        )?;
        Ok(t0.elapsed())
    };
    follow(0)?;
    std::thread::sleep(Duration::from_secs(2));
    let mut times = Vec::new();
    for k in 1..=args.changes {
        std::thread::sleep(Duration::from_millis(args.change_gap_ms));
        times.push(follow(k % eps)?.as_secs_f64() * 1000.0);
    }
    row.change_ms = times.clone();
    times.sort_by(f64::total_cmp);
    row.change_p50_ms = quantile(&times, 0.5);
    row.change_p99_ms = quantile(&times, 0.99);
    row.peak_rss_mib = status_kib(weir.pid, "VmHWM:").map(|k| k as f64 / 1024.0);
    drop(weir);
    drop(topo);
    drop(scratch);
    Ok(row)
}

/// The report as a Markdown table.
pub fn to_markdown(r: &DirReport) -> String {
    let mut s = format!(
        "`bench dir`, {} on {} ({} cores), load {} / {}\n\n| Services x endpoints | program | file MB | live s | change p50 ms | change p99 ms | peak RSS MiB | CPU to live s | status |\n|---|---|---|---|---|---|---|---|---|\n",
        r.date, r.machine.cpu, r.machine.cores, r.load.0, r.load.1
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} x {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            row.services,
            row.endpoints,
            row.program,
            row.file_mb,
            opt(row.live_s, 2),
            opt(row.change_p50_ms, 1),
            opt(row.change_p99_ms, 1),
            opt(row.peak_rss_mib, 1),
            opt(row.cpu_to_live_s, 2),
            row.status
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_file_parses_to_every_object_and_moves_the_last_slice() {
        let text = one_file(3, 4, Some(2));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), &text).unwrap();
        let loaded = weir_proxy::source::dir::load_dir(dir.path()).unwrap();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.objects.len(), 7);
        let last = format!("{:?}", loaded.objects.last().unwrap());
        assert!(last.contains("EndpointSlice"), "{last}");
        assert_eq!(last.matches("addresses").count(), 1, "{last}");
        assert!(last.contains(&format!("{:?}", pod_ip(2))), "{last}");
        assert!(text.contains(&service_ip(2)));
    }
}
