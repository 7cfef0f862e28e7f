//! The control plane, on the host: etcd (data on tmpfs), kube-apiserver on the fabric
//! address (RBAC + Node authorization, ServiceAccount tokens, NodeRestriction), and
//! kube-controller-manager and kube-scheduler with their own identities. Credentials:
//! a CA made with openssl signs the API server's serving certificate and its client
//! certificate for the kubelets; every other client authenticates with a token of the
//! token file (the admin in system:masters, the controller manager, the scheduler, each
//! kubelet as `system:node:<name>` in `system:nodes`).

use super::process::{self, Daemon};
use super::topology::{self, HOST_IP};
use crate::apiserver::SERVICE_CIDR;
use crate::k8s::Binaries;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The API server's port on [`HOST_IP`].
pub const API_PORT: u16 = 6443;
/// The pod network the controller manager splits into per-node CIDRs.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// etcd's client and peer ports (loopback).
const ETCD_PORTS: (u16, u16) = (12379, 12380);

/// The API server's URL.
pub fn api_url() -> String {
    format!("https://{HOST_IP}:{API_PORT}")
}

fn openssl(args: &[&str]) -> Result<()> {
    process::run(Command::new("openssl").args(args))
        .map(|_| ())
        .context("openssl (apt-get install openssl)")
}

/// The credentials of the cluster, under `<state>/pki`.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the CA, the API server's certificates, the service-account key pair and the
    /// token file for `nodes` kubelets.
    pub fn create(state: &Path, nodes: usize) -> Result<Pki> {
        let dir = state.join("pki");
        fs::create_dir_all(&dir)?;
        let pki = Pki { dir };
        let p = |f: &str| pki.path(f).display().to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=weir-cluster-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
        ])?;
        pki.sign(
            "apiserver",
            "/CN=kube-apiserver",
            &format!(
                "extendedKeyUsage=serverAuth\nsubjectAltName=IP:{HOST_IP},IP:127.0.0.1,\
                 IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
                 DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
            ),
        )?;
        pki.sign(
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "extendedKeyUsage=clientAuth\n",
        )?;
        openssl(&["genrsa", "-out", &p("sa.key"), "2048"])?;
        openssl(&["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])?;
        let mut tokens = String::new();
        for (user, groups) in Self::users(nodes) {
            tokens.push_str(&format!("{},{user},{user}", token_for(&user)));
            if !groups.is_empty() {
                tokens.push_str(&format!(",\"{groups}\""));
            }
            tokens.push('\n');
        }
        fs::write(pki.path("tokens.csv"), tokens)?;
        Ok(pki)
    }

    /// The credentials of a running cluster.
    pub fn open(state: &Path) -> Pki {
        Pki {
            dir: state.join("pki"),
        }
    }

    /// (user, groups) of the token file.
    fn users(nodes: usize) -> Vec<(String, String)> {
        let mut v = vec![
            ("weir-admin".to_owned(), "system:masters".to_owned()),
            ("system:kube-controller-manager".to_owned(), String::new()),
            ("system:kube-scheduler".to_owned(), String::new()),
            // The real kube-proxy of the baseline runs (the default system:node-proxier
            // binding names this user).
            ("system:kube-proxy".to_owned(), String::new()),
        ];
        for n in 1..=nodes {
            v.push((
                format!("system:node:{}", topology::node_name(n)),
                "system:nodes".to_owned(),
            ));
        }
        v
    }

    fn sign(&self, name: &str, subject: &str, ext: &str) -> Result<()> {
        let p = |f: &str| self.path(f).display().to_string();
        let ext_file = self.path(&format!("{name}.ext"));
        fs::write(
            &ext_file,
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n{ext}"
            ),
        )?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.csr")),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-days",
            "3650",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-extfile",
            &ext_file.display().to_string(),
            "-out",
            &p(&format!("{name}.crt")),
        ])
    }

    /// A file of the PKI directory.
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// Writes a kubeconfig for `user` (its token) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, user: &str) -> Result<()> {
        let ca = fs::read(self.path("ca.crt"))?;
        let token = self.token(user)?;
        fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: weir\n  cluster:\n    \
                 server: {}\n    certificate-authority-data: {}\nusers:\n- name: {user:?}\n  \
                 user:\n    token: {token}\ncontexts:\n- name: weir\n  context:\n    \
                 cluster: weir\n    user: {user:?}\ncurrent-context: weir\n",
                api_url(),
                base64(&ca)
            ),
        )
        .with_context(|| format!("writing {}", path.display()))
    }

    /// The token of `user` in the token file.
    pub fn token(&self, user: &str) -> Result<String> {
        let text = fs::read_to_string(self.path("tokens.csv"))?;
        text.lines()
            .find_map(|l| {
                let mut f = l.split(',');
                let token = f.next()?;
                (f.next()? == user).then(|| token.to_owned())
            })
            .with_context(|| format!("no token for {user}"))
    }
}

/// A token unique to this cluster and user.
fn token_for(user: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("weir{nanos:x}{h:x}")
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The admin kubeconfig of a cluster.
pub fn admin_kubeconfig(state: &Path) -> PathBuf {
    state.join("kubeconfig")
}

/// The etcd data directory (tmpfs).
pub fn etcd_dir(state: &Path) -> PathBuf {
    let name = state
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weir-cluster".to_owned());
    Path::new("/dev/shm").join(format!("{name}-etcd"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Starts etcd, kube-apiserver (waits for /readyz), kube-controller-manager and
/// kube-scheduler.
pub fn start(state: &Path, bins: &Binaries, pki: &Pki) -> Result<Vec<Daemon>> {
    let mut started = Vec::new();
    let data = etcd_dir(state);
    let _ = fs::remove_dir_all(&data);
    fs::create_dir_all(&data)?;
    let (client, peer) = ETCD_PORTS;
    let etcd = process::spawn(
        state,
        "etcd",
        Command::new(&bins.etcd)
            .arg("--name=weir-cluster")
            .arg(format!("--data-dir={}", s(&data.join("data"))))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!(
                "--initial-cluster=weir-cluster=http://127.0.0.1:{peer}"
            ))
            .arg("--initial-cluster-state=new")
            .arg("--listen-metrics-urls=http://127.0.0.1:12381"),
    )?;
    started.push(etcd.clone());

    let admin = admin_kubeconfig(state);
    pki.write_kubeconfig(&admin, "weir-admin")?;
    let cm_conf = state.join("controller-manager.conf");
    pki.write_kubeconfig(&cm_conf, "system:kube-controller-manager")?;
    let sched_conf = state.join("scheduler.conf");
    pki.write_kubeconfig(&sched_conf, "system:kube-scheduler")?;

    let f = |n: &str| s(&pki.path(n));
    let apiserver = process::spawn(
        state,
        "kube-apiserver",
        Command::new(&bins.kube_apiserver)
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg(format!("--bind-address={HOST_IP}"))
            .arg(format!("--advertise-address={HOST_IP}"))
            .arg(format!("--secure-port={API_PORT}"))
            .arg(format!("--tls-cert-file={}", f("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", f("apiserver.key")))
            .arg(format!("--client-ca-file={}", f("ca.crt")))
            .arg(format!("--token-auth-file={}", f("tokens.csv")))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--allow-privileged=true")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", f("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                f("sa.key")
            ))
            .arg(format!(
                "--kubelet-client-certificate={}",
                f("apiserver-kubelet-client.crt")
            ))
            .arg(format!(
                "--kubelet-client-key={}",
                f("apiserver-kubelet-client.key")
            ))
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--profiling=false"),
    )?;
    started.push(apiserver.clone());
    wait_ready(state, bins, &[&etcd, &apiserver])?;

    let cm = process::spawn(
        state,
        "kube-controller-manager",
        Command::new(&bins.kube_controller_manager)
            .arg(format!("--kubeconfig={}", s(&cm_conf)))
            .arg(format!("--authentication-kubeconfig={}", s(&cm_conf)))
            .arg(format!("--authorization-kubeconfig={}", s(&cm_conf)))
            .arg("--bind-address=127.0.0.1")
            .arg("--leader-elect=false")
            .arg("--use-service-account-credentials=true")
            .arg("--allocate-node-cidrs=true")
            .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
            .arg("--node-cidr-mask-size=24")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--root-ca-file={}", f("ca.crt")))
            .arg(format!(
                "--service-account-private-key-file={}",
                f("sa.key")
            ))
            .arg(format!("--cluster-signing-cert-file={}", f("ca.crt")))
            .arg(format!("--cluster-signing-key-file={}", f("ca.key")))
            .arg("--profiling=false"),
    )?;
    started.push(cm);
    let sched = process::spawn(
        state,
        "kube-scheduler",
        Command::new(&bins.kube_scheduler)
            .arg(format!("--kubeconfig={}", s(&sched_conf)))
            .arg(format!("--authentication-kubeconfig={}", s(&sched_conf)))
            .arg(format!("--authorization-kubeconfig={}", s(&sched_conf)))
            .arg("--bind-address=127.0.0.1")
            .arg("--leader-elect=false")
            .arg("--profiling=false"),
    )?;
    started.push(sched);
    Ok(started)
}

/// Waits until the API server answers /readyz (failing early, with its log, if etcd or
/// the API server exits).
fn wait_ready(state: &Path, bins: &Binaries, procs: &[&Daemon]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let kc = admin_kubeconfig(state);
    loop {
        for d in procs {
            process::check_running(d)?;
        }
        let ok = Command::new(&bins.kubectl)
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "kube-apiserver not ready after 120 s; its log ends:\n{}",
                process::tail(&process::log_path(state, "kube-apiserver"), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
