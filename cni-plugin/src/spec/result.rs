//! The ADD success result, one model for every version: parsed leniently (a `prevResult` of
//! any supported version) and written in the exact shape of the requested version.

use super::CniVersion;
use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::net::IpAddr;

/// A `prevResult` that is not a result.
#[derive(Debug, thiserror::Error)]
#[error("prevResult: {0}")]
pub struct ResultError(String);

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// The interface name.
    pub name: String,
    /// Its hardware address (`aa:bb:cc:dd:ee:ff`).
    #[serde(default)]
    pub mac: Option<String>,
    /// Its MTU (1.1.0).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The netns path for container interfaces; absent for host interfaces.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// A socket for the interface (1.1.0).
    #[serde(default)]
    pub socket_path: Option<String>,
    /// The PCI device (1.1.0).
    #[serde(default, rename = "pciID")]
    pub pci_id: Option<String>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix length (`10.244.1.5/32`).
    pub address: IpNetwork,
    /// The gateway, if any.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNetwork,
    /// Next hop.
    #[serde(default)]
    pub gw: Option<IpAddr>,
    /// Path MTU (1.1.0).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// MSS to advertise (1.1.0).
    #[serde(default)]
    pub advmss: Option<u32>,
    /// Priority, lower is higher (1.1.0).
    #[serde(default)]
    pub priority: Option<u32>,
    /// Routing table (1.1.0).
    #[serde(default)]
    pub table: Option<u32>,
    /// Scope: 0 global, 253 link, 254 host (1.1.0).
    #[serde(default)]
    pub scope: Option<u32>,
}

/// DNS settings (from the network configuration, passed through).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Dns {
    /// Name servers, by priority.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A success result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CniResult {
    /// Interfaces created by the attachment (host side included).
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes created.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS settings.
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Parses a result of any supported version (`ips[].version` and unknown keys ignored).
    pub fn from_value(v: &Value) -> Result<CniResult, ResultError> {
        serde_path_to_error::deserialize(v).map_err(|e| ResultError(e.to_string()))
    }

    /// Appends `other` (this plugin's part) after a previous plugin's result: interfaces,
    /// addresses (interface indexes shifted) and routes are added; DNS is kept from the
    /// previous result unless it has none.
    pub fn merged_with(mut self, other: CniResult) -> CniResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(other.routes);
        if self.dns.is_empty() {
            self.dns = other.dns;
        }
        self
    }

    /// The result as JSON in the shape `version` defines.
    pub fn to_value(&self, version: CniVersion) -> Value {
        let ext = version.has_extended_result_fields();
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert("name".into(), json!(i.name));
                put(&mut m, "mac", i.mac.as_ref());
                if ext {
                    put(&mut m, "mtu", i.mtu.as_ref());
                }
                put(&mut m, "sandbox", i.sandbox.as_ref());
                if ext {
                    put(&mut m, "socketPath", i.socket_path.as_ref());
                    put(&mut m, "pciID", i.pci_id.as_ref());
                }
                Value::Object(m)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut m = Map::new();
                if version.has_ip_version_field() {
                    let v = if ip.address.is_ipv4() { "4" } else { "6" };
                    m.insert("version".into(), json!(v));
                }
                m.insert("address".into(), json!(ip.address.to_string()));
                put(
                    &mut m,
                    "gateway",
                    ip.gateway.map(|g| g.to_string()).as_ref(),
                );
                put(&mut m, "interface", ip.interface.as_ref());
                Value::Object(m)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut m = Map::new();
                m.insert("dst".into(), json!(r.dst.to_string()));
                put(&mut m, "gw", r.gw.map(|g| g.to_string()).as_ref());
                if ext {
                    put(&mut m, "mtu", r.mtu.as_ref());
                    put(&mut m, "advmss", r.advmss.as_ref());
                    put(&mut m, "priority", r.priority.as_ref());
                    put(&mut m, "table", r.table.as_ref());
                    put(&mut m, "scope", r.scope.as_ref());
                }
                Value::Object(m)
            })
            .collect();
        json!({
            "cniVersion": version.as_str(),
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": serde_json::to_value(&self.dns).unwrap_or_else(|_| json!({})),
        })
    }
}

fn put<T: serde::Serialize>(m: &mut Map<String, Value>, key: &str, v: Option<&T>) {
    if let Some(v) = v {
        if let Ok(v) = serde_json::to_value(v) {
            m.insert(key.to_owned(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::SUPPORTED_VERSIONS;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "weir0123456789a".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    mtu: Some(1500),
                    sandbox: None,
                    socket_path: None,
                    pci_id: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:02".into()),
                    mtu: Some(1500),
                    sandbox: Some("/run/netns/pod".into()),
                    socket_path: None,
                    pci_id: None,
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/32".parse().unwrap(),
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:10:244:1::5/128".parse().unwrap(),
                    gateway: Some("fe80::1".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: Some(0),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Dns::default()
            },
        }
    }

    #[test]
    fn results_before_1_0_carry_the_ip_version_and_later_ones_do_not() {
        for v in SUPPORTED_VERSIONS {
            let out = sample().to_value(v);
            assert_eq!(out["cniVersion"], v.as_str());
            let ip4 = &out["ips"][0];
            let ip6 = &out["ips"][1];
            if v < CniVersion::V1_0_0 {
                assert_eq!(ip4["version"], "4", "{v}");
                assert_eq!(ip6["version"], "6", "{v}");
            } else {
                assert!(ip4.get("version").is_none(), "{v}");
            }
            assert_eq!(ip4["address"], "10.244.1.5/32");
            assert_eq!(ip4["gateway"], "169.254.1.1");
            assert_eq!(ip4["interface"], 1);
            assert_eq!(out["routes"][0]["dst"], "0.0.0.0/0");
            assert_eq!(out["dns"], json!({"nameservers": ["10.96.0.10"]}));
        }
    }

    #[test]
    fn mtu_and_route_scope_appear_only_from_1_1_0() {
        let old = sample().to_value(CniVersion::V1_0_0);
        assert!(old["interfaces"][0].get("mtu").is_none());
        assert!(old["routes"][0].get("scope").is_none());
        let new = sample().to_value(CniVersion::V1_1_0);
        assert_eq!(new["interfaces"][0]["mtu"], 1500);
        assert_eq!(new["routes"][0]["scope"], 0);
        assert!(new["interfaces"][0].get("sandbox").is_none());
        assert_eq!(new["interfaces"][1]["sandbox"], "/run/netns/pod");
    }

    #[test]
    fn a_result_parses_back_from_every_version() {
        for v in SUPPORTED_VERSIONS {
            let back = CniResult::from_value(&sample().to_value(v)).unwrap();
            assert_eq!(back.ips, sample().ips, "{v}");
            assert_eq!(back.interfaces.len(), 2);
        }
    }

    #[test]
    fn merging_after_a_previous_result_shifts_interface_indexes() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: None,
                mtu: None,
                sandbox: Some("/run/netns/pod".into()),
                socket_path: None,
                pci_id: None,
            }],
            ips: vec![IpConfig {
                address: "127.0.0.1/8".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            routes: vec![],
            dns: Dns::default(),
        };
        let merged = prev.merged_with(sample());
        assert_eq!(merged.interfaces.len(), 3);
        assert_eq!(merged.ips[0].interface, Some(0));
        assert_eq!(merged.ips[1].interface, Some(2));
        assert_eq!(merged.dns.nameservers, ["10.96.0.10"]);
    }

    #[test]
    fn a_malformed_prev_result_names_the_field() {
        let err = CniResult::from_value(&json!({"ips": [{"address": "not-an-ip"}]})).unwrap_err();
        assert!(err.to_string().contains("ips[0].address"), "{err}");
    }
}
