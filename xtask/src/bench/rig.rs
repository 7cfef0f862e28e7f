//! The data-path machinery the benchmarks share (`bench compare`, `bench datapath`,
//! `bench check`): the cluster's objects written as manifests, the namespace topology with
//! weir-echo backend pods, weir-proxy started in a mode on it (with the scratch cgroup and
//! bpffs directory eBPF mode needs), its metrics, `weir-load` runs, and where it all ran.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weir_e2e::{pod_ip, Netns, Topology, NODE_IP};

// ---------------------------------------------------------------- where it ran

/// The machine a run was taken on.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Machine {
    pub(crate) kernel: String,
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) nft: String,
    pub(crate) iptables: String,
}

/// A command's trimmed stdout (empty when it cannot run).
pub fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// This machine: kernel, CPU model, cores, nft and iptables versions.
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Machine {
        kernel: sh("uname", &["-r"]),
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        nft: sh("nft", &["--version"]),
        iptables: sh("iptables-legacy", &["--version"]),
    }
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The current UTC time, ISO 8601.
pub fn now_utc() -> String {
    sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

/// Where the release binaries are: `$CARGO_TARGET_DIR/release`, else `target/release`.
pub fn release_dir(root: &Path) -> PathBuf {
    profile_dir(root, "release")
}

/// Where a profile's binaries are: `$CARGO_TARGET_DIR/<profile>`, else `target/<profile>`.
pub fn profile_dir(root: &Path, profile: &str) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join(profile)
}

/// The median of `v` (NaN ignored; the mean of the middle two of an even count); None
/// when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[mid]),
        _ => Some((v[mid - 1] + v[mid]) / 2.0),
    }
}

// ---------------------------------------------------------------- the cluster's objects

/// Service i's ClusterIP (10.96.0.1 stays free: an API server gives it to the
/// `kubernetes` Service).
pub fn service_ip(i: usize) -> String {
    let k = i + 1;
    format!("10.96.{}.{}", k / 250, k % 250 + 1)
}

/// Endpoint e of Service i of n: the real pods for the last-added Service, else an
/// address nothing answers on (no traffic goes there).
pub fn endpoint_ip(n: usize, i: usize, e: usize) -> String {
    if i + 1 == n {
        return pod_ip(e);
    }
    let k = i * 64 + e;
    format!("10.{}.{}.{}", 128 + k / 65536, (k / 256) % 256, k % 256)
}

/// The measured NodePort (the last-added Service's).
pub const LAST_NODEPORT: u16 = 32700;

/// Every 20th Service and the last one are NodePorts (up to 2,700 of them fit the range).
pub fn node_port(n: usize, i: usize) -> Option<u16> {
    if i + 1 == n {
        Some(LAST_NODEPORT)
    } else if i.is_multiple_of(20) && i / 20 < 2700 {
        Some(30000 + (i / 20) as u16)
    } else {
        None
    }
}

/// Manifests for n Services × eps endpoints, one file per 500 Services; `removed`
/// Services lack their first endpoint. With `only_changed`, only the files holding a
/// removed Service are rewritten.
pub fn write_manifests(
    dir: &Path,
    n: usize,
    eps: usize,
    removed: &[usize],
    only_changed: bool,
) -> Result<()> {
    std::fs::write(
        dir.join("node.yaml"),
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nstatus: {{addresses: [{{type: InternalIP, address: {NODE_IP}}}]}}\n"),
    )?;
    for chunk in 0..n.div_ceil(500) {
        if only_changed && removed.iter().all(|c| c / 500 != chunk) {
            continue;
        }
        let mut y = String::new();
        for i in chunk * 500..((chunk + 1) * 500).min(n) {
            let list: Vec<String> = (0..eps)
                .filter(|e| !removed.contains(&i) || *e != 0)
                .map(|e| {
                    format!(
                        "{{addresses: [\"{}\"], nodeName: node1}}",
                        endpoint_ip(n, i, e)
                    )
                })
                .collect();
            let ty = match node_port(n, i) {
                Some(np) => format!("NodePort, ports: [{{name: p, port: 80, nodePort: {np}}}]"),
                None => "ClusterIP, ports: [{name: p, port: 80}]".into(),
            };
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec: {{clusterIP: {}, type: {ty}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{}]\n",
                service_ip(i),
                list.join(", ")
            );
        }
        let tmp = dir.join(format!(".c{chunk}.tmp"));
        std::fs::write(&tmp, y)?;
        std::fs::rename(&tmp, dir.join(format!("c{chunk:03}.yaml")))?;
    }
    Ok(())
}

/// The measured Service's ClusterIP and port, and its backend pods by pod IP (the
/// `weir-load` groups: `service` and `direct`).
pub fn measured_targets(n: usize, eps: usize) -> (String, String) {
    let pods: Vec<String> = (0..eps).map(|e| format!("{}:8080", pod_ip(e))).collect();
    (format!("{}:80", service_ip(n - 1)), pods.join(","))
}

// ---------------------------------------------------------------- processes

/// A child process killed (and reaped) on drop, whatever else happens.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A field of `/proc/PID/status` in KiB (`VmHWM:`, `VmRSS:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds of a live process (10 ms ticks).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// On-CPU seconds of a live process, summed over its threads from the scheduler's
/// nanosecond counter (`/proc/PID/task/*/schedstat`); threads that already exited are not
/// counted.
pub fn cpu_seconds_precise(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(ns as f64 / 1e9)
}

/// A topology with `eps` backend pods (weir-echo on 8080) and one client pod (the last).
pub fn topology(bin: &Path, eps: usize) -> Result<Topology> {
    let mut topo = Topology::new(eps + 1)?;
    let echo = bin.join("weir-echo");
    for i in 0..eps {
        topo.start_echo(i, &echo, &format!("pod-{i}"))?;
    }
    Ok(topo)
}

// ---------------------------------------------------------------- traffic

/// Traffic numbers through one frontend (or to one group of targets).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    pub(crate) connect_p50_us: f64,
    pub(crate) connect_p99_us: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) rps: f64,
    pub(crate) errors: u64,
}

/// How much traffic one `weir-load` run sends.
#[derive(Clone, Copy, Debug)]
pub struct LoadSpec {
    /// Sequential connections per group (latencies).
    pub requests: usize,
    /// Threads of the throughput phase.
    pub concurrency: usize,
    /// Milliseconds of the throughput phase per group.
    pub millis: u64,
}

/// One group's numbers of a `weir-load` report.
fn traffic(v: &serde_json::Value) -> Traffic {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Traffic {
        connect_p50_us: f("connect_p50_us"),
        connect_p99_us: f("connect_p99_us"),
        p50_us: f("p50_us"),
        p99_us: f("p99_us"),
        rps: f("rps"),
        errors: v["errors"].as_u64().unwrap_or(0),
    }
}

/// The groups of a `weir-load` report, in the order they were given (one group prints a
/// bare object).
pub fn parse_load_report(v: &serde_json::Value) -> Vec<(Traffic, u64)> {
    let one = |g: &serde_json::Value| (traffic(g), g["ok"].as_u64().unwrap_or(0));
    match v["groups"].as_array() {
        Some(groups) => groups.iter().map(one).collect(),
        None => vec![one(v)],
    }
}

/// `program` (with its arguments) run inside `ns`, as a member of `cgroup` when given (so
/// eBPF mode's socket hooks see it). nsenter keeps the host's mounts (the cgroup v2 one)
/// that `ip netns exec` would hide.
pub fn in_client(ns: &Netns, cgroup: Option<&Path>, program: &[&str]) -> Command {
    let netns = format!("--net=/run/netns/{}", ns.name());
    match cgroup {
        Some(cg) => {
            let script = format!(
                "echo $$ > {} && exec \"$@\"",
                cg.join("cgroup.procs").display()
            );
            let mut c = Command::new("sh");
            c.args(["-c", &script, "sh", "nsenter", &netns])
                .args(program);
            c
        }
        None => {
            let mut c = Command::new("nsenter");
            c.arg(&netns).args(program);
            c
        }
    }
}

/// `weir-load` from inside `ns` (as a member of `cgroup` when given, so eBPF mode's
/// socket hooks see it) to `groups` (each `ADDR:PORT[,ADDR:PORT...]`), whose
/// connections alternate; one [`Traffic`] per group.
pub fn load(
    bin: &Path,
    ns: &Netns,
    cgroup: Option<&Path>,
    groups: &[&str],
    spec: LoadSpec,
) -> Result<Vec<Traffic>> {
    let bin = bin.join("weir-load").display().to_string();
    let target = groups.join("/");
    let (req, conc, ms) = (
        spec.requests.to_string(),
        spec.concurrency.to_string(),
        spec.millis.to_string(),
    );
    let out = in_client(ns, cgroup, &[bin.as_str(), &target, &req, &conc, &ms]).output()?;
    if !out.status.success() {
        bail!(
            "weir-load {target}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let groups_out = parse_load_report(&v);
    if groups_out.len() != groups.len() {
        bail!(
            "weir-load {target}: {} groups in its report",
            groups_out.len()
        );
    }
    let mut out = Vec::new();
    for ((t, ok), g) in groups_out.into_iter().zip(groups) {
        if ok == 0 {
            bail!("no answer from {g} ({} errors)", t.errors);
        }
        out.push(t);
    }
    Ok(out)
}

// ---------------------------------------------------------------- eBPF mode's scratch state

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> Result<PathBuf> {
    weir_e2e::mode::cgroup2_mount().context("no cgroup v2 mount (eBPF mode needs one)")
}

/// A scratch cgroup and bpffs directory for eBPF mode, removed on drop (drop it after
/// the processes in the cgroup are gone).
pub struct EbpfScratch {
    /// The cgroup the socket hooks attach to; clients join it.
    pub cgroup: PathBuf,
    /// The pin directory.
    pub bpffs: PathBuf,
}

impl EbpfScratch {
    /// `weir-bench-<pid>-<tag>` under the cgroup v2 mount and under /sys/fs/bpf.
    pub fn new(tag: &str) -> Result<EbpfScratch> {
        let id = format!("weir-bench-{}-{tag}", std::process::id());
        let cgroup = cgroup2_root()?.join(&id);
        std::fs::create_dir(&cgroup)?;
        Ok(EbpfScratch {
            cgroup,
            bpffs: PathBuf::from("/sys/fs/bpf").join(id),
        })
    }
}

impl Drop for EbpfScratch {
    fn drop(&mut self) {
        let _ = weir_proxy::dataplane::ebpf::kernel::cleanup(&self.bpffs);
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------- weir-proxy

// weir observes each sync once per family (`ip_family`); the IPv4 series is the IPv4
// table's work plus the work both families share (docs/metrics.md).

/// Sum of full-sync durations.
pub const FULL: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}";
/// Sum of partial-sync durations.
pub const PARTIAL_SUM: &str =
    "kubeproxy_sync_partial_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}";
/// Number of partial syncs.
pub const PARTIAL_COUNT: &str =
    "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}";
/// When the last sync finished.
pub const LAST: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}";

/// A metric of the weir-proxy running in `ns` (metrics on 127.0.0.1:10249).
pub fn metric(bin: &Path, ns: &Netns, name: &str) -> Option<f64> {
    let probe = bin.join("weir-probe").display().to_string();
    let out = ns
        .exec(&[&probe, "get", "127.0.0.1:10249", "/metrics"])
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until `name` is above `above`; None after `limit`; an error when weir-proxy exits.
pub fn wait_metric(
    bin: &Path,
    ns: &Netns,
    child: &mut Proc,
    name: &str,
    above: f64,
    limit: Duration,
) -> Result<Option<f64>> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(st) = child.0.try_wait()? {
            bail!("weir-proxy exited ({st}); its log is in the bench work directory");
        }
        if let Some(v) = metric(bin, ns, name).filter(|v| *v > above) {
            return Ok(Some(v));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}

/// Waits with `weir-probe wait` in `client` (joined to `cgroup` in eBPF mode) until
/// backend `name` (`-`: any) answers at `addr`.
pub fn wait_backend(
    bin: &Path,
    client: &Netns,
    cgroup: Option<&Path>,
    addr: &str,
    name: &str,
    limit: Duration,
) -> Result<()> {
    let probe = bin.join("weir-probe").display().to_string();
    let ms = limit.as_millis().to_string();
    let out = in_client(client, cgroup, &[probe.as_str(), "wait", addr, name, &ms]).output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        bail!("{}", first.trim_start_matches("Error: "));
    }
    Ok(())
}

/// A weir-proxy started on a topology's node.
pub struct Weir {
    /// The process (killed on drop).
    pub child: Proc,
    /// Its PID.
    pub pid: u32,
    /// When it was started.
    pub started: Instant,
}

/// Starts weir-proxy (release build under `bin`) in `mode` in the namespace `node`, reading
/// the manifests in `dir`, with its log in `log`; eBPF mode attaches to `scratch`.
pub fn start_weir(
    bin: &Path,
    node: &Netns,
    mode: &str,
    dir: &Path,
    scratch: Option<&EbpfScratch>,
    log: &Path,
) -> Result<Weir> {
    let source = format!("dir:{}", dir.display());
    let args = [
        "--source",
        &source,
        "--min-sync-period",
        "200ms",
        "--sync-period",
        "1h",
    ];
    start_weir_with(bin, node, mode, &args, scratch, log)
}

/// Starts weir-proxy like [`start_weir`] with `source_args` (the source and any sync
/// settings) instead of a manifest directory.
pub fn start_weir_with(
    bin: &Path,
    node: &Netns,
    mode: &str,
    source_args: &[&str],
    scratch: Option<&EbpfScratch>,
    log: &Path,
) -> Result<Weir> {
    let proxy = bin.join("weir-proxy").display().to_string();
    let mut args: Vec<String> = [
        proxy.as_str(),
        "--proxy-mode",
        mode,
        "--hostname-override",
        "node1",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--service-cluster-ip-range",
        "10.96.0.0/16",
        "--metrics-bind-address",
        "127.0.0.1:10249",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ]
    .iter()
    .chain(source_args)
    .map(|s| s.to_string())
    .collect();
    if let Some(s) = scratch {
        args.extend([
            "--ebpf-cgroup".into(),
            s.cgroup.display().to_string(),
            "--bpffs-dir".into(),
            s.bpffs.display().to_string(),
        ]);
    }
    let log = std::fs::File::create(log)?;
    // nsenter keeps the host's mounts (cgroup2, bpffs) that `ip netns exec` would hide.
    let started = Instant::now();
    let child = Proc(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.name()))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    let pid = child.0.id();
    Ok(Weir {
        child,
        pid,
        started,
    })
}

/// Builds the release binaries of weir-proxy and the test tools (weir-probe, weir-load).
pub fn build_release(root: &Path) -> Result<()> {
    eprintln!("==> building release binaries");
    let st = Command::new("cargo")
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "weir-proxy",
            "-p",
            "weir-e2e",
            "--bins",
        ])
        .status()?;
    if !st.success() {
        bail!("cargo build --release failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_group_report_is_a_bare_object_and_several_come_in_order() {
        let one = serde_json::json!({"ok": 3, "errors": 1, "p50_us": 100, "rps": 5.5});
        let parsed = parse_load_report(&one);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].1, 3);
        assert_eq!(parsed[0].0.p50_us, 100.0);
        assert_eq!(parsed[0].0.errors, 1);
        let two = serde_json::json!({"groups": [{"ok": 1, "p50_us": 1}, {"ok": 0, "p50_us": 2}]});
        let parsed = parse_load_report(&two);
        assert_eq!(
            parsed
                .iter()
                .map(|(t, ok)| (t.p50_us, *ok))
                .collect::<Vec<_>>(),
            [(1.0, 1), (2.0, 0)]
        );
    }

    #[test]
    fn median_ignores_nan_and_averages_the_middle_two_of_an_even_count() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, f64::NAN, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn the_measured_service_is_the_last_one_and_points_at_the_real_pods() {
        let (svc, pods) = measured_targets(1000, 3);
        assert_eq!(svc, format!("{}:80", service_ip(999)));
        assert_eq!(pods.split(',').count(), 3);
        assert_eq!(endpoint_ip(1000, 999, 2), pod_ip(2));
        assert_ne!(endpoint_ip(1000, 998, 2), pod_ip(2));
        assert_eq!(node_port(1000, 999), Some(LAST_NODEPORT));
    }
}
