//! Prometheus metrics with kube-proxy's names where the meaning is the same.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

/// Every metric weir exports.
pub struct Metrics {
    registry: Registry,
    /// `kubeproxy_sync_proxy_rules_duration_seconds`.
    pub sync_duration: Histogram,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`.
    pub sync_full_duration: Histogram,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds`.
    pub sync_partial_duration: Histogram,
    /// `kubeproxy_network_programming_duration_seconds`.
    pub network_programming_duration: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`.
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_pending`.
    pub endpoint_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`.
    pub endpoint_changes_total: Counter,
    /// `kubeproxy_sync_proxy_rules_service_changes_pending`.
    pub service_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_service_changes_total`.
    pub service_changes_total: Counter,
    /// `kubeproxy_sync_proxy_rules_nftables_sync_failures_total`.
    pub nftables_sync_failures: Counter,
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
    pub invalid_updates: Family<Vec<(String, String)>, Counter>,
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`: Service
    /// ports with a Local policy and no endpoint on this node (a gauge, as upstream).
    pub no_local_endpoints: Family<Vec<(String, String)>, Gauge>,
    /// `weir_service_ports`: Service ports programmed.
    pub service_ports: Gauge,
    /// `weir_endpoints`: endpoint entries programmed (cluster-wide plus local lists),
    /// summed over Service ports.
    pub endpoints: Gauge,
    /// `weir_healthcheck_listeners`: healthCheckNodePort servers listening.
    pub healthcheck_listeners: Gauge,
    /// `weir_conntrack_flows_deleted_total`: stale UDP flows deleted.
    pub conntrack_deleted: Counter,
    /// `weir_policy_sync_duration_seconds`: NetworkPolicy syncs (resolve, render, apply).
    pub policy_sync_duration: Histogram,
    /// `weir_policy_sync_last_timestamp_seconds`: when the last policy sync succeeded.
    pub policy_last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// `weir_policy_sync_failures_total`: policy syncs the kernel refused or that failed.
    pub policy_sync_failures: Counter,
    /// `weir_policy_nftables_objects`: chains, rules, sets and elements of `weir_policy`.
    pub policy_nftables_objects: Gauge,
    /// `weir_policy_objects{kind}`: Pods, Namespaces and NetworkPolicies known.
    pub policy_objects: Family<Vec<(String, String)>, Gauge>,
    /// `weir_policy_local_pods`: pods on this node whose traffic weir enforces.
    pub policy_local_pods: Gauge,
}

/// One label pair.
pub fn label(name: &str, value: &str) -> Vec<(String, String)> {
    vec![(name.to_owned(), value.to_owned())]
}

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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
        // kube-proxy: exponential buckets from 1 ms, factor 2, 15 buckets.
        let sync_buckets = || Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let m = Metrics {
            sync_duration: sync_buckets(),
            sync_full_duration: sync_buckets(),
            sync_partial_duration: sync_buckets(),
            network_programming_duration: Histogram::new([
                0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 30.0,
                60.0, 120.0, 300.0,
            ]),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            nftables_sync_failures: Counter::default(),
            nftables_objects: Gauge::default(),
            ebpf_sync_failures: Counter::default(),
            ebpf_map_entries: Gauge::default(),
            plan_element_changes: Counter::default(),
            invalid_objects: Gauge::default(),
            invalid_updates: Family::default(),
            no_local_endpoints: Family::default(),
            service_ports: Gauge::default(),
            endpoints: Gauge::default(),
            healthcheck_listeners: Gauge::default(),
            conntrack_deleted: Counter::default(),
            policy_sync_duration: sync_buckets(),
            policy_last_sync_timestamp: Gauge::default(),
            policy_sync_failures: Counter::default(),
            policy_nftables_objects: Gauge::default(),
            policy_objects: Family::default(),
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
            "kubeproxy_sync_proxy_rules_nftables_sync_failures",
            "Failed nftables transactions",
            m.nftables_sync_failures.clone(),
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
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
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
            "weir_conntrack_flows_deleted",
            "Stale UDP conntrack flows deleted",
            m.conntrack_deleted.clone(),
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
        for policy in ["internal", "external"] {
            m.no_local_endpoints
                .get_or_create(&label("traffic_policy", policy))
                .set(0);
        }
        Metrics { registry, ..m }
    }

    /// Records a successful sync that took `took`; `full` when it re-read the kernel state.
    pub fn observe_sync(&self, took: Duration, full: bool, now: SystemTime) {
        self.sync_duration.observe(took.as_secs_f64());
        if full {
            self.sync_full_duration.observe(took.as_secs_f64());
        } else {
            self.sync_partial_duration.observe(took.as_secs_f64());
        }
        self.last_sync_timestamp.set(seconds(now));
    }

    /// Records that a change was queued at `now`.
    pub fn observe_queued(&self, now: SystemTime) {
        self.last_queued_timestamp.set(seconds(now));
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

    #[test]
    fn exposes_kube_proxy_metric_names() {
        let m = Metrics::new();
        m.observe_sync(Duration::from_millis(3), true, SystemTime::now());
        m.endpoint_changes_total.inc();
        let text = m.encode().unwrap();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_network_programming_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 0",
            "weir_nftables_objects ",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
