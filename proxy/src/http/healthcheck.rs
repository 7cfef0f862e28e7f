//! kube-proxy's per-Service health-check server: for every Service with
//! `externalTrafficPolicy: Local` and a `spec.healthCheckNodePort`, an HTTP listener on that
//! port tells external load balancers whether this node has local endpoints for the Service.
//!
//! Any request path answers with
//! `{"service":{"namespace":"NS","name":"NAME"},"localEndpoints":N,"serviceProxyHealthy":BOOL}`,
//! status 200 when the node has local endpoints and the proxy is healthy, 503 otherwise, as
//! kube-proxy's `pkg/proxy/healthcheck` does.

use super::health::ProxyHealth;
use crate::objects::ObjectKey;
use axum::extract::State;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use axum::Router;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The load-balancer weight header kube-proxy sets to the number of local endpoints.
const ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

/// What one Service needs from the health-check server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheckService {
    /// The Service's `spec.healthCheckNodePort`.
    pub port: u16,
    /// How many ready endpoints of the Service run on this node.
    pub local_endpoints: usize,
}

/// A health-check listener could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    /// The Service was given port 0, which is not a health-check node port.
    #[error("health check for service {service}: port 0 is not a valid health-check node port")]
    NoPort {
        /// The Service.
        service: ObjectKey,
    },
    /// Binding or registering the listening socket failed.
    #[error("health check for service {service}: listening on port {port} ({addr}): {source}")]
    Listen {
        /// The Service.
        service: ObjectKey,
        /// The health-check port.
        port: u16,
        /// The address that could not be listened on.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl HealthCheckError {
    /// The Service whose listener failed.
    pub fn service(&self) -> &ObjectKey {
        match self {
            HealthCheckError::NoPort { service } | HealthCheckError::Listen { service, .. } => {
                service
            }
        }
    }

    /// The port that failed.
    pub fn port(&self) -> u16 {
        match self {
            HealthCheckError::NoPort { .. } => 0,
            HealthCheckError::Listen { port, .. } => *port,
        }
    }
}

/// Runs one HTTP listener per Service health-check port; see [`HealthCheckServer::sync`].
#[derive(Debug)]
pub struct HealthCheckServer {
    bind_addrs: Vec<IpAddr>,
    health: Arc<ProxyHealth>,
    running: Mutex<BTreeMap<ObjectKey, Instance>>,
}

/// The listeners of one Service.
#[derive(Debug)]
struct Instance {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    /// The listening sockets; emptied on drop so they close at once.
    sockets: Vec<Slot>,
    /// Dropped with the instance, which tells the serving tasks to shut down gracefully.
    _shutdown: watch::Sender<()>,
}

/// A listening socket shared between the serving task and the [`Instance`] that may close it.
type Slot = Arc<Mutex<Option<TcpListener>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Close the sockets synchronously: the port can be bound again as soon as
        // `sync` returns, and even within the same `sync`.
        for slot in &self.sockets {
            drop(lock(slot).take());
        }
    }
}

impl HealthCheckServer {
    /// `bind_addrs`: addresses to listen on (empty = all addresses, 0.0.0.0 and [::] as available).
    /// `health` decides `serviceProxyHealthy`.
    pub fn new(bind_addrs: Vec<IpAddr>, health: Arc<ProxyHealth>) -> Self {
        HealthCheckServer {
            bind_addrs,
            health,
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Makes the set of listeners match `services`: starts listeners for new services (or changed ports),
    /// stops the ones of services gone, and updates endpoint counts in place (no restart). Must be called
    /// from within a tokio runtime. Returns one error per service whose port could not be bound
    /// (naming the service and port); the others keep working; a failed one is retried on the next call.
    pub fn sync(&self, services: BTreeMap<ObjectKey, HealthCheckService>) -> Vec<HealthCheckError> {
        let mut running = lock(&self.running);
        // Stop first, so that a port given up by one Service can be taken by another.
        running.retain(|key, inst| match services.get(key) {
            Some(svc) if svc.port == inst.port => true,
            _ => {
                tracing::info!(service = %key, port = inst.port, "closing service health check");
                false
            }
        });
        let mut errors = Vec::new();
        for (key, svc) in services {
            if let Some(inst) = running.get(&key) {
                let old = inst
                    .local_endpoints
                    .swap(svc.local_endpoints, Ordering::Relaxed);
                if old != svc.local_endpoints {
                    tracing::debug!(
                        service = %key,
                        port = svc.port,
                        local_endpoints = svc.local_endpoints,
                        "updating service health check"
                    );
                }
                continue;
            }
            match self.start(&key, svc) {
                Ok(inst) => {
                    tracing::info!(
                        service = %key,
                        port = svc.port,
                        local_endpoints = svc.local_endpoints,
                        "opened service health check"
                    );
                    running.insert(key, inst);
                }
                Err(err) => {
                    tracing::warn!(
                        service = %key,
                        port = svc.port,
                        error = %err,
                        "failed to start service health check"
                    );
                    errors.push(err);
                }
            }
        }
        errors
    }

    /// Ports currently listening (for tests and metrics).
    pub fn listening_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = lock(&self.running).values().map(|i| i.port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    fn start(
        &self,
        key: &ObjectKey,
        svc: HealthCheckService,
    ) -> Result<Instance, HealthCheckError> {
        if svc.port == 0 {
            return Err(HealthCheckError::NoPort {
                service: key.clone(),
            });
        }
        let listeners = self.bind(key, svc.port)?;
        let local_endpoints = Arc::new(AtomicUsize::new(svc.local_endpoints));
        let state = Arc::new(HandlerState {
            service: key.clone(),
            local_endpoints: local_endpoints.clone(),
            health: self.health.clone(),
        });
        let (shutdown, shutdown_rx) = watch::channel(());
        let mut sockets = Vec::with_capacity(listeners.len());
        for (addr, listener) in listeners {
            let slot: Slot = Arc::new(Mutex::new(Some(listener)));
            sockets.push(slot.clone());
            let app = Router::new().fallback(answer).with_state(state.clone());
            let mut rx = shutdown_rx.clone();
            let signal = async move {
                // Resolves when the sender is dropped with its instance.
                while rx.changed().await.is_ok() {}
            };
            let service = key.clone();
            let serve =
                axum::serve(SharedListener { slot, addr }, app).with_graceful_shutdown(signal);
            tokio::spawn(async move {
                if let Err(err) = serve.await {
                    tracing::warn!(service = %service, %addr, error = %err, "service health check failed");
                }
                tracing::debug!(service = %service, %addr, "service health check stopped");
            });
        }
        Ok(Instance {
            port: svc.port,
            local_endpoints,
            sockets,
            _shutdown: shutdown,
        })
    }

    /// Binds `port` on every configured address, or on the wildcard addresses.
    fn bind(
        &self,
        key: &ObjectKey,
        port: u16,
    ) -> Result<Vec<(SocketAddr, TcpListener)>, HealthCheckError> {
        let listen = |ip: IpAddr| {
            let addr = SocketAddr::new(ip, port);
            listen(addr).map_err(|source| HealthCheckError::Listen {
                service: key.clone(),
                port,
                addr,
                source,
            })
        };
        if !self.bind_addrs.is_empty() {
            return self.bind_addrs.iter().map(|ip| listen(*ip)).collect();
        }
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        match listen_std(v6) {
            Ok(l6) => {
                // A dual-stack [::] socket also takes IPv4; 0.0.0.0 is needed only when
                // the socket is IPv6-only (net.ipv6.bindv6only = 1).
                #[allow(deprecated)]
                // Reading the option is fine; only setting it after bind is not.
                let dual_stack = l6.only_v6().map(|only| !only).unwrap_or(false);
                let l6 = register(l6).map_err(|source| HealthCheckError::Listen {
                    service: key.clone(),
                    port,
                    addr: v6,
                    source,
                })?;
                let mut out = vec![(v6, l6)];
                if !dual_stack {
                    out.push(listen(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?);
                }
                Ok(out)
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(HealthCheckError::Listen {
                service: key.clone(),
                port,
                addr: v6,
                source: e,
            }),
            Err(e) => {
                tracing::debug!(
                    service = %key,
                    port,
                    error = %e,
                    "IPv6 unavailable, service health check listens on IPv4 only"
                );
                Ok(vec![listen(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?])
            }
        }
    }
}

fn listen_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn register(l: std::net::TcpListener) -> io::Result<TcpListener> {
    TcpListener::from_std(l)
}

/// Binds synchronously (so that `sync` can report the error) and registers with tokio.
fn listen(addr: SocketAddr) -> io::Result<(SocketAddr, TcpListener)> {
    Ok((addr, register(listen_std(addr)?)?))
}

/// An [`axum::serve::Listener`] over a socket the owning [`Instance`] can close at any time;
/// once closed, it accepts nothing more and the graceful-shutdown signal ends the server.
struct SharedListener {
    slot: Slot,
    addr: SocketAddr,
}

impl Listener for SharedListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let accepted = std::future::poll_fn(|cx| match lock(&self.slot).as_ref() {
                Some(l) => l.poll_accept(cx),
                None => Poll::Pending,
            })
            .await;
            match accepted {
                Ok(conn) => return conn,
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Such as running out of file descriptors: back off as axum does.
                    tracing::warn!(addr = %self.addr, error = %e, "accepting health check connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What a health-check request reads.
struct HandlerState {
    service: ObjectKey,
    local_endpoints: Arc<AtomicUsize>,
    health: Arc<ProxyHealth>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: &'a ObjectKey,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

async fn answer(State(s): State<Arc<HandlerState>>) -> Response {
    let local_endpoints = s.local_endpoints.load(Ordering::Relaxed);
    let healthy = s.health.status(SystemTime::now()).healthy;
    let body = match serde_json::to_string(&Body {
        service: &s.service,
        local_endpoints,
        service_proxy_healthy: healthy,
    }) {
        Ok(body) => body,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let code = if local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(ENDPOINT_WEIGHT, HeaderValue::from(local_endpoints));
    (code, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    struct Reply {
        status: u16,
        headers: BTreeMap<String, String>,
        body: String,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind((LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn healthy() -> Arc<ProxyHealth> {
        Arc::new(ProxyHealth::new(Duration::from_secs(60)))
    }

    fn services(list: &[(&str, u16, usize)]) -> BTreeMap<ObjectKey, HealthCheckService> {
        list.iter()
            .map(|&(name, port, local_endpoints)| {
                (
                    ObjectKey::new("ns", name),
                    HealthCheckService {
                        port,
                        local_endpoints,
                    },
                )
            })
            .collect()
    }

    async fn request_on(mut s: TcpStream) -> Reply {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        Reply {
            status: status.parse().unwrap(),
            headers,
            body: body.to_owned(),
        }
    }

    async fn get(port: u16) -> Reply {
        request_on(TcpStream::connect((LOCALHOST, port)).await.unwrap()).await
    }

    #[tokio::test]
    async fn local_endpoints_answer_200_with_body_and_headers() {
        let port = free_port();
        let hc = HealthCheckServer::new(vec![LOCALHOST], healthy());
        assert!(hc.sync(services(&[("web", port, 2)])).is_empty());
        assert_eq!(hc.listening_ports(), vec![port]);
        let r = get(port).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "2");
    }

    #[tokio::test]
    async fn no_local_endpoints_answer_503() {
        let port = free_port();
        let hc = HealthCheckServer::new(vec![LOCALHOST], healthy());
        assert!(hc.sync(services(&[("web", port, 0)])).is_empty());
        let r = get(port).await;
        assert_eq!(r.status, 503);
        assert!(r
            .body
            .contains(r#""localEndpoints":0,"serviceProxyHealthy":true}"#));
        assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "0");
    }

    #[tokio::test]
    async fn count_updates_in_place_without_restart() {
        let port = free_port();
        let hc = HealthCheckServer::new(vec![LOCALHOST], healthy());
        assert!(hc.sync(services(&[("web", port, 2)])).is_empty());
        // A connection accepted before the update: a restart would close it.
        let early = TcpStream::connect((LOCALHOST, port)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(hc.sync(services(&[("web", port, 0)])).is_empty());
        let r = request_on(early).await;
        assert_eq!(r.status, 503);
        assert!(r.body.contains(r#""localEndpoints":0"#), "{}", r.body);
        assert!(hc.sync(services(&[("web", port, 3)])).is_empty());
        let r = get(port).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "3");
    }

    #[tokio::test]
    async fn unhealthy_proxy_answers_503() {
        let port = free_port();
        let health = Arc::new(ProxyHealth::new(Duration::from_millis(1)));
        health.queued_update(SystemTime::now() - Duration::from_secs(1));
        let hc = HealthCheckServer::new(vec![LOCALHOST], health.clone());
        assert!(hc.sync(services(&[("web", port, 2)])).is_empty());
        let r = get(port).await;
        assert_eq!(r.status, 503);
        assert!(r
            .body
            .ends_with(r#""localEndpoints":2,"serviceProxyHealthy":false}"#));
        health.updated(SystemTime::now());
        assert_eq!(get(port).await.status, 200);
    }

    #[tokio::test]
    async fn removing_or_moving_a_service_closes_its_port() {
        let (p1, p2) = (free_port(), free_port());
        let hc = HealthCheckServer::new(vec![LOCALHOST], healthy());
        assert!(hc.sync(services(&[("a", p1, 1)])).is_empty());
        assert_eq!(get(p1).await.status, 200);
        // Port change: the old port closes, the new one serves.
        assert!(hc.sync(services(&[("a", p2, 1)])).is_empty());
        assert!(TcpStream::connect((LOCALHOST, p1)).await.is_err());
        assert_eq!(get(p2).await.status, 200);
        // Another Service takes the freed port in the same sync that removes its owner.
        assert!(hc.sync(services(&[("b", p2, 1)])).is_empty());
        assert!(get(p2).await.body.contains(r#""name":"b""#));
        assert!(hc.sync(BTreeMap::new()).is_empty());
        assert!(hc.listening_ports().is_empty());
        assert!(TcpStream::connect((LOCALHOST, p2)).await.is_err());
        std::net::TcpListener::bind((LOCALHOST, p2)).unwrap();
    }

    #[tokio::test]
    async fn taken_port_is_an_error_for_that_service_only_and_retried() {
        let (taken, free) = (free_port(), free_port());
        let other = std::net::TcpListener::bind((LOCALHOST, taken)).unwrap();
        let hc = HealthCheckServer::new(vec![LOCALHOST], healthy());
        let want = services(&[("a", taken, 1), ("b", free, 1)]);
        let errors = hc.sync(want.clone());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let msg = errors[0].to_string();
        assert!(
            msg.contains("ns/a") && msg.contains(&taken.to_string()),
            "{msg}"
        );
        assert_eq!(errors[0].service(), &ObjectKey::new("ns", "a"));
        assert_eq!(errors[0].port(), taken);
        assert_eq!(hc.listening_ports(), vec![free]);
        assert_eq!(get(free).await.status, 200);
        drop(other);
        assert!(hc.sync(want).is_empty());
        assert_eq!(get(taken).await.status, 200);
    }

    #[tokio::test]
    async fn port_zero_is_rejected() {
        let hc = HealthCheckServer::new(vec![LOCALHOST], healthy());
        let errors = hc.sync(services(&[("a", 0, 1)]));
        assert!(matches!(
            errors.as_slice(),
            [HealthCheckError::NoPort { .. }]
        ));
        assert!(hc.listening_ports().is_empty());
    }

    #[tokio::test]
    async fn no_bind_addresses_listens_on_all() {
        let port = free_port();
        let hc = HealthCheckServer::new(Vec::new(), healthy());
        assert!(hc.sync(services(&[("web", port, 1)])).is_empty());
        assert_eq!(get(port).await.status, 200);
        drop(hc);
        assert!(TcpStream::connect((LOCALHOST, port)).await.is_err());
    }
}
