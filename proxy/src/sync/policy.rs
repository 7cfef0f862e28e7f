//! The NetworkPolicy controller: one loop owns the [`PolicyStore`] and the `weir_policy`
//! tables. Source updates only record changes; a [`Schedule`] starts syncs at most once
//! per `min_sync_period`: resolve every policy against the current pods and namespaces,
//! render each family's table for this node's pods, and apply the difference to what the
//! kernel holds (set elements only when only labels or pods changed). The kernel's tables
//! are re-read every `sync_period` and after any failure. Nothing is written before the
//! source's first complete listing, so a restart never opens or closes anything early.
//!
//! Which pods are this node's: with `--cni-state-dir`, those whose addresses weir-cni's
//! attachment records hold (re-read every second, so a pod attached or deleted is picked
//! up even before its Pod object changes); otherwise the pods whose `spec.nodeName` is
//! this node.

use crate::dataplane::nft::diff::plan;
use crate::dataplane::nft::kernel::KernelError;
use crate::dataplane::nft::policy::{render, POLICY_TABLE};
use crate::dataplane::nft::FAMILIES;
use crate::dataplane::nft::{DumpedTable, Family, NftBackend, Plan};
use crate::http::metrics::{label, Metrics};
use crate::objects::{Kind, SourceUpdate};
use crate::policy::store::PolicyStore;
use crate::sync::schedule::{sleep_until, Pacing, Schedule};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::Receiver;
use tracing::{info, warn};

/// How often weir-cni's attachment records are re-read.
const ATTACHMENTS_POLL: Duration = Duration::from_secs(1);

/// Settings of the policy controller.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// This node's name (`spec.nodeName` of local pods without `cni_state_dir`).
    pub node_name: String,
    /// weir-cni's state directory.
    pub cni_state_dir: Option<PathBuf>,
    /// Minimum time between syncs.
    pub min_sync_period: Duration,
    /// Time between syncs that re-read the kernel's tables.
    pub sync_period: Duration,
}

/// The policy controller's state.
pub struct PolicyController<K: NftBackend> {
    cfg: PolicyConfig,
    store: PolicyStore,
    kernel: K,
    metrics: Arc<Metrics>,
    /// What the kernel holds as of the last successful sync, per family in [`FAMILIES`]
    /// order; `None` re-reads the kernel next time.
    realized: Option<Vec<DumpedTable>>,
    /// Addresses in weir-cni's attachment records at the last read.
    attached: BTreeSet<IpAddr>,
}

impl<K: NftBackend> PolicyController<K> {
    /// A controller programming `kernel` (a backend for the `weir_policy` table).
    pub fn new(cfg: PolicyConfig, kernel: K, metrics: Arc<Metrics>) -> Self {
        PolicyController {
            cfg,
            store: PolicyStore::default(),
            kernel,
            metrics,
            realized: None,
            attached: BTreeSet::new(),
        }
    }

    /// Runs until the update channel closes.
    pub async fn run(mut self, mut updates: Receiver<SourceUpdate>) {
        let pacing = Pacing::new(self.cfg.min_sync_period, self.cfg.sync_period);
        let mut schedule = Schedule::new(pacing, tokio::time::Instant::now());
        // The first sync programs whatever the first complete view holds.
        schedule.queue();
        let mut poll = tokio::time::interval(ATTACHMENTS_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                u = updates.recv() => {
                    let Some(u) = u else { return };
                    match u {
                        SourceUpdate::BatchStart => schedule.hold(true, tokio::time::Instant::now()),
                        SourceUpdate::BatchEnd => schedule.hold(false, tokio::time::Instant::now()),
                        _ => {}
                    }
                    let bad_before = self.store.invalid_received();
                    if self.store.record(u) {
                        schedule.queue();
                    }
                    if self.store.synced() {
                        schedule.set_ready();
                    }
                    self.metrics
                        .invalid_updates
                        .get_or_create(&label("kind", "NetworkPolicy"))
                        .inc_by(self.store.invalid_received() - bad_before);
                }
                _ = poll.tick(), if self.cfg.cni_state_dir.is_some() => {
                    if self.read_attachments().await {
                        schedule.queue();
                    }
                }
                _ = sleep_until(schedule.next_run()) => {
                    if schedule.start(tokio::time::Instant::now()).full {
                        self.realized = None;
                    }
                    let ok = self.sync().await;
                    schedule.finish(tokio::time::Instant::now(), ok);
                }
            }
        }
    }

    /// Re-reads the attachment records; returns whether they changed.
    async fn read_attachments(&mut self) -> bool {
        let Some(dir) = self.cfg.cni_state_dir.clone() else {
            return false;
        };
        let read =
            tokio::task::spawn_blocking(move || crate::sys::attachments::attached_ips(&dir)).await;
        match read {
            Ok(Ok(ips)) if ips != self.attached => {
                self.attached = ips;
                true
            }
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                warn!(error = %e, "reading weir-cni attachments failed; keeping the last ones");
                false
            }
            Err(e) => {
                warn!(error = %e, "reading weir-cni attachments failed");
                false
            }
        }
    }

    /// Addresses of this node's pods.
    fn local_ips(&self) -> BTreeSet<IpAddr> {
        if self.cfg.cni_state_dir.is_some() {
            return self.attached.clone();
        }
        self.store
            .pods()
            .values()
            .filter(|p| p.node_name.as_deref() == Some(self.cfg.node_name.as_str()))
            .flat_map(|p| p.ips.iter().copied())
            .collect()
    }

    /// One sync; returns whether it succeeded.
    pub async fn sync(&mut self) -> bool {
        let started = Instant::now();
        if self.cfg.cni_state_dir.is_some() && self.realized.is_none() {
            self.read_attachments().await;
        }
        let local = self.local_ips();
        let set = self.store.policy_set();
        let (pods, namespaces, policies) = self.store.counts();
        for (kind, n) in [
            (Kind::Pod, pods),
            (Kind::Namespace, namespaces),
            (Kind::NetworkPolicy, policies),
        ] {
            self.metrics
                .policy_objects
                .get_or_create(&label("kind", &kind.to_string()))
                .set(n as i64);
        }
        self.metrics.policy_local_pods.set(
            set.pods()
                .values()
                .filter(|p| p.ips.iter().any(|ip| local.contains(ip)))
                .count() as i64,
        );
        let realized = match self.realized.take() {
            Some(r) => r,
            None => {
                let mut all = Vec::new();
                for family in FAMILIES {
                    match self.dump(family).await {
                        Ok(t) => all.push(t.unwrap_or_else(|| DumpedTable::empty(family))),
                        Err(e) => {
                            warn!(error = %e, %family, "reading the policy table failed; retrying");
                            self.metrics.policy_sync_failures.inc();
                            return false;
                        }
                    }
                }
                all
            }
        };
        let mut next = Vec::new();
        let mut objects = 0;
        let mut element_changes = 0;
        for (family, have) in FAMILIES.into_iter().zip(realized) {
            let desired = render(&set, Some(&local), family);
            objects += desired.object_count();
            let p = plan(&desired, &have);
            element_changes += p.element_changes();
            if !p.is_empty() {
                if let Err(e) = self.apply(p).await {
                    warn!(error = %e, %family, "applying the policy plan failed; the next sync re-reads the kernel");
                    self.metrics.policy_sync_failures.inc();
                    return false;
                }
            }
            next.push(desired.to_dump());
        }
        self.realized = Some(next);
        let now = SystemTime::now();
        self.metrics
            .policy_sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.policy_last_sync_timestamp.set(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.metrics.policy_nftables_objects.set(objects as i64);
        info!(
            policies,
            pods,
            local_pods = local.len(),
            objects,
            element_changes,
            took_us = started.elapsed().as_micros() as u64,
            "policy synced"
        );
        true
    }

    async fn dump(&self, family: Family) -> Result<Option<DumpedTable>, KernelError> {
        let kernel = self.kernel.clone();
        blocking(family, move || kernel.dump(family)).await
    }

    async fn apply(&self, p: Plan) -> Result<(), KernelError> {
        let kernel = self.kernel.clone();
        blocking(p.family, move || kernel.apply(&p)).await
    }
}

/// Runs a kernel call on the blocking pool; a failed worker is a listing error of `family`.
async fn blocking<T: Send + 'static>(
    family: Family,
    f: impl FnOnce() -> Result<T, KernelError> + Send + 'static,
) -> Result<T, KernelError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(KernelError::List {
            family,
            table: POLICY_TABLE.to_owned(),
            message: format!("worker task failed: {e}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nft::fake::SharedFake;
    use crate::dataplane::nft::table::Key;
    use crate::objects::{Kind, Object};
    use serde_json::json;

    fn pod(name: &str, app: &str, ip: &str, node: &str) -> Object {
        Object::Pod(
            serde_json::from_value(json!({
                "metadata": {"namespace": "x", "name": name, "labels": {"app": app}},
                "spec": {"containers": [], "nodeName": node},
                "status": {"podIP": ip},
            }))
            .unwrap(),
        )
    }

    fn allow_from(app: &str) -> Object {
        Object::NetworkPolicy(
            serde_json::from_value(json!({
                "metadata": {"namespace": "x", "name": "web"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}]}]},
            }))
            .unwrap(),
        )
    }

    fn start(
        fake: &SharedFake,
        state_dir: Option<PathBuf>,
    ) -> (tokio::sync::mpsc::Sender<SourceUpdate>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let c = PolicyController::new(
            PolicyConfig {
                node_name: "n1".into(),
                cni_state_dir: state_dir,
                min_sync_period: Duration::from_millis(10),
                sync_period: Duration::from_secs(3600),
            },
            fake.clone(),
            metrics.clone(),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(c.run(rx));
        (tx, metrics)
    }

    fn elements(fake: &SharedFake, set: &str) -> Vec<String> {
        fake.table(Family::Ip)
            .and_then(|t| t.maps.get(set).cloned())
            .map(|m| m.elements.keys().map(|k: &Key| k.to_string()).collect())
            .unwrap_or_default()
    }

    /// Sends a complete listing holding exactly `objects`.
    async fn send_listing(tx: &tokio::sync::mpsc::Sender<SourceUpdate>, objects: Vec<Object>) {
        for u in SourceUpdate::listing(objects) {
            tx.send(u).await.unwrap();
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(120)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_written_before_the_listing_and_only_local_pods_are_isolated() {
        let fake = SharedFake::default();
        let (tx, metrics) = start(&fake, None);
        for k in Kind::ALL {
            tx.send(SourceUpdate::RelistStart(k)).await.unwrap();
        }
        for o in [
            pod("web", "web", "10.244.1.5", "n1"),
            pod("web-far", "web", "10.244.2.5", "n2"),
            pod("client", "client", "10.244.2.6", "n2"),
            allow_from("client"),
        ] {
            tx.send(SourceUpdate::RelistItem(o)).await.unwrap();
        }
        settle().await;
        assert_eq!(
            fake.applies(),
            0,
            "no kernel write before the listing is complete"
        );
        for k in Kind::ALL {
            tx.send(SourceUpdate::RelistDone(k)).await.unwrap();
        }
        tx.send(SourceUpdate::Synced).await.unwrap();
        settle().await;
        assert_eq!(elements(&fake, "ingress_isolated"), ["10.244.1.5"]);
        assert_eq!(elements(&fake, "x_web_in0_pods"), ["10.244.2.6"]);
        assert!(
            fake.table(Family::Ip6).is_some(),
            "both families programmed"
        );
        assert!(metrics.policy_last_sync_timestamp.get() > 0.0);
        assert_eq!(metrics.policy_local_pods.get(), 1);
        // A label change: the client leaves the peers, set elements only, no re-read.
        let dumps = fake.dumps();
        tx.send(SourceUpdate::Upsert(pod(
            "client",
            "other",
            "10.244.2.6",
            "n2",
        )))
        .await
        .unwrap();
        settle().await;
        assert!(elements(&fake, "x_web_in0_pods").is_empty());
        assert_eq!(
            fake.dumps(),
            dumps,
            "incremental syncs trust the last apply"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_apply_is_retried_from_a_fresh_read_of_the_kernel() {
        let fake = SharedFake::default();
        let (tx, metrics) = start(&fake, None);
        fake.fail_next_apply();
        send_listing(
            &tx,
            vec![pod("web", "web", "10.244.1.5", "n1"), allow_from("client")],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metrics.policy_sync_failures.get(), 1);
        assert_eq!(elements(&fake, "ingress_isolated"), ["10.244.1.5"]);
        assert!(fake.dumps() >= 4, "both families re-read after the failure");
    }

    #[tokio::test(start_paused = true)]
    async fn attachment_records_decide_which_pods_are_local() {
        let dir = tempfile::tempdir().unwrap();
        let fake = SharedFake::default();
        let (tx, _) = start(&fake, Some(dir.path().to_owned()));
        // nodeName says n2, the attachment record says here: the record wins.
        send_listing(
            &tx,
            vec![pod("web", "web", "10.244.1.5", "n2"), allow_from("client")],
        )
        .await;
        settle().await;
        assert!(elements(&fake, "ingress_isolated").is_empty());
        let rec = dir.path().join("weir/attachments");
        std::fs::create_dir_all(&rec).unwrap();
        std::fs::write(rec.join("c1@eth0.json"), r#"{"ips":["10.244.1.5"]}"#).unwrap();
        tokio::time::sleep(ATTACHMENTS_POLL + Duration::from_millis(300)).await;
        assert_eq!(elements(&fake, "ingress_isolated"), ["10.244.1.5"]);
    }
}
