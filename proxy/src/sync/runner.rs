//! One loop owns the change trackers and the backend. Source updates only record changes;
//! syncs run at most once per `min_sync_period`, a full resync (re-reading the kernel's
//! state, so drift is repaired) every `sync_period` and after any failure. No kernel write
//! happens before the source has delivered its first complete view.

use crate::dataplane::nft::kernel::{KernelError, KernelNft};
use crate::dataplane::nft::render::{desired_table, plan, RenderConfig};
use crate::dataplane::nft::{DumpedTable, Family};
use crate::http::health::ProxyHealth;
use crate::http::metrics::Metrics;
use crate::model::{compute, ChangeTracker, ModelConfig, Snapshot};
use crate::source::{Kind, Object, SourceUpdate};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, instrument, warn};

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

/// The trackers for every kind weir reads.
#[derive(Default)]
pub struct Trackers {
    services: ChangeTracker<Service>,
    slices: ChangeTracker<EndpointSlice>,
    nodes: ChangeTracker<Node>,
}

impl Trackers {
    /// Records one source update; returns how many objects changed.
    pub fn record(&mut self, update: SourceUpdate, now: SystemTime) -> usize {
        match update {
            SourceUpdate::Replace(objects) => {
                let mut services = BTreeMap::new();
                let mut slices = BTreeMap::new();
                let mut nodes = BTreeMap::new();
                for o in objects {
                    let key = o.key();
                    match o {
                        Object::Service(s) => {
                            services.insert(key, s);
                        }
                        Object::EndpointSlice(s) => {
                            slices.insert(key, s);
                        }
                        Object::Node(n) => {
                            nodes.insert(key, n);
                        }
                    }
                }
                self.services.replace_all(services, now)
                    + self.slices.replace_all(slices, now)
                    + self.nodes.replace_all(nodes, now)
            }
            SourceUpdate::Upsert(o) => {
                let key = o.key();
                usize::from(match o {
                    Object::Service(s) => self.services.upsert(key, s, now),
                    Object::EndpointSlice(s) => self.slices.upsert(key, s, now),
                    Object::Node(n) => self.nodes.upsert(key, n, now),
                })
            }
            SourceUpdate::Delete(r) => usize::from(match r.kind {
                Kind::Service => self.services.delete(&r.key, now),
                Kind::EndpointSlice => self.slices.delete(&r.key, now),
                Kind::Node => self.nodes.delete(&r.key, now),
            }),
        }
    }

    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            services: self.services.objects(),
            slices: self.slices.objects(),
            nodes: self.nodes.objects(),
        }
    }

    fn oldest_pending(&self) -> Option<SystemTime> {
        [
            self.services.oldest_pending(),
            self.slices.oldest_pending(),
            self.nodes.oldest_pending(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The sync loop's state.
pub struct Runner {
    cfg: RunnerConfig,
    trackers: Trackers,
    kernel: KernelNft,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    /// What the kernel holds after the last successful apply; `None` forces a re-read.
    realized: Option<DumpedTable>,
}

impl Runner {
    /// A runner programming `kernel`.
    pub fn new(
        cfg: RunnerConfig,
        kernel: KernelNft,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
    ) -> Self {
        Runner {
            cfg,
            trackers: Trackers::default(),
            kernel,
            metrics,
            health,
            realized: None,
        }
    }

    /// Runs until the source channel closes.
    pub async fn run(mut self, mut updates: UnboundedReceiver<SourceUpdate>) {
        let mut synced_once = false;
        let mut dirty = false;
        let mut last_sync = Instant::now() - self.cfg.min_sync_period;
        let mut last_full = Instant::now();
        loop {
            let next_allowed = last_sync + self.cfg.min_sync_period;
            let next_full = last_full + self.cfg.sync_period;
            let wake = if dirty && synced_once {
                next_allowed
                    .max(Instant::now())
                    .min(next_full.max(next_allowed))
            } else {
                next_full
            };
            tokio::select! {
                u = updates.recv() => {
                    let Some(u) = u else { return };
                    let now = SystemTime::now();
                    if matches!(u, SourceUpdate::Replace(_)) {
                        synced_once = true;
                    }
                    let before_svc = self.trackers.services.total_changes();
                    let before_eps = self.trackers.slices.total_changes();
                    if self.trackers.record(u, now) > 0 {
                        dirty = true;
                        self.health.queued_update(now);
                        self.metrics.observe_queued(now);
                    }
                    self.metrics.service_changes_total.inc_by(self.trackers.services.total_changes() - before_svc);
                    self.metrics.endpoint_changes_total.inc_by(self.trackers.slices.total_changes() - before_eps);
                    self.metrics.service_changes_pending.set(self.trackers.services.pending().len() as i64);
                    self.metrics.endpoint_changes_pending.set(self.trackers.slices.pending().len() as i64);
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if !synced_once {
                        last_full = Instant::now();
                        continue;
                    }
                    let full = Instant::now() >= next_full || self.realized.is_none();
                    if full {
                        last_full = Instant::now();
                    }
                    last_sync = Instant::now();
                    dirty = !self.sync(full).await;
                }
            }
        }
    }

    /// One sync; returns whether it succeeded.
    #[instrument(skip_all, fields(full))]
    async fn sync(&mut self, full: bool) -> bool {
        let started = Instant::now();
        let oldest = self.trackers.oldest_pending();
        let (state, errors) = compute(self.trackers.snapshot(), &self.cfg.model);
        for e in &errors {
            warn!(error = %e, "skipping invalid object");
        }
        self.metrics.invalid_objects.set(errors.len() as i64);
        let desired = desired_table(&state, &self.cfg.render, Family::Ip);
        let kernel = self.kernel.clone();
        let realized = match self.realized.take().filter(|_| !full) {
            Some(r) => Ok(r),
            None => tokio::task::spawn_blocking(move || kernel.dump(Family::Ip))
                .await
                .unwrap_or_else(|e| Err(join_error(e)))
                .map(|t| t.unwrap_or_else(|| DumpedTable::empty(Family::Ip))),
        };
        let realized = match realized {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "reading the kernel's nftables state failed; retrying");
                self.metrics.nftables_sync_failures.inc();
                return false;
            }
        };
        let p = plan(&desired, &realized);
        let changes = p.element_changes();
        let kernel = self.kernel.clone();
        let ops = p.ops.len();
        let applied = tokio::task::spawn_blocking(move || kernel.apply(&p))
            .await
            .unwrap_or_else(|e| Err(join_error(e)));
        if let Err(e) = applied {
            warn!(error = %e, "applying the nftables plan failed; the next sync re-reads the kernel");
            self.metrics.nftables_sync_failures.inc();
            return false;
        }
        let now = SystemTime::now();
        let dumped = desired.to_dump();
        self.metrics
            .nftables_objects
            .set(dumped.object_count() as i64);
        self.realized = Some(dumped);
        self.trackers.services.take_pending();
        self.trackers.slices.take_pending();
        self.trackers.nodes.take_pending();
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
        self.metrics.plan_element_changes.inc_by(changes as u64);
        self.metrics.observe_sync(started.elapsed(), full, now);
        if let Some(t) = oldest {
            let latency = now.duration_since(t).unwrap_or_default();
            self.metrics
                .network_programming_duration
                .observe(latency.as_secs_f64());
        }
        self.health.updated(now);
        info!(
            services = state.services.len(),
            ops,
            element_changes = changes,
            took_ms = started.elapsed().as_millis() as u64,
            "synced"
        );
        true
    }
}

fn join_error(e: tokio::task::JoinError) -> KernelError {
    KernelError::List {
        family: Family::Ip,
        message: format!("worker task failed: {e}"),
    }
}
