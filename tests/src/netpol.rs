//! The upstream NetworkPolicy e2e model with real packets: one node namespace running
//! weir-proxy, namespaces x, y, z with pods a, b, c each (nine pod network namespaces
//! attached by the real weir-cni, run inside the node namespace), every pod serving TCP and
//! UDP on ports 80 and 81 (weir-echo). Pod, Namespace and NetworkPolicy objects go to
//! weir-proxy's manifest directory; the CNI state directory is handed to it with
//! `--cni-state-dir`, so all nine pods are its local pods.
//!
//! A scenario writes its policies, waits for a policy sync, and compares an
//! [`Expectation`] written by hand (a [`Reachability`] per port and protocol, built the way
//! upstream's tests build theirs) first with weir's own model ([`PolicySet`]) and then with
//! the matrix probed by real packets (every pair × {80, 81} × {TCP, UDP}, all at once, one
//! `weir-probe matrix` per source pod). A mismatch prints the expected, observed and
//! comparison matrices in upstream's layout (rows from, columns to, `.` allowed, `X`
//! blocked; in the comparison `X` marks a mismatch). Every namespace goes when the
//! [`PolicyCluster`] is dropped, also on panic.

use crate::cnitool::{Attachment, CniRuntime};
use crate::{
    cni_path, metric, start_echo_ports, start_proxy_with, workspace_bin, write_file_atomically,
    write_manifests, HarnessError, Netns,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use weir_proxy::policy::{format_matrix, PodKey, PolicyError, PolicySet, Probe, Protocol};

type Result<T> = std::result::Result<T, HarnessError>;

/// The namespaces of the model, labelled `ns=<name>`.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The pods of every namespace, labelled `pod=<name>`.
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// The ports every pod serves (TCP and UDP).
pub const PORTS: [u16; 2] = [80, 81];
/// The protocols probed (this kernel has no SCTP sockets; SCTP ports are only declared).
pub const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
/// The node's pod CIDR (weir-cni's conflist).
pub const POD_CIDR: &str = "10.244.1.0/24";
/// How long one probe waits for an answer before it counts as blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// The gauge weir-proxy sets after each successful policy sync (unix seconds).
pub const POLICY_SYNC_METRIC: &str = "weir_policy_sync_last_timestamp_seconds";

/// One column of the matrices: a destination port and protocol.
pub type Case = (u16, Protocol);

/// Every probed (port, protocol), in print order.
pub fn cases() -> Vec<Case> {
    PROTOCOLS
        .iter()
        .flat_map(|p| PORTS.iter().map(move |port| (*port, *p)))
        .collect()
}

/// The nine pods, x/a first.
pub fn all_pods() -> Vec<PodKey> {
    NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |p| PodKey::new(*ns, *p)))
        .collect()
}

/// `"x/a"` -> the key (panics on a malformed name: test input).
fn key(pod: &str) -> PodKey {
    let (ns, name) = pod
        .split_once('/')
        .unwrap_or_else(|| panic!("pod {pod:?} is not NAMESPACE/NAME"));
    PodKey::new(ns, name)
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// A set of pods as upstream's `Peer`: a namespace, a pod name, both, or neither (every
/// pod).
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer<'a> {
    /// Only this namespace (`None`: all).
    pub namespace: Option<&'a str>,
    /// Only pods with this name (`None`: all).
    pub pod: Option<&'a str>,
}

impl<'a> Peer<'a> {
    /// Every pod.
    pub fn any() -> Peer<'a> {
        Peer::default()
    }

    /// Every pod of namespace `ns`.
    pub fn ns(ns: &'a str) -> Peer<'a> {
        Peer {
            namespace: Some(ns),
            pod: None,
        }
    }

    /// The pods named `name` in every namespace.
    pub fn named(name: &'a str) -> Peer<'a> {
        Peer {
            namespace: None,
            pod: Some(name),
        }
    }

    /// The one pod `"x/a"`.
    pub fn pod(name: &'a str) -> Peer<'a> {
        let (ns, pod) = name
            .split_once('/')
            .unwrap_or_else(|| panic!("pod {name:?} is not NAMESPACE/NAME"));
        Peer {
            namespace: Some(ns),
            pod: Some(pod),
        }
    }

    fn matches(&self, k: &PodKey) -> bool {
        self.namespace.is_none_or(|n| n == k.namespace) && self.pod.is_none_or(|p| p == k.name)
    }
}

/// Which pod may reach which, for one port and protocol (upstream's `Reachability`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    verdicts: BTreeMap<(PodKey, PodKey), bool>,
}

impl Reachability {
    /// Every pair set to `allowed`.
    pub fn new(allowed: bool) -> Reachability {
        let pods = all_pods();
        let verdicts = pods
            .iter()
            .flat_map(|f| pods.iter().map(move |t| ((f.clone(), t.clone()), allowed)))
            .collect();
        Reachability { verdicts }
    }

    /// `from` (`"x/a"`) to `to`.
    pub fn expect(&mut self, from: &str, to: &str, allowed: bool) -> &mut Self {
        self.verdicts.insert((key(from), key(to)), allowed);
        self
    }

    /// Every pod of `from` to every pod of `to`.
    pub fn expect_peer(&mut self, from: Peer<'_>, to: Peer<'_>, allowed: bool) -> &mut Self {
        for ((f, t), v) in self.verdicts.iter_mut() {
            if from.matches(f) && to.matches(t) {
                *v = allowed;
            }
        }
        self
    }

    /// Every pod to `pod`.
    pub fn expect_all_ingress(&mut self, pod: &str, allowed: bool) -> &mut Self {
        self.expect_peer(Peer::any(), Peer::pod(pod), allowed)
    }

    /// `pod` to every pod.
    pub fn expect_all_egress(&mut self, pod: &str, allowed: bool) -> &mut Self {
        self.expect_peer(Peer::pod(pod), Peer::any(), allowed)
    }

    /// A pod always reaches itself (its own address never leaves its network namespace;
    /// weir's model says the same).
    pub fn allow_loopback(&mut self) -> &mut Self {
        for ((f, t), v) in self.verdicts.iter_mut() {
            if f == t {
                *v = true;
            }
        }
        self
    }

    /// The verdict for `from` to `to`.
    pub fn get(&self, from: &PodKey, to: &PodKey) -> Option<bool> {
        self.verdicts.get(&(from.clone(), to.clone())).copied()
    }

    fn set(&mut self, from: PodKey, to: PodKey, allowed: bool) {
        self.verdicts.insert((from, to), allowed);
    }

    fn probes(&self, (port, protocol): Case) -> Vec<Probe> {
        self.verdicts
            .iter()
            .map(|((src, dst), allowed)| Probe {
                src: src.clone(),
                dst: dst.clone(),
                port,
                protocol,
                allowed: *allowed,
            })
            .collect()
    }
}

/// A [`Reachability`] per probed port and protocol (upstream's test cases of a scenario).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    cases: BTreeMap<Case, Reachability>,
}

impl Expectation {
    /// `f(port, protocol)` for every case, loopback allowed afterwards.
    pub fn each(f: impl Fn(u16, Protocol) -> Reachability) -> Expectation {
        let cases = cases()
            .into_iter()
            .map(|(port, proto)| {
                let mut r = f(port, proto);
                r.allow_loopback();
                ((port, proto), r)
            })
            .collect();
        Expectation { cases }
    }

    /// The same reachability for every case.
    pub fn same(r: &Reachability) -> Expectation {
        Expectation::each(|_, _| r.clone())
    }

    /// Every pair allowed on every case.
    pub fn all_allowed() -> Expectation {
        Expectation::same(&Reachability::new(true))
    }

    /// The reachability of one case.
    pub fn case(&self, port: u16, protocol: Protocol) -> Option<&Reachability> {
        self.cases.get(&(port, protocol))
    }

    /// What weir's policy model answers for every probed pair.
    pub fn from_model(set: &PolicySet) -> Expectation {
        let mut cases: BTreeMap<Case, Reachability> = BTreeMap::new();
        for p in set.truth_table(&all_pods(), &PORTS, &PROTOCOLS) {
            cases
                .entry((p.port, p.protocol))
                .or_insert_with(|| Reachability::new(false))
                .set(p.src, p.dst, p.allowed);
        }
        Expectation { cases }
    }

    /// The matrices of every case where `observed` differs from `self` (upstream's
    /// "expected", "observed" and "comparison" print-out), or `None` when they agree.
    pub fn diff(&self, observed: &Expectation, observed_name: &str) -> Option<String> {
        let mut out = String::new();
        for (case, want) in &self.cases {
            let Some(got) = observed.cases.get(case) else {
                let _ = writeln!(out, "{}/{}: not {observed_name}", case.1, case.0);
                continue;
            };
            if want == got {
                continue;
            }
            let comparison: Vec<Probe> = want
                .probes(*case)
                .into_iter()
                .map(|mut p| {
                    p.allowed = got.get(&p.src, &p.dst) == Some(p.allowed);
                    p
                })
                .collect();
            let _ = write!(
                out,
                "\nexpected:\n{}\n{observed_name}:\n{}\ncomparison (. as expected, X mismatch):\n{}",
                format_matrix(&want.probes(*case), case.0, case.1),
                format_matrix(&got.probes(*case), case.0, case.1),
                format_matrix(&comparison, case.0, case.1),
            );
        }
        (!out.is_empty()).then_some(out)
    }
}

/// A pod of the model.
pub struct NetpolPod {
    /// Namespace and name.
    pub key: PodKey,
    /// The address weir-cni gave it.
    pub ip: String,
    /// Its network namespace.
    pub ns: Netns,
    /// Its CNI attachment (for an orderly DEL).
    pub attachment: Attachment,
}

/// One answer of `weir-probe matrix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// `PROTO:ADDR:PORT`.
    pub target: String,
    /// The name the server answered with, or the error kind (`timeout`, `refused`, ...).
    pub outcome: std::result::Result<String, String>,
}

/// A TCP connection kept open by `weir-probe hold` (a line every 100 ms).
pub struct HeldConnection {
    stdout: BufReader<ChildStdout>,
}

impl HeldConnection {
    /// Waits for the hold to end and returns its report: `answers` per server name and
    /// `errors` per kind.
    pub fn finish(mut self) -> Result<Value> {
        let mut last = String::new();
        let mut line = String::new();
        while self
            .stdout
            .read_line(&mut line)
            .map_err(|e| cmd_err("weir-probe hold", e))?
            > 0
        {
            if !line.trim().is_empty() {
                last = line.trim().to_owned();
            }
            line.clear();
        }
        serde_json::from_str(&last)
            .map_err(|e| cmd_err("weir-probe hold", format!("bad report {last:?}: {e}")))
    }
}

fn cmd_err(cmd: &str, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Command {
        cmd: cmd.to_owned(),
        msg: e.to_string(),
    }
}

/// Whether this weir-proxy binary has the policy controller (`--cni-state-dir`).
pub fn proxy_enforces_policy() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new(workspace_bin("weir-proxy"))
            .arg("--help")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--cni-state-dir"))
            .unwrap_or(false)
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Waits for a sync stamped (by `last`) after `written`, then until no further sync comes
/// for [`SETTLE`]: the first sync after a write may come from a directory scan that began
/// before it, and then the next scan brings the change within a debounce period.
fn wait_settled(what: &str, written: f64, last: impl Fn() -> Option<f64>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen: Option<(f64, Instant)> = None;
    loop {
        let now = Instant::now();
        match (last().filter(|t| *t > written), seen) {
            (Some(t), Some((s, since))) if t == s => {
                if now.duration_since(since) >= SETTLE {
                    return Ok(());
                }
            }
            (Some(t), _) => seen = Some((t, now)),
            (None, _) => {}
        }
        if now >= deadline {
            return Err(HarnessError::Timeout(what.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long no new sync must come before a written change counts as applied.
pub const SETTLE: Duration = Duration::from_millis(400);

/// The YAML documents of `text` (separated by `---` lines) of kind `kind`, typed.
fn documents<T: serde::de::DeserializeOwned>(text: &str, kind: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut doc = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() != "---" {
            doc.push_str(line);
            doc.push('\n');
            continue;
        }
        if !doc.trim().is_empty() {
            let v: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(&doc).map_err(|e| cmd_err("parsing YAML", e))?;
            if v.get("kind").and_then(|k| k.as_str()) == Some(kind) {
                out.push(
                    serde_yaml_ng::from_value(v)
                        .map_err(|e| cmd_err(&format!("parsing a {kind}"), e))?,
                );
            }
        }
        doc.clear();
    }
    Ok(out)
}

/// One step of a scenario: the NetworkPolicies to write (replacing the previous step's;
/// empty deletes them all), what they must allow, and the policy errors weir's model must
/// report for them (substrings of the messages, one per expected error).
#[derive(Debug, Clone)]
pub struct Step {
    /// NetworkPolicy documents.
    pub policies: String,
    /// The expected matrices.
    pub expected: Expectation,
    /// One substring per expected [`PolicyError`] message.
    pub errors: Vec<&'static str>,
}

impl Step {
    /// A step whose policies are all valid.
    pub fn new(policies: impl Into<String>, expected: Expectation) -> Step {
        Step {
            policies: policies.into(),
            expected,
            errors: Vec::new(),
        }
    }

    /// Checks the step against weir's model over `ips`: the expectation and the errors.
    pub fn check_model(&self, ips: &PodIps) -> std::result::Result<(), String> {
        let (_, errors) = model(ips, &self.policies).map_err(|e| e.to_string())?;
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let all_found = self
            .errors
            .iter()
            .all(|want| messages.iter().any(|m| m.contains(want)));
        if messages.len() != self.errors.len() || !all_found {
            return Err(format!(
                "policy errors {messages:?}, expected one each of {:?}, for\n{}",
                self.errors, self.policies
            ));
        }
        check_model(ips, &self.policies, &self.expected)
    }
}

/// Pod addresses, by pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIps(pub BTreeMap<PodKey, String>);

impl PodIps {
    /// Made-up addresses in [`POD_CIDR`] (x/a 10.244.1.10, x/b .11, ...), to check
    /// expectations against weir's model without a cluster.
    pub fn fake() -> PodIps {
        PodIps(
            all_pods()
                .into_iter()
                .enumerate()
                .map(|(i, k)| (k, format!("10.244.1.{}", 10 + i)))
                .collect(),
        )
    }

    /// `"x/a"`'s address.
    pub fn ip(&self, pod: &str) -> &str {
        self.0
            .get(&key(pod))
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no pod {pod}"))
    }
}

/// The Namespace objects: x, y, z labelled `ns=<name>`.
pub fn namespaces_yaml() -> String {
    NAMESPACES
        .iter()
        .map(|ns| {
            format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
            )
        })
        .collect()
}

/// The Pod objects: labels `pod=<name>`, container ports named `serve-<port>-<proto>` for
/// 80 and 81 over TCP, UDP and SCTP, `status.podIP(s)` from `ips`, on node1.
pub fn pods_yaml(ips: &PodIps) -> String {
    let mut out = String::new();
    for (k, ip) in &ips.0 {
        let mut ports = String::new();
        for port in PORTS {
            for proto in Protocol::ALL {
                let _ = write!(
                    ports,
                    "\n    - {{name: serve-{port}-{}, containerPort: {port}, protocol: {proto}}}",
                    protocol_name(proto)
                );
            }
        }
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: cont-80-81\n    image: weir-echo\n    ports:{ports}\nstatus:\n  phase: Running\n  podIP: \"{ip}\"\n  podIPs: [{{ip: \"{ip}\"}}]\n",
            name = k.name,
            ns = k.namespace,
            node = crate::NODE_NAME,
        );
    }
    out
}

/// weir's model (the resolved set and the policy errors) of `policies` over the nine pods
/// at `ips` and the three namespaces.
pub fn model(ips: &PodIps, policies: &str) -> Result<(PolicySet, Vec<PolicyError>)> {
    let pods: Vec<Pod> = documents(&pods_yaml(ips), "Pod")?;
    let namespaces: Vec<Namespace> = documents(&namespaces_yaml(), "Namespace")?;
    let policies: Vec<NetworkPolicy> = documents(policies, "NetworkPolicy")?;
    Ok(PolicySet::build(&policies, &pods, &namespaces))
}

/// `Err` with the print-out when `expected` disagrees with weir's model of `policies`
/// (a wrong hand-written expectation, or a model bug).
pub fn check_model(
    ips: &PodIps,
    policies: &str,
    expected: &Expectation,
) -> std::result::Result<(), String> {
    let (set, _) = model(ips, policies).map_err(|e| e.to_string())?;
    match expected.diff(&Expectation::from_model(&set), "weir's model") {
        None => Ok(()),
        Some(d) => Err(format!(
            "the hand-written expectation disagrees with weir's policy model for\n{policies}\n{d}"
        )),
    }
}

/// The node, its nine pods, weir-proxy and the manifests it reads.
pub struct PolicyCluster {
    /// The pods, x/a, x/b, ..., z/c (dropped first).
    pub pods: Vec<NetpolPod>,
    /// The node (weir-proxy runs here; dropping it kills the proxy).
    pub node: Netns,
    /// weir-proxy's metrics port inside the node.
    pub metrics_port: u16,
    cni: CniRuntime,
    policies: String,
    manifests: tempfile::TempDir,
    cni_state: tempfile::TempDir,
    _cni_cache: tempfile::TempDir,
}

impl PolicyCluster {
    /// Builds the node and the nine pods, starts weir-echo in each and weir-proxy on the
    /// node (metrics on 127.0.0.1:`metrics_port` there), and waits for its first sync (and
    /// first policy sync when it enforces policy).
    pub fn new(metrics_port: u16) -> Result<PolicyCluster> {
        for bin in ["weir-cni", "weir-proxy", "weir-echo", "weir-probe"] {
            let p = workspace_bin(bin);
            if !p.exists() {
                return Err(cmd_err(
                    &p.display().to_string(),
                    "missing: cargo build --workspace --bins (cargo xtask test does)",
                ));
            }
        }
        let node = Netns::new("npnode")?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            node.sysctl(k, v)?;
        }
        let tmp = |what: &str| tempfile::tempdir().map_err(|e| cmd_err(what, e));
        let cni_state = tmp("CNI state directory")?;
        let cni_cache = tmp("CNI cache directory")?;
        let manifests = tmp("manifest directory")?;
        let conflist = json!({
            "cniVersion": "1.1.0",
            "name": "weir",
            "plugins": [{
                "type": "weir-cni",
                "podCIDRs": [POD_CIDR],
                "mtu": 1500,
                "stateDir": cni_state.path(),
            }],
        });
        let cni = CniRuntime::new(conflist, &cni_path(), cni_cache.path())
            .map_err(|e| cmd_err("CNI runtime", e))?
            .in_netns(node.name());
        let mut cluster = PolicyCluster {
            pods: Vec::new(),
            node,
            metrics_port,
            cni,
            policies: String::new(),
            manifests,
            cni_state,
            _cni_cache: cni_cache,
        };
        for k in all_pods() {
            cluster.attach(k)?;
        }
        let echo = workspace_bin("weir-echo");
        for pod in &mut cluster.pods {
            start_echo_ports(&mut pod.ns, &echo, &pod.key.to_string(), &PORTS, &PORTS)?;
        }
        cluster.start_proxy()?;
        Ok(cluster)
    }

    fn attach(&mut self, k: PodKey) -> Result<()> {
        let ns = Netns::new(&format!("np{}{}", k.namespace, k.name))?;
        let id = format!("{}-{}", k.namespace, k.name);
        let attachment = Attachment::new(&id, &format!("/run/netns/{}", ns.name()), "eth0")
            .arg("K8S_POD_NAMESPACE", &k.namespace)
            .arg("K8S_POD_NAME", &k.name);
        let result = self
            .cni
            .add(&attachment)
            .map_err(|e| cmd_err(&format!("CNI ADD {k}"), e))?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .ok_or_else(|| cmd_err(&format!("CNI ADD {k}"), format!("no IP in {result}")))?
            .to_owned();
        self.pods.push(NetpolPod {
            key: k,
            ip,
            ns,
            attachment,
        });
        Ok(())
    }

    fn start_proxy(&mut self) -> Result<()> {
        let dir = self.manifests.path().to_owned();
        write_manifests(&dir, "").map_err(|e| cmd_err("writing manifests", e))?;
        write_file_atomically(&dir, "namespaces.yaml", &namespaces_yaml())
            .and_then(|()| write_file_atomically(&dir, "pods.yaml", &pods_yaml(&self.ips())))
            .map_err(|e| cmd_err("writing manifests", e))?;
        let state = self.cni_state.path().to_string_lossy().into_owned();
        let extra: Vec<&str> = if proxy_enforces_policy() {
            vec!["--cni-state-dir", &state]
        } else {
            Vec::new()
        };
        start_proxy_with(&mut self.node, &dir, self.metrics_port, &extra)?;
        if proxy_enforces_policy() {
            self.wait_policy_synced(0.0)?;
        }
        Ok(())
    }

    /// The pod `"x/a"`.
    pub fn pod(&self, name: &str) -> &NetpolPod {
        let k = key(name);
        self.pods
            .iter()
            .find(|p| p.key == k)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// `"x/a"`'s address.
    pub fn ip(&self, name: &str) -> &str {
        &self.pod(name).ip
    }

    /// weir-proxy's manifest directory.
    pub fn manifest_dir(&self) -> &std::path::Path {
        self.manifests.path()
    }

    /// The pods' addresses.
    pub fn ips(&self) -> PodIps {
        PodIps(
            self.pods
                .iter()
                .map(|p| (p.key.clone(), p.ip.clone()))
                .collect(),
        )
    }

    /// The NetworkPolicies currently written.
    pub fn policies(&self) -> &str {
        &self.policies
    }

    /// weir's model over the pods, namespaces and policies written: the resolved set and
    /// the policy errors (rejected fields; those policies fail closed).
    pub fn model(&self) -> Result<(PolicySet, Vec<PolicyError>)> {
        model(&self.ips(), &self.policies)
    }

    /// The last policy sync's time, if weir-proxy reported one.
    pub fn last_policy_sync(&self) -> Option<f64> {
        metric(&self.node, self.metrics_port, POLICY_SYNC_METRIC)
    }

    /// Waits until weir-proxy reports a policy sync later than `after` (unix seconds).
    pub fn wait_policy_synced(&self, after: f64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.last_policy_sync().is_some_and(|t| t > after) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout(format!(
                    "a policy sync after {after} ({POLICY_SYNC_METRIC} on /metrics)"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes `policies.yaml` (NetworkPolicy documents; empty removes the file, i.e. deletes
    /// every policy) and waits for the policy sync that read it. Returns the errors weir's
    /// model reports for them.
    pub fn set_policies(&mut self, yaml: &str) -> Result<Vec<PolicyError>> {
        if !proxy_enforces_policy() {
            return Err(cmd_err(
                &workspace_bin("weir-proxy").display().to_string(),
                "this weir-proxy has no policy controller (no --cni-state-dir flag)",
            ));
        }
        self.policies = yaml.to_owned();
        let dir = self.manifests.path();
        let written = unix_now();
        if yaml.trim().is_empty() {
            match std::fs::remove_file(dir.join("policies.yaml")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(cmd_err("removing policies.yaml", e))
                }
                _ => {}
            }
        } else {
            write_file_atomically(dir, "policies.yaml", yaml)
                .map_err(|e| cmd_err("writing policies.yaml", e))?;
        }
        wait_settled("weir-proxy's policy sync of policies.yaml", written, || {
            self.last_policy_sync()
        })?;
        Ok(self.model()?.1)
    }

    /// Writes `services.yaml` (Services and EndpointSlices) and waits for the proxy sync.
    pub fn set_services(&self, yaml: &str) -> Result<()> {
        let written = unix_now();
        write_file_atomically(self.manifests.path(), "services.yaml", yaml)
            .map_err(|e| cmd_err("writing services.yaml", e))?;
        wait_settled("weir-proxy's sync of services.yaml", written, || {
            crate::last_sync(&self.node, self.metrics_port)
        })
    }

    fn spawn_matrix(pod: &NetpolPod, targets: &[String]) -> Result<std::process::Child> {
        let probe = workspace_bin("weir-probe");
        Command::new("ip")
            .args(["netns", "exec", pod.ns.name()])
            .arg(probe)
            .arg("matrix")
            .arg(PROBE_TIMEOUT.as_millis().to_string())
            .args(targets)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| cmd_err("weir-probe matrix", e))
    }

    fn collect_matrix(child: std::process::Child) -> Result<Vec<ProbeResult>> {
        let out = child
            .wait_with_output()
            .map_err(|e| cmd_err("weir-probe matrix", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(cmd_err(
                "weir-probe matrix",
                format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
            ));
        }
        let list: Value = serde_json::from_str(text.trim())
            .map_err(|e| cmd_err("weir-probe matrix", format!("bad report {text:?}: {e}")))?;
        let results = list
            .as_array()
            .ok_or_else(|| cmd_err("weir-probe matrix", format!("not a list: {list}")))?
            .iter()
            .map(|r| ProbeResult {
                target: r["target"].as_str().unwrap_or_default().to_owned(),
                outcome: if r["ok"].as_bool() == Some(true) {
                    Ok(r["answer"].as_str().unwrap_or_default().to_owned())
                } else {
                    Err(r["error"].as_str().unwrap_or("unknown").to_owned())
                },
            })
            .collect();
        Ok(results)
    }

    /// Probes `targets` (`(protocol, address)`) from pod `from`, all at once.
    pub fn probe_from(
        &self,
        from: &str,
        targets: &[(Protocol, SocketAddr)],
    ) -> Result<Vec<ProbeResult>> {
        let targets: Vec<String> = targets
            .iter()
            .map(|(p, a)| format!("{}:{a}", protocol_name(*p)))
            .collect();
        Self::collect_matrix(Self::spawn_matrix(self.pod(from), &targets)?)
    }

    /// Probes every pair on every case, all sources at once. A pair is allowed when the
    /// destination pod itself answered.
    pub fn probe_matrix(&self) -> Result<Expectation> {
        let mut targets = Vec::new();
        let mut meta = Vec::new();
        for (port, proto) in cases() {
            for dst in &self.pods {
                targets.push(format!("{}:{}:{port}", protocol_name(proto), dst.ip));
                meta.push(((port, proto), dst.key.clone()));
            }
        }
        let children: Vec<_> = self
            .pods
            .iter()
            .map(|p| Self::spawn_matrix(p, &targets).map(|c| (p.key.clone(), c)))
            .collect::<Result<_>>()?;
        let mut cases: BTreeMap<Case, Reachability> = BTreeMap::new();
        for (src, child) in children {
            let results = Self::collect_matrix(child)?;
            if results.len() != meta.len() {
                return Err(cmd_err(
                    "weir-probe matrix",
                    format!("{} answers for {} targets", results.len(), meta.len()),
                ));
            }
            for ((case, dst), r) in meta.iter().zip(results) {
                let allowed = r.outcome.as_deref() == Ok(dst.to_string().as_str());
                cases
                    .entry(*case)
                    .or_insert_with(|| Reachability::new(false))
                    .set(src.clone(), dst.clone(), allowed);
            }
        }
        Ok(Expectation { cases })
    }

    /// Probes the matrix and compares it with `expected`; on a mismatch waits a second and
    /// probes again (a policy may still be settling). `Err` holds the print-out.
    pub fn compare_probed(&self, expected: &Expectation) -> std::result::Result<(), String> {
        let mut report = String::new();
        for attempt in 1..=2 {
            let observed = self.probe_matrix().map_err(|e| e.to_string())?;
            match expected.diff(&observed, "observed") {
                None => return Ok(()),
                Some(d) => {
                    report = format!("probe attempt {attempt} disagrees with the expectation:{d}");
                    eprintln!("{report}");
                }
            }
            if attempt == 1 {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Err(report)
    }

    /// A scenario's check: the hand-written expectation must agree with weir's model of
    /// the written policies (so a wrong expectation is caught), then with real packets.
    pub fn check(&self, expected: &Expectation) -> std::result::Result<(), String> {
        check_model(&self.ips(), &self.policies, expected)?;
        self.compare_probed(expected)
            .map_err(|e| format!("policies:\n{}\n{e}", self.policies))
    }

    /// Runs one step: checks it against weir's model, writes its policies, waits for the
    /// policy sync, and compares the probed matrix with its expectation.
    pub fn run_step(&mut self, step: &Step) -> std::result::Result<(), String> {
        step.check_model(&self.ips())?;
        self.set_policies(&step.policies)
            .map_err(|e| e.to_string())?;
        self.compare_probed(&step.expected)
            .map_err(|e| format!("policies:\n{}\n{e}", step.policies))
    }

    /// Starts `weir-probe hold` from pod `from` to `to` (TCP) for `millis` and waits until
    /// it is connected.
    pub fn hold(&mut self, from: &str, to: SocketAddr, millis: u64) -> Result<HeldConnection> {
        let k = key(from);
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.key == k)
            .ok_or_else(|| cmd_err("hold", format!("no pod {from}")))?;
        let probe = workspace_bin("weir-probe").to_string_lossy().into_owned();
        let child = pod.ns.spawn(
            &[&probe, "hold", &to.to_string(), &millis.to_string()],
            Stdio::piped(),
        )?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| cmd_err("weir-probe hold", "no stdout"))?;
        let mut stdout = BufReader::new(out);
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| cmd_err("weir-probe hold", e))?;
        if line.trim() != "connected" {
            return Err(cmd_err("weir-probe hold", format!("said {line:?}")));
        }
        Ok(HeldConnection { stdout })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn peers_select_like_upstreams_reachability() {
        let mut r = Reachability::new(true);
        r.expect_peer(Peer::named("b"), Peer::ns("y"), false)
            .expect_all_egress("z/c", false)
            .allow_loopback();
        let k = |s: &str| key(s);
        assert_eq!(r.get(&k("x/b"), &k("y/a")), Some(false));
        assert_eq!(r.get(&k("z/b"), &k("y/c")), Some(false));
        assert_eq!(r.get(&k("x/a"), &k("y/a")), Some(true));
        assert_eq!(r.get(&k("y/b"), &k("y/b")), Some(true), "loopback");
        assert_eq!(r.get(&k("z/c"), &k("x/a")), Some(false));
        assert_eq!(r.get(&k("z/c"), &k("z/c")), Some(true), "loopback");
    }

    #[test]
    fn a_mismatch_prints_expected_observed_and_comparison_matrices() {
        let want = Expectation::all_allowed();
        let mut got = want.clone();
        got.cases
            .get_mut(&(81, Protocol::Udp))
            .unwrap()
            .expect("x/a", "z/c", false);
        assert_eq!(want.diff(&want, "observed"), None);
        let d = want.diff(&got, "observed").unwrap();
        assert_eq!(d.matches("UDP/81\n").count(), 3, "{d}");
        assert!(!d.contains("TCP/80"), "only the differing case: {d}");
        // The comparison row of x/a marks the one mismatch, in z/c's column.
        let comparison = d.split("comparison").nth(1).unwrap();
        let row = comparison.lines().find(|l| l.starts_with("x/a")).unwrap();
        assert_eq!(row, "x/a\t.\t.\t.\t.\t.\t.\t.\t.\tX");
    }

    #[test]
    fn the_model_sees_the_written_pods_namespaces_and_policies() {
        let ips = PodIps::fake();
        let deny = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    ports: [{port: serve-81-udp, protocol: UDP}]\n";
        let (set, errors) = model(&ips, deny).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let m = Expectation::from_model(&set);
        let ok = m.case(81, Protocol::Udp).unwrap();
        assert_eq!(ok.get(&key("y/c"), &key("x/b")), Some(true));
        assert_eq!(ok.get(&key("z/c"), &key("x/b")), Some(false));
        let tcp = m.case(81, Protocol::Tcp).unwrap();
        assert_eq!(tcp.get(&key("y/c"), &key("x/b")), Some(false));
    }
}
