//! The nftables mode's [`Dataplane`]: one `weir` table per family, kept in step with the
//! desired state by incremental plans, re-read and diffed on full syncs.

use super::diff::{cleanup_plan, plan_state};
use super::incremental::Incremental;
use super::kernel::KernelError;
use super::render::RenderConfig;
use super::{DumpedTable, Family, NftBackend, Plan, FAMILIES};
use crate::dataplane::{Changed, Dataplane, DataplaneError, FamilyTimes, ObjectCount, SyncReport};
use crate::model::{DesiredState, ServiceDelta, ServicePortState};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tracing::info;

/// Service ports per transaction when filling a table that did not exist.
const FRESH_BATCH: usize = 500;

/// The nftables backend's state between syncs.
pub struct NftDataplane<K: NftBackend> {
    kernel: K,
    render: RenderConfig,
    /// Incremental render state matching what the kernel holds, one per family; `None`
    /// until a full sync succeeded (and after any failure).
    incremental: Option<Vec<Incremental>>,
}

impl<K: NftBackend> NftDataplane<K> {
    /// Programs `kernel`'s `weir` tables, rendered with `render`.
    pub fn new(kernel: K, render: RenderConfig) -> Self {
        NftDataplane {
            kernel,
            render,
            incremental: None,
        }
    }

    /// Plans the changes of `deltas` on every family's table.
    fn plan_ports(
        &self,
        incs: &mut [Incremental],
        deltas: &[ServiceDelta],
        node_ips: &[std::net::IpAddr],
        own: &mut FamilyTimes,
    ) -> Vec<Plan> {
        incs.iter_mut()
            .map(|inc| {
                let t = Instant::now();
                let p = inc.update(deltas, node_ips);
                own.add(p.family, t.elapsed());
                p
            })
            .collect()
    }

    /// Reads both tables and plans the difference to `desired`; a table that does not
    /// exist is filled at once (applied here). Returns the plans left to apply, the new
    /// incremental state and the objects the tables will hold.
    async fn plan_full(
        &self,
        desired: &DesiredState,
        own: &mut FamilyTimes,
        applied: &mut Duration,
    ) -> Result<(Vec<Plan>, Vec<Incremental>, usize), DataplaneError> {
        let mut plans = Vec::new();
        let mut incs = Vec::new();
        let mut objects = 0;
        for family in FAMILIES {
            let t = Instant::now();
            let realized = read(&self.kernel, family).await;
            own.add(family, t.elapsed());
            let realized = realized.map_err(|source| DataplaneError::Nft {
                family,
                step: "reading",
                source,
            })?;
            match realized {
                Some(realized) => {
                    let render = &self.render;
                    let (p, n) = own.time(family, || plan_state(desired, render, family, realized));
                    objects += n;
                    plans.push(p);
                    incs.push(own.time(family, || Incremental::new(desired, render, family)));
                }
                None => {
                    let t = Instant::now();
                    let filled = self.fill_new_table(desired, family).await;
                    own.add(family, t.elapsed());
                    *applied += t.elapsed();
                    let (inc, n) = filled.map_err(|source| DataplaneError::Nft {
                        family,
                        step: "filling",
                        source,
                    })?;
                    objects += n;
                    incs.push(inc);
                }
            }
        }
        Ok((plans, incs, objects))
    }

    /// Programs a table that did not exist: first its skeleton, then the Service ports a
    /// batch at a time through incremental plans, so neither side holds every element at
    /// once (nothing was there before, so the steps in between break nothing).
    async fn fill_new_table(
        &self,
        desired: &DesiredState,
        family: Family,
    ) -> Result<(Incremental, usize), KernelError> {
        let empty = DesiredState {
            node_ips: desired.node_ips.clone(),
            ..DesiredState::default()
        };
        let (skeleton, mut objects) =
            plan_state(&empty, &self.render, family, DumpedTable::empty(family));
        let mut plain: HashSet<String> = skeleton.plain_maps().map(str::to_owned).collect();
        apply(&self.kernel, skeleton).await?;
        let mut inc = Incremental::new(&empty, &self.render, family);
        // Only ports with a ClusterIP of this family contribute to its table.
        let ports: Vec<&ServicePortState> = desired
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
            let p = inc.update(&deltas, &desired.node_ips);
            objects = objects.saturating_add_signed(p.element_delta() as isize);
            plain.extend(p.plain_maps().map(str::to_owned));
            // The elements of plain maps skip nft's parse; the rest (new chains, maps,
            // interval sets) goes first, as they may name it.
            let (rest, elements) = p.split_elements(|m| plain.contains(m));
            apply(&self.kernel, rest).await?;
            add_elements(&self.kernel, elements).await?;
        }
        let objects = objects + inc.structure_objects();
        Ok((inc, objects))
    }
}

impl<K: NftBackend> Dataplane for NftDataplane<K> {
    fn tracks_kernel(&self) -> bool {
        self.incremental.is_some()
    }

    async fn sync(
        &mut self,
        desired: &DesiredState,
        changed: Changed<'_>,
    ) -> Result<SyncReport, DataplaneError> {
        let mut own = FamilyTimes::default();
        let mut applied = Duration::ZERO;
        let (plans, next, objects) = match (changed.ports(), self.incremental.take()) {
            (Some(deltas), Some(mut incs)) => {
                let plans = self.plan_ports(&mut incs, deltas, &desired.node_ips, &mut own);
                let delta = plans.iter().map(Plan::element_delta).sum();
                (plans, incs, ObjectCount::NftDelta(delta))
            }
            _ => {
                let (plans, incs, n) = self.plan_full(desired, &mut own, &mut applied).await?;
                (plans, incs, ObjectCount::Nft(n))
            }
        };
        let mut report = SyncReport {
            element_changes: plans.iter().map(Plan::element_changes).sum(),
            ops: plans.iter().map(|p| p.ops.len()).sum(),
            objects,
            ..SyncReport::default()
        };
        for p in plans.into_iter().filter(|p| !p.ops.is_empty()) {
            let family = p.family;
            let t = Instant::now();
            let done = apply(&self.kernel, p).await;
            own.add(family, t.elapsed());
            applied += t.elapsed();
            done.map_err(|source| DataplaneError::Nft {
                family,
                step: "applying the plan to",
                source,
            })?;
        }
        self.incremental = Some(next);
        report.own = own;
        report.applied = applied;
        Ok(report)
    }
}

/// The nftables mode's `weir` tables, as another mode (eBPF, or none) finds them: removed
/// while any may be left (the daemon's start removes them; this retries a removal that
/// failed).
pub struct LeftoverTables<K: NftBackend> {
    kernel: K,
    /// Whether a table may still be there.
    left: bool,
}

impl<K: NftBackend> LeftoverTables<K> {
    /// Tables of `kernel` to be removed at the first sync.
    pub fn new(kernel: K) -> Self {
        LeftoverTables { kernel, left: true }
    }

    /// Removes them, once they are all gone never again; returns the removals that failed.
    pub async fn remove(&mut self) -> Vec<DataplaneError> {
        if !self.left {
            return Vec::new();
        }
        let kernel = self.kernel.clone();
        let failed = tokio::task::spawn_blocking(move || remove_tables(&kernel))
            .await
            .unwrap_or_else(|e| {
                FAMILIES
                    .map(|family| DataplaneError::Nft {
                        family,
                        step: "removing",
                        source: join_error(family, e.to_string()),
                    })
                    .into()
            });
        self.left = !failed.is_empty();
        failed
    }
}

/// Removes `kernel`'s table (weir's service table, or the table it is for) in both
/// families, where it exists; returns the removals that failed. Blocking.
pub fn remove_tables<K: NftBackend>(kernel: &K) -> Vec<DataplaneError> {
    let mut failed = Vec::new();
    for family in FAMILIES {
        let removed = match kernel.dump(family) {
            Ok(None) => continue,
            Ok(Some(t)) => kernel.apply(&cleanup_plan(Some(&t), family)),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => info!(%family, "removed weir's nftables table"),
            Err(source) => failed.push(DataplaneError::Nft {
                family,
                step: "removing",
                source,
            }),
        }
    }
    failed
}

/// Lists `family`'s table on a blocking thread.
async fn read<K: NftBackend>(
    kernel: &K,
    family: Family,
) -> Result<Option<DumpedTable>, KernelError> {
    let kernel = kernel.clone();
    tokio::task::spawn_blocking(move || kernel.dump(family))
        .await
        .unwrap_or_else(|e| Err(join_error(family, e.to_string())))
}

/// Adds `p`'s elements on a blocking thread.
async fn add_elements<K: NftBackend>(kernel: &K, p: Plan) -> Result<(), KernelError> {
    if p.is_empty() {
        return Ok(());
    }
    let kernel = kernel.clone();
    let family = p.family;
    tokio::task::spawn_blocking(move || kernel.add_elements(&p))
        .await
        .unwrap_or_else(|e| Err(join_error(family, e.to_string())))
}

/// Applies `p` on a blocking thread.
async fn apply<K: NftBackend>(kernel: &K, p: Plan) -> Result<(), KernelError> {
    let kernel = kernel.clone();
    let family = p.family;
    tokio::task::spawn_blocking(move || kernel.apply(&p))
        .await
        .unwrap_or_else(|e| Err(join_error(family, e.to_string())))
}

fn join_error(family: Family, e: String) -> KernelError {
    KernelError::List {
        family,
        table: super::table::TABLE_NAME.to_owned(),
        message: format!("worker task failed: {e}"),
    }
}
