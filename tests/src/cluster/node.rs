//! One node of the cluster: its network namespace (from [`super::topology`]), plus a
//! "holder" process that owns the node's mount, UTS and cgroup namespaces, in which the
//! node's containerd and kubelet run, as a kind node container would give them:
//!
//! - its own cgroup of every hierarchy, `<our cgroup>/weir-cl-nodeN`, as the root of a
//!   cgroup namespace, with the hierarchies mounted afresh under /sys/fs/cgroup (cgroup v1
//!   controllers, cgroup2 at /sys/fs/cgroup/unified), so the kubelet's cgroup root, the
//!   pods' cgroups and eBPF mode's cgroup2 hooks all stay inside the node;
//! - private copies of the directories a node owns (`/etc/cni/net.d`, `/opt/cni/bin`,
//!   `/var/lib/kubelet`, `/var/lib/containerd`, `/run/containerd`, `/var/lib/weir-cni`,
//!   `/run/netns`, ...), bind-mounted from the node's state directory, and its own bpffs;
//!   after that every mount is made shared inside the node, as on a systemd host;
//! - hostname `nodeN`.
//!
//! A hostPath volume of a pod on node N therefore names node N's directory, as on a real
//! node. Every process of the node (holder, containerd, kubelet, shims, containers) is in
//! the node's cgroups, so `down` finds and kills all of them there.

use super::process::{self, run, Daemon};
use super::topology;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The directories private to each node (bind-mounted from its state directory).
pub const NODE_DIRS: [&str; 12] = [
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/run/containerd",
    "/var/lib/weir-cni",
    "/run/weir",
    "/run/netns",
    "/var/log/pods",
    "/var/log/containers",
    "/etc/kubernetes",
];

/// A cgroup hierarchy of the host, as mounted under /sys/fs/cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its mount point, e.g. `/sys/fs/cgroup/memory` or `/sys/fs/cgroup/unified`.
    pub mount: PathBuf,
    /// `cgroup` or `cgroup2`.
    pub fstype: String,
    /// The mount options naming it (`memory`, `cpu`, `none,name=systemd`), empty for cgroup2.
    pub options: String,
    /// This process's cgroup in it, e.g. `/` or `/process_api/5bcedcf9`.
    pub own_path: String,
}

/// The host's cgroup hierarchies under /sys/fs/cgroup (from /proc/self/mountinfo and
/// /proc/self/cgroup).
pub fn hierarchies() -> Result<Vec<Hierarchy>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let own = fs::read_to_string("/proc/self/cgroup")?;
    parse_hierarchies(&mountinfo, &own)
}

/// The pure part of [`hierarchies`].
pub fn parse_hierarchies(mountinfo: &str, own_cgroups: &str) -> Result<Vec<Hierarchy>> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split_whitespace().nth(4).unwrap_or("");
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let superopts = r.next().unwrap_or("");
        if !mount.starts_with("/sys/fs/cgroup/") || !matches!(fstype, "cgroup" | "cgroup2") {
            continue;
        }
        let (options, key): (String, Vec<String>) = if fstype == "cgroup2" {
            (String::new(), Vec::new())
        } else {
            let names: Vec<String> = superopts
                .split(',')
                .filter(|o| {
                    !matches!(
                        *o,
                        "rw" | "ro" | "nosuid" | "nodev" | "noexec" | "relatime" | "xattr"
                    ) && !o.starts_with("release_agent")
                        && *o != "clone_children"
                        && *o != "noprefix"
                })
                .map(str::to_owned)
                .collect();
            let opts = if names.iter().any(|n| n.starts_with("name=")) {
                let mut v = vec!["none".to_owned()];
                v.extend(names.iter().cloned());
                v.join(",")
            } else {
                names.join(",")
            };
            (opts, names)
        };
        let own_path = own_cgroups
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let _id = parts.next()?;
                let ctrls = parts.next()?;
                let path = parts.next()?;
                let matches = if fstype == "cgroup2" {
                    ctrls.is_empty()
                } else {
                    let mut have: Vec<&str> = ctrls.split(',').collect();
                    let mut want: Vec<&str> = key.iter().map(String::as_str).collect();
                    have.sort_unstable();
                    want.sort_unstable();
                    have == want
                };
                matches.then(|| path.to_owned())
            })
            .with_context(|| format!("no line of /proc/self/cgroup for {mount}"))?;
        out.push(Hierarchy {
            mount: PathBuf::from(mount),
            fstype: fstype.to_owned(),
            options,
            own_path,
        });
    }
    if out.is_empty() {
        bail!("no cgroup hierarchy is mounted under /sys/fs/cgroup");
    }
    Ok(out)
}

/// The cgroup directory of node `n` in a hierarchy.
pub fn node_cgroup(h: &Hierarchy, n: usize) -> PathBuf {
    h.mount
        .join(h.own_path.trim_start_matches('/'))
        .join(format!("{}{}", topology::NS_PREFIX, topology::node_name(n)))
}

/// Creates node `n`'s cgroup in every hierarchy (cpuset: with its parent's cpus and mems).
pub fn create_cgroups(hs: &[Hierarchy], n: usize) -> Result<Vec<PathBuf>> {
    let mut procs = Vec::new();
    for h in hs {
        let dir = node_cgroup(h, n);
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        if h.options.split(',').any(|o| o == "cpuset") {
            let parent = dir.parent().context("cgroup parent")?;
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = fs::read_to_string(parent.join(f)).unwrap_or_default();
                fs::write(dir.join(f), v.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
        procs.push(dir.join("cgroup.procs"));
    }
    Ok(procs)
}

/// Kills every process in node `n`'s cgroups (depth first) and removes them.
pub fn remove_cgroups(hs: &[Hierarchy], n: usize) -> Vec<String> {
    let mut removed = Vec::new();
    for round in 0..50 {
        let mut left = false;
        for h in hs {
            let dir = node_cgroup(h, n);
            if !dir.exists() {
                continue;
            }
            for pid in procs_below(&dir) {
                process::signal(pid, "KILL");
                left = true;
            }
        }
        if !left {
            break;
        }
        std::thread::sleep(Duration::from_millis(if round < 10 { 100 } else { 300 }));
    }
    for h in hs {
        let dir = node_cgroup(h, n);
        if dir.exists() {
            rmdir_depth_first(&dir);
            if !dir.exists() {
                removed.push(format!("cgroup {}", dir.display()));
            }
        }
    }
    removed
}

fn procs_below(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(procs_below(&e.path()));
            }
        }
    }
    out
}

fn rmdir_depth_first(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_depth_first(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// The holder's script: mounts inside the new namespaces, then sleeps as their owner.
pub fn holder_script(n: usize, state: &Path, hs: &[Hierarchy]) -> String {
    let mut s = String::from("set -e\n");
    s.push_str(&format!("hostname {}\n", topology::node_name(n)));
    s.push_str("mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup /sys/fs/cgroup\n");
    for h in hs {
        let m = h.mount.display();
        s.push_str(&format!("mkdir -p {m}\n"));
        if h.fstype == "cgroup2" {
            s.push_str(&format!(
                "mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 {m}\n"
            ));
        } else {
            s.push_str(&format!(
                "mount -t cgroup -o nosuid,nodev,noexec,{} cgroup {m}\n",
                h.options
            ));
        }
    }
    s.push_str("mount -t bpf -o mode=700 bpf /sys/fs/bpf\n");
    for d in NODE_DIRS {
        let src = node_dir(state, n, d);
        s.push_str(&format!(
            "mkdir -p {d} {src}\nmount --bind {src} {d}\n",
            src = src.display()
        ));
    }
    // As on a systemd host: mounts made below propagate to containers asking for it
    // (HostToContainer), peers only inside this node.
    s.push_str("mount --make-rshared /\n");
    s.push_str(&format!(
        "touch {}\n",
        state.join(format!("node{n}/holder-ready")).display()
    ));
    s.push_str("exec sleep infinity\n");
    s
}

/// Where node `n` keeps the directory `path` (e.g. `/var/lib/kubelet`).
pub fn node_dir(state: &Path, n: usize, path: &str) -> PathBuf {
    state
        .join(format!("node{n}/root"))
        .join(path.trim_start_matches('/'))
}

/// A command that moves itself into `procs` (each a `cgroup.procs` file) and then runs
/// `argv` via `exec`, keeping its pid.
fn in_cgroups(procs: &[PathBuf], argv: &[String]) -> Command {
    let mut cmd = Command::new("sh");
    let files: Vec<String> = procs.iter().map(|p| p.display().to_string()).collect();
    cmd.arg("-c")
        .arg(format!(
            "for f in {}; do echo $$ > \"$f\"; done; exec \"$@\"",
            files.join(" ")
        ))
        .arg("sh")
        .args(argv);
    cmd
}

/// Node `n`'s running namespaces.
pub struct NodeNamespaces {
    /// The node's index (from 1).
    pub n: usize,
    /// The holder process.
    pub holder: Daemon,
    /// The node's `cgroup.procs` files.
    pub procs: Vec<PathBuf>,
}

impl NodeNamespaces {
    /// Creates the node's cgroups and starts its holder; returns once its mounts are made.
    pub fn start(state: &Path, n: usize, hs: &[Hierarchy]) -> Result<NodeNamespaces> {
        let procs = create_cgroups(hs, n)?;
        let dir = state.join(format!("node{n}"));
        fs::create_dir_all(&dir)?;
        let ready = dir.join("holder-ready");
        let _ = fs::remove_file(&ready);
        let argv: Vec<String> = [
            "nsenter".to_owned(),
            format!("--net=/run/netns/{}", topology::node_ns(n)),
            "--".to_owned(),
            "unshare".to_owned(),
            "--mount".to_owned(),
            "--uts".to_owned(),
            "--cgroup".to_owned(),
            "--propagation".to_owned(),
            "private".to_owned(),
            "--".to_owned(),
            "sh".to_owned(),
            "-c".to_owned(),
            holder_script(n, state, hs),
        ]
        .into();
        let holder = process::spawn(
            state,
            &format!("node{n}-holder"),
            &mut in_cgroups(&procs, &argv),
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            process::check_running(&holder)?;
            if Instant::now() > deadline {
                bail!("node{n}'s holder did not make its mounts within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(NodeNamespaces { n, holder, procs })
    }

    /// Starts `argv` inside the node (its cgroups and every namespace of the holder).
    pub fn spawn(&self, state: &Path, name: &str, argv: &[String]) -> Result<Daemon> {
        let mut full = vec![
            "nsenter".to_owned(),
            "-t".to_owned(),
            self.holder.pid.to_string(),
            "--net".to_owned(),
            "--mount".to_owned(),
            "--uts".to_owned(),
            "--cgroup".to_owned(),
            "--".to_owned(),
        ];
        full.extend(argv.iter().cloned());
        process::spawn(
            state,
            &format!("node{}-{name}", self.n),
            &mut in_cgroups(&self.procs, &full),
        )
    }

    /// Runs a command inside the node to completion.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run(Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.pid.to_string())
            .args(["--net", "--mount", "--uts", "--"])
            .args(argv))
    }
}

/// Runs a command inside node `n`, found by its holder's pid file.
pub fn exec_in(state: &Path, n: usize, argv: &[&str]) -> Result<String> {
    let pid = process::read_pid_file(&process::pid_dir(state).join(format!("node{n}-holder.pid")))
        .with_context(|| format!("node{n} has no running holder (is the cluster up?)"))?;
    run(Command::new("nsenter")
        .arg("-t")
        .arg(pid.to_string())
        .args(["--net", "--mount", "--uts", "--"])
        .args(argv))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
37 31 0:32 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
38 31 0:33 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset,clone_children
";
    const OWN: &str = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_hierarchies_are_read_with_this_process_cgroups() {
        let hs = parse_hierarchies(MOUNTINFO, OWN).unwrap();
        let by = |m: &str| hs.iter().find(|h| h.mount == Path::new(m)).unwrap().clone();
        assert_eq!(hs.len(), 5);
        assert_eq!(by("/sys/fs/cgroup/unified").fstype, "cgroup2");
        assert_eq!(by("/sys/fs/cgroup/systemd").options, "none,name=systemd");
        assert_eq!(by("/sys/fs/cgroup/memory").own_path, "/process_api/abc");
        assert_eq!(by("/sys/fs/cgroup/cpuset").options, "cpuset");
        assert_eq!(
            node_cgroup(&by("/sys/fs/cgroup/memory"), 2),
            Path::new("/sys/fs/cgroup/memory/process_api/abc/weir-cl-node2")
        );
    }

    #[test]
    fn a_hierarchy_without_a_cgroup_line_is_an_error() {
        let err = parse_hierarchies(MOUNTINFO, "0::/\n").unwrap_err();
        assert!(format!("{err:#}").contains("/sys/fs/cgroup/"), "{err:#}");
    }

    #[test]
    fn the_holder_mounts_cgroups_bpffs_and_private_dirs_then_shares() {
        let hs = parse_hierarchies(MOUNTINFO, OWN).unwrap();
        let s = holder_script(1, Path::new("/st"), &hs);
        assert!(s.contains(
            "mount -t cgroup -o nosuid,nodev,noexec,memory cgroup /sys/fs/cgroup/memory"
        ));
        assert!(
            s.contains("mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup/unified")
        );
        assert!(s.contains("mount --bind /st/node1/root/var/lib/kubelet /var/lib/kubelet"));
        let shared = s.find("--make-rshared").unwrap();
        assert!(s.find("mount -t bpf").unwrap() < shared);
        assert!(s.trim_end().ends_with("exec sleep infinity"));
    }
}
