//! A `bench compare` run's rows and how they are written out: JSON (serde), CSV, the
//! markdown table, and the series the plots draw.

use crate::bench::rig::{Machine, Traffic};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One dataplane at one size.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Row {
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
    pub(crate) mode: String,
    /// `ok`, `> 60 s`, `not measured (...)` or an error.
    pub(crate) status: String,
    /// weir: its sync-duration metric; references: the loader's wall time.
    pub(crate) full_sync_s: Option<f64>,
    /// weir: process start to the first sync done (manifests parsed, rules written).
    pub(crate) startup_s: Option<f64>,
    pub(crate) change_ms: Option<f64>,
    pub(crate) peak_rss_mib: Option<f64>,
    pub(crate) cpu_s: Option<f64>,
    pub(crate) clusterip: Option<Traffic>,
    pub(crate) nodeport: Option<Traffic>,
    /// Why NodePort was not measured, when it was not.
    pub(crate) nodeport_note: Option<String>,
}

/// A whole run.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Report {
    pub(crate) date: String,
    pub(crate) machine: Machine,
    pub(crate) quick: bool,
    pub(crate) limit_s: u64,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    /// Where the run happened when not on `machine` directly (the qemu guest: its vCPUs
    /// and memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) environment: Option<String>,
    /// The machine under the guest, with its load average before the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) host: Option<String>,
    pub(crate) rows: Vec<Row>,
    /// Later partial re-runs merged into this report (`--only`, `--modes`): what, when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) partial_runs: Vec<String>,
}

pub(crate) fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// A [`Traffic`]'s five CSV fields: connect p50, p99, request p50, p99, requests/s
/// (empty when not measured).
pub(crate) fn traffic_csv(t: &Option<Traffic>) -> String {
    match t {
        Some(t) => format!(
            "{:.0},{:.0},{:.0},{:.0},{:.0}",
            t.connect_p50_us, t.connect_p99_us, t.p50_us, t.p99_us, t.rps
        ),
        None => ",,,,".into(),
    }
}

const CSV_HEADER: &str = "services,endpoints,mode,status,full_sync_s,startup_s,change_ms,peak_rss_mib,cpu_s,clusterip_connect_p50_us,clusterip_connect_p99_us,clusterip_p50_us,clusterip_p99_us,clusterip_rps,nodeport_connect_p50_us,nodeport_connect_p99_us,nodeport_p50_us,nodeport_p99_us,nodeport_rps,nodeport_note";

pub(crate) fn csv(report: &Report) -> String {
    let mut s = format!("# {}\n{CSV_HEADER}\n", report.describe());
    for p in &report.partial_runs {
        let _ = writeln!(s, "# then {p}");
    }
    for r in &report.rows {
        let t = traffic_csv;
        let quote = |x: &str| format!("\"{}\"", x.replace('"', "'"));
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.services,
            r.endpoints,
            r.mode,
            quote(&r.status),
            opt(r.full_sync_s, 4).replace('-', ""),
            opt(r.startup_s, 3).replace('-', ""),
            opt(r.change_ms, 3).replace('-', ""),
            opt(r.peak_rss_mib, 1).replace('-', ""),
            opt(r.cpu_s, 2).replace('-', ""),
            t(&r.clusterip),
            t(&r.nodeport),
            quote(r.nodeport_note.as_deref().unwrap_or(""))
        );
    }
    s
}

/// The results as a markdown table.
pub fn markdown(report: &Report) -> String {
    let mut s = format!("{}\n\n", report.describe());
    for p in &report.partial_runs {
        let _ = writeln!(s, "then {p}\n");
    }
    s.push_str("| services | dataplane | full sync (s) | 1 endpoint change (ms) | peak RSS (MiB) | CPU (s) | ClusterIP connect p50 (µs) | ClusterIP req p50 / p99 (µs) | ClusterIP req/s | NodePort req p50 / p99 (µs) | NodePort req/s | note |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in &report.rows {
        let full = match (r.full_sync_s, r.status.starts_with('>')) {
            (_, true) => r.status.clone(),
            (v, _) => opt(v, 3),
        };
        let (cc, cl, cr) = match &r.clusterip {
            Some(t) => (
                format!("{:.0}", t.connect_p50_us),
                format!("{:.0} / {:.0}", t.p50_us, t.p99_us),
                format!("{:.0}", t.rps),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let (nl, nr) = match &r.nodeport {
            Some(t) => (
                format!("{:.0} / {:.0}", t.p50_us, t.p99_us),
                format!("{:.0}", t.rps),
            ),
            None => ("-".into(), "-".into()),
        };
        let mut note = String::new();
        if r.status != "ok" && !r.status.starts_with('>') {
            note.push_str(&r.status);
        }
        if let Some(n) = &r.nodeport_note {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(n);
        }
        let _ = writeln!(
            s,
            "| {} | {} | {full} | {} | {} | {} | {cc} | {cl} | {cr} | {nl} | {nr} | {note} |",
            r.services,
            r.mode,
            opt(r.change_ms, 2),
            opt(r.peak_rss_mib, 1),
            opt(r.cpu_s, 2),
        );
    }
    s
}

/// The report's rows of one mode with a value, as (services, value) points.
pub fn series(report: &Report, mode: &str, value: impl Fn(&Row) -> Option<f64>) -> Vec<(f64, f64)> {
    report
        .rows
        .iter()
        .filter(|r| r.mode == mode)
        .filter_map(|r| Some((r.services as f64, value(r).filter(|v| v.is_finite())?)))
        .collect()
}

impl Report {
    /// One short line describing the machine and the run (the plots' caption).
    pub fn caption(&self) -> String {
        let mut s = format!(
            "{} · {} × {} · {} · load {}",
            self.date, self.machine.cpu, self.machine.cores, self.machine.kernel, self.load_before
        );
        if let Some(e) = &self.environment {
            let _ = write!(s, " · {e}");
        }
        s
    }

    /// The run's date, machine, environment and load averages on one line (the CSV's
    /// first comment, the markdown table's caption).
    pub fn describe(&self) -> String {
        let m = &self.machine;
        let parts = [
            self.date.clone(),
            format!("{} × {} cores", m.cpu, m.cores),
            format!("kernel {}", m.kernel),
            m.nft.clone(),
            // No iptables in the guest.
            m.iptables.clone(),
            format!("load {} → {}", self.load_before, self.load_after),
            self.environment.clone().unwrap_or_default(),
            self.host
                .as_ref()
                .map(|h| format!("host: {h}"))
                .unwrap_or_default(),
        ];
        parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(" · ")
    }
    /// Every size measured.
    pub fn sizes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.rows.iter().map(|r| r.services).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}
