//! The plugin configuration weir-cni reads on stdin: the runtime's request configuration
//! (one entry of a conflist's `plugins` with `cniVersion` and `name` injected) plus
//! weir-cni's own keys (`podCIDRs`, `mtu`, `stateDir`).

use super::result::{CniResult, Dns};
use super::CniVersion;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Deserialize;
use serde_json::Value;
use std::path::PathBuf;

/// Where IPAM state and attachment records live unless `stateDir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weir-cni";
/// The MTU of both veth ends unless `mtu` says otherwise.
pub const DEFAULT_MTU: u32 = 1500;

/// A configuration weir-cni cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Stdin is not a JSON object.
    #[error("error decoding network config: {0}")]
    Malformed(String),
    /// A key has the wrong type.
    #[error("error decoding network config: {0}")]
    Decode(String),
    /// `cniVersion` names a version weir-cni does not support.
    #[error("config version {0:?} is not supported (supported: {list})", list = super::version::supported_list())]
    IncompatibleVersion(String),
    /// A required key is missing.
    #[error("missing required field {0:?}")]
    Missing(&'static str),
    /// A key has an invalid value.
    #[error("invalid {field} {value}: {why}")]
    Invalid {
        /// The key.
        field: String,
        /// Its value (as JSON).
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// `podCIDRs` is not in the configuration and weir-proxy has not written this node's
    /// pod CIDRs (from its Node object) to the state directory yet.
    #[error("podCIDRs not configured and {path} not readable ({why}): is weir-proxy running with --cni-pod-cidrs-file?")]
    NodeCidrsUnavailable {
        /// The file weir-proxy writes.
        path: String,
        /// Why it could not be used.
        why: String,
    },
    /// A key asks for something weir-cni does not do.
    #[error("unsupported field {field}: {value} ({why})")]
    Unsupported {
        /// The key.
        field: &'static str,
        /// Its value (as JSON).
        value: String,
        /// Why it is not supported.
        why: &'static str,
    },
}

/// A GC `cni.dev/valid-attachments` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct ValidAttachment {
    /// `CNI_CONTAINERID` of the ADD.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME` of the ADD.
    pub ifname: String,
}

/// The node's pod CIDRs: at most one per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodCidrs {
    /// The IPv4 pod CIDR.
    pub v4: Option<Ipv4Network>,
    /// The IPv6 pod CIDR.
    pub v6: Option<Ipv6Network>,
}

impl PodCidrs {
    /// The configured CIDRs, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpNetwork> {
        self.v4
            .map(IpNetwork::V4)
            .into_iter()
            .chain(self.v6.map(IpNetwork::V6))
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// The protocol version in use.
    pub cni_version: CniVersion,
    /// The network name (the state directory's subdirectory).
    pub name: String,
    /// The pod CIDRs addresses are allocated from.
    pub pod_cidrs: PodCidrs,
    /// MTU of both veth ends.
    pub mtu: u32,
    /// IPAM state and attachment records go under `state_dir/name`.
    pub state_dir: PathBuf,
    /// DNS settings, passed through into the result.
    pub dns: Dns,
    /// The previous plugin's result (chained ADD), or the final ADD result (DEL, CHECK).
    pub prev_result: Option<CniResult>,
    /// GC's still-valid attachments.
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
    mtu: Option<u32>,
    state_dir: Option<PathBuf>,
    ip_masq: Option<bool>,
    ipam: Option<Value>,
    dns: Option<Dns>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

/// The `cniVersion` of a configuration if it is one weir-cni supports: errors are reported
/// in it, or in the latest version when there is none.
pub fn version_hint(stdin: &[u8]) -> Option<CniVersion> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(v.get("cniVersion")?.as_str()?)
}

impl NetConf {
    /// Parses and validates the configuration on stdin.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
        let value: Value =
            serde_json::from_slice(stdin).map_err(|e| ConfigError::Malformed(e.to_string()))?;
        if !value.is_object() {
            return Err(ConfigError::Malformed("expected a JSON object".into()));
        }
        let raw: Raw = serde_path_to_error::deserialize(&value)
            .map_err(|e| ConfigError::Decode(e.to_string()))?;
        let version = raw.cni_version.ok_or(ConfigError::Missing("cniVersion"))?;
        let cni_version =
            CniVersion::parse(&version).ok_or(ConfigError::IncompatibleVersion(version))?;
        let name = raw.name.ok_or(ConfigError::Missing("name"))?;
        validate_network_name(&name)?;
        if raw.ip_masq == Some(true) {
            return Err(ConfigError::Unsupported {
                field: "ipMasq",
                value: "true".into(),
                why: "weir-cni routes pod addresses; masquerade belongs to weir-proxy",
            });
        }
        if let Some(ipam) = raw.ipam {
            return Err(ConfigError::Unsupported {
                field: "ipam",
                value: ipam.to_string(),
                why: "weir-cni allocates addresses itself from podCIDRs",
            });
        }
        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "stateDir".into(),
                value: format!("{:?}", state_dir.display().to_string()),
                why: "must be an absolute path".into(),
            });
        }
        let pod_cidrs = match raw.pod_cidrs {
            Some(list) => parse_pod_cidrs(list)?,
            None => parse_pod_cidrs(node_pod_cidrs(&state_dir)?)?,
        };
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        let min_mtu = if pod_cidrs.v6.is_some() { 1280 } else { 68 };
        if !(min_mtu..=65535).contains(&mtu) {
            return Err(ConfigError::Invalid {
                field: "mtu".into(),
                value: mtu.to_string(),
                why: format!("must be between {min_mtu} and 65535"),
            });
        }
        let prev_result = match raw.prev_result {
            Some(v) if !v.is_null() => {
                Some(CniResult::from_value(&v).map_err(|e| ConfigError::Decode(e.to_string()))?)
            }
            _ => None,
        };
        Ok(NetConf {
            cni_version,
            name,
            pod_cidrs,
            mtu,
            state_dir,
            dns: raw.dns.unwrap_or_default(),
            prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }

    /// This network's directory: `stateDir/name`.
    pub fn network_dir(&self) -> PathBuf {
        self.state_dir.join(&self.name)
    }
}

/// A network name: an alphanumeric first character, then alphanumerics, `_`, `.` or `-`
/// (it names a directory).
fn validate_network_name(name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: "name".into(),
            value: format!("{name:?}"),
            why: "must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'".into(),
        })
    }
}

pub use weir_cni_formats::NODE_POD_CIDRS_FILE;

/// This node's pod CIDRs as weir-proxy wrote them (`{"podCIDRs": [...]}`) from the Node
/// object, for configurations without `podCIDRs`.
fn node_pod_cidrs(state_dir: &std::path::Path) -> Result<Vec<String>, ConfigError> {
    let path = state_dir.join(NODE_POD_CIDRS_FILE);
    let unavailable = |why: String| ConfigError::NodeCidrsUnavailable {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read(&path).map_err(|e| unavailable(e.to_string()))?;
    let f: weir_cni_formats::NodePodCidrs =
        serde_json::from_slice(&text).map_err(|e| unavailable(e.to_string()))?;
    Ok(f.pod_cidrs)
}

fn parse_pod_cidrs(list: Vec<String>) -> Result<PodCidrs, ConfigError> {
    let invalid = |i: usize, s: &str, why: String| ConfigError::Invalid {
        field: format!("podCIDRs[{i}]"),
        value: format!("{s:?}"),
        why,
    };
    if list.is_empty() {
        return Err(ConfigError::Invalid {
            field: "podCIDRs".into(),
            value: "[]".into(),
            why: "needs one CIDR per address family (at least one)".into(),
        });
    }
    let mut out = PodCidrs { v4: None, v6: None };
    for (i, s) in list.iter().enumerate() {
        let net: IpNetwork = s
            .parse()
            .map_err(|e| invalid(i, s, format!("not a CIDR: {e}")))?;
        if net.network() != net.ip() {
            return Err(invalid(
                i,
                s,
                format!(
                    "host bits are set (the network is {}/{})",
                    net.network(),
                    net.prefix()
                ),
            ));
        }
        match net {
            IpNetwork::V4(n) if out.v4.is_none() => out.v4 = Some(n),
            IpNetwork::V6(n) if out.v6.is_none() => out.v6 = Some(n),
            _ => return Err(invalid(i, s, "a second CIDR of the same family".into())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, ConfigError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "weir",
            "type": "weir-cni",
            "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"],
        })
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    #[test]
    fn a_dual_stack_config_parses_with_defaults() {
        let c = parse(base()).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_1_0);
        assert_eq!(c.name, "weir");
        assert_eq!(c.pod_cidrs.v4, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(c.pod_cidrs.v6, Some("fd00:10:244:1::/64".parse().unwrap()));
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert_eq!(c.network_dir(), PathBuf::from("/var/lib/weir-cni/weir"));
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn runtime_keys_and_unknown_keys_are_accepted() {
        let mut v = base();
        v["runtimeConfig"] = json!({"portMappings": []});
        v["args"] = json!({"cni": {"x": 1}});
        v["somethingElse"] = json!(true);
        v["mtu"] = json!(1400);
        v["stateDir"] = json!("/tmp/weir-state");
        v["dns"] = json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]});
        let c = parse(v).unwrap();
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.state_dir, PathBuf::from("/tmp/weir-state"));
        assert_eq!(c.dns.search, ["svc.cluster.local"]);
    }

    #[test]
    fn malformed_json_is_a_decoding_failure() {
        assert!(matches!(
            NetConf::parse(b"{\"cniVersion\": "),
            Err(ConfigError::Malformed(_))
        ));
        assert!(matches!(
            NetConf::parse(b"[1, 2]"),
            Err(ConfigError::Malformed(_))
        ));
        let e = parse(with("mtu", json!("big"))).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Decode(m) if m.contains("mtu")),
            "{e}"
        );
    }

    #[test]
    fn unknown_versions_are_incompatible() {
        for v in ["0.2.0", "1.2.0", "9.9.9", "x"] {
            assert_eq!(
                parse(with("cniVersion", json!(v))),
                Err(ConfigError::IncompatibleVersion(v.into()))
            );
        }
    }

    #[test]
    fn missing_fields_are_named() {
        for key in ["cniVersion", "name"] {
            let mut v = base();
            v.as_object_mut().unwrap().remove(key);
            assert_eq!(parse(v), Err(ConfigError::Missing(key)), "{key}");
        }
    }

    #[test]
    fn without_pod_cidrs_the_nodes_cidrs_written_by_weir_proxy_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = base();
        v.as_object_mut().unwrap().remove("podCIDRs");
        v["stateDir"] = json!(dir.path());
        // Not written yet: try again later, naming the file.
        let e = parse(v.clone()).unwrap_err();
        assert!(
            matches!(&e, ConfigError::NodeCidrsUnavailable { path, .. } if path.ends_with("pod-cidrs.json")),
            "{e}"
        );
        std::fs::write(
            dir.path().join(NODE_POD_CIDRS_FILE),
            r#"{"podCIDRs": ["10.244.7.0/24", "fd00:10:244:7::/64"]}"#,
        )
        .unwrap();
        let c = parse(v).unwrap();
        assert_eq!(c.pod_cidrs.v4, Some("10.244.7.0/24".parse().unwrap()));
        assert_eq!(c.pod_cidrs.v6, Some("fd00:10:244:7::/64".parse().unwrap()));
    }

    #[test]
    fn bad_pod_cidrs_are_invalid_config() {
        for (cidrs, needle) in [
            (json!([]), "podCIDRs"),
            (json!(["10.244.1.0/33"]), "podCIDRs[0]"),
            (json!(["10.244.1.5/24"]), "host bits"),
            (json!(["10.244.1.0/24", "10.244.2.0/24"]), "podCIDRs[1]"),
            (json!(["fd00::/64", "fd01::/64"]), "same family"),
        ] {
            let e = parse(with("podCIDRs", cidrs.clone())).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{cidrs}: {e}");
            assert!(e.to_string().contains(needle), "{cidrs}: {e}");
        }
    }

    #[test]
    fn a_single_family_is_enough() {
        let c = parse(with("podCIDRs", json!(["fd00:10:244:1::/64"]))).unwrap();
        assert_eq!(c.pod_cidrs.v4, None);
        assert_eq!(c.pod_cidrs.iter().count(), 1);
    }

    #[test]
    fn out_of_range_mtu_relative_paths_and_bad_names_are_invalid() {
        assert!(
            matches!(parse(with("mtu", json!(1000))), Err(ConfigError::Invalid { field, .. }) if field == "mtu")
        );
        assert!(parse(with("podCIDRs", json!(["10.0.0.0/8"])))
            .map(|_| ())
            .and_then(|_| parse(with("mtu", json!(70000))).map(|_| ()))
            .is_err());
        assert!(
            matches!(parse(with("stateDir", json!("rel/dir"))), Err(ConfigError::Invalid { field, .. }) if field == "stateDir")
        );
        assert!(
            matches!(parse(with("name", json!("../etc"))), Err(ConfigError::Invalid { field, .. }) if field == "name")
        );
    }

    #[test]
    fn ipam_and_ip_masq_are_unsupported_with_key_and_value_in_the_message() {
        let e = parse(with("ipam", json!({"type": "host-local"}))).unwrap_err();
        assert!(matches!(e, ConfigError::Unsupported { field: "ipam", .. }));
        assert!(e.to_string().contains("host-local"), "{e}");
        let e = parse(with("ipMasq", json!(true))).unwrap_err();
        assert!(e.to_string().contains("ipMasq: true"), "{e}");
        assert!(parse(with("ipMasq", json!(false))).is_ok());
    }

    #[test]
    fn prev_result_and_valid_attachments_are_read() {
        let mut v = base();
        v["prevResult"] = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.244.1.5/32", "interface": 0}],
        });
        v["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
        let c = parse(v).unwrap();
        assert_eq!(c.prev_result.unwrap().ips.len(), 1);
        assert_eq!(
            c.valid_attachments.unwrap(),
            [ValidAttachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
        let e = parse(with("prevResult", json!({"ips": "x"}))).unwrap_err();
        assert!(matches!(e, ConfigError::Decode(_)), "{e}");
    }

    #[test]
    fn the_example_conflist_parses() {
        let list: Value =
            serde_json::from_str(include_str!("../../examples/10-weir.conflist")).unwrap();
        let mut plugin = list["plugins"][0].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        plugin["name"] = list["name"].clone();
        let c = parse(plugin).unwrap();
        assert_eq!(c.network_dir(), PathBuf::from("/var/lib/weir-cni/weir"));
        assert!(c.pod_cidrs.v4.is_some() && c.pod_cidrs.v6.is_some());
    }

    #[test]
    fn the_version_hint_ignores_unusable_input() {
        assert_eq!(
            version_hint(base().to_string().as_bytes()),
            Some(CniVersion::V1_1_0)
        );
        assert_eq!(version_hint(b"{"), None);
        assert_eq!(version_hint(b"{\"cniVersion\": \"0.2.0\"}"), None);
    }
}
