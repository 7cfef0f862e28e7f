//! Proxy modes for the netns service tests: what a test needs to run weir-proxy in
//! nftables or eBPF mode and to send traffic the way each mode expects.
//!
//! eBPF mode attaches its cgroup socket hooks to a child cgroup of the test's own (never the
//! host's root cgroup) and pins under a bpffs directory of the test's own. Clients on the
//! node (pods, and host-network processes in the node namespace) run inside that cgroup,
//! the way every process of a real node sits below the root cgroup the hooks are attached
//! to; the external client does not (it is another machine, served by the tc programs).

use crate::{probe, start_proxy_with, HarnessError, Netns};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The dataplane weir-proxy programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--proxy-mode nftables`.
    Nftables,
    /// `--proxy-mode ebpf`.
    Ebpf,
}

static N: AtomicU32 = AtomicU32::new(0);

/// The cgroup v2 mount point (`/sys/fs/cgroup` or, on hybrid hosts, `.../unified`).
pub fn cgroup2_root() -> PathBuf {
    cgroup2_mount().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo; `None` without a cgroup2 mount.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split(' ').next() != Some("cgroup2") {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    })
}

/// A child cgroup of the v2 mount, removed on drop (once its processes have exited).
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    /// Creates `weir-test-<pid>-<n>` under the cgroup v2 mount.
    pub fn new() -> std::io::Result<Cgroup> {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = cgroup2_root().join(format!("weir-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&p)?;
        Ok(Cgroup(p))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// A bpffs directory for a test's pins; links, maps and the directory go on drop.
pub struct BpfDir(pub PathBuf);

impl BpfDir {
    /// `/sys/fs/bpf/weir-test-<pid>-<n>` (weir-proxy creates it).
    pub fn unique() -> BpfDir {
        let n = N.fetch_add(1, Ordering::SeqCst);
        BpfDir(PathBuf::from(format!(
            "/sys/fs/bpf/weir-test-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        let _ = weir_proxy::dataplane::ebpf::kernel::cleanup(&self.0);
    }
}

/// One mode's per-test state. Drop it after the topology (its processes must be gone
/// before the cgroup can be removed).
pub struct Dataplane {
    /// The mode.
    pub mode: Mode,
    /// eBPF mode: the cgroup the socket hooks attach to.
    pub cgroup: Option<Cgroup>,
    /// eBPF mode: the pin directory.
    pub bpf: Option<BpfDir>,
}

impl Dataplane {
    /// The state `mode` needs (a cgroup and a pin directory for eBPF).
    pub fn new(mode: Mode) -> std::io::Result<Dataplane> {
        let (cgroup, bpf) = match mode {
            Mode::Nftables => (None, None),
            Mode::Ebpf => (Some(Cgroup::new()?), Some(BpfDir::unique())),
        };
        Ok(Dataplane { mode, cgroup, bpf })
    }

    /// The weir-proxy flags that select this mode (with the cgroup and pin directory).
    pub fn flags(&self) -> Vec<String> {
        match self.mode {
            Mode::Nftables => vec!["--proxy-mode".into(), "nftables".into()],
            Mode::Ebpf => {
                let mut f: Vec<String> = vec!["--proxy-mode".into(), "ebpf".into()];
                if let Some(c) = &self.cgroup {
                    f.push("--ebpf-cgroup".into());
                    f.push(c.0.display().to_string());
                }
                if let Some(b) = &self.bpf {
                    f.push("--bpffs-dir".into());
                    f.push(b.0.display().to_string());
                }
                f
            }
        }
    }

    /// Starts weir-proxy in `node` in this mode with the manifests in `dir` and `extra`
    /// flags, and waits for its first sync.
    pub fn start_proxy(
        &self,
        node: &mut Netns,
        dir: &Path,
        metrics_port: u16,
        extra: &[&str],
    ) -> Result<u32, HarnessError> {
        let flags = self.flags();
        let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
        all.extend_from_slice(extra);
        start_proxy_with(node, dir, metrics_port, &all)
    }

    /// Runs weir-probe in `ns`, a namespace on the node (a pod or the node itself): in
    /// eBPF mode inside the test's cgroup, so the socket hooks see it.
    pub fn probe(&self, ns: &Netns, args: &[&str]) -> Result<serde_json::Value, HarnessError> {
        match &self.cgroup {
            Some(cgroup) => probe_in_cgroup(ns, cgroup, args),
            None => probe(ns, args),
        }
    }
}

/// Runs weir-probe in `ns` as a member of `cgroup` (entered with `nsenter --net`, so the
/// host's mounts stay visible) and returns its JSON report.
pub fn probe_in_cgroup(
    ns: &Netns,
    cgroup: &Cgroup,
    args: &[&str],
) -> Result<serde_json::Value, HarnessError> {
    let bin = crate::workspace_bin("weir-probe");
    let bin = bin.to_string_lossy();
    let procs = cgroup.0.join("cgroup.procs");
    let script = format!("echo $$ > {} && exec \"$@\"", procs.display());
    let netns = format!("--net=/run/netns/{}", ns.name());
    let mut cmd = vec!["-c", &script, "sh", "nsenter", &netns, &bin];
    cmd.extend_from_slice(args);
    let out = crate::run("sh", &cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("{}");
    serde_json::from_str(last).map_err(|e| HarnessError::Command {
        cmd: cmd.join(" "),
        msg: format!("bad report {last:?}: {e}"),
    })
}

/// Generates a module named after `$scenario` with two tests, `nftables` and `ebpf`, each
/// calling the scenario function `$scenario(Mode)` of the enclosing module.
#[macro_export]
macro_rules! in_both_modes {
    ($($scenario:ident),+ $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn nftables() {
                    super::$scenario($crate::mode::Mode::Nftables)
                }
                #[test]
                fn ebpf() {
                    super::$scenario($crate::mode::Mode::Ebpf)
                }
            }
        )+
    };
}
