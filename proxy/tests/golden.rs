//! Golden tests, one folder per Service feature of docs/services.md
//! (tests/golden/<feature>/). Each folder's `input.yaml` goes YAML -> Store -> compute and
//! then through every backend's renderer:
//! - `ip.nft`, `ip6.nft`: what the fake nftables holds after the plan against an empty
//!   kernel; with root the same plan applied to the real kernel in a scratch network
//!   namespace dumps the same table, and planning again against that dump is empty;
//! - `ebpf.txt`: the eBPF maps (`MapContents::to_text`);
//! - `ipvs.txt`: the IPVS virtual and real servers (`ipvs::render::to_text`);
//! - `errors.txt`: the documents and Service ports the source and the model skip, each
//!   naming the object and field (empty when there are none).
//!
//! An optional `node.txt` sets this node's `nodeport-addresses CIDR,...` and
//! `local-addrs IP,...`. `UPDATE_GOLDEN=1` rewrites the files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use weir_proxy::dataplane::ebpf::render::render as ebpf_render;
use weir_proxy::dataplane::ipvs::render::{
    desired as ipvs_desired, to_text as ipvs_text, IpvsConfig,
};
use weir_proxy::dataplane::nft::diff::plan;
use weir_proxy::dataplane::nft::fake::FakeNft;
use weir_proxy::dataplane::nft::kernel::KernelNft;
use weir_proxy::dataplane::nft::render::desired_table;
use weir_proxy::dataplane::nft::{DumpedTable, Family};
use weir_proxy::model::{compute, ModelConfig, NodePortAddresses, Store};
use weir_proxy::source::dir::load_text;
use weir_proxy::source::SourceUpdate;
use weir_proxy::testing::{self, ScratchNetns};

/// The sections of docs/services.md and the folder that shows each; the one section
/// without a folder is runtime behaviour no renderer shows (tested in conntrack_netns).
const FEATURES: [(&str, Option<&str>); 11] = [
    (
        "## ClusterIP, NodePort, protocols",
        Some("clusterip-nodeport"),
    ),
    (
        "## NodePorts and `--nodeport-addresses`",
        Some("nodeport-addresses"),
    ),
    (
        "## ExternalIPs and LoadBalancer ingress IPs",
        Some("external-ips-load-balancer"),
    ),
    (
        "## externalTrafficPolicy: Local",
        Some("external-traffic-policy-local"),
    ),
    (
        "## internalTrafficPolicy: Local",
        Some("internal-traffic-policy-local"),
    ),
    ("## Terminating endpoints", Some("terminating-endpoints")),
    ("## Topology-aware routing", Some("topology")),
    ("## Session affinity (ClientIP)", Some("session-affinity")),
    (
        "## Services without endpoints, unallocated ClusterIPs, other ports",
        Some("no-endpoints"),
    ),
    ("## Dual-stack", Some("dual-stack")),
    ("## Bad input", Some("bad-input")),
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The model settings of a folder: the test node, changed by `node.txt`.
fn model_config(dir: &Path) -> ModelConfig {
    let mut cfg = testing::model_config();
    let Ok(text) = std::fs::read_to_string(dir.join("node.txt")) else {
        return cfg;
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line.split_once(' ').expect("node.txt: KEY VALUE");
        let list = value.split(',').map(str::trim);
        match key {
            "nodeport-addresses" => {
                cfg.nodeport_addresses =
                    NodePortAddresses::Cidrs(list.map(|c| c.parse().unwrap()).collect())
            }
            "local-addrs" => cfg.local_addrs = list.map(|a| a.parse().unwrap()).collect(),
            other => panic!("node.txt: unknown key {other}"),
        }
    }
    cfg
}

/// Everything one folder renders to, by file name.
fn outputs(dir: &Path) -> Vec<(&'static str, String)> {
    let yaml = std::fs::read_to_string(dir.join("input.yaml")).unwrap();
    let loaded = load_text(Path::new("input.yaml"), &yaml);
    let mut errors = String::new();
    for e in &loaded.errors {
        let _ = writeln!(errors, "{e}");
    }
    let mut store = Store::default();
    store.record_all(
        SourceUpdate::listing(loaded.objects),
        std::time::SystemTime::now(),
    );
    let (state, model_errors) = compute(&store, &model_config(dir));
    for e in &model_errors {
        let _ = writeln!(errors, "{e}");
    }
    let render = testing::render_config();
    let nft = |family| {
        let want = desired_table(&state, &render, family);
        let mut fake = FakeNft::default();
        fake.apply(&plan(&want, &DumpedTable::empty(family)))
            .unwrap_or_else(|e| panic!("{}: the fake refused the plan: {e}", dir.display()));
        fake.dump(family).unwrap().to_text()
    };
    vec![
        ("ip.nft", nft(Family::Ip)),
        ("ip6.nft", nft(Family::Ip6)),
        ("ebpf.txt", ebpf_render(&state).to_text()),
        (
            "ipvs.txt",
            ipvs_text(&ipvs_desired(&state, &IpvsConfig::default())),
        ),
        ("errors.txt", errors),
    ]
}

fn feature_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_feature_folder_renders_to_its_golden_files_in_every_backend() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok();
    let mut mismatched = Vec::new();
    let dirs = feature_dirs();
    assert!(dirs.len() >= FEATURES.len(), "{dirs:?}");
    for dir in &dirs {
        for (file, text) in outputs(dir) {
            let path = dir.join(file);
            if update {
                std::fs::write(&path, &text).unwrap();
            }
            let golden = std::fs::read_to_string(&path).unwrap_or_default();
            if golden != text {
                mismatched.push(format!(
                    "{}:\n--- golden\n{golden}\n--- now\n{text}",
                    path.display()
                ));
            }
        }
    }
    assert!(
        mismatched.is_empty(),
        "{} golden files differ (UPDATE_GOLDEN=1 rewrites them):\n{}",
        mismatched.len(),
        mismatched.join("\n")
    );
}

#[test]
fn every_service_feature_of_the_docs_has_its_folder() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/services.md"))
            .unwrap();
    let sections: Vec<&str> = doc.lines().filter(|l| l.starts_with("## ")).collect();
    for (heading, folder) in FEATURES {
        assert!(
            sections.contains(&heading),
            "docs/services.md lacks {heading:?}"
        );
        if let Some(f) = folder {
            assert!(
                golden_dir().join(f).join("input.yaml").is_file(),
                "{heading}: no tests/golden/{f}/input.yaml"
            );
        }
    }
    let covered: Vec<&str> = FEATURES.iter().map(|(h, _)| *h).collect();
    let left: Vec<&&str> = sections
        .iter()
        .filter(|s| {
            !covered.contains(s)
                && ![
                    "## Stale UDP conntrack entries",
                    "## Metrics",
                    "## Differences from kube-proxy",
                ]
                .contains(s)
        })
        .collect();
    assert!(
        left.is_empty(),
        "sections without a golden folder: {left:?}"
    );
}

#[test]
fn every_feature_folder_dumps_the_same_from_the_real_kernel() {
    for dir in feature_dirs() {
        let tag = dir.file_name().unwrap().to_string_lossy().into_owned();
        let Some(ns) = ScratchNetns::new("golden", &tag) else {
            return;
        };
        let kernel = KernelNft::in_netns(ns.name());
        let yaml = std::fs::read_to_string(dir.join("input.yaml")).unwrap();
        let loaded = load_text(Path::new("input.yaml"), &yaml);
        let mut store = Store::default();
        store.record_all(
            SourceUpdate::listing(loaded.objects),
            std::time::SystemTime::now(),
        );
        let (state, _) = compute(&store, &model_config(&dir));
        for family in [Family::Ip, Family::Ip6] {
            let want = desired_table(&state, &testing::render_config(), family);
            let p = plan(&want, &DumpedTable::empty(family));
            kernel
                .apply(&p)
                .unwrap_or_else(|e| panic!("{tag} {family:?}: {e}"));
            let mut fake = FakeNft::default();
            fake.apply(&p).unwrap();
            let theirs = kernel
                .dump(family)
                .unwrap()
                .unwrap_or_else(|| panic!("{tag} {family:?}: no table in the kernel"));
            let ours = fake.dump(family).unwrap();
            assert_eq!(
                theirs.to_text(),
                ours.to_text(),
                "{tag} {family:?}: the kernel holds another table than the fake"
            );
            let again = plan(&want, &theirs);
            assert!(
                again.is_empty(),
                "{tag} {family:?}: replanning is not empty: {again:?}"
            );
        }
    }
}
