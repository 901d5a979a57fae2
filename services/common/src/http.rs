//! Calls from one service to another over HTTP (the Content Service, Class Management's
//! roster): a timeout per request, a few tries with doubling backoff for connection failures,
//! timeouts and 5xx answers, then an outage the caller reports as
//! `HandlerError::Unavailable`. A 4xx answer is the request's own problem and is not retried.

use std::time::Duration;

/// Timeout and retries of one call.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub timeout: Duration,
    pub attempts: u32,
    pub first_backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            attempts: 3,
            first_backoff: Duration::from_millis(200),
        }
    }
}

impl Policy {
    /// A pooled client with this policy's timeouts.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout.min(Duration::from_secs(2)))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum Failure {
    /// No usable answer after every try; the cause of the last one.
    Unavailable(String),
    /// A 4xx answer.
    Refused { status: u16, body: String },
}

/// Sends the request `make` builds until it gets a 2xx body or a 4xx, or runs out of tries.
pub async fn send(
    policy: &Policy,
    make: impl Fn() -> reqwest::RequestBuilder,
) -> Result<Vec<u8>, Failure> {
    let mut backoff = policy.first_backoff;
    let mut last = String::new();
    for attempt in 1..=policy.attempts.max(1) {
        if attempt > 1 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        let response = match make().send().await {
            Ok(r) => r,
            Err(e) => {
                last = describe(&e);
                continue;
            }
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => {
                last = describe(&e);
                continue;
            }
        };
        if status.is_success() {
            return Ok(body);
        }
        let text = String::from_utf8_lossy(&body).chars().take(300).collect();
        if status.is_server_error() {
            last = format!("HTTP {}: {text}", status.as_u16());
            continue;
        }
        return Err(Failure::Refused {
            status: status.as_u16(),
            body: text,
        });
    }
    Err(Failure::Unavailable(last))
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer in time".into()
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else {
        e.to_string()
    }
}
