//! Prometheus metrics with kube-proxy's names, types and labels where the meaning is the
//! same, plus weir's own `weir_*` ones.
//!
//! kube-proxy's metrics (Kubernetes v1.37, `pkg/proxy/metrics`) are component-base metrics
//! in the `kubeproxy` subsystem, so every name starts with `kubeproxy_`. prometheus_client
//! appends `_total` to a counter's samples: a counter is registered here without the
//! suffix and exposed with it (`kubeproxy_proxy_healthz` → `kubeproxy_proxy_healthz_total`).
//! A gauge keeps its name as registered, so kube-proxy's gauge
//! `kubeproxy_sync_proxy_rules_no_local_endpoints_total` is registered with its `_total`.
//! [`KUBE_PROXY_METRICS`] lists what weir serves under kube-proxy's names (as exposed),
//! [`KUBE_PROXY_NOT_SERVED`] the kube-proxy metrics it does not serve and why;
//! `docs/metrics.md` has the whole table.
//!
//! # `ip_family`
//!
//! kube-proxy runs one proxier per IP family and labels its sync and programming metrics
//! with the proxier's family (`IPv4`, `IPv6`). weir programs both families' tables (`ip
//! weir` and `ip6 weir`) in every sync, so every sync is observed once per family: the
//! family's own work (reading, planning and applying its table) plus the work both share
//! (the model, IPVS, the eBPF maps). See [`Metrics::observe_sync`].

use crate::dataplane::nft::Family;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

/// Label pairs of one series.
pub type Labels = Vec<(String, String)>;

/// A histogram per label set, each with the same buckets.
pub type HistogramFamily = MetricFamily<Labels, Histogram, fn() -> Histogram>;

/// A floating-point gauge (timestamps in seconds).
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// The kube-proxy metrics weir serves: the name as exposed (a counter's samples with their
/// `_total`), the type, and the label names in the order kube-proxy exposes them
/// (alphabetical; histogram buckets add `le`). Same names, types and labels as kube-proxy
/// v1.37 in nftables mode; the conntrack reconciler and health metrics too.
pub const KUBE_PROXY_METRICS: &[(&str, &str, &[&str])] = &[
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        &["ip_family", "traffic_policy"],
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "counter",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "counter",
        &["ip_family"],
    ),
    ("kubeproxy_proxy_healthz_total", "counter", &["code"]),
    ("kubeproxy_proxy_livez_total", "counter", &["code"]),
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "counter",
        &["ip_family"],
    ),
];

/// kube-proxy metrics weir does not serve (name as exposed, why). Only `pkg/proxy`'s
/// metrics: component-base, client-go, Go runtime and process metrics (`rest_client_*`,
/// `go_*`, `process_*`, `kubernetes_build_info`, ...) are out of scope.
pub const KUBE_PROXY_NOT_SERVED: &[(&str, &str)] = &[
    (
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "iptables and ipvs modes only (iptables-restore); weir programs nftables and counts \
         failed transactions in kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
        "iptables mode only; weir's failed partial syncs count in \
         kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_total",
        "iptables mode only (rules per iptables table); weir serves weir_nftables_objects",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_last",
        "iptables mode only (rules written by the last sync); weir serves \
         weir_sync_plan_element_changes_total",
    ),
    (
        "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
        "iptables mode only (an nfacct counter on its ct state invalid drop rule)",
    ),
    (
        "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
        "iptables mode only (an nfacct counter on localhost NodePorts, which weir does not serve)",
    ),
    (
        "kubeproxy_nftables_localhost_nodeport_listeners",
        "nftables mode with the alpha gate KubeProxyNFTablesLocalhostNodePorts (v1.37): \
         weir has no userspace localhost NodePort proxy",
    ),
    (
        "kubeproxy_nftables_localhost_nodeport_listener_creation_failures_total",
        "nftables mode with the alpha gate KubeProxyNFTablesLocalhostNodePorts (v1.37): \
         weir has no userspace localhost NodePort proxy",
    ),
    (
        "kubeproxy_nftables_localhost_nodeport_rejected_packets_total",
        "nftables mode with the alpha gate KubeProxyNFTablesLocalhostNodePorts (v1.37): \
         weir does not program localhost NodePort reject counters",
    ),
    (
        "kubeproxy_sync_proxy_rules_winkernel_lb_create_failures_total",
        "winkernel (Windows) mode only",
    ),
    (
        "kubeproxy_sync_proxy_rules_winkernel_lb_update_failures_total",
        "winkernel (Windows) mode only",
    ),
    (
        "kubeproxy_sync_proxy_rules_winkernel_lb_delete_failures_total",
        "winkernel (Windows) mode only",
    ),
];

/// Which of the health server's probes answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz` (readiness).
    Healthz,
    /// `/livez` (liveness).
    Livez,
}

/// Every metric weir exports.
pub struct Metrics {
    registry: Registry,
    /// `kubeproxy_sync_proxy_rules_duration_seconds{ip_family}`: each successful sync,
    /// once per family (see [`Metrics::observe_sync`]).
    pub sync_duration: HistogramFamily,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds{ip_family}`: the full syncs.
    pub sync_full_duration: HistogramFamily,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds{ip_family}`: the partial syncs.
    pub sync_partial_duration: HistogramFamily,
    /// `kubeproxy_network_programming_duration_seconds{ip_family}`: from the oldest change a
    /// sync took (when weir received it) to the end of that sync, once per family the sync
    /// programmed. kube-proxy measures from the EndpointSlice's last-change-trigger-time
    /// annotation, per changed object; weir measures from receipt, once per sync.
    pub network_programming_duration: HistogramFamily,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family}`: when the last sync
    /// programming that family's table succeeded.
    pub last_sync_timestamp: MetricFamily<Labels, FloatGauge>,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family}`: when a change
    /// last asked for a sync; every change asks for both families' (one sync programs both).
    pub last_queued_timestamp: MetricFamily<Labels, FloatGauge>,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_pending`.
    pub endpoint_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`.
    pub endpoint_changes_total: Counter,
    /// `kubeproxy_sync_proxy_rules_service_changes_pending`.
    pub service_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_service_changes_total`.
    pub service_changes_total: Counter,
    /// `kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family}`: reading or
    /// programming that family's `weir` table failed (stale chains and maps go in the
    /// sync's own transaction, so their failures count here too).
    pub nftables_sync_failures: MetricFamily<Labels, Counter>,
    /// `kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family}`: removing
    /// that family's leftover `weir` service table (another mode's, in eBPF mode) failed.
    pub nftables_cleanup_failures: MetricFamily<Labels, Counter>,
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family,traffic_policy}`:
    /// Service ports of that family with a Local policy and no local endpoint of that
    /// family (a gauge, as upstream).
    pub no_local_endpoints: MetricFamily<Labels, Gauge>,
    /// `kubeproxy_proxy_healthz_total{code}`: `/healthz` answers of the health server, by
    /// HTTP status.
    pub healthz_total: MetricFamily<Labels, Counter>,
    /// `kubeproxy_proxy_livez_total{code}`: `/livez` answers of the health server.
    pub livez_total: MetricFamily<Labels, Counter>,
    /// `kubeproxy_conntrack_reconciler_sync_duration_seconds{ip_family}`: each stale-UDP
    /// conntrack cleanup pass over one family's table (dump, match, delete). kube-proxy
    /// reconciles every sync; weir only after syncs that changed UDP endpoints.
    pub conntrack_reconciler_duration: HistogramFamily,
    /// `kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family}`: conntrack entries
    /// those passes deleted.
    pub conntrack_reconciler_deleted: MetricFamily<Labels, Counter>,
    /// `weir_nftables_objects`: chains, rules, sets, maps and elements in weir's table.
    pub nftables_objects: Gauge,
    /// `weir_ebpf_sync_failures_total`: eBPF map reads or writes that failed.
    pub ebpf_sync_failures: Counter,
    /// `weir_ebpf_map_entries`: entries in the services and backends maps.
    pub ebpf_map_entries: Gauge,
    /// `weir_sync_plan_element_changes_total`: map elements added or removed by syncs.
    pub plan_element_changes: Counter,
    /// `weir_source_invalid_objects`: objects skipped as invalid in the last sync.
    pub invalid_objects: Gauge,
    /// `weir_source_invalid_updates_total{kind}`: invalid object versions received.
    pub invalid_updates: MetricFamily<Labels, Counter>,
    /// `weir_service_ports`: Service ports programmed.
    pub service_ports: Gauge,
    /// `weir_endpoints`: endpoint entries programmed (cluster-wide plus local lists),
    /// summed over Service ports.
    pub endpoints: Gauge,
    /// `weir_healthcheck_listeners`: healthCheckNodePort servers listening.
    pub healthcheck_listeners: Gauge,
    /// `weir_policy_sync_duration_seconds`: NetworkPolicy syncs (resolve, render, apply).
    pub policy_sync_duration: Histogram,
    /// `weir_policy_sync_last_timestamp_seconds`: when the last policy sync succeeded.
    pub policy_last_sync_timestamp: FloatGauge,
    /// `weir_policy_sync_failures_total`: policy syncs the kernel refused or that failed.
    pub policy_sync_failures: Counter,
    /// `weir_policy_nftables_objects`: chains, rules, sets and elements of `weir_policy`.
    pub policy_nftables_objects: Gauge,
    /// `weir_policy_objects{kind}`: Pods, Namespaces and NetworkPolicies known.
    pub policy_objects: MetricFamily<Labels, Gauge>,
    /// `weir_policy_local_pods`: pods on this node whose traffic weir enforces.
    pub policy_local_pods: Gauge,
}

/// One label pair.
pub fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_owned(), value.to_owned())]
}

/// kube-proxy's `ip_family` label value of a family (`IPv4`, `IPv6`).
pub fn ip_family(family: Family) -> &'static str {
    match family {
        Family::Ip => "IPv4",
        Family::Ip6 => "IPv6",
    }
}

/// The `ip_family` label of `family`.
pub fn family_label(family: Family) -> Labels {
    label("ip_family", ip_family(family))
}

/// Both families, as kube-proxy's dual-stack proxiers label them.
const FAMILIES: [Family; 2] = [Family::Ip, Family::Ip6];

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// kube-proxy's sync latency buckets: from 1 ms, factor 2, 15 buckets (to 16.384 s).
fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's network programming buckets: 0, 0.25 s, 0.5 s, 1 s to 59 s by 1 s, 60 s
/// to 115 s by 5 s, 120 s to 300 s by 30 s (component-base's `MergeBuckets` starts at 0).
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn network_programming_histogram() -> Histogram {
    Histogram::new(network_programming_buckets())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let per_family = || HistogramFamily::new_with_constructor(sync_histogram as fn() -> _);
        let m = Metrics {
            sync_duration: per_family(),
            sync_full_duration: per_family(),
            sync_partial_duration: per_family(),
            network_programming_duration: HistogramFamily::new_with_constructor(
                network_programming_histogram,
            ),
            last_sync_timestamp: MetricFamily::default(),
            last_queued_timestamp: MetricFamily::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            nftables_sync_failures: MetricFamily::default(),
            nftables_cleanup_failures: MetricFamily::default(),
            no_local_endpoints: MetricFamily::default(),
            healthz_total: MetricFamily::default(),
            livez_total: MetricFamily::default(),
            conntrack_reconciler_duration: per_family(),
            conntrack_reconciler_deleted: MetricFamily::default(),
            nftables_objects: Gauge::default(),
            ebpf_sync_failures: Counter::default(),
            ebpf_map_entries: Gauge::default(),
            plan_element_changes: Counter::default(),
            invalid_objects: Gauge::default(),
            invalid_updates: MetricFamily::default(),
            service_ports: Gauge::default(),
            endpoints: Gauge::default(),
            healthcheck_listeners: Gauge::default(),
            policy_sync_duration: sync_histogram(),
            policy_last_sync_timestamp: Gauge::default(),
            policy_sync_failures: Counter::default(),
            policy_nftables_objects: Gauge::default(),
            policy_objects: MetricFamily::default(),
            policy_local_pods: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures",
            "Cumulative proxy nftables sync failures",
            m.nftables_sync_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
            "Cumulative proxy nftables cleanup failures",
            m.nftables_cleanup_failures.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz_total.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez_total.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            m.conntrack_reconciler_duration.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            m.conntrack_reconciler_deleted.clone(),
        );
        registry.register(
            "weir_nftables_objects",
            "Chains, rules, sets, maps and elements in weir's nftables table",
            m.nftables_objects.clone(),
        );
        registry.register(
            "weir_ebpf_sync_failures",
            "eBPF map reads or writes that failed",
            m.ebpf_sync_failures.clone(),
        );
        registry.register(
            "weir_ebpf_map_entries",
            "Entries in weir's eBPF services and backends maps",
            m.ebpf_map_entries.clone(),
        );
        registry.register(
            "weir_sync_plan_element_changes",
            "Map and set elements added or removed by syncs",
            m.plan_element_changes.clone(),
        );
        registry.register(
            "weir_source_invalid_objects",
            "Objects skipped as invalid in the last sync",
            m.invalid_objects.clone(),
        );
        registry.register(
            "weir_source_invalid_updates",
            "Invalid Service and EndpointSlice versions received (skipped, last good kept)",
            m.invalid_updates.clone(),
        );
        registry.register(
            "weir_service_ports",
            "Service ports programmed",
            m.service_ports.clone(),
        );
        registry.register(
            "weir_endpoints",
            "Endpoint entries programmed (cluster-wide plus local lists), summed over Service ports",
            m.endpoints.clone(),
        );
        registry.register(
            "weir_healthcheck_listeners",
            "healthCheckNodePort servers listening",
            m.healthcheck_listeners.clone(),
        );
        registry.register(
            "weir_policy_sync_duration_seconds",
            "NetworkPolicy sync latency in seconds",
            m.policy_sync_duration.clone(),
        );
        registry.register(
            "weir_policy_sync_last_timestamp_seconds",
            "When the last NetworkPolicy sync succeeded",
            m.policy_last_sync_timestamp.clone(),
        );
        registry.register(
            "weir_policy_sync_failures",
            "NetworkPolicy syncs that failed",
            m.policy_sync_failures.clone(),
        );
        registry.register(
            "weir_policy_nftables_objects",
            "Chains, rules, sets and elements in the weir_policy tables",
            m.policy_nftables_objects.clone(),
        );
        registry.register(
            "weir_policy_objects",
            "Pods, Namespaces and NetworkPolicies known to the policy controller",
            m.policy_objects.clone(),
        );
        registry.register(
            "weir_policy_local_pods",
            "Pods on this node whose NetworkPolicy weir enforces",
            m.policy_local_pods.clone(),
        );
        // Every per-family series is there (empty, at 0) before the first sync, for both
        // families weir programs, as the metrics were before they had labels.
        for family in FAMILIES {
            let l = family_label(family);
            for h in [
                &m.sync_duration,
                &m.sync_full_duration,
                &m.sync_partial_duration,
                &m.network_programming_duration,
                &m.conntrack_reconciler_duration,
            ] {
                drop(h.get_or_create(&l));
            }
            for g in [&m.last_sync_timestamp, &m.last_queued_timestamp] {
                drop(g.get_or_create(&l));
            }
            for policy in ["internal", "external"] {
                m.set_no_local_endpoints(family, policy, 0);
            }
            for counter in [
                &m.nftables_sync_failures,
                &m.nftables_cleanup_failures,
                &m.conntrack_reconciler_deleted,
            ] {
                counter.get_or_create(&family_label(family)).inc_by(0);
            }
        }
        Metrics { registry, ..m }
    }

    /// Records a successful sync: `took` per family (that family's own work plus what the
    /// families share; see the module documentation), `full` when it re-read the kernel
    /// state (a full sync), finished at `now`. Observes the sync histograms and sets the
    /// last-sync timestamp of each family given.
    pub fn observe_sync(&self, took: &[(Family, Duration)], full: bool, now: SystemTime) {
        for &(family, d) in took {
            let l = family_label(family);
            self.sync_duration
                .get_or_create(&l)
                .observe(d.as_secs_f64());
            let kind = if full {
                &self.sync_full_duration
            } else {
                &self.sync_partial_duration
            };
            kind.get_or_create(&l).observe(d.as_secs_f64());
            self.last_sync_timestamp.get_or_create(&l).set(seconds(now));
        }
    }

    /// Records `latency` from a change to the end of the sync that programmed it into
    /// `family`'s table.
    pub fn observe_network_programming(&self, family: Family, latency: Duration) {
        self.network_programming_duration
            .get_or_create(&family_label(family))
            .observe(latency.as_secs_f64());
    }

    /// Records that a change was queued at `now`: it asks for a sync of both families.
    pub fn observe_queued(&self, now: SystemTime) {
        for family in FAMILIES {
            self.last_queued_timestamp
                .get_or_create(&family_label(family))
                .set(seconds(now));
        }
    }

    /// Counts a failed read or transaction of `family`'s `weir` table.
    pub fn nftables_sync_failed(&self, family: Family) {
        self.nftables_sync_failures
            .get_or_create(&family_label(family))
            .inc();
    }

    /// Counts a failed removal of `family`'s leftover `weir` table.
    pub fn nftables_cleanup_failed(&self, family: Family) {
        self.nftables_cleanup_failures
            .get_or_create(&family_label(family))
            .inc();
    }

    /// Sets the number of `family`'s Service ports with `traffic_policy` (`internal` or
    /// `external`) Local and no local endpoint.
    pub fn set_no_local_endpoints(&self, family: Family, traffic_policy: &str, n: usize) {
        let labels = vec![
            ("ip_family".to_owned(), ip_family(family).to_owned()),
            ("traffic_policy".to_owned(), traffic_policy.to_owned()),
        ];
        self.no_local_endpoints
            .get_or_create(&labels)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one answer of the health server's `probe` with HTTP status `code`.
    pub fn count_probe(&self, probe: Probe, code: u16) {
        let family = match probe {
            Probe::Healthz => &self.healthz_total,
            Probe::Livez => &self.livez_total,
        };
        family
            .get_or_create(&label("code", &code.to_string()))
            .inc();
    }

    /// Records one conntrack cleanup pass over `family`'s table that took `took` and
    /// deleted `deleted` entries.
    pub fn observe_conntrack_pass(&self, family: Family, deleted: usize, took: Duration) {
        let l = family_label(family);
        self.conntrack_reconciler_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        self.conntrack_reconciler_deleted
            .get_or_create(&l)
            .inc_by(u64::try_from(deleted).unwrap_or(u64::MAX));
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Calls every recording method, so every label family has series.
    fn exercised() -> Metrics {
        let m = Metrics::new();
        let now = SystemTime::now();
        let ms = Duration::from_millis;
        m.observe_queued(now);
        m.observe_sync(&[(Family::Ip, ms(3)), (Family::Ip6, ms(2))], true, now);
        m.observe_sync(&[(Family::Ip, ms(1)), (Family::Ip6, ms(1))], false, now);
        for f in FAMILIES {
            m.observe_network_programming(f, ms(700));
            m.observe_conntrack_pass(f, 2, ms(4));
            m.nftables_sync_failed(f);
            m.nftables_cleanup_failed(f);
        }
        m.endpoint_changes_total.inc();
        m.service_changes_total.inc();
        m.count_probe(Probe::Healthz, 200);
        m.count_probe(Probe::Healthz, 503);
        m.count_probe(Probe::Livez, 200);
        m.invalid_updates
            .get_or_create(&label("kind", "Service"))
            .inc();
        m.policy_objects.get_or_create(&label("kind", "Pod")).set(1);
        m
    }

    /// One sample: its name, label names (without a bucket's `le`) and value.
    fn samples(text: &str) -> Vec<(String, BTreeSet<String>, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let names = labels
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.split_once('=').unwrap().0.to_owned())
                    .filter(|n| n != "le")
                    .collect();
                (name.to_owned(), names, value.to_owned())
            })
            .collect()
    }

    /// `# TYPE` lines: family name → type.
    fn types(text: &str) -> BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (n, t) = l.split_once(' ').unwrap();
                (n.to_owned(), t.to_owned())
            })
            .collect()
    }

    /// The `# TYPE` line's name of an exposed name: OpenMetrics names a counter's family
    /// without the `_total` its samples carry.
    fn family_name<'a>(exposed: &'a str, ty: &str) -> &'a str {
        match ty {
            "counter" => exposed.strip_suffix("_total").unwrap(),
            _ => exposed,
        }
    }

    #[test]
    fn serves_every_promised_kube_proxy_metric_with_its_type_and_labels() {
        let text = exercised().encode().unwrap();
        let types = types(&text);
        let samples = samples(&text);
        for &(name, ty, labels) in KUBE_PROXY_METRICS {
            let fam = family_name(name, ty);
            assert_eq!(
                types.get(fam).map(String::as_str),
                Some(ty),
                "# TYPE of {name} in\n{text}"
            );
            let sample_names: Vec<String> = match ty {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            };
            let want: BTreeSet<String> = labels.iter().map(|l| (*l).to_owned()).collect();
            let mine: Vec<_> = samples
                .iter()
                .filter(|(n, _, _)| sample_names.contains(n))
                .collect();
            assert!(!mine.is_empty(), "no samples of {name} in\n{text}");
            for (n, got, _) in mine {
                assert_eq!(got, &want, "labels of {n}");
            }
        }
    }

    #[test]
    fn serves_no_other_kube_proxy_metric_and_none_it_disowns() {
        let text = exercised().encode().unwrap();
        let promised: BTreeSet<&str> = KUBE_PROXY_METRICS
            .iter()
            .map(|&(n, ty, _)| family_name(n, ty))
            .collect();
        for fam in types(&text).keys().filter(|n| n.starts_with("kubeproxy_")) {
            assert!(promised.contains(fam.as_str()), "{fam} is not promised");
        }
        for (name, _) in KUBE_PROXY_NOT_SERVED {
            assert!(!text.contains(name), "{name} is listed as not served");
            assert!(
                !KUBE_PROXY_METRICS.iter().any(|(n, _, _)| n == name),
                "{name} is both served and not"
            );
        }
    }

    #[test]
    fn histograms_have_kube_proxys_buckets() {
        let text = exercised().encode().unwrap();
        let bounds = |name: &str| -> Vec<f64> {
            let prefix = format!("{name}_bucket{{");
            text.lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .filter(|r| r.contains("ip_family=\"IPv4\""))
                .filter_map(|r| r.split("le=\"").nth(1)?.split_once('"'))
                .map(|(le, _)| le)
                .filter(|le| *le != "+Inf")
                .map(|le| le.parse().unwrap())
                .collect()
        };
        let sync: Vec<f64> = (0..15).map(|i| 0.001 * 2f64.powi(i)).collect();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        ] {
            let got = bounds(name);
            assert_eq!(got.len(), 15, "{name}");
            for (g, w) in got.iter().zip(&sync) {
                assert!((g - w).abs() < 1e-9, "{name}: {got:?}");
            }
        }
        let np = bounds("kubeproxy_network_programming_duration_seconds");
        assert_eq!(np.len(), 81);
        assert_eq!(&np[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(&np[60..64], &[58.0, 59.0, 60.0, 65.0]);
        assert_eq!(
            &np[74..],
            &[120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]
        );
    }

    #[test]
    fn values_land_on_the_right_family_and_code() {
        let text = exercised().encode().unwrap();
        for line in [
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv6\"} 2",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
            "kubeproxy_proxy_livez_total{code=\"200\"} 1",
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("weir_conntrack_flows_deleted"), "{text}");
    }

    #[test]
    fn per_family_series_are_there_before_the_first_sync() {
        let text = Metrics::new().encode().unwrap();
        for family in ["IPv4", "IPv6"] {
            for name in [
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "kubeproxy_sync_proxy_rules_duration_seconds_count",
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                "kubeproxy_network_programming_duration_seconds_count",
                "kubeproxy_conntrack_reconciler_sync_duration_seconds_count",
            ] {
                let line = format!("{name}{{ip_family=\"{family}\"}} 0");
                assert!(text.contains(&line), "{line} missing in\n{text}");
            }
        }
    }
}
