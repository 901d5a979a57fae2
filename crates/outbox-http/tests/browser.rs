//! A real headless Chromium loads the dashboard, sees the depth chart rise and fall as events
//! are enqueued and drained, and requeues a dead event with the button.
//!
//! Needs Chromium (`/usr/bin/chromium`, or `OUTBOX_TEST_CHROMIUM`); `.ci/run` installs it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use outbox_core::testing::TestPublisher;
use outbox_core::{AggregateRef, NewEvent, Relay, RelayConfig, RelayStore, RetryPolicy, Topic};
use outbox_http::{AdminApi, Dashboard};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

struct Browser {
    child: Child,
    profile: std::path::PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn chromium() -> String {
    let bin = std::env::var("OUTBOX_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} not found: install Debian's chromium (bash .ci/run does) or set OUTBOX_TEST_CHROMIUM"
    );
    bin
}

/// Starts headless Chromium with remote debugging and returns it with its DevTools port.
async fn launch() -> (Browser, u16) {
    let profile =
        std::env::temp_dir().join(format!("outbox-chromium-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&profile).unwrap();
    let child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let port_file = profile.join("DevToolsActivePort");
    let start = Instant::now();
    let port = loop {
        if let Ok(text) = std::fs::read_to_string(&port_file) {
            if let Some(p) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                break p;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "chromium did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (Browser { child, profile }, port)
}

/// GET, reading the body up to its Content-Length: DevTools keeps the connection open.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("devtools HTTP answered")
            .unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if n == 0 || len.is_some_and(|len| body.len() >= len) {
                return body.to_owned();
            }
        } else if n == 0 {
            return String::new();
        }
    }
}

/// A minimal Chrome DevTools Protocol session on one page.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn open(devtools: u16) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], devtools));
        let targets: Value = serde_json::from_str(&http_get(addr, "/json/list").await).unwrap();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("devtools websocket");
        Self { ws, next_id: 0 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::Text(msg.into())).await.unwrap();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("devtools answered")
                .expect("devtools open")
                .unwrap();
            if let Message::Text(text) = frame {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["id"] == id {
                    return v;
                }
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        r["result"]["result"]["value"].clone()
    }

    /// The pending counts the chart currently draws.
    async fn depth_points(&mut self) -> Vec<u64> {
        let s = self
            .eval("document.getElementById('depth').dataset.points || ''")
            .await;
        s.as_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

/// Polls an (async) condition written inline, or panics naming what it waited for.
macro_rules! until {
    ($what:expr, $cond:expr) => {{
        let start = Instant::now();
        while !$cond {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out waiting for {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_depth_changes_and_requeues_with_its_button() {
    let path = std::env::temp_dir().join(format!(
        "outbox-browser-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let pool = outbox_sqlite::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    outbox_sqlite::migrate(&pool).await.unwrap();
    let sqlite = Arc::new(outbox_sqlite::SqliteRelayStore::new(
        pool.clone(),
        outbox_sqlite::SqliteDialect,
    ));
    let store: Arc<dyn RelayStore> = sqlite.clone();

    // The relay starts with the broker down, so the backlog builds up first.
    let publisher = TestPublisher::new();
    publisher.set_unavailable(true);
    let topic = Topic::new("browser.v1").unwrap();
    let doomed = NewEvent::new(
        topic.clone(),
        AggregateRef::new("a", "doomed").unwrap(),
        "{}",
    );
    publisher.reject_always(doomed.event_id());
    let config = RelayConfig {
        poll_min: Duration::from_millis(10),
        poll_max: Duration::from_millis(100),
        outage_backoff_max: Duration::from_millis(200),
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(20),
            max_attempts: 1,
        },
        ..RelayConfig::default()
    };
    let relay = Relay::new(store.clone(), publisher.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));

    let dashboard = Dashboard::new(store.clone(), None);
    let sampler = tokio::spawn(dashboard.clone().run_sampler(Duration::from_millis(200)));
    let app = AdminApi::new(sqlite.clone(), store.clone(), Some("t0k".into()))
        .with_open_reads()
        .router()
        .merge(dashboard.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (_browser, devtools) = launch().await;
    let mut page = Page::open(devtools).await;
    page.call("Page.navigate", json!({ "url": format!("http://{addr}/") }))
        .await;

    // Enqueue a backlog: the chart must show it.
    let events: Vec<NewEvent> = (0..40)
        .map(|i| {
            NewEvent::new(
                topic.clone(),
                AggregateRef::new("a", format!("e{i}")).unwrap(),
                "{}",
            )
        })
        .chain([doomed.clone()])
        .collect();
    let mut tx = outbox_sqlite::begin(&pool).await.unwrap();
    outbox_sqlite::SqliteOutbox::new(outbox_sqlite::SqliteDialect)
        .enqueue_all(&mut tx, &events)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    until!(
        "the chart shows the backlog",
        page.depth_points().await.contains(&41)
    );
    assert_eq!(
        page.eval("document.getElementById('pending').textContent")
            .await,
        "41"
    );

    // The broker returns: the chart falls back to zero, one event is dead.
    publisher.set_unavailable(false);
    until!("the chart shows the drain", {
        let points = page.depth_points().await;
        points.contains(&41) && points.last() == Some(&0)
    });
    let id = doomed.event_id().to_string();
    let row = format!("document.querySelector('tr[data-event-id=\"{id}\"] button.requeue')");
    until!(
        "the dead event is listed",
        page.eval(&format!("{row} !== null")).await == true
    );

    // The operator fixes the cause, types the token and presses the button.
    publisher.accept(doomed.event_id());
    page.eval("(() => { const t = document.getElementById('token'); t.value = 't0k'; t.dispatchEvent(new Event('change')); return true })()").await;
    page.eval(&format!("{row}.click()")).await;
    until!(
        "requeued and published",
        publisher
            .delivered()
            .iter()
            .any(|m| m.event_id == doomed.event_id())
    );
    assert!(page
        .eval("document.getElementById('message').textContent")
        .await
        .as_str()
        .unwrap_or("")
        .contains("requeued 1"));
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM event_outbox WHERE status = 'dead'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);

    let _ = stop.send(());
    running.await.unwrap();
    sampler.abort();
    pool.close().await;
    for s in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{s}", path.display()));
    }
}
