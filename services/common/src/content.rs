//! Essay text by reference. Files and texts live in the Content Service; events carry their
//! storage ids (`raw_file_storage_id`, `text_storage_id`, `corrected_text_storage_id`), so a
//! message stays small whatever the essays' length or the batch's size.
//!
//! [`ContentClient`] speaks the Content Service's HTTP API (the original's: `POST /v1/content`
//! with the raw body answers `201 {"storage_id": <32 hex digits>}`, `GET /v1/content/{id}`
//! answers the bytes). Consumers fetch in `prepare`, outside their transaction: a missing id
//! is poison with a reason, while a Content Service that does not answer is
//! [`HandlerError::Unavailable`], retried for as long as it lasts without using up the
//! message's attempts.
//!
//! Writers store content *before* their business transaction commits and mark it
//! provisional ([`PROVISIONAL_HEADER`]): if that transaction rolls back, nothing refers to the
//! blob and the Content Service deletes it after a grace period. An event that names the blob
//! (`essay.content.provisioned`, `essay.spellcheck.results`) confirms it for good.

use std::fmt;
use std::time::Duration;

use outbox::HandlerError;
use serde::Deserialize;
use uuid::Uuid;

/// Sent with `true` by writers whose transaction may still roll back; the Content Service
/// keeps such a blob only once an event names it.
pub const PROVISIONAL_HEADER: &str = "x-content-provisional";

/// Where services find the Content Service unless told (`CONTENT_SERVICE_URL`).
pub const DEFAULT_URL: &str = "http://127.0.0.1:4108";

/// A Content Service storage id: 32 hexadecimal digits (the original's `uuid4().hex`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageId(String);

impl StorageId {
    /// A new random id, lowercase.
    pub fn new() -> Self {
        Self(Uuid::new_v4().simple().to_string())
    }

    /// Accepts 32 hex digits in either case, as the original's Content Service does.
    pub fn parse(s: &str) -> Result<Self, ContentError> {
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(ContentError::InvalidId(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for StorageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for StorageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why content could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("content {0} is not in the Content Service (never stored, or swept after its writer rolled back)")]
    NotFound(String),
    #[error("{0:?} is not a content storage id (32 hexadecimal digits)")]
    InvalidId(String),
    #[error("content {0} is not UTF-8 text")]
    NotText(String),
    #[error(
        "the Content Service at {url} did not answer ({cause}); it is retried until it is back"
    )]
    Unavailable { url: String, cause: String },
    #[error("the Content Service refused the request: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
}

impl ContentError {
    /// True when trying again later can succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

impl From<ContentError> for HandlerError {
    /// An outage is nobody's fault: retried without counting attempts. Anything else is
    /// about the message itself (an id that names nothing): poison, with the reason.
    fn from(e: ContentError) -> Self {
        if e.is_unavailable() {
            HandlerError::unavailable(e)
        } else {
            HandlerError::poison(e.to_string())
        }
    }
}

/// How long one request may take and how often a call tries before it reports an outage.
pub type ContentPolicy = crate::http::Policy;

/// A client of the Content Service; cheap to clone (one connection pool).
#[derive(Clone, Debug)]
pub struct ContentClient {
    base: String,
    http: reqwest::Client,
    policy: ContentPolicy,
}

impl ContentClient {
    /// A client of the Content Service at `base_url` (`http://host:port`).
    pub fn new(base_url: &str, policy: ContentPolicy) -> Result<Self, String> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(format!(
                "CONTENT_SERVICE_URL must be an http:// URL (the Content Service's address), got {base_url:?}"
            ));
        }
        let http = policy.client()?;
        Ok(Self { base, http, policy })
    }

    /// `CONTENT_SERVICE_URL` (default [`DEFAULT_URL`]) and `CONTENT_TIMEOUT_MS` (default
    /// 10,000).
    pub fn from_env() -> Result<Self, String> {
        let url = std::env::var("CONTENT_SERVICE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let mut policy = ContentPolicy::default();
        if let Ok(ms) = std::env::var("CONTENT_TIMEOUT_MS") {
            let ms: u64 = ms.parse().map_err(|_| {
                format!("CONTENT_TIMEOUT_MS must be a number of milliseconds, got {ms:?}")
            })?;
            policy.timeout = Duration::from_millis(ms.max(1));
        }
        Self::new(&url, policy)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Stores `bytes` as provisional content (see the module docs) and returns its id.
    pub async fn store(
        &self,
        bytes: Vec<u8>,
        content_type: &str,
        correlation_id: Uuid,
    ) -> Result<StorageId, ContentError> {
        #[derive(Deserialize)]
        struct Stored {
            storage_id: String,
        }
        let url = format!("{}/v1/content", self.base);
        let body = bytes::Bytes::from(bytes);
        let response = self
            .send(|| {
                self.http
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .header("x-correlation-id", correlation_id.to_string())
                    .header(PROVISIONAL_HEADER, "true")
                    .body(body.clone())
            })
            .await?;
        let stored: Stored =
            serde_json::from_slice(&response).map_err(|e| ContentError::Refused {
                status: 201,
                body: format!("an answer without a storage_id: {e}"),
            })?;
        StorageId::parse(&stored.storage_id)
    }

    /// The bytes stored under `id`.
    pub async fn fetch(&self, id: &str) -> Result<Vec<u8>, ContentError> {
        let id = StorageId::parse(id)?;
        let url = format!("{}/v1/content/{id}", self.base);
        match self.send(|| self.http.get(&url)).await {
            Err(ContentError::Refused { status: 404, .. }) => {
                Err(ContentError::NotFound(id.to_string()))
            }
            other => other,
        }
    }

    /// The UTF-8 text stored under `id`.
    pub async fn fetch_text(&self, id: &str) -> Result<String, ContentError> {
        let bytes = self.fetch(id).await?;
        String::from_utf8(bytes).map_err(|_| ContentError::NotText(id.to_owned()))
    }

    async fn send(
        &self,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, ContentError> {
        crate::http::send(&self.policy, make)
            .await
            .map_err(|e| match e {
                crate::http::Failure::Unavailable(cause) => ContentError::Unavailable {
                    url: self.base.clone(),
                    cause,
                },
                crate::http::Failure::Refused { status, body } => {
                    ContentError::Refused { status, body }
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_ids_are_32_hex_digits() {
        let id = StorageId::new();
        assert_eq!(id.as_str().len(), 32);
        assert!(StorageId::parse(id.as_str()).is_ok());
        assert!(StorageId::parse("0824DCC41E5D5E1BACA6BD1B8ADE8215").is_ok());
        for bad in [
            "",
            "spellchecked:e-1",
            "0824dcc41e5d5e1baca6bd1b8ade821",
            "../../etc/passwd",
        ] {
            assert!(
                matches!(StorageId::parse(bad), Err(ContentError::InvalidId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_outage_is_unavailable_and_a_missing_id_is_poison() {
        let h: HandlerError = ContentError::Unavailable {
            url: "http://x".into(),
            cause: "refused".into(),
        }
        .into();
        assert!(matches!(h, HandlerError::Unavailable(_)));
        let h: HandlerError = ContentError::NotFound("ab".repeat(16)).into();
        assert!(matches!(h, HandlerError::Poison(_)), "{h}");
        assert!(h.to_string().contains("not in the Content Service"));
    }

    #[test]
    fn only_http_urls_are_accepted() {
        let e = ContentClient::new("localhost:4108", ContentPolicy::default()).unwrap_err();
        assert!(e.contains("CONTENT_SERVICE_URL"), "{e}");
    }
}
