//! The manifests under deploy/ checked offline against the Kubernetes API types
//! (k8s-openapi, generated from the OpenAPI schema): each document's apiVersion/kind is a
//! known type, it deserializes (required fields present, types right), and no field is
//! unknown to the schema. The KubeProxyConfiguration in the ConfigMap parses with no
//! warnings, and the ClusterRole grants exactly list/watch on what weir-proxy watches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::{Path, PathBuf};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Deserializes `doc` as `T`, failing on any field the type (the schema) does not know.
fn strict<T: DeserializeOwned>(doc: &serde_yaml_ng::Value, what: &str) -> T {
    let mut unknown = Vec::new();
    let v: T = serde_ignored::deserialize(doc.clone(), |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        unknown.is_empty(),
        "{what}: fields unknown to the schema: {unknown:?}"
    );
    v
}

fn documents(file: &str) -> Vec<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_object_in_weir_yaml_matches_the_api_schema() {
    let docs = documents("weir.yaml");
    let mut kinds = Vec::new();
    for d in &docs {
        let api = d["apiVersion"].as_str().unwrap();
        let kind = d["kind"].as_str().unwrap();
        let name = d["metadata"]["name"].as_str().unwrap();
        let what = format!("{api} {kind} {name}");
        match (api, kind) {
            ("v1", "ServiceAccount") => drop(strict::<ServiceAccount>(d, &what)),
            ("v1", "ConfigMap") => drop(strict::<ConfigMap>(d, &what)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                drop(strict::<ClusterRole>(d, &what))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(strict::<ClusterRoleBinding>(d, &what))
            }
            ("apps/v1", "DaemonSet") => drop(strict::<DaemonSet>(d, &what)),
            _ => panic!("{what}: not a type this test knows"),
        }
        kinds.push(kind.to_owned());
    }
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
}

#[test]
fn the_daemonset_runs_on_the_host_network_with_only_net_admin_bpf_perfmon_sys_admin_and_probes_on_10256(
) {
    let docs = documents("weir.yaml");
    let ds: DaemonSet = strict(
        docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap(),
        "DaemonSet",
    );
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("weir"));
    let c = &pod.containers[0];
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .unwrap();
    let want: Vec<String> = ["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"]
        .map(String::from)
        .into();
    assert_eq!(caps.add.as_deref(), Some(&want[..]));
    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/sys/fs/bpf")
            && mounts.contains(&"/sys/fs/cgroup")
            && mounts.contains(&"/run/netns"),
        "{mounts:?}"
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_ne!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/livez"));
    assert_eq!(
        live.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
    );
    assert!(c
        .command
        .as_ref()
        .unwrap()
        .iter()
        .any(|a| a == "--config=/etc/weir/config.conf"));
    let inits = pod.init_containers.as_ref().unwrap();
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["sysctls", "install-cni"]);
    // Only the sysctl step is privileged; install-cni drops every capability.
    assert_eq!(
        inits[1]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap()
            .drop
            .as_deref(),
        Some(&["ALL".to_owned()][..])
    );
}

#[test]
fn the_cluster_role_grants_list_and_watch_only() {
    let docs = documents("weir.yaml");
    let role: ClusterRole = strict(
        docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap(),
        "ClusterRole",
    );
    let mut grants = Vec::new();
    for r in role.rules.unwrap() {
        for g in r.api_groups.unwrap() {
            for res in r.resources.clone().unwrap() {
                let mut verbs = r.verbs.clone();
                verbs.sort();
                grants.push(format!("{g}/{res}: {}", verbs.join(",")));
            }
        }
    }
    grants.sort();
    assert_eq!(
        grants,
        [
            "/namespaces: list,watch",
            "/nodes: list,watch",
            "/pods: list,watch",
            "/services: list,watch",
            "discovery.k8s.io/endpointslices: list,watch",
            "networking.k8s.io/networkpolicies: list,watch"
        ]
    );
}

#[test]
fn the_configmap_holds_a_kube_proxy_configuration_weir_reads_without_warnings() {
    let docs = documents("weir.yaml");
    let cm: ConfigMap = strict(
        docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap(),
        "ConfigMap",
    );
    let data = cm.data.unwrap();
    let conf = &data["config.conf"];
    let c = weir_proxy::kubeproxy_config::parse(Path::new("config.conf"), conf).unwrap();
    let mut args = <weir_proxy::config::Args as clap::Parser>::parse_from(["weir-proxy"]);
    let warnings = weir_proxy::kubeproxy_config::apply(&c, &mut args, &|_| false).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(args.cluster_cidr, ["10.244.0.0/16"]);
    let conflist: serde_json::Value = serde_json::from_str(&data["10-weir.conflist"]).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "weir-cni");
}

#[test]
fn the_kind_config_disables_kube_proxy_and_the_default_cni_with_the_test_subnets() {
    let docs = documents("kind.yaml");
    let c = &docs[0];
    assert_eq!(c["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(c["kind"], "Cluster");
    let n = &c["networking"];
    assert_eq!(n["kubeProxyMode"], "none");
    assert_eq!(n["disableDefaultCNI"], true);
    assert_eq!(n["podSubnet"], "10.244.0.0/16");
    assert_eq!(n["serviceSubnet"], "10.96.0.0/16");
}

#[test]
#[should_panic(expected = "fields unknown to the schema")]
fn a_misspelt_field_is_caught() {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        "{apiVersion: v1, kind: ServiceAccount, metadata: {name: x, namespce: y}}",
    )
    .unwrap();
    strict::<ServiceAccount>(&doc, "ServiceAccount x");
}
