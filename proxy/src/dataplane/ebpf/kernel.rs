//! The real kernel: loads weir's eBPF object with aya, attaches the cgroup socket hooks to
//! a cgroup v2 and pins maps and links under a bpffs directory, so a restarted daemon adopts
//! them and traffic keeps flowing while it is down; reads and writes the maps;
//! [`cleanup`] detaches and unpins everything.

use super::render::{MapContents, MapOp, MapPlan};
use super::MapStore;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData};
use aya::programs::links::LinkOrder;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions};
use aya::programs::{
    CgroupAttachMode, CgroupSkbAttachType, Program, SchedClassifier, TcAttachType,
};
use aya::{Ebpf, EbpfLoader, VerifierLogLevel};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use weir_ebpf_common::{
    Backend, BackendKey, CtKey, CtValue, IpKey, RevNatKey, RevNatValue, ServiceKey, ServiceValue,
    SourceRange, BACKENDS_MAP, CLUSTER_IPS_MAP, CT_MAP, IP_KEY_FAMILY_BITS, MAGLEV_MAP, REVNAT_MAP,
    SERVICES_MAP, SERVICE_CIDRS_MAP, SOURCE_RANGES_MAP,
};

/// The tc program for an external interface's ingress (frontend -> backend).
pub const TC_INGRESS: &str = "weir_tc_ingress";
/// The tc program for an external interface's egress (backend's reply -> frontend).
pub const TC_EGRESS: &str = "weir_tc_egress";

/// Where weir mounts a cgroup2 of its own when this process sees none (inside `ip netns
/// exec`, which mounts a fresh /sys, or in a container without /sys/fs/cgroup): the root
/// of the process's cgroup namespace.
pub const OWN_CGROUP2_MOUNT: &str = "/run/weir/cgroupv2";

/// How the cgroup the socket hooks attach to was chosen (logged at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CgroupOrigin {
    /// `--ebpf-cgroup`.
    Flag,
    /// The first cgroup2 mount in /proc/self/mountinfo.
    Mountinfo,
    /// None is mounted: weir mounts one at [`OWN_CGROUP2_MOUNT`] (or reuses its earlier
    /// mount there).
    OwnMount,
}

impl CgroupOrigin {
    /// How it reads in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupOrigin::Flag => "--ebpf-cgroup",
            CgroupOrigin::Mountinfo => "the cgroup2 mount in /proc/self/mountinfo",
            CgroupOrigin::OwnMount => "weir's own cgroup2 mount",
        }
    }
}

/// The cgroup the socket hooks attach to: the flag's, else the first cgroup2 mount of
/// `mountinfo` (this process's /proc/self/mountinfo), else weir's own mount.
pub fn choose_cgroup(flag: Option<&Path>, mountinfo: &str) -> (PathBuf, CgroupOrigin) {
    if let Some(p) = flag {
        return (p.to_owned(), CgroupOrigin::Flag);
    }
    match cgroup2_mount_in(mountinfo) {
        Some(p) => (p, CgroupOrigin::Mountinfo),
        None => (PathBuf::from(OWN_CGROUP2_MOUNT), CgroupOrigin::OwnMount),
    }
}

/// The first cgroup2 mount point of a /proc/self/mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split(' ').next() != Some("cgroup2") {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    })
}

/// Mounts cgroup2 at `dir` unless one is mounted there already.
fn ensure_own_cgroup2(dir: &Path) -> Result<(), EbpfError> {
    use nix::mount::{mount, MsFlags};
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    let err = |message: String| EbpfError::Cgroup {
        path: dir.to_owned(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("mkdir: {e}")))?;
    if statfs(dir).map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC) == Ok(true) {
        return Ok(());
    }
    mount(
        Some("cgroup2"),
        dir,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        err(format!(
            "no cgroup2 is mounted, and mounting one here failed: {e}"
        ))
    })
}

/// Where the programs attach and where their objects are pinned.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EbpfSettings {
    /// A cgroup v2 directory (`--ebpf-cgroup`): sockets of processes in it or below are
    /// translated.
    pub cgroup: PathBuf,
    /// How [`EbpfSettings::cgroup`] was chosen.
    pub cgroup_origin: CgroupOrigin,
    /// `--service-cluster-ip-range`: new connections to an address in them that no
    /// Service has are dropped.
    pub service_cidrs: Vec<ipnetwork::IpNetwork>,
    /// A directory on bpffs (`--bpffs-dir`) for pinned maps and links.
    pub bpffs_dir: PathBuf,
    /// The node's external interfaces (`--ebpf-interfaces`), where the tc programs attach;
    /// empty: the interfaces holding the node's addresses.
    pub interfaces: Vec<String>,
}

/// Failures of the eBPF backend, naming the object and the kernel operation.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The bpffs directory cannot be used.
    #[error("--bpffs-dir {path}: {message}")]
    Bpffs {
        /// The directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The cgroup cannot be used.
    #[error("--ebpf-cgroup {path}: {message}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The object could not be parsed or its maps created.
    #[error("loading weir's eBPF object: {0}")]
    Object(String),
    /// A program failed to load (the message holds the verifier's log).
    #[error("loading program {program}: {message}")]
    Load {
        /// The program.
        program: String,
        /// The error, with the verifier log.
        message: String,
    },
    /// A program failed to attach.
    #[error("attaching program {program} to {cgroup}: {message}")]
    Attach {
        /// The program.
        program: String,
        /// The cgroup.
        cgroup: PathBuf,
        /// Why.
        message: String,
    },
    /// A tc program failed to attach.
    #[error("attaching program {program} to interface {interface}: {message}")]
    TcAttach {
        /// The program.
        program: &'static str,
        /// The interface.
        interface: String,
        /// Why (TCX's error and clsact's).
        message: String,
    },
    /// The node's interfaces could not be listed.
    #[error("listing the node's interfaces: {0}")]
    Interfaces(String),
    /// Pinning or unpinning failed.
    #[error("pin {path}: {message}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Finding or destroying the sockets of removed backends failed.
    #[error("destroying sockets of removed backends: {0}")]
    Sockets(#[from] super::stale::SocketsError),
    /// A map operation failed.
    #[error("{op} {map} {key}: {message}")]
    Map {
        /// `lookup`, `update`, `delete` or `iterate`.
        op: &'static str,
        /// The map.
        map: &'static str,
        /// The key, as text.
        key: String,
        /// Why.
        message: String,
    },
}

/// An error with its sources, one after another (aya's errors keep the errno in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(src) = next {
        s.push_str(": ");
        s.push_str(&src.to_string());
        next = src.source();
    }
    s
}

fn map_err(
    op: &'static str,
    map: &'static str,
    key: &dyn std::fmt::Debug,
) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    let key = format!("{key:?}");
    move |e| EbpfError::Map {
        op,
        map,
        key,
        message: chain(&e),
    }
}

/// Makes sure `dir` exists on a bpffs: mounts bpffs on `/sys/fs/bpf` when nothing is
/// mounted there (as systemd and Cilium do), creates the directory.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<(), EbpfError> {
    use nix::sys::statfs::{statfs, BPF_FS_MAGIC};
    let err = |message: String| EbpfError::Bpffs {
        path: dir.to_owned(),
        message,
    };
    let parent = dir
        .parent()
        .ok_or_else(|| err("has no parent directory".into()))?;
    let on_bpffs = |p: &Path| statfs(p).map(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if !on_bpffs(parent).map_err(|e| err(format!("statfs {}: {e}", parent.display())))? {
        if parent != Path::new("/sys/fs/bpf") {
            return Err(err(format!("{} is not on a bpffs", parent.display())));
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .output()
            .map_err(|e| err(format!("mount -t bpf: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "mount -t bpf bpf /sys/fs/bpf: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| err(format!("mkdir: {e}")))
}

/// Loads the object (maps pinned under `bpffs_dir`, existing pins reused) and every
/// program, with the verifier log at `log`. A program the verifier rejects fails with its
/// log in the error.
pub fn load(bpffs_dir: &Path, log: VerifierLogLevel) -> Result<Ebpf, EbpfError> {
    if super::OBJECT.is_empty() {
        return Err(EbpfError::Object(
            "this weir-proxy was built without eBPF programs (no nightly rust-src or \
             bpf-linker at build time; `cargo xtask test` installs them): rebuild it"
                .to_owned(),
        ));
    }
    drop_incompatible_pins(bpffs_dir, super::OBJECT)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpffs_dir)
        .verifier_log_level(log)
        .load(super::OBJECT)
        .map_err(|e| EbpfError::Object(chain(&e)))?;
    for (name, program) in ebpf.programs_mut() {
        let loaded = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSkb(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            _ => {
                return Err(EbpfError::Load {
                    program: name.to_owned(),
                    message: "unexpected program type".into(),
                })
            }
        };
        loaded.map_err(|e| EbpfError::Load {
            program: name.to_owned(),
            message: chain(&e),
        })?;
    }
    Ok(ebpf)
}

/// A pinned map whose layout differs from the object's map of that name.
#[derive(Debug, PartialEq, Eq)]
pub struct StaleLayout {
    /// The map's name (and pin file).
    pub map: String,
    /// (key size, value size, max entries) of the pinned map.
    pub pinned: (u32, u32, u32),
    /// (key size, value size, max entries) the object wants.
    pub wanted: (u32, u32, u32),
}

/// The pinned maps whose key size, value size or capacity differ from what `object`
/// defines (`pinned` gives a pin's layout by map name, `None` when not pinned). Pure: the
/// caller reads the pins.
pub fn stale_layouts(
    object: &[u8],
    mut pinned: impl FnMut(&str) -> Option<(u32, u32, u32)>,
) -> Result<Vec<StaleLayout>, EbpfError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| EbpfError::Object(chain(&e)))?;
    let mut stale: Vec<StaleLayout> = obj
        .maps
        .iter()
        .filter_map(|(name, m)| {
            let wanted = (m.key_size(), m.value_size(), m.max_entries());
            let have = pinned(name)?;
            (have != wanted).then(|| StaleLayout {
                map: name.clone(),
                pinned: have,
                wanted,
            })
        })
        .collect();
    stale.sort_by(|a, b| a.map.cmp(&b.map));
    Ok(stale)
}

/// Removes pinned maps left by a weir-proxy whose map layouts differ (an upgrade that
/// changed a key or value type): reusing them would fail the verifier or, worse, read
/// their entries with the wrong layout. The flows they translated lose their state; the
/// first sync refills the services and backends.
fn drop_incompatible_pins(dir: &Path, object: &[u8]) -> Result<(), EbpfError> {
    let stale = stale_layouts(object, |name| {
        let info = aya::maps::MapInfo::from_pin(dir.join(name)).ok()?;
        Some((info.key_size(), info.value_size(), info.max_entries()))
    })?;
    for s in stale {
        let path = dir.join(&s.map);
        tracing::warn!(
            map = %s.map,
            pinned = ?s.pinned,
            wanted = ?s.wanted,
            "a pinned map has another layout (left by an older weir-proxy): unpinning it"
        );
        std::fs::remove_file(&path).map_err(|e| EbpfError::Pin {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// The programs' names in the object.
pub fn program_names(ebpf: &Ebpf) -> Vec<String> {
    let mut v: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    v.sort();
    v
}

fn link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

/// The loaded programs, attached through pinned links, and the pinned maps.
pub struct KernelMaps {
    ebpf: Ebpf,
    settings: EbpfSettings,
    _links: Vec<PinnedLink>,
    /// tc filters attached through clsact (kernels without TCX): not pinnable, they go
    /// when the daemon exits.
    netlink_links: Vec<SchedClassifierLink>,
    /// Interfaces the tc programs are attached to.
    attached: BTreeSet<String>,
}

impl std::fmt::Debug for KernelMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelMaps").finish_non_exhaustive()
    }
}

/// An address as the maps' [`IpKey`].
pub fn ip_key(ip: IpAddr) -> IpKey {
    let a = super::render::addr_port(ip, 0, 0);
    IpKey {
        family: u32::from(a.family),
        addr: a.addr,
    }
}

/// Replaces the service CIDRs map's contents with `cidrs` (an adopted pin may hold an
/// earlier configuration's).
fn write_service_cidrs(ebpf: &mut Ebpf, cidrs: &[ipnetwork::IpNetwork]) -> Result<(), EbpfError> {
    let mut map: LpmTrie<&mut MapData, IpKey, u32> = ebpf
        .map_mut(SERVICE_CIDRS_MAP)
        .ok_or_else(|| missing_map(SERVICE_CIDRS_MAP))?
        .try_into()
        .map_err(map_err("open", SERVICE_CIDRS_MAP, &""))?;
    let old: Vec<LpmKey<IpKey>> = map.keys().filter_map(Result::ok).collect();
    for k in &old {
        map.remove(k)
            .map_err(map_err("delete", SERVICE_CIDRS_MAP, &k.data()))?;
    }
    for c in cidrs {
        let key = LpmKey::new(
            IP_KEY_FAMILY_BITS + u32::from(c.prefix()),
            ip_key(c.network()),
        );
        map.insert(&key, 1, 0)
            .map_err(map_err("update", SERVICE_CIDRS_MAP, c))?;
    }
    Ok(())
}

impl KernelMaps {
    /// Deletes the tc path's forward entries of the flows `filters` name as stale; returns
    /// how many.
    fn delete_stale_flows(
        &mut self,
        filters: &[crate::dataplane::conntrack::FlowFilter],
    ) -> Result<usize, EbpfError> {
        let mut ct: HashMap<&mut MapData, CtKey, CtValue> = self
            .ebpf
            .map_mut(CT_MAP)
            .ok_or_else(|| missing_map(CT_MAP))?
            .try_into()
            .map_err(map_err("open", CT_MAP, &""))?;
        let stale: Vec<CtKey> = ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| super::stale::stale_flow(filters, k, v))
            .map(|(k, _)| k)
            .collect();
        let mut deleted = 0;
        for k in &stale {
            match ct.remove(k) {
                Ok(()) => deleted += 1,
                // Evicted or expired meanwhile.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("delete", CT_MAP, k)(e)),
            }
        }
        Ok(deleted)
    }

    /// Loads and attaches the programs, adopting pinned maps (their contents are kept) and
    /// replacing pinned links of an earlier run (the new link is attached before the old
    /// one goes, so no socket call goes untranslated).
    pub fn open(s: &EbpfSettings) -> Result<Self, EbpfError> {
        use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
        let cg_err = |message: String| EbpfError::Cgroup {
            path: s.cgroup.clone(),
            message,
        };
        if s.cgroup_origin == CgroupOrigin::OwnMount {
            ensure_own_cgroup2(&s.cgroup)?;
        }
        let fs = statfs(&s.cgroup).map_err(|e| cg_err(format!("statfs: {e}")))?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(cg_err(
                "not a cgroup v2 directory (on hybrid hosts it is often /sys/fs/cgroup/unified)"
                    .into(),
            ));
        }
        tracing::info!(
            cgroup = %s.cgroup.display(),
            chosen_by = s.cgroup_origin.as_str(),
            bpffs = %s.bpffs_dir.display(),
            "eBPF socket hooks attach to this cgroup2"
        );
        ensure_bpffs_dir(&s.bpffs_dir)?;
        let mut ebpf = load(&s.bpffs_dir, VerifierLogLevel::default())?;
        write_service_cidrs(&mut ebpf, &s.service_cidrs)?;
        let cgroup = std::fs::File::open(&s.cgroup).map_err(|e| cg_err(format!("open: {e}")))?;
        let mut links = Vec::new();
        for (name, program) in ebpf.programs_mut() {
            let attach_err = |message: String| EbpfError::Attach {
                program: name.to_owned(),
                cgroup: s.cgroup.clone(),
                message,
            };
            // A cgroup bpf_link takes no flags (the kernel attaches links as
            // BPF_F_ALLOW_MULTI, beside other programs): `Single` passes none.
            let link_err = |e: aya::programs::links::LinkError| attach_err(chain(&e));
            let link: FdLink = match program {
                Program::CgroupSockAddr(p) => {
                    let id = p
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(|e| attach_err(chain(&e)))?;
                    let link = p.take_link(id).map_err(|e| attach_err(chain(&e)))?;
                    link.try_into().map_err(link_err)?
                }
                Program::CgroupSkb(p) => {
                    let ty = CgroupSkbAttachType::Egress;
                    let id = p
                        .attach(&cgroup, ty, CgroupAttachMode::Single)
                        .map_err(|e| attach_err(chain(&e)))?;
                    let link = p.take_link(id).map_err(|e| attach_err(chain(&e)))?;
                    link.try_into().map_err(link_err)?
                }
                _ => continue,
            };
            let path = link_path(&s.bpffs_dir, name);
            let pin_err = |message: String| EbpfError::Pin {
                path: path.clone(),
                message,
            };
            if path.exists() {
                // Dropping the unpinned old link detaches the previous run's program.
                let old = PinnedLink::from_pin(&path).map_err(|e| pin_err(chain(&e)))?;
                drop(old.unpin().map_err(|e| pin_err(chain(&e)))?);
            }
            links.push(link.pin(&path).map_err(|e| pin_err(chain(&e)))?);
        }
        Ok(KernelMaps {
            ebpf,
            settings: s.clone(),
            _links: links,
            netlink_links: Vec::new(),
            attached: BTreeSet::new(),
        })
    }

    /// Attaches the tc programs to `interface` (ingress and egress): a TCX link, pinned
    /// and replacing a previous run's the way the cgroup links do; on kernels without TCX,
    /// a clsact filter.
    fn attach_tc(&mut self, interface: &str) -> Result<(), EbpfError> {
        for (program, ty, tag) in [
            (TC_INGRESS, TcAttachType::Ingress, "in"),
            (TC_EGRESS, TcAttachType::Egress, "out"),
        ] {
            let err = |message: String| EbpfError::TcAttach {
                program,
                interface: interface.to_owned(),
                message,
            };
            let p: &mut SchedClassifier = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| err("not in the object".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| err(chain(&e)))?;
            let tcx = TcAttachOptions::TcxOrder(LinkOrder::default());
            match p.attach_with_options(interface, ty, tcx) {
                Ok(id) => {
                    let link = p.take_link(id).map_err(|e| err(chain(&e)))?;
                    let link: FdLink = link
                        .try_into()
                        .map_err(|e: aya::programs::links::LinkError| err(chain(&e)))?;
                    let path = self
                        .settings
                        .bpffs_dir
                        .join(format!("link_tc_{tag}_{interface}"));
                    let pin_err = |message: String| EbpfError::Pin {
                        path: path.clone(),
                        message,
                    };
                    if path.exists() {
                        let old = PinnedLink::from_pin(&path).map_err(|e| pin_err(chain(&e)))?;
                        drop(old.unpin().map_err(|e| pin_err(chain(&e)))?);
                    }
                    self._links
                        .push(link.pin(&path).map_err(|e| pin_err(chain(&e)))?);
                }
                Err(tcx_err) => {
                    // An existing clsact qdisc is fine.
                    let _ = aya::programs::tc::qdisc_add_clsact(interface);
                    let nl = TcAttachOptions::Netlink(NlOptions::default());
                    let id = p.attach_with_options(interface, ty, nl).map_err(|e| {
                        err(format!("TCX: {}; clsact: {}", chain(&tcx_err), chain(&e)))
                    })?;
                    let link = p.take_link(id).map_err(|e| err(chain(&e)))?;
                    self.netlink_links.push(link);
                }
            }
        }
        Ok(())
    }
}

/// Sets `net.ipv4.conf.IFACE.accept_local`: a masqueraded flow's reply leaves the ingress
/// program with the frontend as its source, which for a NodePort is the node's own
/// address, and the kernel would drop such a packet as a martian.
/// In a container /proc/sys is read-only: then the setting must already be in force, for
/// this interface or for `all` (the kernel ORs the two), as the DaemonSet's `sysctls` init
/// container makes it.
fn accept_local(interface: &str) -> Result<(), EbpfError> {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/accept_local");
    let Err(e) = std::fs::write(&path, "1") else {
        return Ok(());
    };
    let on = |p: &str| std::fs::read_to_string(p).is_ok_and(|v| v.trim() == "1");
    if on(&path) || on("/proc/sys/net/ipv4/conf/all/accept_local") {
        tracing::debug!(interface, error = %e, "accept_local is already on");
        return Ok(());
    }
    Err(EbpfError::TcAttach {
        program: TC_INGRESS,
        interface: interface.to_owned(),
        message: format!(
            "{path}: {e} (and net.ipv4.conf.all.accept_local is not 1: set it on the node, \
             as deploy/weir.yaml's sysctls init container does)"
        ),
    })
}

/// The interfaces holding one of `ips`, by name.
fn interfaces_holding(ips: &[IpAddr]) -> Result<BTreeSet<String>, EbpfError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| EbpfError::Interfaces(format!("getifaddrs: {e}")))?;
    let mut out = BTreeSet::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip: Option<IpAddr> = if let Some(v4) = sa.as_sockaddr_in() {
            Some(v4.ip().into())
        } else {
            sa.as_sockaddr_in6().map(|v6| v6.ip().into())
        };
        if ip.is_some_and(|ip| ips.contains(&ip)) {
            out.insert(a.interface_name);
        }
    }
    Ok(out)
}

impl MapStore for KernelMaps {
    fn attach_interfaces(&mut self, node_ips: &[IpAddr]) -> Result<(), EbpfError> {
        let wanted: BTreeSet<String> = if self.settings.interfaces.is_empty() {
            interfaces_holding(node_ips)?
        } else {
            self.settings.interfaces.iter().cloned().collect()
        };
        for i in wanted {
            if !self.attached.contains(&i) {
                self.attach_tc(&i)?;
                accept_local(&i)?;
                tracing::info!(interface = %i, "tc programs attached");
                self.attached.insert(i);
            }
        }
        Ok(())
    }

    fn write_cluster_ips(
        &mut self,
        current: Option<&BTreeSet<IpAddr>>,
        desired: &BTreeSet<IpAddr>,
    ) -> Result<(), EbpfError> {
        let mut map: HashMap<&mut MapData, IpKey, u32> = self
            .ebpf
            .map_mut(CLUSTER_IPS_MAP)
            .ok_or_else(|| missing_map(CLUSTER_IPS_MAP))?
            .try_into()
            .map_err(map_err("open", CLUSTER_IPS_MAP, &""))?;
        let read;
        let current: BTreeSet<IpKey> = match current {
            Some(c) => c.iter().map(|ip| ip_key(*ip)).collect(),
            None => {
                read = map.keys().filter_map(Result::ok).collect();
                read
            }
        };
        let want: BTreeSet<IpKey> = desired.iter().map(|ip| ip_key(*ip)).collect();
        for k in want.difference(&current) {
            map.insert(k, 1, 0)
                .map_err(map_err("update", CLUSTER_IPS_MAP, k))?;
        }
        for k in current.difference(&want) {
            match map.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("delete", CLUSTER_IPS_MAP, k)(e)),
            }
        }
        Ok(())
    }

    fn leave_stale_backends(
        &mut self,
        filters: &[crate::dataplane::conntrack::FlowFilter],
    ) -> Result<super::stale::Destroyed, EbpfError> {
        let flows = self.delete_stale_flows(filters)?;
        let revnat: HashMap<&MapData, RevNatKey, RevNatValue> = self
            .ebpf
            .map(REVNAT_MAP)
            .ok_or_else(|| missing_map(REVNAT_MAP))?
            .try_into()
            .map_err(map_err("open", REVNAT_MAP, &""))?;
        let frontend_of = |cookie: u64, peer: std::net::SocketAddr| {
            let key = RevNatKey {
                cookie,
                backend: super::render::addr_port(peer.ip(), peer.port(), 0),
                pad: 0,
            };
            revnat
                .get(&key, 0)
                .ok()
                .map(|front| super::render::socket_addr(&front))
        };
        let mut done =
            super::stale::destroy_stale(filters, Path::new(super::stale::NETNS_DIR), &frontend_of)?;
        done.flows = flows;
        Ok(done)
    }

    fn dump(&mut self) -> Result<MapContents, EbpfError> {
        Ok(MapContents {
            services: read_map(&self.ebpf, SERVICES_MAP)?,
            backends: read_map(&self.ebpf, BACKENDS_MAP)?,
            maglev: read_map(&self.ebpf, MAGLEV_MAP)?,
            source_ranges: read_source_ranges(&self.ebpf)?,
        })
    }

    fn apply(&mut self, plan: &MapPlan) -> Result<(), EbpfError> {
        let [s, b, m, r] = self.ebpf.maps_disjoint_mut([
            SERVICES_MAP,
            BACKENDS_MAP,
            MAGLEV_MAP,
            SOURCE_RANGES_MAP,
        ]);
        let mut ranges: LpmTrie<&mut MapData, SourceRange, u32> = r
            .ok_or_else(|| missing_map(SOURCE_RANGES_MAP))?
            .try_into()
            .map_err(map_err("open", SOURCE_RANGES_MAP, &""))?;
        let mut maglev: HashMap<&mut MapData, BackendKey, u32> = m
            .ok_or_else(|| missing_map(MAGLEV_MAP))?
            .try_into()
            .map_err(map_err("open", MAGLEV_MAP, &""))?;
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> = s
            .ok_or_else(|| missing_map(SERVICES_MAP))?
            .try_into()
            .map_err(map_err("open", SERVICES_MAP, &""))?;
        let mut backends: HashMap<&mut MapData, BackendKey, Backend> = b
            .ok_or_else(|| missing_map(BACKENDS_MAP))?
            .try_into()
            .map_err(map_err("open", BACKENDS_MAP, &""))?;
        for op in &plan.ops {
            match op {
                MapOp::UpsertBackend(k, v) => {
                    backends
                        .insert(k, v, 0)
                        .map_err(map_err("update", BACKENDS_MAP, k))?
                }
                MapOp::UpsertService(k, v) => {
                    services
                        .insert(k, v, 0)
                        .map_err(map_err("update", SERVICES_MAP, k))?
                }
                MapOp::DeleteService(k) => {
                    services
                        .remove(k)
                        .map_err(map_err("delete", SERVICES_MAP, k))?
                }
                MapOp::DeleteBackend(k) => {
                    backends
                        .remove(k)
                        .map_err(map_err("delete", BACKENDS_MAP, k))?
                }
                MapOp::UpsertMaglev(k, v) => maglev
                    .insert(k, v, 0)
                    .map_err(map_err("update", MAGLEV_MAP, k))?,
                MapOp::DeleteMaglev(k) => {
                    maglev.remove(k).map_err(map_err("delete", MAGLEV_MAP, k))?
                }
                MapOp::InsertSourceRange(len, k) => ranges
                    .insert(&LpmKey::new(*len, *k), 1, 0)
                    .map_err(map_err("update", SOURCE_RANGES_MAP, &(len, k)))?,
                MapOp::DeleteSourceRange(len, k) => ranges
                    .remove(&LpmKey::new(*len, *k))
                    .map_err(map_err("delete", SOURCE_RANGES_MAP, &(len, k)))?,
            }
        }
        Ok(())
    }
}

/// Every entry of the hash map `name`.
fn read_map<K, V, C>(ebpf: &Ebpf, name: &'static str) -> Result<C, EbpfError>
where
    K: aya::Pod,
    V: aya::Pod,
    C: FromIterator<(K, V)>,
{
    let map: HashMap<&MapData, K, V> = ebpf
        .map(name)
        .ok_or_else(|| missing_map(name))?
        .try_into()
        .map_err(map_err("open", name, &""))?;
    map.iter()
        .map(|kv| kv.map_err(map_err("iterate", name, &"")))
        .collect()
}

/// Every entry of the source ranges map (an LPM trie).
fn read_source_ranges(
    ebpf: &Ebpf,
) -> Result<std::collections::BTreeSet<(u32, SourceRange)>, EbpfError> {
    let map: LpmTrie<&MapData, SourceRange, u32> = ebpf
        .map(SOURCE_RANGES_MAP)
        .ok_or_else(|| missing_map(SOURCE_RANGES_MAP))?
        .try_into()
        .map_err(map_err("open", SOURCE_RANGES_MAP, &""))?;
    map.iter()
        .map(|kv| {
            kv.map(|(k, _)| (k.prefix_len(), k.data())).map_err(map_err(
                "iterate",
                SOURCE_RANGES_MAP,
                &"",
            ))
        })
        .collect()
}

fn missing_map(map: &'static str) -> EbpfError {
    EbpfError::Map {
        op: "open",
        map,
        key: String::new(),
        message: "not in the object".into(),
    }
}

/// Detaches every program weir attached from `bpffs_dir` (by removing its pinned links)
/// and removes the pinned maps and the directory. Returns how many pins were removed;
/// nothing to do is not an error.
pub fn cleanup(bpffs_dir: &Path) -> Result<usize, EbpfError> {
    let entries = match std::fs::read_dir(bpffs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(EbpfError::Bpffs {
                path: bpffs_dir.to_owned(),
                message: e.to_string(),
            })
        }
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let pin_err = |message: String| EbpfError::Pin {
            path: path.clone(),
            message,
        };
        if entry.file_name().to_string_lossy().starts_with("link_") {
            let link = PinnedLink::from_pin(&path).map_err(|e| pin_err(chain(&e)))?;
            drop(link.unpin().map_err(|e| pin_err(chain(&e)))?);
        } else {
            std::fs::remove_file(&path).map_err(|e| pin_err(chain(&e)))?;
        }
        removed += 1;
    }
    std::fs::remove_dir(bpffs_dir).map_err(|e| EbpfError::Bpffs {
        path: bpffs_dir.to_owned(),
        message: format!("rmdir: {e}"),
    })?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_whose_layout_differs_from_the_object_are_found() {
        if super::super::OBJECT.is_empty() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI builds the eBPF object"
            );
            return;
        }
        let obj = aya_obj::Object::parse(super::super::OBJECT).unwrap();
        let layout = |name: &str| {
            let m = &obj.maps[name];
            (m.key_size(), m.value_size(), m.max_entries())
        };
        let ct = layout("WEIR_CT");
        // Every map pinned as the object wants it, or not pinned: nothing stale.
        let none = stale_layouts(super::super::OBJECT, |n| Some(layout(n))).unwrap();
        assert!(none.is_empty(), "{none:?}");
        assert!(stale_layouts(super::super::OBJECT, |_| None)
            .unwrap()
            .is_empty());
        // The connection-tracking map pinned by an older build with a smaller key.
        let old = (16, 12, ct.2);
        let stale = stale_layouts(super::super::OBJECT, |n| {
            Some(if n == "WEIR_CT" { old } else { layout(n) })
        })
        .unwrap();
        assert_eq!(
            stale,
            vec![StaleLayout {
                map: "WEIR_CT".into(),
                pinned: old,
                wanted: ct,
            }]
        );
    }
}
