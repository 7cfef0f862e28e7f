//! podman 4.3 (Debian's) as a real CNI client of weir-cni: containers on a `weir` network
//! reach each other and a weir ClusterIP Service backed by a third container.
//!
//! Everything stays private to the test. podman runs inside a node network namespace the
//! test creates (`nsenter --net=`), so weir-cni's host ends and routes, and weir-proxy's
//! nftables table, live there; and inside a private mount namespace with a tmpfs on
//! /var/lib, so the files podman and libcni keep there whatever the configuration says
//! (the image blob-info cache in /var/lib/containers/cache, CNI results in
//! /var/lib/cni/results) never reach the machine. Its configuration (`CONTAINERS_CONF`,
//! `CONTAINERS_STORAGE_CONF`), image store, run state and CNI configuration directory are
//! under a temporary directory, its cgroups under a parent of its own that goes with it.
//!
//! Settings this machine needs: `network_backend = "cni"`, vfs storage, runtime runc (crun
//! fails on this cgroup setup), `default_ulimits` set (the defaults raise RLIMIT_NPROC,
//! which needs CAP_SYS_RESOURCE), cgroupfs and file events (no systemd). The image is a
//! busybox rootfs from Debian's `busybox-static`, brought in with `podman import` (no
//! registry). podman 4.3's libcni reads CNI results up to 1.0.0, so the conflist says
//! `"cniVersion": "1.0.0"`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use weir_e2e::{
    require_privileges, run, start_proxy, wait_until, workspace_bin, write_manifests, Netns,
};

const IMAGE: &str = "localhost/weir-busybox:test";
const CLUSTER_IP: &str = "10.96.0.40";
const POD_CIDR: &str = "10.244.1.0/24";
const METRICS: u16 = 19480;

/// podman, runc, nsenter and a static busybox, or a skip (a failure under `CI=true`,
/// where .ci/run installs them).
fn tools_present() -> bool {
    let mut missing = Vec::new();
    for (tool, arg) in [
        ("podman", "--version"),
        ("runc", "--version"),
        ("nsenter", "--version"),
        ("tar", "--version"),
    ] {
        if !Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            missing.push(tool);
        }
    }
    // busybox-static's /bin/busybox runs in a rootfs without a dynamic loader.
    if run("dpkg", &["-s", "busybox-static"]).is_err() {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "missing {missing:?}: apt-get install podman runc busybox-static (.ci/run does); under CI=true this test must not be skipped"
    );
    eprintln!("skipped: missing {missing:?} (apt-get install podman runc busybox-static)");
    false
}

/// A private podman setup whose containers live in `node`; every container is removed
/// on drop (before the namespace and the directory go).
struct Podman {
    node: Netns,
    dir: tempfile::TempDir,
    /// Holds the private mount namespace (tmpfs on /var/lib); podman runs in it.
    mount_ns: std::process::Child,
    /// `--cgroup-parent` of every container (cgroupfs makes it in each hierarchy; runc
    /// cannot run without cgroups), removed on drop.
    cgroup_parent: String,
}

impl Podman {
    fn new() -> Podman {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for d in ["net.d", "graph", "run", "tmp", "cni-state", "rootfs/bin"] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        let cni_bin = workspace_bin("weir-cni");
        assert!(cni_bin.exists(), "{} is missing", cni_bin.display());
        let cni_dir = cni_bin.parent().unwrap().display().to_string();
        std::fs::write(
            p.join("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{cni_dir}", "/usr/lib/cni"]
network_config_dir = "{net_d}"
default_network = "weir"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp}"
"#,
                net_d = p.join("net.d").display(),
                tmp = p.join("tmp").display(),
            ),
        )
        .unwrap();
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                p.join("graph").display(),
                p.join("run").display()
            ),
        )
        .unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weir",
            "plugins": [{
                "type": "weir-cni",
                "podCIDRs": [POD_CIDR],
                "mtu": 1500,
                "stateDir": p.join("cni-state"),
            }],
        });
        std::fs::write(p.join("net.d/10-weir.conflist"), conflist.to_string()).unwrap();

        let node = Netns::new("podman").unwrap();
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
        ] {
            node.sysctl(k, v).unwrap();
        }
        let cgroup_parent = format!("/weir-podman-test-{}", std::process::id());
        let mount_ns = private_var_lib();
        let pm = Podman {
            node,
            dir,
            mount_ns,
            cgroup_parent,
        };
        pm.import_busybox();
        pm
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `podman ARGS` inside the node's network namespace and the private mount namespace,
    /// with the private configuration.
    fn podman(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("nsenter")
            .args(["--target", &self.mount_ns.id().to_string(), "--mount"])
            .arg(format!("--net=/run/netns/{}", self.node.name()))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.path().join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path().join("storage.conf"))
            .output()
            .map_err(|e| format!("podman {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "podman {args:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A rootfs of /bin/busybox and its applet links, tarred and `podman import`ed.
    fn import_busybox(&self) {
        let rootfs = self.path().join("rootfs");
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let list = run("/bin/busybox", &["--list"]).unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
            }
        }
        for d in ["etc", "tmp", "proc", "sys", "dev", "www"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        let tar = self.path().join("busybox.tar");
        run(
            "tar",
            &[
                "-C",
                &rootfs.display().to_string(),
                "-cf",
                &tar.display().to_string(),
                ".",
            ],
        )
        .unwrap();
        self.podman(&["import", &tar.display().to_string(), IMAGE])
            .unwrap();
    }

    /// Starts container `name` on the weir network: busybox httpd on 8080 answering `/`
    /// with its name. Returns its address once it answers (asked from the node).
    fn run_server(&self, name: &str) -> String {
        let script = format!("echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www");
        self.podman(&[
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            "weir",
            "--cgroup-parent",
            &self.cgroup_parent,
            IMAGE,
            "sh",
            "-c",
            &script,
        ])
        .unwrap();
        let ip = self
            .podman(&[
                "inspect",
                "-f",
                "{{.NetworkSettings.Networks.weir.IPAddress}}",
                name,
            ])
            .unwrap();
        let probe = workspace_bin("weir-probe").display().to_string();
        let addr = format!("{ip}:8080");
        wait_until(
            &format!("{name}'s httpd on {addr}"),
            Duration::from_secs(10),
            || {
                self.node
                    .exec(&[&probe, "get", &addr, "/"])
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == name)
            },
        )
        .unwrap();
        ip
    }

    /// `wget` in container `from` (busybox): the body of `http://addr/`. Bounded with
    /// busybox `timeout` (busybox 1.35's own `wget -T` crashes with SIGSEGV).
    fn fetch(&self, from: &str, addr: &str) -> Result<String, String> {
        self.podman(&[
            "exec",
            from,
            "timeout",
            "5",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{addr}/"),
        ])
    }

    fn id(&self, name: &str) -> String {
        self.podman(&["inspect", "-f", "{{.Id}}", name]).unwrap()
    }

    fn network_dir(&self) -> PathBuf {
        self.path().join("cni-state/weir")
    }

    /// weir-cni's attachment records: file name → record.
    fn records(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.network_dir().join("attachments")).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let v = serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
            out.push((name, v));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Addresses in weir-cni's IPAM database.
    fn allocations(&self) -> BTreeSet<String> {
        let text = std::fs::read_to_string(self.network_dir().join("ipam.json")).unwrap();
        let db: Value = serde_json::from_str(&text).unwrap();
        db["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["ip"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The node's veths (host ends).
    fn host_veths(&self) -> BTreeSet<String> {
        let out = self
            .node
            .exec(&["ip", "-j", "link", "show", "type", "veth"])
            .unwrap();
        let links: Value = serde_json::from_slice(&out.stdout).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Err(e) = self.podman(&["rm", "-f", "-t", "0", "-a"]) {
            eprintln!("cleanup: {e}");
        }
        let _ = self.mount_ns.kill();
        let _ = self.mount_ns.wait();
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        let parent = self.cgroup_parent.trim_start_matches('/');
        for h in hierarchies.flatten() {
            remove_cgroup_tree(&h.path().join(parent));
        }
    }
}

/// A process holding a new mount namespace (private propagation) with a tmpfs on
/// /var/lib; it waits until killed.
fn private_var_lib() -> std::process::Child {
    use std::io::BufRead;
    for p in [workspace_bin("weir-cni"), std::env::temp_dir()] {
        assert!(
            !p.starts_with("/var/lib"),
            "{} would be hidden by the private /var/lib",
            p.display()
        );
    }
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs -o mode=0755 weir-podman-test /var/lib && echo ready && exec sleep 3600")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        panic!("private mount namespace: {line:?}");
    }
    child
}

/// Removes a cgroup directory and the (empty) cgroups below it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}

fn cluster_ip_service(backend_ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: backend, namespace: demo}}\nspec:\n  type: ClusterIP\n  clusterIP: {CLUSTER_IP}\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: backend-1, namespace: demo, labels: {{kubernetes.io/service-name: backend}}}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n- {{addresses: [\"{backend_ip}\"], nodeName: node1, conditions: {{ready: true}}}}\n"
    )
}

#[test]
fn podman_containers_on_the_weir_network_reach_each_other_and_a_cluster_ip() {
    if !require_privileges() || !tools_present() {
        return;
    }
    let mut pm = Podman::new();
    // podman lists the conflist as a network whose driver is weir-cni.
    let networks = pm
        .podman(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"])
        .unwrap();
    assert!(networks.lines().any(|l| l == "weir weir-cni"), "{networks}");

    let ip1 = pm.run_server("c1");
    let ip2 = pm.run_server("c2");
    let ip3 = pm.run_server("c3");
    let ips = BTreeSet::from([ip1.clone(), ip2.clone(), ip3.clone()]);
    assert_eq!(ips.len(), 3, "{ips:?}");
    assert!(ips.iter().all(|ip| ip.starts_with("10.244.1.")), "{ips:?}");

    // weir-cni recorded each of podman's containers: its ID, the netns podman made, the
    // address podman reports.
    let records = pm.records();
    assert_eq!(records.len(), 3, "{records:?}");
    for (name, ip) in [("c1", &ip1), ("c2", &ip2), ("c3", &ip3)] {
        let id = pm.id(name);
        let (_, rec) = records
            .iter()
            .find(|(f, _)| *f == format!("{id}@eth0.json"))
            .unwrap_or_else(|| panic!("no record for {name} ({id}): {records:?}"));
        assert_eq!(rec["ips"], serde_json::json!([ip]), "{rec}");
        let sandbox = pm
            .podman(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name])
            .unwrap();
        assert_eq!(rec["netns"], sandbox.as_str(), "{rec}");
        // Inside the container's namespace (its file is mounted in podman's mount
        // namespace): the default route weir-cni made.
        let target = pm.mount_ns.id().to_string();
        let out = run(
            "nsenter",
            &[
                "--target",
                &target,
                "--mount",
                "nsenter",
                &format!("--net={sandbox}"),
                "ip",
                "route",
                "show",
                "default",
            ],
        )
        .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("default via 169.254.1.1 dev eth0"),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(pm.allocations(), ips);

    // Container to container.
    assert_eq!(pm.fetch("c1", &format!("{ip2}:8080")).unwrap(), "c2");
    assert_eq!(pm.fetch("c2", &format!("{ip1}:8080")).unwrap(), "c1");

    // weir-proxy in the same node namespace programs a ClusterIP backed by c3.
    let manifests = tempfile::tempdir().unwrap();
    write_manifests(manifests.path(), &cluster_ip_service(&ip3)).unwrap();
    start_proxy(&mut pm.node, manifests.path(), METRICS).unwrap();
    for from in ["c1", "c2"] {
        for _ in 0..3 {
            assert_eq!(
                pm.fetch(from, &format!("{CLUSTER_IP}:80")),
                Ok("c3".to_owned()),
                "{from} -> {CLUSTER_IP}:80"
            );
        }
    }

    // podman rm runs CNI DEL: c1's record, address and host veth go; the rest keep working.
    let veths = pm.host_veths();
    assert_eq!(veths.len(), 3, "{veths:?}");
    let id1 = pm.id("c1");
    pm.podman(&["rm", "-f", "-t", "0", "c1"]).unwrap();
    assert!(
        !pm.records().iter().any(|(f, _)| f.starts_with(&id1)),
        "c1's record is still there"
    );
    assert_eq!(pm.allocations(), BTreeSet::from([ip2.clone(), ip3.clone()]));
    assert_eq!(pm.host_veths().len(), 2);
    assert_eq!(
        pm.fetch("c2", &format!("{CLUSTER_IP}:80")),
        Ok("c3".to_owned())
    );
}
