//! Builds kube-apiserver, kubectl and etcd from Debian's packages, offline but for Debian's
//! own archive, and caches the result under `/var/cache/weir/apiserver/<version>`.
//!
//! The recipe:
//! - a private apt configuration (its own sources list, state, cache and lists, in the
//!   build's work directory) with bookworm and bullseye from the mirror the machine's apt
//!   uses, so the machine's apt setup is untouched;
//! - `apt-get source --download-only kubernetes` (bookworm: 1.20.5+really1.20.2, vendored),
//!   `apt-get download` of bullseye's Go 1.15 (`golang-1.15-go`, `golang-1.15-src`) and
//!   bookworm's `etcd-server`, each unpacked with `dpkg-deb -x`, nothing installed;
//! - `pkg/generated/openapi` (absent from the tarball) generated with the vendored
//!   openapi-gen for every package tagged `+k8s:openapi-gen=`, in GOPATH mode;
//! - `go build` of `cmd/kube-apiserver` and `cmd/kubectl` from `vendor/`, with `GOPROXY=off`.
//!
//! The cache directory is complete only once its marker file exists; anything else there is
//! thrown away and built again.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Kubernetes version built.
pub const KUBE_VERSION: &str = "1.20.2";
/// Bumped whenever the recipe changes what ends up in the cache.
const RECIPE_REVISION: u32 = 1;
/// The marker written last: the cache directory is usable only when it exists.
const COMPLETE_MARKER: &str = "complete";

/// Packages fetched, as `name/release`.
const GO_PACKAGES: [&str; 2] = ["golang-1.15-go/bullseye", "golang-1.15-src/bullseye"];
const ETCD_PACKAGE: &str = "etcd-server/bookworm";
const KUBE_SOURCE: &str = "kubernetes/bookworm";
const GOROOT_IN_PACKAGE: &str = "usr/lib/go-1.15";

/// The binaries of one complete build.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kubectl, from the same source tree.
    pub kubectl: PathBuf,
    /// etcd, from Debian's etcd-server.
    pub etcd: PathBuf,
}

impl Binaries {
    fn in_dir(dir: &Path) -> Binaries {
        let bin = dir.join("bin");
        Binaries {
            kube_apiserver: bin.join("kube-apiserver"),
            kubectl: bin.join("kubectl"),
            etcd: bin.join("etcd"),
        }
    }

    fn all_present(&self) -> bool {
        [&self.kube_apiserver, &self.kubectl, &self.etcd]
            .iter()
            .all(|p| p.is_file())
    }
}

/// Where builds are cached: `$WEIR_APISERVER_CACHE`, else `/var/cache/weir/apiserver`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("WEIR_APISERVER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/weir/apiserver"))
}

/// The cache directory of this version and recipe.
pub fn cache_dir() -> PathBuf {
    cache_root().join(format!("{KUBE_VERSION}-r{RECIPE_REVISION}"))
}

/// The cached binaries, if a complete build is there.
pub fn cached() -> Option<Binaries> {
    let dir = cache_dir();
    let bins = Binaries::in_dir(&dir);
    (dir.join(COMPLETE_MARKER).is_file() && bins.all_present()).then_some(bins)
}

/// The cached binaries, building them first when the cache has no complete build.
/// Concurrent callers (threads or processes) wait for one build.
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
    build(&cache_dir())?;
    eprintln!(
        "apiserver build: done in {:.0?}, cached in {}",
        started.elapsed(),
        cache_dir().display()
    );
    cached().context("the build finished but its binaries are missing")
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
                            eprintln!("apiserver build: removing the stale lock of pid {pid}");
                            let _ = fs::remove_dir_all(path);
                            continue;
                        }
                    }
                    if !said {
                        eprintln!(
                            "apiserver build: waiting for another build (lock {}, pid {})",
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

/// The Debian archive the machine's apt uses (from /etc/apt/sources.list and
/// sources.list.d), `$WEIR_DEBIAN_MIRROR` if set, else deb.debian.org.
pub fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("WEIR_DEBIAN_MIRROR") {
        return m.trim_end_matches('/').to_owned();
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        if let Some(m) = mirror_in_sources(&text) {
            return m;
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// The first URI of the main Debian archive (path ending in `/debian`) in a one-line or
/// deb822 sources file.
fn mirror_in_sources(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().collect()
        } else if let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb-src "))
        {
            // One-line entries may carry options in brackets, spanning several words.
            let rest = rest.trim_start();
            let rest = match (rest.starts_with('['), rest.find(']')) {
                (true, Some(end)) => &rest[end + 1..],
                _ => rest,
            };
            rest.split_whitespace().take(1).collect()
        } else {
            continue;
        };
        for w in words {
            let w = w.trim_end_matches('/');
            if (w.starts_with("http://") || w.starts_with("https://")) && w.ends_with("/debian") {
                return Some(w.to_owned());
            }
        }
    }
    None
}

/// Runs a build step, its output appended to the build log; on failure the log's tail is
/// in the error.
fn step(log: &Path, what: &str, cmd: &mut Command) -> Result<()> {
    let started = Instant::now();
    eprintln!("apiserver build: {what}");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    use std::io::Write;
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
    eprintln!(
        "apiserver build: {what}: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Private apt: everything under `apt_dir`, nothing of the machine's apt state touched.
struct PrivateApt {
    args: Vec<String>,
}

impl PrivateApt {
    fn new(apt_dir: &Path, mirror: &str) -> Result<PrivateApt> {
        for d in ["state/lists/partial", "cache/archives/partial", "etc"] {
            fs::create_dir_all(apt_dir.join(d))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        // bullseye is past its support: should the mirror drop it, point
        // WEIR_BULLSEYE_MIRROR at Debian's archive of old releases.
        let bullseye = std::env::var("WEIR_BULLSEYE_MIRROR").unwrap_or_else(|_| mirror.to_owned());
        let sources = format!(
            "deb [signed-by={keyring}] {mirror} bookworm main\n\
             deb-src [signed-by={keyring}] {mirror} bookworm main\n\
             deb [signed-by={keyring}] {bullseye} bullseye main\n"
        );
        fs::write(apt_dir.join("etc/sources.list"), sources)?;
        fs::write(apt_dir.join("state/status"), "")?;
        let d = apt_dir.display();
        let args = [
            format!("Dir::Etc::SourceList={d}/etc/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State={d}/state"),
            format!("Dir::State::Lists={d}/state/lists"),
            format!("Dir::State::status={d}/state/status"),
            format!("Dir::Cache={d}/cache"),
            "Debug::NoLocking=true".to_owned(),
            "APT::Sandbox::User=root".to_owned(),
            "Acquire::Check-Valid-Until=false".to_owned(),
            "Acquire::Languages=none".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
        ]
        .into_iter()
        .flat_map(|a| ["-o".to_owned(), a])
        .collect();
        Ok(PrivateApt { args })
    }

    fn cmd(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("apt-get");
        c.current_dir(cwd)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(&self.args)
            .args(args);
        c
    }
}

/// The first file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn find_file(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name {
            if name.starts_with(prefix) && name.ends_with(suffix) {
                return Ok(p);
            }
        }
    }
    bail!("no {prefix}*{suffix} in {}", dir.display())
}

/// Builds into `dir` (emptied first), then writes the completion marker.
pub fn build(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir.join("bin"))?;
    let log = dir.join("build.log");
    let work_dir = WorkDir::new(dir)?;
    let work = work_dir.0.as_path();
    let debs = work.join("downloads");
    fs::create_dir_all(&debs)?;
    let mirror = debian_mirror();
    eprintln!(
        "apiserver build: kubernetes {KUBE_VERSION} from Debian's packages ({mirror}) into {} \
         (several minutes; log in {})",
        dir.display(),
        log.display()
    );

    // Downloads through a private apt configuration.
    let apt = PrivateApt::new(&work.join("apt"), &mirror)?;
    step(
        &log,
        "apt-get update (private lists)",
        &mut apt.cmd(&debs, &["update"]),
    )?;
    let mut download = vec!["download"];
    download.extend(GO_PACKAGES);
    download.push(ETCD_PACKAGE);
    step(
        &log,
        "apt-get download Go 1.15 and etcd",
        &mut apt.cmd(&debs, &download),
    )?;
    step(
        &log,
        "apt-get source --download-only kubernetes",
        &mut apt.cmd(&debs, &["source", "--download-only", KUBE_SOURCE]),
    )?;

    // Unpack: Go and etcd with dpkg-deb, the source tarball with tar.
    let go_dir = work.join("go");
    for pkg in GO_PACKAGES {
        let name = pkg.split('/').next().unwrap_or(pkg);
        let deb = find_file(&debs, &format!("{name}_"), ".deb")?;
        step(
            &log,
            &format!("unpack {name}"),
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&go_dir),
        )?;
    }
    let etcd_dir = work.join("etcd");
    let etcd_deb = find_file(&debs, "etcd-server_", ".deb")?;
    step(
        &log,
        "unpack etcd-server",
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&etcd_deb)
            .arg(&etcd_dir),
    )?;
    let orig = find_file(&debs, "kubernetes_", ".orig.tar.gz")?;
    let src_parent = work.join("src");
    fs::create_dir_all(&src_parent)?;
    step(
        &log,
        "unpack the kubernetes source",
        Command::new("tar")
            .arg("-xzf")
            .arg(&orig)
            .arg("-C")
            .arg(&src_parent),
    )?;
    let src = fs::read_dir(&src_parent)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("go.mod").is_file())
        .context("the kubernetes tarball has no top directory with go.mod")?;

    // Go environment: the unpacked toolchain, private caches, vendor only, no network.
    let goroot = go_dir.join(GOROOT_IN_PACKAGE);
    let go = goroot.join("bin/go");
    let gopath = work.join("gopath");
    let path = format!(
        "{}:{}",
        goroot.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let go_env = |c: &mut Command| {
        c.env("GOROOT", &goroot)
            .env("GOPATH", &gopath)
            .env("GOCACHE", work.join("gocache"))
            .env("GOENV", "off")
            .env("GOPROXY", "off")
            .env("GOSUMDB", "off")
            .env("GOFLAGS", "-mod=vendor")
            .env("CGO_ENABLED", "0")
            .env("PATH", &path)
            .env_remove("GOBIN")
            .env_remove("GOOS")
            .env_remove("GOARCH")
            .env_remove("GO111MODULE");
    };

    // openapi-gen, then pkg/generated/openapi in GOPATH mode.
    let tools = work.join("tools");
    let mut c = Command::new(&go);
    go_env(&mut c);
    c.current_dir(&src)
        .arg("build")
        .arg("-o")
        .arg(tools.join("openapi-gen"))
        .arg("./vendor/k8s.io/kube-openapi/cmd/openapi-gen");
    step(&log, "go build openapi-gen", &mut c)?;

    let dirs = openapi_dirs(&src)?;
    eprintln!(
        "apiserver build: {} packages tagged +k8s:openapi-gen=",
        dirs.len()
    );
    let gopath_pkg = gopath.join("src/k8s.io/kubernetes");
    fs::create_dir_all(gopath.join("src/k8s.io"))?;
    std::os::unix::fs::symlink(&src, &gopath_pkg)?;
    let inputs: Vec<String> = dirs
        .iter()
        .map(|d| format!("k8s.io/kubernetes/{d}"))
        .collect();
    let report = work.join("openapi-violations.report");
    let mut c = Command::new(tools.join("openapi-gen"));
    go_env(&mut c);
    // PWD too: Go takes the working directory from it when it names the same directory,
    // and the generator must see the GOPATH path, not the symlink's target.
    c.current_dir(&gopath_pkg)
        .env("PWD", &gopath_pkg)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .arg("--logtostderr")
        .arg("--input-dirs")
        .arg(inputs.join(","))
        .arg("--output-package")
        .arg("k8s.io/kubernetes/pkg/generated/openapi")
        .arg("--output-file-base")
        .arg("zz_generated.openapi")
        .arg("--go-header-file")
        .arg("vendor/k8s.io/code-generator/hack/boilerplate.go.txt")
        .arg("--report-filename")
        .arg(&report);
    step(&log, "openapi-gen pkg/generated/openapi", &mut c)?;
    if !src
        .join("pkg/generated/openapi/zz_generated.openapi.go")
        .is_file()
    {
        bail!("openapi-gen wrote no pkg/generated/openapi/zz_generated.openapi.go");
    }
    // The upstream build checks the API rule report against its known list; a difference
    // means the generator saw other packages than upstream did.
    let known = fs::read_to_string(src.join("api/api-rules/violation_exceptions.list"));
    let got = fs::read_to_string(&report);
    if let (Ok(known), Ok(got)) = (known, got) {
        if known != got {
            let kept = dir.join("openapi-violations.report");
            let _ = fs::write(&kept, got);
            eprintln!(
                "apiserver build: warning: openapi-gen's API rule report differs from \
                 api/api-rules/violation_exceptions.list (see {})",
                kept.display()
            );
        }
    }

    // kube-apiserver and kubectl.
    let ldflags = version_ldflags();
    let mut c = Command::new(&go);
    go_env(&mut c);
    c.current_dir(&src)
        .arg("build")
        .arg("-trimpath")
        .arg("-ldflags")
        .arg(&ldflags)
        .arg("-o")
        .arg(format!("{}/", dir.join("bin").display()))
        .arg("./cmd/kube-apiserver")
        .arg("./cmd/kubectl");
    step(&log, "go build kube-apiserver and kubectl", &mut c)?;
    fs::copy(etcd_dir.join("usr/bin/etcd"), dir.join("bin/etcd"))
        .context("copying etcd out of etcd-server")?;

    // What went in, for the record.
    let mut versions = String::new();
    for e in fs::read_dir(&debs)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".deb") || name.ends_with(".dsc") {
            versions.push_str(&name);
            versions.push('\n');
        }
    }
    fs::write(dir.join("SOURCES"), versions)?;
    fs::write(dir.join(COMPLETE_MARKER), format!("{KUBE_VERSION}\n"))?;
    Ok(())
}

/// The build's scratch space (sources, toolchain, Go build cache: about 3 GB), removed on
/// drop unless `WEIR_APISERVER_KEEP_WORK` is set: on tmpfs when /dev/shm has room (much
/// faster to fill and to remove than a busy disk), else beside the cache.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(cache_dir: &Path) -> Result<WorkDir> {
        const NEEDED: u64 = 6 << 30;
        let shm = Path::new("/dev/shm");
        remove_stale(shm, "weir-apiserver-build-");
        let path = if free_bytes(shm).is_some_and(|b| b >= NEEDED) {
            shm.join(format!("weir-apiserver-build-{}", std::process::id()))
        } else {
            cache_dir.join("work")
        };
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("WEIR_APISERVER_KEEP_WORK").is_some() {
            eprintln!("apiserver build: kept {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Removes the entries of `dir` named `PREFIX<pid>` or `PREFIX<pid>-...` whose process is
/// gone (left by a build or test that was killed).
pub(crate) fn remove_stale(dir: &Path, prefix: &str) {
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

/// Free bytes on the filesystem of `path` (`df`), if it can be told.
fn free_bytes(path: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// `-ldflags` setting the version the binaries report (otherwise v0.0.0-master).
fn version_ldflags() -> String {
    let (major, minor) = {
        let mut it = KUBE_VERSION.split('.');
        (it.next().unwrap_or("1"), it.next().unwrap_or("0"))
    };
    let vars = [
        ("gitVersion", format!("v{KUBE_VERSION}")),
        ("gitMajor", major.to_owned()),
        ("gitMinor", minor.to_owned()),
        ("gitTreeState", "clean".to_owned()),
        ("buildDate", "1970-01-01T00:00:00Z".to_owned()),
    ];
    let mut flags = vec!["-s".to_owned(), "-w".to_owned()];
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (k, v) in &vars {
            flags.push(format!("-X {pkg}.{k}={v}"));
        }
    }
    flags.join(" ")
}

/// The package directories openapi-gen must read, as the upstream Makefile finds them:
/// every Go package directory outside `vendor/` and top-level `_*` / `.*` (with
/// `staging/src/` named as `vendor/`), one of whose `.go` files has a `// +k8s:` tag line
/// and mentions `+k8s:openapi-gen=`, minus code-generator and sample-apiserver.
fn openapi_dirs(src: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut tagged = false;
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let ft = e.file_type()?;
            let name = e.file_name().to_string_lossy().into_owned();
            if ft.is_dir() {
                if dir == src
                    && (name == "vendor" || name.starts_with('_') || name.starts_with('.'))
                {
                    continue;
                }
                stack.push(e.path());
            } else if ft.is_file() && name.ends_with(".go") && !tagged {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                tagged = text.contains("+k8s:openapi-gen=")
                    && text.lines().any(|l| {
                        l.strip_prefix("//")
                            .is_some_and(|r| r.trim_start_matches(' ').starts_with("+k8s:"))
                    });
            }
        }
        if !tagged {
            continue;
        }
        let rel = dir.strip_prefix(src)?.to_string_lossy().replace('\\', "/");
        let rel = match rel.strip_prefix("staging/src/") {
            Some(r) => format!("vendor/{r}"),
            None => rel,
        };
        if rel.starts_with("vendor/k8s.io/code-generator/")
            || rel.starts_with("vendor/k8s.io/sample-apiserver/")
        {
            continue;
        }
        out.push(rel);
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_one_line_and_deb822_sources() {
        assert_eq!(
            mirror_in_sources(
                "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n"
            ),
            Some("http://m.example/debian".to_owned())
        );
        assert_eq!(
            mirror_in_sources(
                "Types: deb\nURIs: http://deb.debian.org/debian-security\n\nTypes: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n"
            ),
            Some("http://deb.debian.org/debian".to_owned())
        );
        assert_eq!(
            mirror_in_sources("deb https://packages.example.com/apt stable main\n"),
            None
        );
    }

    #[test]
    fn ldflags_name_the_version() {
        let f = version_ldflags();
        assert!(f.contains("-X k8s.io/component-base/version.gitVersion=v1.20.2"));
        assert!(f.contains("gitMinor=20"));
    }
}
