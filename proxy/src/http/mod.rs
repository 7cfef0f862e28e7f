//! HTTP endpoints: the metrics server (`/proxyMode`, `/metrics`, `/healthz`, `/configz`) and
//! the health server (`/healthz`, `/livez`), as kube-proxy serves them, and the per-Service
//! health-check listeners ([`healthcheck`]).

pub mod health;
pub mod healthcheck;
pub mod metrics;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use health::ProxyHealth;
use metrics::{Metrics, Probe};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::net::TcpListener;

/// What the handlers read.
pub struct HttpState {
    /// Proxy mode name, served by `/proxyMode`.
    pub mode: String,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Sync health.
    pub health: Arc<ProxyHealth>,
    /// Effective configuration, served by `/configz`.
    pub configz: serde_json::Value,
}

/// Serving failed.
#[derive(Debug, thiserror::Error)]
#[error("serving HTTP: {0}")]
pub struct HttpError(#[from] std::io::Error);

/// Serves `/proxyMode`, `/metrics`, `/healthz` and `/configz`. This `/healthz` answers as
/// the health server's does but is not counted in `kubeproxy_proxy_healthz_total` (as
/// kube-proxy counts only its health server's probes).
pub async fn serve_metrics(listener: TcpListener, state: Arc<HttpState>) -> Result<(), HttpError> {
    let app = Router::new()
        .route("/proxyMode", get(proxy_mode))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/configz", get(configz))
        .with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

/// Serves `/healthz` and `/livez`, counting each answer by status in
/// `kubeproxy_proxy_healthz_total{code}` and `kubeproxy_proxy_livez_total{code}`.
pub async fn serve_health(listener: TcpListener, state: Arc<HttpState>) -> Result<(), HttpError> {
    let app = Router::new()
        .route("/healthz", get(counted_healthz))
        .route("/livez", get(counted_livez))
        .with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn proxy_mode(State(s): State<Arc<HttpState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        s.mode.clone(),
    )
        .into_response()
}

async fn metrics_text(State(s): State<Arc<HttpState>>) -> Response {
    match s.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn configz(State(s): State<Arc<HttpState>>) -> Response {
    let body = serde_json::json!({ "kubeproxy.config.k8s.io": s.configz });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_nanos(t).to_string())
        .unwrap_or_else(|| "0001-01-01T00:00:00Z".to_owned())
}

/// The health answer; `probe` names the health server's probe to count it under (`None`:
/// the metrics server's `/healthz`, not counted).
fn health_body(s: &HttpState, with_node: bool, probe: Option<Probe>) -> Response {
    let st = s.health.status(SystemTime::now());
    let mut body = serde_json::json!({
        "lastUpdated": rfc3339(st.last_updated),
        "currentTime": rfc3339(Some(st.current_time)),
    });
    if with_node {
        body["nodeEligible"] = serde_json::Value::Bool(true);
    }
    if !st.source_healthy {
        body["sourceHealthy"] = serde_json::Value::Bool(false);
    }
    let code = if st.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if let Some(probe) = probe {
        s.metrics.count_probe(probe, code.as_u16());
    }
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn healthz(State(s): State<Arc<HttpState>>) -> Response {
    health_body(&s, true, None)
}

async fn counted_healthz(State(s): State<Arc<HttpState>>) -> Response {
    health_body(&s, true, Some(Probe::Healthz))
}

async fn counted_livez(State(s): State<Arc<HttpState>>) -> Response {
    health_body(&s, false, Some(Probe::Livez))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_answer_like_kube_proxy() {
        let health = Arc::new(ProxyHealth::new(std::time::Duration::from_secs(60)));
        let state = Arc::new(HttpState {
            mode: "nftables".into(),
            metrics: Arc::new(Metrics::new()),
            health: health.clone(),
            configz: serde_json::json!({"mode": "nftables"}),
        });
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a1 = l1.local_addr().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a2 = l2.local_addr().unwrap();
        tokio::spawn(serve_metrics(l1, state.clone()));
        tokio::spawn(serve_health(l2, state));
        let pm = get(a1, "/proxyMode").await;
        assert!(pm.starts_with("HTTP/1.1 200"), "{pm}");
        assert!(pm.contains("content-type: text/plain"), "{pm}");
        assert!(pm.ends_with("\r\n\r\nnftables"), "{pm:?}");
        assert!(get(a1, "/metrics")
            .await
            .contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"));
        assert!(get(a1, "/configz")
            .await
            .contains(r#"{"kubeproxy.config.k8s.io":{"mode":"nftables"}}"#));
        let hz = get(a2, "/healthz").await;
        assert!(
            hz.starts_with("HTTP/1.1 200") && hz.contains("\"nodeEligible\":true"),
            "{hz}"
        );
        let lz = get(a2, "/livez").await;
        assert!(
            lz.starts_with("HTTP/1.1 200") && !lz.contains("nodeEligible"),
            "{lz}"
        );
        health.queued_update(SystemTime::now() - std::time::Duration::from_secs(120));
        assert!(get(a2, "/healthz").await.starts_with("HTTP/1.1 503"));
        assert!(get(a1, "/healthz").await.starts_with("HTTP/1.1 503"));
        let text = get(a1, "/metrics").await;
        // The health server's answers are counted by status; the metrics server's not.
        for line in [
            "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
            "kubeproxy_proxy_livez_total{code=\"200\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("kubeproxy_proxy_livez_total{code=\"503\"}"),
            "{text}"
        );
    }
}
