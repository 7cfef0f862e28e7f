//! Compiles one `networking.k8s.io/v1` NetworkPolicy into a validated [`CompiledPolicy`],
//! and resolves it against pods and namespaces into [`ResolvedPolicy`] sets.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::types::{Labels, PodInfo, PodKey, PolicyError, Protocol, Selector};

/// Which pods a `Pods` peer draws from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceScope {
    /// No namespaceSelector: only the policy's own namespace.
    Own,
    /// namespaceSelector: every namespace whose labels match.
    Matching(Selector),
}

/// One validated `from`/`to` peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// podSelector and/or namespaceSelector (both present = AND).
    Pods {
        /// Namespaces considered.
        namespaces: NamespaceScope,
        /// Pods within them; empty selector (or absent podSelector) = all.
        pods: Selector,
    },
    /// ipBlock: addresses in `cidr` but in none of `except`.
    IpBlock {
        /// Allowed range.
        cidr: IpNetwork,
        /// Carved-out ranges.
        except: Vec<IpNetwork>,
    },
}

impl Peer {
    /// True when `ip` is inside this ipBlock (always false for pod peers).
    pub fn ip_matches(&self, ip: std::net::IpAddr) -> bool {
        match self {
            Peer::IpBlock { cidr, except } => {
                cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
            }
            Peer::Pods { .. } => false,
        }
    }
}

/// The port part of a [`PortSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// No port given: every port of the protocol.
    Any,
    /// `port` (first == last) or `port`..=`endPort`.
    Range(u16, u16),
    /// A container port name, resolved against the destination pod.
    Named(String),
}

/// One validated `ports` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Protocol (TCP by default).
    pub protocol: Protocol,
    /// Port(s).
    pub port: PortRef,
}

impl PortSpec {
    /// True when `(port, proto)` matches, resolving a name against `dst` (the destination
    /// pod; `None` for a non-pod destination, which no named port matches).
    pub fn matches(&self, dst: Option<&PodInfo>, port: u16, proto: Protocol) -> bool {
        if self.protocol != proto {
            return false;
        }
        match &self.port {
            PortRef::Any => true,
            PortRef::Range(first, last) => (*first..=*last).contains(&port),
            PortRef::Named(name) => dst.and_then(|p| p.resolve_port(name, proto)) == Some(port),
        }
    }
}

/// One validated ingress or egress rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Peers; empty = every source (ingress) or destination (egress).
    pub peers: Vec<Peer>,
    /// Ports; empty = every port and protocol.
    pub ports: Vec<PortSpec>,
}

/// A validated NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Selects the pods (in `namespace`) the policy isolates.
    pub pod_selector: Selector,
    /// Ingress rules when the policy type includes Ingress, else `None`.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules when the policy type includes Egress, else `None`.
    pub egress: Option<Vec<Rule>>,
    /// True when validation failed: rules were dropped, the policy only denies.
    pub failed_closed: bool,
}

struct Ctx<'a> {
    policy: &'a str,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn selector(
        &mut self,
        sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
        field: &str,
    ) -> Selector {
        match Selector::parse(sel, field) {
            Ok(s) => s,
            Err((field, reason)) => {
                self.errors.push(PolicyError::BadSelector {
                    policy: self.policy.to_string(),
                    field,
                    reason,
                });
                Selector::default()
            }
        }
    }

    fn cidr(&mut self, text: &str, field: String) -> Option<IpNetwork> {
        if !text.contains('/') {
            self.bad_cidr(field, text, "missing prefix length");
            return None;
        }
        match text.parse::<IpNetwork>() {
            // Like the API server, accept host bits ("192.168.1.1/24") and use the network.
            Ok(net) => match IpNetwork::new(net.network(), net.prefix()) {
                Ok(n) => Some(n),
                Err(e) => {
                    self.bad_cidr(field, text, &e.to_string());
                    None
                }
            },
            Err(e) => {
                self.bad_cidr(field, text, &e.to_string());
                None
            }
        }
    }

    fn bad_cidr(&mut self, field: String, value: &str, reason: &str) {
        self.errors.push(PolicyError::InvalidCidr {
            policy: self.policy.to_string(),
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        });
    }

    fn invalid(&mut self, field: String, reason: &str) {
        self.errors.push(PolicyError::Invalid {
            policy: self.policy.to_string(),
            field,
            reason: reason.to_string(),
        });
    }

    fn ip_block(&mut self, b: &IPBlock, field: &str) -> Option<Peer> {
        let cidr = self.cidr(&b.cidr, format!("{field}.cidr"))?;
        let mut except = Vec::new();
        for (i, e) in b.except.iter().flatten().enumerate() {
            let f = format!("{field}.except[{i}]");
            let net = self.cidr(e, f.clone())?;
            let inside = net.is_ipv4() == cidr.is_ipv4()
                && cidr.contains(net.network())
                && net.prefix() > cidr.prefix();
            if !inside {
                self.bad_cidr(f, e, "must be a strict subset of cidr");
                return None;
            }
            except.push(net);
        }
        Some(Peer::IpBlock { cidr, except })
    }

    fn peer(&mut self, p: &NetworkPolicyPeer, field: &str) -> Option<Peer> {
        match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(b), None, None) => self.ip_block(b, &format!("{field}.ipBlock")),
            (Some(_), _, _) => {
                self.invalid(
                    field.to_string(),
                    "ipBlock cannot be combined with selectors",
                );
                None
            }
            (None, None, None) => {
                self.invalid(field.to_string(), "peer must set at least one field");
                None
            }
            (None, ns, pods) => {
                let namespaces = match ns {
                    Some(s) => NamespaceScope::Matching(
                        self.selector(s, &format!("{field}.namespaceSelector")),
                    ),
                    None => NamespaceScope::Own,
                };
                let pods = match pods {
                    Some(s) => self.selector(s, &format!("{field}.podSelector")),
                    None => Selector::default(),
                };
                Some(Peer::Pods { namespaces, pods })
            }
        }
    }

    fn port(&mut self, p: &NetworkPolicyPort, field: &str) -> Option<PortSpec> {
        let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
            self.errors.push(PolicyError::UnknownProtocol {
                policy: self.policy.to_string(),
                field: format!("{field}.protocol"),
                value: p.protocol.clone().unwrap_or_default(),
            });
            return None;
        };
        let mut bad = |f: &str, reason: String| {
            self.errors.push(PolicyError::InvalidPort {
                policy: self.policy.to_string(),
                field: format!("{field}.{f}"),
                reason,
            });
            None
        };
        let port = match (&p.port, p.end_port) {
            (None, None) => PortRef::Any,
            (None, Some(_)) => return bad("endPort", "endPort requires a numeric port".into()),
            (Some(IntOrString::String(name)), None) => {
                if name.is_empty() {
                    return bad("port", "empty port name".into());
                }
                PortRef::Named(name.clone())
            }
            (Some(IntOrString::String(_)), Some(_)) => {
                return bad("endPort", "endPort requires a numeric port".into())
            }
            (Some(IntOrString::Int(n)), end) => {
                let Some(first) = u16::try_from(*n).ok().filter(|n| *n > 0) else {
                    return bad("port", format!("{n} is not in 1..=65535"));
                };
                let last = match end {
                    None => first,
                    Some(e) => match u16::try_from(e).ok().filter(|e| *e >= first) {
                        Some(e) => e,
                        None => return bad("endPort", format!("{e} is not in {first}..=65535")),
                    },
                };
                PortRef::Range(first, last)
            }
        };
        Some(PortSpec { protocol, port })
    }

    fn rule(
        &mut self,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
        field: &str,
        peer_field: &str,
    ) -> Rule {
        let peers = peers
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, p)| self.peer(p, &format!("{field}.{peer_field}[{i}]")))
            .collect();
        let ports = ports
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, p)| self.port(p, &format!("{field}.ports[{i}]")))
            .collect();
        Rule { peers, ports }
    }
}

/// Validates and reduces a NetworkPolicy. On any error the policy fails closed: the result
/// keeps its (possibly defaulted) pod selector and policy types with no rules, so the pods
/// it selects are default-denied in those directions. An invalid podSelector selects every
/// pod of the namespace; an unknown policyType isolates both directions.
pub fn compile(np: &NetworkPolicy) -> (CompiledPolicy, Vec<PolicyError>) {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let name = np.metadata.name.clone().unwrap_or_default();
    let policy = format!("{namespace}/{name}");
    let mut cx = Ctx {
        policy: &policy,
        errors: Vec::new(),
    };
    let spec = np.spec.clone().unwrap_or_default();
    let pod_selector = match &spec.pod_selector {
        Some(s) => cx.selector(s, "spec.podSelector"),
        None => Selector::default(),
    };
    let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (mut ingress_on, mut egress_on) = (true, has_egress);
    if let Some(types) = &spec.policy_types {
        ingress_on = false;
        egress_on = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => ingress_on = true,
                "Egress" => egress_on = true,
                other => {
                    cx.invalid(
                        format!("spec.policyTypes[{i}]"),
                        &format!("unknown policy type {other:?}"),
                    );
                    ingress_on = true;
                    egress_on = true;
                }
            }
        }
    }
    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let f = format!("spec.ingress[{i}]");
            cx.rule(r.from.as_ref(), r.ports.as_ref(), &f, "from")
        })
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let f = format!("spec.egress[{i}]");
            cx.rule(r.to.as_ref(), r.ports.as_ref(), &f, "to")
        })
        .collect();
    let errors = cx.errors;
    let failed_closed = !errors.is_empty();
    let keep =
        |on: bool, rules: Vec<Rule>| on.then(|| if failed_closed { Vec::new() } else { rules });
    let compiled = CompiledPolicy {
        namespace,
        name,
        pod_selector,
        ingress: keep(ingress_on, ingress),
        egress: keep(egress_on, egress),
        failed_closed,
    };
    (compiled, errors)
}

/// A rule resolved against the current pods and namespaces: the element lists of the
/// named sets a dataplane would render.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedRule {
    /// The rule had no peers: any remote end matches.
    pub any_peer: bool,
    /// Pods matched by the rule's pod/namespace peers.
    pub peer_pods: BTreeSet<PodKey>,
    /// The rule's ipBlock peers (as [`Peer::IpBlock`]).
    pub ip_blocks: Vec<Peer>,
    /// Ports; empty = all.
    pub ports: Vec<PortSpec>,
}

/// A policy resolved against the current pods and namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPolicy {
    /// The validated policy.
    pub policy: CompiledPolicy,
    /// Pods the policy selects (isolates).
    pub selected: BTreeSet<PodKey>,
    /// Resolved ingress rules, if the policy isolates ingress.
    pub ingress: Option<Vec<ResolvedRule>>,
    /// Resolved egress rules, if the policy isolates egress.
    pub egress: Option<Vec<ResolvedRule>>,
}

/// Resolves a compiled policy. `namespaces` must hold labels for every pod namespace.
pub fn resolve(
    policy: CompiledPolicy,
    pods: &BTreeMap<PodKey, PodInfo>,
    namespaces: &BTreeMap<String, Labels>,
) -> ResolvedPolicy {
    let empty = Labels::new();
    let selected = pods
        .values()
        .filter(|p| p.key.namespace == policy.namespace && policy.pod_selector.matches(&p.labels))
        .map(|p| p.key.clone())
        .collect();
    let resolve_rule = |r: &Rule| {
        let mut out = ResolvedRule {
            any_peer: r.peers.is_empty(),
            ports: r.ports.clone(),
            ..ResolvedRule::default()
        };
        for peer in &r.peers {
            match peer {
                Peer::IpBlock { .. } => out.ip_blocks.push(peer.clone()),
                Peer::Pods {
                    namespaces: scope,
                    pods: sel,
                } => {
                    for p in pods.values() {
                        let ns_ok = match scope {
                            NamespaceScope::Own => p.key.namespace == policy.namespace,
                            NamespaceScope::Matching(s) => {
                                s.matches(namespaces.get(&p.key.namespace).unwrap_or(&empty))
                            }
                        };
                        if ns_ok && sel.matches(&p.labels) {
                            out.peer_pods.insert(p.key.clone());
                        }
                    }
                }
            }
        }
        out
    };
    let ingress = policy
        .ingress
        .as_ref()
        .map(|rs| rs.iter().map(resolve_rule).collect());
    let egress = policy
        .egress
        .as_ref()
        .map(|rs| rs.iter().map(resolve_rule).collect());
    ResolvedPolicy {
        policy,
        selected,
        ingress,
        egress,
    }
}
