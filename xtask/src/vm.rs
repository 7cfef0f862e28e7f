//! `cargo xtask vm-test ipvs`: runs the IPVS suite inside a qemu (TCG) guest booted from
//! Debian's `linux-image-amd64`, because the host kernel has no IPVS and cannot load
//! modules.
//!
//! The guest is a kernel plus one initramfs: busybox-static as the shell and coreutils, the
//! `ip_vs*` and netfilter modules of that kernel with their dependencies (insmod'ed in
//! dependency order by `/init`), the host's `ip`, `nft` and `sysctl` with the shared
//! libraries they need (`ldd`), and the workspace's glibc debug binaries (weir-proxy,
//! weir-echo, weir-probe and the `ipvs_vm` test executable, debug info stripped) at the same
//! absolute paths as on the host, so the test's `env!("CARGO_BIN_EXE_...")` paths resolve.
//! `/init` runs the test executable and prints `WEIR-VM-EXIT <code>` on the serial console,
//! which this module parses into its own exit status.
//!
//! glibc rather than musl: `nft` and `ip` in the guest are the host's glibc builds anyway,
//! weir-proxy dlopens `libnftables.so.1` (impossible from a static musl binary), and the
//! glibc binaries are the ones `cargo xtask test` has already built, so the VM tier costs no
//! second compile of the dependency tree.
//!
//! The kernel boots through its PVH entry point: the ELF inside the bzImage is
//! decompressed once on the host (`xz`), so the guest skips SeaBIOS's real-mode loader and
//! the decompressor, which under TCG take about 8 s (the compressed image is the fallback
//! when the ELF has no PVH note).
//!
//! Downloads, the extracted kernel and modules are cached under `/var/cache/weir/vm`
//! (rebuilt when missing).

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where downloads and extracted kernels are kept between runs.
const CACHE: &str = "/var/cache/weir/vm";

/// Modules the guest loads (their dependencies are added): IPVS with every scheduler weir
/// offers, conntrack and NAT, the nftables expressions weir's rules use, dummy and veth.
const MODULES: &[&str] = &[
    // libcrc32c asks the crypto API for "crc32c" (a soft dependency, not in `depends=`).
    "crc32c_generic",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sh",
    "ip_vs_dh",
    "ip_vs_mh",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_redir",
    "nft_ct",
    "nft_numgen",
    "nft_hash",
    "nft_limit",
    "nft_reject",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "dummy",
    "veth",
];

/// Host programs copied into the guest with their shared libraries.
const HOST_PROGRAMS: &[&str] = &["/usr/sbin/ip", "/usr/sbin/nft", "/usr/sbin/sysctl"];

/// `cargo xtask vm-test` arguments.
#[derive(clap::Args)]
pub struct VmTestArgs {
    /// Which suite: `ipvs` (the only one so far).
    suite: String,
    /// Only run guest tests whose name contains this (passed to the test executable).
    #[arg(long)]
    filter: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1536)]
    memory: u32,
    /// Give up on the guest after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Guest vCPUs (TCG, one host thread each).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
}

impl VmTestArgs {
    /// The whole IPVS suite with the default guest (what `cargo xtask test` runs).
    pub fn ipvs() -> VmTestArgs {
        VmTestArgs {
            suite: "ipvs".into(),
            filter: None,
            memory: 1536,
            timeout: 600,
            cpus: 2,
        }
    }
}

/// The suite ran inside the guest and failed (as opposed to a guest that could not be
/// prepared or booted).
#[derive(Debug)]
pub struct SuiteFailed {
    /// The suite.
    pub suite: String,
    /// The test executable's exit status.
    pub code: i32,
}

impl std::fmt::Display for SuiteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} suite failed inside the VM (exit {})",
            self.suite, self.code
        )
    }
}

impl std::error::Error for SuiteFailed {}

/// Builds everything, boots the guest and returns an error unless the suite passed
/// ([`SuiteFailed`] when the guest ran it and it failed).
pub fn vm_test(args: VmTestArgs, root: &Path) -> Result<()> {
    if args.suite != "ipvs" {
        bail!("unknown VM suite {:?} (known: ipvs)", args.suite);
    }
    let started = Instant::now();
    let bins = build_binaries(root)?;
    eprintln!(
        "==> binaries built after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // The suite's tests are #[ignore]d on the host (no IPVS there); here they run.
    let mut test_args = vec![
        "--test-threads=1".to_owned(),
        "--include-ignored".to_owned(),
    ];
    if let Some(f) = &args.filter {
        test_args.push(f.clone());
    }
    let payload = Payload {
        tools: bins.tools,
        main: bins.test,
        args: test_args,
    };
    let size = GuestSize {
        memory: args.memory,
        cpus: args.cpus,
        timeout: args.timeout,
    };
    let code = run_guest(&payload, size)?.code;
    eprintln!(
        "==> vm-test {} finished in {:.1}s (guest exit status {code})",
        args.suite,
        started.elapsed().as_secs_f64()
    );
    if code != 0 {
        return Err(SuiteFailed {
            suite: args.suite,
            code,
        }
        .into());
    }
    Ok(())
}

/// What a guest runs: host programs copied to the same paths inside, and the one `/init`
/// starts.
pub struct Payload {
    /// Programs copied with symbols and debug info stripped (weir-proxy, weir-echo, ...).
    /// The first one's grandparent directory becomes the guest's `CARGO_TARGET_DIR`, the
    /// first one is its `WEIR_PROXY_BIN`.
    pub tools: Vec<PathBuf>,
    /// The program `/init` runs (it keeps its symbols, for backtraces).
    pub main: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// The guest's memory, vCPUs, and how long it may run.
#[derive(Clone, Copy, Debug)]
pub struct GuestSize {
    /// MiB.
    pub memory: u32,
    /// vCPUs (TCG, one host thread each).
    pub cpus: u32,
    /// Seconds before the guest is killed.
    pub timeout: u64,
}

/// What a guest run left.
pub struct GuestRun {
    /// The payload's exit status.
    pub code: i32,
    /// The lines the payload wrote to the file named by `$WEIR_VM_OUT`, in order.
    pub out: Vec<String>,
}

/// Where the payload writes what it hands back to the host (see [`GuestRun::out`]).
pub const GUEST_OUT: &str = "/tmp/weir-vm-out";

/// Boots Debian's kernel (downloaded and cached on first use) with an initramfs holding
/// `payload`, and returns its exit status and output lines.
pub fn run_guest(payload: &Payload, size: GuestSize) -> Result<GuestRun> {
    let started = Instant::now();
    ensure_packages(&["qemu-system-x86", "busybox-static", "xz-utils"])?;
    let kernel = ensure_kernel()?;
    eprintln!(
        "==> kernel {} ({} modules) ready after {:.1}s",
        kernel.version,
        kernel.modules.len(),
        started.elapsed().as_secs_f64()
    );
    let work = tempfile::tempdir().context("temporary directory")?;
    let initrd = work.path().join("initrd.cpio");
    build_initramfs(&initrd, &kernel, payload)?;
    eprintln!(
        "==> initramfs {} MiB after {:.1}s",
        std::fs::metadata(&initrd)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    boot(&kernel.vmlinuz, &initrd, size)
}

/// apt-installs the Debian packages that are missing.
fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("==> apt-get install {}", missing.join(" "));
    let install = |pkgs: &[&str]| {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(pkgs)
            .status()
            .is_ok_and(|s| s.success())
    };
    if install(&missing) {
        return Ok(());
    }
    crate::step("apt-get update", "apt-get", &["update"], &[])?;
    if !install(&missing) {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// A guest kernel with its modules, in load order.
struct Kernel {
    version: String,
    vmlinuz: PathBuf,
    /// Module files, each after its dependencies.
    modules: Vec<PathBuf>,
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned image package `linux-image-amd64` depends on (e.g.
/// `linux-image-6.1.0-57-amd64`).
fn kernel_package() -> Result<String> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let find = |deps: &str| {
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-"))
            .map(str::to_owned)
    };
    if let Some(p) = find(&deps) {
        return Ok(p);
    }
    crate::step("apt-get update", "apt-get", &["update"], &[])?;
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    find(&deps).context("apt-cache depends linux-image-amd64 names no linux-image package")
}

/// Downloads (once) the kernel package, keeps vmlinuz and the modules weir needs.
fn ensure_kernel() -> Result<Kernel> {
    let mut pkg = kernel_package()?;
    let wanted = MODULES.join(",");
    let cached = |pkg: &str| {
        let dir = Path::new(CACHE).join(pkg);
        dir.join("load-order").exists()
            && std::fs::read_to_string(dir.join("wanted")).ok().as_deref() == Some(&wanted)
    };
    if !cached(&pkg) {
        let version = pkg.trim_start_matches("linux-image-").to_owned();
        if let Err(e) = extract_kernel(&pkg, &version, &Path::new(CACHE).join(&pkg)) {
            // Stale package lists name a kernel the mirror no longer has.
            eprintln!("==> {e:#}; retrying after apt-get update");
            crate::step("apt-get update", "apt-get", &["update"], &[])?;
            pkg = kernel_package()?;
            let version = pkg.trim_start_matches("linux-image-").to_owned();
            extract_kernel(&pkg, &version, &Path::new(CACHE).join(&pkg))?;
        }
        std::fs::write(Path::new(CACHE).join(&pkg).join("wanted"), &wanted)?;
    }
    let version = pkg.trim_start_matches("linux-image-").to_owned();
    let dir = Path::new(CACHE).join(&pkg);
    let order_file = dir.join("load-order");
    let modules = std::fs::read_to_string(&order_file)?
        .lines()
        .map(|l| dir.join(l))
        .collect();
    // The uncompressed kernel boots straight into 64-bit code through its PVH entry
    // point: no SeaBIOS real-mode setup and no decompression under TCG (about 8 s less).
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.exists() {
        if let Err(e) = extract_vmlinux(&dir.join("vmlinuz"), &vmlinux) {
            eprintln!("==> no PVH kernel ({e:#}); booting the compressed one");
        }
    }
    let image = if vmlinux.exists() {
        vmlinux
    } else {
        dir.join("vmlinuz")
    };
    Ok(Kernel {
        version,
        vmlinuz: image,
        modules,
    })
}

/// Decompresses the kernel inside a bzImage (xz or zstd payload) into an ELF `out`, kept
/// only when it has a PVH entry point note (`XEN_ELFNOTE_PHYS32_ENTRY`), which qemu's
/// `-kernel` boots directly.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let data = std::fs::read(bzimage)?;
    let find = |magic: &[u8]| data.windows(magic.len()).position(|w| w == magic);
    let (at, cmd): (usize, &[&str]) = if let Some(at) = find(b"\xfd7zXZ\x00") {
        (at, &["xz", "-dc", "--single-stream"])
    } else if let Some(at) = find(&[0x28, 0xb5, 0x2f, 0xfd]) {
        (at, &["zstd", "-dcq"])
    } else {
        bail!("no xz or zstd payload in {}", bzimage.display());
    };
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", cmd[0]))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let payload = data[at..].to_vec();
    let feeder = std::thread::spawn(move || {
        // zstd stops reading at the end of its frame: a broken pipe here is fine.
        let _ = stdin.write_all(&payload);
    });
    let elf = child.wait_with_output()?.stdout;
    let _ = feeder.join();
    // An ELF note: namesz 4, descsz, type 18 (PHYS32_ENTRY), name "Xen\0".
    let has_pvh = elf.windows(16).any(|w| {
        w[0..4] == 4u32.to_le_bytes() && w[8..12] == 18u32.to_le_bytes() && &w[12..16] == b"Xen\0"
    });
    if !elf.starts_with(b"\x7fELF") || !has_pvh {
        bail!("the decompressed kernel has no PVH entry point");
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &elf)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn extract_kernel(pkg: &str, version: &str, dir: &Path) -> Result<()> {
    eprintln!("==> apt-get download {pkg} (kept in {})", dir.display());
    let tmp = tempfile::tempdir()?;
    let status = Command::new("apt-get")
        .args(["download", pkg])
        .current_dir(tmp.path())
        .status()
        .context("apt-get download")?;
    if !status.success() {
        bail!("apt-get download {pkg} failed");
    }
    let deb = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = tmp.path().join("root");
    crate::step(
        "dpkg-deb -x",
        "dpkg-deb",
        &["-x", &deb.to_string_lossy(), &root.to_string_lossy()],
        &[],
    )?;
    let moddir = root.join("lib/modules").join(version);
    let mut index = BTreeMap::new();
    index_modules(&moddir, &mut index)?;
    let order = module_closure(&index, MODULES)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir.join("modules"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(
        root.join(format!("boot/vmlinuz-{version}")),
        dir.join("vmlinuz"),
    )
    .context("vmlinuz in the package")?;
    let mut lines = String::new();
    for name in &order {
        let src = &index[name];
        let file = format!(
            "modules/{}",
            src.file_name().unwrap_or_default().to_string_lossy()
        );
        std::fs::copy(src, dir.join(&file))?;
        lines.push_str(&file);
        lines.push('\n');
    }
    std::fs::write(dir.join("load-order"), lines)?;
    Ok(())
}

/// The kernel's name for a module (`-` and `_` are the same).
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, index)?;
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            index.insert(module_key(stem), p);
        }
    }
    Ok(())
}

/// The `depends=` field of a module's `.modinfo` section (read from the file's bytes).
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path)?;
    let pat = b"\0depends=";
    let Some(at) = bytes.windows(pat.len()).position(|w| w == pat) else {
        return Ok(Vec::new());
    };
    let rest = &bytes[at + pat.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(module_key)
        .collect())
}

/// The wanted modules and everything they depend on, each after its dependencies.
fn module_closure(index: &BTreeMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if depth > 64 {
            bail!("module dependency cycle at {name}");
        }
        let path = index
            .get(name)
            .with_context(|| format!("module {name} is not in the kernel package"))?;
        for dep in module_depends(path)? {
            visit(&dep, index, done, order, depth + 1)?;
        }
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(&module_key(w), index, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

/// Workspace binaries for the guest.
struct Binaries {
    /// weir-proxy, weir-echo, weir-probe (host paths, copied to the same guest paths).
    tools: Vec<PathBuf>,
    /// The `ipvs_vm` test executable.
    test: PathBuf,
}

fn build_binaries(root: &Path) -> Result<Binaries> {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    crate::step(
        "build",
        "cargo",
        // The same selection as `cargo xtask test`'s build (no feature re-unification).
        &["build", "--workspace", "--bins"],
        &[],
    )?;
    eprintln!("\n==> cargo test --workspace --test ipvs_vm --no-run");
    let out = Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--test",
            "ipvs_vm",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the ipvs_vm test failed");
    }
    let test = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "ipvs_vm")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo named no ipvs_vm executable")?;
    let tools = ["weir-proxy", "weir-echo", "weir-probe"]
        .iter()
        .map(|n| target.join("debug").join(n))
        .collect();
    Ok(Binaries { tools, test })
}

/// A `newc` cpio archive being written.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    fn header(&mut self, name: &str, mode: u32, size: usize) -> Result<()> {
        self.ino += 1;
        let namesize = name.len() + 1;
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, namesize, 0
        );
        self.out.write_all(hdr.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        let pad = (4 - (110 + namesize) % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        Ok(())
    }

    fn data(&mut self, data: &[u8]) -> Result<()> {
        self.out.write_all(data)?;
        let pad = (4 - data.len() % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        Ok(())
    }

    /// Adds a directory and its parents (once each).
    fn dir(&mut self, path: &str) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_owned());
        self.header(path, 0o040755, 0)
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.header(path, 0o100000 | mode, data.len())?;
        self.data(data)
    }

    fn finish(mut self) -> Result<()> {
        self.header("TRAILER!!!", 0, 0)?;
        self.out.flush()?;
        Ok(())
    }
}

/// The shared libraries (and the loader) a dynamically linked program needs, per `ldd`.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A program's bytes with debug info (`all`: and symbols) removed, or as is.
fn stripped(path: &Path, tmp: &Path, all: bool) -> Result<Vec<u8>> {
    let out = tmp.join("stripped");
    let what = if all { "--strip-all" } else { "--strip-debug" };
    let ok = Command::new("strip")
        .args([what, "-o"])
        .arg(&out)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    let bytes = if ok {
        std::fs::read(&out)?
    } else {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(bytes)
}

/// The guest's `/init`: mounts, modules, then the test executable; the exit status goes to
/// the console as `WEIR-VM-EXIT <code>` before power-off. Binaries sit at their host paths,
/// which may be under `/tmp` (a clone in a temporary directory): `/tmp` stays part of the
/// initramfs (already RAM-backed and writable), never a fresh mount that would hide them.
fn init_script(kernel: &Kernel, payload: &Payload) -> String {
    let target_dir = payload
        .tools
        .first()
        .and_then(|p| p.parent())
        .and_then(|p| p.parent())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let proxy = payload
        .tools
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev 2>/dev/null\n\
         mkdir -p /run /tmp /var\n\
         mount -t tmpfs run /run\n\
         ln -sf /run /var/run\n\
         echo \"WEIR-VM-INIT $(cut -d' ' -f1 /proc/uptime)\"\n",
    );
    for m in &kernel.modules {
        let name = m
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        s.push_str(&format!(
            "insmod /lib/weir-modules/{name} || echo \"WEIR-VM insmod {name} failed\"\n"
        ));
    }
    s.push_str(&format!(
        "ip link set lo up\n\
         echo \"WEIR-VM-READY $(cut -d' ' -f1 /proc/uptime)\"\n\
         export CI=true WEIR_IN_VM=1 CARGO_TARGET_DIR={target_dir} WEIR_PROXY_BIN={proxy} WEIR_VM_OUT={GUEST_OUT} RUST_BACKTRACE=1 HOME=/tmp\n\
         cd /tmp\n\
         {} {}\n\
         code=$?\n\
         echo \"WEIR-VM-DONE $(cut -d' ' -f1 /proc/uptime)\"\n\
         [ -f {GUEST_OUT} ] && sed 's/^/WEIR-VM-OUT /' {GUEST_OUT}\n\
         echo \"WEIR-VM-EXIT $code\"\n\
         poweroff -f\n",
        payload.main.display(),
        payload.args.join(" ")
    ));
    s
}

fn build_initramfs(path: &Path, kernel: &Kernel, payload: &Payload) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = std::fs::File::create(path)?;
    let mut cpio = Cpio {
        out: std::io::BufWriter::new(file),
        ino: 0,
        dirs: BTreeSet::new(),
    };
    for d in ["proc", "sys", "dev", "run", "tmp", "etc", "bin"] {
        cpio.dir(d)?;
    }
    cpio.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?)?;
    cpio.file("init", 0o755, init_script(kernel, payload).as_bytes())?;
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/tmp:/bin/sh\n")?;
    cpio.file("etc/group", 0o644, b"root:x:0:\n")?;
    cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")?;
    for m in &kernel.modules {
        let name = m.file_name().unwrap_or_default().to_string_lossy();
        cpio.file(
            &format!("lib/weir-modules/{name}"),
            0o644,
            &std::fs::read(m)?,
        )?;
    }
    let mut libs = BTreeSet::new();
    let mut programs: Vec<PathBuf> = HOST_PROGRAMS.iter().map(PathBuf::from).collect();
    programs.extend(payload.tools.iter().cloned());
    programs.push(payload.main.clone());
    // weir-proxy dlopens libnftables (not in its ldd output).
    libs.insert(PathBuf::from("/lib/x86_64-linux-gnu/libnftables.so.1"));
    for p in &programs {
        if !p.exists() {
            bail!("{} is missing", p.display());
        }
        libs.extend(shared_libraries(p)?);
        // The main program keeps its symbols (backtraces); the tools need none.
        let all = *p != payload.main;
        cpio.file(&p.to_string_lossy(), 0o755, &stripped(p, tmp.path(), all)?)?;
    }
    let more: Vec<PathBuf> = libs.iter().cloned().collect();
    for l in more {
        libs.extend(shared_libraries(&l).unwrap_or_default());
    }
    // Each library at the path ldd names (the loader searches /lib/x86_64-linux-gnu).
    for l in &libs {
        let real = std::fs::canonicalize(l)?;
        cpio.file(&l.to_string_lossy(), 0o755, &std::fs::read(&real)?)?;
    }
    cpio.finish()
}

/// What a line on the guest's console is (markers `/init` prints).
#[derive(Debug, PartialEq, Eq)]
enum Console<'a> {
    /// `/init` started, at this guest uptime.
    Init(&'a str),
    /// Modules loaded.
    Ready,
    /// A line of the payload's output file.
    Out(&'a str),
    /// The payload's exit status (`None`: unreadable).
    Exit(Option<i32>),
    /// Anything else (kernel, payload's stdout/stderr).
    Other,
}

impl<'a> Console<'a> {
    fn of(line: &'a str) -> Console<'a> {
        if let Some(o) = line.strip_prefix("WEIR-VM-OUT ") {
            Console::Out(o)
        } else if let Some(rest) = line.strip_prefix("WEIR-VM-INIT ") {
            Console::Init(rest)
        } else if line.starts_with("WEIR-VM-READY ") {
            Console::Ready
        } else if let Some(c) = line.strip_prefix("WEIR-VM-EXIT ") {
            Console::Exit(c.trim().parse().ok())
        } else {
            Console::Other
        }
    }
}

/// Boots the guest, streams its console, returns the payload's exit status and output.
fn boot(vmlinuz: &Path, initrd: &Path, args: GuestSize) -> Result<GuestRun> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
        ])
        .args(["-m", &args.memory.to_string()])
        .args(["-smp", &args.cpus.to_string()])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = started + Duration::from_secs(args.timeout);
    let mut code = None;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                let kind = Console::of(line);
                if let Console::Out(o) = kind {
                    out.push(o.to_owned());
                    continue;
                }
                eprintln!("vm| {line}");
                match kind {
                    Console::Init(uptime) => eprintln!(
                        "==> guest init started {:.1}s after qemu (guest uptime {uptime}s)",
                        started.elapsed().as_secs_f64()
                    ),
                    Console::Ready => eprintln!(
                        "==> guest ready (modules loaded) {:.1}s after qemu",
                        started.elapsed().as_secs_f64()
                    ),
                    Console::Exit(c) => code = c,
                    Console::Out(_) | Console::Other => {}
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the VM did not finish within {}s", args.timeout);
            }
        }
    }
    let _ = child.wait();
    eprintln!("==> qemu ran {:.1}s", started.elapsed().as_secs_f64());
    let code = code.context("the guest printed no WEIR-VM-EXIT line (kernel panic or crash?)")?;
    Ok(GuestRun { code, out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_runs_the_payload_then_hands_back_its_output_before_the_exit_status() {
        let kernel = Kernel {
            version: "6.1.0-test".into(),
            vmlinuz: PathBuf::from("/nonexistent/vmlinuz"),
            modules: vec![PathBuf::from("/m/ip_vs.ko")],
        };
        let payload = Payload {
            tools: vec![PathBuf::from("/w/target/release/weir-proxy")],
            main: PathBuf::from("/w/target/release/xtask"),
            args: vec!["bench".into(), "compare".into(), "--in-vm".into()],
        };
        let script = init_script(&kernel, &payload);
        let pos = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in:\n{script}"))
        };
        assert!(pos("insmod /lib/weir-modules/ip_vs.ko") < pos("WEIR-VM-READY"));
        assert!(script.contains("CARGO_TARGET_DIR=/w/target "));
        assert!(script.contains(&format!("WEIR_VM_OUT={GUEST_OUT} ")));
        let run = pos("/w/target/release/xtask bench compare --in-vm\n");
        let out = pos(&format!("sed 's/^/WEIR-VM-OUT /' {GUEST_OUT}"));
        assert!(run < out && out < pos("echo \"WEIR-VM-EXIT $code\""));
    }

    #[test]
    fn console_lines_are_told_apart_by_their_markers() {
        assert_eq!(
            Console::of("WEIR-VM-OUT {\"rows\":[]}"),
            Console::Out("{\"rows\":[]}")
        );
        assert_eq!(Console::of("WEIR-VM-EXIT 3"), Console::Exit(Some(3)));
        assert_eq!(Console::of("WEIR-VM-EXIT ?"), Console::Exit(None));
        assert_eq!(Console::of("WEIR-VM-INIT 4.61"), Console::Init("4.61"));
        assert_eq!(Console::of("WEIR-VM-READY 5.76"), Console::Ready);
        assert_eq!(Console::of("[ 1.0] WEIR-VM-OUT x"), Console::Other);
    }
}
