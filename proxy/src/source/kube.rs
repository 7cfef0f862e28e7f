//! The Kubernetes API source (`--source kube`): watches of Services, EndpointSlices
//! (discovery.k8s.io/v1) and this node's Node, reported as [`SourceUpdate`]s.
//!
//! - Services and EndpointSlices are selected as kube-proxy selects them: without the
//!   `service.kubernetes.io/service-proxy-name` and `service.kubernetes.io/headless` labels.
//! - Each watch starts with a listing (`RelistStart`, `RelistItem`s, `RelistDone`);
//!   once all have listed, `Synced` tells the runner it may program the kernel.
//! - With NetworkPolicy enforcement on, Pods, Namespaces and NetworkPolicies of every
//!   namespace are watched too (for the policy controller).
//! - An expired watch (HTTP 410) or a reconnect relists that kind; objects the new listing
//!   lacks are deleted, nothing else is touched, so programmed rules are never flushed.
//! - While the API server is unreachable the watches retry with backoff; rules stay as they
//!   are and the health it reports to ([`super::SourceHealth`]) says the source is failing.
//! - Every `--config-sync-period` all watches restart, so a full listing repairs anything a
//!   watch may have missed.

use super::{Kind, Object, ObjectRef, SourceUpdate};
use futures_util::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc::Sender;
use tracing::{info, warn};

/// kube-proxy's label selector for Services and EndpointSlices.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Where and how to reach the API server.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KubeSourceConfig {
    /// `--kubeconfig`: a kubeconfig file (else in-cluster, else `$KUBECONFIG`/`~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: the API server's URL, overriding the kubeconfig's.
    pub master: Option<String>,
    /// This node's name, whose Node object is watched.
    pub node_name: String,
    /// Watch every Node (for host-gw pod routes), not only this one.
    pub all_nodes: bool,
    /// `--config-sync-period`: every watch restarts (a full listing) this often.
    pub resync: Duration,
    /// Also watch Pods, Namespaces and NetworkPolicies (NetworkPolicy enforcement).
    pub network_policy: bool,
}

/// The API source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The kubeconfig could not be read.
    #[error("--kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// No configuration could be inferred (not in a cluster, no kubeconfig).
    #[error("no API server configuration (not in a cluster, no --kubeconfig or $KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// `--master` is not a URL.
    #[error("--master {value:?}: {message}")]
    Master {
        /// The value.
        value: String,
        /// Why.
        message: String,
    },
    /// The client could not be built.
    #[error("building the API client: {0}")]
    Client(#[from] kube::Error),
    /// The runner is gone.
    #[error("the sync runner stopped")]
    Closed,
}

/// Builds the API client from the flags.
pub async fn client(cfg: &KubeSourceConfig) -> Result<Client, KubeSourceError> {
    let mut config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|source| KubeSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    if let Some(master) = &cfg.master {
        config.cluster_url = master.parse().map_err(|e| KubeSourceError::Master {
            value: master.clone(),
            message: format!("{e}"),
        })?;
    }
    Ok(Client::try_from(config)?)
}

/// Retry delays of a failed watch: 200 ms doubling to at most 5 s, back to 200 ms after
/// any success. Short on purpose: a relist after an expired watch or an API server restart
/// should follow at once (client-go's reflector relists immediately on 410), and while the
/// API server is down a retry every 5 s is cheap.
#[derive(Clone, Copy, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

/// First retry delay.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: BACKOFF_MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(d)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// One watch event, made kind-independent.
type Item = (Kind, Result<Event<Object>, watcher::Error>);

fn watch<K, F>(api: Api<K>, cfg: watcher::Config, kind: Kind, wrap: F) -> BoxStream<'static, Item>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(K) -> Object + Send + Sync + Copy + 'static,
{
    watcher(api, cfg)
        .backoff(WatchBackoff::default())
        .map(move |r| (kind, r.map(|e| map_event(e, wrap))))
        .boxed()
}

fn map_event<K>(e: Event<K>, wrap: impl Fn(K) -> Object) -> Event<Object> {
    match e {
        Event::Apply(o) => Event::Apply(wrap(o)),
        Event::Delete(o) => Event::Delete(wrap(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(wrap(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// The update one watch event means.
pub fn update_for(kind: Kind, e: Event<Object>) -> SourceUpdate {
    match e {
        Event::Init => SourceUpdate::RelistStart(kind),
        Event::InitApply(o) => SourceUpdate::RelistItem(o),
        Event::InitDone => SourceUpdate::RelistDone(kind),
        Event::Apply(o) => SourceUpdate::Upsert(o),
        Event::Delete(o) => SourceUpdate::Delete(ObjectRef { kind, key: o.key() }),
    }
}

/// Watches until the runner goes away; never returns on API errors (they are retried).
pub async fn run(
    client: Client,
    cfg: KubeSourceConfig,
    tx: Sender<SourceUpdate>,
    health: Arc<dyn super::SourceHealth>,
) -> Result<(), KubeSourceError> {
    let mut listed = [false; 6];
    let mut synced = false;
    let kinds: &[Kind] = if cfg.network_policy {
        &[
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Node,
            Kind::Pod,
            Kind::Namespace,
            Kind::NetworkPolicy,
        ]
    } else {
        &Kind::PROXY
    };
    loop {
        let selected = watcher::Config::default().labels(LABEL_SELECTOR);
        let node = if cfg.all_nodes {
            watcher::Config::default()
        } else {
            watcher::Config::default().fields(&format!("metadata.name={}", cfg.node_name))
        };
        let mut streams = vec![
            watch(
                Api::<Service>::all(client.clone()),
                selected.clone(),
                Kind::Service,
                Object::Service,
            ),
            watch(
                Api::<EndpointSlice>::all(client.clone()),
                selected,
                Kind::EndpointSlice,
                Object::EndpointSlice,
            ),
            watch(
                Api::<Node>::all(client.clone()),
                node,
                Kind::Node,
                Object::Node,
            ),
        ];
        if cfg.network_policy {
            let all = watcher::Config::default;
            streams.push(watch(
                Api::<Pod>::all(client.clone()),
                all(),
                Kind::Pod,
                Object::Pod,
            ));
            streams.push(watch(
                Api::<Namespace>::all(client.clone()),
                all(),
                Kind::Namespace,
                Object::Namespace,
            ));
            streams.push(watch(
                Api::<NetworkPolicy>::all(client.clone()),
                all(),
                Kind::NetworkPolicy,
                Object::NetworkPolicy,
            ));
        }
        let mut events = futures_util::stream::select_all(streams);
        let resync = tokio::time::sleep(cfg.resync);
        tokio::pin!(resync);
        loop {
            let (kind, result) = tokio::select! {
                item = events.next() => match item {
                    Some(item) => item,
                    None => break,
                },
                _ = &mut resync => {
                    info!(period = ?cfg.resync, "config sync period: relisting every kind");
                    break;
                }
            };
            match result {
                Ok(e) => {
                    health.source_ok();
                    let done = matches!(e, Event::InitDone);
                    if let Event::Apply(o) | Event::Delete(o) = &e {
                        tracing::debug!(%kind, object = %o.key(), "watch event");
                    }
                    tx.send(update_for(kind, e))
                        .await
                        .map_err(|_| KubeSourceError::Closed)?;
                    if done {
                        listed[kind.index()] = true;
                        info!(%kind, "listed");
                        if !synced && kinds.iter().all(|k| listed[k.index()]) {
                            synced = true;
                            info!("every kind listed: the source is synced");
                            tx.send(SourceUpdate::Synced)
                                .await
                                .map_err(|_| KubeSourceError::Closed)?;
                        }
                    }
                }
                Err(e) => {
                    health.source_failed(SystemTime::now());
                    warn!(%kind, error = %e, "watch failed; retrying (programmed rules stay)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectKey, Store};

    fn svc(name: &str) -> Object {
        Object::Service(
            serde_yaml_ng::from_str(&format!(
                "{{metadata: {{name: {name}, namespace: d}}, spec: {{clusterIP: 10.96.0.9, ports: [{{port: 80}}]}}}}"
            ))
            .unwrap(),
        )
    }

    fn feed(store: &mut Store, kind: Kind, events: Vec<Event<Object>>) {
        for e in events {
            store.record(update_for(kind, e), SystemTime::UNIX_EPOCH);
        }
    }

    #[test]
    fn a_relist_after_expiry_deletes_only_what_is_gone() {
        let mut store = Store::default();
        feed(
            &mut store,
            Kind::Service,
            vec![
                Event::Init,
                Event::InitApply(svc("a")),
                Event::InitApply(svc("b")),
                Event::InitDone,
            ],
        );
        assert_eq!(store.services().len(), 2);
        store.take_changes();
        // The watch expired (410) and relisted: b is gone, a unchanged.
        feed(
            &mut store,
            Kind::Service,
            vec![Event::Init, Event::InitApply(svc("a")), Event::InitDone],
        );
        let changes = store.take_changes();
        assert_eq!(store.services().len(), 1);
        assert_eq!(
            changes
                .services
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>(),
            ["d/b"],
            "only b changed"
        );
    }

    #[test]
    fn a_relist_of_one_kind_leaves_the_others_alone() {
        let mut store = Store::default();
        feed(
            &mut store,
            Kind::Service,
            vec![Event::Init, Event::InitApply(svc("a")), Event::InitDone],
        );
        // An EndpointSlice relist with nothing in it must not delete the Service.
        feed(
            &mut store,
            Kind::EndpointSlice,
            vec![Event::Init, Event::InitDone],
        );
        assert_eq!(store.services().len(), 1);
    }

    #[test]
    fn backoff_doubles_to_five_seconds_and_resets() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let first: Vec<u128> = b.by_ref().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(first, [200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(200)));
    }

    #[test]
    fn deletes_and_applies_map_to_updates() {
        let u = update_for(Kind::Service, Event::Delete(svc("a")));
        assert_eq!(
            u,
            SourceUpdate::Delete(ObjectRef {
                kind: Kind::Service,
                key: ObjectKey::new("d", "a")
            })
        );
        assert!(matches!(
            update_for(Kind::Service, Event::Apply(svc("a"))),
            SourceUpdate::Upsert(_)
        ));
    }
}
