//! The verbs: [`run`] reads the protocol parameters and the configuration, dispatches to
//! ADD, DEL, CHECK, GC, STATUS or VERSION, and turns every failure into the CNI error
//! result with the right code.

mod add;
mod check;
mod del;
mod gc;
mod status;
mod version;

use crate::attachments::AttachmentError;
use crate::ipam::IpamError;
use crate::netlink::{self, Netlink, NetlinkError};
use crate::netns::{Netns, NetnsError};
use crate::spec::config::{version_hint, ConfigError};
use crate::spec::env::EnvError;
use crate::spec::{CniEnv, CniError, CniVersion, Command, ErrorCode, NetConf};
use crate::statedir::StateDirError;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The pods' IPv4 default gateway: a link-local address every host veth end carries
/// (as a /32), so the pod resolves it on its own link with ARP.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pods' IPv6 default gateway: a link-local address every host veth end carries
/// (without duplicate address detection), resolved with NDP.
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// What the plugin prints on stdout and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Result, error or nothing.
    pub stdout: String,
    /// 0 on success, 1 on error.
    pub exit_code: i32,
}

/// Runs one invocation: parameters from `get_env`, the configuration from `stdin`.
pub fn run(get_env: impl Fn(&str) -> Option<String>, stdin: io::Result<Vec<u8>>) -> Output {
    let hint = stdin
        .as_ref()
        .ok()
        .and_then(|b| version_hint(b))
        .unwrap_or(CniVersion::LATEST);
    match dispatch(get_env, stdin) {
        Ok(stdout) => Output {
            stdout: stdout.unwrap_or_default(),
            exit_code: 0,
        },
        Err(e) => Output {
            stdout: e.to_json(hint),
            exit_code: 1,
        },
    }
}

fn dispatch(
    get_env: impl Fn(&str) -> Option<String>,
    stdin: io::Result<Vec<u8>>,
) -> Result<Option<String>, CniError> {
    let env = CniEnv::from_lookup(get_env)?;
    let stdin = stdin.map_err(|e| {
        CniError::new(
            ErrorCode::IoFailure,
            "error reading from stdin",
            e.to_string(),
        )
    })?;
    if env.command == Command::Version {
        return Ok(Some(version::version(&stdin)));
    }
    let conf = NetConf::parse(&stdin)?;
    let v = conf.cni_version;
    let too_old = |verb: &str, since: &str| {
        CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("config version does not allow {verb}"),
            format!("cniVersion {v} has no {verb}; it exists from {since}"),
        )
    };
    match env.command {
        Command::Add => add::add(&env, &conf).map(|r| Some(r.to_value(v).to_string())),
        Command::Del => del::del(&env, &conf).map(|()| None),
        Command::Check if !v.has_check() => Err(too_old("CHECK", "0.4.0")),
        Command::Check => check::check(&env, &conf).map(|()| None),
        Command::Gc if !v.has_gc_and_status() => Err(too_old("GC", "1.1.0")),
        Command::Gc => gc::gc(&conf).map(|()| None),
        Command::Status if !v.has_gc_and_status() => Err(too_old("STATUS", "1.1.0")),
        Command::Status => status::status(&conf).map(|()| None),
        Command::Version => Ok(Some(version::version(&stdin))),
    }
}

/// The host end of an attachment's veth: `weir` and 11 hex digits of a hash of container
/// ID and interface name (15 characters, the kernel's limit), the same on every call.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("weir{:011x}", h >> 20)
}

/// The alias weir-cni sets on the host end: `weir-cni NETWORK CONTAINERID IFNAME`.
pub fn host_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("weir-cni {network} {container_id} {ifname}")
}

/// `(network, container id, ifname)` from a host end's alias written by [`host_alias`].
pub fn parse_host_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let mut parts = alias.split(' ');
    let (tag, net, id, ifname) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (tag == "weir-cni" && parts.next().is_none()).then_some((net, id, ifname))
}

/// Whether `link` is the host end of the attachment whose alias is `alias`: a veth with
/// that alias, or with none (a plugin killed between creating and naming it). Anything
/// else with the same name is left alone.
fn is_host_end_of(link: &netlink::Link, alias: &str) -> bool {
    netlink::is_veth(link) && link.alias.as_deref().is_none_or(|a| a == alias)
}

/// The pod's gateway in the family of `ip`.
pub fn gateway_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(POD_GATEWAY_V4),
        IpAddr::V6(_) => IpAddr::V6(POD_GATEWAY_V6),
    }
}

/// Runs `f` with a netlink connection in the plugin's (the node's) network namespace.
fn on_host<T>(f: impl AsyncFnOnce(&Netlink) -> Result<T, NetlinkError>) -> Result<T, CniError> {
    Ok(netlink::with_netlink(f)??)
}

/// Runs `f` with a netlink connection inside the pod's network namespace.
fn in_pod<T: Send>(
    netns: &Netns,
    f: impl AsyncFnOnce(&Netlink) -> Result<T, NetlinkError> + Send,
) -> Result<T, CniError> {
    Ok(netns.run(|| netlink::with_netlink(f))???)
}

/// A required parameter [`CniEnv::from_lookup`] already checked.
fn required<'a>(v: &'a Option<String>, name: &'static str) -> Result<&'a str, CniError> {
    v.as_deref()
        .ok_or_else(|| EnvError::Missing(vec![name]).into())
}

impl From<EnvError> for CniError {
    fn from(e: EnvError) -> CniError {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            e.to_string(),
            "see the CNI specification, section 2 (parameters)",
        )
    }
}

impl From<ConfigError> for CniError {
    fn from(e: ConfigError) -> CniError {
        let (code, details) = match &e {
            ConfigError::Malformed(_) | ConfigError::Decode(_) => (
                ErrorCode::DecodingFailure,
                "stdin must hold the plugin configuration as JSON".to_owned(),
            ),
            ConfigError::IncompatibleVersion(_) => (
                ErrorCode::IncompatibleVersion,
                format!(
                    "weir-cni supports {}",
                    crate::spec::version::supported_list()
                ),
            ),
            ConfigError::Missing(_) | ConfigError::Invalid { .. } => (
                ErrorCode::InvalidConfig,
                "weir-cni's configuration keys are described in cni-plugin/README.md".to_owned(),
            ),
            ConfigError::NodeCidrsUnavailable { .. } => (
                ErrorCode::TryAgainLater,
                "weir-proxy writes the Node's spec.podCIDRs there; retry once it runs".to_owned(),
            ),
            ConfigError::Unsupported { .. } => (
                ErrorCode::UnsupportedField,
                "weir-cni's configuration keys are described in cni-plugin/README.md".to_owned(),
            ),
        };
        CniError::new(code, e.to_string(), details)
    }
}

impl From<NetnsError> for CniError {
    fn from(e: NetnsError) -> CniError {
        let code = match e {
            NetnsError::NotFound(_) => ErrorCode::UnknownContainer,
            NetnsError::NotANetns(_) | NetnsError::Own(_) => ErrorCode::InvalidEnvironment,
            NetnsError::Open { .. } => ErrorCode::IoFailure,
            NetnsError::Enter { .. } | NetnsError::Panicked(_) => ErrorCode::Kernel,
        };
        let msg = match e {
            NetnsError::NotFound(_) => "container network namespace does not exist",
            NetnsError::NotANetns(_) | NetnsError::Own(_) => "invalid CNI_NETNS",
            _ => "cannot use the container network namespace",
        };
        CniError::new(code, msg, e.to_string())
    }
}

impl From<NetlinkError> for CniError {
    fn from(e: NetlinkError) -> CniError {
        CniError::new(ErrorCode::Kernel, "kernel operation failed", e.to_string())
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        match e {
            IpamError::Exhausted(net) => CniError::new(
                ErrorCode::TryAgainLater,
                "address pool exhausted",
                format!("no free address left in {net}; retry after pods are deleted"),
            ),
            e => CniError::new(ErrorCode::IoFailure, "IPAM state failure", e.to_string()),
        }
    }
}

impl From<AttachmentError> for CniError {
    fn from(e: AttachmentError) -> CniError {
        CniError::new(
            ErrorCode::IoFailure,
            "attachment record failure",
            e.to_string(),
        )
    }
}

impl From<StateDirError> for CniError {
    fn from(e: StateDirError) -> CniError {
        CniError::new(
            ErrorCode::IoFailure,
            "state directory failure",
            e.to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::collections::HashMap;

    fn invoke(vars: &[(&str, &str)], stdin: &str) -> (Value, i32) {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = run(|k| map.get(k).cloned(), Ok(stdin.as_bytes().to_vec()));
        let v = if out.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out.stdout).unwrap()
        };
        (v, out.exit_code)
    }

    fn conf(version: &str) -> String {
        json!({"cniVersion": version, "name": "weir", "type": "weir-cni",
               "podCIDRs": ["10.244.1.0/24"], "stateDir": "/nonexistent/weir-test"})
        .to_string()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
    ];

    #[test]
    fn version_reports_every_supported_version_in_the_requested_one() {
        let (v, code) = invoke(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion": "0.4.0"}"#);
        assert_eq!(code, 0);
        assert_eq!(
            v,
            json!({"cniVersion": "0.4.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
        let (v, _) = invoke(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn errors_carry_code_msg_details_and_the_config_version() {
        let (v, code) = invoke(ADD, "{not json");
        assert_eq!(code, 1);
        assert_eq!(v["code"], 6);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert!(v["msg"].as_str().unwrap().contains("decoding"));
        assert!(v["details"].is_string());

        let (v, _) = invoke(ADD, &conf("0.2.0"));
        assert_eq!(v["code"], 1);

        let (v, _) = invoke(&[("CNI_COMMAND", "ADD")], &conf("1.0.0"));
        assert_eq!(v["code"], 4);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["msg"]
            .as_str()
            .unwrap()
            .contains("CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME"));

        // No podCIDRs and weir-proxy has not written the node's: try again later.
        let (v, _) = invoke(
            ADD,
            r#"{"cniVersion": "1.1.0", "name": "weir", "stateDir": "/nonexistent/weir"}"#,
        );
        assert_eq!(v["code"], 11);
        assert!(v["msg"].as_str().unwrap().contains("podCIDRs"));

        let mut c: Value = serde_json::from_str(&conf("1.1.0")).unwrap();
        c["ipam"] = json!({"type": "host-local"});
        let (v, _) = invoke(ADD, &c.to_string());
        assert_eq!(v["code"], 2);
        assert!(v["msg"].as_str().unwrap().contains("ipam"));
    }

    #[test]
    fn a_missing_netns_is_an_unknown_container() {
        let (v, code) = invoke(ADD, &conf("1.1.0"));
        assert_eq!(code, 1);
        assert_eq!(v["code"], 3, "{v}");
    }

    #[test]
    fn check_gc_and_status_need_a_version_that_has_them() {
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/nonexistent/netns"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (v, _) = invoke(&check, &conf("0.3.1"));
        assert_eq!(v["code"], 1);
        assert!(v["msg"].as_str().unwrap().contains("CHECK"));
        for verb in ["GC", "STATUS"] {
            let (v, _) = invoke(&[("CNI_COMMAND", verb)], &conf("1.0.0"));
            assert_eq!(v["code"], 1, "{verb}");
        }
        let (v, _) = invoke(&[("CNI_COMMAND", "FLY")], &conf("1.1.0"));
        assert_eq!(v["code"], 4);
    }

    #[test]
    fn a_stdin_read_failure_is_an_io_failure() {
        let out = run(
            |k| (k == "CNI_COMMAND").then(|| "STATUS".to_owned()),
            Err(io::Error::other("broken pipe")),
        );
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 5);
    }

    #[test]
    fn host_interface_names_are_stable_short_and_distinct() {
        let a = host_ifname("4f3c2b1a", "eth0");
        assert_eq!(a, host_ifname("4f3c2b1a", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("weir"));
        assert_ne!(a, host_ifname("4f3c2b1a", "eth1"));
        assert_ne!(a, host_ifname("4f3c2b1b", "eth0"));
        let names: std::collections::HashSet<String> = (0..10_000)
            .map(|i| host_ifname(&format!("c{i}"), "eth0"))
            .collect();
        assert_eq!(names.len(), 10_000);
    }

    #[test]
    fn host_aliases_round_trip() {
        let a = host_alias("weir", "c1", "eth0");
        assert_eq!(parse_host_alias(&a), Some(("weir", "c1", "eth0")));
        assert_eq!(parse_host_alias("something else"), None);
    }
}
