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
//! Intended nftables mapping (not written yet), one set of objects per
//! [`compile::ResolvedPolicy`]:
//! - `selected` -> a named set of the selected pods' IPs (`ipv4_addr`/`ipv6_addr`), used to
//!   jump from the per-direction dispatch chain into the policy's chain; a pod in any
//!   such set of a direction gets a final drop in that direction (isolation).
//! - per rule, `peer_pods` -> a named set of peer pod IPs, `ip_blocks` -> an interval set
//!   of `cidr` minus `except` (or a cidr set plus an except set checked first);
//!   `any_peer` -> no address match.
//! - per rule, `ports` -> a `inet_proto . inet_service` interval set for numeric ports
//!   and ranges; named ports -> a concatenated map `ipv4_addr . inet_proto . inet_service`
//!   keyed by the destination pod's IP (its own container port per pod), so a pod label
//!   change only adds/removes set elements, never rules.
//! - a failed-closed policy renders only its `selected` set (isolation without accepts).

pub mod compile;
pub mod store;
pub mod types;
pub mod verdict;

pub use types::{PodKey, PolicyError, Protocol};
pub use verdict::{format_matrix, Endpoint, PolicySet, Probe};

#[cfg(test)]
mod tests;
