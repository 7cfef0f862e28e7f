//! One loop owns the change trackers and the dataplane. Source updates only record
//! changes; a [`Schedule`] starts the syncs: at most once per `min_sync_period`, at least
//! every `sync_period` (programming what changed), a full resync (re-reading the kernel's
//! state, so drift is repaired) every `full_sync_period` and after any failure. No kernel write happens before the source has delivered its first
//! complete view. Whether a sync is full or incremental is decided here, in
//! [`Runner::sync`], and nowhere else; the [`Dataplane`] is told which.

use crate::dataplane::conntrack::FlowFilter;
use crate::dataplane::flows::flow_filters;
use crate::dataplane::{Changed, Dataplane, DataplaneError, ObjectCount, SyncReport};
use crate::http::health::ProxyHealth;
use crate::http::metrics::{label, Metrics};
use crate::model::ObjectKey;
use crate::model::{
    compute_service, recompute_with, DesiredState, ModelConfig, NodePortAddresses, ServiceDelta,
    Store,
};
use crate::objects::SourceUpdate;
use crate::sync::effects::SideEffects;
use crate::sync::schedule::{sleep_until, Pacing, Schedule};
use crate::sync::tally::ServiceTally;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::Receiver;
use tracing::{info, instrument, warn};

/// Settings of the runner.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Model settings.
    pub model: ModelConfig,
    /// Minimum time between syncs.
    pub min_sync_period: Duration,
    /// Longest time between two syncs.
    pub sync_period: Duration,
    /// Time between full resyncs.
    pub full_sync_period: Duration,
}

/// The sync loop's state.
pub struct Runner<D: Dataplane> {
    cfg: RunnerConfig,
    store: Store,
    dataplane: D,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    /// The desired state as of the last successful sync.
    desired: DesiredState,
    /// Health-check contents and gauge counts of `desired`, kept up to date with it.
    tally: ServiceTally,
    /// Health-check servers, conntrack cleanup, routes, weir-cni's pod CIDRs.
    effects: SideEffects,
    /// Stale-flow filters of changes not yet followed by a successful sync.
    pending_flows: Vec<FlowFilter>,
}

impl<D: Dataplane> Runner<D> {
    /// A runner programming `dataplane`.
    pub fn new(
        cfg: RunnerConfig,
        dataplane: D,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
    ) -> Self {
        Runner {
            cfg,
            store: Store::default(),
            dataplane,
            metrics,
            health,
            desired: DesiredState::default(),
            tally: ServiceTally::default(),
            effects: SideEffects::default(),
            pending_flows: Vec::new(),
        }
    }

    /// Adds health-check servers and conntrack cleanup.
    pub fn with_effects(mut self, effects: SideEffects) -> Self {
        self.effects = effects;
        self
    }

    /// Runs until the source channel closes.
    pub async fn run(mut self, mut updates: Receiver<SourceUpdate>) {
        let pacing = Pacing::new(self.cfg.min_sync_period, self.cfg.sync_period)
            .with_full_interval(self.cfg.full_sync_period);
        let mut schedule = Schedule::new(pacing, tokio::time::Instant::now());
        loop {
            let wake = schedule.next_run();
            tokio::select! {
                u = updates.recv() => {
                    let Some(u) = u else { return };
                    self.record(u, &mut schedule);
                }
                _ = sleep_until(wake) => {
                    let run = schedule.start(tokio::time::Instant::now());
                    let ok = self.sync(run.full).await;
                    let now = tokio::time::Instant::now();
                    schedule.finish(now, ok);
                    schedule.recheck_at(self.dataplane.recheck_after().map(|d| now + d));
                }
            }
        }
    }

    fn record(&mut self, u: SourceUpdate, schedule: &mut Schedule) {
        let now = SystemTime::now();
        match u {
            SourceUpdate::Synced => schedule.set_ready(),
            SourceUpdate::BatchStart => schedule.hold(true, tokio::time::Instant::now()),
            SourceUpdate::BatchEnd => schedule.hold(false, tokio::time::Instant::now()),
            _ => {}
        }
        let (svc_before, eps_before) = self.store.total_changes();
        let invalid_before = self.store.invalid_received();
        if self.store.record(u, now) > 0 {
            schedule.queue();
            self.health.queued_update(now);
            self.metrics.observe_queued(now);
        }
        let (svc, eps) = self.store.total_changes();
        let (bad_svc_before, bad_eps_before) = invalid_before;
        let (bad_svc, bad_eps) = self.store.invalid_received();
        self.metrics
            .invalid_updates
            .get_or_create(&label("kind", "Service"))
            .inc_by(bad_svc - bad_svc_before);
        self.metrics
            .invalid_updates
            .get_or_create(&label("kind", "EndpointSlice"))
            .inc_by(bad_eps - bad_eps_before);
        self.metrics.service_changes_total.inc_by(svc - svc_before);
        self.metrics.endpoint_changes_total.inc_by(eps - eps_before);
        let (svc_pending, eps_pending) = self.store.pending_changes();
        self.metrics.service_changes_pending.set(svc_pending as i64);
        self.metrics
            .endpoint_changes_pending
            .set(eps_pending as i64);
    }

    /// One sync; returns whether it succeeded. It is full (every Service computed, the
    /// kernel read back) when the schedule asks (`forced_full`), when the dataplane does
    /// not know what the kernel holds (first sync, after a failure), when Nodes changed,
    /// when a frontend released by one Service is wanted by another and when most
    /// Services changed ([`mostly_changed`]); otherwise only the changed Services are
    /// computed and their ports programmed.
    #[instrument(skip_all, fields(full))]
    async fn sync(&mut self, forced_full: bool) -> bool {
        let started = Instant::now();
        let oldest = self.store.oldest_pending();
        let changes = self.store.take_changes();
        for e in self.dataplane.remove_leftovers().await {
            warn!(error = %e, "removing another mode's leftovers failed; retrying next sync");
            if let DataplaneError::Nft { family, .. } = e {
                self.metrics.nftables_cleanup_failed(family);
            }
        }
        if !self.dataplane.programs_services() {
            self.health.updated(SystemTime::now());
            self.effects
                .sync_routes(&self.store, &self.cfg.model.node_name, forced_full)
                .await;
            self.effects
                .write_cni_cidrs(&self.store, &self.cfg.model.node_name);
            tracing::debug!(
                nodes_changed = changes.nodes,
                "synced routes and pod CIDRs (Services are left to another proxy)"
            );
            return true;
        }
        let mut full = forced_full
            || !self.dataplane.tracks_kernel()
            || changes.nodes
            || self.desired.needs_full_compute()
            || mostly_changed(changes.services.len(), self.store.services().len());
        let mut deltas = Vec::new();
        if !full {
            deltas = self.recompute_changed(&changes.services);
            // A released frontend another Service wanted: only a full compute hands it over.
            full = self.desired.needs_full_compute();
        }
        if full {
            self.recompute_all().await;
        }
        self.metrics
            .invalid_objects
            .set(self.store.invalid_objects() as i64);
        let changed = match (full, deltas.is_empty()) {
            (true, _) => Changed::Everything,
            (false, true) => Changed::Nothing,
            (false, false) => Changed::Ports(&deltas),
        };
        let report = match self.dataplane.sync(&self.desired, changed).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "sync failed; the next sync is a full one");
                match e {
                    DataplaneError::Nft { family, .. } => self.metrics.nftables_sync_failed(family),
                    DataplaneError::Ebpf { .. } => {
                        self.metrics.ebpf_sync_failures.inc();
                    }
                    DataplaneError::Ipvs(_) => {}
                }
                return false;
            }
        };
        match report.objects {
            ObjectCount::Unchanged => {}
            ObjectCount::Nft(n) => {
                self.metrics.nftables_objects.set(n as i64);
            }
            ObjectCount::NftDelta(d) => {
                self.metrics.nftables_objects.inc_by(d);
            }
            ObjectCount::EbpfEntries(n) => {
                self.metrics.ebpf_map_entries.set(n as i64);
            }
        }
        let retry = report.retry;
        self.finish_sync(started, &report, oldest, full).await;
        !retry
    }

    /// Computes every Service again (after re-reading the node's addresses when the
    /// NodePorts' depend on them), noting each change for the stale flows and the
    /// dataplane, and rebuilds the tally.
    async fn recompute_all(&mut self) {
        self.refresh_local_addrs().await;
        let (flows, dataplane, store) = (&mut self.pending_flows, &mut self.dataplane, &self.store);
        let mut on_delta = |d: ServiceDelta| {
            flows.extend(flow_filters(&d));
            dataplane.note_change(&d, store);
        };
        for e in recompute_with(
            &self.store,
            &self.cfg.model,
            &mut self.desired,
            &mut on_delta,
        ) {
            warn!(error = %e, "skipping invalid object");
        }
        self.tally.rebuild(&self.desired);
        if self.desired.node_ips.is_empty()
            && self
                .desired
                .services
                .values()
                .any(|s| s.info.node_port.is_some())
        {
            warn!(
                node = %self.cfg.model.node_name,
                "no InternalIP/ExternalIP for this node (Node object missing or without \
                 status.addresses, or --hostname-override wrong): NodePorts are not served"
            );
        }
    }

    /// What follows every successful sync, whatever the backend: metrics, health, stale
    /// flows, health-check servers, routes, the CNI's pod CIDRs.
    async fn finish_sync(
        &mut self,
        started: Instant,
        report: &SyncReport,
        oldest: Option<SystemTime>,
        was_full: bool,
    ) {
        let took = started.elapsed();
        let planned = took.saturating_sub(report.applied);
        let now = SystemTime::now();
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
        self.metrics
            .plan_element_changes
            .inc_by(report.element_changes as u64);
        self.metrics
            .observe_sync(&report.own.per_family(took), was_full, now);
        if let Some(t) = oldest {
            // One sync programs both families' tables (or the eBPF maps, which serve both).
            let latency = now.duration_since(t).unwrap_or_default();
            for family in crate::dataplane::nft::FAMILIES {
                self.metrics.observe_network_programming(family, latency);
            }
        }
        self.health.updated(now);
        let mut flows = std::mem::take(&mut self.pending_flows);
        flows.sort();
        flows.dedup();
        self.effects.after_sync(&self.tally, &flows, &self.metrics);
        self.effects
            .sync_routes(&self.store, &self.cfg.model.node_name, was_full)
            .await;
        self.effects
            .write_cni_cidrs(&self.store, &self.cfg.model.node_name);
        info!(
            full = was_full,
            services = self.desired.services.len(),
            ops = report.ops,
            element_changes = report.element_changes,
            plan_us = planned.as_micros() as u64,
            apply_us = report.applied.as_micros() as u64,
            took_us = took.as_micros() as u64,
            "synced"
        );
    }

    /// With `--nodeport-addresses` CIDRs, re-reads the node's addresses (before a full
    /// compute, which picks the NodePort addresses among them).
    async fn refresh_local_addrs(&mut self) {
        if let NodePortAddresses::Cidrs(_) = self.cfg.model.nodeport_addresses {
            match crate::sys::local_addrs::local_addrs().await {
                Ok(a) => self.cfg.model.local_addrs = a,
                Err(e) => {
                    warn!(error = %e, "reading local addresses for --nodeport-addresses failed; keeping the last ones")
                }
            }
        }
    }

    /// Recomputes the desired state of the changed Services only, noting the stale flows
    /// of every change and bringing the tally along; returns the changes.
    fn recompute_changed(&mut self, services: &BTreeSet<ObjectKey>) -> Vec<ServiceDelta> {
        let mut deltas = Vec::new();
        for key in services {
            let ports = compute_service(&self.store, key, &self.cfg.model).unwrap_or_else(|e| {
                warn!(error = %e, "skipping invalid object");
                Vec::new()
            });
            let (d, conflicts) = self.desired.replace_service(key, ports);
            for e in conflicts {
                warn!(error = %e, "skipping invalid object");
            }
            for delta in &d {
                self.pending_flows.extend(flow_filters(delta));
                self.dataplane.note_change(delta, &self.store);
                self.tally.apply(delta);
            }
            deltas.extend(d);
        }
        deltas
    }
}

/// Whether `changed` of `total` Services is enough change that a full sync costs less
/// than an incremental one: at 10k Services x 10 endpoints in nftables mode, programming
/// 6,575 new Services incrementally took 2.5 s, a full sync of all 10,000 1.4 s (weir's
/// own `synced` log lines, `cargo xtask bench dir`). More than a quarter of them, and more
/// than 500.
fn mostly_changed(changed: usize, total: usize) -> bool {
    changed > 500 && changed * 4 > total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ebpf::render::LbAlgorithm;
    use crate::dataplane::ebpf::sync::EbpfDataplane;
    use crate::dataplane::nft::diff::plan_state;
    use crate::dataplane::nft::fake::SharedFake;
    use crate::dataplane::nft::render::RenderConfig;
    use crate::dataplane::nft::sync::NftDataplane;
    use crate::dataplane::nft::{DumpedTable, Family, FAMILIES};
    use crate::dataplane::none::NoServices;
    use crate::objects::Object;

    fn cfg(min_sync: u64) -> RunnerConfig {
        RunnerConfig {
            model: ModelConfig {
                node_name: "node1".into(),
                ..ModelConfig::default()
            },
            min_sync_period: Duration::from_millis(min_sync),
            sync_period: Duration::from_secs(3600),
            full_sync_period: Duration::from_secs(3600),
        }
    }

    fn svc(name: &str, ip: &str, eps: &[&str]) -> Vec<Object> {
        let s = format!("{{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: d}}, spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}}}");
        let addrs: Vec<String> = eps
            .iter()
            .map(|e| format!("{{addresses: [{e}]}}"))
            .collect();
        let e = format!("{{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: {name}-1, namespace: d, labels: {{kubernetes.io/service-name: {name}}}}}, addressType: IPv4, ports: [{{port: 8080}}], endpoints: [{}]}}", addrs.join(", "));
        vec![
            Object::Service(serde_yaml_ng::from_str(&s).unwrap()),
            Object::EndpointSlice(serde_yaml_ng::from_str(&e).unwrap()),
        ]
    }

    /// Sends a complete listing holding exactly `objects`.
    fn send_listing(tx: &tokio::sync::mpsc::Sender<SourceUpdate>, objects: Vec<Object>) {
        for u in SourceUpdate::listing(objects) {
            tx.try_send(u).unwrap();
        }
    }

    fn nft(fake: &SharedFake) -> NftDataplane<SharedFake> {
        NftDataplane::new(fake.clone(), RenderConfig::default())
    }

    fn start(min_sync: u64) -> (SharedFake, tokio::sync::mpsc::Sender<SourceUpdate>) {
        let (fake, tx, _) = start_with_metrics(min_sync);
        (fake, tx)
    }

    fn start_with_metrics(
        min_sync: u64,
    ) -> (
        SharedFake,
        tokio::sync::mpsc::Sender<SourceUpdate>,
        Arc<Metrics>,
    ) {
        let fake = SharedFake::default();
        let metrics = Arc::new(Metrics::new());
        let runner = Runner::new(
            cfg(min_sync),
            nft(&fake),
            metrics.clone(),
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(runner.run(rx));
        (fake, tx, metrics)
    }

    fn backends(fake: &SharedFake) -> usize {
        fake.table(Family::Ip)
            .map(|t| {
                t.maps
                    .iter()
                    .filter(|(n, _)| n.starts_with("backends_"))
                    .map(|(_, m)| m.elements.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn ebpf_mode_writes_maps_incrementally_and_rereads_them_after_a_failure() {
        use crate::dataplane::ebpf::fake::FakeMaps;
        let nft = SharedFake::default();
        let maps = FakeMaps::default();
        let runner = Runner::new(
            cfg(10),
            EbpfDataplane::new(maps.clone(), LbAlgorithm::Random, nft.clone()),
            Arc::new(Metrics::new()),
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(runner.run(rx));
        send_listing(&tx, svc("a", "10.96.0.1", &["10.244.1.1"]));
        settle().await;
        assert_eq!(maps.contents().services.len(), 1);
        assert_eq!(maps.contents().backends.len(), 1);
        assert_eq!(maps.dumps(), 1, "the first sync adopts what the maps hold");
        for o in svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]) {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        assert_eq!(maps.contents().backends.len(), 2);
        assert_eq!(
            maps.dumps(),
            1,
            "an incremental sync does not re-read the maps"
        );
        maps.fail_next_apply();
        let three = ["10.244.1.1", "10.244.1.2", "10.244.1.3"];
        for o in svc("a", "10.96.0.1", &three) {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        assert_eq!(maps.dumps(), 2, "the retry re-read the maps");
        assert_eq!(maps.contents().backends.len(), 3);
        assert_eq!(nft.applies(), 0, "nftables is untouched in eBPF mode");
    }

    #[tokio::test(start_paused = true)]
    async fn without_services_only_the_pod_cidrs_are_written_and_nothing_is_programmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pod-cidrs.json");
        let fake = SharedFake::default();
        let runner = Runner::new(
            cfg(10),
            NoServices::new(fake.clone()),
            Arc::new(Metrics::new()),
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        )
        .with_effects(SideEffects::new(None, None).with_cni_cidrs_file(file.clone()));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(runner.run(rx));
        let node = "{apiVersion: v1, kind: Node, metadata: {name: node1}, spec: {podCIDRs: [10.244.1.0/24]}}";
        let mut objects = svc("a", "10.96.0.1", &["10.244.1.1"]);
        objects.push(Object::Node(serde_yaml_ng::from_str(node).unwrap()));
        send_listing(&tx, objects);
        settle().await;
        let written = std::fs::read_to_string(&file).expect("the pod CIDRs file is written");
        assert!(written.contains("10.244.1.0/24"), "{written}");
        assert_eq!(fake.applies(), 0, "no Service is programmed");
        assert!(fake.table(Family::Ip).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn ebpf_mode_removes_the_nftables_tables_and_retries_a_failed_removal() {
        use crate::dataplane::ebpf::fake::FakeMaps;
        use crate::dataplane::nft::NftBackend;
        let nft = SharedFake::default();
        for family in FAMILIES {
            let (skeleton, _) = plan_state(
                &DesiredState::default(),
                &RenderConfig::default(),
                family,
                DumpedTable::empty(family),
            );
            nft.apply(&skeleton).unwrap();
        }
        let metrics = Arc::new(Metrics::new());
        let runner = Runner::new(
            cfg(10),
            EbpfDataplane::new(FakeMaps::default(), LbAlgorithm::Random, nft.clone()),
            metrics.clone(),
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(runner.run(rx));
        nft.fail_next_apply();
        send_listing(&tx, svc("a", "10.96.0.1", &["10.244.1.1"]));
        settle().await;
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv4\"} 1"
            ),
            "{text}"
        );
        assert!(
            nft.table(Family::Ip).is_some(),
            "the failed removal left it"
        );
        assert!(nft.table(Family::Ip6).is_none());
        for o in svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]) {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        assert!(nft.table(Family::Ip).is_none(), "the next sync removed it");
    }

    #[tokio::test(start_paused = true)]
    async fn sync_metrics_are_observed_per_family_and_failures_count_against_theirs() {
        let (fake, tx, metrics) = start_with_metrics(10);
        send_listing(&tx, svc("a", "10.96.0.1", &["10.244.1.1"]));
        settle().await;
        // An IPv4-only change: only the ip table's plan has work, and it fails.
        fake.fail_next_apply();
        for o in svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]) {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        let text = metrics.encode().unwrap();
        for line in [
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv6\"} 0",
            // The first sync and the retry, both full; the failed sync is not observed.
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 2",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 2",
            "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv6\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        let stamp = |family: &str| {
            let name = format!(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds{{ip_family=\"{family}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&name)?.parse::<f64>().ok())
                .unwrap()
        };
        assert!(stamp("IPv4") > 0.0 && stamp("IPv4") == stamp("IPv6"));
    }

    #[tokio::test(start_paused = true)]
    async fn no_kernel_write_before_the_source_has_synced_once() {
        let (fake, tx) = start(10);
        for o in svc("a", "10.96.0.1", &["10.244.1.1"]) {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        assert_eq!(fake.applies(), 0, "a partial view must not be programmed");
        for k in crate::objects::Kind::ALL {
            tx.try_send(SourceUpdate::RelistStart(k)).unwrap();
        }
        for o in svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]) {
            tx.try_send(SourceUpdate::RelistItem(o)).unwrap();
        }
        for k in crate::objects::Kind::ALL {
            tx.try_send(SourceUpdate::RelistDone(k)).unwrap();
        }
        tx.try_send(SourceUpdate::Synced).unwrap();
        settle().await;
        assert!(fake.applies() > 0);
        assert_eq!(backends(&fake), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_the_min_sync_period_are_applied_in_one_sync() {
        let (fake, tx) = start(1500);
        send_listing(&tx, svc("a", "10.96.0.1", &["10.244.1.1"]));
        settle().await;
        let first = fake.applies();
        assert!(first > 0);
        for i in 2..7 {
            let eps: Vec<String> = (1..i).map(|j| format!("10.244.1.{j}")).collect();
            let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
            for o in svc("a", "10.96.0.1", &eps) {
                tx.try_send(SourceUpdate::Upsert(o)).unwrap();
            }
        }
        settle().await;
        assert_eq!(fake.applies(), first, "still inside the min sync period");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(fake.applies(), first + 1, "one sync took all five changes");
        assert_eq!(backends(&fake), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_from_the_source_is_programmed_in_one_sync_after_its_end() {
        let (fake, tx) = start(10);
        send_listing(&tx, svc("a", "10.96.0.1", &["10.244.1.1"]));
        settle().await;
        let first = fake.applies();
        tx.try_send(SourceUpdate::BatchStart).unwrap();
        for i in 2..7 {
            for o in svc(&format!("s{i}"), &format!("10.96.0.{i}"), &["10.244.1.1"]) {
                tx.try_send(SourceUpdate::Upsert(o)).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(fake.applies(), first, "nothing programmed inside the batch");
        tx.try_send(SourceUpdate::BatchEnd).unwrap();
        settle().await;
        assert_eq!(fake.applies(), first + 1, "one sync took the whole batch");
        assert_eq!(backends(&fake), 6);
    }

    #[test]
    fn a_sync_is_full_when_most_services_changed() {
        assert!(!mostly_changed(1, 10));
        assert!(!mostly_changed(500, 1000), "no more than 500");
        assert!(mostly_changed(2600, 10_000));
        assert!(
            !mostly_changed(2500, 10_000),
            "a quarter is not more than a quarter"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_apply_is_retried_as_a_full_sync_and_nothing_is_lost() {
        let (fake, tx) = start(10);
        send_listing(&tx, svc("a", "10.96.0.1", &["10.244.1.1"]));
        settle().await;
        let dumps = fake.dumps();
        let first = fake.applies();
        fake.fail_next_apply();
        for o in svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]) {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        assert!(
            fake.dumps() > dumps,
            "the retry re-read the table (full sync)"
        );
        assert_eq!(fake.applies(), first + 1, "one successful retry");
        assert_eq!(backends(&fake), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_left_out_for_a_taken_frontend_takes_over_when_the_owner_goes() {
        let (fake, tx) = start(10);
        let mut objects = svc("a", "10.96.0.1", &["10.244.1.1"]);
        objects.extend(svc("b", "10.96.0.1", &["10.244.1.2", "10.244.1.3"]));
        send_listing(&tx, objects);
        settle().await;
        assert_eq!(backends(&fake), 1, "a owns 10.96.0.1:80; b is left out");
        tx.try_send(SourceUpdate::Delete(crate::objects::ObjectRef {
            kind: crate::objects::Kind::Service,
            key: crate::model::ObjectKey::new("d", "a"),
        }))
        .unwrap();
        settle().await;
        assert_eq!(backends(&fake), 2, "b took over the frontend");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_object_added_to_a_working_set_changes_nothing_else() {
        let (fake, tx, metrics) = start_with_metrics(10);
        let mut objects = svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]);
        objects.extend(svc("b", "10.96.0.2", &["10.244.1.3"]));
        send_listing(&tx, objects);
        settle().await;
        let before = fake.table(Family::Ip).unwrap();
        let applies = fake.applies();
        let bad = [
            // A Service with an invalid ClusterIP, one with a duplicate port, one with an
            // unknown protocol; a slice with an invalid address and one with an unknown
            // address type.
            "{apiVersion: v1, kind: Service, metadata: {name: c, namespace: d}, spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}}",
            "{apiVersion: v1, kind: Service, metadata: {name: e, namespace: d}, spec: {clusterIP: 10.96.0.5, ports: [{name: x, port: 80}, {name: y, port: 80}]}}",
            "{apiVersion: v1, kind: Service, metadata: {name: f, namespace: d}, spec: {clusterIP: 10.96.0.6, ports: [{port: 80, protocol: ICMP}]}}",
        ];
        for y in bad {
            let o = Object::Service(serde_yaml_ng::from_str(y).unwrap());
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        let bad_slices = [
            "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: a-2, namespace: d, labels: {kubernetes.io/service-name: a}}, addressType: IPv4, ports: [{port: 8080}], endpoints: [{addresses: [10.244.1.999]}]}",
            "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: a-3, namespace: d, labels: {kubernetes.io/service-name: a}}, addressType: IPX, ports: [{port: 8080}], endpoints: [{addresses: [10.244.1.9]}]}",
        ];
        for y in bad_slices {
            let o = Object::EndpointSlice(serde_yaml_ng::from_str(y).unwrap());
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        assert_eq!(
            fake.table(Family::Ip).unwrap(),
            before,
            "the working services are untouched"
        );
        assert!(fake.applies() <= applies + 1);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("weir_source_invalid_updates_total{kind=\"Service\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("weir_source_invalid_updates_total{kind=\"EndpointSlice\"} 2"),
            "{text}"
        );
        assert!(text.contains("weir_source_invalid_objects 5"), "{text}");
        // A good change to a working service still goes through.
        for o in svc("b", "10.96.0.2", &["10.244.1.3", "10.244.1.4"]) {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        settle().await;
        assert_eq!(backends(&fake), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_api_source_programs_nothing_until_every_kind_has_listed() {
        use crate::objects::Kind;
        let (fake, tx) = start(10);
        let objects = svc("a", "10.96.0.1", &["10.244.1.1"]);
        tx.try_send(SourceUpdate::RelistStart(Kind::Service))
            .unwrap();
        tx.try_send(SourceUpdate::RelistItem(objects[0].clone()))
            .unwrap();
        tx.try_send(SourceUpdate::RelistDone(Kind::Service))
            .unwrap();
        tx.try_send(SourceUpdate::RelistStart(Kind::EndpointSlice))
            .unwrap();
        tx.try_send(SourceUpdate::RelistItem(objects[1].clone()))
            .unwrap();
        tx.try_send(SourceUpdate::RelistDone(Kind::EndpointSlice))
            .unwrap();
        settle().await;
        assert_eq!(fake.applies(), 0, "Nodes have not listed yet");
        tx.try_send(SourceUpdate::RelistStart(Kind::Node)).unwrap();
        tx.try_send(SourceUpdate::RelistDone(Kind::Node)).unwrap();
        tx.try_send(SourceUpdate::Synced).unwrap();
        settle().await;
        assert!(fake.applies() > 0);
        assert_eq!(backends(&fake), 1);
    }

    /// The value of an unlabelled metric line `name` in `text`.
    fn metric_value(text: &str, name: &str) -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn gauges_after_incremental_syncs_equal_those_of_a_full_sync_of_the_same_objects() {
        use crate::sync::tally::gauges;
        let (_fake, tx, metrics) = start_with_metrics(10);
        let mut objects = svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]);
        objects.extend(svc("b", "10.96.0.2", &["10.244.1.3"]));
        objects.extend(svc("c", "10.96.0.3", &[]));
        send_listing(&tx, objects);
        settle().await;
        // Incremental syncs: an endpoint added, a Service deleted, one added.
        let mut now: Vec<Object> = svc(
            "a",
            "10.96.0.1",
            &["10.244.1.1", "10.244.1.2", "10.244.1.4"],
        );
        now.extend(svc("d", "10.96.0.4", &["10.244.1.5"]));
        for o in now.iter().cloned() {
            tx.try_send(SourceUpdate::Upsert(o)).unwrap();
        }
        tx.try_send(SourceUpdate::Delete(crate::objects::ObjectRef {
            kind: crate::objects::Kind::Service,
            key: ObjectKey::new("d", "b"),
        }))
        .unwrap();
        settle().await;
        // The same objects computed from scratch.
        let mut store = Store::default();
        let mut all = now;
        all.extend(svc("b", "10.96.0.2", &["10.244.1.3"]).into_iter().skip(1));
        all.extend(svc("c", "10.96.0.3", &[]));
        store.record_all(SourceUpdate::listing(all), SystemTime::now());
        let mut full = DesiredState::default();
        recompute_with(&store, &cfg(10).model, &mut full, &mut |_| {});
        let want = gauges(&full);
        assert_eq!((want.service_ports, want.endpoints), (3, 4));
        let text = metrics.encode().unwrap();
        assert_eq!(
            metric_value(&text, "weir_service_ports"),
            Some(want.service_ports as i64),
            "{text}"
        );
        assert_eq!(
            metric_value(&text, "weir_endpoints"),
            Some(want.endpoints as i64),
            "{text}"
        );
    }
}
