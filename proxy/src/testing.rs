//! What the tests of every tier share (built for this crate's own tests, and for other
//! crates' with the `testing` feature): the YAML -> Store -> compute -> render fixture, the
//! test IP plan, and a scratch network namespace guard.

use crate::dataplane::nft::diff::plan;
use crate::dataplane::nft::fake::FakeNft;
use crate::dataplane::nft::render::{desired_table, RenderConfig};
use crate::dataplane::nft::{DumpedTable, Family, Table};
use crate::model::{compute, DesiredState, ModelConfig, Store};
use crate::objects::SourceUpdate;
use crate::source::dir::load_text;
use std::path::Path;
use std::process::Command;

/// The test node's name.
pub const NODE: &str = "node1";
/// The pod CIDRs of the test cluster (IPv4, IPv6).
pub const CLUSTER_CIDRS: [&str; 2] = ["10.244.0.0/16", "fd00:10:244::/56"];
/// The Service CIDRs of the test cluster (IPv4, IPv6).
pub const SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/16", "fd00:10:96::/112"];

/// The model settings of the test node.
pub fn model_config() -> ModelConfig {
    ModelConfig {
        node_name: NODE.into(),
        ..ModelConfig::default()
    }
}

/// The render settings of the test cluster: both families' pod and Service CIDRs.
pub fn render_config() -> RenderConfig {
    RenderConfig {
        cluster_cidrs: CLUSTER_CIDRS
            .iter()
            .map(|c| c.parse().unwrap_or_else(|e| panic!("{c}: {e}")))
            .collect(),
        service_cidrs: SERVICE_CIDRS
            .iter()
            .map(|c| c.parse().unwrap_or_else(|e| panic!("{c}: {e}")))
            .collect(),
        masquerade_all: false,
        ipvs: false,
    }
}

/// A store holding the objects of `yaml` (manifests as the dir source reads them); panics
/// on a document the source would skip, so a fixture never loses an object silently.
pub fn store(yaml: &str) -> Store {
    let loaded = load_text(Path::new("fixture.yaml"), yaml);
    assert!(loaded.errors.is_empty(), "fixture: {:?}", loaded.errors);
    let mut store = Store::default();
    store.record_all(
        SourceUpdate::listing(loaded.objects),
        std::time::SystemTime::now(),
    );
    store
}

/// The desired state of `yaml` on the test node under `model`; panics on a model error.
pub fn desired(yaml: &str, model: &ModelConfig) -> DesiredState {
    let (state, errors) = compute(&store(yaml), model);
    assert!(errors.is_empty(), "fixture: {errors:?}");
    state
}

/// The `weir` table of one family that `yaml` renders to (desired, not yet applied).
pub fn rendered(yaml: &str, model: &ModelConfig, render: &RenderConfig, family: Family) -> Table {
    desired_table(&desired(yaml, model), render, family)
}

/// What the fake nftables holds after the rendered table of `yaml` is planned against
/// an empty kernel and applied (the fake validates the plan as the kernel does).
pub fn programmed(yaml: &str, model: &ModelConfig, render: &RenderConfig, family: Family) -> Table {
    let want = rendered(yaml, model, render, family);
    let mut fake = FakeNft::default();
    fake.apply(&plan(&want, &DumpedTable::empty(family)))
        .unwrap_or_else(|e| panic!("the fake refused the plan: {e}"));
    fake.table(family)
        .cloned()
        .unwrap_or_else(|| panic!("the fake holds no {family:?} table"))
}

/// A scratch network namespace, deleted when dropped: the one namespace guard of every
/// tier (weir-e2e's `Netns` holds one and adds the processes it starts). Under `CI=true`
/// a machine where it cannot be made (no root, no netns) fails the test instead of
/// skipping it.
#[derive(Debug)]
pub struct ScratchNetns {
    name: String,
}

impl ScratchNetns {
    /// Creates `weir-<role>-<pid>-<tag>`; `None` (after a note on stderr) when this machine
    /// cannot, outside CI.
    pub fn new(role: &str, tag: &str) -> Option<ScratchNetns> {
        let name = format!("weir-{role}-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "this test needs root and network namespaces (CI=true forbids skipping)"
            );
            eprintln!("skipped: needs root and network namespaces");
            return None;
        }
        Some(ScratchNetns { name })
    }

    /// Takes charge of the namespace `name`, which the caller creates (alone or with
    /// others in one `ip -batch`): it is deleted when the guard drops, made or not.
    pub fn adopt(name: String) -> ScratchNetns {
        ScratchNetns { name }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Service port `ns/dns` of `proto`: ClusterIP 10.96.0.53:53, NodePort 30053, the
/// endpoints `eps` on port 5353 (local when in 10.244.1.0/24), and with `local` external
/// traffic policy Local with health-check NodePort 32000.
pub fn dns_port(
    proto: crate::model::Protocol,
    eps: &[&str],
    local: bool,
) -> crate::model::ServicePortState {
    use crate::model::{Endpoint, ServiceInfo, ServicePortName, ServicePortState};
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
    let name = ServicePortName {
        namespace: "ns".into(),
        name: "dns".into(),
        port: String::new(),
        protocol: proto,
    };
    let info = ServiceInfo {
        node_port: Some(30053),
        external_local: local,
        health_check_node_port: local.then_some(32000),
        ..ServiceInfo::new(name, vec![ip("10.96.0.53")], 53)
    };
    let all = eps
        .iter()
        .map(|e| Endpoint {
            ip: ip(e),
            port: 5353,
            is_local: e.starts_with("10.244.1."),
        })
        .collect();
    ServicePortState::from_endpoints(info, all)
}
