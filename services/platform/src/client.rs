//! Calls the services' HTTP APIs in process, through their routers: the same handlers,
//! extractors and status codes a remote client gets, without a socket.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use tower::ServiceExt;

/// The services' routers behind one entry point.
#[derive(Clone)]
pub struct Gateway {
    router: Router,
}

/// A response: status and JSON body (`null` when the body is empty or not JSON).
pub type Reply = (StatusCode, serde_json::Value);

impl Gateway {
    pub fn new(router: Router) -> Self {
        Self { router }
    }

    pub async fn send(&self, request: Request<Body>) -> anyhow::Result<Reply> {
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024).await?;
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
