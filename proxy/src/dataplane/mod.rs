//! Dataplane backends: each renders a [`crate::model::DesiredState`] into a plan (pure)
//! and applies plans to the kernel (side effects); [`conntrack`] deletes stale flows.

pub mod conntrack;
pub mod ebpf;
pub mod ipvs;
pub mod netlink;
pub mod nft;
