//! Sources of Kubernetes objects: a directory of YAML manifests (`--source dir:PATH`)
//! and the Kubernetes API (`--source kube`). Sources only report what they see; the sync runner
//! records it in change trackers.

pub mod dir;
pub mod documents;
pub mod kube;
pub mod split;

pub use crate::objects::{Kind, Object, ObjectRef, SourceUpdate};

/// Where a source reports whether it is reaching its objects (the health endpoint's
/// verdict reads it): implemented by [`crate::http::health::ProxyHealth`], handed to the
/// source by the binary, so a source knows no HTTP.
pub trait SourceHealth: Send + Sync {
    /// The source delivered an event.
    fn source_ok(&self);
    /// The source failed (an API watch error) at `now`.
    fn source_failed(&self, now: std::time::SystemTime);
}
