//! The ground floor every layer shares: the objects weir reads and how one is named
//! (sources name the objects they emit with it, the model keys its stores by it, HTTP
//! reports Services by it), the update stream every source emits and every consumer reads
//! ([`SourceUpdate`]), and the L4 protocols Services and NetworkPolicies name. It depends
//! on nothing of weir; how a backend spells a protocol stays with that backend.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::fmt;

/// `namespace/name` of an object (namespace empty for cluster-scoped objects such as Nodes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectKey {
    /// The namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key from a namespace (may be empty) and a name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object with Kubernetes metadata; `default` namespace when it has none
    /// and the kind is namespaced.
    pub fn of_meta(
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        namespaced: bool,
    ) -> Self {
        let namespace = if namespaced {
            meta.namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned())
        } else {
            String::new()
        };
        ObjectKey::new(namespace, meta.name.clone().unwrap_or_default())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The L4 protocols a Service port or a NetworkPolicy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
    /// SCTP (IP protocol 132).
    Sctp,
}

impl Protocol {
    /// All of them, in display order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Parses Kubernetes' spelling (`TCP`, `UDP`, `SCTP`); a missing value means TCP.
    pub fn from_k8s(value: Option<&str>) -> Option<Protocol> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol for an IP protocol number.
    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

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

    /// Every kind, in the order a complete listing closes them (EndpointSlices before
    /// their Services).
    pub const ALL: [Kind; 6] = [
        Kind::EndpointSlice,
        Kind::Service,
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
    ];
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

/// What a source reports: one protocol for every source. A source starts with a complete
/// listing of each kind it reads (`RelistStart(kind)`, the kind's objects as `RelistItem`s
/// or `RelistInvalid`s, `RelistDone(kind)`; listings of several kinds may interleave),
/// then `Synced`, then changes (`Upsert`, `Delete`). A kind is listed again whenever the
/// source may have missed changes (an API watch restarted, a manifest edited).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum SourceUpdate {
    /// A complete listing of one kind follows, object by object.
    RelistStart(Kind),
    /// One object of a listing.
    RelistItem(Object),
    /// An object of a listing that exists but could not be read (reported with its file,
    /// document and field), or whose file does not parse for now: the version already known
    /// is kept, nothing programmed is lost.
    RelistInvalid(ObjectRef),
    /// The listing of one kind is complete: objects of that kind it did not contain are gone.
    RelistDone(Kind),
    /// Every kind has been listed once: the source's view is complete and may be programmed.
    Synced,
    /// An object was added or changed.
    Upsert(Object),
    /// An object was deleted.
    Delete(ObjectRef),
    /// The updates up to the next `BatchEnd` belong together (one read of a changed
    /// manifest file): a sync waits for the end rather than programming part of them.
    BatchStart,
    /// See `BatchStart`.
    BatchEnd,
}

impl SourceUpdate {
    /// A complete listing of every kind holding exactly `objects`, then `Synced`: what a
    /// source that reads everything at once (the dir source) sends, in one sequence.
    pub fn listing(objects: impl IntoIterator<Item = Object>) -> Vec<SourceUpdate> {
        let mut out: Vec<SourceUpdate> = Kind::ALL.map(SourceUpdate::RelistStart).into();
        out.extend(objects.into_iter().map(SourceUpdate::RelistItem));
        out.extend(Kind::ALL.map(SourceUpdate::RelistDone));
        out.push(SourceUpdate::Synced);
        out
    }
}
