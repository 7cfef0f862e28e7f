//! One loop owns the change trackers and the backend. Source updates only record changes;
//! a [`Schedule`] starts the syncs: at most once per `min_sync_period`, a full resync
//! (re-reading the kernel's state, so drift is repaired) every `sync_period` and after any
//! failure. No kernel write happens before the source has delivered its first complete
//! view.

use crate::dataplane::conntrack::FlowFilter;
use crate::dataplane::ebpf::render::{
    diff as ebpf_diff, render_with as ebpf_render, update_ports as ebpf_update_ports, LbAlgorithm,
};
use crate::dataplane::ebpf::stale::gone_tcp_filters;
use crate::dataplane::ebpf::{EbpfError, MapContents, MapStore};
use crate::dataplane::ipvs::apply::Changed;
use crate::dataplane::nft::diff::{cleanup_plan, plan_state};
use crate::dataplane::nft::incremental::Incremental;
use crate::dataplane::nft::kernel::KernelError;
use crate::dataplane::nft::render::RenderConfig;
use crate::dataplane::nft::{DumpedTable, Family, NftBackend, Plan};
use crate::http::health::ProxyHealth;
use crate::http::metrics::{label, Metrics};
use crate::model::ObjectKey;
use crate::model::{
    compute_service, recompute_with, Changes, DesiredState, ModelConfig, NodePortAddresses,
    ServiceDelta, ServicePortState, Store,
};
use crate::source::SourceUpdate;
use crate::sync::effects::{flow_filters, SideEffects};
use crate::sync::schedule::{sleep_until, Pacing, Schedule};
use crate::sync::tally::ServiceTally;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::Receiver;
use tracing::{info, instrument, warn};

/// How often draining IPVS real servers are looked at again.
const DRAIN_RECHECK: Duration = Duration::from_secs(1);

/// The families weir programs: one `weir` table each.
pub const FAMILIES: [Family; 2] = [Family::Ip, Family::Ip6];

/// Service ports per transaction when filling a table that did not exist.
const FRESH_BATCH: usize = 500;

/// Time a sync spent on each family's own table (reading, planning, applying it), so the
/// per-family sync metrics can be told apart from the work both families share.
#[derive(Clone, Copy, Debug, Default)]
struct FamilyTimes {
    ip: Duration,
    ip6: Duration,
}

impl FamilyTimes {
    /// Adds `d` to `family`'s own time.
    fn add(&mut self, family: Family, d: Duration) {
        match family {
            Family::Ip => self.ip += d,
            Family::Ip6 => self.ip6 += d,
        }
    }

    /// Times `f` as `family`'s own work.
    fn time<T>(&mut self, family: Family, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.add(family, started.elapsed());
        out
    }

    /// What each family's sync took out of a sync of `total`: the family's own time plus
    /// the time neither family's own work accounts for (the model, IPVS, eBPF maps), as
    /// kube-proxy's per-family proxier would have spent it syncing that family alone.
    fn per_family(&self, total: Duration) -> [(Family, Duration); 2] {
        let shared = total.saturating_sub(self.ip + self.ip6);
        [
            (Family::Ip, shared + self.ip),
            (Family::Ip6, shared + self.ip6),
        ]
    }
}

/// When a sync started, how long its planning took and each family's own time in it.
struct SyncTiming {
    started: Instant,
    planned: Duration,
    own: FamilyTimes,
}

/// Settings of the runner.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Model settings.
    pub model: ModelConfig,
    /// Render settings.
    pub render: RenderConfig,
    /// Minimum time between syncs.
    pub min_sync_period: Duration,
    /// Time between full resyncs.
    pub sync_period: Duration,
}

/// The sync loop's state.
pub struct Runner<K: NftBackend> {
    cfg: RunnerConfig,
    store: Store,
    kernel: K,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    /// The desired state as of the last successful sync.
    desired: DesiredState,
    /// Health-check contents and gauge counts of `desired`, kept up to date with it.
    tally: ServiceTally,
    /// Incremental render state matching what the kernel holds; `None` forces a full sync
    /// (re-reading the kernel's table) next time.
    incremental: Option<Vec<Incremental>>,
    /// Health-check servers and conntrack cleanup.
    effects: SideEffects,
    /// Stale-flow filters of changes not yet followed by a successful sync.
    pending_flows: Vec<FlowFilter>,
    /// eBPF mode: TCP endpoints that left their EndpointSlices, whose translated sockets
    /// go ([`crate::dataplane::ebpf::stale`]); cleared by every sync.
    pending_sockets: Vec<FlowFilter>,
    /// In eBPF mode, the maps programmed instead of nftables (`K` is then used only to
    /// remove the nftables mode's leftover `weir` tables).
    ebpf: Option<EbpfSync>,
    /// Whether Services are programmed (`--run-service-proxy`); when not, a sync only
    /// keeps the routes and weir-cni's pod CIDRs.
    services: bool,
    /// eBPF mode and without Services: whether the nftables mode's `weir` tables may still
    /// be there (removal
    /// is checked at the first sync and retried at every sync while it fails).
    leftover_tables: bool,
}

/// The eBPF backend's state in the runner.
struct EbpfSync {
    maps: Arc<Mutex<Box<dyn MapStore>>>,
    /// What the maps hold as of the last successful sync; `None` forces a full sync that
    /// re-reads them.
    current: Option<MapContents>,
    /// `--ebpf-lb-algorithm`.
    algorithm: LbAlgorithm,
    /// What the ClusterIPs map holds as of the last successful sync; `None`: read it.
    cluster_ips: Option<BTreeSet<std::net::IpAddr>>,
}

impl<K: NftBackend> Runner<K> {
    /// A runner programming `kernel`.
    pub fn new(
        cfg: RunnerConfig,
        kernel: K,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
    ) -> Self {
        Runner {
            cfg,
            store: Store::default(),
            kernel,
            metrics,
            health,
            desired: DesiredState::default(),
            tally: ServiceTally::default(),
            incremental: None,
            effects: SideEffects::default(),
            pending_flows: Vec::new(),
            pending_sockets: Vec::new(),
            ebpf: None,
            services: true,
            leftover_tables: false,
        }
    }

    /// Leaves Services to another proxy (`--run-service-proxy=false`): syncs then only
    /// install the routes to other nodes' pod CIDRs and write weir-cni's pod CIDRs; the
    /// backend `K` is never called.
    pub fn without_services(mut self) -> Self {
        self.services = false;
        self.leftover_tables = true;
        self
    }

    /// Programs eBPF maps instead of nftables (`--proxy-mode ebpf`): the nftables backend
    /// `K` is then never called. The first sync reads the maps (adopting what a previous
    /// run left pinned) and writes only the difference.
    pub fn with_ebpf(mut self, maps: impl MapStore) -> Self {
        self.ebpf = Some(EbpfSync {
            maps: Arc::new(Mutex::new(Box::new(maps))),
            current: None,
            algorithm: LbAlgorithm::Random,
            cluster_ips: None,
        });
        self.leftover_tables = true;
        self
    }

    /// Picks backends of new flows with `algorithm` in eBPF mode (after [`Self::with_ebpf`]).
    pub fn with_ebpf_algorithm(mut self, algorithm: LbAlgorithm) -> Self {
        if let Some(e) = self.ebpf.as_mut() {
            e.algorithm = algorithm;
        }
        self
    }

    /// Adds health-check servers and conntrack cleanup.
    pub fn with_effects(mut self, effects: SideEffects) -> Self {
        self.effects = effects;
        self
    }

    /// Runs until the source channel closes.
    pub async fn run(mut self, mut updates: Receiver<SourceUpdate>) {
        let pacing = Pacing::new(self.cfg.min_sync_period, self.cfg.sync_period);
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
                    // Without a change tracker to go on (nftables mode before its first
                    // sync or after a failure), a sync reads the kernel's state.
                    let full = run.full || (self.ebpf.is_none() && self.incremental.is_none());
                    let ok = self.sync(full).await;
                    let now = tokio::time::Instant::now();
                    schedule.finish(now, ok);
                    schedule.recheck_at(self.effects.ipvs_draining().then(|| now + DRAIN_RECHECK));
                }
            }
        }
    }

    fn record(&mut self, u: SourceUpdate, schedule: &mut Schedule) {
        let now = SystemTime::now();
        if matches!(
            u,
            SourceUpdate::Replace(_) | SourceUpdate::RelistDone | SourceUpdate::Synced
        ) {
            schedule.set_ready();
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

    /// One sync; returns whether it succeeded.
    #[instrument(skip_all, fields(full))]
    async fn sync(&mut self, full: bool) -> bool {
        let started = Instant::now();
        let mut own = FamilyTimes::default();
        let oldest = self.store.oldest_pending();
        let changes = self.store.take_changes();
        if !self.services {
            self.remove_leftover_tables().await;
            self.health.updated(SystemTime::now());
            self.effects
                .sync_routes(&self.store, &self.cfg.model.node_name, full)
                .await;
            self.effects
                .write_cni_cidrs(&self.store, &self.cfg.model.node_name);
            tracing::debug!(
                nodes_changed = changes.nodes,
                "synced routes and pod CIDRs (Services are left to another proxy)"
            );
            return true;
        }
        if let Some(mut ebpf) = self.ebpf.take() {
            self.remove_leftover_tables().await;
            let ok = self
                .sync_ebpf(&mut ebpf, full, changes, started, oldest)
                .await;
            self.ebpf = Some(ebpf);
            return ok;
        }
        let incremental = match self.incremental.take() {
            Some(inc) if !full && !changes.nodes && !self.desired.needs_full_compute() => Some(inc),
            _ => None,
        };
        let mut planned = None;
        // The Service ports whose desired state changed (`None`: a full compute).
        let mut port_deltas = None;
        if let Some(mut incs) = incremental {
            let deltas = self.recompute_changed(&changes.services);
            // A released frontend another Service wanted: only a full compute hands it over.
            if !self.desired.needs_full_compute() {
                let node_ips = &self.desired.node_ips;
                let plans = incs
                    .iter_mut()
                    .map(|inc| {
                        let t = Instant::now();
                        let p = inc.update(&deltas, node_ips);
                        own.add(p.family, t.elapsed());
                        p
                    })
                    .collect();
                planned = Some((plans, incs));
                port_deltas = Some(deltas);
            }
        }
        let was_full = planned.is_none();
        let (plans, next) = match planned {
            Some(done) => done,
            None => {
                self.refresh_local_addrs().await;
                let (flows, sockets, store) = (
                    &mut self.pending_flows,
                    &mut self.pending_sockets,
                    &self.store,
                );
                let mut on_delta = |d: ServiceDelta| {
                    flows.extend(flow_filters(&d));
                    sockets.extend(gone_tcp_filters(&d, |a| store.endpoint_listed(&d.name, a)));
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
                let mut plans = Vec::new();
                let mut incs = Vec::new();
                let mut objects = 0;
                for family in FAMILIES {
                    let t = Instant::now();
                    let realized = self.read_kernel(family).await;
                    own.add(family, t.elapsed());
                    let realized = match realized {
                        Ok(r) => r,
                        Err(e) => {
                            warn!(error = %e, %family, "reading the kernel's nftables state failed; retrying");
                            self.metrics.nftables_sync_failed(family);
                            return false;
                        }
                    };
                    match realized {
                        Some(realized) => {
                            let (desired, render) = (&self.desired, &self.cfg.render);
                            let (p, n) =
                                own.time(family, || plan_state(desired, render, family, realized));
                            objects += n;
                            plans.push(p);
                            incs.push(
                                own.time(family, || Incremental::new(desired, render, family)),
                            );
                        }
                        None => {
                            let t = Instant::now();
                            let filled = self.fill_new_table(family).await;
                            own.add(family, t.elapsed());
                            match filled {
                                Ok((inc, n)) => {
                                    objects += n;
                                    incs.push(inc);
                                }
                                Err(e) => {
                                    warn!(error = %e, %family, "programming the new table failed; the next sync is a full one");
                                    self.metrics.nftables_sync_failed(family);
                                    return false;
                                }
                            }
                        }
                    }
                }
                self.metrics.nftables_objects.set(objects as i64);
                (plans, incs)
            }
        };
        self.metrics
            .invalid_objects
            .set(self.store.invalid_objects() as i64);
        let changes_applied: usize = plans.iter().map(Plan::element_changes).sum();
        let element_delta: i64 = plans.iter().map(Plan::element_delta).sum();
        let ops: usize = plans.iter().map(|p| p.ops.len()).sum();
        let planned = started.elapsed();
        for p in plans.into_iter().filter(|p| !p.ops.is_empty()) {
            let family = p.family;
            let t = Instant::now();
            let applied = self.apply(p).await;
            own.add(family, t.elapsed());
            if let Err(e) = applied {
                warn!(error = %e, %family, "applying the nftables plan failed; the next sync is a full one");
                self.metrics.nftables_sync_failed(family);
                return false;
            }
        }
        if !was_full {
            self.metrics.nftables_objects.inc_by(element_delta);
        }
        self.incremental = Some(next);
        // IPVS mode: the virtual servers follow the nftables rules (masquerade marks and
        // rejects) within the same sync, reading IPVS back only when this sync is a full
        // one (or after a failure, or while real servers drain); a failure or a draining
        // real server asks for another sync soon.
        let changed = match &port_deltas {
            Some(d) if d.is_empty() => Changed::Nothing,
            Some(d) => Changed::Ports(d),
            None => Changed::Everything,
        };
        let ipvs_done = self
            .effects
            .sync_ipvs(&self.desired, was_full, changed)
            .await;
        let timing = SyncTiming {
            started,
            planned,
            own,
        };
        self.finish_sync(timing, oldest, was_full, changes_applied, ops)
            .await;
        ipvs_done
    }

    /// What follows every successful sync, whatever the backend: metrics, health, stale
    /// flows, health-check servers, routes, the CNI's pod CIDRs.
    async fn finish_sync(
        &mut self,
        timing: SyncTiming,
        oldest: Option<SystemTime>,
        was_full: bool,
        changes_applied: usize,
        ops: usize,
    ) {
        let SyncTiming {
            started,
            planned,
            own,
        } = timing;
        let now = SystemTime::now();
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
        self.metrics
            .plan_element_changes
            .inc_by(changes_applied as u64);
        self.metrics
            .observe_sync(&own.per_family(started.elapsed()), was_full, now);
        if let Some(t) = oldest {
            // One sync programs both families' tables (or the eBPF maps, which serve both).
            let latency = now.duration_since(t).unwrap_or_default();
            for family in FAMILIES {
                self.metrics.observe_network_programming(family, latency);
            }
        }
        self.health.updated(now);
        self.pending_sockets.clear();
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
            ops,
            element_changes = changes_applied,
            plan_us = planned.as_micros() as u64,
            apply_us = (started.elapsed() - planned).as_micros() as u64,
            took_us = started.elapsed().as_micros() as u64,
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
                let store = &self.store;
                self.pending_sockets.extend(gone_tcp_filters(delta, |a| {
                    store.endpoint_listed(&delta.name, a)
                }));
                self.tally.apply(delta);
            }
            deltas.extend(d);
        }
        deltas
    }

    /// One sync in eBPF mode: update the desired state (only the changed Services unless
    /// `full`), render the maps' contents, write the difference. A full sync, and any sync
    /// after a failure, re-reads the maps first.
    async fn sync_ebpf(
        &mut self,
        ebpf: &mut EbpfSync,
        full: bool,
        changes: Changes,
        started: Instant,
        oldest: Option<SystemTime>,
    ) -> bool {
        let mut was_full = full || ebpf.current.is_none() || changes.nodes;
        let mut incremental = None;
        if !was_full {
            let deltas = self.recompute_changed(&changes.services);
            was_full = self.desired.needs_full_compute();
            if !was_full {
                incremental = Some(deltas);
            }
        }
        if was_full {
            self.refresh_local_addrs().await;
            let (flows, sockets, store) = (
                &mut self.pending_flows,
                &mut self.pending_sockets,
                &self.store,
            );
            let mut on_delta = |d: ServiceDelta| {
                flows.extend(flow_filters(&d));
                sockets.extend(gone_tcp_filters(&d, |a| store.endpoint_listed(&d.name, a)));
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
        }
        self.metrics
            .invalid_objects
            .set(self.store.invalid_objects() as i64);
        let node_ips = self.desired.node_ips.clone();
        if let Err(e) = with_maps(&ebpf.maps, move |m| m.attach_interfaces(&node_ips)).await {
            warn!(error = %e, "attaching the tc programs failed; retrying");
            self.metrics.ebpf_sync_failures.inc();
            return false;
        }
        // Whether the set of ClusterIPs may differ from the last sync's.
        let ips_changed = incremental.as_ref().is_none_or(|deltas| {
            deltas.iter().any(|d| {
                let ips = |sp: &Option<ServicePortState>| {
                    sp.as_ref().map(|sp| sp.info.cluster_ips.clone())
                };
                ips(&d.old) != ips(&d.new)
            })
        });
        // Incremental: re-render only the changed ports and update what the maps hold as
        // of the last sync. Full: render everything and diff against a fresh read.
        let (plan, desired) = match (ebpf.current.take(), incremental) {
            (Some(mut current), Some(deltas)) => {
                let plan = ebpf_update_ports(
                    &mut current,
                    &deltas,
                    &self.desired.node_ips,
                    ebpf.algorithm,
                );
                (plan, current)
            }
            _ => {
                let desired = ebpf_render(&self.desired, ebpf.algorithm);
                match with_maps(&ebpf.maps, |m| m.dump()).await {
                    Ok(current) => (ebpf_diff(&current, &desired), desired),
                    Err(e) => {
                        warn!(error = %e, "reading the eBPF maps failed; retrying");
                        self.metrics.ebpf_sync_failures.inc();
                        return false;
                    }
                }
            }
        };
        let writes = plan.ops.len();
        let planned = started.elapsed();
        if !plan.is_empty() {
            if let Err(e) = with_maps(&ebpf.maps, move |m| m.apply(&plan)).await {
                warn!(error = %e, "writing the eBPF maps failed; the next sync re-reads them");
                self.metrics.ebpf_sync_failures.inc();
                return false;
            }
        }
        self.metrics.ebpf_map_entries.set(desired.len() as i64);
        ebpf.current = Some(desired);
        // Every ClusterIP, so a port no Service has on one is refused at connect.
        if was_full {
            ebpf.cluster_ips = None;
        }
        if ips_changed || ebpf.cluster_ips.is_none() {
            let cluster_ips: BTreeSet<std::net::IpAddr> = self
                .desired
                .services
                .values()
                .flat_map(|sp| sp.info.cluster_ips.iter().copied())
                .collect();
            if ebpf.cluster_ips.as_ref() != Some(&cluster_ips) {
                let current = ebpf.cluster_ips.take();
                let desired = cluster_ips.clone();
                match with_maps(&ebpf.maps, move |m| {
                    m.write_cluster_ips(current.as_ref(), &desired)
                })
                .await
                {
                    Ok(()) => ebpf.cluster_ips = Some(cluster_ips),
                    Err(e) => {
                        warn!(error = %e, "writing the ClusterIPs map failed; retrying");
                        self.metrics.ebpf_sync_failures.inc();
                        return false;
                    }
                }
            }
        }
        // Sockets the hooks translated once, at connect, to a backend now removed, and the
        // tc path's flows tracked to one: moved off it now that the maps send new
        // connections elsewhere.
        let mut stale = self.pending_flows.clone();
        stale.extend(self.pending_sockets.iter().cloned());
        if !stale.is_empty() {
            match with_maps(&ebpf.maps, move |m| m.leave_stale_backends(&stale)).await {
                Ok(d) if d.sockets + d.flows > 0 => info!(
                    sockets = d.sockets,
                    namespaces = d.namespaces,
                    flows = d.flows,
                    "moved connections off removed backends"
                ),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "moving connections off removed backends failed"),
            }
        }
        // The maps serve both families: no family has work of its own.
        let timing = SyncTiming {
            started,
            planned,
            own: FamilyTimes::default(),
        };
        self.finish_sync(timing, oldest, was_full, writes, writes)
            .await;
        true
    }

    /// Programs a table that did not exist: first its skeleton, then the Service ports a
    /// batch at a time through incremental plans, so neither side holds every element at
    /// once (nothing was there before, so the steps in between break nothing).
    async fn fill_new_table(&self, family: Family) -> Result<(Incremental, usize), KernelError> {
        let empty = DesiredState {
            node_ips: self.desired.node_ips.clone(),
            ..DesiredState::default()
        };
        let (skeleton, mut objects) =
            plan_state(&empty, &self.cfg.render, family, DumpedTable::empty(family));
        self.apply(skeleton).await?;
        let mut inc = Incremental::new(&empty, &self.cfg.render, family);
        // Only ports with a ClusterIP of this family contribute to its table.
        let ports: Vec<&ServicePortState> = self
            .desired
            .services
            .values()
            .filter(|sp| sp.info.cluster_ips.iter().any(|ip| family.contains(ip)))
            .collect();
        for batch in ports.chunks(FRESH_BATCH) {
            let deltas: Vec<ServiceDelta> = batch
                .iter()
                .map(|sp| ServiceDelta {
                    name: sp.info.name.clone(),
                    old: None,
                    new: Some((*sp).clone()),
                })
                .collect();
            let p = inc.update(&deltas, &self.desired.node_ips);
            objects = objects.saturating_add_signed(p.element_delta() as isize);
            self.apply(p).await?;
        }
        let objects = objects + inc.structure_objects();
        Ok((inc, objects))
    }

    /// eBPF mode and without Services: removes the nftables mode's `weir` tables while any
    /// may be left (the daemon's start removes them; this retries a removal that failed),
    /// counting failures
    /// in `kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total`.
    async fn remove_leftover_tables(&mut self) {
        if !self.leftover_tables {
            return;
        }
        let mut left = false;
        for family in FAMILIES {
            let removed = match self.read_kernel(family).await {
                Ok(None) => continue,
                Ok(Some(t)) => self.apply(cleanup_plan(Some(&t), family)).await,
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => info!(%family, "removed the nftables mode's service table"),
                Err(e) => {
                    warn!(error = %e, %family, "removing the nftables mode's service table failed; retrying next sync");
                    self.metrics.nftables_cleanup_failed(family);
                    left = true;
                }
            }
        }
        self.leftover_tables = left;
    }

    async fn read_kernel(&self, family: Family) -> Result<Option<DumpedTable>, KernelError> {
        let kernel = self.kernel.clone();
        tokio::task::spawn_blocking(move || kernel.dump(family))
            .await
            .unwrap_or_else(|e| Err(join_error(e)))
    }

    async fn apply(&self, p: Plan) -> Result<(), KernelError> {
        let kernel = self.kernel.clone();
        tokio::task::spawn_blocking(move || kernel.apply(&p))
            .await
            .unwrap_or_else(|e| Err(join_error(e)))
    }
}

/// Runs `f` on the eBPF maps on a blocking thread.
async fn with_maps<T: Send + 'static>(
    maps: &Arc<Mutex<Box<dyn MapStore>>>,
    f: impl FnOnce(&mut dyn MapStore) -> Result<T, EbpfError> + Send + 'static,
) -> Result<T, EbpfError> {
    let maps = maps.clone();
    tokio::task::spawn_blocking(move || {
        let mut m = maps.lock().unwrap_or_else(|e| e.into_inner());
        f(m.as_mut())
    })
    .await
    .unwrap_or_else(|e| {
        Err(EbpfError::Map {
            op: "sync",
            map: "all",
            key: String::new(),
            message: format!("worker task failed: {e}"),
        })
    })
}

fn join_error(e: tokio::task::JoinError) -> KernelError {
    KernelError::List {
        family: Family::Ip,
        table: crate::dataplane::nft::table::TABLE_NAME.to_owned(),
        message: format!("worker task failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nft::fake::SharedFake;
    use crate::source::Object;

    fn cfg(min_sync: u64) -> RunnerConfig {
        RunnerConfig {
            model: ModelConfig {
                node_name: "node1".into(),
                ..ModelConfig::default()
            },
            render: RenderConfig::default(),
            min_sync_period: Duration::from_millis(min_sync),
            sync_period: Duration::from_secs(3600),
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
            fake.clone(),
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
            nft.clone(),
            Arc::new(Metrics::new()),
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        )
        .with_ebpf(maps.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(runner.run(rx));
        tx.try_send(SourceUpdate::Replace(svc(
            "a",
            "10.96.0.1",
            &["10.244.1.1"],
        )))
        .unwrap();
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
            fake.clone(),
            Arc::new(Metrics::new()),
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        )
        .with_effects(SideEffects::new(None, None).with_cni_cidrs_file(file.clone()))
        .without_services();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(runner.run(rx));
        let node = "{apiVersion: v1, kind: Node, metadata: {name: node1}, spec: {podCIDRs: [10.244.1.0/24]}}";
        let mut objects = svc("a", "10.96.0.1", &["10.244.1.1"]);
        objects.push(Object::Node(serde_yaml_ng::from_str(node).unwrap()));
        tx.try_send(SourceUpdate::Replace(objects)).unwrap();
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
            nft.clone(),
            metrics.clone(),
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        )
        .with_ebpf(FakeMaps::default());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(runner.run(rx));
        nft.fail_next_apply();
        tx.try_send(SourceUpdate::Replace(svc(
            "a",
            "10.96.0.1",
            &["10.244.1.1"],
        )))
        .unwrap();
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
        tx.try_send(SourceUpdate::Replace(svc(
            "a",
            "10.96.0.1",
            &["10.244.1.1"],
        )))
        .unwrap();
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
        tx.try_send(SourceUpdate::RelistStart).unwrap();
        for o in svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]) {
            tx.try_send(SourceUpdate::RelistItem(o)).unwrap();
        }
        tx.try_send(SourceUpdate::RelistDone).unwrap();
        settle().await;
        assert!(fake.applies() > 0);
        assert_eq!(backends(&fake), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_the_min_sync_period_are_applied_in_one_sync() {
        let (fake, tx) = start(1500);
        tx.try_send(SourceUpdate::Replace(svc(
            "a",
            "10.96.0.1",
            &["10.244.1.1"],
        )))
        .unwrap();
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
    async fn a_failed_apply_is_retried_as_a_full_sync_and_nothing_is_lost() {
        let (fake, tx) = start(10);
        tx.try_send(SourceUpdate::Replace(svc(
            "a",
            "10.96.0.1",
            &["10.244.1.1"],
        )))
        .unwrap();
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
        tx.try_send(SourceUpdate::Replace(objects)).unwrap();
        settle().await;
        assert_eq!(backends(&fake), 1, "a owns 10.96.0.1:80; b is left out");
        tx.try_send(SourceUpdate::Delete(crate::source::ObjectRef {
            kind: crate::source::Kind::Service,
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
        tx.try_send(SourceUpdate::Replace(objects)).unwrap();
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
        use crate::source::Kind;
        let (fake, tx) = start(10);
        let objects = svc("a", "10.96.0.1", &["10.244.1.1"]);
        tx.try_send(SourceUpdate::KindRelistStart(Kind::Service))
            .unwrap();
        tx.try_send(SourceUpdate::RelistItem(objects[0].clone()))
            .unwrap();
        tx.try_send(SourceUpdate::KindRelistDone(Kind::Service))
            .unwrap();
        tx.try_send(SourceUpdate::KindRelistStart(Kind::EndpointSlice))
            .unwrap();
        tx.try_send(SourceUpdate::RelistItem(objects[1].clone()))
            .unwrap();
        tx.try_send(SourceUpdate::KindRelistDone(Kind::EndpointSlice))
            .unwrap();
        settle().await;
        assert_eq!(fake.applies(), 0, "Nodes have not listed yet");
        tx.try_send(SourceUpdate::KindRelistStart(Kind::Node))
            .unwrap();
        tx.try_send(SourceUpdate::KindRelistDone(Kind::Node))
            .unwrap();
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
        tx.try_send(SourceUpdate::Replace(objects)).unwrap();
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
        tx.try_send(SourceUpdate::Delete(crate::source::ObjectRef {
            kind: crate::source::Kind::Service,
            key: ObjectKey::new("d", "b"),
        }))
        .unwrap();
        settle().await;
        // The same objects computed from scratch.
        let mut store = Store::default();
        let mut all = now;
        all.extend(svc("b", "10.96.0.2", &["10.244.1.3"]).into_iter().skip(1));
        all.extend(svc("c", "10.96.0.3", &[]));
        store.record(SourceUpdate::Replace(all), SystemTime::now());
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
