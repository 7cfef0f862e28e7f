//! Container images made locally, with no registry: OCI image archives (one uncompressed
//! layer) written from files of this machine, imported into each node's containerd under
//! the names the kubelet and the e2e suite ask for.
//!
//! - the pause image (`registry.k8s.io/pause:<tag>`): the release's pause.c, static;
//! - agnhost (`registry.k8s.io/e2e-test-images/agnhost:<tag>`): the release's agnhost with
//!   what upstream's image (alpine with bind-tools, curl, netcat-openbsd, iproute2, bash,
//!   socat) offers the e2e suite, from this machine's Debian packages: busybox's applets,
//!   dash as /bin/sh, OpenBSD netcat as `nc`, GNU wget, bash, curl, dig, nslookup, socat,
//!   ip, ss and glibc's getent, each with its libraries; porter's certificate (the
//!   release's test/images/agnhost/porter/localhost.*), CoreDNS at /coredns (the
//!   cluster's build; upstream ships one there too) and the image's users;
//! - busybox (`.../busybox:<tag>`): Debian's static busybox and its applets;
//! - nginx (`.../nginx:<tag>`): Debian's nginx (downloaded once with `apt-get download`
//!   into [`DEB_CACHE`]) with a configuration serving port 80;
//! - regression-issue-74839: the release's program of that name;
//! - glibc-dns-testing (upstream: Debian bookworm with dnsutils): busybox's shell and
//!   tools, Debian's dig, nslookup and host, and glibc's getent.

use crate::k8s::Binaries;
use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// agnhost's tag in the pinned release (test/images/agnhost/VERSION, also what
/// test/utils/image/manifest.go names).
pub const AGNHOST_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.66.1";

/// The e2e suite's busybox (test/utils/image/manifest.go).
pub const BUSYBOX_IMAGE: &str = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2";
/// The e2e suite's nginx.
pub const NGINX_IMAGE: &str = "registry.k8s.io/e2e-test-images/nginx:1.27.0-2";
/// The image of the conntrack test for kubernetes issue 74839.
pub const REGRESSION_74839_IMAGE: &str =
    "registry.k8s.io/e2e-test-images/regression-issue-74839:1.5";
/// The e2e suite's DNS querier with glibc's resolver.
pub const GLIBC_DNS_IMAGE: &str = "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.1.1";
/// Where Debian packages an image is made from are downloaded once.
pub const DEB_CACHE: &str = "/var/cache/weir/debs";

/// The cluster DNS image.
pub const COREDNS_IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.15.0";

/// One entry of an image's file system.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A file copied from the host, with its mode.
    File(PathBuf, u32),
    /// A symbolic link to this target.
    Symlink(String),
    /// A directory with this mode.
    Dir(u32),
    /// A file with these contents and mode.
    Bytes(Vec<u8>, u32),
}

/// An image to write: its reference, process and file system.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Full reference, e.g. `registry.k8s.io/pause:3.10.2`.
    pub reference: String,
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// Path in the image (no leading slash) -> entry; parents are made as needed.
    pub files: BTreeMap<String, Entry>,
}

fn digest(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    let _ = h.set_path(path);
    h.set_cksum();
    h
}

/// The layer tarball of `files` (parents first, deterministic).
pub fn layer(files: &BTreeMap<String, Entry>) -> Result<Vec<u8>> {
    let mut all: BTreeMap<String, Entry> = BTreeMap::new();
    for (path, e) in files {
        let path = path.trim_start_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            all.entry(p.display().to_string())
                .or_insert(Entry::Dir(0o755));
            parent = p.parent();
        }
        all.insert(path.to_owned(), e.clone());
    }
    let mut b = tar::Builder::new(Vec::new());
    for (path, e) in &all {
        match e {
            Entry::Dir(mode) => {
                let h = header(&format!("{path}/"), tar::EntryType::Directory, *mode, 0);
                b.append(&h, std::io::empty())?;
            }
            Entry::Symlink(target) => {
                let mut h = header(path, tar::EntryType::Symlink, 0o777, 0);
                h.set_link_name(target)?;
                h.set_cksum();
                b.append(&h, std::io::empty())?;
            }
            Entry::File(src, mode) => {
                let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                let h = header(path, tar::EntryType::Regular, *mode, data.len() as u64);
                b.append(&h, data.as_slice())?;
            }
            Entry::Bytes(data, mode) => {
                let h = header(path, tar::EntryType::Regular, *mode, data.len() as u64);
                b.append(&h, data.as_slice())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// Writes `spec` as an OCI image archive (oci-layout, index.json naming the reference,
/// blobs) to `out`.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<()> {
    let layer = layer(&spec.files)?;
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let tag = spec
        .reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": spec.reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;
    let tmp = out.with_extension("part");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    let mut put = |path: &str, data: &[u8]| -> Result<()> {
        let h = header(path, tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append(&h, data)?;
        Ok(())
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &index)?;
    for blob in [&layer, &config, &manifest] {
        let d = digest(blob);
        put(
            &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
            blob,
        )?;
    }
    b.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    fs::rename(&tmp, out)?;
    Ok(())
}

/// The pause image of the kubelet's sandboxes.
pub fn pause_spec(bins: &Binaries) -> ImageSpec {
    let mut files = BTreeMap::new();
    files.insert("pause".to_owned(), Entry::File(bins.pause.clone(), 0o755));
    ImageSpec {
        reference: super::runtime::PAUSE_IMAGE.to_owned(),
        entrypoint: vec!["/pause".to_owned()],
        cmd: Vec::new(),
        files,
    }
}

/// CoreDNS (static), its Corefile from a ConfigMap.
pub fn coredns_spec(bins: &Binaries) -> ImageSpec {
    let mut files = BTreeMap::new();
    files.insert(
        "coredns".to_owned(),
        Entry::File(bins.coredns.clone(), 0o755),
    );
    files.insert("etc".to_owned(), Entry::Dir(0o755));
    files.insert("tmp".to_owned(), Entry::Dir(0o1777));
    ImageSpec {
        reference: COREDNS_IMAGE.to_owned(),
        entrypoint: vec!["/coredns".to_owned()],
        cmd: Vec::new(),
        files,
    }
}

/// Adds a host program and the shared libraries it loads (from `ldd`) at their paths.
fn add_with_libraries(files: &mut BTreeMap<String, Entry>, program: &Path) -> Result<()> {
    let at = program.display().to_string();
    add_program_at(files, program, &at)
}

/// Adds a host program at `at` in the image and the libraries it loads at their paths;
/// a library `ldd` cannot find is an error.
fn add_program_at(files: &mut BTreeMap<String, Entry>, program: &Path, at: &str) -> Result<()> {
    if !program.is_file() {
        bail!("{} is missing", program.display());
    }
    files.insert(
        at.trim_start_matches('/').to_owned(),
        Entry::File(program.to_owned(), 0o755),
    );
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("starting ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.contains("not found") {
            bail!("ldd {}: {}", program.display(), line.trim());
        }
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|w| w.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let real = fs::canonicalize(path).with_context(|| format!("resolving {path}"))?;
        files.insert(
            path.trim_start_matches('/').to_owned(),
            Entry::File(real, 0o755),
        );
    }
    Ok(())
}

/// The agnhost image (see the module docs). Needs busybox-static and curl on the host.
pub fn agnhost_spec(bins: &Binaries) -> Result<ImageSpec> {
    let curl = Path::new("/usr/bin/curl");
    if !curl.is_file() {
        bail!("{} is missing (apt-get install curl)", curl.display());
    }
    let mut files = BTreeMap::new();
    files.insert(
        "agnhost".to_owned(),
        Entry::File(bins.agnhost.clone(), 0o755),
    );
    add_busybox(&mut files)?;
    add_with_libraries(&mut files, curl)?;
    // The tools of upstream's image, where Debian has them (see the module docs).
    for (program, at, package) in AGNHOST_TOOLS {
        add_program_at(&mut files, Path::new(program), at)
            .with_context(|| format!("agnhost image: {program} (apt-get install {package})"))?;
    }
    files.insert("agnhost-2".to_owned(), Entry::Symlink("agnhost".to_owned()));
    // Upstream's image carries a CoreDNS at /coredns, which the DNS tests run as their own
    // name server: the cluster's CoreDNS build stands in.
    files.insert(
        "coredns".to_owned(),
        Entry::File(bins.coredns.clone(), 0o755),
    );
    for d in ["tmp", "var/tmp"] {
        files.insert(d.to_owned(), Entry::Dir(0o1777));
    }
    files.insert("uploads".to_owned(), Entry::Dir(0o755));
    let porter = crate::k8s::kubernetes_source()?.join("test/images/agnhost/porter");
    for f in ["localhost.crt", "localhost.key"] {
        files.insert(f.to_owned(), Entry::File(porter.join(f), 0o644));
    }
    add_users(&mut files);
    Ok(ImageSpec {
        reference: AGNHOST_IMAGE.to_owned(),
        entrypoint: vec!["/agnhost".to_owned()],
        cmd: vec!["pause".to_owned()],
        files,
    })
}

/// Host programs in the agnhost image: (host path, path in the image, Debian package).
/// /bin/sh is Debian's dash: Debian's static busybox runs its own applet for a command of
/// an applet's name (`nc` among them) whatever PATH holds, so a busybox shell would never
/// run OpenBSD's nc. GNU wget stands in for busybox's, which crashes (Debian bookworm's
/// busybox-static wget dies of SIGSEGV on any URL, on this host too).
const AGNHOST_TOOLS: [(&str, &str, &str); 10] = [
    ("/usr/bin/dash", "/bin/sh", "dash"),
    ("/usr/bin/getent", "/usr/bin/getent", "libc-bin"),
    ("/usr/bin/wget", "/usr/bin/wget", "wget"),
    ("/bin/nc.openbsd", "/usr/bin/nc", "netcat-openbsd"),
    ("/usr/bin/bash", "/bin/bash", "bash"),
    ("/usr/bin/dig", "/usr/bin/dig", "bind9-dnsutils"),
    ("/usr/bin/nslookup", "/usr/bin/nslookup", "bind9-dnsutils"),
    ("/usr/bin/socat", "/usr/bin/socat", "socat"),
    ("/usr/sbin/ip", "/sbin/ip", "iproute2"),
    ("/usr/bin/ss", "/usr/bin/ss", "iproute2"),
];

/// /etc/passwd and /etc/group with root, nobody and the user and group upstream's agnhost
/// image defines (uid 1000, gid 50000), which some tests name.
fn add_users(files: &mut BTreeMap<String, Entry>) {
    files.insert(
        "etc/passwd".to_owned(),
        Entry::Bytes(
            b"root:x:0:0:root:/root:/bin/sh\n\
              nobody:x:65534:65534:nobody:/:/bin/false\n\
              user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n"
                .to_vec(),
            0o644,
        ),
    );
    files.insert(
        "etc/group".to_owned(),
        Entry::Bytes(
            b"root:x:0:\nnogroup:x:65534:\nuser-defined-in-image:x:1000:\n\
              group-defined-in-image:x:50000:user-defined-in-image\n"
                .to_vec(),
            0o644,
        ),
    );
}

/// busybox and links to it for each applet, under bin/.
fn add_busybox(files: &mut BTreeMap<String, Entry>) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!(
            "{} is missing (apt-get install busybox-static)",
            busybox.display()
        );
    }
    files.insert(
        "bin/busybox".to_owned(),
        Entry::File(busybox.to_owned(), 0o755),
    );
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            files.insert(
                format!("bin/{applet}"),
                Entry::Symlink("busybox".to_owned()),
            );
        }
    }
    Ok(())
}

/// The e2e suite's busybox image.
pub fn busybox_spec() -> Result<ImageSpec> {
    let mut files = BTreeMap::new();
    add_busybox(&mut files)?;
    for d in ["tmp", "var/tmp"] {
        files.insert(d.to_owned(), Entry::Dir(0o1777));
    }
    add_users(&mut files);
    Ok(ImageSpec {
        reference: BUSYBOX_IMAGE.to_owned(),
        entrypoint: Vec::new(),
        cmd: vec!["sh".to_owned()],
        files,
    })
}

/// The regression-issue-74839 image: the release's program as its entrypoint.
pub fn regression_74839_spec(bins: &Binaries) -> ImageSpec {
    let mut files = BTreeMap::new();
    files.insert(
        "regression-issue-74839".to_owned(),
        Entry::File(bins.regression_issue_74839.clone(), 0o755),
    );
    ImageSpec {
        reference: REGRESSION_74839_IMAGE.to_owned(),
        entrypoint: vec!["/regression-issue-74839".to_owned()],
        cmd: Vec::new(),
        files,
    }
}

/// The glibc-dns-testing image (see the module docs).
pub fn glibc_dns_spec() -> Result<ImageSpec> {
    let mut files = BTreeMap::new();
    add_busybox(&mut files)?;
    // Debian's shell, as upstream's Debian-based image has.
    add_program_at(&mut files, Path::new("/usr/bin/dash"), "/bin/sh")?;
    for program in [
        "/usr/bin/dig",
        "/usr/bin/nslookup",
        "/usr/bin/host",
        "/usr/bin/getent",
    ] {
        add_program_at(&mut files, Path::new(program), program).with_context(|| {
            format!("glibc-dns-testing image: {program} (apt-get install bind9-dnsutils)")
        })?;
    }
    files.insert(
        "etc/nsswitch.conf".to_owned(),
        Entry::Bytes(
            b"passwd: files\ngroup: files\nhosts: files dns\n".to_vec(),
            0o644,
        ),
    );
    for d in ["tmp", "var/tmp"] {
        files.insert(d.to_owned(), Entry::Dir(0o1777));
    }
    add_users(&mut files);
    Ok(ImageSpec {
        reference: GLIBC_DNS_IMAGE.to_owned(),
        entrypoint: Vec::new(),
        cmd: vec!["sh".to_owned()],
        files,
    })
}

/// nginx's configuration in the image: port 80, a page at `/`, logs to the console.
const NGINX_CONF: &str = "user root;\n\
worker_processes 1;\n\
daemon off;\n\
error_log stderr;\n\
pid /run/nginx.pid;\n\
events { worker_connections 256; }\n\
http {\n\
  access_log /dev/stdout;\n\
  server {\n\
    listen 80;\n\
    listen [::]:80;\n\
    location / { default_type text/html; return 200 \"<p>Welcome to nginx!</p>\\n\"; }\n\
  }\n\
}\n";

/// Debian's nginx program: from the package in [`DEB_CACHE`], downloaded there with
/// `apt-get download` the first time and unpacked with `dpkg-deb -x`.
fn debian_nginx() -> Result<PathBuf> {
    let cache = Path::new(DEB_CACHE);
    let unpacked = cache.join("nginx-root");
    let program = unpacked.join("usr/sbin/nginx");
    if program.is_file() {
        return Ok(program);
    }
    fs::create_dir_all(cache)?;
    let deb = || -> Option<PathBuf> {
        fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with("nginx_")
                        && n.to_string_lossy().ends_with(".deb")
                })
            })
    };
    if deb().is_none() {
        super::process::run(
            Command::new("apt-get")
                .args(["download", "nginx"])
                .current_dir(cache),
        )
        .context("apt-get download nginx (for the e2e suite's nginx image)")?;
    }
    let deb = deb().context("apt-get download nginx left no nginx_*.deb")?;
    let tmp = cache.join("nginx-root.part");
    let _ = fs::remove_dir_all(&tmp);
    super::process::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    fs::rename(&tmp, &unpacked)?;
    Ok(program)
}

/// The e2e suite's nginx image (see the module docs).
pub fn nginx_spec() -> Result<ImageSpec> {
    let mut files = BTreeMap::new();
    add_program_at(&mut files, &debian_nginx()?, "/usr/sbin/nginx")?;
    add_busybox(&mut files)?;
    files.insert(
        "etc/nginx/nginx.conf".to_owned(),
        Entry::Bytes(NGINX_CONF.as_bytes().to_vec(), 0o644),
    );
    for d in ["var/lib/nginx", "var/log/nginx", "run", "usr/share/nginx"] {
        files.insert(d.to_owned(), Entry::Dir(0o755));
    }
    files.insert("tmp".to_owned(), Entry::Dir(0o1777));
    add_users(&mut files);
    Ok(ImageSpec {
        reference: NGINX_IMAGE.to_owned(),
        entrypoint: vec!["/usr/sbin/nginx".to_owned()],
        cmd: Vec::new(),
        files,
    })
}

/// Writes the archives of every image the cluster and the e2e suite use (pause, agnhost,
/// CoreDNS, busybox, nginx, regression-issue-74839, glibc-dns-testing) into `dir`; their
/// paths.
pub fn write_test_images(bins: &Binaries, dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (name, spec) in [
        ("pause", pause_spec(bins)),
        ("agnhost", agnhost_spec(bins)?),
        ("coredns", coredns_spec(bins)),
        ("busybox", busybox_spec()?),
        ("nginx", nginx_spec()?),
        ("regression-issue-74839", regression_74839_spec(bins)),
        ("glibc-dns-testing", glibc_dns_spec()?),
    ] {
        let path = dir.join(format!("{name}.oci.tar"));
        write_archive(&spec, &path)?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_lists_parents_before_children_with_links() {
        let mut files = BTreeMap::new();
        files.insert("bin/sh".to_owned(), Entry::Symlink("busybox".to_owned()));
        files.insert("tmp".to_owned(), Entry::Dir(0o1777));
        let data = layer(&files).unwrap();
        let mut a = tar::Archive::new(data.as_slice());
        let names: Vec<(String, tar::EntryType)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert_eq!(names[0], ("bin/".to_owned(), tar::EntryType::Directory));
        assert_eq!(names[1], ("bin/sh".to_owned(), tar::EntryType::Symlink));
        assert_eq!(names[2].0, "tmp/");
    }

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(
            digest(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
