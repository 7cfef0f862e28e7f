//! `cargo xtask bench datapath`: what a ClusterIP costs on the data path, per proxy mode and
//! service count, against the same backend pods addressed by pod IP.
//!
//! For each mode and each service count, a fresh topology from `tests/src/lib.rs` (the node,
//! 10 backend pods running weir-echo, one client pod) gets N Services (the last-added one's
//! endpoints are the real pods, the others point at addresses nothing answers on) and a
//! release weir-proxy in that mode. Then, from the client pod, `weir-load` measures the
//! last-added Service's ClusterIP and the backend pods by pod IP **in one process whose
//! connections alternate between the two** (and whose throughput slices alternate), a few
//! rounds: a burst of load on the shared machine hits both sides alike, so their ratio is
//! much steadier than either number. In eBPF mode the client runs in the cgroup the socket
//! hooks are attached to (as every pod of a real node does), for both sides.
//!
//! Pure parts (round summaries, ratios, the table and the CSV) are separate from the run
//! and unit-tested.

use crate::bench::rig::{
    load, loadavg, machine, measured_targets, median, now_utc, release_dir, start_weir, topology,
    wait_metric, write_manifests, EbpfScratch, LoadSpec, Machine, Traffic, FULL,
};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The proxy modes `bench datapath` knows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--proxy-mode nftables`.
    Nftables,
    /// `--proxy-mode ebpf` (the client joins the hooked cgroup).
    Ebpf,
    /// `--proxy-mode ipvs`: refused here, this kernel has no IPVS (it runs in the VM).
    Ipvs,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Ebpf => "ebpf",
            Mode::Ipvs => "ipvs",
        }
    }
}

/// Options of `bench datapath`.
#[derive(clap::Args, Debug, Clone)]
pub struct DatapathArgs {
    /// Proxy modes to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "nftables,ebpf"
    )]
    mode: Vec<Mode>,
    /// Service counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    services: Vec<usize>,
    /// Endpoints (backend pods) of the measured Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// weir-load runs per (mode, service count); medians are reported (a burst of load
    /// can skew one round's ratio; it takes three of five to move the median).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Sequential connections per side and round (latencies).
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Milliseconds of the throughput phase per side and round.
    #[arg(long, default_value_t = 1000)]
    millis: u64,
    /// Client threads of the throughput phase.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Where datapath.csv and datapath.json go.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
}

/// Both sides of one weir-load run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Round {
    /// The backend pods by pod IP.
    pub direct: Traffic,
    /// The Service's ClusterIP.
    pub service: Traffic,
}

/// ClusterIP ÷ pod IP for each number (latencies: above 1 is slower; requests per second:
/// below 1 is fewer).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Ratios {
    pub(crate) connect_p50: f64,
    pub(crate) connect_p99: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) rps: f64,
}

/// One mode at one service count.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct DpRow {
    pub(crate) mode: String,
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
    /// `ok` or what went wrong.
    pub(crate) status: String,
    /// weir's full sync of the N Services.
    pub(crate) full_sync_s: Option<f64>,
    /// Medians over the rounds, each side.
    pub(crate) direct: Option<Traffic>,
    pub(crate) service: Option<Traffic>,
    /// Medians over the rounds of each round's ratio.
    pub(crate) ratio: Option<Ratios>,
    pub(crate) rounds: Vec<Round>,
}

/// A whole `bench datapath` run.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct DpReport {
    pub(crate) date: String,
    pub(crate) machine: Machine,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    pub(crate) rounds: usize,
    pub(crate) requests: usize,
    pub(crate) millis: u64,
    pub(crate) concurrency: usize,
    pub(crate) rows: Vec<DpRow>,
}

// ---------------------------------------------------------------- pure

/// The field-by-field median of several runs' numbers.
fn median_traffic(runs: &[&Traffic]) -> Traffic {
    let m =
        |f: fn(&Traffic) -> f64| median(runs.iter().map(|t| f(t)).collect()).unwrap_or(f64::NAN);
    Traffic {
        connect_p50_us: m(|t| t.connect_p50_us),
        connect_p99_us: m(|t| t.connect_p99_us),
        p50_us: m(|t| t.p50_us),
        p99_us: m(|t| t.p99_us),
        rps: m(|t| t.rps),
        errors: runs.iter().map(|t| t.errors).sum(),
    }
}

/// Each side's medians, and the median of each round's ClusterIP ÷ pod IP ratio (a ratio
/// within a round cancels what the machine was doing at that time); None without rounds.
pub fn summarize(rounds: &[Round]) -> Option<(Traffic, Traffic, Ratios)> {
    if rounds.is_empty() {
        return None;
    }
    let r = |f: fn(&Traffic) -> f64| {
        median(
            rounds
                .iter()
                .map(|x| f(&x.service) / f(&x.direct))
                .filter(|v| v.is_finite())
                .collect(),
        )
        .unwrap_or(f64::NAN)
    };
    let ratios = Ratios {
        connect_p50: r(|t| t.connect_p50_us),
        connect_p99: r(|t| t.connect_p99_us),
        p50: r(|t| t.p50_us),
        p99: r(|t| t.p99_us),
        rps: r(|t| t.rps),
    };
    let direct = median_traffic(&rounds.iter().map(|x| &x.direct).collect::<Vec<_>>());
    let service = median_traffic(&rounds.iter().map(|x| &x.service).collect::<Vec<_>>());
    Some((direct, service, ratios))
}

/// How far a mode's request-p50 ratios are from pod IP and how much they move across the
/// service counts: (worst overhead, spread), both as fractions (0.05: 5 %).
pub fn flatness(report: &DpReport, mode: &str) -> Option<(f64, f64)> {
    let ratios: Vec<f64> = report
        .rows
        .iter()
        .filter(|r| r.mode == mode)
        .filter_map(|r| r.ratio.as_ref().map(|x| x.p50))
        .filter(|v| v.is_finite())
        .collect();
    let lo = ratios.iter().copied().reduce(f64::min)?;
    let hi = ratios.iter().copied().reduce(f64::max)?;
    Some((hi - 1.0, hi / lo - 1.0))
}

fn us(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "-".into()
    }
}

fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "-".into()
    }
}

/// The results as a markdown table: per mode and service count, pod IP / ClusterIP (ratio).
pub fn markdown(report: &DpReport) -> String {
    let mut s = format!(
        "{} · {} × {} cores · kernel {} · load {} → {} · {} rounds × {} connections per side, {} threads × {} ms\n\n",
        report.date,
        report.machine.cpu,
        report.machine.cores,
        report.machine.kernel,
        report.load_before,
        report.load_after,
        report.rounds,
        report.requests,
        report.concurrency,
        report.millis
    );
    s.push_str("| mode | services | connect p50 µs: pod IP / ClusterIP (ratio) | request p50 µs | request p99 µs | requests/s | note |\n|---|---:|---|---|---|---|---|\n");
    for r in &report.rows {
        let cell = |d: f64, v: f64, q: f64, digits: bool| {
            if digits {
                format!("{} / {} ({})", us(d), us(v), ratio(q))
            } else {
                format!("{d:.0} / {v:.0} ({})", ratio(q))
            }
        };
        let (c, p50, p99, rps) = match (&r.direct, &r.service, &r.ratio) {
            (Some(d), Some(v), Some(q)) => (
                cell(d.connect_p50_us, v.connect_p50_us, q.connect_p50, true),
                cell(d.p50_us, v.p50_us, q.p50, true),
                cell(d.p99_us, v.p99_us, q.p99, true),
                cell(d.rps, v.rps, q.rps, false),
            ),
            _ => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let note = if r.status == "ok" { "" } else { &r.status };
        let _ = writeln!(
            s,
            "| {} | {} | {c} | {p50} | {p99} | {rps} | {note} |",
            r.mode, r.services
        );
    }
    let mut modes: Vec<&str> = report.rows.iter().map(|r| r.mode.as_str()).collect();
    modes.dedup();
    s.push('\n');
    for m in modes {
        if let Some((worst, spread)) = flatness(report, m) {
            let _ = writeln!(
                s,
                "{m}: ClusterIP request p50 at most {:+.1} % of pod IP's; {:.1} % apart across the service counts",
                worst * 100.0,
                spread * 100.0
            );
        }
    }
    s
}

const CSV_HEADER: &str = "mode,services,endpoints,status,full_sync_s,direct_connect_p50_us,clusterip_connect_p50_us,connect_p50_ratio,direct_connect_p99_us,clusterip_connect_p99_us,connect_p99_ratio,direct_p50_us,clusterip_p50_us,p50_ratio,direct_p99_us,clusterip_p99_us,p99_ratio,direct_rps,clusterip_rps,rps_ratio,errors";

/// The results as CSV, with the machine and the run's settings on a comment line.
pub fn csv(report: &DpReport) -> String {
    let mut s = format!(
        "# {} | {} | {} cores | kernel {} | load {} -> {} | {} rounds x {} connections per side, {} threads x {} ms\n{CSV_HEADER}\n",
        report.date,
        report.machine.cpu,
        report.machine.cores,
        report.machine.kernel,
        report.load_before,
        report.load_after,
        report.rounds,
        report.requests,
        report.concurrency,
        report.millis
    );
    let num = |v: f64, digits: usize| {
        if v.is_finite() {
            format!("{v:.digits$}")
        } else {
            String::new()
        }
    };
    for r in &report.rows {
        let mut cols = vec![
            r.mode.clone(),
            r.services.to_string(),
            r.endpoints.to_string(),
            format!("\"{}\"", r.status.replace('"', "'")),
            r.full_sync_s.map(|v| num(v, 4)).unwrap_or_default(),
        ];
        match (&r.direct, &r.service, &r.ratio) {
            (Some(d), Some(v), Some(q)) => {
                for (a, b, x) in [
                    (d.connect_p50_us, v.connect_p50_us, q.connect_p50),
                    (d.connect_p99_us, v.connect_p99_us, q.connect_p99),
                    (d.p50_us, v.p50_us, q.p50),
                    (d.p99_us, v.p99_us, q.p99),
                    (d.rps, v.rps, q.rps),
                ] {
                    cols.extend([num(a, 0), num(b, 0), num(x, 3)]);
                }
                cols.push((d.errors + v.errors).to_string());
            }
            _ => cols.extend(std::iter::repeat_n(String::new(), 16)),
        }
        s.push_str(&cols.join(","));
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------- the run

/// One mode at one service count: topology, weir-proxy, `rounds` interleaved loads.
fn measure(args: &DatapathArgs, bin: &Path, work: &Path, mode: Mode, n: usize) -> Result<DpRow> {
    let mut row = DpRow {
        mode: mode.name().into(),
        services: n,
        endpoints: args.endpoints,
        status: "ok".into(),
        ..DpRow::default()
    };
    let topo = topology(bin, args.endpoints)?;
    let dir = work.join(format!("{}-{n}", mode.name()));
    std::fs::create_dir_all(&dir)?;
    write_manifests(&dir, n, args.endpoints, &[], false)?;
    let scratch = match mode {
        Mode::Ebpf => Some(EbpfScratch::new(&format!("dp-{n}"))?),
        _ => None,
    };
    let log = work.join(format!("{}-{n}.log", mode.name()));
    let mut weir = start_weir(bin, &topo.node, mode.name(), &dir, scratch.as_ref(), &log)?;
    let limit = Duration::from_secs(300);
    let Some(full) = wait_metric(bin, &topo.node, &mut weir.child, FULL, 0.0, limit)? else {
        bail!("weir-proxy did not finish its first sync within 300 s");
    };
    row.full_sync_s = Some(full);
    let (service, direct) = measured_targets(n, args.endpoints);
    let spec = LoadSpec {
        requests: args.requests,
        concurrency: args.concurrency,
        millis: args.millis,
    };
    let Some(client) = topo.pods.last() else {
        bail!("the topology has no client pod");
    };
    let cgroup = scratch.as_ref().map(|s| s.cgroup.as_path());
    for r in 0..args.rounds {
        // Either side goes first in turn: nothing favours one by its position.
        let round = if r % 2 == 0 {
            let t = load(bin, client, cgroup, &[&direct, &service], spec)?;
            Round {
                direct: t[0].clone(),
                service: t[1].clone(),
            }
        } else {
            let t = load(bin, client, cgroup, &[&service, &direct], spec)?;
            Round {
                direct: t[1].clone(),
                service: t[0].clone(),
            }
        };
        row.rounds.push(round);
    }
    if let Some((d, s, q)) = summarize(&row.rounds) {
        row.direct = Some(d);
        row.service = Some(s);
        row.ratio = Some(q);
    }
    drop(weir);
    drop(topo);
    drop(scratch);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

/// Measures every mode at every service count; the report.
pub fn run(args: &DatapathArgs, root: &Path) -> Result<DpReport> {
    if args.mode.contains(&Mode::Ipvs) {
        bail!(
            "--mode ipvs: this kernel has no IPVS (and cannot load modules); IPVS runs only in \
             the qemu guest of `cargo xtask vm-test ipvs`, which bench datapath does not drive \
             yet. Use --mode nftables,ebpf."
        );
    }
    if args.services.iter().any(|&n| !(1..=40_000).contains(&n)) {
        bail!("--services: each between 1 and 40,000 (the address plan)");
    }
    if args.rounds == 0 || args.requests == 0 {
        bail!("--rounds and --requests must be at least 1");
    }
    crate::toolchain::ensure_ebpf()?;
    crate::bench::rig::build_release(root)?;
    if !weir_e2e::require_privileges() {
        bail!("bench datapath needs root and network namespaces");
    }
    let bin = release_dir(root);
    let work = tempfile::Builder::new()
        .prefix("weir-bench-dp-")
        .tempdir()?;
    let mut report = DpReport {
        date: now_utc(),
        machine: machine(),
        load_before: loadavg(),
        rounds: args.rounds,
        requests: args.requests,
        millis: args.millis,
        concurrency: args.concurrency,
        ..DpReport::default()
    };
    eprintln!(
        "==> {} modes × {} service counts, {} rounds each (load average {})",
        args.mode.len(),
        args.services.len(),
        args.rounds,
        report.load_before
    );
    for &mode in &args.mode {
        for &n in &args.services {
            let row = measure(args, &bin, work.path(), mode, n).unwrap_or_else(|e| DpRow {
                mode: mode.name().into(),
                services: n,
                endpoints: args.endpoints,
                status: format!("error: {e:#}"),
                ..DpRow::default()
            });
            match &row.ratio {
                Some(q) => eprintln!(
                    "{:>9} {:>6} services: ClusterIP / pod IP: connect p50 {} request p50 {} p99 {} req/s {}",
                    row.mode,
                    n,
                    ratio(q.connect_p50),
                    ratio(q.p50),
                    ratio(q.p99),
                    ratio(q.rps)
                ),
                None => eprintln!("{:>9} {n:>6} services: {}", row.mode, row.status),
            }
            report.rows.push(row);
        }
    }
    report.load_after = loadavg();
    if report.rows.iter().any(|r| r.status.starts_with("error")) {
        let kept = work.keep();
        eprintln!("weir-proxy logs kept in {}", kept.display());
    }
    Ok(report)
}

/// `bench datapath`: the run, its table on stdout, datapath.csv and datapath.json.
pub fn datapath(args: DatapathArgs, root: &Path) -> Result<()> {
    let report = run(&args, root)?;
    let out = root.join(&args.out);
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("datapath.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(out.join("datapath.csv"), csv(&report))?;
    println!("{}", markdown(&report));
    eprintln!(
        "results in {} (load average {} before, {} after)",
        out.display(),
        report.load_before,
        report.load_after
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(connect: f64, p50: f64, rps: f64) -> Traffic {
        Traffic {
            connect_p50_us: connect,
            connect_p99_us: connect * 3.0,
            p50_us: p50,
            p99_us: p50 * 4.0,
            rps,
            errors: 0,
        }
    }

    fn round(direct: Traffic, service: Traffic) -> Round {
        Round { direct, service }
    }

    #[test]
    fn ratios_are_the_median_of_each_rounds_ratio_not_the_ratio_of_medians() {
        // Round 2 ran in a burst of load: both sides slow, their ratio unchanged.
        let rounds = [
            round(t(30.0, 100.0, 1000.0), t(33.0, 110.0, 900.0)),
            round(t(300.0, 1000.0, 100.0), t(330.0, 1100.0, 90.0)),
            round(t(40.0, 100.0, 1000.0), t(40.0, 105.0, 1000.0)),
        ];
        let (d, s, q) = summarize(&rounds).unwrap();
        assert_eq!(d.p50_us, 100.0);
        assert_eq!(s.p50_us, 110.0);
        assert!((q.p50 - 1.10).abs() < 1e-9, "{q:?}");
        assert!((q.connect_p50 - 1.10).abs() < 1e-9, "{q:?}");
        assert!((q.rps - 0.9).abs() < 1e-9, "{q:?}");
        assert!(summarize(&[]).is_none());
    }

    fn report() -> DpReport {
        let row = |mode: &str, n, p50: f64| {
            let rounds = vec![round(t(30.0, 100.0, 1000.0), t(31.0, p50, 980.0))];
            let (d, s, q) = summarize(&rounds).unwrap();
            DpRow {
                mode: mode.into(),
                services: n,
                endpoints: 10,
                status: "ok".into(),
                full_sync_s: Some(0.5),
                direct: Some(d),
                service: Some(s),
                ratio: Some(q),
                rounds,
            }
        };
        DpReport {
            date: "2026-11-29T00:00:00Z".into(),
            rounds: 1,
            requests: 500,
            millis: 1000,
            concurrency: 4,
            rows: vec![
                row("nftables", 10, 120.0),
                row("nftables", 10000, 150.0),
                row("ebpf", 10, 102.0),
                row("ebpf", 10000, 104.0),
                DpRow {
                    mode: "ebpf".into(),
                    services: 30000,
                    status: "error: boom".into(),
                    ..DpRow::default()
                },
            ],
            ..DpReport::default()
        }
    }

    #[test]
    fn flatness_reports_the_worst_overhead_and_the_spread_across_service_counts() {
        let (worst, spread) = flatness(&report(), "ebpf").unwrap();
        assert!((worst - 0.04).abs() < 1e-9);
        assert!((spread - (1.04 / 1.02 - 1.0)).abs() < 1e-9);
        assert!(flatness(&report(), "ipvs").is_none());
    }

    #[test]
    fn the_table_shows_both_sides_and_the_ratio_per_mode_and_service_count() {
        let md = markdown(&report());
        assert!(
            md.contains("| ebpf | 10000 | 30 / 31 (1.03) | 100 / 104 (1.04) |"),
            "{md}"
        );
        assert!(
            md.contains("| ebpf | 30000 | - | - | - | - | error: boom |"),
            "{md}"
        );
        assert!(
            md.contains("ebpf: ClusterIP request p50 at most +4.0 %"),
            "{md}"
        );
    }

    #[test]
    fn every_csv_row_has_as_many_columns_as_the_header() {
        let text = csv(&report());
        let mut lines = text.lines();
        assert!(lines.next().unwrap().starts_with("# 2026-11-29"));
        let width = lines.next().unwrap().split(',').count();
        for l in lines {
            assert_eq!(l.split(',').count(), width, "{l}");
        }
        assert!(
            text.contains("ebpf,10000,10,\"ok\",0.5000,30,31,1.033,"),
            "{text}"
        );
    }
}
