//! `--config FILE`: a KubeProxyConfiguration (`kubeproxy.config.k8s.io/v1alpha1`). The
//! fields that apply to weir fill flags the command line (or environment) did not set;
//! fields that do not apply are ignored with a warning naming them, and unknown fields are
//! reported the same way.

use crate::config::{Args, ProxyMode};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The API group/version weir reads.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

type Rest = BTreeMap<String, serde_yaml_ng::Value>;

/// The fields of a KubeProxyConfiguration weir knows (others land in `rest`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    /// Must be [`API_VERSION`].
    pub api_version: Option<String>,
    /// Must be `KubeProxyConfiguration`.
    pub kind: Option<String>,
    /// `mode`: nftables, ipvs or ebpf (`iptables` and `kernelspace` are refused).
    pub mode: Option<String>,
    /// `clusterCIDR`: comma-separated pod CIDRs.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    /// `hostnameOverride`.
    pub hostname_override: Option<String>,
    /// `nodePortAddresses`.
    pub node_port_addresses: Option<Vec<String>>,
    /// `metricsBindAddress`.
    pub metrics_bind_address: Option<String>,
    /// `healthzBindAddress`.
    pub healthz_bind_address: Option<String>,
    /// `configSyncPeriod`.
    pub config_sync_period: Option<String>,
    /// `clientConnection` (only `kubeconfig` applies).
    pub client_connection: Option<ClientConnection>,
    /// `nftables` settings.
    pub nftables: Option<SyncSettings>,
    /// `iptables` settings (their sync periods apply when `nftables` gives none).
    pub iptables: Option<SyncSettings>,
    /// `ipvs` settings.
    pub ipvs: Option<Ipvs>,
    /// `conntrack` settings: weir leaves conntrack sysctls to the node; reported.
    pub conntrack: Option<serde_yaml_ng::Value>,
    /// `featureGates`: ignored with a warning.
    pub feature_gates: Option<BTreeMap<String, bool>>,
    /// Everything else.
    #[serde(flatten)]
    pub rest: Rest,
}

/// `clientConnection`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    /// Path to a kubeconfig.
    pub kubeconfig: Option<String>,
    /// Other fields (qps, burst, contentType...).
    #[serde(flatten)]
    pub rest: Rest,
}

/// `nftables` / `iptables` settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncSettings {
    /// `syncPeriod`.
    pub sync_period: Option<String>,
    /// `minSyncPeriod`.
    pub min_sync_period: Option<String>,
    /// `masqueradeAll`.
    pub masquerade_all: Option<bool>,
    /// Other fields (masqueradeBit, localhostNodePorts...).
    #[serde(flatten)]
    pub rest: Rest,
}

/// `ipvs` settings (for the IPVS mode).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ipvs {
    /// `scheduler`.
    pub scheduler: Option<String>,
    /// `strictARP`.
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    /// `tcpTimeout` (a Go duration such as `900s` or `15m0s`).
    pub tcp_timeout: Option<String>,
    /// `tcpFinTimeout`.
    pub tcp_fin_timeout: Option<String>,
    /// `udpTimeout`.
    pub udp_timeout: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub rest: Rest,
}

/// The file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// Unreadable.
    #[error("--config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a KubeProxyConfiguration, or a field of the wrong type.
    #[error("--config {path}: field {field}: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// Path of the offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A field's value cannot be used for the flag it fills.
    #[error("--config {path}: {message}")]
    Value {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the field).
        message: String,
    },
}

/// Parses the command line and environment, then fills flags not given there from
/// `--config`. Returns the arguments and the file's warnings (ignored or unknown fields).
/// Exits with clap's message on a bad command line, as any clap binary does.
pub fn parse_args() -> Result<(Args, Vec<String>), ConfigFileError> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some(path) = args.config.clone() else {
        return Ok((args, Vec::new()));
    };
    let file = read(&path)?;
    let explicit = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        )
    };
    let warnings = apply(&file, &mut args, &explicit)
        .map_err(|message| ConfigFileError::Value { path, message })?;
    Ok((args, warnings))
}

/// Reads and type-checks the file.
pub fn read(path: &Path) -> Result<KubeProxyConfiguration, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses a KubeProxyConfiguration document.
pub fn parse(path: &Path, text: &str) -> Result<KubeProxyConfiguration, ConfigFileError> {
    let field_err = |field: String, message: String| ConfigFileError::Field {
        path: path.to_owned(),
        field,
        message,
    };
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let c: KubeProxyConfiguration = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        field_err(field, e.into_inner().to_string())
    })?;
    if c.api_version.as_deref() != Some(API_VERSION) {
        return Err(field_err(
            "apiVersion".into(),
            format!(
                "{:?}: want {API_VERSION}",
                c.api_version.as_deref().unwrap_or("")
            ),
        ));
    }
    if c.kind.as_deref() != Some("KubeProxyConfiguration") {
        return Err(field_err(
            "kind".into(),
            format!(
                "{:?}: want KubeProxyConfiguration",
                c.kind.as_deref().unwrap_or("")
            ),
        ));
    }
    Ok(c)
}

/// Fields kube-proxy has that weir accepts and ignores (they configure things weir does not
/// do, or leaves to the node).
const IGNORED: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "detectLocal",
    "detectLocalMode",
    "enableProfiling",
    "logging",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "winkernel",
    "udpIdleTimeout",
    "windowsRunAsService",
];

/// Fills `args` from the file where the command line did not set a flag (`explicit(id)`
/// says whether flag `id` was given). Returns warnings: ignored and unknown fields.
pub fn apply(
    c: &KubeProxyConfiguration,
    args: &mut Args,
    explicit: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let unset = |id: &str| !explicit(id);
    if let Some(mode) = c.mode.as_deref().filter(|m| !m.is_empty()) {
        let m = match mode {
            "nftables" => ProxyMode::Nftables,
            "ipvs" => ProxyMode::Ipvs,
            "ebpf" => ProxyMode::Ebpf,
            other => {
                return Err(format!(
                    "field mode: {other:?} is not a weir mode (want nftables, ipvs or ebpf)"
                ))
            }
        };
        if unset("proxy_mode") {
            args.proxy_mode = m;
        }
    }
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    if let (Some(v), true) = (&c.cluster_cidr, unset("cluster_cidr")) {
        args.cluster_cidr = list(v);
    }
    if let (Some(v), true) = (&c.hostname_override, unset("hostname_override")) {
        args.hostname_override = Some(v.clone()).filter(|v| !v.is_empty());
    }
    if let (Some(v), true) = (&c.node_port_addresses, unset("nodeport_addresses")) {
        args.nodeport_addresses = v.clone();
    }
    if let (Some(v), true) = (&c.metrics_bind_address, unset("metrics_bind_address")) {
        args.metrics_bind_address = with_port(v, 10249);
    }
    if let (Some(v), true) = (&c.healthz_bind_address, unset("healthz_bind_address")) {
        args.healthz_bind_address = with_port(v, 10256);
    }
    if let (Some(v), true) = (&c.config_sync_period, unset("config_sync_period")) {
        args.config_sync_period = v.clone();
    }
    if let Some(cc) = &c.client_connection {
        if let (Some(k), true) = (&cc.kubeconfig, unset("kubeconfig")) {
            if !k.is_empty() {
                args.kubeconfig = Some(PathBuf::from(k));
            }
        }
        report(&mut warnings, "clientConnection.", &cc.rest, "ignored");
    }
    // nftables settings win over iptables ones (kube-proxy's nftables mode reads them).
    for (name, s) in [("iptables", &c.iptables), ("nftables", &c.nftables)] {
        let Some(s) = s else { continue };
        if let (Some(v), true) = (&s.sync_period, unset("sync_period")) {
            args.sync_period = v.clone();
        }
        if let (Some(v), true) = (&s.min_sync_period, unset("min_sync_period")) {
            args.min_sync_period = v.clone();
        }
        if let (Some(v), true) = (s.masquerade_all, unset("masquerade_all")) {
            args.masquerade_all = v;
        }
        report(&mut warnings, &format!("{name}."), &s.rest, "ignored");
    }
    if let Some(ipvs) = &c.ipvs {
        if let Some(sched) = ipvs.scheduler.as_deref().filter(|s| !s.is_empty()) {
            use clap::ValueEnum;
            let s = crate::dataplane::ipvs::Scheduler::from_str(sched, false).map_err(|_| {
                format!(
                    "field ipvs.scheduler: {sched:?} is not one of rr, wrr, lc, wlc, sh, dh, mh"
                )
            })?;
            if unset("ipvs_scheduler") {
                args.ipvs_scheduler = s;
            }
        }
        if let (Some(v), true) = (ipvs.strict_arp, unset("ipvs_strict_arp")) {
            args.ipvs_strict_arp = v;
        }
        for (value, id, arg) in [
            (
                &ipvs.tcp_timeout,
                "ipvs_tcp_timeout",
                &mut args.ipvs_tcp_timeout,
            ),
            (
                &ipvs.tcp_fin_timeout,
                "ipvs_tcpfin_timeout",
                &mut args.ipvs_tcpfin_timeout,
            ),
            (
                &ipvs.udp_timeout,
                "ipvs_udp_timeout",
                &mut args.ipvs_udp_timeout,
            ),
        ] {
            if let (Some(v), true) = (value, unset(id)) {
                arg.clone_from(v);
            }
        }
        report(&mut warnings, "ipvs.", &ipvs.rest, "ignored");
    }
    if c.conntrack.is_some() {
        warnings
            .push("field conntrack: ignored (weir leaves conntrack sysctls to the node)".into());
    }
    if let Some(g) = &c.feature_gates {
        if !g.is_empty() {
            let names: Vec<&str> = g.keys().map(String::as_str).collect();
            warnings.push(format!(
                "field featureGates: ignored ({})",
                names.join(", ")
            ));
        }
    }
    for k in c.rest.keys() {
        if IGNORED.contains(&k.as_str()) {
            warnings.push(format!("field {k}: ignored (does not apply to weir)"));
        } else {
            warnings.push(format!("field {k}: unknown field, ignored"));
        }
    }
    Ok(warnings)
}

fn report(warnings: &mut Vec<String>, prefix: &str, rest: &Rest, what: &str) {
    for k in rest.keys() {
        warnings.push(format!("field {prefix}{k}: {what}"));
    }
}

/// kube-proxy accepts a bare address for the bind addresses; weir's flags want a port.
fn with_port(v: &str, port: u16) -> String {
    if v.parse::<std::net::SocketAddr>().is_ok() {
        v.to_owned()
    } else if let Ok(ip) = v.parse::<std::net::IpAddr>() {
        std::net::SocketAddr::new(ip, port).to_string()
    } else {
        v.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const FILE: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
metricsBindAddress: 0.0.0.0:10249
healthzBindAddress: 0.0.0.0
nodePortAddresses: [primary]
configSyncPeriod: 10m
clientConnection: {kubeconfig: /var/lib/weir/kubeconfig, qps: 5}
nftables: {syncPeriod: 20s, minSyncPeriod: 2s, masqueradeAll: true, masqueradeBit: 14}
conntrack: {maxPerCore: 32768}
featureGates: {SomeGate: true}
oomScoreAdj: -999
portRnage: "30000-32767"
"#;

    #[test]
    fn file_fills_flags_not_given_on_the_command_line() {
        let c = parse(Path::new("f"), FILE).unwrap();
        let mut args = Args::try_parse_from(["weir-proxy", "--min-sync-period", "5s"]).unwrap();
        let warnings = apply(&c, &mut args, &|id| id == "min_sync_period").unwrap();
        assert_eq!(args.cluster_cidr, ["10.244.0.0/16", "fd00:10:244::/56"]);
        assert_eq!(args.metrics_bind_address, "0.0.0.0:10249");
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(args.sync_period, "20s");
        assert_eq!(args.min_sync_period, "5s", "the flag wins");
        assert!(args.masquerade_all);
        assert_eq!(args.config_sync_period, "10m");
        assert_eq!(
            args.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/weir/kubeconfig"))
        );
        let cfg = args.validate_with("n1", false).unwrap();
        assert!(matches!(cfg.source, crate::config::SourceConfig::Kube(_)));
        let text = warnings.join("\n");
        for w in [
            "field clientConnection.qps: ignored",
            "field nftables.masqueradeBit: ignored",
            "field conntrack: ignored",
            "field featureGates: ignored (SomeGate)",
            "field oomScoreAdj: ignored",
            "field portRnage: unknown field",
        ] {
            assert!(text.contains(w), "{w} missing in\n{text}");
        }
    }

    #[test]
    fn ipvs_strict_arp_and_timeouts_come_from_the_file() {
        let file = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                    mode: ipvs\nipvs: {scheduler: wrr, strictARP: true, tcpTimeout: 15m0s, \
                    tcpFinTimeout: 30s, udpTimeout: 0s, syncPeriod: 30s}\n";
        let c = parse(Path::new("f"), file).unwrap();
        let mut args = Args::try_parse_from([
            "weir-proxy",
            "--source",
            "dir:/x",
            "--ipvs-udp-timeout",
            "5s",
        ])
        .unwrap();
        let warnings = apply(&c, &mut args, &|id| id == "ipvs_udp_timeout").unwrap();
        let cfg = args.validate_with("n1", false).unwrap();
        assert!(cfg.ipvs_strict_arp);
        assert_eq!(
            cfg.ipvs_timeouts,
            crate::dataplane::ipvs::Timeouts {
                tcp: 900,
                tcp_fin: 30,
                udp: 5
            }
        );
        assert_eq!(warnings, ["field ipvs.syncPeriod: ignored"]);
    }

    #[test]
    fn wrong_types_and_kinds_name_the_field() {
        let e = parse(
            Path::new("f"),
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnftables: {masqueradeAll: maybe}\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("field nftables.masqueradeAll"),
            "{e}"
        );
        let e = parse(Path::new("f"), "apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert!(e.to_string().contains("field apiVersion"), "{e}");
        let c = parse(
            Path::new("f"),
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n",
        )
        .unwrap();
        let mut args = Args::try_parse_from(["weir-proxy"]).unwrap();
        let e = apply(&c, &mut args, &|_| false).unwrap_err();
        assert!(e.contains("field mode"), "{e}");
    }
}
