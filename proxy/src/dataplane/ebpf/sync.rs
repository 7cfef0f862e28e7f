//! The eBPF mode's [`Dataplane`]: the services, backends and ClusterIPs maps kept in step
//! with the desired state, connections moved off removed backends, and the nftables
//! mode's leftover tables removed.

use super::render::{diff, render_with, update_ports, LbAlgorithm};
use super::stale::gone_tcp_filters;
use super::{EbpfError, MapContents, MapStore};
use crate::dataplane::conntrack::FlowFilter;
use crate::dataplane::flows::flow_filters;
use crate::dataplane::nft::sync::LeftoverTables;
use crate::dataplane::nft::NftBackend;
use crate::dataplane::{Changed, Dataplane, DataplaneError, ObjectCount, SyncReport};
use crate::model::{DesiredState, ServiceDelta, ServicePortState, Store};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The eBPF backend's state between syncs.
pub struct EbpfDataplane<K: NftBackend> {
    maps: Arc<Mutex<Box<dyn MapStore>>>,
    /// What the maps hold as of the last successful sync; `None` forces a full sync that
    /// re-reads them.
    current: Option<MapContents>,
    /// `--ebpf-lb-algorithm`.
    algorithm: LbAlgorithm,
    /// What the ClusterIPs map holds as of the last successful sync; `None`: read it.
    cluster_ips: Option<BTreeSet<IpAddr>>,
    /// Connections of changes not yet followed by a successful sync that go off their
    /// backends ([`super::stale`]): UDP flows, and TCP endpoints that left their
    /// EndpointSlices, whose translated sockets go.
    stale: Vec<FlowFilter>,
    /// The nftables mode's `weir` tables.
    leftovers: LeftoverTables<K>,
}

impl<K: NftBackend> EbpfDataplane<K> {
    /// Programs `maps`, picking backends of new flows with `algorithm`; `nft` is used only
    /// to remove the nftables mode's tables. The first sync reads the maps (adopting what
    /// a previous run left pinned) and writes only the difference.
    pub fn new(maps: impl MapStore, algorithm: LbAlgorithm, nft: K) -> Self {
        EbpfDataplane {
            maps: Arc::new(Mutex::new(Box::new(maps))),
            current: None,
            algorithm,
            cluster_ips: None,
            stale: Vec::new(),
            leftovers: LeftoverTables::new(nft),
        }
    }

    /// Runs `f` on the maps on a blocking thread, naming `step` in its error.
    async fn with_maps<T: Send + 'static>(
        &self,
        step: &'static str,
        f: impl FnOnce(&mut dyn MapStore) -> Result<T, EbpfError> + Send + 'static,
    ) -> Result<T, DataplaneError> {
        let maps = self.maps.clone();
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
        .map_err(|source| DataplaneError::Ebpf { step, source })
    }

    /// Makes the ClusterIPs map hold every ClusterIP (so a port no Service has on one is
    /// refused at connect), when they may have changed or it was never written.
    async fn sync_cluster_ips(
        &mut self,
        desired: &DesiredState,
        ips_changed: bool,
    ) -> Result<(), DataplaneError> {
        if !ips_changed && self.cluster_ips.is_some() {
            return Ok(());
        }
        let cluster_ips: BTreeSet<IpAddr> = desired
            .services
            .values()
            .flat_map(|sp| sp.info.cluster_ips.iter().copied())
            .collect();
        if self.cluster_ips.as_ref() == Some(&cluster_ips) {
            return Ok(());
        }
        let current = self.cluster_ips.take();
        let want = cluster_ips.clone();
        self.with_maps("writing the ClusterIPs map", move |m| {
            m.write_cluster_ips(current.as_ref(), &want)
        })
        .await?;
        self.cluster_ips = Some(cluster_ips);
        Ok(())
    }

    /// Moves the sockets the hooks translated once, at connect, to a removed backend, and
    /// the tc path's flows tracked to one, off it (the maps now send new connections
    /// elsewhere). A failure is logged: the maps are right either way.
    async fn leave_stale_backends(&mut self) {
        let stale = std::mem::take(&mut self.stale);
        if stale.is_empty() {
            return;
        }
        let moved = self
            .with_maps("moving connections", move |m| {
                m.leave_stale_backends(&stale)
            })
            .await;
        match moved {
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

    async fn sync_maps(
        &mut self,
        desired: &DesiredState,
        changed: Changed<'_>,
    ) -> Result<SyncReport, DataplaneError> {
        let node_ips = desired.node_ips.clone();
        self.with_maps("attaching the tc programs", move |m| {
            m.attach_interfaces(&node_ips)
        })
        .await?;
        let deltas = changed.ports();
        // Whether the set of ClusterIPs may differ from the last sync's.
        let ips_changed = deltas.is_none_or(|deltas| deltas.iter().any(cluster_ips_changed));
        // Incremental: re-render only the changed ports and update what the maps hold as
        // of the last sync. Full: render everything and diff against a fresh read.
        let (plan, contents) = match (self.current.take(), deltas) {
            (Some(mut current), Some(deltas)) => {
                let plan = update_ports(&mut current, deltas, &desired.node_ips, self.algorithm);
                (plan, current)
            }
            _ => {
                self.cluster_ips = None;
                let want = render_with(desired, self.algorithm);
                let have = self.with_maps("reading the maps", |m| m.dump()).await?;
                (diff(&have, &want), want)
            }
        };
        let writes = plan.ops.len();
        let mut applied = Duration::ZERO;
        if !plan.is_empty() {
            let t = Instant::now();
            self.with_maps("writing the maps", move |m| m.apply(&plan))
                .await?;
            applied = t.elapsed();
        }
        let entries = contents.len();
        self.current = Some(contents);
        self.sync_cluster_ips(desired, ips_changed).await?;
        self.leave_stale_backends().await;
        // The maps serve both families: no family has work of its own.
        Ok(SyncReport {
            element_changes: writes,
            ops: writes,
            applied,
            objects: ObjectCount::EbpfEntries(entries),
            ..SyncReport::default()
        })
    }
}

/// Whether a changed Service port's ClusterIPs differ between its two versions.
fn cluster_ips_changed(d: &ServiceDelta) -> bool {
    let ips = |sp: &Option<ServicePortState>| sp.as_ref().map(|sp| sp.info.cluster_ips.clone());
    ips(&d.old) != ips(&d.new)
}

impl<K: NftBackend> Dataplane for EbpfDataplane<K> {
    fn tracks_kernel(&self) -> bool {
        self.current.is_some()
    }

    fn note_change(&mut self, delta: &ServiceDelta, store: &Store) {
        self.stale.extend(flow_filters(delta));
        self.stale.extend(gone_tcp_filters(delta, |a| {
            store.endpoint_listed(&delta.name, a)
        }));
    }

    async fn remove_leftovers(&mut self) -> Vec<DataplaneError> {
        self.leftovers.remove().await
    }

    async fn sync(
        &mut self,
        desired: &DesiredState,
        changed: Changed<'_>,
    ) -> Result<SyncReport, DataplaneError> {
        let r = self.sync_maps(desired, changed).await;
        if r.is_err() {
            self.current = None;
        }
        r
    }
}
