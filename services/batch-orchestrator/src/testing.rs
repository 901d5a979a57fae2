//! A Batch Orchestrator for other crates' tests: the real routes over real HTTP on a free
//! local port, on a SQLite file in a folder of the caller's choosing (no relay, no consumer:
//! batches are registered through [`LocalBatchOrchestrator::service`]).

use std::net::SocketAddr;
use std::sync::Arc;

use outbox::portable::ServiceDb;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::BatchOrchestrator;

pub struct LocalBatchOrchestrator {
    pub addr: SocketAddr,
    pub service: Arc<BatchOrchestrator>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let addr = listener.local_addr().expect("bound");
        let (stop, stopped) = oneshot::channel::<()>();
        let router = crate::router(service.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            service,
            stop,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
