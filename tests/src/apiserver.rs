//! The API server test tier: a real kube-apiserver and etcd of the pinned release on loopback,
//! one instance per test on free ports, with kubectl of the same release to drive it.
//!
//! The binaries come from [`crate::k8s::ensure_built`] (built from the Go module proxy once,
//! cached under `/var/cache/weir/k8s/<release>`). Each [`ApiServer`] has its own directory on tmpfs
//! (`/dev/shm`: etcd's fsyncs on disk make requests time out) holding etcd's data, a
//! self-signed CA and serving certificate, service-account keys, a token file and
//! kubeconfigs; dropping it stops both processes and removes the directory. EndpointSlices
//! are the built-in `discovery.k8s.io/v1`.

use crate::cluster::control_plane::base64;
pub use crate::k8s::{ensure_built, release, Binaries};
use crate::k8s::{remove_stale, tail};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The Service CIDR the API server allocates ClusterIPs from.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The admin user's name (in `system:masters`).
pub const ADMIN_USER: &str = "weir-admin";

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// A user of the token file besides the admin, e.g. the daemon's ServiceAccount
/// (`system:serviceaccount:NS:NAME` with groups `system:serviceaccounts` and
/// `system:serviceaccounts:NS`), to prove RBAC rules are enough.
#[derive(Debug, Clone)]
pub struct TestUser {
    /// User name.
    pub name: String,
    /// Groups (besides `system:authenticated`, which every token user has).
    pub groups: Vec<String>,
}

/// How to start an [`ApiServer`].
#[derive(Debug, Clone, Default)]
pub struct ApiServerOptions {
    /// `--authorization-mode=RBAC` instead of AlwaysAllow (the admin is in system:masters).
    pub rbac: bool,
    /// The secure port; a free one when `None`.
    pub port: Option<u16>,
    /// Extra token users.
    pub users: Vec<TestUser>,
    /// Extra kube-apiserver flags.
    pub extra_args: Vec<String>,
}

impl ApiServerOptions {
    /// RBAC authorization.
    pub fn rbac() -> ApiServerOptions {
        ApiServerOptions {
            rbac: true,
            ..Default::default()
        }
    }

    /// Adds a token user.
    pub fn with_user(mut self, name: &str, groups: &[&str]) -> ApiServerOptions {
        self.users.push(TestUser {
            name: name.to_owned(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        });
        self
    }

    /// Adds the user a ServiceAccount's token would authenticate as.
    pub fn with_service_account(self, namespace: &str, name: &str) -> ApiServerOptions {
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let ns_group = format!("system:serviceaccounts:{namespace}");
        self.with_user(&user, &["system:serviceaccounts", &ns_group])
    }
}

/// A running etcd + kube-apiserver pair (see the module docs).
pub struct ApiServer {
    bins: Binaries,
    opts: ApiServerOptions,
    dir: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_client_port: u16,
    port: u16,
    token: String,
    /// (user, token, kubeconfig)
    users: Vec<(String, String, PathBuf)>,
}

impl ApiServer {
    /// Builds the binaries if the cache has none, starts etcd and kube-apiserver and waits
    /// until EndpointSlices are served.
    pub fn start(opts: ApiServerOptions) -> Result<ApiServer> {
        let bins = ensure_built().context("building kube-apiserver")?;
        let n = INSTANCES.fetch_add(1, Ordering::SeqCst);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        remove_stale(&base, "weir-apiserver-");
        let dir = base.join(format!("weir-apiserver-{}-{n}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut api = ApiServer {
            bins,
            opts,
            dir,
            etcd: None,
            apiserver: None,
            etcd_client_port: 0,
            port: 0,
            token: new_token(),
            users: Vec::new(),
        };
        api.setup_files()?;
        api.start_etcd()?;
        api.first_apiserver_start()?;
        api.wait_served()?;
        Ok(api)
    }

    /// Like [`ApiServer::start`], but where the API server cannot be built or started: a
    /// test failure under `CI=true`, otherwise `None` after saying why (the test skips).
    pub fn start_or_skip(opts: ApiServerOptions) -> Option<ApiServer> {
        match ApiServer::start(opts) {
            Ok(a) => Some(a),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "the API server tier must run under CI=true, but starting it failed: {e:#}"
                );
                eprintln!("skipped: no kube-apiserver: {e:#}");
                None
            }
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The secure port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin's bearer token (user [`ADMIN_USER`], group system:masters).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The admin kubeconfig (server URL, CA data, admin token).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The CA certificate that signed the serving certificate (PEM file).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// The instance directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The binaries in use (kubectl among them).
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// The token of an extra user from [`ApiServerOptions::users`].
    pub fn user_token(&self, user: &str) -> Option<&str> {
        self.users
            .iter()
            .find(|(u, _, _)| u == user)
            .map(|(_, t, _)| t.as_str())
    }

    /// The kubeconfig of an extra user from [`ApiServerOptions::users`].
    pub fn user_kubeconfig(&self, user: &str) -> Option<&Path> {
        self.users
            .iter()
            .find(|(u, _, _)| u == user)
            .map(|(_, _, k)| k.as_path())
    }

    /// Whether both processes are running.
    pub fn is_running(&mut self) -> bool {
        [&mut self.etcd, &mut self.apiserver]
            .into_iter()
            .all(|c| c.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))))
    }

    /// The last `n` lines of kube-apiserver's log (all its runs).
    pub fn apiserver_log_tail(&self, n: usize) -> String {
        tail(&self.dir.join("apiserver.log"), n)
    }

    /// Restarts kube-apiserver; etcd keeps its data. Watches open before end, and a watch
    /// resumed from a resource version of before the restart gets 410 Expired (the new
    /// watch cache starts at etcd's current revision).
    pub fn restart(&mut self) -> Result<()> {
        self.stop_apiserver()?;
        self.start_apiserver()
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL after 15 s): an outage until
    /// [`ApiServer::start_apiserver`].
    pub fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(c) = self.apiserver.take() {
            stop_child(c, "kube-apiserver")?;
        }
        Ok(())
    }

    /// Starts kube-apiserver again on the same port and waits until it serves EndpointSlices.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            bail!("kube-apiserver is already running");
        }
        self.spawn_apiserver()?;
        self.wait_ready()?;
        self.wait_served()
    }

    /// Runs kubectl as the admin; its stdout on success, its stderr in the error otherwise.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, "")
    }

    /// Runs kubectl as the admin with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        self.kubectl_with(&self.kubeconfig_path(), args, input)
    }

    /// Runs kubectl as an extra user from [`ApiServerOptions::users`].
    pub fn kubectl_as(&self, user: &str, args: &[&str]) -> Result<String> {
        let kc = self
            .user_kubeconfig(user)
            .ok_or_else(|| anyhow!("no test user {user}"))?;
        self.kubectl_with(kc, args, "")
    }

    fn kubectl_with(&self, kubeconfig: &Path, args: &[&str], input: &str) -> Result<String> {
        crate::cluster::kubectl(
            Command::new(&self.bins.kubectl)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .arg("--request-timeout=30s")
                .arg(format!(
                    "--cache-dir={}",
                    self.dir.join("kubectl-cache").display()
                )),
            args,
            input,
        )
    }

    /// `kubectl apply -f -` of one or more YAML documents.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml).map(|_| ())
    }

    /// `kubectl create -f -` of one or more YAML documents (fails if one exists).
    pub fn create_yaml(&self, yaml: &str) -> Result<()> {
        self.kubectl_stdin(&["create", "-f", "-"], yaml).map(|_| ())
    }

    /// Deletes one object, e.g. `delete("service", Some("default"), "web")` or
    /// `delete("endpointslice", Some("default"), "web-1")`; `namespace` is `None` for
    /// cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<()> {
        let mut args = vec!["delete", kind, name, "--wait=false"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.kubectl(&args).map(|_| ())
    }

    /// One object as JSON (`kubectl get KIND NAME -o json`).
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<Value> {
        let mut args = vec!["get", kind, name, "-o", "json"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let out = self.kubectl(&args)?;
        serde_json::from_str(&out).context("kubectl get printed no JSON")
    }

    /// GET of an API path (`kubectl get --raw PATH`), e.g.
    /// `/apis/discovery.k8s.io/v1/namespaces/default/endpointslices`.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let out = self.kubectl(&["get", "--raw", path])?;
        serde_json::from_str(&out).with_context(|| format!("GET {path} returned no JSON"))
    }

    /// The `metadata.resourceVersion` of a list, for starting a watch after it.
    pub fn list_resource_version(&self, list_path: &str) -> Result<String> {
        let v = self.get_json(list_path)?;
        v.pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{list_path}: no metadata.resourceVersion"))
    }

    /// Opens a watch on a collection path (e.g. `/api/v1/services`), from `resource_version`
    /// if given; its events arrive as they come (see [`Watch`]).
    pub fn watch(&self, path: &str, resource_version: Option<&str>) -> Result<Watch> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{sep}watch=true");
        if let Some(rv) = resource_version {
            url.push_str("&resourceVersion=");
            url.push_str(rv);
        }
        let mut child = Command::new(&self.bins.kubectl)
            .arg("--kubeconfig")
            .arg(self.kubeconfig_path())
            .args(["get", "--raw", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl get --raw (watch)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let child = Arc::new(Mutex::new(child));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader_child = Arc::clone(&child);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let msg = match serde_json::from_str(&line) {
                    Ok(v) => WatchMsg::Event(v),
                    Err(e) => WatchMsg::Ended(format!("not a watch event ({e}): {line}")),
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
            let mut err = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut err);
            let status = reader_child
                .lock()
                .ok()
                .and_then(|mut c| c.wait().ok())
                .map(|s| s.to_string())
                .unwrap_or_default();
            let _ = tx.send(WatchMsg::Ended(format!("{status}: {}", err.trim())));
        });
        Ok(Watch { child, rx })
    }

    /// Waits until `/readyz` answers ok (fails early if kube-apiserver exits).
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.apiserver.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.apiserver = None;
                    bail!(
                        "kube-apiserver exited ({status}); its log ends:\n{}",
                        self.apiserver_log_tail(30)
                    );
                }
            } else {
                bail!("kube-apiserver is not running");
            }
            if self.kubectl(&["get", "--raw", "/readyz"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?}; its log ends:\n{}",
                    self.apiserver_log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until discovery.k8s.io/v1 EndpointSlices are served (the API's discovery is
    /// complete a moment after /readyz).
    fn wait_served(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match self.get_json("/apis/discovery.k8s.io/v1/endpointslices") {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(last.context("discovery.k8s.io/v1 EndpointSlices not served"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Certificates, keys, token file and kubeconfigs.
    fn setup_files(&mut self) -> Result<()> {
        let pki = self.dir.join("pki");
        fs::create_dir_all(&pki)?;
        let p = |f: &str| pki.join(f).display().to_string();
        let openssl = |what: &str, args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .with_context(|| format!("{what}: starting openssl (apt-get install openssl)"))?;
            if !out.status.success() {
                bail!(
                    "{what}: openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        openssl(
            "test CA",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-subj",
                "/CN=weir-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.crt"),
            ],
        )?;
        openssl(
            "serving key",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=kube-apiserver",
                "-keyout",
                &p("server.key"),
                "-out",
                &p("server.csr"),
            ],
        )?;
        fs::write(
            pki.join("server.ext"),
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc\n",
        )?;
        openssl(
            "serving certificate",
            &[
                "x509",
                "-req",
                "-days",
                "3650",
                "-in",
                &p("server.csr"),
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-extfile",
                &p("server.ext"),
                "-out",
                &p("server.crt"),
            ],
        )?;
        openssl(
            "service-account key",
            &["genrsa", "-out", &p("sa.key"), "2048"],
        )?;
        openssl(
            "service-account public key",
            &["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")],
        )?;

        let mut tokens = format!(
            "{},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n",
            self.token
        );
        for (i, u) in self.opts.users.clone().iter().enumerate() {
            let token = new_token();
            tokens.push_str(&format!("{token},{},weir-test-user-{i}", u.name));
            if !u.groups.is_empty() {
                tokens.push_str(&format!(",\"{}\"", u.groups.join(",")));
            }
            tokens.push('\n');
            let kc = self.dir.join(format!("kubeconfig-user{i}"));
            self.users.push((u.name.clone(), token, kc));
        }
        fs::write(self.dir.join("tokens.csv"), tokens)?;
        Ok(())
    }

    /// (Re)writes the kubeconfigs for the current port.
    fn write_kubeconfigs(&self) -> Result<()> {
        let ca = fs::read(self.ca_path())?;
        let write = |path: &Path, user: &str, token: &str| {
            let text = format!(
                "apiVersion: v1\n\
                 kind: Config\n\
                 clusters:\n\
                 - name: weir-test\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
                 users:\n\
                 - name: {user:?}\n  user:\n    token: {token}\n\
                 contexts:\n\
                 - name: weir-test\n  context:\n    cluster: weir-test\n    user: {user:?}\n\
                 current-context: weir-test\n",
                self.url(),
                base64(&ca)
            );
            fs::write(path, text)
        };
        write(&self.kubeconfig_path(), ADMIN_USER, &self.token)?;
        for (user, token, path) in &self.users {
            write(path, user, token)?;
        }
        Ok(())
    }

    /// Starts etcd on free ports (trying again on other ports if those were taken).
    fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.join("etcd-data");
        let log = self.dir.join("etcd.log");
        let mut last = anyhow!("etcd did not start");
        for _ in 0..3 {
            let client = free_port()?;
            let peer = free_port()?;
            let _ = fs::remove_dir_all(&data);
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(&self.bins.etcd);
            cmd.arg("--name=weir-test")
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=weir-test={peer_url}"))
                .arg("--initial-cluster-state=new");
            let mut child = spawn_logged(&mut cmd, &log)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let healthy = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if etcd_healthy(client) {
                    break true;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if healthy {
                self.etcd = Some(child);
                self.etcd_client_port = client;
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            let tail = tail(&log, 20);
            last = anyhow!("etcd did not become healthy; its log ends:\n{tail}");
            if !tail.contains("address already in use") {
                break;
            }
        }
        Err(last)
    }

    /// The first kube-apiserver start, on a free port unless one was given (trying again
    /// on another free port if that one was taken meanwhile).
    fn first_apiserver_start(&mut self) -> Result<()> {
        let attempts = if self.opts.port.is_some() { 1 } else { 3 };
        let mut last = anyhow!("kube-apiserver did not start");
        for _ in 0..attempts {
            self.port = match self.opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            self.write_kubeconfigs()?;
            self.spawn_apiserver()?;
            match self.wait_ready() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let retry = format!("{e:#}").contains("address already in use");
                    let _ = self.stop_apiserver();
                    last = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn spawn_apiserver(&mut self) -> Result<()> {
        let pki = self.dir.join("pki");
        let f = |name: &str| pki.join(name).display().to_string();
        let authz = if self.opts.rbac {
            "RBAC"
        } else {
            "AlwaysAllow"
        };
        let mut cmd = Command::new(&self.bins.kube_apiserver);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.etcd_client_port
        ))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        // The apiserver would publish its loopback address as the `kubernetes` Service's
        // endpoint, which validation rejects: leave that Service without endpoints.
        .arg("--endpoint-reconciler-type=none")
        .arg(format!("--secure-port={}", self.port))
        .arg(format!("--tls-cert-file={}", f("server.crt")))
        .arg(format!("--tls-private-key-file={}", f("server.key")))
        .arg(format!("--client-ca-file={}", f("ca.crt")))
        .arg(format!(
            "--token-auth-file={}",
            self.dir.join("tokens.csv").display()
        ))
        .arg(format!("--authorization-mode={authz}"))
        // As kubeadm and kind run it: deploy/weir.yaml's sysctls step is privileged.
        .arg("--allow-privileged=true")
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .arg("--etcd-compaction-interval=10s")
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!("--service-account-key-file={}", f("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            f("sa.key")
        ))
        .arg("--profiling=false")
        .args(&self.opts.extra_args);
        self.apiserver = Some(spawn_logged(&mut cmd, &self.dir.join("apiserver.log"))?);
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(c) = self.apiserver.take() {
            let _ = stop_child(c, "kube-apiserver");
        }
        if let Some(c) = self.etcd.take() {
            let _ = stop_child(c, "etcd");
        }
        if std::env::var_os("WEIR_APISERVER_KEEP").is_some() {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a [`Watch`] yields.
#[derive(Debug)]
pub enum WatchMsg {
    /// One watch event (`{"type": ..., "object": ...}`); an `ERROR` event carries a Status,
    /// e.g. `code: 410, reason: Expired`.
    Event(Value),
    /// The stream ended (server closed it or went away): kubectl's exit and stderr.
    Ended(String),
}

impl WatchMsg {
    /// Whether this is an ERROR event with code 410 (Expired / Gone).
    pub fn is_expired(&self) -> bool {
        match self {
            WatchMsg::Event(v) => {
                v["type"] == "ERROR"
                    && (v["object"]["code"] == 410 || v["object"]["reason"] == "Expired")
            }
            WatchMsg::Ended(_) => false,
        }
    }
}

/// A raw watch stream (kubectl get --raw with `watch=true`), stopped on drop.
pub struct Watch {
    child: Arc<Mutex<Child>>,
    rx: Receiver<WatchMsg>,
}

impl Watch {
    /// The next event, or `None` if nothing came within `timeout`. After
    /// [`WatchMsg::Ended`], returns `Some(Ended)` immediately forever.
    pub fn recv(&self, timeout: Duration) -> Option<WatchMsg> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(WatchMsg::Ended("ended".to_owned())),
        }
    }

    /// Waits up to `timeout` for an event matching `pred`, skipping others; `None` if none
    /// came or the stream ended first.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.recv(left)? {
                WatchMsg::Event(v) if pred(&v) => return Some(v),
                WatchMsg::Event(_) => continue,
                WatchMsg::Ended(_) => return None,
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The reader thread holds the lock only once stdout has ended, i.e. kubectl is
        // exiting anyway.
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns a process in its own process group (a terminal's Ctrl-C reaches only us, and
/// we stop it in order), stdout and stderr appended to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// SIGTERM, then SIGKILL if the process has not exited within [`STOP_TIMEOUT`].
fn stop_child(mut child: Child, what: &str) -> Result<()> {
    if let Ok(Some(_)) = child.try_wait() {
        return Ok(());
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{what} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// GET /health on etcd's client port, plain HTTP/1.0.
fn etcd_healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.") && resp.contains("\"health\":\"true\"")
}

/// A bearer token unique enough for a test instance.
fn new_token() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "weir{:x}{:x}{:x}",
        nanos,
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn expired_events_are_recognized() {
        let ev: Value = serde_json::from_str(
            r#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired"}}"#,
        )
        .unwrap();
        assert!(WatchMsg::Event(ev).is_expired());
        assert!(!WatchMsg::Ended(String::new()).is_expired());
    }
}
