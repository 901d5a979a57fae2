//! # outbox-http
//!
//! The admin API ([`admin::AdminApi`]: status, dead letters, requeue, purge, replay as JSON,
//! bearer-token protected) and `/metrics`. Serves `/metrics` in the Prometheus text format. Before each scrape the table gauges are
//! refreshed from every registered store, so `outbox_pending_events` and friends are the
//! table's own counts at scrape time, not a relay's last impression.
//!
//! ```no_run
//! # async fn demo(store: outbox_postgres::PgRelayStore) -> std::io::Result<()> {
//! use prometheus_client::registry::Registry;
//! let mut registry = Registry::default();
//! let metrics = outbox_core::OutboxMetrics::register(&mut registry);
//! let table = metrics.table("file_service", "event_outbox");
//! let endpoint = outbox_http::MetricsEndpoint::new(registry).with_source(store, table);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! axum::serve(listener, endpoint.router()).await
//! # }
//! ```
//!
//! Bind to loopback unless the metrics are meant to leave the machine: they name services
//! and topics.

pub mod admin;
pub mod dashboard;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use outbox_core::metrics::encode_text;
use outbox_core::{RelayStore, TableMetrics};
use prometheus_client::registry::Registry;

/// The content type of the Prometheus text exposition format.
pub use admin::AdminApi;
pub use dashboard::Dashboard;

pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A `/metrics` endpoint over one registry and any number of outbox tables.
#[derive(Clone)]
pub struct MetricsEndpoint {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    sources: Vec<(Arc<dyn RelayStore>, TableMetrics)>,
}

impl MetricsEndpoint {
    pub fn new(registry: Registry) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                sources: Vec::new(),
            }),
        }
    }

    /// Refresh `metrics`' table gauges from `store` on every scrape.
    ///
    /// # Panics
    /// If called after the endpoint was cloned (add every source first).
    pub fn with_source(mut self, store: impl RelayStore, metrics: TableMetrics) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("add sources before cloning the endpoint")
            .sources
            .push((Arc::new(store), metrics));
        self
    }

    /// Reads every source's table and renders the registry.
    pub async fn render(&self) -> String {
        for (store, metrics) in &self.inner.sources {
            match store.stats().await {
                Ok(stats) => metrics.observe(&stats),
                // The last good values stay; the failure is visible in the logs.
                Err(e) => tracing::warn!(error = %e, "metrics: reading outbox stats failed"),
            }
        }
        encode_text(&self.inner.registry)
    }

    /// `GET /metrics` and `GET /healthz`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.clone())
    }
}

async fn metrics(State(endpoint): State<MetricsEndpoint>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        endpoint.render().await,
    )
        .into_response()
}
