//! `cargo xtask bench api`: weir against the real kube-proxy (the pinned Kubernetes
//! release's binary, in its nftables and iptables modes), each fed by the same
//! kube-apiserver holding the same Services and EndpointSlices, created through the API.
//!
//! For each size, one kube-apiserver (with etcd) is started and N Services × E endpoints
//! are created in it (`kubectl create`, in parallel chunks); every program then runs in
//! turn in a fresh namespace topology (the node, E backend pods running weir-echo, a
//! client pod), reaching the API server through a forwarder on the node's loopback. Per
//! program:
//! - time to live: from the process' start (every object already written) to the
//!   last-created Service answering through its ClusterIP from the client pod;
//! - one endpoint change, `--changes` times, `--change-gap-ms` apart (beyond the programs'
//!   1 s minimum sync period): the last Service's EndpointSlice is patched to hold one
//!   other backend pod (with the `last-change-trigger-time` annotation the
//!   EndpointSlice controller would set), timed from just before the PATCH to the first
//!   new connection answered by that pod; p50 and p99, and the program's own
//!   `kubeproxy_network_programming_duration_seconds` p50/p99 (bucket bounds);
//! - peak RSS (VmHWM) and CPU seconds until live, and the CPU share of a core over
//!   `--idle-secs` of idling afterwards;
//! - the data path, after the idling: `weir-load` from the client pod alternating between
//!   the last Service's ClusterIP and the one pod its slice then holds, addressed by pod
//!   IP, so both see the same moment of the machine: connect and request p50/p99, and
//!   requests per second of each.
//!
//! Every program runs with its own defaults for sync periods, as operators run them.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weir_e2e::apiserver::{ApiServer, ApiServerOptions};
use weir_e2e::forward::Forwarder;
use weir_e2e::prom::histogram_quantile;
use weir_e2e::{pod_ip, Netns, Topology};

use crate::bench::report::{opt, traffic_csv};
use crate::bench::rig::{
    build_release, cpu_seconds, load, loadavg, machine, now_utc, release_dir, service_ip,
    start_weir_with, status_kib, topology, wait_backend, write_manifests, EbpfScratch, LoadSpec,
    Machine, Proc, Traffic,
};

/// Options of `bench api`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Service counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    sizes: Vec<usize>,
    /// Programs to run: weir-nftables, weir-ebpf, kube-proxy-nftables, kube-proxy-iptables.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "weir-nftables,weir-ebpf,kube-proxy-nftables,kube-proxy-iptables"
    )]
    programs: Vec<String>,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes timed per program.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Milliseconds between one change going live and the next PATCH: beyond both programs'
    /// default 1 s `--min-sync-period`, so the rate limit does not add to the latency.
    #[arg(long, default_value_t = 1100)]
    change_gap_ms: u64,
    /// Seconds of idling over which the idle CPU is measured.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Seconds the API server and etcd are left to settle after the objects are created
    /// (compaction, the watch cache), so the first program measured is not the only one
    /// listing from a server still busy.
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
    /// Sequential connections per target in the data-path measurement.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Milliseconds of the data path's throughput phase per target.
    #[arg(long, default_value_t = 1500)]
    rps_millis: u64,
    /// A program not live after this many seconds is stopped and reported as such.
    #[arg(long, default_value_t = 300)]
    limit: u64,
    /// Where api.json, api.csv and api-control-plane.png go.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Measure nothing: re-write api.csv and the plot from the api.json under --out and
    /// print its table.
    #[arg(long)]
    replot: bool,
}

/// One program at one size.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ApiRow {
    /// Services created.
    pub services: usize,
    /// Endpoints per Service.
    pub endpoints: usize,
    /// The program, with its version for kube-proxy.
    pub program: String,
    /// `ok`, or what went wrong.
    pub status: String,
    /// Seconds from start to the last Service answering.
    pub live_s: Option<f64>,
    /// One endpoint change, PATCH to traffic following: p50 and p99 in ms.
    pub change_p50_ms: Option<f64>,
    /// See `change_p50_ms`.
    pub change_p99_ms: Option<f64>,
    /// Changes timed.
    pub changes: usize,
    /// Every change's latency in ms, in the order they were made.
    #[serde(default)]
    pub change_ms: Vec<f64>,
    /// How long each change's PATCH took to return (ms), the API server's part of it.
    #[serde(default)]
    pub patch_ms: Vec<f64>,
    /// The program's own network-programming histogram: bucket bounds of p50 and p99 (s).
    pub programming_p50_le_s: Option<f64>,
    /// See `programming_p50_le_s`.
    pub programming_p99_le_s: Option<f64>,
    /// Peak RSS (MiB).
    pub peak_rss_mib: Option<f64>,
    /// CPU seconds from start to live.
    pub cpu_to_live_s: Option<f64>,
    /// CPU share of one core while idle (percent).
    pub idle_cpu_pct: Option<f64>,
    /// The data path through the last Service's ClusterIP, from the client pod.
    #[serde(default)]
    pub clusterip: Option<Traffic>,
    /// The same backend pod by pod IP, in the same `weir-load` run.
    #[serde(default)]
    pub pod_ip: Option<Traffic>,
}

/// One run of `bench api`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ApiReport {
    /// When it ran (UTC).
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// Load average before and after.
    pub load: (String, String),
    /// The Kubernetes release of kube-apiserver and kube-proxy.
    pub kubernetes: String,
    /// Every row.
    pub rows: Vec<ApiRow>,
}

/// The objects' namespace.
const NAMESPACE: &str = "bench";

/// Runs `bench api`.
pub fn api(args: ApiArgs, root: &Path) -> Result<()> {
    if args.replot {
        return replot(&root.join(&args.out));
    }
    for p in &args.programs {
        if !PROGRAMS.contains(&p.as_str()) {
            bail!(
                "--programs: unknown program {p:?} (one of {})",
                PROGRAMS.join(", ")
            );
        }
    }
    build_release(root)?;
    let bin = release_dir(root);
    let bins = weir_e2e::k8s::ensure_built().context("building the pinned Kubernetes release")?;
    let release = weir_e2e::k8s::release().to_owned();
    let work = tempfile::tempdir()?;
    // The programs' logs outlive the run, for a row that failed.
    let logs = root.join("target/bench-api");
    std::fs::create_dir_all(&logs)?;
    let load_before = loadavg();
    let mut rows = Vec::new();
    for &n in &args.sizes {
        eprintln!("==> {n} Services x {} endpoints", args.endpoints);
        let api = ApiServer::start(ApiServerOptions::default())?;
        let t = Instant::now();
        create_objects(&api, work.path(), n, args.endpoints)?;
        eprintln!(
            "    created {} objects through the API in {:.1} s",
            2 * n + 1,
            t.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(args.settle_secs));
        for program in &args.programs {
            eprintln!("    {program}");
            let ctx = Run {
                bin: &bin,
                kube_proxy: &bins.kube_proxy,
                release: &release,
                api: &api,
                logs: &logs,
                args: &args,
                n,
            };
            let row = ctx.measure(program).unwrap_or_else(|e| ApiRow {
                services: n,
                endpoints: args.endpoints,
                program: ctx.label(program),
                status: format!("failed: {e:#}"),
                ..ApiRow::default()
            });
            eprintln!("      {}", summary(&row));
            rows.push(row);
        }
    }
    let report = ApiReport {
        date: now_utc(),
        machine: machine(),
        load: (load_before, loadavg()),
        kubernetes: release,
        rows,
    };
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("api.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    write_outputs(&report, &args.out)?;
    eprintln!(
        "==> wrote {}, api.csv and api-control-plane.png",
        json.display()
    );
    Ok(())
}

/// Re-writes api.csv and api-control-plane.png from the api.json under `out`.
pub fn replot(out: &Path) -> Result<()> {
    let json = out.join("api.json");
    let report: ApiReport = serde_json::from_str(
        &std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("parsing {}", json.display()))?;
    write_outputs(&report, out)
}

/// Writes api.csv and api-control-plane.png of `report` into `out` and prints its table.
fn write_outputs(report: &ApiReport, out: &Path) -> Result<()> {
    std::fs::write(out.join("api.csv"), to_csv(report))?;
    crate::bench::plot::api_plots(&as_plot_report(report), out)?;
    println!("{}", to_markdown(report));
    Ok(())
}

/// The run in the plots' terms: one row per program and size (mode `kube-proxy-<mode>`
/// for the real kube-proxy, whose release goes into the caption), live time as the
/// full-sync value, change p99 as the change value.
fn as_plot_report(r: &ApiReport) -> crate::bench::report::Report {
    let key = |program: &str| match program.rsplit_once(' ') {
        Some((p, mode)) if p.starts_with("kube-proxy") => format!("kube-proxy-{mode}"),
        _ => program.to_owned(),
    };
    crate::bench::report::Report {
        date: format!("{} (Kubernetes {})", r.date, r.kubernetes),
        machine: r.machine.clone(),
        load_before: r.load.0.clone(),
        load_after: r.load.1.clone(),
        rows: r
            .rows
            .iter()
            .map(|x| crate::bench::report::Row {
                services: x.services,
                endpoints: x.endpoints,
                mode: key(&x.program),
                // A program not live is drawn as cut off at the limit.
                status: if x.live_s.is_some() {
                    "ok".into()
                } else {
                    "> limit".into()
                },
                full_sync_s: x.live_s,
                change_ms: x.change_p99_ms,
                peak_rss_mib: x.peak_rss_mib,
                cpu_s: x.cpu_to_live_s,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The programs `--programs` may name (also the plot's lines).
pub(crate) const PROGRAMS: [&str; 4] = [
    "weir-nftables",
    "weir-ebpf",
    "kube-proxy-nftables",
    "kube-proxy-iptables",
];

/// Creates the namespace, the node and N Services with their EndpointSlices, four
/// `kubectl create` at a time (one per file of 500 Services).
fn create_objects(api: &ApiServer, work: &Path, n: usize, eps: usize) -> Result<()> {
    let dir = work.join(format!("objects-{n}"));
    std::fs::create_dir_all(&dir)?;
    write_manifests(&dir, n, eps, &[], false)?;
    api.kubectl(&["create", "namespace", NAMESPACE])?;
    api.kubectl(&["create", "-f", &dir.join("node.yaml").display().to_string()])?;
    let files: Vec<PathBuf> = (0..n.div_ceil(500))
        .map(|c| dir.join(format!("c{c:03}.yaml")))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(f) = files.get(i) else {
                            return Ok(());
                        };
                        api.kubectl(&["create", "-f", &f.display().to_string()])
                            .with_context(|| format!("creating {}", f.display()))?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a creating thread panicked"))??;
        }
        Ok(())
    })
}

/// A row's name: kube-proxy's carry the release (`kube-proxy v1.37.2 nftables`).
fn label(program: &str, release: &str) -> String {
    match program.strip_prefix("kube-proxy-") {
        Some(mode) => format!("kube-proxy {release} {mode}"),
        None => program.to_owned(),
    }
}

/// What one program's measurement needs.
struct Run<'a> {
    bin: &'a Path,
    kube_proxy: &'a Path,
    release: &'a str,
    api: &'a ApiServer,
    logs: &'a Path,
    args: &'a ApiArgs,
    n: usize,
}

impl Run<'_> {
    fn label(&self, program: &str) -> String {
        label(program, self.release)
    }

    fn measure(&self, program: &str) -> Result<ApiRow> {
        let eps = self.args.endpoints;
        let n = self.n;
        let mut row = ApiRow {
            services: n,
            endpoints: eps,
            program: self.label(program),
            status: "ok".into(),
            ..ApiRow::default()
        };
        let topo = topology(self.bin, eps)?;
        let target: SocketAddr = format!("127.0.0.1:{}", self.api.port()).parse()?;
        let _fwd = Forwarder::start(topo.node.name(), self.api.port(), target)?;
        let scratch = match program {
            "weir-ebpf" => Some(EbpfScratch::new(&format!("api{n}"))?),
            _ => None,
        };
        let client = topo.pods.last().context("no client pod")?;
        let cgroup = scratch.as_ref().map(|s| s.cgroup.as_path());
        // Every backend pod answers once by pod IP before the program starts: a pod's
        // first connection also pays the topology's neighbour resolution, which is no
        // proxy's latency (without this, the first change to each pod was 0.2-0.8 s for
        // every program alike).
        for pod in 0..eps {
            wait_backend(
                self.bin,
                client,
                cgroup,
                &format!("{}:8080", pod_ip(pod)),
                &format!("pod-{pod}"),
                Duration::from_secs(10),
            )
            .with_context(|| format!("pod-{pod} by pod IP"))?;
        }
        let log = self.logs.join(format!("{program}-{n}.log"));
        let (child, pid, started) = self.start(program, &topo, scratch.as_ref(), &log)?;
        let svc = format!("{}:80", service_ip(n - 1));
        let limit = Duration::from_secs(self.args.limit);
        if let Err(e) = wait_backend(self.bin, client, cgroup, &svc, "-", limit) {
            row.status = format!("not live within {} s: {e:#}", self.args.limit);
            return Ok(row);
        }
        row.live_s = Some(started.elapsed().as_secs_f64());
        row.cpu_to_live_s = cpu_seconds(pid);
        // The slice holds one pod at a time: pod 0 first (not timed), then each change
        // moves it to the next pod, so the first connection that pod answers is the
        // change taking effect.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let slices = rt.block_on(slices_api(self.api))?;
        let slice = format!("s{}-a", n - 1);
        let follow = |pod: usize| -> Result<(Duration, Duration)> {
            let t0 = Instant::now();
            rt.block_on(move_slice(&slices, &slice, pod))?;
            let patched = t0.elapsed();
            wait_backend(
                self.bin,
                client,
                cgroup,
                &svc,
                &format!("pod-{pod}"),
                Duration::from_secs(30),
            )?;
            Ok((t0.elapsed(), patched))
        };
        follow(0)?;
        // Pod 0 was among the slice's first endpoints, so it may have answered before the
        // program synced the move: wait out that sync and its --min-sync-period window, or
        // the first timed change would wait in it.
        std::thread::sleep(Duration::from_secs(2));
        let mut times: Vec<f64> = Vec::new();
        for k in 1..=self.args.changes {
            std::thread::sleep(Duration::from_millis(self.args.change_gap_ms));
            let (took, patched) = follow(k % eps)?;
            times.push(took.as_secs_f64() * 1000.0);
            row.patch_ms.push(patched.as_secs_f64() * 1000.0);
        }
        row.change_ms = times.clone();
        times.sort_by(f64::total_cmp);
        row.changes = times.len();
        row.change_p50_ms = quantile(&times, 0.5);
        row.change_p99_ms = quantile(&times, 0.99);
        let text = metrics_text(self.bin, &topo.node).unwrap_or_default();
        let name = "kubeproxy_network_programming_duration_seconds";
        row.programming_p50_le_s = histogram_quantile(&text, name, 0.5).map(|q| q.0);
        row.programming_p99_le_s = histogram_quantile(&text, name, 0.99).map(|q| q.0);
        // The process' own counter (10 ms ticks) keeps the time of threads that exited.
        let cpu0 = cpu_seconds(pid);
        std::thread::sleep(Duration::from_secs(self.args.idle_secs));
        let cpu1 = cpu_seconds(pid);
        row.idle_cpu_pct = match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) / self.args.idle_secs as f64 * 100.0),
            _ => None,
        };
        // The slice now holds pod `changes % eps` alone: the ClusterIP and that pod's IP,
        // connections alternating between them.
        let pod = format!("{}:8080", pod_ip(self.args.changes % eps));
        let spec = LoadSpec {
            requests: self.args.requests,
            concurrency: 4,
            millis: self.args.rps_millis,
        };
        match load(
            self.bin,
            client,
            cgroup,
            &[svc.as_str(), pod.as_str()],
            spec,
        ) {
            Ok(t) => {
                let mut t = t.into_iter();
                row.clusterip = t.next();
                row.pod_ip = t.next();
            }
            Err(e) => row.status = format!("data path failed: {e:#}"),
        }
        row.peak_rss_mib = status_kib(pid, "VmHWM:").map(|k| k as f64 / 1024.0);
        drop(child);
        drop(topo);
        drop(scratch);
        Ok(row)
    }

    /// Starts `program` on the topology's node, reading the API server through the
    /// forwarder; returns the process, its PID and when it started.
    fn start(
        &self,
        program: &str,
        topo: &Topology,
        scratch: Option<&EbpfScratch>,
        log: &Path,
    ) -> Result<(Proc, u32, Instant)> {
        let kc = self.api.kubeconfig_path().display().to_string();
        if let Some(mode) = program.strip_prefix("weir-") {
            let w = start_weir_with(
                self.bin,
                &topo.node,
                mode,
                &["--kubeconfig", &kc],
                scratch,
                log,
            )?;
            return Ok((w.child, w.pid, w.started));
        }
        let mode = program
            .strip_prefix("kube-proxy-")
            .context("unknown program")?;
        let started = Instant::now();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topo.node.name()))
            .arg(self.kube_proxy)
            .args([
                format!("--kubeconfig={kc}"),
                "--hostname-override=node1".to_owned(),
                format!("--proxy-mode={mode}"),
                "--cluster-cidr=10.244.0.0/16".to_owned(),
                "--metrics-bind-address=127.0.0.1:10249".to_owned(),
                "--healthz-bind-address=127.0.0.1:10256".to_owned(),
                // The conntrack table's size and timeouts are global sysctls: left alone.
                "--conntrack-max-per-core=0".to_owned(),
                "--conntrack-tcp-timeout-established=0s".to_owned(),
                "--conntrack-tcp-timeout-close-wait=0s".to_owned(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.kube_proxy.display()))?;
        let pid = child.id();
        Ok((Proc(child), pid, started))
    }
}

/// The EndpointSlices of the objects' namespace, through the API server's kubeconfig.
async fn slices_api(
    api: &ApiServer,
) -> Result<kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice>> {
    let kc = kube::config::Kubeconfig::read_from(api.kubeconfig_path())?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Api::namespaced(
        kube::Client::try_from(cfg)?,
        NAMESPACE,
    ))
}

/// Makes `slice` hold backend pod `pod` alone, stamped with the trigger time the
/// EndpointSlice controller would set (the programs' network-programming metric reads it).
async fn move_slice(
    slices: &kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice>,
    slice: &str,
    pod: usize,
) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({
        "metadata": {"annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now}},
        "endpoints": [{"addresses": [pod_ip(pod)], "nodeName": "node1", "conditions": {"ready": true}}],
    });
    slices
        .patch(
            slice,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("patching EndpointSlice {NAMESPACE}/{slice}"))?;
    Ok(())
}

/// The `/metrics` text of the program on the node (127.0.0.1:10249).
fn metrics_text(bin: &Path, node: &Netns) -> Option<String> {
    let probe = bin.join("weir-probe").display().to_string();
    let out = node
        .exec(&[&probe, "get", "127.0.0.1:10249", "/metrics"])
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The p-quantile of sorted `v` (nearest rank).
pub fn quantile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied()
}

fn summary(r: &ApiRow) -> String {
    format!(
        "{}: live {} s, change p50 {} / p99 {} ms, peak RSS {} MiB, idle CPU {} %",
        r.status,
        opt(r.live_s, 2),
        opt(r.change_p50_ms, 1),
        opt(r.change_p99_ms, 1),
        opt(r.peak_rss_mib, 1),
        opt(r.idle_cpu_pct, 2)
    )
}

const COLUMNS: &str = "services,endpoints,program,status,live_s,change_p50_ms,change_p99_ms,changes,programming_p50_le_s,programming_p99_le_s,peak_rss_mib,cpu_to_live_s,idle_cpu_pct,clusterip_connect_p50_us,clusterip_connect_p99_us,clusterip_p50_us,clusterip_p99_us,clusterip_rps,podip_connect_p50_us,podip_connect_p99_us,podip_p50_us,podip_p99_us,podip_rps";

/// Request p50 through the ClusterIP over the same by pod IP.
fn clusterip_over_pod_ip(r: &ApiRow) -> Option<f64> {
    match (&r.clusterip, &r.pod_ip) {
        (Some(c), Some(p)) if p.p50_us > 0.0 => Some(c.p50_us / p.p50_us),
        _ => None,
    }
}

/// The rows as CSV, after a comment line naming the machine, date and load.
pub fn to_csv(r: &ApiReport) -> String {
    let mut s = format!(
        "# {} UTC, {} ({} cores), kernel {}, Kubernetes {}, load {} -> {}\n{COLUMNS}\n",
        r.date, r.machine.cpu, r.machine.cores, r.machine.kernel, r.kubernetes, r.load.0, r.load.1
    );
    for x in &r.rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            x.services,
            x.endpoints,
            x.program,
            x.status.replace(',', ";"),
            opt(x.live_s, 3),
            opt(x.change_p50_ms, 2),
            opt(x.change_p99_ms, 2),
            x.changes,
            opt(x.programming_p50_le_s, 3),
            opt(x.programming_p99_le_s, 3),
            opt(x.peak_rss_mib, 1),
            opt(x.cpu_to_live_s, 2),
            opt(x.idle_cpu_pct, 2),
            traffic_csv(&x.clusterip),
            traffic_csv(&x.pod_ip)
        );
    }
    s
}

/// The rows as a Markdown table (for docs/performance.md).
pub fn to_markdown(r: &ApiReport) -> String {
    let mut s = format!(
        "{} UTC, {} ({} cores), kernel {}, Kubernetes {}, load {} -> {}\n\n\
         | Services | program | live (s) | change p50 / p99 (ms) | programming p50 / p99 (s, bucket) | peak RSS (MiB) | CPU to live (s) | idle CPU (%) | request p50 / p99, ClusterIP (µs) | same pod by pod IP (µs) | ClusterIP / pod IP p50 |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        r.date, r.machine.cpu, r.machine.cores, r.machine.kernel, r.kubernetes, r.load.0, r.load.1
    );
    for x in &r.rows {
        let status = if x.status == "ok" {
            String::new()
        } else {
            format!(" ({})", x.status)
        };
        let _ = writeln!(
            s,
            "| {} | {}{status} | {} | {} / {} | {} / {} | {} | {} | {} | {} | {} | {} |",
            x.services,
            x.program,
            opt(x.live_s, 2),
            opt(x.change_p50_ms, 1),
            opt(x.change_p99_ms, 1),
            opt(x.programming_p50_le_s, 3),
            opt(x.programming_p99_le_s, 3),
            opt(x.peak_rss_mib, 1),
            opt(x.cpu_to_live_s, 2),
            opt(x.idle_cpu_pct, 2),
            latency(&x.clusterip),
            latency(&x.pod_ip),
            opt(clusterip_over_pod_ip(x), 3)
        );
    }
    s
}

fn latency(t: &Option<Traffic>) -> String {
    match t {
        Some(t) => format!("{:.0} / {:.0}", t.p50_us, t.p99_us),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(51.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    /// A report of `rows` from a fixed date, load and release.
    fn report(rows: Vec<ApiRow>) -> ApiReport {
        ApiReport {
            date: "2026-12-07T00:00:00Z".into(),
            machine: machine(),
            load: ("0.1".into(), "0.2".into()),
            kubernetes: "v1.37.2".into(),
            rows,
        }
    }

    #[test]
    fn plot_rows_key_kube_proxy_by_mode_and_keep_the_release_in_the_caption() {
        let r = report(vec![
            ApiRow {
                program: label("kube-proxy-iptables", "v1.37.2"),
                status: "not live within 300 s".into(),
                ..ApiRow::default()
            },
            ApiRow {
                program: "weir-ebpf".into(),
                live_s: Some(1.1),
                change_p99_ms: Some(33.0),
                ..ApiRow::default()
            },
        ]);
        let p = as_plot_report(&r);
        assert_eq!(p.rows[0].mode, "kube-proxy-iptables");
        assert!(p.rows[0].status.starts_with('>'));
        assert_eq!(p.rows[1].mode, "weir-ebpf");
        assert_eq!(
            (p.rows[1].full_sync_s, p.rows[1].change_ms),
            (Some(1.1), Some(33.0))
        );
        assert!(p.caption().contains("v1.37.2"), "{}", p.caption());
    }

    #[test]
    fn kube_proxy_rows_carry_the_release() {
        assert_eq!(
            label("kube-proxy-nftables", "v1.37.2"),
            "kube-proxy v1.37.2 nftables"
        );
        assert_eq!(label("weir-nftables", "v1.37.2"), "weir-nftables");
    }

    #[test]
    fn the_csv_has_one_line_per_row_under_its_header() {
        let r = report(vec![ApiRow {
            services: 10,
            endpoints: 10,
            program: "weir-nftables".into(),
            status: "ok".into(),
            live_s: Some(0.5),
            ..ApiRow::default()
        }]);
        let csv = to_csv(&r);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[1], COLUMNS);
        assert_eq!(lines.len(), 3);
        assert!(lines[2].starts_with("10,10,weir-nftables,ok,0.500,"));
        assert_eq!(
            lines[2].split(',').count(),
            COLUMNS.split(',').count(),
            "{}",
            lines[2]
        );
    }
}
