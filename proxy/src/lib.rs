//! weir-proxy: a node-level Kubernetes service proxy (kube-proxy replacement).
//!
//! Layout: [`source`] feeds objects into [`model`] change trackers; [`sync`] computes the
//! [`model::DesiredState`], renders it through a [`dataplane`] backend and applies it;
//! [`http`] serves metrics and health.

pub mod config;
pub mod dataplane;
pub mod http;
pub mod kubeproxy_config;
pub mod model;
pub mod objects;
pub mod policy;
pub mod routes;
pub mod source;
pub mod sync;
pub mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
