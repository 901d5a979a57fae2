//! The admin HTTP API: the operations of the `outbox` CLI as JSON.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/status` | counts from the table, per topic |
//! | `GET /api/dead?topic=&aggregate=&error=&older_than_seconds=&limit=` | dead events |
//! | `GET /api/events/{event_id}` | one event |
//! | `POST /api/dead/requeue` | body: a filter (`event_id`, `topic`, `aggregate`, `error`, `older_than_seconds`) or `{"all": true}` |
//! | `POST /api/dead/purge` | same body |
//! | `POST /api/replay` | body: `{"topic", "since_seconds", "aggregate"?, "dry_run"?}` |
//!
//! Every mutating call needs `Authorization: Bearer <token>`; without a configured token they
//! are refused. Reads need the token too unless the API was built with
//! [`AdminApi::with_open_reads`]. Serve it on loopback unless it must be reached from elsewhere.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox_core::{EventFilter, EventId, OutboxAdmin, RelayStore};
use serde::Deserialize;
use serde_json::json;

/// The admin API over one outbox table.
#[derive(Clone)]
pub struct AdminApi {
    admin: Arc<dyn OutboxAdmin>,
    store: Arc<dyn RelayStore>,
    token: Option<Arc<str>>,
    open_reads: bool,
}

impl AdminApi {
    /// `token`: the bearer token mutations (and, by default, reads) require; `None` refuses
    /// every mutation.
    pub fn new(
        admin: Arc<dyn OutboxAdmin>,
        store: Arc<dyn RelayStore>,
        token: Option<String>,
    ) -> Self {
        Self {
            admin,
            store,
            token: token.filter(|t| !t.is_empty()).map(Into::into),
            open_reads: false,
        }
    }

    /// Let reads through without a token (mutations still need it).
    pub fn with_open_reads(mut self) -> Self {
        self.open_reads = true;
        self
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/status", get(status))
            .route("/api/dead", get(dead))
            .route("/api/events/{event_id}", get(event))
            .route("/api/dead/requeue", post(requeue))
            .route("/api/dead/purge", post(purge))
            .route("/api/replay", post(replay))
            .layer(DefaultBodyLimit::max(64 * 1024))
            .with_state(self.clone())
    }

    fn authorise(&self, headers: &HeaderMap, mutation: bool) -> Result<(), Refusal> {
        if !mutation && self.open_reads {
            return Ok(());
        }
        let Some(token) = &self.token else {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "admin token not configured: set OUTBOX_ADMIN_TOKEN to enable this call",
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
            _ => Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <OUTBOX_ADMIN_TOKEN>)",
            )),
        }
    }
}

/// A refused request: status and a message saying what to do.
struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        problem(self.0, self.1)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn problem(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn store_error(e: outbox_core::StoreError) -> Response {
    tracing::error!(error = %e, "admin API: store error");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "the outbox database is unavailable; retry later",
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FilterBody {
    event_id: Option<EventId>,
    topic: Option<String>,
    aggregate: Option<String>,
    error: Option<String>,
    older_than_seconds: Option<u64>,
    #[serde(default)]
    all: bool,
    limit: Option<usize>,
}

impl FilterBody {
    fn filter(&self) -> EventFilter {
        EventFilter {
            event_id: self.event_id,
            topic: self.topic.clone(),
            aggregate_id: self.aggregate.clone(),
            error_contains: self.error.clone(),
            older_than: self.older_than_seconds.map(Duration::from_secs),
        }
    }
}

async fn status(State(api): State<AdminApi>, headers: HeaderMap) -> Response {
    if let Err(r) = api.authorise(&headers, false) {
        return r.into_response();
    }
    let stats = match api.store.stats().await {
        Ok(s) => s,
        Err(e) => return store_error(e),
    };
    let topics = match api.admin.topic_status().await {
        Ok(t) => t,
        Err(e) => return store_error(e),
    };
    Json(json!({
        "pending": stats.pending, "retrying": stats.retrying, "dead": stats.dead,
        "published_retained": stats.published_retained,
        "oldest_pending_age_seconds": stats.oldest_pending_age.map(|d| d.as_secs_f64()),
        "live_relays": stats.live_relays, "in_flight": stats.in_flight,
        "published_last_minute": stats.published_last_minute, "topics": topics,
    }))
    .into_response()
}

async fn dead(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Query(q): Query<FilterBody>,
) -> Response {
    if let Err(r) = api.authorise(&headers, false) {
        return r.into_response();
    }
    match api
        .admin
        .dead(&q.filter(), q.limit.unwrap_or(100).min(1000))
        .await
    {
        Ok(events) => Json(events).into_response(),
        Err(e) => store_error(e),
    }
}

async fn event(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = api.authorise(&headers, false) {
        return r.into_response();
    }
    let Ok(id) = id.parse::<EventId>() else {
        return problem(StatusCode::BAD_REQUEST, "event id must be a UUID");
    };
    match api.admin.event(id).await {
        Ok(Some(e)) => Json(e).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such event in the outbox"),
        Err(e) => store_error(e),
    }
}

fn refuse_unfiltered(body: &FilterBody) -> Result<(), Refusal> {
    if body.filter().is_empty() && !body.all {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "give a filter (event_id, topic, aggregate, error, older_than_seconds) or \"all\": true",
        ));
    }
    Ok(())
}

/// Which bulk action a filtered mutation performs.
#[derive(Clone, Copy)]
enum DeadAction {
    Requeue,
    Purge,
}

async fn requeue(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Json(body): Json<FilterBody>,
) -> Response {
    act_on_dead(api, headers, body, DeadAction::Requeue).await
}

async fn purge(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Json(body): Json<FilterBody>,
) -> Response {
    act_on_dead(api, headers, body, DeadAction::Purge).await
}

async fn act_on_dead(
    api: AdminApi,
    headers: HeaderMap,
    body: FilterBody,
    action: DeadAction,
) -> Response {
    if let Err(r) = api
        .authorise(&headers, true)
        .and_then(|_| refuse_unfiltered(&body))
    {
        return r.into_response();
    }
    let filter = body.filter();
    let (result, key) = match action {
        DeadAction::Requeue => (api.admin.requeue_dead(&filter).await, "requeued"),
        DeadAction::Purge => (api.admin.purge_dead(&filter).await, "purged"),
    };
    match result {
        Ok(n) => Json(json!({ key: n })).into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    topic: String,
    since_seconds: u64,
    aggregate: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn replay(
    State(api): State<AdminApi>,
    headers: HeaderMap,
    Json(body): Json<ReplayBody>,
) -> Response {
    if let Err(r) = api.authorise(&headers, true) {
        return r.into_response();
    }
    let since = Duration::from_secs(body.since_seconds);
    match api
        .admin
        .replay(&body.topic, since, body.aggregate.as_deref(), body.dry_run)
        .await
    {
        Ok(n) => Json(json!({ "replayed": n, "dry_run": body.dry_run })).into_response(),
        Err(e) => store_error(e),
    }
}
