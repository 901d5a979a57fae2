//! A Content Service for other crates' tests: the real routes over real HTTP on a free local
//! port, on a SQLite file of the caller's choosing.

use std::net::SocketAddr;
use std::sync::Arc;

use essay_common::content::{ContentClient, ContentPolicy};
use essay_common::local::LocalServer;
use outbox::portable::ServiceDb;

use crate::{ContentService, SweepPolicy};

pub struct LocalContentService {
    pub addr: SocketAddr,
    pub service: Arc<ContentService>,
    server: LocalServer,
}

impl LocalContentService {
    /// Serves a Content Service stored in `dir/content.db`.
    pub async fn start(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).expect("test directory");
        let db = ServiceDb::open(
            &format!("sqlite://{}/content.db", dir.display()),
            crate::NAME,
        )
        .await
        .expect("content database");
        Self::start_on(db).await
    }

    /// Serves a Content Service stored in `db`.
    pub async fn start_on(db: ServiceDb) -> Self {
        let service = Arc::new(
            ContentService::open(db, SweepPolicy::default())
                .await
                .expect("content schema"),
        );
        let server = LocalServer::start(crate::routes::router(service.clone())).await;
        Self {
            addr: server.addr,
            service,
            server,
        }
    }

    /// A client of it that gives up quickly (tests of outages need not wait long).
    pub fn client(&self) -> ContentClient {
        ContentClient::new(
            &format!("http://{}", self.addr),
            ContentPolicy {
                timeout: std::time::Duration::from_secs(5),
                attempts: 2,
                first_backoff: std::time::Duration::from_millis(50),
            },
        )
        .expect("an http URL")
    }

    pub async fn stop(self) {
        self.server.stop().await
    }
}
