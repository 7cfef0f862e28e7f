//! HTTP endpoints: metrics (`/proxyMode`, `/metrics`, `/healthz`, `/configz`) and health.
