//! Splits one source's updates between the service proxy and the policy controller: each
//! object goes to the consumer that reads its kind, a listing goes to the consumer that
//! reads its kind, `Synced` to both (so each sees complete relists of its own kinds). Without a policy controller its kinds are
//! dropped here.

use super::SourceUpdate;
use tokio::sync::mpsc::{Receiver, Sender};

/// Where one update goes.
// Routed once, straight from the source's message; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Route {
    /// Only to the service proxy.
    Proxy(SourceUpdate),
    /// Only to the policy controller.
    Policy(SourceUpdate),
    /// To both (the proxy's part first).
    Both(SourceUpdate, SourceUpdate),
}

/// Decides where `u` goes (pure).
pub fn route(u: SourceUpdate) -> Route {
    let by_kind = |policy: bool, u| {
        if policy {
            Route::Policy(u)
        } else {
            Route::Proxy(u)
        }
    };
    match u {
        SourceUpdate::Synced | SourceUpdate::BatchStart | SourceUpdate::BatchEnd => {
            Route::Both(u.clone(), u)
        }
        SourceUpdate::RelistItem(ref o) | SourceUpdate::Upsert(ref o) => {
            by_kind(o.kind().is_policy(), u)
        }
        SourceUpdate::RelistInvalid(ref r) | SourceUpdate::Delete(ref r) => {
            by_kind(r.kind.is_policy(), u)
        }
        SourceUpdate::RelistStart(k) | SourceUpdate::RelistDone(k) => by_kind(k.is_policy(), u),
    }
}

/// Forwards `rx` to `proxy` and (when present) `policy` until the source ends or the proxy
/// is gone. A policy controller that stopped only loses its updates.
pub async fn run(
    mut rx: Receiver<SourceUpdate>,
    proxy: Sender<SourceUpdate>,
    mut policy: Option<Sender<SourceUpdate>>,
) {
    while let Some(u) = rx.recv().await {
        let (to_proxy, to_policy) = match route(u) {
            Route::Proxy(u) => (Some(u), None),
            Route::Policy(u) => (None, Some(u)),
            Route::Both(a, b) => (Some(a), Some(b)),
        };
        if let Some(u) = to_proxy {
            if proxy.send(u).await.is_err() {
                return;
            }
        }
        if let (Some(u), Some(tx)) = (to_policy, &policy) {
            if tx.send(u).await.is_err() {
                tracing::warn!("the policy controller stopped; dropping its updates");
                policy = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ObjectKey;
    use crate::source::Object;
    use crate::source::{Kind, ObjectRef};

    fn obj(kind: &str) -> Object {
        let v = serde_json::json!({"metadata": {"name": "n", "namespace": "d"}});
        match kind {
            "Pod" => Object::Pod(serde_json::from_value(v).unwrap()),
            "NetworkPolicy" => Object::NetworkPolicy(serde_json::from_value(v).unwrap()),
            _ => Object::Service(serde_json::from_value(v).unwrap()),
        }
    }

    #[test]
    fn objects_go_by_kind_and_listings_go_to_both() {
        assert!(matches!(
            route(SourceUpdate::Upsert(obj("Pod"))),
            Route::Policy(_)
        ));
        assert!(matches!(
            route(SourceUpdate::RelistItem(obj("Service"))),
            Route::Proxy(_)
        ));
        let del = SourceUpdate::Delete(ObjectRef {
            kind: Kind::NetworkPolicy,
            key: ObjectKey::new("d", "n"),
        });
        assert!(matches!(route(del), Route::Policy(_)));
        assert!(matches!(
            route(SourceUpdate::RelistStart(Kind::Namespace)),
            Route::Policy(_)
        ));
        assert!(matches!(
            route(SourceUpdate::RelistDone(Kind::Node)),
            Route::Proxy(_)
        ));
        assert_eq!(
            route(SourceUpdate::Synced),
            Route::Both(SourceUpdate::Synced, SourceUpdate::Synced)
        );
        // A complete listing: each side gets its own kinds' listings and items.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for u in SourceUpdate::listing([obj("Service"), obj("Pod"), obj("NetworkPolicy")]) {
            match route(u) {
                Route::Proxy(u) => a.push(u),
                Route::Policy(u) => b.push(u),
                Route::Both(x, y) => {
                    a.push(x);
                    b.push(y);
                }
            }
        }
        let items = |v: &[SourceUpdate]| {
            v.iter()
                .filter(|u| matches!(u, SourceUpdate::RelistItem(_)))
                .count()
        };
        assert_eq!(items(&a), 1);
        assert_eq!(items(&b), 2);
        let starts = |v: &[SourceUpdate], kinds: [Kind; 3]| {
            kinds.iter().all(|k| {
                v.contains(&SourceUpdate::RelistStart(*k))
                    && v.contains(&SourceUpdate::RelistDone(*k))
            })
        };
        assert!(starts(&a, Kind::PROXY) && !a.contains(&SourceUpdate::RelistStart(Kind::Pod)));
        assert!(starts(&b, Kind::POLICY) && !b.contains(&SourceUpdate::RelistStart(Kind::Node)));
    }

    #[tokio::test]
    async fn without_a_policy_controller_its_kinds_are_dropped() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let (ptx, mut prx) = tokio::sync::mpsc::channel(8);
        tx.send(SourceUpdate::Upsert(obj("Pod"))).await.unwrap();
        tx.send(SourceUpdate::Upsert(obj("Service"))).await.unwrap();
        drop(tx);
        run(rx, ptx, None).await;
        assert!(matches!(
            prx.recv().await,
            Some(SourceUpdate::Upsert(Object::Service(_)))
        ));
        assert!(prx.recv().await.is_none());
    }
}
