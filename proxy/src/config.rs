//! Command line (kube-proxy's flag names, each also from the environment), validated once
//! into a typed [`Config`].

use ipnetwork::IpNetwork;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The proxy modes weir knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// nftables: one table `weir` with shared named maps.
    Nftables,
    /// IPVS: virtual servers through generic netlink, addresses on `weir-ipvs0`.
    Ipvs,
    /// eBPF: cgroup socket hooks translate ClusterIP:port at connect time (first slice:
    /// ClusterIP TCP and UDP; NodePort and external traffic are not served yet).
    Ebpf,
}

impl ProxyMode {
    /// The mode's name as `/proxyMode` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::Ebpf => "ebpf",
        }
    }
}

/// weir-proxy's flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "weir-proxy",
    version,
    about = "weir: node dataplane for Kubernetes Services"
)]
pub struct Args {
    /// Which proxy mode to use: nftables, ipvs or ebpf.
    #[arg(long, env = "WEIR_PROXY_MODE", value_enum, default_value = "nftables")]
    pub proxy_mode: ProxyMode,
    /// Where objects come from: `dir:PATH` (a directory of YAML manifests).
    #[arg(long, env = "WEIR_SOURCE")]
    pub source: Option<String>,
    /// The name of this node (defaults to the host name).
    #[arg(long, env = "NODE_NAME")]
    pub hostname_override: Option<String>,
    /// The pod CIDRs of the cluster (comma-separated); ClusterIP traffic from outside them
    /// is masqueraded.
    #[arg(long, env = "WEIR_CLUSTER_CIDR", value_delimiter = ',')]
    pub cluster_cidr: Vec<String>,
    /// The Service ClusterIP range(s) (comma-separated): traffic to an unallocated address
    /// in it is dropped.
    #[arg(long, env = "WEIR_SERVICE_CLUSTER_IP_RANGE", value_delimiter = ',')]
    pub service_cluster_ip_range: Vec<String>,
    /// Where NodePorts are served (comma-separated): `primary` (the default: the Node
    /// object's addresses) or CIDRs (every local address inside one of them).
    #[arg(long, env = "WEIR_NODEPORT_ADDRESSES", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long, env = "WEIR_MASQUERADE_ALL")]
    pub masquerade_all: bool,
    /// The IPVS scheduler (IPVS mode): rr, wrr, lc, wlc, sh, dh or mh.
    #[arg(long, env = "WEIR_IPVS_SCHEDULER", value_enum, default_value = "rr")]
    pub ipvs_scheduler: crate::dataplane::ipvs::Scheduler,
    /// IPVS mode: answer ARP only for addresses of the interface asked, never for Service
    /// addresses on weir-ipvs0 (sets `arp_ignore=1`, `arp_announce=2`, as kube-proxy's
    /// `strictARP`).
    #[arg(long, env = "WEIR_IPVS_STRICT_ARP")]
    pub ipvs_strict_arp: bool,
    /// IPVS mode: idle timeout of established TCP connections (e.g. `900s`; `0s` keeps the
    /// kernel's).
    #[arg(long, env = "WEIR_IPVS_TCP_TIMEOUT", default_value = "0s")]
    pub ipvs_tcp_timeout: String,
    /// IPVS mode: timeout of TCP connections after a FIN (`0s` keeps the kernel's).
    #[arg(long, env = "WEIR_IPVS_TCPFIN_TIMEOUT", default_value = "0s")]
    pub ipvs_tcpfin_timeout: String,
    /// IPVS mode: timeout of UDP flows (`0s` keeps the kernel's).
    #[arg(long, env = "WEIR_IPVS_UDP_TIMEOUT", default_value = "0s")]
    pub ipvs_udp_timeout: String,
    /// Address of the metrics server (`/metrics`, `/proxyMode`, `/healthz`, `/configz`).
    #[arg(
        long,
        env = "WEIR_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:10249"
    )]
    pub metrics_bind_address: String,
    /// Address of the health server (`/healthz`, `/livez`).
    #[arg(
        long,
        env = "WEIR_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    pub healthz_bind_address: String,
    /// Minimum time between syncs (e.g. `1s`, `100ms`).
    #[arg(long, env = "WEIR_MIN_SYNC_PERIOD", default_value = "1s")]
    pub min_sync_period: String,
    /// Longest time between two syncs (e.g. `30s`); a sync between full resyncs programs
    /// only what changed.
    #[arg(long, env = "WEIR_SYNC_PERIOD", default_value = "30s")]
    pub sync_period: String,
    /// Time between full resyncs, which re-read the kernel's state and repair drift (as
    /// kube-proxy's nftables mode, hourly by default; never more often than
    /// `--sync-period`).
    #[arg(long, env = "WEIR_FULL_SYNC_PERIOD", default_value = "1h")]
    pub full_sync_period: String,
    /// Remove everything weir programmed and exit.
    #[arg(long, env = "WEIR_CLEANUP")]
    pub cleanup: bool,
    /// Path to a kubeconfig file for the API server (implies `--source kube`).
    #[arg(long, env = "WEIR_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address, overriding the kubeconfig's (implies `--source kube`).
    #[arg(long, env = "WEIR_MASTER")]
    pub master: Option<String>,
    /// Install routes to every other node's pod CIDRs via its address (host-gw), from the
    /// Node objects' `spec.podCIDRs`.
    #[arg(long, env = "WEIR_ROUTE_POD_CIDRS")]
    pub route_pod_cidrs: bool,
    /// Write this node's `spec.podCIDRs` here (JSON) for weir-cni, whose conflist then
    /// needs no `podCIDRs` (e.g. /var/lib/weir-cni/pod-cidrs.json).
    #[arg(long, env = "WEIR_CNI_POD_CIDRS_FILE")]
    pub cni_pod_cidrs_file: Option<PathBuf>,
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1); flags override it.
    #[arg(long, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// eBPF mode: the cgroup v2 whose processes' sockets are translated (default: the
    /// first cgroup2 mount in /proc/self/mountinfo: `/sys/fs/cgroup` on cgroup v2 hosts,
    /// `/sys/fs/cgroup/unified` on hybrid ones; with none, weir mounts one at
    /// /run/weir/cgroupv2, the root of its cgroup namespace).
    #[arg(long, env = "WEIR_EBPF_CGROUP")]
    pub ebpf_cgroup: Option<PathBuf>,
    /// eBPF mode: the bpffs directory where maps and links are pinned (a restarted daemon
    /// adopts them; `--cleanup` removes them).
    #[arg(long, env = "WEIR_BPFFS_DIR", default_value = "/sys/fs/bpf/weir")]
    pub bpffs_dir: PathBuf,
    /// eBPF mode: the node's external interfaces, where tc programs translate NodePorts,
    /// external and load-balancer IPs (comma-separated; default: the interfaces holding
    /// the node's addresses).
    #[arg(long, env = "WEIR_EBPF_INTERFACES", value_delimiter = ',')]
    pub ebpf_interfaces: Vec<String>,
    /// eBPF mode: how new flows pick a backend: random, or maglev (consistent hashing of
    /// the 5-tuple on the tc path).
    #[arg(
        long,
        env = "WEIR_EBPF_LB_ALGORITHM",
        value_enum,
        default_value = "random"
    )]
    pub ebpf_lb_algorithm: crate::dataplane::ebpf::render::LbAlgorithm,
    /// How often the API watches restart with a full listing (e.g. `15m`).
    #[arg(long, env = "WEIR_CONFIG_SYNC_PERIOD", default_value = "15m")]
    pub config_sync_period: String,
    /// Enforce NetworkPolicy for this node's pods (reads Pods, Namespaces and
    /// NetworkPolicies; programs the `weir_policy` tables).
    #[arg(
        long,
        env = "WEIR_NETWORK_POLICY",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub network_policy: bool,
    /// Serve Services (ClusterIP, NodePort, external and load-balancer IPs, health-check
    /// node ports). `false` leaves Services to another proxy (such as kube-proxy) and keeps
    /// weir's other parts (weir-cni's pod CIDRs, `--route-pod-cidrs`, NetworkPolicy); the
    /// Service state any proxy mode of weir left programmed is removed at start.
    #[arg(
        long,
        env = "WEIR_RUN_SERVICE_PROXY",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub run_service_proxy: bool,
    /// weir-cni's state directory: pods whose addresses its attachment records hold are
    /// this node's (else pods whose `spec.nodeName` is this node).
    #[arg(long, env = "WEIR_CNI_STATE_DIR")]
    pub cni_state_dir: Option<PathBuf>,
}

/// Where objects come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SourceConfig {
    /// A directory of YAML manifests.
    Dir(PathBuf),
    /// The Kubernetes API.
    Kube(crate::source::kube::KubeSourceConfig),
}

/// The validated configuration (served by `/configz` in kube-proxy's camelCase).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Proxy mode.
    pub mode: ProxyMode,
    /// Object source.
    pub source: SourceConfig,
    /// This node's name.
    pub node_name: String,
    /// Cluster pod CIDRs.
    #[serde(rename = "clusterCIDRs")]
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Service ClusterIP ranges.
    #[serde(rename = "serviceClusterIPRange")]
    pub service_cidrs: Vec<IpNetwork>,
    /// Where NodePorts are served.
    pub nodeport_addresses: crate::model::NodePortAddresses,
    /// Install host-gw routes to other nodes' pod CIDRs.
    pub route_pod_cidrs: bool,
    /// Where this node's pod CIDRs are written for weir-cni.
    pub cni_pod_cidrs_file: Option<PathBuf>,
    /// Masquerade all ClusterIP traffic.
    pub masquerade_all: bool,
    /// Enforce NetworkPolicy.
    pub network_policy: bool,
    /// Serve Services (`--run-service-proxy`).
    pub run_service_proxy: bool,
    /// weir-cni's state directory (which pods are local).
    pub cni_state_dir: Option<PathBuf>,
    /// The IPVS scheduler (IPVS mode).
    pub ipvs_scheduler: crate::dataplane::ipvs::Scheduler,
    /// IPVS mode: strict ARP sysctls.
    #[serde(rename = "ipvsStrictARP")]
    pub ipvs_strict_arp: bool,
    /// IPVS mode: connection timeouts in seconds (0: the kernel's).
    pub ipvs_timeouts: crate::dataplane::ipvs::Timeouts,
    /// Metrics server address.
    pub metrics_bind_address: SocketAddr,
    /// Health server address.
    pub healthz_bind_address: SocketAddr,
    /// Minimum time between syncs.
    pub min_sync_period: Duration,
    /// Longest time between two syncs.
    pub sync_period: Duration,
    /// Time between full resyncs.
    pub full_sync_period: Duration,
    /// eBPF mode: where the programs attach and their objects are pinned.
    pub ebpf: crate::dataplane::ebpf::kernel::EbpfSettings,
    /// eBPF mode: `--ebpf-lb-algorithm`.
    pub ebpf_lb_algorithm: crate::dataplane::ebpf::render::LbAlgorithm,
}

/// A flag value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The flag's value is malformed.
    #[error("--{flag} {value:?}: {message}")]
    Invalid {
        /// Flag name.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// No source given.
    #[error(
        "no source: give --kubeconfig or --master (or run in a cluster) for the Kubernetes API, \
         or --source dir:PATH for a directory of manifests"
    )]
    NoSource,
}

fn invalid(flag: &'static str, value: &str, message: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_owned(),
        message: message.to_string(),
    }
}

fn cidrs(flag: &'static str, values: &[String]) -> Result<Vec<IpNetwork>, ConfigError> {
    values
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<IpNetwork>().map_err(|e| invalid(flag, v, e)))
        .collect()
}

fn duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| invalid(flag, value, e))
}

/// An IPVS timeout flag in whole seconds.
fn seconds(flag: &'static str, value: &str) -> Result<u32, ConfigError> {
    let d = duration(flag, value)?;
    if d.subsec_nanos() != 0 {
        return Err(invalid(flag, value, "must be whole seconds"));
    }
    u32::try_from(d.as_secs()).map_err(|_| invalid(flag, value, "too long"))
}

fn addr(flag: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|e| invalid(flag, value, e))
}

impl Args {
    /// Validates the flags. `hostname` is used when `--hostname-override` is not given.
    pub fn validate(&self, hostname: &str) -> Result<Config, ConfigError> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        self.validate_with(hostname, in_cluster)
    }

    /// [`Self::validate`], told whether the in-cluster service account is present.
    pub fn validate_with(&self, hostname: &str, in_cluster: bool) -> Result<Config, ConfigError> {
        let node_name = self
            .hostname_override
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| hostname.trim().to_owned());
        let config_sync_period = duration("config-sync-period", &self.config_sync_period)?;
        if config_sync_period.is_zero() {
            return Err(invalid(
                "config-sync-period",
                &self.config_sync_period,
                "must be greater than 0",
            ));
        }
        let kube = || {
            SourceConfig::Kube(crate::source::kube::KubeSourceConfig {
                kubeconfig: self.kubeconfig.clone(),
                master: self.master.clone(),
                node_name: node_name.clone(),
                all_nodes: self.route_pod_cidrs,
                resync: config_sync_period,
                network_policy: self.network_policy,
            })
        };
        let api_given = self.kubeconfig.is_some() || self.master.is_some() || in_cluster;
        let source = match self.source.as_deref() {
            None if self.cleanup => SourceConfig::Dir(PathBuf::new()),
            None if api_given => kube(),
            None => return Err(ConfigError::NoSource),
            Some("kube") => kube(),
            Some(s) => match s.strip_prefix("dir:") {
                Some(path) if !path.is_empty() => SourceConfig::Dir(PathBuf::from(path)),
                _ => return Err(invalid("source", s, "want kube or dir:PATH")),
            },
        };
        let min_sync_period = duration("min-sync-period", &self.min_sync_period)?;
        let sync_period = duration("sync-period", &self.sync_period)?;
        if sync_period.is_zero() {
            return Err(invalid(
                "sync-period",
                &self.sync_period,
                "must be greater than 0",
            ));
        }
        let full_sync_period = duration("full-sync-period", &self.full_sync_period)?;
        if full_sync_period.is_zero() {
            return Err(invalid(
                "full-sync-period",
                &self.full_sync_period,
                "must be greater than 0",
            ));
        }
        let mountinfo = match self.ebpf_cgroup {
            Some(_) => String::new(),
            None => std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        };
        let service_cidrs = cidrs("service-cluster-ip-range", &self.service_cluster_ip_range)?;
        let (cgroup, cgroup_origin) =
            crate::dataplane::ebpf::kernel::choose_cgroup(self.ebpf_cgroup.as_deref(), &mountinfo);
        Ok(Config {
            mode: self.proxy_mode,
            source,
            node_name,
            cluster_cidrs: cidrs("cluster-cidr", &self.cluster_cidr)?,
            service_cidrs: service_cidrs.clone(),
            nodeport_addresses: match self.nodeport_addresses.as_slice() {
                [] => crate::model::NodePortAddresses::Primary,
                [one] if one == "primary" => crate::model::NodePortAddresses::Primary,
                list => crate::model::NodePortAddresses::Cidrs(cidrs("nodeport-addresses", list)?),
            },
            masquerade_all: self.masquerade_all,
            ipvs_scheduler: self.ipvs_scheduler,
            ipvs_strict_arp: self.ipvs_strict_arp,
            ipvs_timeouts: crate::dataplane::ipvs::Timeouts {
                tcp: seconds("ipvs-tcp-timeout", &self.ipvs_tcp_timeout)?,
                tcp_fin: seconds("ipvs-tcpfin-timeout", &self.ipvs_tcpfin_timeout)?,
                udp: seconds("ipvs-udp-timeout", &self.ipvs_udp_timeout)?,
            },
            route_pod_cidrs: self.route_pod_cidrs,
            cni_pod_cidrs_file: self.cni_pod_cidrs_file.clone(),
            network_policy: self.network_policy,
            run_service_proxy: self.run_service_proxy,
            cni_state_dir: self.cni_state_dir.clone(),
            metrics_bind_address: addr("metrics-bind-address", &self.metrics_bind_address)?,
            healthz_bind_address: addr("healthz-bind-address", &self.healthz_bind_address)?,
            min_sync_period,
            sync_period,
            full_sync_period,
            ebpf: crate::dataplane::ebpf::kernel::EbpfSettings {
                cgroup,
                cgroup_origin,
                service_cidrs,
                bpffs_dir: self.bpffs_dir.clone(),
                interfaces: self.ebpf_interfaces.clone(),
            },
            ebpf_lb_algorithm: self.ebpf_lb_algorithm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_ebpf_cgroup_is_the_flag_else_the_cgroup2_mount_else_weirs_own() {
        use crate::dataplane::ebpf::kernel::{choose_cgroup, CgroupOrigin, OWN_CGROUP2_MOUNT};
        let hybrid = "31 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      36 31 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            choose_cgroup(None, hybrid),
            (
                PathBuf::from("/sys/fs/cgroup/unified"),
                CgroupOrigin::Mountinfo
            )
        );
        let v2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            choose_cgroup(None, v2),
            (PathBuf::from("/sys/fs/cgroup"), CgroupOrigin::Mountinfo)
        );
        // `ip netns exec` mounts a fresh /sys: no cgroup2 is left in its mountinfo.
        let netns_exec = "40 39 0:50 / /sys rw,relatime - sysfs sysfs rw\n";
        assert_eq!(
            choose_cgroup(None, netns_exec),
            (PathBuf::from(OWN_CGROUP2_MOUNT), CgroupOrigin::OwnMount)
        );
        assert_eq!(
            choose_cgroup(Some(std::path::Path::new("/x")), v2),
            (PathBuf::from("/x"), CgroupOrigin::Flag)
        );
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["weir-proxy"];
        all.extend_from_slice(args);
        Args::try_parse_from(all)
            .unwrap()
            .validate_with("host1", false)
    }

    #[test]
    fn defaults_match_kube_proxy() {
        let c = parse(&["--source", "dir:/tmp/x"]).unwrap();
        assert_eq!(c.metrics_bind_address.to_string(), "127.0.0.1:10249");
        assert_eq!(c.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.full_sync_period, Duration::from_secs(3600));
        assert_eq!(c.node_name, "host1");
    }

    #[test]
    fn services_are_served_unless_left_to_another_proxy() {
        assert!(parse(&["--source", "dir:/x"]).unwrap().run_service_proxy);
        let c = parse(&["--source", "dir:/x", "--run-service-proxy=false"]).unwrap();
        assert!(!c.run_service_proxy);
        assert!(c.network_policy, "NetworkPolicy stays on");
        let bad = Args::try_parse_from(["weir-proxy", "--run-service-proxy=maybe"]);
        assert!(bad.unwrap_err().to_string().contains("--run-service-proxy"));
    }

    #[test]
    fn configz_shows_the_effective_config_with_kube_proxy_field_names() {
        let c = parse(&["--source", "dir:/x", "--cluster-cidr", "10.244.0.0/16"]).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["mode"], "nftables");
        assert_eq!(v["clusterCIDRs"][0], "10.244.0.0/16");
        assert_eq!(v["metricsBindAddress"], "127.0.0.1:10249");
    }

    #[test]
    fn go_style_durations_from_kube_proxy_configs_parse() {
        assert_eq!(duration("x", "15m0s").unwrap(), Duration::from_secs(900));
        assert_eq!(duration("x", "1h0m0s").unwrap(), Duration::from_secs(3600));
        assert_eq!(duration("x", "500ms").unwrap(), Duration::from_millis(500));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--source", "dir:/x", "--cluster-cidr", "10.244.0.0/33"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--cluster-cidr \"10.244.0.0/33\""),
            "{e}"
        );
        let e = parse(&["--source", "dir:/x", "--min-sync-period", "soon"]).unwrap_err();
        assert!(e.to_string().starts_with("--min-sync-period"), "{e}");
        let e = parse(&["--source", "api"]).unwrap_err();
        assert!(e.to_string().starts_with("--source \"api\""), "{e}");
        let e = parse(&["--source", "kube", "--config-sync-period", "0s"]).unwrap_err();
        assert!(e.to_string().starts_with("--config-sync-period"), "{e}");
    }

    #[test]
    fn the_api_source_is_chosen_by_kubeconfig_master_or_in_cluster() {
        let c = parse(&["--kubeconfig", "/etc/kc"]).unwrap();
        let SourceConfig::Kube(k) = c.source else {
            panic!("not kube")
        };
        assert_eq!(
            k.kubeconfig.as_deref(),
            Some(std::path::Path::new("/etc/kc"))
        );
        assert_eq!(k.node_name, "host1");
        assert_eq!(k.resync, Duration::from_secs(900));
        let c = parse(&["--master", "https://127.0.0.1:6443"]).unwrap();
        assert!(matches!(c.source, SourceConfig::Kube(_)));
        let args = Args::try_parse_from(["weir-proxy"]).unwrap();
        assert!(matches!(
            args.validate_with("h", true).unwrap().source,
            SourceConfig::Kube(_)
        ));
        let e = args.validate_with("h", false).unwrap_err();
        assert!(e.to_string().starts_with("no source"), "{e}");
    }

    #[test]
    fn ipvs_mode_takes_a_scheduler_defaulting_to_rr() {
        use crate::dataplane::ipvs::Scheduler;
        let c = parse(&["--proxy-mode", "ipvs", "--source", "dir:/x"]).unwrap();
        assert_eq!((c.mode, c.ipvs_scheduler), (ProxyMode::Ipvs, Scheduler::Rr));
        let c = parse(&[
            "--proxy-mode",
            "ipvs",
            "--ipvs-scheduler",
            "mh",
            "--source",
            "dir:/x",
        ]);
        assert_eq!(c.unwrap().ipvs_scheduler, Scheduler::Mh);
        assert!(Args::try_parse_from(["weir-proxy", "--ipvs-scheduler", "nq"]).is_err());
    }

    #[test]
    fn ipvs_timeouts_are_whole_seconds_and_strict_arp_is_off_by_default() {
        use crate::dataplane::ipvs::Timeouts;
        let c = parse(&["--proxy-mode", "ipvs", "--source", "dir:/x"]).unwrap();
        assert!(!c.ipvs_strict_arp);
        assert_eq!(c.ipvs_timeouts, Timeouts::default());
        let c = parse(&[
            "--source",
            "dir:/x",
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout",
            "15m0s",
            "--ipvs-tcpfin-timeout",
            "30s",
            "--ipvs-udp-timeout",
            "1m",
        ])
        .unwrap();
        assert!(c.ipvs_strict_arp);
        assert_eq!(
            c.ipvs_timeouts,
            Timeouts {
                tcp: 900,
                tcp_fin: 30,
                udp: 60
            }
        );
        let e = parse(&["--source", "dir:/x", "--ipvs-udp-timeout", "1500ms"]).unwrap_err();
        assert!(e.to_string().contains("whole seconds"), "{e}");
    }

    #[test]
    fn ebpf_mode_takes_its_cgroup_and_bpffs_dir() {
        let c = parse(&["--proxy-mode", "ebpf", "--source", "dir:/x"]).unwrap();
        assert_eq!(c.mode.as_str(), "ebpf");
        // Without the flag: this process's cgroup2 mount (here /sys/fs/cgroup/unified).
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| crate::dataplane::ebpf::kernel::cgroup2_mount_in(&m))
            .unwrap_or_else(|| PathBuf::from(crate::dataplane::ebpf::kernel::OWN_CGROUP2_MOUNT));
        assert_eq!(c.ebpf.cgroup, mounted);
        assert_eq!(c.ebpf.bpffs_dir, PathBuf::from("/sys/fs/bpf/weir"));
        let c = parse(&[
            "--proxy-mode",
            "ebpf",
            "--source",
            "dir:/x",
            "--ebpf-cgroup",
            "/sys/fs/cgroup/unified/t",
            "--bpffs-dir",
            "/sys/fs/bpf/t",
        ])
        .unwrap();
        assert_eq!(c.ebpf.cgroup, PathBuf::from("/sys/fs/cgroup/unified/t"));
        assert_eq!(c.ebpf.bpffs_dir, PathBuf::from("/sys/fs/bpf/t"));
    }

    #[test]
    fn unknown_flags_are_rejected() {
        assert!(Args::try_parse_from(["weir-proxy", "--frobnicate"]).is_err());
    }
}
