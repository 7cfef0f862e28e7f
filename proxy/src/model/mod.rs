//! The pure desired-state model: Kubernetes objects in, [`DesiredState`] out.
//!
//! Nothing here touches the kernel, the network or the clock: [`compute`] is a
//! deterministic function of the [`Store`]'s records and a [`ModelConfig`].

pub mod change_tracker;
pub mod desired;
pub mod endpoint;
pub mod service;
pub mod store;
pub mod topology;

pub use crate::objects::Protocol;
pub use change_tracker::{ChangeTracker, ObjectKey};
pub use desired::{
    compute, compute_service, nodeport_ips, recompute, recompute_with, DesiredState, Endpoint,
    ModelConfig, ModelError, NodePortAddresses, ServiceDelta, ServicePortState,
};
pub use endpoint::EndpointInfo;
pub use service::ServiceInfo;
pub use store::{Changes, Store};

use std::fmt;

/// One port of one Service: `namespace/name:port` plus its protocol, as upstream keys it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServicePortName {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The port's name (empty for a single unnamed port).
    pub port: String,
    /// The port's protocol.
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}
