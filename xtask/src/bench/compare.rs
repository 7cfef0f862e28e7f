//! `cargo xtask bench compare` and `cargo xtask bench check`: weir side by side with the
//! rulesets upstream kube-proxy would program, on one machine in one run.
//!
//! For each size (N Services × E endpoints) and each dataplane, a fresh namespace topology
//! (the node, an external client, E backend pods running weir-echo and one client pod) gets
//! the whole ruleset, then:
//! - control plane: the full sync (weir's own sync-duration metric; for the references the
//!   wall time of `iptables-legacy-restore` / `nft -f` on the whole ruleset, cut off at
//!   `--limit`), the median of a few one-endpoint changes, the peak RSS and the CPU time of
//!   the process that did it;
//! - data path: `weir-load` through the last-added Service's ClusterIP (from the client pod)
//!   and NodePort (from the external client): connect time (the first packet's trip through
//!   the NAT rules), connect + request p50/p99 and requests per second; and the same backend
//!   pods addressed directly by pod IP on a node without rules (the no-NAT limit).
//!
//! The reference rulesets are written by generators of our own in the shapes upstream
//! kube-proxy programs: its iptables mode (KUBE-SERVICES → a KUBE-SVC chain per service →
//! a KUBE-SEP chain per endpoint, statistic-mode probabilities, NodePorts behind an addrtype
//! rule; nat table only) and its nftables mode (a service-ips verdict map, a chain per
//! service with an anonymous numgen vmap, a chain per endpoint). A one-endpoint change is
//! what upstream sends for it: the service chain rewritten and the endpoint chain deleted.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weir_e2e::{Netns, Topology, NODE_IP};

use crate::bench::report::{csv, markdown, opt, Report, Row};
use crate::bench::rig::{
    cpu_seconds, endpoint_ip, load, loadavg, machine, measured_targets, median, metric, node_port,
    now_utc, release_dir, service_ip, start_weir, status_kib, topology, wait_metric,
    write_manifests, EbpfScratch, LoadSpec, Traffic, Weir, FULL, LAST, LAST_NODEPORT,
    PARTIAL_COUNT, PARTIAL_SUM,
};
use crate::vm::{GuestSize, Payload};

/// Options of `bench compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Service counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,30000")]
    sizes: Vec<usize>,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// A reference load (or a weir full sync) taking longer than this many seconds is
    /// stopped and reported as "> limit"; larger sizes of it are then skipped.
    #[arg(long, default_value_t = 120)]
    limit: u64,
    /// One size (2,000 services), shorter traffic phases; results in quick.csv/quick.json.
    #[arg(long)]
    quick: bool,
    /// Where results go (compare.csv, compare.json, the PNG plots).
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Re-measure only these sections (control-plane, datapath) and merge them into the
    /// compare.json already under --out: the other numbers are kept, and the run is noted.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Only these dataplanes (direct, weir-nftables, weir-ebpf, shape-iptables,
    /// shape-nftables: rulesets in kube-proxy's shape, not the program), merged into the existing compare.json like --only.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Service counts measured inside the qemu guest that IPVS mode needs (this kernel
    /// has none): weir's IPVS and nftables modes and pod IP there, compared with each other
    /// only (TCG emulation); results in compare-vm.csv/json and vm-*.png.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    vm_sizes: Vec<usize>,
    /// Skip the guest (no IPVS numbers).
    #[arg(long, conflicts_with = "vm_only")]
    no_vm: bool,
    /// Only the guest part (IPVS, nftables mode and pod IP inside the guest).
    #[arg(long)]
    vm_only: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 4096)]
    vm_memory: u32,
    /// Measure nothing: re-write the CSV files and plots from the JSON reports under --out
    /// (compare.json, compare-vm.json) and print their tables.
    #[arg(long, conflicts_with_all = ["only", "modes", "quick", "vm_only"])]
    replot: bool,
    /// Set by the host for the run inside the guest: no build, the binaries at their host
    /// paths, the report written to `$WEIR_VM_OUT` instead of --out.
    #[arg(long, hide = true)]
    in_vm: bool,
}

/// The parts of a comparison that `--only` can re-measure on their own.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Full sync, startup, one endpoint change, peak RSS, CPU.
    ControlPlane,
    /// ClusterIP and NodePort traffic (the rules are still loaded first).
    Datapath,
}

impl CompareArgs {
    /// Whether this run re-measures only part of the comparison (and merges).
    fn partial(&self) -> bool {
        !self.only.is_empty() || !self.modes.is_empty()
    }

    fn measures(&self, s: Section) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }

    /// Whether `mode` (one of [`MODES`] or [`VM_MODES`]) is asked for.
    fn wants(&self, mode: &str) -> bool {
        self.modes.is_empty() || self.modes.iter().any(|m| m == mode)
    }

    /// Whether the host run includes the guest (IPVS) part.
    fn wants_vm(&self) -> bool {
        !self.no_vm && !self.quick && self.wants("weir-ipvs")
    }
}

/// The dataplanes compared on this machine.
const MODES: [&str; 5] = [
    "direct",
    "weir-nftables",
    "weir-ebpf",
    "shape-iptables",
    "shape-nftables",
];

/// The dataplanes compared inside the guest: IPVS, with nftables mode and pod IP as its
/// yardsticks in the same (emulated) machine.
const VM_MODES: [&str; 3] = ["direct", "weir-nftables", "weir-ipvs"];

/// `old` with the rows of a partial run `new` merged in: for a (size, dataplane) both
/// have, the re-measured sections' numbers replace the old ones (and the status, when the
/// control plane was re-measured or the new run failed); other rows are added.
pub fn merge(old: &Report, new: &Report, control_plane: bool, datapath: bool) -> Report {
    let mut out = old.clone();
    for n in &new.rows {
        let Some(o) = out
            .rows
            .iter_mut()
            .find(|o| o.services == n.services && o.mode == n.mode)
        else {
            out.rows.push(n.clone());
            continue;
        };
        if control_plane {
            o.full_sync_s = n.full_sync_s;
            o.startup_s = n.startup_s;
            o.change_ms = n.change_ms;
            o.peak_rss_mib = n.peak_rss_mib;
            o.cpu_s = n.cpu_s;
        }
        if datapath {
            o.clusterip = n.clusterip.clone();
            o.nodeport = n.nodeport.clone();
            o.nodeport_note = n.nodeport_note.clone();
        }
        if control_plane || n.status != "ok" {
            o.status = n.status.clone();
        }
    }
    out.rows.sort_by_key(|r| {
        (
            r.services,
            MODES
                .iter()
                .position(|m| *m == r.mode)
                .unwrap_or(MODES.len()),
        )
    });
    out
}

/// The Services whose first endpoint the change steps remove (never the measured one).
pub(crate) fn changed_services(n: usize, count: usize) -> Vec<usize> {
    (0..count).map(|k| (n / 3 + k * 97) % (n - 1)).collect()
}

// ---------------------------------------------------------------- reference rulesets

/// A short stable tag per (service, endpoint) for chain names, like upstream's hashes.
fn tag(i: usize, e: usize, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut x = (i as u64) << 8 | e as u64;
    let mut out = String::with_capacity(len);
    for _ in 0..len {
        x = x
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
        out.push(ALPHABET[(x >> 59) as usize] as char);
    }
    out
}

/// 255 stands for "the service itself".
const SVC: usize = 255;

fn ipt_svc(i: usize) -> String {
    format!("KUBE-SVC-{}", tag(i, SVC, 16))
}

fn ipt_sep(i: usize, e: usize) -> String {
    format!("KUBE-SEP-{}", tag(i, e, 16))
}

/// The KUBE-SVC chain's rules and its endpoints' KUBE-SEP chains' rules, for `eps` (the
/// endpoint indexes present).
fn ipt_service_rules(s: &mut String, n: usize, i: usize, eps: &[usize]) {
    // Upstream drops the per-endpoint comments in large clusters (more than 1,000
    // endpoints in all), which also keeps the table under the kernel's size limit.
    let large = n * eps.len() > 1000;
    let svc = ipt_svc(i);
    let ip = service_ip(i);
    let _ = writeln!(
        s,
        "-A {svc} ! -s 10.244.0.0/16 -d {ip}/32 -p tcp -m comment --comment \"bench/s{i}:p cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ"
    );
    for (k, &e) in eps.iter().enumerate() {
        let ep = endpoint_ip(n, i, e);
        let left = eps.len() - k;
        let prob = if left > 1 {
            format!(
                " -m statistic --mode random --probability {:.11}",
                1.0 / left as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "-A {svc}{}{prob} -j {}",
            if large {
                String::new()
            } else {
                format!(" -m comment --comment \"bench/s{i}:p -> {ep}:8080\"")
            },
            ipt_sep(i, e)
        );
    }
    let c = if large {
        String::new()
    } else {
        format!(" -m comment --comment \"bench/s{i}:p\"")
    };
    for &e in eps {
        let sep = ipt_sep(i, e);
        let ep = endpoint_ip(n, i, e);
        let _ = writeln!(s, "-A {sep} -s {ep}/32{c} -j KUBE-MARK-MASQ");
        let _ = writeln!(
            s,
            "-A {sep} -p tcp{c} -m tcp -j DNAT --to-destination {ep}:8080"
        );
    }
}

/// kube-proxy's iptables mode, nat table, for `iptables-legacy-restore`.
pub(crate) fn iptables_ruleset(n: usize, eps: usize) -> String {
    let all: Vec<usize> = (0..eps).collect();
    let mut s = String::from("*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for i in 0..n {
        let _ = writeln!(s, ":{} - [0:0]", ipt_svc(i));
        if node_port(n, i).is_some() {
            let _ = writeln!(s, ":KUBE-EXT-{} - [0:0]", tag(i, SVC, 16));
        }
        for e in 0..eps {
            let _ = writeln!(s, ":{} - [0:0]", ipt_sep(i, e));
        }
    }
    for hook in ["PREROUTING", "OUTPUT"] {
        let _ = writeln!(
            s,
            "-A {hook} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        );
    }
    s.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    s.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    s.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    s.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    // Services in the order they were added: the last-added one is the last rule matched.
    for i in 0..n {
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/s{i}:p cluster IP\" -m tcp --dport 80 -j {}",
            service_ip(i),
            ipt_svc(i)
        );
    }
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for i in 0..n {
        if let Some(np) = node_port(n, i) {
            let ext = format!("KUBE-EXT-{}", tag(i, SVC, 16));
            let _ = writeln!(
                s,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"bench/s{i}:p\" -m tcp --dport {np} -j {ext}"
            );
            let _ = writeln!(
                s,
                "-A {ext} -m comment --comment \"masquerade traffic for bench/s{i}:p external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(s, "-A {ext} -j {}", ipt_svc(i));
        }
    }
    for i in 0..n {
        ipt_service_rules(&mut s, n, i, &all);
    }
    s.push_str("COMMIT\n");
    s
}

/// What kube-proxy's iptables mode (partial sync) restores with `--noflush` when Service
/// i loses endpoint 0: the service chain rewritten, the endpoint chain flushed and deleted.
pub(crate) fn iptables_change(n: usize, eps: usize, i: usize) -> String {
    let left: Vec<usize> = (1..eps).collect();
    let mut s = String::from("*nat\n");
    let _ = writeln!(s, ":{} - [0:0]", ipt_svc(i));
    for &e in &left {
        let _ = writeln!(s, ":{} - [0:0]", ipt_sep(i, e));
    }
    let _ = writeln!(s, ":{} - [0:0]", ipt_sep(i, 0));
    ipt_service_rules(&mut s, n, i, &left);
    let _ = writeln!(s, "-X {}", ipt_sep(i, 0));
    s.push_str("COMMIT\n");
    s
}

fn nft_svc(i: usize) -> String {
    format!("service-{}-bench/s{i}/tcp/p", tag(i, SVC, 8))
}

fn nft_ep(n: usize, i: usize, e: usize) -> String {
    format!(
        "endpoint-{}-bench/s{i}/tcp/p__{}/8080",
        tag(i, e, 8),
        endpoint_ip(n, i, e)
    )
}

/// The service chain's body for the endpoints `eps`.
fn nft_service_body(n: usize, i: usize, eps: &[usize]) -> [String; 2] {
    let arms: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(k, &e)| format!("{k} : goto {}", nft_ep(n, i, e)))
        .collect();
    [
        format!(
            "ip daddr {} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
            service_ip(i)
        ),
        format!(
            "numgen random mod {} vmap {{ {} }}",
            eps.len(),
            arms.join(", ")
        ),
    ]
}

/// kube-proxy's nftables mode, for `nft -f`.
pub(crate) fn nftables_ruleset(n: usize, eps: usize) -> String {
    let all: Vec<usize> = (0..eps).collect();
    let mut s = String::from("table ip kube-proxy {\n  comment \"rules for kube-proxy\"\n");
    s.push_str("  chain mark-for-masquerade { meta mark set meta mark or 0x4000; }\n");
    s.push_str("  chain masquerading { meta mark & 0x4000 == 0 return; meta mark set meta mark xor 0x4000; masquerade fully-random; }\n");
    s.push_str("  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n");
    s.push_str("  chain nat-output { type nat hook output priority -100; policy accept; jump services; }\n");
    s.push_str("  chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; jump masquerading; }\n");
    s.push_str("  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"; }\n");
    s.push_str("  map service-nodeports { type inet_proto . inet_service : verdict; comment \"NodePort traffic\"; }\n");
    s.push_str("  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports; }\n");
    for i in 0..n {
        for e in 0..eps {
            let ep = endpoint_ip(n, i, e);
            let _ = writeln!(
                s,
                "  chain {} {{ ip saddr {ep} jump mark-for-masquerade; meta l4proto tcp dnat to {ep}:8080; }}",
                nft_ep(n, i, e)
            );
        }
        let [a, b] = nft_service_body(n, i, &all);
        let _ = writeln!(s, "  chain {} {{ {a}; {b}; }}", nft_svc(i));
        if node_port(n, i).is_some() {
            let _ = writeln!(
                s,
                "  chain external-{}-bench/s{i}/tcp/p {{ jump mark-for-masquerade; goto {}; }}",
                tag(i, SVC, 8),
                nft_svc(i)
            );
        }
    }
    s.push_str("}\n");
    let mut els = Vec::new();
    let mut nps = Vec::new();
    for i in 0..n {
        els.push(format!(
            "{} . tcp . 80 : goto {}",
            service_ip(i),
            nft_svc(i)
        ));
        if let Some(np) = node_port(n, i) {
            nps.push(format!(
                "tcp . {np} : goto external-{}-bench/s{i}/tcp/p",
                tag(i, SVC, 8)
            ));
        }
    }
    for (map, list) in [("service-ips", els), ("service-nodeports", nps)] {
        for chunk in list.chunks(4096) {
            let _ = writeln!(
                s,
                "add element ip kube-proxy {map} {{ {} }}",
                chunk.join(", ")
            );
        }
    }
    s
}

/// What kube-proxy's nftables mode sends when Service i loses endpoint 0.
pub(crate) fn nftables_change(n: usize, eps: usize, i: usize) -> String {
    let left: Vec<usize> = (1..eps).collect();
    let svc = nft_svc(i);
    let [a, b] = nft_service_body(n, i, &left);
    format!(
        "flush chain ip kube-proxy {svc}\nadd rule ip kube-proxy {svc} {a}\nadd rule ip kube-proxy {svc} {b}\nflush chain ip kube-proxy {ep}\ndelete chain ip kube-proxy {ep}\n",
        ep = nft_ep(n, i, 0)
    )
}

// ---------------------------------------------------------------- processes

fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|r| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(r.user_time()) + t(r.system_time())
        })
        .unwrap_or(0.0)
}

/// One run of a loader: wall seconds (None past the limit), CPU seconds, peak RSS MiB.
pub(crate) struct Timed {
    pub(crate) secs: Option<f64>,
    pub(crate) cpu: f64,
    pub(crate) rss_mib: f64,
}

/// Runs `cmd` inside `ns` with a time limit, sampling its peak RSS.
pub(crate) fn timed(ns: &Netns, cmd: &[&str], limit: Duration) -> Result<Timed> {
    let cpu0 = children_cpu();
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut hwm = 0u64;
    loop {
        if let Some(st) = child.try_wait()? {
            let secs = t.elapsed().as_secs_f64();
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                let first = err.lines().next().unwrap_or_default();
                bail!("{} failed after {secs:.1} s: {first}", cmd.join(" "));
            }
            return Ok(Timed {
                secs: Some(secs),
                cpu: children_cpu() - cpu0,
                rss_mib: hwm as f64 / 1024.0,
            });
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Timed {
                secs: None,
                cpu: children_cpu() - cpu0,
                rss_mib: hwm as f64 / 1024.0,
            });
        }
        hwm = hwm.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The binaries, and the per-run settings.
struct Ctx {
    bin: PathBuf,
    limit: Duration,
    eps: usize,
    requests: usize,
    rps_millis: u64,
    changes: usize,
    /// Whether the endpoint changes are measured.
    control_plane: bool,
    /// Whether traffic is sent.
    datapath: bool,
    work: tempfile::TempDir,
}

impl Ctx {
    fn load(&self, ns: &Netns, cgroup: Option<&Path>, target: &str) -> Result<Traffic> {
        let spec = LoadSpec {
            requests: self.requests,
            concurrency: 4,
            millis: self.rps_millis,
        };
        let mut t = load(&self.bin, ns, cgroup, &[target], spec)?;
        t.pop().context("weir-load reported no group")
    }
}

/// ClusterIP from the client pod, NodePort from the external client.
fn data_path(ctx: &Ctx, topo: &Topology, n: usize, cgroup: Option<&Path>, row: &mut Row) {
    let client = topo.pods.last();
    match client.map(|c| ctx.load(c, cgroup, &format!("{}:80", service_ip(n - 1)))) {
        Some(Ok(t)) => row.clusterip = Some(t),
        Some(Err(e)) => row.status = format!("ClusterIP traffic failed: {e:#}"),
        None => {}
    }
    if row.nodeport_note.is_none() {
        match ctx.load(&topo.client, None, &format!("{NODE_IP}:{LAST_NODEPORT}")) {
            Ok(t) => row.nodeport = Some(t),
            Err(e) => row.nodeport_note = Some(format!("failed: {e:#}")),
        }
    }
}

fn direct(ctx: &Ctx, n: usize) -> Result<Row> {
    let topo = topology(&ctx.bin, ctx.eps)?;
    let mut row = Row {
        services: n,
        endpoints: ctx.eps,
        mode: "direct".into(),
        status: "ok".into(),
        nodeport_note: Some("pod IP from the client pod, node without rules".into()),
        ..Row::default()
    };
    if let Some(client) = topo.pods.last() {
        // Every backend pod in turn, as the Service spreads over them.
        let (_, pods) = measured_targets(n, ctx.eps);
        row.clusterip = Some(ctx.load(client, None, &pods)?);
    }
    Ok(row)
}

fn weir(ctx: &Ctx, n: usize, mode: &str) -> Result<Row> {
    let ebpf = mode == "ebpf";
    let mut row = Row {
        services: n,
        endpoints: ctx.eps,
        mode: format!("weir-{mode}"),
        status: "ok".into(),
        ..Row::default()
    };
    let topo = topology(&ctx.bin, ctx.eps)?;
    let dir = ctx.work.path().join(format!("weir-{mode}-{n}"));
    std::fs::create_dir_all(&dir)?;
    write_manifests(&dir, n, ctx.eps, &[], false)?;
    let scratch = if ebpf {
        Some(EbpfScratch::new(&format!("{n}"))?)
    } else {
        None
    };
    let log = ctx.work.path().join(format!("weir-{mode}-{n}.log"));
    let Weir {
        mut child,
        pid,
        started,
    } = start_weir(&ctx.bin, &topo.node, mode, &dir, scratch.as_ref(), &log)?;
    let bin = &ctx.bin;
    let Some(full) = wait_metric(bin, &topo.node, &mut child, FULL, 0.0, ctx.limit)? else {
        row.status = format!("> {} s", ctx.limit.as_secs());
        return Ok(row);
    };
    row.startup_s = Some(started.elapsed().as_secs_f64());
    row.full_sync_s = Some(full);
    row.cpu_s = cpu_seconds(pid);
    // One endpoint of one Service removed, a few times; the median sync is reported.
    let mut removed = Vec::new();
    let mut times = Vec::new();
    let mut last = metric(bin, &topo.node, LAST).unwrap_or(0.0);
    let changes = if ctx.control_plane { ctx.changes } else { 0 };
    for svc in changed_services(n, changes) {
        let sum0 = metric(bin, &topo.node, PARTIAL_SUM).unwrap_or(0.0);
        let count0 = metric(bin, &topo.node, PARTIAL_COUNT).unwrap_or(0.0);
        removed.push(svc);
        write_manifests(&dir, n, ctx.eps, &removed, true)?;
        let Some(t) = wait_metric(
            bin,
            &topo.node,
            &mut child,
            LAST,
            last,
            Duration::from_secs(60),
        )?
        else {
            bail!("weir-proxy did not sync the endpoint change within 60 s");
        };
        last = t;
        let sum = metric(bin, &topo.node, PARTIAL_SUM).unwrap_or(f64::NAN);
        let count = metric(bin, &topo.node, PARTIAL_COUNT).unwrap_or(f64::NAN);
        if count > count0 {
            times.push((sum - sum0) / (count - count0) * 1000.0);
        }
    }
    row.change_ms = median(times);
    row.peak_rss_mib = status_kib(pid, "VmHWM:").map(|k| k as f64 / 1024.0);
    if ctx.datapath {
        data_path(
            ctx,
            &topo,
            n,
            scratch.as_ref().map(|s| s.cgroup.as_path()),
            &mut row,
        );
    }
    drop(child);
    drop(topo);
    drop(scratch);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

fn reference(ctx: &Ctx, n: usize, kind: &str) -> Result<Row> {
    let mut row = Row {
        services: n,
        endpoints: ctx.eps,
        mode: format!("shape-{kind}"),
        status: "ok".into(),
        ..Row::default()
    };
    let topo = topology(&ctx.bin, ctx.eps)?;
    let file = ctx.work.path().join(format!("{kind}-{n}.rules"));
    let f = file.display().to_string();
    let iptables = kind == "iptables";
    std::fs::write(
        &file,
        if iptables {
            iptables_ruleset(n, ctx.eps)
        } else {
            nftables_ruleset(n, ctx.eps)
        },
    )?;
    let full = if iptables {
        timed(&topo.node, &["iptables-legacy-restore", &f], ctx.limit)?
    } else {
        timed(&topo.node, &["nft", "-f", &f], ctx.limit)?
    };
    row.cpu_s = Some(full.cpu);
    row.peak_rss_mib = Some(full.rss_mib);
    let Some(secs) = full.secs else {
        row.status = format!("> {} s", ctx.limit.as_secs());
        return Ok(row);
    };
    row.full_sync_s = Some(secs);
    let mut times = Vec::new();
    let changes = if ctx.control_plane { ctx.changes } else { 0 };
    for svc in changed_services(n, changes) {
        let change = ctx.work.path().join(format!("{kind}-{n}-change.rules"));
        let c = change.display().to_string();
        let t = if iptables {
            std::fs::write(&change, iptables_change(n, ctx.eps, svc))?;
            timed(
                &topo.node,
                &["iptables-legacy-restore", "--noflush", &c],
                ctx.limit,
            )?
        } else {
            std::fs::write(&change, nftables_change(n, ctx.eps, svc))?;
            timed(&topo.node, &["nft", "-f", &c], ctx.limit)?
        };
        if let Some(s) = t.secs {
            times.push(s * 1000.0);
        }
    }
    row.change_ms = median(times);
    if ctx.datapath {
        data_path(ctx, &topo, n, None, &mut row);
    }
    let _ = std::fs::remove_file(&file);
    Ok(row)
}

/// Rough seconds a step takes, for the progress bar's estimate.
fn estimate(mode: &str, n: usize, limit: f64) -> f64 {
    let k = n as f64 / 1000.0;
    let traffic = 4.0;
    match mode {
        "direct" => traffic,
        "weir-nftables" | "weir-ebpf" => 5.0 + traffic + 1.0 * k,
        "weir-ipvs" => 5.0 + traffic + 2.0 * k,
        "shape-iptables" => 3.0 + traffic + (0.5 * k + 0.01 * k * k).min(limit) * 1.5,
        "shape-nftables" => 3.0 + traffic + (2.0 * k * k / 1.0).min(limit),
        _ => 0.0,
    }
}

fn fmt_dur(secs: f64) -> String {
    format!("{}m{:02}s", secs as u64 / 60, secs as u64 % 60)
}

/// Runs every step of `modes` × `sizes` with the release binaries (already built);
/// returns the report.
fn run(
    args: &CompareArgs,
    root: &Path,
    old: Option<&Report>,
    modes: &[&str],
    sizes: &[usize],
) -> Result<Report> {
    if !weir_e2e::require_privileges() {
        bail!("bench compare needs root and network namespaces");
    }
    let ctx = Ctx {
        bin: release_dir(root),
        limit: Duration::from_secs(args.limit),
        eps: args.endpoints,
        requests: if args.quick { 300 } else { 1000 },
        rps_millis: if args.quick { 700 } else { 1500 },
        changes: if args.quick { 5 } else { 3 },
        control_plane: args.measures(Section::ControlPlane),
        datapath: args.measures(Section::Datapath),
        work: tempfile::Builder::new().prefix("weir-bench-").tempdir()?,
    };
    let limit = args.limit as f64;
    let steps: Vec<(usize, &str)> = sizes
        .iter()
        .flat_map(|&n| modes.iter().map(move |&m| (n, m)))
        .filter(|(_, m)| args.wants(m))
        .collect();
    // A data-path-only run does not wait again for loads that were cut off before.
    let cut_off = |n: usize, mode: &str| {
        !ctx.control_plane
            && old.is_some_and(|o| {
                o.rows
                    .iter()
                    .any(|r| r.services == n && r.mode == mode && r.status.starts_with('>'))
            })
    };
    let total: f64 = steps.iter().map(|&(n, m)| estimate(m, n, limit)).sum();
    let mut report = Report {
        date: now_utc(),
        machine: machine(),
        quick: args.quick,
        limit_s: args.limit,
        load_before: loadavg(),
        ..Report::default()
    };
    eprintln!(
        "==> {} steps, estimated total {} (load average {})",
        steps.len(),
        fmt_dur(total),
        report.load_before
    );
    // The guest's console is a terminal the host only logs: no bar drawn there.
    let bar = if args.in_vm {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((total * 10.0) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40.cyan/blue}] {percent:>3}% eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let mut done = 0.0;
    let mut skip: Vec<&str> = Vec::new();
    for (n, mode) in steps {
        bar.set_message(format!("{mode} at {n} services"));
        let row = if skip.contains(&mode) || cut_off(n, mode) {
            Ok(Row {
                services: n,
                endpoints: ctx.eps,
                mode: mode.into(),
                status: format!("> {} s", args.limit),
                ..Row::default()
            })
        } else {
            match mode {
                "direct" => direct(&ctx, n),
                "weir-nftables" => weir(&ctx, n, "nftables"),
                "weir-ebpf" => weir(&ctx, n, "ebpf"),
                "weir-ipvs" => weir(&ctx, n, "ipvs"),
                "shape-iptables" => reference(&ctx, n, "iptables"),
                _ => reference(&ctx, n, "nftables"),
            }
        };
        let row = row.unwrap_or_else(|e| Row {
            services: n,
            endpoints: ctx.eps,
            mode: mode.into(),
            status: format!("error: {e:#}"),
            ..Row::default()
        });
        if row.status.starts_with('>') {
            skip.push(mode);
        }
        // Without a terminal the bar is hidden, and so is its println.
        if bar.is_hidden() {
            eprintln!("{}", summary(&row));
        } else {
            bar.println(summary(&row));
        }
        done += estimate(mode, n, limit);
        bar.set_position((done * 10.0) as u64);
        report.rows.push(row);
    }
    bar.finish_and_clear();
    report.load_after = loadavg();
    // Keep the weir logs only when something failed.
    if report.rows.iter().any(|r| r.status.starts_with("error")) {
        let kept = ctx.work.keep();
        eprintln!("weir-proxy logs kept in {}", kept.display());
    }
    Ok(report)
}

fn summary(r: &Row) -> String {
    let t = |t: &Option<Traffic>| {
        t.as_ref()
            .map(|t| {
                format!(
                    "p50 {:.0} µs p99 {:.0} µs {:.0} req/s",
                    t.p50_us, t.p99_us, t.rps
                )
            })
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "{:>6} {:<21} full {:>8} s  change {:>8} ms  rss {:>7} MiB  cpu {:>7} s | cip {} | np {} [{}]",
        r.services,
        r.mode,
        opt(r.full_sync_s, 3),
        opt(r.change_ms, 2),
        opt(r.peak_rss_mib, 1),
        opt(r.cpu_s, 2),
        t(&r.clusterip),
        t(&r.nodeport),
        r.status
    )
}

/// `bench compare`: the runs on this machine and in the guest, their CSV/JSON and plots
/// under `--out`.
pub fn compare(args: CompareArgs, root: &Path) -> Result<()> {
    if let Some(m) = args
        .modes
        .iter()
        .find(|m| !MODES.contains(&m.as_str()) && !VM_MODES.contains(&m.as_str()))
    {
        bail!(
            "--modes: unknown dataplane {m:?} (one of {}, weir-ipvs)",
            MODES.join(", ")
        );
    }
    let sizes = if args.quick {
        vec![2000]
    } else {
        args.sizes.clone()
    };
    if sizes
        .iter()
        .chain(&args.vm_sizes)
        .any(|&n| !(2..=40_000).contains(&n))
    {
        bail!("sizes must be between 2 and 40,000 services (NodePort and address plan)");
    }
    if args.in_vm {
        let report = run(&args, root, None, &VM_MODES, &sizes)?;
        let path = std::env::var("WEIR_VM_OUT").context("--in-vm needs $WEIR_VM_OUT")?;
        std::fs::write(&path, serde_json::to_string(&report)? + "\n")
            .with_context(|| format!("writing {path}"))?;
        return Ok(());
    }
    let out = root.join(&args.out);
    if args.replot {
        for (stem, prefix) in [("compare", ""), ("compare-vm", "vm-")] {
            let path = out.join(format!("{stem}.json"));
            if path.exists() {
                let text = std::fs::read_to_string(&path)?;
                let report = serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?;
                save(&args, &out, stem, prefix, None, report)?;
            }
        }
        return Ok(());
    }
    // The release binaries, once for both parts (the guest runs the host's).
    crate::toolchain::ensure_ebpf()?;
    crate::bench::rig::build_release(root)?;
    let stem = if args.quick { "quick" } else { "compare" };
    if !args.vm_only && MODES.iter().any(|m| args.wants(m)) {
        let old = previous(&args, &out, stem)?;
        let fresh = run(&args, root, old.as_ref(), &MODES, &sizes)?;
        save(&args, &out, stem, "", old, fresh)?;
    }
    if args.vm_only || args.wants_vm() {
        let old = previous(&args, &out, "compare-vm")?;
        let fresh = in_guest(&args, root)?;
        save(&args, &out, "compare-vm", "vm-", old, fresh)?;
    }
    Ok(())
}

/// The report a partial run (`--only`, `--modes`) merges into, when there is one.
fn previous(args: &CompareArgs, out: &Path, stem: &str) -> Result<Option<Report>> {
    let path = out.join(format!("{stem}.json"));
    if !args.partial() || !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)?;
    let report =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(report))
}

/// Roughly how much slower the guest (TCG) runs this workload than the host (weir's full
/// sync of 10,000 Services: 2.8 s on the host, 68 s in the guest).
const TCG_SLOWDOWN: f64 = 20.0;

/// The guest part: IPVS mode needs a kernel with IPVS, so `bench compare --in-vm` runs in
/// the qemu guest `cargo xtask vm-test` boots (TCG), on the release binaries, with nftables
/// mode and pod IP measured beside it in the same guest; the report comes back over the
/// console.
fn in_guest(args: &CompareArgs, root: &Path) -> Result<Report> {
    let bin = release_dir(root);
    let tools = ["weir-proxy", "weir-echo", "weir-probe", "weir-load"]
        .iter()
        .map(|b| bin.join(b))
        .collect();
    let guest_args = guest_args(args);
    let modes: Vec<&str> = VM_MODES.iter().copied().filter(|m| args.wants(m)).collect();
    let tcg = TCG_SLOWDOWN;
    let estimate: f64 = args
        .vm_sizes
        .iter()
        .flat_map(|&n| modes.iter().map(move |m| estimate(m, n, args.limit as f64)))
        .sum::<f64>()
        * tcg;
    eprintln!(
        "==> IPVS (this kernel has none): {} steps inside a qemu guest, estimated {}",
        args.vm_sizes.len() * modes.len(),
        fmt_dur(estimate)
    );
    let size = GuestSize {
        memory: args.vm_memory,
        cpus: 2,
        timeout: (estimate * 4.0) as u64 + 600,
    };
    let payload = Payload {
        tools,
        main: std::env::current_exe().context("this program's path")?,
        args: guest_args,
    };
    let host_load = loadavg();
    let guest = crate::vm::run_guest(&payload, size)?;
    if guest.code != 0 {
        bail!(
            "the comparison inside the guest failed (exit status {}; its console is above)",
            guest.code
        );
    }
    let mut report: Report = serde_json::from_str(&guest.out.join("\n"))
        .context("the guest's report (its WEIR-VM-OUT lines)")?;
    let host = machine();
    report.environment = Some(format!(
        "qemu TCG guest, {} vCPUs, {} MiB",
        size.cpus, size.memory
    ));
    report.host = Some(format!(
        "{} × {} cores, kernel {}, load {host_load} before",
        host.cpu, host.cores, host.kernel
    ));
    Ok(report)
}

/// The `bench compare --in-vm` command line the guest runs for this host run: the VM
/// sizes, the same sections and (guest) dataplanes, the cut-off scaled for TCG.
fn guest_args(args: &CompareArgs) -> Vec<String> {
    let join = |v: &[usize]| {
        v.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut guest_args: Vec<String> = vec![
        "bench".into(),
        "compare".into(),
        "--in-vm".into(),
        "--sizes".into(),
        join(&args.vm_sizes),
        "--endpoints".into(),
        args.endpoints.to_string(),
        // Everything is several times slower under TCG: the cut-off is too.
        "--limit".into(),
        (args.limit * TCG_SLOWDOWN as u64).to_string(),
    ];
    for section in &args.only {
        guest_args.push("--only".into());
        guest_args.push(match section {
            Section::ControlPlane => "control-plane".into(),
            Section::Datapath => "datapath".into(),
        });
    }
    if !args.modes.is_empty() {
        let modes: Vec<&str> = VM_MODES.iter().copied().filter(|m| args.wants(m)).collect();
        guest_args.push("--modes".into());
        guest_args.push(modes.join(","));
    }
    guest_args
}

/// Writes a run (merged into `old` for a partial run) as `<stem>.json`/`.csv`, its plots
/// as `<prefix>*.png` (not for --quick) and prints it as a table.
fn save(
    args: &CompareArgs,
    out: &Path,
    stem: &str,
    prefix: &str,
    old: Option<Report>,
    fresh: Report,
) -> Result<()> {
    let report = match &old {
        Some(old) => {
            let mut merged = merge(
                old,
                &fresh,
                args.measures(Section::ControlPlane),
                args.measures(Section::Datapath),
            );
            let modes: std::collections::BTreeSet<&str> =
                fresh.rows.iter().map(|r| r.mode.as_str()).collect();
            let what = match args.only.as_slice() {
                [] => "everything".to_string(),
                only => only
                    .iter()
                    .map(|s| match s {
                        Section::ControlPlane => "control plane",
                        Section::Datapath => "data path",
                    })
                    .collect::<Vec<_>>()
                    .join(" and "),
            };
            merged.partial_runs.push(format!(
                "{}: {what} of {} re-measured (load {} -> {})",
                fresh.date,
                modes.into_iter().collect::<Vec<_>>().join(", "),
                fresh.load_before,
                fresh.load_after
            ));
            merged
        }
        None => fresh,
    };
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(out.join(format!("{stem}.csv")), csv(&report))?;
    if !args.quick {
        crate::bench::plot::plots(&report, out, prefix)?;
    }
    println!("{}", markdown(&report));
    eprintln!(
        "results in {} (load average {} before, {} after)",
        out.join(stem).display(),
        report.load_before,
        report.load_after
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_e2e::pod_ip;

    #[test]
    fn reference_rulesets_put_the_measured_service_on_real_pods_last() {
        let ipt = iptables_ruleset(3, 2);
        let last = ipt
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES -d"))
            .unwrap_or_default();
        assert!(last.contains(&service_ip(2)), "{last}");
        assert!(ipt.contains(&format!("--to-destination {}:8080", pod_ip(1))));
        assert!(ipt.contains(&format!("--dport {LAST_NODEPORT}")));
        let nft = nftables_ruleset(3, 2);
        assert!(nft.contains(&format!("dnat to {}:8080", pod_ip(0))));
        assert!(nft.contains(&format!("tcp . {LAST_NODEPORT} : goto")));
        let change = iptables_change(3, 2, 1);
        assert!(change.contains(&format!("-X {}", ipt_sep(1, 0))));
        assert!(nftables_change(3, 2, 1).contains("numgen random mod 1 vmap"));
    }

    #[test]
    fn a_data_path_rerun_replaces_only_traffic_numbers_and_keeps_the_rest() {
        let row = |mode: &str, full: f64, p50: f64| Row {
            services: 1000,
            endpoints: 10,
            mode: mode.into(),
            status: "ok".into(),
            full_sync_s: Some(full),
            clusterip: Some(Traffic {
                p50_us: p50,
                ..Traffic::default()
            }),
            ..Row::default()
        };
        let old = Report {
            rows: vec![row("weir-ebpf", 0.1, 100.0), row("direct", 0.0, 90.0)],
            ..Report::default()
        };
        let new = Report {
            rows: vec![
                row("weir-ebpf", 9.9, 80.0),
                Row {
                    services: 30000,
                    ..row("weir-ebpf", 1.0, 70.0)
                },
            ],
            ..Report::default()
        };
        let merged = merge(&old, &new, false, true);
        let ebpf = &merged.rows[1];
        assert_eq!(ebpf.mode, "weir-ebpf");
        assert_eq!(ebpf.full_sync_s, Some(0.1), "control plane kept");
        assert_eq!(ebpf.clusterip.as_ref().map(|t| t.p50_us), Some(80.0));
        assert_eq!(
            merged.rows[0].mode, "direct",
            "rows stay in the table's order"
        );
        assert_eq!(merged.rows.len(), 3, "a new size is added");
        let both = merge(&old, &new, true, true);
        assert_eq!(both.rows[1].full_sync_s, Some(9.9));
    }

    #[test]
    fn the_guest_runs_the_vm_sizes_with_the_same_sections_and_its_own_dataplanes() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: CompareArgs,
        }
        let host = |line: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(
                std::iter::once("compare").chain(line.iter().copied()),
            )
            .unwrap()
            .args
        };
        let a = host(&[
            "--vm-sizes",
            "100,2000",
            "--only",
            "datapath",
            "--modes",
            "weir-ipvs,weir-ebpf",
        ]);
        assert!(a.wants_vm());
        let line = guest_args(&a);
        let guest = host(&line.iter().map(String::as_str).collect::<Vec<_>>()[2..]);
        assert!(guest.in_vm);
        assert_eq!(guest.sizes, [100, 2000]);
        assert_eq!(guest.only, [Section::Datapath]);
        assert_eq!(
            guest.modes,
            ["weir-ipvs"],
            "eBPF is not measured in the guest"
        );
        assert_eq!(guest.limit, a.limit * TCG_SLOWDOWN as u64);
        // A host run without IPVS leaves the guest out; --no-vm too.
        assert!(!host(&["--modes", "weir-ebpf"]).wants_vm());
        assert!(!host(&["--no-vm"]).wants_vm());
        assert!(host(&[]).wants_vm());
    }

    #[test]
    fn changed_services_never_touch_the_measured_one() {
        for n in [2, 10, 2000, 30000] {
            assert!(changed_services(n, 5).iter().all(|&s| s + 1 < n));
        }
    }
}
