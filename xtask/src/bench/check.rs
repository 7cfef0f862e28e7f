//! `cargo xtask bench check`: a few minutes' regression check against a committed
//! baseline, by ratios measured in one run so that the machine's speed cancels out.
//!
//! Each repetition measures, at N Services × 10 endpoints (5,000 by default: large enough
//! that the measured work is seconds of CPU, not ticks):
//! - the reference: upstream kube-proxy's iptables-mode nat table of the same N loaded with
//!   `iptables-legacy-restore` (CPU, wall), and one endpoint change restored with
//!   `--noflush` (CPU) — work that scales with N like weir's does;
//! - weir in nftables and in eBPF mode on a fresh topology: the CPU it used up to its first
//!   full sync (the scheduler's nanosecond counter, all threads), its full-sync metric, a
//!   few one-endpoint changes (weir's partial-sync metric, median), its peak RSS, and one
//!   interleaved `weir-load` run of the ClusterIP against the backend pods by pod IP.
//!
//! The ratios (weir ÷ reference of the same repetition; ClusterIP ÷ pod IP of the same
//! weir-load run; RSS as is, memory does not depend on the machine's speed) are reduced to
//! their median over the repetitions and compared with the baseline's medians. Only the
//! ratios whose run-to-run spread was measured well below the tolerance gate the check
//! (see [`GATED`] and docs/bench/README.md); the others are printed.

use crate::bench::compare::{changed_services, iptables_change, iptables_ruleset, timed};
use crate::bench::rig::{
    cpu_seconds_precise, load, loadavg, machine, measured_targets, median, metric, now_utc,
    profile_dir, start_weir, status_kib, topology, wait_metric, write_manifests, EbpfScratch,
    LoadSpec, Machine, FULL, LAST, PARTIAL_COUNT, PARTIAL_SUM,
};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use weir_e2e::Netns;

/// Options of `bench check`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct CheckArgs {
    /// The committed baseline (written by `bench check --update`).
    #[arg(long, default_value = "docs/bench/baseline.json")]
    baseline: PathBuf,
    /// Largest tolerated regression of a gated data-path or memory ratio, as a fraction
    /// (0.25: 25% worse).
    #[arg(long, default_value_t = 0.25)]
    tolerance: f64,
    /// Largest tolerated regression of a gated control-plane ratio (1.0: twice the
    /// baseline's CPU for the same work).
    #[arg(long, default_value_t = 1.0)]
    control_tolerance: f64,
    /// Write this run as the new baseline instead of comparing.
    #[arg(long)]
    update: bool,
    /// Services (× 10 endpoints) measured.
    #[arg(long, default_value_t = 5000)]
    services: usize,
    /// Repetitions; the median of each ratio is compared.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also write this run (every repetition's ratios) to this JSON file.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Measure the debug binaries `cargo build` made instead of building release ones
    /// (what `cargo xtask test` does, right after its build step). The gated latency
    /// ratios are the kernel's data path and do not depend on weir's build; peak RSS is
    /// gated only against a baseline of the same profile.
    #[arg(long)]
    debug: bool,
}

impl CheckArgs {
    /// What `cargo xtask test` runs: the defaults, on the debug binaries it just built.
    pub fn on_debug_build() -> CheckArgs {
        CheckArgs {
            debug: true,
            ..CheckArgs::default()
        }
    }
}

impl Default for CheckArgs {
    /// The command line's defaults (what `cargo xtask test` runs).
    fn default() -> CheckArgs {
        CheckArgs {
            baseline: PathBuf::from("docs/bench/baseline.json"),
            tolerance: 0.25,
            control_tolerance: 1.0,
            update: false,
            services: 5000,
            reps: 3,
            save: None,
            debug: false,
        }
    }
}

/// One repetition's ratios, by name.
pub type Sample = BTreeMap<String, f64>;

/// The ratios that fail the check when they regress beyond `--tolerance`: those whose
/// median over three repetitions moved well inside it between runs with no code change on
/// the shared 2-core VM at load 7-9 (at most 4 %).
pub const GATED: &[&str] = &[
    "nftables ClusterIP p50 / pod IP p50",
    "ebpf ClusterIP p50 / pod IP p50",
    "nftables peak RSS (MiB)",
    "ebpf peak RSS (MiB)",
];

/// The control-plane ratios that fail the check when they regress beyond
/// `--control-tolerance`: weir's CPU to its first full sync (the CPU side of time to live)
/// and to one endpoint change, each over iptables-restore's CPU for the same work in the
/// same repetition. Their medians moved by up to 43 % between runs with no code change
/// (docs/bench/README.md), so they are gated only against a regression well beyond that.
/// The wall-clock ratios move more still and are printed only.
pub const CONTROL_GATED: &[&str] = &[
    "nftables sync CPU / iptables-restore CPU",
    "ebpf sync CPU / iptables-restore CPU",
    "nftables endpoint change CPU / iptables change CPU",
    "ebpf endpoint change CPU / iptables change CPU",
];

/// The regression a ratio may show before it fails the check: `data` for the [`GATED`]
/// ones, `control` for the [`CONTROL_GATED`] ones; `None`: printed only.
fn gate(what: &str, data: f64, control: f64) -> Option<f64> {
    if GATED.contains(&what) {
        Some(data)
    } else if CONTROL_GATED.contains(&what) {
        Some(control)
    } else {
        None
    }
}

/// Whether a gated ratio depends on the machine's shape, not only on its speed: peak RSS
/// follows the number of cores (a runtime worker thread and allocator arena per core), so
/// it is gated only against a baseline from a machine with as many cores.
fn needs_same_cores(what: &str) -> bool {
    what.contains("RSS")
}

/// A committed baseline, or one run of the check.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct CheckRun {
    pub(crate) date: String,
    pub(crate) machine: Machine,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    pub(crate) services: usize,
    /// The build profile of the weir binaries measured ("release" or "debug").
    #[serde(default = "release")]
    pub(crate) profile: String,
    /// Every repetition's ratios.
    pub(crate) samples: Vec<Sample>,
    /// Their medians, what is compared.
    pub(crate) medians: BTreeMap<String, f64>,
}

fn release() -> String {
    "release".into()
}

/// The median, lowest and highest value of a ratio over the repetitions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The lowest.
    pub min: f64,
    /// The highest.
    pub max: f64,
}

impl Spread {
    /// (max − min) ÷ median: how far apart the repetitions were.
    pub fn relative(&self) -> f64 {
        (self.max - self.min) / self.median
    }
}

/// Every ratio's spread over the samples (a ratio missing from a sample is skipped there).
pub fn spreads(samples: &[Sample]) -> BTreeMap<String, Spread> {
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in samples {
        for (k, v) in s {
            if v.is_finite() {
                values.entry(k.clone()).or_default().push(*v);
            }
        }
    }
    values
        .into_iter()
        .filter_map(|(k, v)| {
            let min = v.iter().copied().reduce(f64::min)?;
            let max = v.iter().copied().reduce(f64::max)?;
            Some((
                k,
                Spread {
                    median: median(v)?,
                    min,
                    max,
                },
            ))
        })
        .collect()
}

/// One ratio against the baseline: higher is worse.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The ratio's name.
    pub what: String,
    /// The baseline's median.
    pub base: f64,
    /// This run's median and spread.
    pub now: Spread,
    /// The regression beyond which it fails the check (`None`: printed only, flagged
    /// beyond the data-path tolerance).
    pub gate: Option<f64>,
    /// now ÷ base − 1.
    pub change: f64,
}

impl Verdict {
    /// Whether the ratio got worse by more than `tolerance`.
    pub fn worse(&self, tolerance: f64) -> bool {
        self.change > tolerance
    }

    /// Whether it fails the check.
    pub fn failed(&self) -> bool {
        self.gate.is_some_and(|t| self.worse(t))
    }
}

/// How much a ratio may regress: per [`GATED`] and [`CONTROL_GATED`] ratio.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerances {
    /// For the data-path and memory ratios (and the flag on ungated ones).
    pub data: f64,
    /// For the control-plane ratios.
    pub control: f64,
}

/// The ratios present in both the baseline and this run, compared; `same_cores`: whether
/// the baseline's machine had as many cores as this one.
pub fn verdicts(
    base: &BTreeMap<String, f64>,
    now: &BTreeMap<String, Spread>,
    same_cores: bool,
    tol: Tolerances,
) -> Vec<Verdict> {
    now.iter()
        .filter_map(|(what, s)| {
            let b = *base.get(what)?;
            Some(Verdict {
                what: what.clone(),
                base: b,
                now: *s,
                gate: gate(what, tol.data, tol.control)
                    .filter(|_| same_cores || !needs_same_cores(what)),
                change: s.median / b - 1.0,
            })
        })
        .collect()
}

/// How many gated ratios regressed beyond their tolerance.
pub fn failures(verdicts: &[Verdict]) -> usize {
    verdicts.iter().filter(|v| v.failed()).count()
}

/// The comparison as a table.
pub fn render(verdicts: &[Verdict], tolerance: f64) -> String {
    let mut s = format!(
        "{:<52} {:>9} {:>9} {:>19} {:>8}\n",
        "ratio (lower is better)", "baseline", "now", "now: min..max", "change"
    );
    for v in verdicts {
        let _ = writeln!(
            s,
            "{:<52} {:>9.3} {:>9.3} {:>9.3}..{:<9.3} {:>+7.0}%{}",
            v.what,
            v.base,
            v.now.median,
            v.now.min,
            v.now.max,
            v.change * 100.0,
            match v.gate {
                Some(_) if v.failed() => "  REGRESSION".to_owned(),
                Some(t) if t != tolerance => format!("  (gated at {:+.0}%)", t * 100.0),
                Some(_) => String::new(),
                None if v.worse(tolerance) => "  (worse; not gated)".to_owned(),
                None => "  (not gated)".to_owned(),
            }
        );
    }
    s
}

// ---------------------------------------------------------------- one repetition

struct Ctx {
    bin: PathBuf,
    services: usize,
    eps: usize,
    changes: usize,
    spec: LoadSpec,
    work: tempfile::TempDir,
}

/// The reference: kube-proxy's iptables nat table of N Services, one endpoint change.
/// (CPU s, wall s, change CPU ms).
fn reference(ctx: &Ctx) -> Result<(f64, f64, f64)> {
    let (n, eps) = (ctx.services, ctx.eps);
    let ns = Netns::new("check-ref")?;
    let file = ctx.work.path().join("iptables.rules");
    std::fs::write(&file, iptables_ruleset(n, eps))?;
    let limit = Duration::from_secs(120);
    let f = file.display().to_string();
    let full = timed(&ns, &["iptables-legacy-restore", &f], limit)?;
    let Some(wall) = full.secs else {
        bail!("the reference load took more than 120 s");
    };
    let mut changes = Vec::new();
    for svc in changed_services(n, ctx.changes) {
        let change = ctx.work.path().join("iptables-change.rules");
        std::fs::write(&change, iptables_change(n, eps, svc))?;
        let c = change.display().to_string();
        let t = timed(&ns, &["iptables-legacy-restore", "--noflush", &c], limit)?;
        changes.push(t.cpu * 1000.0);
    }
    Ok((full.cpu, wall, median(changes).unwrap_or(f64::NAN)))
}

/// weir in `mode` on a fresh topology: its CPU to the first full sync, full-sync metric,
/// median partial sync and CPU per endpoint change, peak RSS, and the ClusterIP against
/// pod IP latency and throughput ratios of one interleaved weir-load run, keyed
/// `"<mode> <what>"`.
fn weir(ctx: &Ctx, mode: &str, rep: usize) -> Result<Sample> {
    let (n, eps, bin) = (ctx.services, ctx.eps, &ctx.bin);
    let topo = topology(bin, eps)?;
    let dir = ctx.work.path().join(format!("{mode}-{rep}"));
    std::fs::create_dir_all(&dir)?;
    write_manifests(&dir, n, eps, &[], false)?;
    let scratch = match mode {
        "ebpf" => Some(EbpfScratch::new(&format!("check-{rep}"))?),
        _ => None,
    };
    let log = ctx.work.path().join(format!("{mode}-{rep}.log"));
    let mut w = start_weir(bin, &topo.node, mode, &dir, scratch.as_ref(), &log)?;
    let limit = Duration::from_secs(120);
    let Some(full) = wait_metric(bin, &topo.node, &mut w.child, FULL, 0.0, limit)? else {
        bail!("weir-proxy ({mode}) did not sync within 120 s");
    };
    let cpu = cpu_seconds_precise(w.pid).context("weir-proxy's schedstat")?;
    let mut removed = Vec::new();
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    let mut last = metric(bin, &topo.node, LAST).unwrap_or(0.0);
    for svc in changed_services(n, ctx.changes) {
        let sum0 = metric(bin, &topo.node, PARTIAL_SUM).unwrap_or(0.0);
        let count0 = metric(bin, &topo.node, PARTIAL_COUNT).unwrap_or(0.0);
        let cpu0 = cpu_seconds_precise(w.pid).unwrap_or(f64::NAN);
        removed.push(svc);
        write_manifests(&dir, n, eps, &removed, true)?;
        // Most changes are synced well within this; polling less often keeps the scrapes'
        // own CPU out of the change's.
        std::thread::sleep(Duration::from_millis(400));
        let Some(t) = wait_metric(bin, &topo.node, &mut w.child, LAST, last, limit)? else {
            bail!("weir-proxy ({mode}) did not sync an endpoint change within 120 s");
        };
        cpus.push((cpu_seconds_precise(w.pid).unwrap_or(f64::NAN) - cpu0) * 1000.0);
        last = t;
        let sum = metric(bin, &topo.node, PARTIAL_SUM).unwrap_or(f64::NAN);
        let count = metric(bin, &topo.node, PARTIAL_COUNT).unwrap_or(f64::NAN);
        if count > count0 {
            walls.push((sum - sum0) / (count - count0) * 1000.0);
        }
    }
    let rss = status_kib(w.pid, "VmHWM:").map_or(f64::NAN, |k| k as f64 / 1024.0);
    let (service, direct) = measured_targets(n, eps);
    let client = topo.pods.last().context("no client pod")?;
    let cgroup = scratch.as_ref().map(|s| s.cgroup.as_path());
    let t = load(bin, client, cgroup, &[&service, &direct], ctx.spec)?;
    let mut s = Sample::new();
    let mut put = |k: &str, v: f64| {
        s.insert(format!("{mode} {k}"), v);
    };
    put("sync CPU (s)", cpu);
    put("full sync (s)", full);
    put("endpoint change (ms)", median(walls).unwrap_or(f64::NAN));
    put("endpoint change CPU (ms)", median(cpus).unwrap_or(f64::NAN));
    put("peak RSS (MiB)", rss);
    put("ClusterIP p50 / pod IP p50", t[0].p50_us / t[1].p50_us);
    put("pod IP req/s / ClusterIP req/s", t[1].rps / t[0].rps);
    drop(w);
    drop(topo);
    drop(scratch);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// One repetition: the reference, then weir in both modes; the ratios.
fn repetition(ctx: &Ctx, rep: usize) -> Result<Sample> {
    let (ref_cpu, ref_wall, ref_change) = reference(ctx)?;
    let mut out = Sample::new();
    for mode in ["nftables", "ebpf"] {
        let s = weir(ctx, mode, rep)?;
        let get = |k: &str| s.get(&format!("{mode} {k}")).copied().unwrap_or(f64::NAN);
        let mut put = |k: &str, v: f64| {
            out.insert(format!("{mode} {k}"), v);
        };
        put(
            "sync CPU / iptables-restore CPU",
            get("sync CPU (s)") / ref_cpu,
        );
        put(
            "full sync / iptables-restore wall",
            get("full sync (s)") / ref_wall,
        );
        put(
            "endpoint change / iptables change CPU",
            get("endpoint change (ms)") / ref_change,
        );
        put(
            "endpoint change CPU / iptables change CPU",
            get("endpoint change CPU (ms)") / ref_change,
        );
        put("peak RSS (MiB)", get("peak RSS (MiB)"));
        put(
            "ClusterIP p50 / pod IP p50",
            get("ClusterIP p50 / pod IP p50"),
        );
        put(
            "pod IP req/s / ClusterIP req/s",
            get("pod IP req/s / ClusterIP req/s"),
        );
    }
    eprintln!(
        "   repetition {}: reference {ref_cpu:.2} s CPU, change {ref_change:.0} ms CPU; load {}",
        rep + 1,
        loadavg()
    );
    Ok(out)
}

/// `reps` repetitions.
fn measure(args: &CheckArgs, root: &Path) -> Result<CheckRun> {
    crate::toolchain::ensure_ebpf()?;
    let profile = if args.debug { "debug" } else { "release" };
    if !args.debug {
        crate::bench::rig::build_release(root)?;
    }
    if !weir_e2e::require_privileges() {
        bail!("bench check needs root and network namespaces");
    }
    let ctx = Ctx {
        bin: profile_dir(root, profile),
        services: args.services,
        eps: 10,
        changes: 5,
        spec: LoadSpec {
            requests: 400,
            concurrency: 4,
            millis: 600,
        },
        work: tempfile::Builder::new()
            .prefix("weir-bench-check-")
            .tempdir()?,
    };
    let mut run = CheckRun {
        date: now_utc(),
        machine: machine(),
        load_before: loadavg(),
        services: args.services,
        profile: profile.into(),
        ..CheckRun::default()
    };
    eprintln!(
        "==> bench check: {} repetitions at {} services (load average {})",
        args.reps, args.services, run.load_before
    );
    for rep in 0..args.reps {
        run.samples.push(repetition(&ctx, rep)?);
    }
    run.load_after = loadavg();
    run.medians = spreads(&run.samples)
        .into_iter()
        .map(|(k, s)| (k, s.median))
        .collect();
    Ok(run)
}

fn print_spreads(run: &CheckRun) {
    println!(
        "{:<52} {:>9} {:>19} {:>7}",
        "ratio", "median", "min..max", "spread"
    );
    for (k, s) in spreads(&run.samples) {
        println!(
            "{k:<52} {:>9.3} {:>9.3}..{:<9.3} {:>6.0}%",
            s.median,
            s.min,
            s.max,
            s.relative() * 100.0
        );
    }
}

/// `bench check`: repetitions compared with the committed baseline by ratio.
pub fn check(args: CheckArgs, root: &Path) -> Result<()> {
    let baseline_path = root.join(&args.baseline);
    if args.update {
        let run = measure(&args, root)?;
        print_spreads(&run);
        std::fs::write(&baseline_path, serde_json::to_string_pretty(&run)? + "\n")?;
        eprintln!(
            "baseline written to {} (load average {} → {})",
            baseline_path.display(),
            run.load_before,
            run.load_after
        );
        return Ok(());
    }
    let base: CheckRun = serde_json::from_str(
        &std::fs::read_to_string(&baseline_path)
            .with_context(|| format!("reading {}", baseline_path.display()))?,
    )
    .with_context(|| {
        format!(
            "{} is not a bench check baseline (write one with `cargo xtask bench check --update`)",
            baseline_path.display()
        )
    })?;
    if base.services != args.services {
        bail!(
            "the baseline was taken at {} services, this check at {}",
            base.services,
            args.services
        );
    }
    let mut run = measure(&args, root)?;
    let same_cores = base.machine.cores == run.machine.cores && base.profile == run.profile;
    if !same_cores {
        eprintln!(
            "the baseline measured {} binaries on a machine with {} cores, this run {} binaries \
             with {} cores: peak RSS is shown, not gated",
            base.profile, base.machine.cores, run.profile, run.machine.cores
        );
    }
    let tol = Tolerances {
        data: args.tolerance,
        control: args.control_tolerance,
    };
    let mut v = verdicts(&base.medians, &spreads(&run.samples), same_cores, tol);
    if v.is_empty() {
        bail!("nothing to compare: the baseline and this run have no ratio in common");
    }
    // A shared machine has bursts: when a gated ratio looks regressed, as many
    // repetitions again are taken and the median over all of them counts.
    if failures(&v) > 0 {
        eprintln!("a gated ratio looks regressed; measuring as many repetitions again");
        let more = measure(&args, root)?;
        run.samples.extend(more.samples);
        run.load_after = more.load_after;
        v = verdicts(&base.medians, &spreads(&run.samples), same_cores, tol);
    }
    if let Some(save) = &args.save {
        run.medians = spreads(&run.samples)
            .into_iter()
            .map(|(k, s)| (k, s.median))
            .collect();
        std::fs::write(root.join(save), serde_json::to_string_pretty(&run)? + "\n")?;
    }
    println!(
        "load average {} → {} (baseline {}: {} → {}), {} repetitions at {} services",
        run.load_before,
        run.load_after,
        base.date,
        base.load_before,
        base.load_after,
        run.samples.len(),
        run.services
    );
    print!("{}", render(&v, args.tolerance));
    let failed = failures(&v);
    if failed > 0 {
        bail!(
            "{failed} gated ratio(s) regressed by more than their tolerance ({:.0}% data path \
             and memory, {:.0}% control plane) against {}",
            args.tolerance * 100.0,
            args.control_tolerance * 100.0,
            baseline_path.display()
        );
    }
    println!(
        "no gated ratio regressed by more than its tolerance ({:.0}% data path and memory, \
         {:.0}% control plane)",
        args.tolerance * 100.0,
        args.control_tolerance * 100.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pairs: &[(&str, f64)]) -> Sample {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn spreads_take_the_median_and_range_of_each_ratio_over_the_repetitions() {
        let s = spreads(&[
            sample(&[("a", 1.0), ("b", 5.0)]),
            sample(&[("a", 3.0), ("b", f64::NAN)]),
            sample(&[("a", 2.0)]),
        ]);
        assert_eq!(
            s["a"],
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert!((s["a"].relative() - 1.0).abs() < 1e-9);
        assert_eq!(s["b"].median, 5.0);
    }

    #[test]
    fn only_a_gated_ratio_worse_than_the_tolerance_fails() {
        let gated = GATED[0];
        let base: BTreeMap<String, f64> = [(gated.to_string(), 1.0), ("noisy".to_string(), 1.0)]
            .into_iter()
            .collect();
        let now = |g: f64, n: f64| spreads(&[sample(&[(gated, g), ("noisy", n), ("new", 1.0)])]);
        let v = verdicts(&base, &now(1.2, 3.0), true, TOL);
        assert_eq!(
            v.len(),
            2,
            "a ratio missing from the baseline is not compared"
        );
        assert_eq!(failures(&v), 0, "{v:?}");
        let v = verdicts(&base, &now(1.3, 1.0), true, TOL);
        assert_eq!(failures(&v), 1);
        let table = render(&v, 0.25);
        assert!(table.contains("REGRESSION"), "{table}");
        // Better than the baseline never fails.
        assert_eq!(failures(&verdicts(&base, &now(0.1, 0.1), true, TOL)), 0);
    }

    const TOL: Tolerances = Tolerances {
        data: 0.25,
        control: 1.0,
    };

    #[test]
    fn a_control_plane_ratio_fails_only_beyond_its_own_wider_tolerance() {
        let sync = CONTROL_GATED[0];
        let base: BTreeMap<String, f64> = [(sync.to_string(), 2.0)].into_iter().collect();
        let at = |x: f64| verdicts(&base, &spreads(&[sample(&[(sync, x)])]), true, TOL);
        // 50 % worse: beyond the data-path tolerance, inside the control plane's.
        assert_eq!(failures(&at(3.0)), 0);
        assert!(render(&at(3.0), 0.25).contains("gated at +100%"));
        assert_eq!(failures(&at(4.2)), 1);
        // The wall-clock ratios are printed, never gated.
        let wall = "nftables full sync / iptables-restore wall";
        assert!(gate(wall, 0.25, 1.0).is_none());
    }

    #[test]
    fn the_default_arguments_are_the_command_lines() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: CheckArgs,
        }
        assert_eq!(Cli::parse_from(["check"]).args, CheckArgs::default());
    }

    #[test]
    fn peak_rss_is_gated_only_against_a_baseline_with_as_many_cores() {
        let rss = "nftables peak RSS (MiB)";
        assert!(GATED.contains(&rss));
        let base: BTreeMap<String, f64> = [(rss.to_string(), 50.0)].into_iter().collect();
        let now = spreads(&[sample(&[(rss, 80.0)])]);
        assert_eq!(failures(&verdicts(&base, &now, true, TOL)), 1);
        assert_eq!(failures(&verdicts(&base, &now, false, TOL)), 0);
    }
}
