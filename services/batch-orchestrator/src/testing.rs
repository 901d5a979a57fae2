//! A Batch Orchestrator for other crates' tests: the real routes over real HTTP on a free
//! local port, on a SQLite file in a folder of the caller's choosing (no relay, no consumer:
//! batches are registered through [`LocalBatchOrchestrator::service`]).

use std::net::SocketAddr;
use std::sync::Arc;

use essay_common::local::LocalServer;
use outbox::portable::ServiceDb;

use crate::BatchOrchestrator;

pub struct LocalBatchOrchestrator {
    pub addr: SocketAddr,
    pub service: Arc<BatchOrchestrator>,
    server: LocalServer,
}

impl LocalBatchOrchestrator {
    /// Serves a Batch Orchestrator stored in `dir/batch_orchestrator.db`.
    pub async fn start(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).expect("test directory");
        let db = ServiceDb::open(
            &format!("sqlite://{}/batch_orchestrator.db", dir.display()),
            crate::NAME,
        )
        .await
        .expect("batch orchestrator database");
        Self::serve(Arc::new(BatchOrchestrator::open(db).await.expect("schema"))).await
    }

    /// Serves `service`'s routes.
    pub async fn serve(service: Arc<BatchOrchestrator>) -> Self {
        let server = LocalServer::start(crate::router(service.clone())).await;
        Self {
            addr: server.addr,
            service,
            server,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn stop(self) {
        self.server.stop().await
    }
}
