//! Pure NetworkPolicy model (`networking.k8s.io/v1`): validation, compilation, resolution
//! against pods and namespaces, and allow/deny verdicts. No kernel and no sources here.
//!
//! - [`types`]: reduced inputs (selectors, pods, protocols) and [`PolicyError`].
//! - [`compile`]: one NetworkPolicy -> [`compile::CompiledPolicy`] (fails closed on errors),
//!   then -> [`compile::ResolvedPolicy`] against the current pods and namespaces.
//! - [`verdict`]: [`PolicySet`] answering [`PolicySet::allows`], truth tables and the
//!   upstream-style matrix print-out.
//!
//! Semantics: a pod selected by any policy for a direction is isolated in that direction
//! and then only the union of the rules of all policies selecting it lets traffic through;
//! pod-to-pod traffic needs the source's egress AND the destination's ingress. Named ports
//! resolve against the destination pod's container ports (name and protocol). An ipBlock
//! matches the other end's IP, cluster pods included (for a pod end given by name, any of
//! its IPs; an [`Endpoint::Ip`] that is a known pod's IP means that pod). A pod's traffic
//! to itself is always allowed. Host-network pods are not pods here: policies neither
//! select nor match them, their IP is an outside address. Statefulness (replies) is the
//! dataplane's job (conntrack), not modelled here.
//!
//! nftables: the nftables backend's `dataplane::nft::policy::render` turns a [`PolicySet`]
//! into its own table (`POLICY_TABLE`); its module documentation describes the layout.

pub mod compile;
pub mod store;
pub mod synth;
pub mod types;
pub mod verdict;

pub use types::{PodKey, PolicyError, Protocol};
pub use verdict::{format_matrix, Endpoint, PolicySet, Probe};

#[cfg(test)]
pub(crate) mod tests;
