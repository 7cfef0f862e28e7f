//! The files weir-cni and weir-proxy share on disk, declared once for both binaries.
//!
//! - Attachment records: `STATE_DIR/NETWORK/attachments/CONTAINERID@IFNAME.json`, one per
//!   attached interface, written by weir-cni once the pod's networking is complete and
//!   removed first thing on DEL; weir-proxy reads them to know which pods are this node's.
//! - The node's pod CIDRs: `STATE_DIR/pod-cidrs.json`, `{"podCIDRs": [...]}`, written by
//!   weir-proxy from its Node's `spec.podCIDRs`; weir-cni uses them when its configuration
//!   has no `podCIDRs`.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The record format's version (`"version"` in every file).
pub const RECORD_VERSION: u32 = 1;

/// The directory, under a network's state directory, that holds its attachment records.
pub const ATTACHMENTS_DIR: &str = "attachments";

/// The file name of the record of `ifname` in container `container_id`.
pub fn record_file_name(container_id: &str, ifname: &str) -> String {
    format!("{container_id}@{ifname}.json")
}

/// One attached interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The CNI network name.
    pub network: String,
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`: the interface inside the pod.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: Option<String>,
    /// The pod's addresses (IPv4 first).
    pub ips: Vec<IpAddr>,
    /// The host end of the veth pair.
    pub host_interface: String,
    /// Its interface index in the node's network namespace.
    pub host_ifindex: u32,
    /// The pod interface's hardware address at ADD.
    pub container_mac: String,
    /// MTU of both ends.
    pub mtu: u32,
}

/// The part of an [`AttachmentRecord`] weir-proxy reads: the pod's addresses. Records of
/// another format version parse too, as long as they list `ips`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AttachedIps {
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
}

/// The file, in weir-cni's state directory, where weir-proxy writes this node's pod CIDRs.
pub const NODE_POD_CIDRS_FILE: &str = "pod-cidrs.json";

/// This node's pod CIDRs (`{"podCIDRs": [...]}`), as weir-proxy writes them from the Node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePodCidrs {
    /// The Node's `spec.podCIDRs`, as written there.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

impl NodePodCidrs {
    /// The file's JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_cidrs_file_uses_the_documented_key() {
        let f = NodePodCidrs {
            pod_cidrs: vec!["10.244.1.0/24".into(), "fd00:10:244:1::/64".into()],
        };
        assert_eq!(
            f.to_json(),
            r#"{"podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64"]}"#
        );
        let back: NodePodCidrs = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn a_full_record_reads_as_its_addresses() {
        let r = AttachmentRecord {
            version: RECORD_VERSION,
            network: "weir".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/p".into(),
            pod_namespace: Some("d".into()),
            pod_name: Some("web".into()),
            ips: vec!["10.244.1.5".parse().unwrap()],
            host_interface: "weir1234".into(),
            host_ifindex: 7,
            container_mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
        };
        let json = serde_json::to_string(&r).unwrap();
        let ips: AttachedIps = serde_json::from_str(&json).unwrap();
        assert_eq!(ips.ips, r.ips);
        assert!(json.contains(r#""containerID":"c1""#), "{json}");
    }

    #[test]
    fn record_files_are_named_by_container_and_interface() {
        assert_eq!(record_file_name("c1", "eth0"), "c1@eth0.json");
    }
}
