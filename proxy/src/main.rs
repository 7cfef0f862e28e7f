//! The weir-proxy daemon: parse flags, start the source, the sync runner and the HTTP
//! servers; or, with `--cleanup`, remove what weir programmed.

use anyhow::Context;
use std::sync::Arc;
use weir_proxy::config::{ProxyMode, SourceConfig};
use weir_proxy::dataplane::conntrack::Conntrack;
use weir_proxy::dataplane::nft::kernel::KernelNft;
use weir_proxy::dataplane::nft::render::RenderConfig;
use weir_proxy::http::healthcheck::HealthCheckServer;
use weir_proxy::http::{
    health::ProxyHealth, metrics::Metrics, serve_health, serve_metrics, HttpState,
};
use weir_proxy::model::ModelConfig;
use weir_proxy::source::{dir, kube};

/// A source task's future.
type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;
use weir_proxy::dataplane::ebpf::sync::EbpfDataplane;
use weir_proxy::dataplane::ipvs::sync::IpvsDataplane;
use weir_proxy::dataplane::nft::policy::POLICY_TABLE;
use weir_proxy::dataplane::nft::sync::{remove_tables, NftDataplane};
use weir_proxy::dataplane::none::NoServices;
use weir_proxy::dataplane::{Dataplane, DataplaneError};
use weir_proxy::sync::effects::SideEffects;
use weir_proxy::sync::policy::{PolicyConfig, PolicyController};
use weir_proxy::sync::runner::{Runner, RunnerConfig};

/// Source updates in flight between a source and the sync runner (backpressure: a relist
/// never holds all objects at once).
const UPDATE_QUEUE: usize = 256;

/// mimalloc, not glibc's malloc: a new manifest file of 10,000 Services is parsed on
/// worker threads while the sync runner records and frees what they allocated; with glibc
/// (one arena, [`weir_proxy::sys::malloc::limit_arenas`]) a quarter of the CPU went to its
/// locks and chunk consolidation, and the file took 4.2 s to read instead of 1.8 s.
/// Its memory purge is made immediate ([`weir_proxy::sys::malloc::purge_at_once`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the daemon; an operational error (bad flag, unreachable API server, a kernel
/// refusal) is printed as one message with its causes (`{:#}`), never with a backtrace,
/// whatever `RUST_BACKTRACE` says: backtraces are for panics, which are bugs.
fn main() -> std::process::ExitCode {
    match daemon() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn daemon() -> anyhow::Result<()> {
    weir_proxy::sys::malloc::purge_at_once();
    let one_arena = weir_proxy::sys::malloc::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if !one_arena {
        tracing::warn!("could not limit malloc to one arena; memory use may be higher");
    }
    let (args, file_warnings) = weir_proxy::kubeproxy_config::parse_args()?;
    for w in &file_warnings {
        tracing::warn!(config = ?args.config, "{w}");
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cfg = args.validate(&hostname)?;
    let kernel = KernelNft::with_library();
    if args.cleanup {
        // Every mode's objects go, as with kube-proxy's --cleanup.
        let pins = weir_proxy::dataplane::ebpf::kernel::cleanup(&cfg.ebpf.bpffs_dir)?;
        tracing::info!(dir = %cfg.ebpf.bpffs_dir.display(), pins, "removed weir's eBPF links and maps");
        let policy = kernel.clone().for_table(POLICY_TABLE);
        for k in [&kernel, &policy] {
            if let Some(e) = remove_tables(k).into_iter().next() {
                return Err(e.into());
            }
        }
        tracing::info!("removed weir's nftables tables");
        // IPVS virtual servers and weir-ipvs0 too, whichever mode is configured.
        let removed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(weir_proxy::dataplane::ipvs::apply::cleanup())?;
        tracing::info!(virtual_servers = removed, "removed IPVS state");
        return Ok(());
    }
    let metrics = Arc::new(Metrics::new());
    remove_other_modes(&cfg, &kernel, &metrics)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(cfg, kernel, metrics))
}

/// What another proxy mode left programmed goes at start (as kube-proxy cleans up the other
/// proxiers' rules), so switching `mode` in the ConfigMap and rolling the DaemonSet leaves
/// nothing of the previous mode: eBPF mode's pins (links and maps) unless this is eBPF
/// mode; the `weir` service tables in eBPF mode (nftables and IPVS mode use them); IPVS
/// virtual servers unless this is IPVS mode. The policy table serves every mode and stays.
///
/// With `--run-service-proxy=false` every mode's Service state goes (another proxy serves
/// Services now).
///
/// A service table that cannot be removed is not fatal: the failure is counted in
/// `kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family}` (as kube-proxy
/// counts its failed nftables cleanups) and the eBPF runner retries at its syncs.
fn remove_other_modes(
    cfg: &weir_proxy::config::Config,
    kernel: &KernelNft,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let mode = cfg.run_service_proxy.then_some(cfg.mode);
    if mode != Some(ProxyMode::Ebpf) {
        let pins = weir_proxy::dataplane::ebpf::kernel::cleanup(&cfg.ebpf.bpffs_dir)
            .context("removing eBPF mode's pins")?;
        if pins > 0 {
            tracing::info!(dir = %cfg.ebpf.bpffs_dir.display(), pins, "removed the eBPF mode's links and maps");
        }
    }
    if !matches!(mode, Some(ProxyMode::Nftables | ProxyMode::Ipvs)) {
        for e in remove_tables(kernel) {
            if let DataplaneError::Nft { family, .. } = e {
                metrics.nftables_cleanup_failed(family);
            }
            tracing::warn!(error = %e, "removing the nftables mode's service table failed; retrying at the first sync");
        }
    }
    if mode != Some(ProxyMode::Ipvs) {
        let removed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(weir_proxy::dataplane::ipvs::apply::cleanup());
        match removed {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                virtual_servers = n,
                "removed the IPVS mode's virtual servers"
            ),
            Err(e) => tracing::debug!(error = %e, "no IPVS state to remove"),
        }
    }
    Ok(())
}

/// The dataplane of the configured mode.
enum ModeDataplane {
    /// `--run-service-proxy=false`.
    None(NoServices<KernelNft>),
    /// `--proxy-mode nftables`.
    Nft(NftDataplane<KernelNft>),
    /// `--proxy-mode ebpf`.
    Ebpf(EbpfDataplane<KernelNft>),
    /// `--proxy-mode ipvs`.
    Ipvs(IpvsDataplane<KernelNft>),
}

/// Starts the sync runner over `dataplane`, fed by `rx`.
fn spawn_runner<D: Dataplane>(
    cfg: RunnerConfig,
    dataplane: D,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    effects: SideEffects,
    rx: tokio::sync::mpsc::Receiver<weir_proxy::source::SourceUpdate>,
) -> tokio::task::JoinHandle<()> {
    let runner = Runner::new(cfg, dataplane, metrics, health).with_effects(effects);
    tokio::spawn(runner.run(rx))
}

async fn run(
    cfg: weir_proxy::config::Config,
    kernel: KernelNft,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let health = Arc::new(ProxyHealth::new(cfg.sync_period * 2));
    let state = Arc::new(HttpState {
        // Without Services, /proxyMode names no mode of weir's: another proxy serves them.
        mode: if cfg.run_service_proxy {
            cfg.mode.as_str().to_owned()
        } else {
            "none".to_owned()
        },
        metrics: metrics.clone(),
        health: health.clone(),
        configz: serde_json::to_value(&cfg)?,
    });
    let ml = tokio::net::TcpListener::bind(cfg.metrics_bind_address)
        .await
        .with_context(|| {
            format!(
                "binding --metrics-bind-address {}",
                cfg.metrics_bind_address
            )
        })?;
    let hl = tokio::net::TcpListener::bind(cfg.healthz_bind_address)
        .await
        .with_context(|| {
            format!(
                "binding --healthz-bind-address {}",
                cfg.healthz_bind_address
            )
        })?;
    let (tx, source_rx) = tokio::sync::mpsc::channel(UPDATE_QUEUE);
    let (proxy_tx, rx) = tokio::sync::mpsc::channel(UPDATE_QUEUE);
    // The source: checked before anything starts, so a bad flag fails fast.
    let (source_fut, source_desc): (BoxFuture, String) = match cfg.source.clone() {
        SourceConfig::Dir(path) => {
            if !path.is_dir() {
                anyhow::bail!("--source dir:{}: not a directory", path.display());
            }
            let desc = format!("dir:{}", path.display());
            (Box::pin(async move { Ok(dir::run(path, tx).await?) }), desc)
        }
        SourceConfig::Kube(kc) => {
            let client = kube::client(&kc).await?;
            let desc = match (&kc.master, &kc.kubeconfig) {
                (Some(m), _) => format!("kube:{m}"),
                (None, Some(k)) => format!("kube:{}", k.display()),
                (None, None) => "kube:in-cluster".to_owned(),
            };
            let h = health.clone();
            (
                Box::pin(async move { Ok(kube::run(client, kc, tx, h).await?) }),
                desc,
            )
        }
    };
    let runner_cfg = RunnerConfig {
        model: ModelConfig {
            node_name: cfg.node_name.clone(),
            nodeport_addresses: cfg.nodeport_addresses.clone(),
            local_addrs: Vec::new(),
        },
        min_sync_period: cfg.min_sync_period,
        sync_period: cfg.sync_period,
        full_sync_period: cfg.full_sync_period,
    };
    let render = RenderConfig {
        cluster_cidrs: cfg.cluster_cidrs.clone(),
        service_cidrs: cfg.service_cidrs.clone(),
        masquerade_all: cfg.masquerade_all,
        ipvs: cfg.mode == ProxyMode::Ipvs,
    };
    // healthCheckNodePort servers listen on every address, as kube-proxy's do by default.
    let services = cfg.run_service_proxy;
    let healthcheck =
        services.then(|| Arc::new(HealthCheckServer::new(Vec::new(), health.clone())));
    let conntrack = match Conntrack::open() {
        Ok(c) if services => Some(c),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "conntrack unavailable: stale UDP flows will not be deleted");
            None
        }
    };
    let mut effects = SideEffects::new(healthcheck, conntrack);
    if cfg.route_pod_cidrs {
        effects = effects.with_routes(weir_proxy::routes::RouteController::new()?);
    }
    if let Some(path) = &cfg.cni_pod_cidrs_file {
        effects = effects.with_cni_cidrs_file(path.clone());
    }
    // The mode's dataplane, set up (and any failure reported) before anything starts.
    let dataplane = if !services {
        tracing::info!("--run-service-proxy=false: Services are left to another proxy");
        ModeDataplane::None(NoServices::new(kernel.clone()))
    } else {
        match cfg.mode {
            ProxyMode::Nftables => ModeDataplane::Nft(NftDataplane::new(kernel.clone(), render)),
            ProxyMode::Ebpf => {
                let maps = weir_proxy::dataplane::ebpf::kernel::KernelMaps::open(&cfg.ebpf)
                    .context("setting up the eBPF dataplane")?;
                tracing::info!(cgroup = %cfg.ebpf.cgroup.display(), pins = %cfg.ebpf.bpffs_dir.display(), "eBPF programs attached");
                ModeDataplane::Ebpf(EbpfDataplane::new(
                    maps,
                    cfg.ebpf_lb_algorithm,
                    kernel.clone(),
                ))
            }
            ProxyMode::Ipvs => {
                let ipvs_cfg = weir_proxy::dataplane::ipvs::render::IpvsConfig {
                    scheduler: cfg.ipvs_scheduler,
                };
                let opts = weir_proxy::dataplane::ipvs::apply::IpvsOptions {
                    strict_arp: cfg.ipvs_strict_arp,
                    timeouts: cfg.ipvs_timeouts,
                };
                let ipvs = weir_proxy::dataplane::ipvs::apply::IpvsSync::new(ipvs_cfg, opts)
                    .context("IPVS mode")?;
                ModeDataplane::Ipvs(IpvsDataplane::new(
                    NftDataplane::new(kernel.clone(), render),
                    ipvs,
                ))
            }
        }
    };
    // NetworkPolicy: a second consumer of the same source, with its own table.
    let (policy_tx, policy) = if cfg.network_policy {
        let (ptx, prx) = tokio::sync::mpsc::channel(UPDATE_QUEUE);
        let controller = PolicyController::new(
            PolicyConfig {
                node_name: cfg.node_name.clone(),
                cni_state_dir: cfg.cni_state_dir.clone(),
                min_sync_period: cfg.min_sync_period,
                sync_period: cfg.sync_period,
            },
            kernel.clone().for_table(POLICY_TABLE),
            metrics.clone(),
        );
        (Some(ptx), Some(tokio::spawn(controller.run(prx))))
    } else {
        (None, None)
    };
    let _splitter = tokio::spawn(weir_proxy::source::split::run(
        source_rx, proxy_tx, policy_tx,
    ));
    tracing::info!(mode = cfg.mode.as_str(), node = %cfg.node_name, source = %source_desc, network_policy = cfg.network_policy, run_service_proxy = services, "weir-proxy starting");
    let mut source = tokio::spawn(source_fut);
    let mut runner = {
        let (m, h) = (metrics.clone(), health.clone());
        match dataplane {
            ModeDataplane::None(d) => spawn_runner(runner_cfg, d, m, h, effects, rx),
            ModeDataplane::Nft(d) => spawn_runner(runner_cfg, d, m, h, effects, rx),
            ModeDataplane::Ebpf(d) => spawn_runner(runner_cfg, d, m, h, effects, rx),
            ModeDataplane::Ipvs(d) => spawn_runner(runner_cfg, d, m, h, effects, rx),
        }
    };
    let mut ms = tokio::spawn(serve_metrics(ml, state.clone()));
    let mut hs = tokio::spawn(serve_health(hl, state));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = &mut source => { r??; anyhow::bail!("the source stopped") }
        _ = &mut runner => anyhow::bail!("the sync runner stopped"),
        _ = async { match policy { Some(p) => { let _ = p.await; } None => std::future::pending().await } } => {
            anyhow::bail!("the policy controller stopped")
        }
        r = &mut ms => { r??; anyhow::bail!("the metrics server stopped") }
        r = &mut hs => { r??; anyhow::bail!("the health server stopped") }
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Rules stay programmed on exit so traffic keeps flowing until the next start adopts them.
    tracing::info!("weir-proxy stopping; programmed rules and maps stay in place");
    Ok(())
}
