//! `cargo xtask apiserver`: a real kube-apiserver + etcd on loopback, in the foreground until
//! Ctrl-C, of the pinned release built from the Go module proxy on first use (see
//! `weir_e2e::k8s`).

use anyhow::{bail, Context, Result};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use weir_e2e::apiserver::{ApiServer, ApiServerOptions};
use weir_e2e::k8s;

/// `cargo xtask apiserver` arguments.
#[derive(clap::Args)]
pub struct ApiserverArgs {
    /// `--authorization-mode=RBAC` (the printed admin token is in system:masters) instead of
    /// AlwaysAllow.
    #[arg(long)]
    rbac: bool,
    /// Secure port (default: a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Only build (or find in the cache) the binaries, then exit.
    #[arg(long)]
    build_only: bool,
}

/// Builds if needed, then runs until Ctrl-C.
pub fn apiserver(args: ApiserverArgs) -> Result<()> {
    let started = Instant::now();
    let cached = k8s::cached().is_some();
    let bins = k8s::ensure_built()?;
    eprintln!(
        "kube-apiserver {} {} in {}: {:.1}s",
        k8s::release(),
        if cached { "found" } else { "built" },
        k8s::cache_dir().display(),
        started.elapsed().as_secs_f64()
    );
    if args.build_only {
        println!("{}", bins.kube_apiserver.display());
        println!("{}", bins.kubectl.display());
        println!("{}", bins.etcd.display());
        return Ok(());
    }

    let (tx, rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;

    let opts = ApiServerOptions {
        rbac: args.rbac,
        port: args.port,
        ..Default::default()
    };
    let mut api = ApiServer::start(opts)?;
    let kc = api.kubeconfig_path();
    println!("kubeconfig: {}", kc.display());
    println!("url: {}", api.url());
    println!("token: {}", api.token());
    println!(
        "kubectl: {} --kubeconfig {}",
        api.binaries().kubectl.display(),
        kc.display()
    );
    println!(
        "ready: kube-apiserver {} at {} ({}, discovery.k8s.io/v1 EndpointSlices served); Ctrl-C stops it",
        k8s::release(),
        api.url(),
        if args.rbac { "RBAC" } else { "AlwaysAllow" }
    );
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !api.is_running() {
                    let log = api.apiserver_log_tail(20);
                    drop(api);
                    bail!("etcd or kube-apiserver exited; kube-apiserver's log ends:\n{log}");
                }
            }
        }
    }
    eprintln!("stopping kube-apiserver and etcd");
    drop(api);
    eprintln!("stopped");
    Ok(())
}
