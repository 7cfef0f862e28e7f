//! Sources of Kubernetes objects: a directory of YAML manifests (`--source dir:PATH`)
//! and the Kubernetes API (`--source kube`). Sources only report what they see; the sync runner
//! records it in change trackers.

pub mod dir;
pub mod kube;
pub mod split;

use crate::objects::ObjectKey;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// One Kubernetes object of a kind weir reads.
// Objects are moved once from a source to a tracker; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A core/v1 Service.
    Service(Service),
    /// A discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A core/v1 Node.
    Node(Node),
    /// A core/v1 Pod (read by the policy controller).
    Pod(Pod),
    /// A core/v1 Namespace (read by the policy controller).
    Namespace(Namespace),
    /// A networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy(NetworkPolicy),
}

/// Which kind an [`Object`] or an [`ObjectRef`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Service.
    Service,
    /// EndpointSlice.
    EndpointSlice,
    /// Node.
    Node,
    /// Pod.
    Pod,
    /// Namespace.
    Namespace,
    /// NetworkPolicy.
    NetworkPolicy,
}

impl Kind {
    /// Index of the kind in per-kind arrays.
    pub fn index(self) -> usize {
        match self {
            Kind::Service => 0,
            Kind::EndpointSlice => 1,
            Kind::Node => 2,
            Kind::Pod => 3,
            Kind::Namespace => 4,
            Kind::NetworkPolicy => 5,
        }
    }

    /// The kinds the service proxy reads.
    pub const PROXY: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];
    /// The kinds the policy controller reads.
    pub const POLICY: [Kind; 3] = [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];

    /// Whether the policy controller (not the service proxy) reads this kind.
    pub fn is_policy(self) -> bool {
        Kind::POLICY.contains(&self)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
        })
    }
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    /// The object's `namespace/name` (Nodes and Namespaces have no namespace; others default to `default`).
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Service(s) => ObjectKey::of_meta(&s.metadata, true),
            Object::EndpointSlice(s) => ObjectKey::of_meta(&s.metadata, true),
            Object::Node(n) => ObjectKey::of_meta(&n.metadata, false),
            Object::Pod(p) => ObjectKey::of_meta(&p.metadata, true),
            Object::Namespace(n) => ObjectKey::of_meta(&n.metadata, false),
            Object::NetworkPolicy(p) => ObjectKey::of_meta(&p.metadata, true),
        }
    }
}

/// A reference to an object that was deleted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// Kind.
    pub kind: Kind,
    /// `namespace/name`.
    pub key: ObjectKey,
}

/// Where a source reports whether it is reaching its objects (the health endpoint's
/// verdict reads it): implemented by [`crate::http::health::ProxyHealth`], handed to the
/// source by the binary, so a source knows no HTTP.
pub trait SourceHealth: Send + Sync {
    /// The source delivered an event.
    fn source_ok(&self);
    /// The source failed (an API watch error) at `now`.
    fn source_failed(&self, now: std::time::SystemTime);
}

/// What a source reports.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum SourceUpdate {
    /// The complete current set of objects as the source sees it, in one message.
    /// Equivalent to `RelistStart`, one `RelistItem` per object, `RelistDone`.
    Replace(Vec<Object>),
    /// A complete listing follows, object by object (so no source holds all of them).
    RelistStart,
    /// One object of the listing.
    RelistItem(Object),
    /// An object of the listing that exists but could not be read (reported with its file,
    /// document and field), or whose file does not parse for now: the version already known
    /// is kept, nothing programmed is lost.
    RelistInvalid(ObjectRef),
    /// The listing is complete: objects it did not contain are gone. The first one a
    /// source sends marks it as synced.
    RelistDone,
    /// A complete listing of one kind follows (a watch of that kind restarted), object by
    /// object as `RelistItem`s; listings of other kinds may interleave.
    KindRelistStart(Kind),
    /// The listing of one kind is complete: objects of that kind it did not contain are gone.
    KindRelistDone(Kind),
    /// Every kind has been listed once: the source's view is complete and may be programmed.
    Synced,
    /// An object was added or changed.
    Upsert(Object),
    /// An object was deleted.
    Delete(ObjectRef),
}
