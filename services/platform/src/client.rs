//! Calls the services' HTTP APIs in process, through their routers: the same handlers,
//! extractors and status codes a remote client gets, without a socket.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use tower::ServiceExt;

/// The services' HTTP APIs behind one entry point, as the original's API Gateway puts them:
/// every request carries the signed-in user in `X-User-ID` (see `essay_common::identity`).
#[derive(Clone)]
pub struct Gateway {
    route: Route,
    user: Option<String>,
    /// A W3C `traceparent` every request continues (see `essay_common::trace`).
    traceparent: Option<String>,
}

/// Where requests go: the routers in this process, or the services running as their own
/// processes.
#[derive(Clone)]
enum Route {
    InProcess(Router),
    /// Service short name (as in [`crate::SERVICES`]) -> address.
    Remote(std::sync::Arc<std::collections::HashMap<String, std::net::SocketAddr>>),
}

/// The user a gateway signs requests as unless told otherwise.
pub const DEFAULT_USER: &str = "demo-teacher";

/// Which service answers `path`.
pub fn service_for(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    if path.starts_with("/v1/content") {
        "content-service"
    } else if path.starts_with("/v1/files") {
        "file-service"
    } else if ["/v1/classes", "/v1/students", "/v1/matches"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        "class-management"
    } else if path.ends_with("/essays") {
        "essay-lifecycle"
    } else if path.ends_with("/comparisons")
        || path.starts_with("/v1/assignments")
        || path.starts_with("/v1/anchors")
    {
        "cj-assessment"
    } else if path.ends_with("/results") || path.ends_with("/results.csv") {
        "result-aggregator"
    } else {
        "batch-orchestrator"
    }
}

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`): enough for a test
/// or demo client, without pulling in an HTTP client stack.
async fn exchange(
    addr: std::net::SocketAddr,
    request: Request<Body>,
) -> anyhow::Result<(StatusCode, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        parts.method,
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
        body.len()
    );
    for (name, value) in &parts.headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str()?));
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in response from {addr}"))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((StatusCode::from_u16(status)?, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// A response: status and JSON body (`null` when the body is empty or not JSON).
pub type Reply = (StatusCode, serde_json::Value);

impl Gateway {
    /// Requests as [`DEFAULT_USER`] to the routers of this process.
    pub fn new(router: Router) -> Self {
        Self {
            route: Route::InProcess(router),
            user: Some(DEFAULT_USER.into()),
            traceparent: None,
        }
    }

    /// Requests as [`DEFAULT_USER`] to services running as their own processes.
    pub fn remote(addrs: std::collections::HashMap<String, std::net::SocketAddr>) -> Self {
        Self {
            route: Route::Remote(std::sync::Arc::new(addrs)),
            user: Some(DEFAULT_USER.into()),
            traceparent: None,
        }
    }

    /// The same gateway signed in as `user`.
    pub fn as_user(&self, user: &str) -> Self {
        Self {
            user: Some(user.into()),
            ..self.clone()
        }
    }

    /// The same gateway, every request part of the trace `traceparent` names.
    pub fn in_trace(&self, traceparent: &str) -> Self {
        Self {
            traceparent: Some(traceparent.into()),
            ..self.clone()
        }
    }

    /// The same gateway with nobody signed in (no `X-User-ID`).
    pub fn anonymous(&self) -> Self {
        Self {
            user: None,
            ..self.clone()
        }
    }

    pub async fn send(&self, mut request: Request<Body>) -> anyhow::Result<Reply> {
        // The gateway's rule: the user is its to set, never the client's.
        request
            .headers_mut()
            .remove(essay_common::identity::USER_HEADER);
        if let Some(user) = &self.user {
            request.headers_mut().insert(
                essay_common::identity::USER_HEADER,
                axum::http::HeaderValue::from_str(user)?,
            );
        }
        if let Some(t) = &self.traceparent {
            request.headers_mut().insert(
                essay_common::trace::TRACEPARENT,
                axum::http::HeaderValue::from_str(t)?,
            );
        }
        let (status, bytes) = match &self.route {
            Route::InProcess(router) => {
                let response = router.clone().oneshot(request).await?;
                let status = response.status();
                (
                    status,
                    axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024)
                        .await?
                        .to_vec(),
                )
            }
            Route::Remote(addrs) => {
                let service = service_for(request.uri().path());
                let addr = *addrs
                    .get(service)
                    .ok_or_else(|| anyhow::anyhow!("no address for {service}"))?;
                exchange(addr, request).await?
            }
        };
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            }
        });
        Ok((status, json))
    }

    pub async fn get(&self, uri: &str) -> anyhow::Result<Reply> {
        self.send(Request::get(uri).body(Body::empty())?).await
    }

    pub async fn json(
        &self,
        method: Method,
        uri: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<Reply> {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body)?))?;
        self.send(request).await
    }

    pub async fn post(&self, uri: &str, body: &serde_json::Value) -> anyhow::Result<Reply> {
        self.json(Method::POST, uri, body).await
    }

    pub async fn delete(&self, uri: &str) -> anyhow::Result<Reply> {
        self.send(Request::delete(uri).body(Body::empty())?).await
    }

    /// Uploads files to a batch as `multipart/form-data`, one part per file.
    pub async fn upload(
        &self,
        batch_id: &str,
        correlation_id: Option<uuid::Uuid>,
        files: &[(String, Vec<u8>)],
    ) -> anyhow::Result<Reply> {
        let (content_type, body) = multipart(files);
        let mut request = Request::post(format!("/v1/files/batch/{batch_id}"))
            .header(header::CONTENT_TYPE, content_type);
        if let Some(c) = correlation_id {
            request = request.header("x-correlation-id", c.to_string());
        }
        self.send(request.body(Body::from(body))?).await
    }
}

/// A `multipart/form-data` body with one `files` part per file; returns (content type, body).
pub fn multipart(files: &[(String, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = format!("essay-boundary-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
