//! Dataplane backends: each renders a [`crate::model::DesiredState`] into a plan (pure)
//! and applies plans to the kernel (side effects); [`conntrack`] deletes stale flows.
//!
//! The three proxy modes meet the sync runner at one seam, the [`Dataplane`] trait:
//! [`nft::sync::NftDataplane`], [`ebpf::sync::EbpfDataplane`] and
//! [`ipvs::sync::IpvsDataplane`] each own what they know of the kernel, adopt what a
//! previous run left programmed (their first sync is a full one that reads the kernel and
//! writes only the difference) and say whether they can take an incremental sync. The
//! runner decides full or incremental in one place from that and from the model;
//! [`none::NoServices`] stands in when Services are left to another proxy.

pub mod conntrack;
pub mod ebpf;
pub mod flows;
pub mod ipvs;
pub mod netlink;
pub mod nft;
pub mod none;

use crate::model::{DesiredState, ServiceDelta, Store};
use nft::Family;
use std::future::Future;
use std::time::{Duration, Instant};

/// What changed in the desired state since the backend's last successful sync.
#[derive(Clone, Copy, Debug)]
pub enum Changed<'a> {
    /// No Service port.
    Nothing,
    /// These Service ports (the node's addresses did not change).
    Ports(&'a [ServiceDelta]),
    /// Anything may have (a full compute of the desired state): the backend reads the
    /// kernel back and writes the difference, which repairs drift.
    Everything,
}

impl<'a> Changed<'a> {
    /// The changed Service ports of an incremental sync (`None` for a full one).
    pub fn ports(self) -> Option<&'a [ServiceDelta]> {
        match self {
            Changed::Nothing => Some(&[]),
            Changed::Ports(d) => Some(d),
            Changed::Everything => None,
        }
    }
}

/// Failures of a backend's sync, naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// nftables refused a listing or a transaction of one family's table.
    #[error("{step} the {family} nftables table: {source}")]
    Nft {
        /// The table's family.
        family: Family,
        /// What was being done (`reading`, `applying the plan to`, ...).
        step: &'static str,
        /// The kernel's answer.
        #[source]
        source: nft::kernel::KernelError,
    },
    /// A read or write of the eBPF maps failed.
    #[error("eBPF maps ({step}): {source}")]
    Ebpf {
        /// What was being done (`attaching the tc programs`, `reading the maps`, ...).
        step: &'static str,
        /// The failure.
        #[source]
        source: ebpf::EbpfError,
    },
    /// IPVS or its dummy interface could not be programmed.
    #[error("IPVS: {0}")]
    Ipvs(#[from] ipvs::apply::IpvsSyncError),
}

/// Time a sync spent on each family's own table (reading, planning, applying it), so the
/// per-family sync metrics can be told apart from the work both families share.
#[derive(Clone, Copy, Debug, Default)]
pub struct FamilyTimes {
    ip: Duration,
    ip6: Duration,
}

impl FamilyTimes {
    /// Adds `d` to `family`'s own time.
    pub fn add(&mut self, family: Family, d: Duration) {
        match family {
            Family::Ip => self.ip += d,
            Family::Ip6 => self.ip6 += d,
        }
    }

    /// Times `f` as `family`'s own work.
    pub fn time<T>(&mut self, family: Family, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.add(family, started.elapsed());
        out
    }

    /// What each family's sync took out of a sync of `total`: the family's own time plus
    /// the time neither family's own work accounts for (the model, IPVS, eBPF maps), as
    /// kube-proxy's per-family proxier would have spent it syncing that family alone.
    pub fn per_family(&self, total: Duration) -> [(Family, Duration); 2] {
        let shared = total.saturating_sub(self.ip + self.ip6);
        [
            (Family::Ip, shared + self.ip),
            (Family::Ip6, shared + self.ip6),
        ]
    }
}

/// What a backend holds after a sync, for its gauge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ObjectCount {
    /// Nothing to report.
    #[default]
    Unchanged,
    /// nftables, after a full sync: every object of weir's tables.
    Nft(usize),
    /// nftables, after an incremental sync: elements added less elements deleted.
    NftDelta(i64),
    /// eBPF: entries of the services and backends maps.
    EbpfEntries(usize),
}

/// What one successful sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Element (map entry) changes written.
    pub element_changes: usize,
    /// Operations applied (transaction commands, map writes).
    pub ops: usize,
    /// Time spent writing to the kernel; the rest of the sync was planning.
    pub applied: Duration,
    /// Each family's own time (nftables' per-family tables; zero where one set of objects
    /// serves both families).
    pub own: FamilyTimes,
    /// What the backend holds now.
    pub objects: ObjectCount,
    /// Part of the sync failed without undoing the rest (IPVS refused an operation): the
    /// next sync comes soon and is a full one.
    pub retry: bool,
}

/// One proxy mode's dataplane, driven by the sync runner.
///
/// A backend keeps what it knows of the kernel between syncs. Its first sync, and every
/// sync after a failure, is a full one ([`Self::tracks_kernel`] is false then): it reads
/// what the kernel holds, adopting what a previous run left, and writes only the
/// difference. An incremental sync writes the changes of the Service ports it is given.
pub trait Dataplane: Send + 'static {
    /// Whether this dataplane programs Services at all (false with
    /// `--run-service-proxy=false`: the runner then computes no desired state).
    fn programs_services(&self) -> bool {
        true
    }

    /// Whether the backend knows what the kernel holds as of its last successful sync, so
    /// the next sync may be incremental.
    fn tracks_kernel(&self) -> bool;

    /// Notes one changed Service port before the sync that programs it; `store` tells
    /// which endpoints are still listed (eBPF mode moves connections off the others).
    fn note_change(&mut self, delta: &ServiceDelta, store: &Store) {
        let _ = (delta, store);
    }

    /// Removes what another proxy mode left that this one does not use, while any may be
    /// left; returns the removals that failed (retried before the next sync).
    fn remove_leftovers(&mut self) -> impl Future<Output = Vec<DataplaneError>> + Send {
        async { Vec::new() }
    }

    /// Brings the kernel to `desired`, of which `changed` says what changed since the
    /// last successful sync. On failure the backend forgets what it knew of the kernel
    /// (the next sync is a full one) and keeps what was programmed.
    fn sync<'a>(
        &'a mut self,
        desired: &'a DesiredState,
        changed: Changed<'a>,
    ) -> impl Future<Output = Result<SyncReport, DataplaneError>> + Send + 'a;

    /// How soon to sync again even with no change (IPVS real servers draining).
    fn recheck_after(&self) -> Option<Duration> {
        None
    }
}
