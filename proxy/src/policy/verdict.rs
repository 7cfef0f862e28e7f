//! The [`PolicySet`]: all resolved policies plus the pods and namespaces they were resolved
//! against, answering allow/deny for one flow, a truth table, and its matrix print-out.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::compile::{compile, resolve, CompiledPolicy, ResolvedPolicy, ResolvedRule};
use super::types::{
    namespace_labels, Labels, PodInfo, PodKey, PolicyError, Protocol, NAMESPACE_NAME_LABEL,
};

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// A pod by namespace/name.
    Pod(PodKey),
    /// An address; if it is a known pod's IP, that pod is meant.
    Ip(IpAddr),
}

/// Direction a policy isolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// An endpoint looked up: the pod, if any, and the addresses to test ipBlocks against.
struct Resolved<'a> {
    pod: Option<&'a PodInfo>,
    ips: Vec<IpAddr>,
}

/// One row of a truth table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Source pod.
    pub src: PodKey,
    /// Destination pod.
    pub dst: PodKey,
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// The verdict.
    pub allowed: bool,
}

/// Compiled and resolved policies over a snapshot of pods and namespaces.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<ResolvedPolicy>,
    pods: BTreeMap<PodKey, PodInfo>,
    by_ip: HashMap<IpAddr, PodKey>,
}

impl PolicySet {
    /// Validates, compiles and resolves `policies` against `pods` and `namespaces`. Invalid
    /// policies are reported and kept failed closed (see [`compile`]). Pods without a name
    /// are ignored; a namespace without a Namespace object has only its name label.
    pub fn build(
        policies: &[NetworkPolicy],
        pods: &[Pod],
        namespaces: &[Namespace],
    ) -> (PolicySet, Vec<PolicyError>) {
        let pods: BTreeMap<PodKey, PodInfo> = pods
            .iter()
            .filter_map(PodInfo::from_pod)
            .map(|p| (p.key.clone(), p))
            .collect();
        let ns: BTreeMap<String, Labels> = namespaces.iter().filter_map(namespace_labels).collect();
        let mut errors = Vec::new();
        let mut compiled = Vec::new();
        for np in policies {
            let (c, errs) = compile(np);
            errors.extend(errs);
            compiled.push(c);
        }
        (PolicySet::from_compiled(&compiled, pods, ns), errors)
    }

    /// Resolves already compiled policies against reduced pods and namespace labels (what
    /// the policy controller's store keeps). A pod namespace without labels gets its name
    /// label only.
    pub fn from_compiled(
        policies: &[CompiledPolicy],
        pods: BTreeMap<PodKey, PodInfo>,
        mut namespaces: BTreeMap<String, Labels>,
    ) -> PolicySet {
        for p in pods.values() {
            namespaces
                .entry(p.key.namespace.clone())
                .or_insert_with(|| {
                    Labels::from([(NAMESPACE_NAME_LABEL.to_string(), p.key.namespace.clone())])
                });
        }
        let resolved = policies
            .iter()
            .map(|c| resolve(c.clone(), &pods, &namespaces))
            .collect();
        let by_ip = pods
            .values()
            .flat_map(|p| p.ips.iter().map(|ip| (*ip, p.key.clone())))
            .collect();
        PolicySet {
            policies: resolved,
            pods,
            by_ip,
        }
    }

    /// The resolved policies, in input order (the input of a dataplane rendering).
    pub fn policies(&self) -> &[ResolvedPolicy] {
        &self.policies
    }

    /// The pods the policies were resolved against, by key.
    pub fn pods(&self) -> &BTreeMap<PodKey, PodInfo> {
        &self.pods
    }

    fn lookup(&self, e: &Endpoint) -> Resolved<'_> {
        let pod = match e {
            Endpoint::Pod(k) => self.pods.get(k),
            Endpoint::Ip(ip) => self.by_ip.get(ip).and_then(|k| self.pods.get(k)),
        };
        let ips = match (e, pod) {
            (Endpoint::Ip(ip), _) => vec![*ip],
            (Endpoint::Pod(_), Some(p)) => p.ips.clone(),
            (Endpoint::Pod(_), None) => Vec::new(),
        };
        Resolved { pod, ips }
    }

    /// True when traffic from `src` to `dst` on destination `port`/`protocol` is allowed:
    /// the source pod's egress AND the destination pod's ingress must allow it; a non-pod
    /// end is not checked. A pod talking to itself is always allowed (it never leaves the
    /// pod's network namespace; upstream's e2e treats loopback the same way).
    pub fn allows(&self, src: &Endpoint, dst: &Endpoint, port: u16, protocol: Protocol) -> bool {
        let (s, d) = (self.lookup(src), self.lookup(dst));
        if let (Some(a), Some(b)) = (s.pod, d.pod) {
            if a.key == b.key {
                return true;
            }
        }
        let egress_ok = s
            .pod
            .is_none_or(|p| self.direction_allows(p, Direction::Egress, &d, d.pod, port, protocol));
        let ingress_ok = d.pod.is_none_or(|p| {
            self.direction_allows(p, Direction::Ingress, &s, Some(p), port, protocol)
        });
        egress_ok && ingress_ok
    }

    /// Whether `subject`'s policies in `dir` allow the flow with `remote` on the other end;
    /// `dst_pod` resolves named ports.
    fn direction_allows(
        &self,
        subject: &PodInfo,
        dir: Direction,
        remote: &Resolved<'_>,
        dst_pod: Option<&PodInfo>,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let mut isolated = false;
        for p in self
            .policies
            .iter()
            .filter(|p| p.selected.contains(&subject.key))
        {
            let rules = match dir {
                Direction::Ingress => &p.ingress,
                Direction::Egress => &p.egress,
            };
            let Some(rules) = rules else { continue };
            isolated = true;
            if rules
                .iter()
                .any(|r| rule_matches(r, remote, dst_pod, port, protocol))
            {
                return true;
            }
        }
        !isolated
    }

    /// Verdicts for every (source, destination, port, protocol) over `pods`.
    pub fn truth_table(
        &self,
        pods: &[PodKey],
        ports: &[u16],
        protocols: &[Protocol],
    ) -> Vec<Probe> {
        let mut out = Vec::new();
        for &protocol in protocols {
            for &port in ports {
                for src in pods {
                    for dst in pods {
                        let allowed = self.allows(
                            &Endpoint::Pod(src.clone()),
                            &Endpoint::Pod(dst.clone()),
                            port,
                            protocol,
                        );
                        out.push(Probe {
                            src: src.clone(),
                            dst: dst.clone(),
                            port,
                            protocol,
                            allowed,
                        });
                    }
                }
            }
        }
        out
    }
}

fn rule_matches(
    r: &ResolvedRule,
    remote: &Resolved<'_>,
    dst_pod: Option<&PodInfo>,
    port: u16,
    protocol: Protocol,
) -> bool {
    let peer_ok = r.any_peer
        || remote.pod.is_some_and(|p| r.peer_pods.contains(&p.key))
        || r.ip_blocks
            .iter()
            .any(|b| remote.ips.iter().any(|ip| b.ip_matches(*ip)));
    peer_ok && (r.ports.is_empty() || r.ports.iter().any(|s| s.matches(dst_pod, port, protocol)))
}

/// Prints the probes for one port/protocol as a matrix the way upstream's netpol e2e tests
/// do: a header row of destinations, one row per source, `.` allowed, `X` denied, `?`
/// missing; tab separated.
pub fn format_matrix(probes: &[Probe], port: u16, protocol: Protocol) -> String {
    let mut keys: Vec<&PodKey> = Vec::new();
    let mut verdicts = HashMap::new();
    for p in probes
        .iter()
        .filter(|p| p.port == port && p.protocol == protocol)
    {
        for k in [&p.src, &p.dst] {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        verdicts.insert((&p.src, &p.dst), p.allowed);
    }
    let mut s = format!("{protocol}/{port}\n-");
    for to in &keys {
        let _ = write!(s, "\t{to}");
    }
    for from in &keys {
        let _ = write!(s, "\n{from}");
        for to in &keys {
            let mark = match verdicts.get(&(*from, *to)) {
                Some(true) => ".",
                Some(false) => "X",
                None => "?",
            };
            let _ = write!(s, "\t{mark}");
        }
    }
    s.push('\n');
    s
}
