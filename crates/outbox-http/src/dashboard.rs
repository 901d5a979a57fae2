//! A small web dashboard served by the same process: pending, dead, oldest age, published/s,
//! a queue-depth chart over time, and the dead-letter list with requeue buttons. The page and
//! its script are compiled into the binary (no CDN, no build step).
//!
//! History is sampled in memory by [`Dashboard::run_sampler`] (one point every `every`, the
//! last `keep` points) and served at `GET /api/history`; the page polls it. Requeue buttons
//! call the admin API with the token the operator types into the page.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use outbox_core::{RelayStore, TableMetrics};
use serde::Serialize;

const PAGE: &str = include_str!("dashboard.html");

/// One sample of the table.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Sample {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub pending: u64,
    pub dead: u64,
    pub oldest_pending_age_seconds: f64,
    /// Published per second since the previous sample (from this process's relay counter).
    pub published_per_sec: f64,
}

/// The dashboard of one outbox table.
#[derive(Clone)]
pub struct Dashboard {
    store: Arc<dyn RelayStore>,
    metrics: Option<TableMetrics>,
    history: Arc<Mutex<VecDeque<Sample>>>,
    keep: usize,
}

impl Dashboard {
    /// `metrics`: the relay's table metrics, for published/s (optional).
    pub fn new(store: Arc<dyn RelayStore>, metrics: Option<TableMetrics>) -> Self {
        Self {
            store,
            metrics,
            history: Arc::default(),
            keep: 1800,
        }
    }

    /// Keep at most this many samples.
    pub fn keeping(mut self, samples: usize) -> Self {
        self.keep = samples.max(2);
        self
    }

    /// The samples so far, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history.lock().unwrap().iter().cloned().collect()
    }

    /// Samples the table every `every` until the task is dropped.
    pub async fn run_sampler(self, every: Duration) {
        let mut last_published = self.metrics.as_ref().map(|m| m.published_so_far());
        let mut interval = tokio::time::interval(every);
        loop {
            interval.tick().await;
            let stats = match self.store.stats().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard: sampling failed");
                    continue;
                }
            };
            let published = self.metrics.as_ref().map(|m| m.published_so_far());
            let rate = match (published, last_published) {
                (Some(now), Some(before)) => {
                    now.saturating_sub(before) as f64 / every.as_secs_f64()
                }
                _ => 0.0,
            };
            last_published = published;
            let sample = Sample {
                at_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                pending: stats.pending,
                dead: stats.dead,
                oldest_pending_age_seconds: stats
                    .oldest_pending_age
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
                published_per_sec: rate,
            };
            let mut h = self.history.lock().unwrap();
            h.push_back(sample);
            while h.len() > self.keep {
                h.pop_front();
            }
        }
    }

    /// `GET /` (the page) and `GET /api/history`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/api/history", get(history))
            .with_state(self.clone())
    }
}

async fn page() -> Response {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline'",
        )],
        Html(PAGE),
    )
        .into_response()
}

async fn history(State(d): State<Dashboard>) -> Json<Vec<Sample>> {
    Json(d.history())
}
