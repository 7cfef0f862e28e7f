//! The one Kubernetes release the test tiers run, built from the Go module proxy and cached.
//!
//! `tests/cluster/k8s/go.mod` pins `k8s.io/kubernetes` (every staging module replaced by its
//! v0.x of the same release) and the etcd that release pins itself; `tests/cluster/containerd`
//! pins containerd 2.x. From them [`ensure_built`] builds, with the machine's Go and
//! `CGO_ENABLED=0` (static, so the same files go into images):
//! kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, kube-proxy,
//! agnhost, regression-issue-74839 (an e2e image's program), the ginkgo CLI, e2e.test
//! (`go test -c k8s.io/kubernetes/test/e2e`), etcd, containerd,
//! containerd-shim-runc-v2, ctr, the pause container's program (the release's
//! `build/pause/linux/pause.c`, compiled static with gcc) and CoreDNS
//! (`tests/cluster/coredns`). runc is Debian's.
//!
//! The result lives in `/var/cache/weir/k8s/<release>` (`$WEIR_K8S_CACHE` overrides the
//! root); it is usable once its `complete` marker holds the fingerprint of the pins (both
//! go.mod and go.sum files and this recipe's revision), so it is rebuilt only when a pin
//! changes. A build goes to a scratch directory beside it and is renamed into place.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const K8S_GO_MOD: &str = include_str!("../cluster/k8s/go.mod");
const K8S_GO_SUM: &str = include_str!("../cluster/k8s/go.sum");
const CONTAINERD_GO_MOD: &str = include_str!("../cluster/containerd/go.mod");
const CONTAINERD_GO_SUM: &str = include_str!("../cluster/containerd/go.sum");
const COREDNS_GO_MOD: &str = include_str!("../cluster/coredns/go.mod");
const COREDNS_GO_SUM: &str = include_str!("../cluster/coredns/go.sum");
/// Bumped whenever the recipe changes what ends up in the cache.
const RECIPE_REVISION: u32 = 2;
/// The marker written last, holding [`fingerprint`].
const COMPLETE_MARKER: &str = "complete";

/// The pinned release, e.g. `v1.37.2` (the `k8s.io/kubernetes` requirement of the pin).
pub fn release() -> &'static str {
    required_version(K8S_GO_MOD, "k8s.io/kubernetes").unwrap_or("unknown")
}

/// The etcd version pinned beside it.
pub fn etcd_version() -> &'static str {
    required_version(K8S_GO_MOD, "go.etcd.io/etcd/server/v3").unwrap_or("unknown")
}

/// The containerd version pinned.
pub fn containerd_version() -> &'static str {
    required_version(CONTAINERD_GO_MOD, "github.com/containerd/containerd/v2").unwrap_or("unknown")
}

/// The version `module` is required at in a go.mod text (`require m v` or in a block).
fn required_version<'a>(go_mod: &'a str, module: &str) -> Option<&'a str> {
    go_mod.lines().find_map(|line| {
        let line = line.trim();
        let line = line.strip_prefix("require ").unwrap_or(line);
        let mut words = line.split_whitespace();
        (words.next() == Some(module))
            .then(|| words.next())
            .flatten()
    })
}

/// What the cache must have been built from: a hash of both pins and the recipe revision.
pub fn fingerprint() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |s: &str| {
        for b in s.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(&RECIPE_REVISION.to_string());
    for text in [
        K8S_GO_MOD,
        K8S_GO_SUM,
        CONTAINERD_GO_MOD,
        CONTAINERD_GO_SUM,
        COREDNS_GO_MOD,
        COREDNS_GO_SUM,
    ] {
        feed(text);
    }
    format!("{} {h:016x}", release())
}

/// The CoreDNS version pinned.
pub fn coredns_version() -> &'static str {
    required_version(COREDNS_GO_MOD, "github.com/coredns/coredns").unwrap_or("unknown")
}

/// The built programs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The directory holding them all.
    pub dir: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kube-controller-manager.
    pub kube_controller_manager: PathBuf,
    /// kube-scheduler.
    pub kube_scheduler: PathBuf,
    /// kubelet.
    pub kubelet: PathBuf,
    /// kubectl.
    pub kubectl: PathBuf,
    /// kube-proxy, the real peer weir is measured against.
    pub kube_proxy: PathBuf,
    /// The e2e suite (ginkgo inside).
    pub e2e_test: PathBuf,
    /// agnhost, the e2e suite's test image program.
    pub agnhost: PathBuf,
    /// The e2e suite's image for the conntrack test of issue 74839 (its program).
    pub regression_issue_74839: PathBuf,
    /// ginkgo, the CLI that runs e2e.test in parallel processes.
    pub ginkgo: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
    /// containerd.
    pub containerd: PathBuf,
    /// containerd-shim-runc-v2.
    pub containerd_shim: PathBuf,
    /// ctr, containerd's client (image import).
    pub ctr: PathBuf,
    /// The pause container's program (static).
    pub pause: PathBuf,
    /// CoreDNS, the cluster's DNS server.
    pub coredns: PathBuf,
}

/// The Go programs of the k8s module: (output name, package).
const K8S_COMMANDS: [(&str, &str); 9] = [
    ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    (
        "kube-controller-manager",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
    ("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
    ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    ("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
    ("agnhost", "k8s.io/kubernetes/test/images/agnhost"),
    (
        "regression-issue-74839",
        "k8s.io/kubernetes/test/images/regression-issue-74839",
    ),
    // The ginkgo CLI of the release's own ginkgo: runs e2e.test's specs in parallel.
    ("ginkgo", "github.com/onsi/ginkgo/v2/ginkgo"),
];
const CONTAINERD_COMMANDS: [&str; 3] = [
    "github.com/containerd/containerd/v2/cmd/containerd",
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
    "github.com/containerd/containerd/v2/cmd/ctr",
];

impl Binaries {
    fn in_dir(dir: &Path) -> Binaries {
        let bin = dir.join("bin");
        let b = |n: &str| bin.join(n);
        Binaries {
            dir: bin.clone(),
            kube_apiserver: b("kube-apiserver"),
            kube_controller_manager: b("kube-controller-manager"),
            kube_scheduler: b("kube-scheduler"),
            kubelet: b("kubelet"),
            kubectl: b("kubectl"),
            kube_proxy: b("kube-proxy"),
            e2e_test: b("e2e.test"),
            agnhost: b("agnhost"),
            regression_issue_74839: b("regression-issue-74839"),
            ginkgo: b("ginkgo"),
            etcd: b("etcd"),
            containerd: b("containerd"),
            containerd_shim: b("containerd-shim-runc-v2"),
            ctr: b("ctr"),
            pause: b("pause"),
            coredns: b("coredns"),
        }
    }

    fn all(&self) -> [&PathBuf; 16] {
        [
            &self.kube_apiserver,
            &self.kube_controller_manager,
            &self.kube_scheduler,
            &self.kubelet,
            &self.kubectl,
            &self.kube_proxy,
            &self.e2e_test,
            &self.agnhost,
            &self.regression_issue_74839,
            &self.ginkgo,
            &self.etcd,
            &self.containerd,
            &self.containerd_shim,
            &self.ctr,
            &self.pause,
            &self.coredns,
        ]
    }

    fn missing(&self) -> Option<&Path> {
        self.all()
            .into_iter()
            .find(|p| !p.is_file())
            .map(PathBuf::as_path)
    }
}

/// Where builds are cached: `$WEIR_K8S_CACHE`, else `/var/cache/weir/k8s`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("WEIR_K8S_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/weir/k8s"))
}

/// The cache directory of the pinned release.
pub fn cache_dir() -> PathBuf {
    cache_root().join(release())
}

/// The cached binaries, if a complete build of the current pins is there.
pub fn cached() -> Option<Binaries> {
    let dir = cache_dir();
    let marker = fs::read_to_string(dir.join(COMPLETE_MARKER)).ok()?;
    let bins = Binaries::in_dir(&dir);
    (marker.trim() == fingerprint() && bins.missing().is_none()).then_some(bins)
}

/// The cached binaries, building them first when the cache has no complete build of the
/// current pins. Concurrent callers (threads or processes) wait for one build.
pub fn ensure_built() -> Result<Binaries> {
    if let Some(b) = cached() {
        return Ok(b);
    }
    static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    let root = cache_root();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let _lock = DirLock::acquire(&root.join(".build.lock"))?;
    if let Some(b) = cached() {
        return Ok(b);
    }
    let started = Instant::now();
    eprintln!(
        "k8s build: Kubernetes {} (etcd {}, containerd {}) from the Go module proxy into {} \
         (first time: about 20-30 minutes on 2 cores)",
        release(),
        etcd_version(),
        containerd_version(),
        cache_dir().display()
    );
    build_into_place(&root)?;
    eprintln!(
        "k8s build: done in {:.0?}, cached in {}",
        started.elapsed(),
        cache_dir().display()
    );
    cached().context("the build finished but its binaries are missing")
}

/// Builds into a scratch directory beside the cache and renames it into place.
fn build_into_place(root: &Path) -> Result<()> {
    remove_stale(root, ".work-");
    let work = root.join(format!(".work-{}", std::process::id()));
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(work.join("bin"))?;
    if let Err(e) = build(&work) {
        // Keep the log for the next look; the rest is thrown away with the directory.
        let kept = root.join("last-failed-build.log");
        let _ = fs::copy(work.join("build.log"), &kept);
        let _ = fs::remove_dir_all(&work);
        return Err(e.context(format!("the build log is kept in {}", kept.display())));
    }
    fs::write(work.join(COMPLETE_MARKER), format!("{}\n", fingerprint()))?;
    let dir = cache_dir();
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&work, &dir)
        .with_context(|| format!("moving {} to {}", work.display(), dir.display()))
}

/// The module directories, found beside this crate's sources.
fn module_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cluster")
        .join(name)
}

/// `-ldflags` for the k8s programs: stripped, reporting the pinned version (otherwise
/// `v0.0.0-master`, which the version checks of kubectl and e2e.test take for a skew).
pub fn version_ldflags(release: &str) -> String {
    let mut parts = release.trim_start_matches('v').split('.');
    let major = parts.next().unwrap_or("1");
    let minor = parts.next().unwrap_or("0");
    let mut flags = vec!["-s".to_owned(), "-w".to_owned()];
    for pkg in [
        "k8s.io/client-go/pkg/version",
        "k8s.io/component-base/version",
    ] {
        for (k, v) in [
            ("gitVersion", release),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        ] {
            flags.push(format!("-X={pkg}.{k}={v}"));
        }
    }
    flags.join(" ")
}

/// The source directory of the pinned `k8s.io/kubernetes` module in Go's module cache
/// (filled by the build): the e2e images' data files (agnhost's porter certificate).
pub fn kubernetes_source() -> Result<PathBuf> {
    let out = go(
        "k8s",
        &["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"],
    )
    .output()
    .context("starting go list")?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || dir.is_empty() {
        bail!(
            "go list -m k8s.io/kubernetes: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(dir))
}

fn go(module: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("go");
    cmd.args(args)
        .current_dir(module_dir(module))
        .env("CGO_ENABLED", "0")
        // The machine's Go; a go.mod needing a newer one fails instead of fetching it.
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false -trimpath");
    cmd
}

/// Every step of the build, into `work/bin`, logged to `work/build.log`.
fn build(work: &Path) -> Result<()> {
    let log = work.join("build.log");
    let bin = work.join("bin");
    let out_dir = format!("{}/", bin.display());
    let ld = version_ldflags(release());
    if Command::new("go").arg("version").output().is_err() {
        bail!("no `go` on PATH: the cluster tier builds Kubernetes with the machine's Go");
    }
    step(
        &log,
        "download the pinned modules",
        &mut go("k8s", &["mod", "download"]),
    )?;
    step(
        &log,
        "download containerd's modules",
        &mut go("containerd", &["mod", "download"]),
    )?;
    step(
        &log,
        "download CoreDNS's modules",
        &mut go("coredns", &["mod", "download"]),
    )?;
    let mut args = vec!["build", "-ldflags", &ld, "-o", &out_dir];
    args.extend(K8S_COMMANDS.iter().map(|(_, p)| *p));
    step(
        &log,
        "kube-* commands, kubectl, agnhost, ginkgo",
        &mut go("k8s", &args),
    )?;
    for (name, _) in K8S_COMMANDS {
        if !bin.join(name).is_file() {
            bail!("go build wrote no {name} into {}", bin.display());
        }
    }
    let etcd = bin.join("etcd").display().to_string();
    step(
        &log,
        "etcd",
        &mut go(
            "k8s",
            &[
                "build",
                "-ldflags",
                "-s -w",
                "-o",
                &etcd,
                "go.etcd.io/etcd/server/v3",
            ],
        ),
    )?;
    let e2e = bin.join("e2e.test").display().to_string();
    step(
        &log,
        "e2e.test",
        &mut go(
            "k8s",
            &[
                "test",
                "-c",
                "-ldflags",
                &ld,
                "-o",
                &e2e,
                "k8s.io/kubernetes/test/e2e",
            ],
        ),
    )?;
    let mut args = vec!["build", "-ldflags", "-s -w", "-o", &out_dir];
    args.extend(CONTAINERD_COMMANDS);
    step(
        &log,
        "containerd, its runc shim and ctr",
        &mut go("containerd", &args),
    )?;
    let coredns = bin.join("coredns").display().to_string();
    step(
        &log,
        "CoreDNS",
        &mut go(
            "coredns",
            &[
                "build",
                "-ldflags",
                "-s -w",
                "-o",
                &coredns,
                "github.com/coredns/coredns",
            ],
        ),
    )?;
    let src = module_source_dir("k8s.io/kubernetes")?;
    let pause = bin.join("pause").display().to_string();
    step(
        &log,
        "pause (static)",
        Command::new("gcc")
            .args(["-Os", "-Wall", "-Werror", "-static"])
            .arg(format!("-DVERSION=weir-{}", release()))
            .arg("-o")
            .arg(&pause)
            .arg(src.join("build/pause/linux/pause.c")),
    )?;
    step(&log, "strip pause", Command::new("strip").arg(&pause))?;
    Ok(())
}

/// Where the Go module cache holds a pinned module's source.
pub fn module_source_dir(module: &str) -> Result<PathBuf> {
    let out = go("k8s", &["list", "-m", "-f", "{{.Dir}}", module])
        .output()
        .context("starting go list -m")?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || dir.is_empty() {
        bail!(
            "go list -m {module}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(dir))
}

/// Runs a build step, its output appended to the build log; on failure the log's tail is
/// in the error.
fn step(log: &Path, what: &str, cmd: &mut Command) -> Result<()> {
    let started = Instant::now();
    eprintln!("k8s build: {what}");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(file, "\n==> {what}: {cmd:?}")?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("{what}: starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!(
            "{what} failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail(log, 30)
        );
    }
    eprintln!("k8s build: {what}: {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes the entries of `dir` named `PREFIX<pid>` or `PREFIX<pid>-...` whose process is
/// gone (left by a build or test that was killed).
pub fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A lock between processes: a directory holding the owner's pid; taken over when that
/// process is gone.
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(path: &Path) -> Result<DirLock> {
        let mut said = false;
        loop {
            match fs::create_dir(path) {
                Ok(()) => {
                    fs::write(path.join("pid"), std::process::id().to_string())?;
                    return Ok(DirLock(path.to_owned()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // The owner may not have written its pid yet: only a pid that names no
                    // live process makes the lock stale.
                    let owner = fs::read_to_string(path.join("pid")).ok();
                    if let Some(pid) = owner.as_deref().map(str::trim) {
                        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                            eprintln!("k8s build: removing the stale lock of pid {pid}");
                            let _ = fs::remove_dir_all(path);
                            continue;
                        }
                    }
                    if !said {
                        eprintln!(
                            "k8s build: waiting for another build (lock {}, pid {})",
                            path.display(),
                            owner.as_deref().unwrap_or("?").trim()
                        );
                        said = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating lock {}", path.display()))
                }
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_names_one_release_for_every_staging_module() {
        assert!(release().starts_with("v1."), "{}", release());
        let v0 = format!("v0.{}", release().trim_start_matches("v1."));
        let replaced: Vec<&str> = K8S_GO_MOD
            .lines()
            .filter(|l| l.contains("=> k8s.io/"))
            .collect();
        assert!(replaced.len() > 20, "staging replaces: {replaced:?}");
        for l in replaced {
            assert!(l.trim_end().ends_with(&v0), "{l} is not at {v0}");
        }
    }

    #[test]
    fn versions_are_read_from_require_lines_and_blocks() {
        let m = "module x\n\nrequire a/b v1.2.3\n\nrequire (\n\tc/d v0.1.0 // indirect\n)\n";
        assert_eq!(required_version(m, "a/b"), Some("v1.2.3"));
        assert_eq!(required_version(m, "c/d"), Some("v0.1.0"));
        assert_eq!(required_version(m, "c"), None);
    }

    #[test]
    fn ldflags_name_the_version() {
        let f = version_ldflags("v1.37.2");
        assert!(f.contains("-X=k8s.io/component-base/version.gitVersion=v1.37.2"));
        assert!(f.contains("-X=k8s.io/client-go/pkg/version.gitMinor=37"));
        assert!(f.starts_with("-s -w"));
    }

    #[test]
    fn the_fingerprint_names_the_release() {
        assert!(fingerprint().starts_with(release()));
        assert_eq!(fingerprint(), fingerprint());
    }
}
