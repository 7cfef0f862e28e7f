//! `cargo xtask conformance`: upstream's own e2e suite (the pinned release's e2e.test, run by
//! its ginkgo in parallel) against a cluster of `cargo xtask cluster` (6 nodes in 3 zones
//! by default), in one of weir's
//! modes or with the real kube-proxy as the baseline. Writes ginkgo's JUnit report trimmed
//! to the specs that ran, the log and a summary into the report directory; prints
//! `N passed, N failed, N skipped`. docs/conformance.md holds the committed runs.

use crate::junit::{self, Outcome, Summary};
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use weir_e2e::cluster::{self, Cluster};

/// The specs run by default: sig-network's.
pub const DEFAULT_FOCUS: &str = r"\[sig-network\]";

/// Specs never run here, each with the reason (docs/conformance.md lists the same).
pub const SKIPS: [(&str, &str); 11] = [
    (
        r"\[Feature:IPv6DualStack\]",
        "the cluster is IPv4-only (one pod and one Service CIDR)",
    ),
    (
        r"\[Feature:LoadBalancer\]",
        "no cloud provider: nothing allocates load-balancer addresses",
    ),
    (
        r"\[Feature:SCTPConnectivity\]",
        "this kernel has no SCTP sockets (the SCTP tests that need none still run)",
    ),
    (
        r"\[Disruptive\]",
        "they restart kube-proxy or the API server over SSH to the nodes; the nodes have no SSH",
    ),
    (
        r"\[Feature:Networking-IPv4\]|\[Feature:Networking-IPv6\]|\[Feature:Networking-DNS\]",
        "they reach the internet (8.8.8.8, google.com); test traffic stays on this machine",
    ),
    (r"\[Provider:gce\]", "GCE only"),
    (
        r"\[Feature:Networking-Performance\]",
        "an iperf2 throughput measurement, not a check (benchmarks are cargo xtask bench)",
    ),
    (
        r"\[Feature:PerformanceDNS\]",
        "creates thousands of Services to load the DNS; a benchmark, hours on two cores",
    ),
    (
        r"should let a node pull an image from a registry exposed via localhost NodePort",
        "needs agnhost's built-in fake registry (crane-prepared images from the internet)",
    ),
    (
        r"DNS configMap nameserver Forward PTR lookup",
        "before it forwards to its own server, it resolves 8.8.8.8's PTR record (dns.google) through the cluster DNS's default upstream: the internet",
    ),
    (
        r"KubeProxy should set TCP CLOSE_WAIT timeout",
        "checks the conntrack CLOSE_WAIT timeout kube-proxy sets with a sysctl: every node here shares this host's conntrack settings, so neither weir nor the baseline's kube-proxy (--conntrack-tcp-timeout-close-wait=0s) changes them",
    ),
];

/// Specs skipped in every mode but kube-proxy's iptables mode, with the reason.
pub const NOT_IPTABLES_SKIPS: [(&str, &str); 1] = [(
    r"\[Feature:LocalhostNodePorts\]",
    "NodePorts on 127.0.0.1 are kube-proxy's iptables mode only (route_localnet); its nftables mode dropped them (KEP-3866), and weir's modes follow the nftables mode",
)];

/// The CI smoke: a few of every kind (Services, NodePort, affinity, traffic policy,
/// conntrack, hairpin, DNS, NetworkPolicy), about 5 minutes.
pub const SMOKE: [&str; 14] = [
    "Services should serve a basic endpoint from pods [Conformance]",
    "Services should serve multiport endpoints from pods [Conformance]",
    "Services should be able to create a functioning NodePort service [Conformance]",
    "Services should have session affinity work for service with type clusterIP [LinuxOnly] [Conformance]",
    "Services should be able to change the type from ExternalName to NodePort [Conformance]",
    "Services should be rejected when no endpoints exist",
    "Services should implement service.kubernetes.io/service-proxy-name",
    "Services should allow pods to hairpin back to themselves through services",
    "Services should support externalTrafficPolicy=Local for type=NodePort",
    "Networking Granular Checks: Services should function for pod-Service: udp",
    "Networking Granular Checks: Pods should function for intra-pod communication: http [Conformance]",
    "Conntrack should be able to preserve UDP traffic when server pod cycles for a ClusterIP service",
    "DNS should provide DNS for services [Conformance]",
    "Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy",
];

/// `cargo xtask conformance` options.
#[derive(clap::Args, Clone, Debug)]
pub struct ConformanceArgs {
    /// nftables or ebpf (weir), or kube-proxy-nftables / kube-proxy-iptables (the real
    /// kube-proxy of the pinned release serves Services; weir-cni and weir's NetworkPolicy
    /// stay).
    #[arg(long, default_value = "nftables")]
    pub proxy_mode: String,
    /// Specs to run (a ginkgo regular expression; default: every sig-network spec).
    #[arg(long)]
    pub focus: Option<String>,
    /// Specs to leave out, besides the ones that cannot run here (docs/conformance.md).
    #[arg(long)]
    pub skip: Option<String>,
    /// Only the CI smoke (14 specs).
    #[arg(long, conflicts_with = "focus")]
    pub smoke: bool,
    /// Where the JUnit report, log and summary go (default target/conformance/<mode>/).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Parallel ginkgo processes.
    #[arg(long, default_value_t = 4)]
    pub procs: usize,
    /// Nodes of the cluster (the default, 6, is two in each of three zones: the fewest on
    /// which upstream's topology and trafficDistribution specs all run).
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Leave the cluster up afterwards (`cargo xtask cluster down` removes it).
    #[arg(long)]
    pub keep: bool,
}

impl ConformanceArgs {
    /// The smoke `cargo xtask test` runs on its cluster.
    pub fn smoke(report: PathBuf) -> Self {
        ConformanceArgs {
            proxy_mode: "nftables".to_owned(),
            focus: None,
            skip: None,
            smoke: true,
            report: Some(report),
            procs: 4,
            nodes: 2,
            keep: false,
        }
    }

    fn focus(&self) -> String {
        if self.smoke {
            let names: Vec<String> = SMOKE.iter().map(|s| regex_quote(s)).collect();
            return format!(r"\[sig-network\] ({})", names.join("|"));
        }
        self.focus
            .clone()
            .unwrap_or_else(|| DEFAULT_FOCUS.to_owned())
    }

    fn skip(&self) -> String {
        let mode_skips: &[(&str, &str)] = if self.proxy_mode == "kube-proxy-iptables" {
            &[]
        } else {
            &NOT_IPTABLES_SKIPS
        };
        let mut all: Vec<String> = SKIPS
            .iter()
            .chain(mode_skips)
            .map(|(re, _)| format!("({re})"))
            .collect();
        if let Some(s) = &self.skip {
            all.push(format!("({s})"));
        }
        all.join("|")
    }
}

/// `s` matched literally in a ginkgo (Go RE2) regular expression.
pub fn regex_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Brings a cluster up, runs the suite, takes the cluster down (unless `--keep`); fails
/// when a spec failed.
pub fn conformance(args: ConformanceArgs, root: &Path) -> Result<()> {
    let up = crate::cluster::UpArgs {
        nodes: args.nodes,
        proxy_mode: args.proxy_mode.clone(),
    };
    let c = crate::cluster::up(&up, root)?;
    let result = run_on(&c, &args, root);
    if result.is_err() {
        eprintln!("{}", c.diagnose());
    }
    if !args.keep {
        cluster::down()?;
    }
    result.map(|_| ())
}

/// Runs the suite on a running cluster; the summary, or an error when a spec failed.
pub fn run_on(c: &Cluster, args: &ConformanceArgs, root: &Path) -> Result<Summary> {
    let dir = args
        .report
        .clone()
        .unwrap_or_else(|| root.join("target/conformance").join(&args.proxy_mode));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for stale in ["ginkgo-junit.xml", "junit.xml", "summary.txt", "e2e.log"] {
        let _ = fs::remove_file(dir.join(stale));
    }
    let dir = fs::canonicalize(&dir)?;
    let started = Instant::now();
    let focus = args.focus();
    let skip = args.skip();
    let bins = &c.bins;
    let mut cmd = Command::new(&bins.ginkgo);
    cmd.arg(format!("--procs={}", args.procs.max(1)))
        .arg("--no-color")
        .arg("--timeout=6h")
        .arg(format!("--focus={focus}"))
        .arg(format!("--skip={skip}"))
        .arg(format!("--output-dir={}", dir.display()))
        .arg("--junit-report=ginkgo-junit.xml")
        .arg(&bins.e2e_test)
        .arg("--")
        .arg(format!("--kubeconfig={}", c.kubeconfig().display()))
        .arg(format!("--kubectl-path={}", bins.kubectl.display()))
        .arg("--provider=local")
        .arg(format!("--num-nodes={}", c.nodes))
        .arg("--disable-log-dump")
        .arg("--dump-logs-on-failure=false")
        .arg(format!(
            "--e2e-output-dir={}",
            dir.join("e2e-output").display()
        ))
        .env("KUBECONFIG", c.kubeconfig())
        .env("PATH", path_with(&bins.dir))
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!(
        "\n==> e2e ({} mode, {} processes): focus {focus}\n    skip {skip}\n    log {}",
        args.proxy_mode,
        args.procs,
        dir.join("e2e.log").display()
    );
    let mut child = cmd.spawn().context("starting ginkgo")?;
    let mut log = fs::File::create(dir.join("e2e.log"))?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            writeln!(log, "{line}")?;
            if is_progress_line(&line) {
                eprintln!("{line}");
            }
        }
    }
    let status = child.wait()?;
    let report = dir.join("ginkgo-junit.xml");
    let xml = fs::read_to_string(&report).with_context(|| {
        format!(
            "ginkgo ({status}) wrote no {}; its log: {}",
            report.display(),
            dir.join("e2e.log").display()
        )
    })?;
    let summary = junit::parse(&xml)?;
    fs::write(
        dir.join("junit.xml"),
        junit::without_filtered(&xml, &summary)?,
    )?;
    fs::remove_file(&report)?;
    let text = summary_text(&summary, args, started.elapsed().as_secs());
    fs::write(dir.join("summary.txt"), &text)?;
    eprint!("{text}");
    println!("{}", summary.line());
    if summary.selected() == 0 {
        bail!("no spec matched the focus {focus}");
    }
    if summary.failed() > 0 {
        bail!(
            "{} of {} specs failed ({})",
            summary.failed(),
            summary.selected(),
            dir.join("summary.txt").display()
        );
    }
    if !status.success() {
        bail!("ginkgo exited with {status} although no spec failed; see its log");
    }
    Ok(summary)
}

/// ginkgo's lines worth showing live: a spec's end and the final tally.
fn is_progress_line(line: &str) -> bool {
    let l = line.trim_start();
    l.starts_with("• [FAILED]")
        || l.starts_with("• [PANICKED]")
        || l.starts_with("• [TIMEDOUT]")
        || l.starts_with("Ran ")
        || l.starts_with("FAIL!")
        || l.starts_with("SUCCESS!")
        || l.contains("[FAIL]")
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The summary file: the tally, then every failed and skipped spec with its reason.
pub fn summary_text(s: &Summary, args: &ConformanceArgs, seconds: u64) -> String {
    let mut out = format!(
        "mode {}: {} (of {} selected) in {} min, Kubernetes {}\n",
        args.proxy_mode,
        s.line(),
        s.selected(),
        seconds / 60,
        weir_e2e::k8s::release()
    );
    for c in &s.cases {
        match &c.outcome {
            Outcome::Failed(msg) => {
                let first = msg.lines().next().unwrap_or("");
                out.push_str(&format!("FAILED  {}\n        {first}\n", c.name));
            }
            Outcome::Skipped(reason) => {
                out.push_str(&format!("SKIPPED {}\n        {reason}\n", c.name));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_are_quoted_for_ginkgo() {
        assert_eq!(
            regex_quote("a [Conformance] (x)"),
            r"a \[Conformance\] \(x\)"
        );
    }

    #[test]
    fn the_smoke_focus_names_every_smoke_spec_and_the_skips_join() {
        let a = ConformanceArgs::smoke(PathBuf::from("/tmp/x"));
        let f = a.focus();
        assert!(f.starts_with(r"\[sig-network\] ("));
        assert_eq!(f.matches('|').count(), SMOKE.len() - 1);
        let skip = a.skip();
        assert_eq!(
            skip.matches(")|(").count(),
            SKIPS.len() + NOT_IPTABLES_SKIPS.len() - 1
        );
        let iptables = ConformanceArgs {
            proxy_mode: "kube-proxy-iptables".into(),
            ..a.clone()
        };
        assert!(!iptables.skip().contains("LocalhostNodePorts"));
        let extra = ConformanceArgs {
            skip: Some("Foo".into()),
            ..a
        };
        assert!(extra.skip().ends_with("|(Foo)"));
    }

    #[test]
    fn every_skip_is_documented_with_its_reason() {
        let doc = include_str!("../../docs/conformance.md");
        for (re, reason) in SKIPS.iter().chain(&NOT_IPTABLES_SKIPS) {
            assert!(doc.contains(re), "docs/conformance.md does not list {re}");
            assert!(
                doc.contains(reason),
                "docs/conformance.md does not give the reason for {re}"
            );
        }
    }

    /// The committed runs (docs/conformance/<mode>/junit.xml) by mode.
    fn committed(mode: &str) -> Summary {
        let xml = match mode {
            "nftables" => include_str!("../../docs/conformance/nftables/junit.xml"),
            "ebpf" => include_str!("../../docs/conformance/ebpf/junit.xml"),
            "kube-proxy-nftables" => {
                include_str!("../../docs/conformance/kube-proxy-nftables/junit.xml")
            }
            "kube-proxy-iptables" => {
                include_str!("../../docs/conformance/kube-proxy-iptables/junit.xml")
            }
            other => panic!("no committed run of {other}"),
        };
        junit::parse(xml).unwrap()
    }

    fn passed(s: &Summary) -> std::collections::BTreeSet<&str> {
        s.cases
            .iter()
            .filter(|c| c.outcome == Outcome::Passed)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn the_committed_runs_show_weir_passing_every_spec_kube_proxy_passes() {
        // Localhost NodePorts: kube-proxy's iptables mode only (weir's modes, like its
        // nftables mode, do not serve them; the NFAcct spec skips itself elsewhere).
        let iptables_only = |name: &str| {
            NOT_IPTABLES_SKIPS
                .iter()
                .any(|(re, _)| name.contains(&re.replace('\\', "")))
                || name.contains("[Feature:KubeProxyNFAcct]")
        };
        for weir in ["nftables", "ebpf"] {
            let ours = committed(weir);
            assert!(ours.selected() > 150, "{weir}: a full run is committed");
            let ours = passed(&ours);
            for baseline in ["kube-proxy-nftables", "kube-proxy-iptables"] {
                let theirs = committed(baseline);
                let missing: Vec<&str> = passed(&theirs)
                    .into_iter()
                    .filter(|n| !ours.contains(n) && !iptables_only(n))
                    .collect();
                assert!(
                    missing.is_empty(),
                    "{baseline} passes, weir {weir} does not: {missing:#?}"
                );
            }
        }
    }

    #[test]
    fn the_runs_table_matches_the_committed_reports() {
        let doc = include_str!("../../docs/conformance.md");
        for (mode, label) in [
            ("nftables", "weir nftables"),
            ("ebpf", "weir ebpf"),
            ("kube-proxy-nftables", "kube-proxy nftables"),
            ("kube-proxy-iptables", "kube-proxy iptables"),
        ] {
            let s = committed(mode);
            let row = format!(
                "| {label} | {} | {} | {} | {} |",
                s.selected(),
                s.passed(),
                s.failed(),
                s.skipped()
            );
            assert!(
                doc.contains(&row),
                "docs/conformance.md lacks the row {row}"
            );
        }
    }
}
