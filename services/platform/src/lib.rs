//! The essay platform: its nine services, run together ([`Platform`]) or one per process
//! ([`serve`]), and the demo that pushes a batch of essays through them ([`demo`]).

pub mod client;
pub mod demo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use batch_orchestrator::BatchOrchestrator;
use cj_assessment::CjAssessment;
use class_management::ClassManagement;
use content_service::{ContentService, SweepPolicy};
use essay_common::content::{ContentClient, ContentPolicy};
use essay_common::runtime::{self, DataLocation, Observability, RunningService};
use essay_common::util::env_secs;
use essay_common::Service;
use essay_lifecycle::EssayLifecycle;
use file_service::batches::BatchClient;
use file_service::FileService;
use outbox::backend::Broker;
use outbox::portable::ServiceDb;
use outbox::RelayReport;
use result_aggregator::ResultAggregator;
use spellchecker::{Spellchecker, Speller};
use student_matching::{RosterClient, StudentMatching};

/// Every service, with its default HTTP port for `serve`. The Content Service, Class
/// Management and Batch Orchestrator come first: the others call them (texts; the class
/// roster; whether a batch's files may change).
pub const SERVICES: &[(&str, &str, u16)] = &[
    ("content-service", content_service::NAME, 4108),
    ("class-management", class_management::NAME, 4104),
    ("batch-orchestrator", batch_orchestrator::NAME, 4101),
    ("file-service", file_service::NAME, 4102),
    ("essay-lifecycle", essay_lifecycle::NAME, 4103),
    ("student-matching", student_matching::NAME, 4109),
    ("spellchecker", spellchecker::NAME, 4105),
    ("cj-assessment", cj_assessment::NAME, 4106),
    ("result-aggregator", result_aggregator::NAME, 4107),
];

/// The services other services call over HTTP.
#[derive(Clone, Debug)]
pub struct Peers {
    pub content: ContentClient,
    pub roster: RosterClient,
    pub batches: BatchClient,
}

impl Peers {
    /// `CONTENT_SERVICE_URL`, `CLASS_MANAGEMENT_URL` and `BATCH_ORCHESTRATOR_URL` (defaults:
    /// their `serve` ports).
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            content: ContentClient::from_env().map_err(anyhow::Error::msg)?,
            roster: RosterClient::from_env().map_err(anyhow::Error::msg)?,
            batches: BatchClient::from_env().map_err(anyhow::Error::msg)?,
        })
    }
}

/// Knobs the services take.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long Class Management waits for a teacher before confirming its suggestions.
    pub match_confirm_timeout: Duration,
    /// How long provisional content may wait for the event that names it.
    pub content_sweep: SweepPolicy,
    /// Timeout and retries of the services' calls to the Content Service.
    pub content_policy: ContentPolicy,
    /// How long Essay Lifecycle waits for a batch's files before going on with what arrived
    /// (`PROVISIONING_TIMEOUT_SECS`).
    pub provisioning_timeout: Duration,
    /// How long a phase may run without an outcome before its pipeline fails
    /// (`PHASE_TIMEOUT_SECS`).
    pub phase_timeout: Duration,
    /// How long the Result Aggregator waits, after a pipeline completed, for the results it
    /// produced before announcing what it has (`RESULTS_DEADLINE_SECS`).
    pub results_deadline: Duration,
    /// The most comparisons CJ asks of its judge per batch (`CJ_MAX_COMPARISONS`).
    pub max_comparisons: usize,
    /// How the services write their events (`OUTBOX_WRITE_MODE`): rows in their outbox
    /// tables, or logical messages streamed from one slot per service (PostgreSQL with
    /// `wal_level = logical`).
    pub write_mode: outbox::WriteModeSetting,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            provisioning_timeout: essay_lifecycle::DEFAULT_PROVISIONING_TIMEOUT,
            phase_timeout: batch_orchestrator::DEFAULT_PHASE_TIMEOUT,
            results_deadline: result_aggregator::DEFAULT_RESULTS_DEADLINE,
            max_comparisons: cj_assessment::DEFAULT_MAX_COMPARISONS,
            match_confirm_timeout: Duration::from_secs(
                std::env::var("MATCH_CONFIRM_TIMEOUT_SECS")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(30),
            ),
            content_sweep: SweepPolicy::default(),
            content_policy: ContentPolicy::default(),
            write_mode: outbox::WriteModeSetting::Table,
        }
    }
}

impl Options {
    /// The defaults, with `CONTENT_SWEEP_GRACE_SECS`, `PROVISIONING_TIMEOUT_SECS`,
    /// `PHASE_TIMEOUT_SECS` and `RESULTS_DEADLINE_SECS` applied.
    pub fn from_env() -> anyhow::Result<Self> {
        let d = Self::default();
        let secs = |name: &str, default: Duration| {
            env_secs(name, default.as_secs()).map_err(anyhow::Error::msg)
        };
        Ok(Self {
            content_sweep: SweepPolicy::from_env().map_err(anyhow::Error::msg)?,
            provisioning_timeout: secs("PROVISIONING_TIMEOUT_SECS", d.provisioning_timeout)?,
            phase_timeout: secs("PHASE_TIMEOUT_SECS", d.phase_timeout)?,
            results_deadline: secs("RESULTS_DEADLINE_SECS", d.results_deadline)?,
            max_comparisons: match std::env::var("CJ_MAX_COMPARISONS") {
                Err(_) => d.max_comparisons,
                Ok(v) => v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n: &usize| *n > 0)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "CJ_MAX_COMPARISONS must be a whole number above 0, got {v:?}"
                        )
                    })?,
            },
            write_mode: outbox::Settings::from_env()?.write_mode,
            ..d
        })
    }
}

/// One service, built over its database.
pub enum AnyService {
    Content(Arc<ContentService>),
    Bos(Arc<BatchOrchestrator>),
    Files(Arc<FileService>),
    Els(Arc<EssayLifecycle>),
    Cms(Arc<ClassManagement>),
    Matching(Arc<StudentMatching>),
    Spell(Arc<Spellchecker>),
    Cj(Arc<CjAssessment>),
    Ras(Arc<ResultAggregator>),
}

impl AnyService {
    /// Builds the service called `name` (its short or full name) over `db`; those that call
    /// other services reach them through `peers`.
    pub async fn build(
        name: &str,
        db: ServiceDb,
        options: &Options,
        peers: &Peers,
    ) -> anyhow::Result<Self> {
        let (short, full, _) = SERVICES
            .iter()
            .find(|(s, f, _)| *s == name || *f == name)
            .with_context(|| format!("unknown service {name:?}; one of: {}", short_names()))?;
        let _ = full;
        let content = peers.content.clone();
        Ok(match *short {
            "content-service" => Self::Content(Arc::new(
                ContentService::open(db, options.content_sweep).await?,
            )),
            "batch-orchestrator" => Self::Bos(Arc::new(
                BatchOrchestrator::open(db)
                    .await?
                    .with_phase_timeout(options.phase_timeout),
            )),
            "file-service" => Self::Files(Arc::new(
                FileService::open(db, content, peers.batches.clone()).await?,
            )),
            "essay-lifecycle" => Self::Els(Arc::new(
                EssayLifecycle::open(db)
                    .await?
                    .with_provisioning_timeout(options.provisioning_timeout),
            )),
            "class-management" => Self::Cms(Arc::new(
                ClassManagement::open(db, options.match_confirm_timeout).await?,
            )),
            "student-matching" => Self::Matching(Arc::new(
                StudentMatching::open(db, content, peers.roster.clone()).await?,
            )),
            "spellchecker" => {
                let dir = spellchecker::dictionary_dir();
                let speller = tokio::task::spawn_blocking(move || Speller::load(&dir)).await??;
                Self::Spell(Arc::new(
                    Spellchecker::open(db, Arc::new(speller), content).await?,
                ))
            }
            "cj-assessment" => {
                // An LLM when CJ_LLM_URL names one; the deterministic judge otherwise.
                let judge: Arc<dyn cj_assessment::judge::Judge> =
                    match cj_assessment::llm::LlmConfig::from_env().map_err(anyhow::Error::msg)? {
                        Some(config) => Arc::new(
                            cj_assessment::llm::LlmJudge::new(config)
                                .map_err(anyhow::Error::msg)?,
                        ),
                        None => Arc::new(cj_assessment::judge::FeatureJudge::new()),
                    };
                Self::Cj(Arc::new(
                    CjAssessment::open(db, judge, content)
                        .await?
                        .with_max_comparisons(options.max_comparisons),
                ))
            }
            "result-aggregator" => Self::Ras(Arc::new(
                ResultAggregator::open(db)
                    .await?
                    .with_results_deadline(options.results_deadline),
            )),
            _ => unreachable!("listed in SERVICES"),
        })
    }

    pub fn service(&self) -> Arc<dyn Service> {
        match self {
            Self::Content(s) => s.clone(),
            Self::Bos(s) => s.clone(),
            Self::Files(s) => s.clone(),
            Self::Els(s) => s.clone(),
            Self::Cms(s) => s.clone(),
            Self::Matching(s) => s.clone(),
            Self::Spell(s) => s.clone(),
            Self::Cj(s) => s.clone(),
            Self::Ras(s) => s.clone(),
        }
    }
}

pub fn short_names() -> String {
    SERVICES
        .iter()
        .map(|(s, _, _)| *s)
        .collect::<Vec<_>>()
        .join(", ")
}

/// All nine services in this process, sharing one broker (the in-process bus on the
/// embedded default) but each with its own database. The Content Service and Class Management
/// answer the others over real HTTP on local ports, as they would across processes.
pub struct Platform {
    pub content: Arc<ContentService>,
    /// Where the Content Service listens.
    pub content_addr: SocketAddr,
    /// Where Class Management listens.
    pub cms_addr: SocketAddr,
    /// Where Batch Orchestrator listens.
    pub bos_addr: SocketAddr,
    pub bos: Arc<BatchOrchestrator>,
    pub files: Arc<FileService>,
    pub els: Arc<EssayLifecycle>,
    pub cms: Arc<ClassManagement>,
    pub matching: Arc<StudentMatching>,
    pub spell: Arc<Spellchecker>,
    pub cj: Arc<CjAssessment>,
    pub ras: Arc<ResultAggregator>,
    pub obs: Observability,
    pub broker: Broker,
    running: Vec<RunningService>,
}

impl Platform {
    pub async fn start(
        location: &DataLocation,
        broker: Broker,
        options: &Options,
    ) -> anyhow::Result<Self> {
        runtime::prepare_broker(&broker).await?;
        let obs = Observability::default();
        // The Content Service first: the others need its address.
        let content_db = runtime::open_database(
            location,
            content_service::NAME,
            &broker,
            &obs,
            options.write_mode,
        )
        .await?;
        let content =
            Arc::new(ContentService::open(content_db.clone(), options.content_sweep).await?);
        let (content_running, content_addr) =
            start_on_local_port(content.clone(), content_db, &broker, &obs).await?;
        let content_client =
            ContentClient::new(&format!("http://{content_addr}"), options.content_policy)
                .map_err(anyhow::Error::msg)?;
        // Class Management next, on a port of its own: the matching service asks it for rosters.
        let cms_db = runtime::open_database(
            location,
            class_management::NAME,
            &broker,
            &obs,
            options.write_mode,
        )
        .await?;
        let cms =
            Arc::new(ClassManagement::open(cms_db.clone(), options.match_confirm_timeout).await?);
        let (cms_running, cms_addr) =
            start_on_local_port(cms.clone(), cms_db, &broker, &obs).await?;
        // Batch Orchestrator too: File Service asks it whether a batch's files may change.
        let bos_db = runtime::open_database(
            location,
            batch_orchestrator::NAME,
            &broker,
            &obs,
            options.write_mode,
        )
        .await?;
        let bos = Arc::new(
            BatchOrchestrator::open(bos_db.clone())
                .await?
                .with_phase_timeout(options.phase_timeout),
        );
        let (bos_running, bos_addr) =
            start_on_local_port(bos.clone(), bos_db, &broker, &obs).await?;
        let peers = Peers {
            content: content_client,
            roster: RosterClient::new(&format!("http://{cms_addr}"), options.content_policy)
                .map_err(anyhow::Error::msg)?,
            batches: BatchClient::new(&format!("http://{bos_addr}"), options.content_policy)
                .map_err(anyhow::Error::msg)?,
        };
        let mut built = Vec::new();
        for (short, full, _) in &SERVICES[3..] {
            let db =
                runtime::open_database(location, full, &broker, &obs, options.write_mode).await?;
            built.push(AnyService::build(short, db, options, &peers).await?);
        }
        let mut running = vec![content_running, cms_running, bos_running];
        for s in &built {
            running.push(
                runtime::start(
                    s.service(),
                    service_db(s).clone(),
                    &broker,
                    &obs,
                    None,
                    None,
                )
                .await?,
            );
        }
        // Let every relay register and take its partitions before work arrives, so the first
        // events are not held back by start-up.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for r in &running {
            let store = r.db.database().relay_store();
            while store.stats().await.map(|s| s.live_relays).unwrap_or(0) == 0
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let (mut files, mut els, mut matching, mut spell, mut cj, mut ras) =
            (None, None, None, None, None, None);
        for b in built {
            match b {
                AnyService::Files(x) => files = Some(x),
                AnyService::Els(x) => els = Some(x),
                AnyService::Matching(x) => matching = Some(x),
                AnyService::Spell(x) => spell = Some(x),
                AnyService::Cj(x) => cj = Some(x),
                AnyService::Ras(x) => ras = Some(x),
                AnyService::Content(_) | AnyService::Cms(_) | AnyService::Bos(_) => {
                    unreachable!("started first")
                }
            }
        }
        let missing = || anyhow::anyhow!("a service of SERVICES was not built");
        Ok(Self {
            content,
            content_addr,
            cms_addr,
            bos_addr,
            bos,
            files: files.ok_or_else(missing)?,
            els: els.ok_or_else(missing)?,
            cms,
            matching: matching.ok_or_else(missing)?,
            spell: spell.ok_or_else(missing)?,
            cj: cj.ok_or_else(missing)?,
            ras: ras.ok_or_else(missing)?,
            obs,
            broker,
            running,
        })
    }

    /// Every service's HTTP API behind one router (the demo's gateway).
    pub fn router(&self) -> Router {
        let parts: [Option<Router>; 9] = [
            self.content.clone().router(),
            self.matching.clone().router(),
            self.bos.clone().router(),
            self.files.clone().router(),
            self.els.clone().router(),
            self.cms.clone().router(),
            self.spell.clone().router(),
            self.cj.clone().router(),
            self.ras.clone().router(),
        ];
        parts
            .into_iter()
            .flatten()
            .fold(Router::new(), Router::merge)
            .layer(axum::middleware::from_fn(essay_common::trace::http_layer))
    }

    /// The same, as a client.
    pub fn gateway(&self) -> client::Gateway {
        client::Gateway::new(self.router())
    }

    /// The databases, by service name.
    pub fn databases(&self) -> Vec<(&'static str, ServiceDb)> {
        self.running
            .iter()
            .map(|r| (r.name, r.db.clone()))
            .collect()
    }

    pub fn services(&self) -> Vec<Arc<dyn Service>> {
        vec![
            self.content.clone(),
            self.matching.clone(),
            self.bos.clone(),
            self.files.clone(),
            self.els.clone(),
            self.cms.clone(),
            self.spell.clone(),
            self.cj.clone(),
            self.ras.clone(),
        ]
    }

    /// Pending and dead events per service outbox.
    pub async fn outbox_stats(&self) -> anyhow::Result<Vec<(&'static str, outbox::OutboxStats)>> {
        let mut out = Vec::new();
        for r in &self.running {
            out.push((r.name, r.db.database().relay_store().stats().await?));
        }
        Ok(out)
    }

    /// Dead events across all services (each would need an operator).
    pub async fn dead_events(&self) -> anyhow::Result<u64> {
        Ok(self.outbox_stats().await?.iter().map(|(_, s)| s.dead).sum())
    }

    /// Events this process's relays have published, all services together.
    pub fn published(&self) -> u64 {
        self.running
            .iter()
            .map(|r| {
                self.obs
                    .outbox
                    .table(r.name, "event_outbox")
                    .published_so_far()
            })
            .sum()
    }

    /// Stops the Content Service (its HTTP API, consumer and relay), as an outage would.
    pub async fn stop_content_service(&mut self) {
        if let Some(i) = self
            .running
            .iter()
            .position(|r| r.name == content_service::NAME)
        {
            self.running.remove(i).stop().await;
        }
    }

    /// Starts the Content Service again on its address and database.
    pub async fn restart_content_service(&mut self) -> anyhow::Result<()> {
        let db = self.content.db().clone();
        let running = runtime::start(
            self.content.clone(),
            db,
            &self.broker,
            &self.obs,
            Some(self.content_addr),
            None,
        )
        .await?;
        self.running.insert(0, running);
        Ok(())
    }

    pub async fn stop(self) -> Vec<(&'static str, RelayReport)> {
        let mut reports = Vec::new();
        for r in self.running {
            let name = r.name;
            reports.push((name, r.stop().await));
        }
        reports
    }
}

/// Starts a service that others call, its HTTP API on a free local port; and that address.
async fn start_on_local_port(
    service: Arc<dyn Service>,
    db: ServiceDb,
    broker: &Broker,
    obs: &Observability,
) -> anyhow::Result<(RunningService, SocketAddr)> {
    let name = service.name();
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let running = runtime::start(service, db, broker, obs, Some(local), None).await?;
    let addr = running.http.with_context(|| format!("{name} listens"))?;
    Ok((running, addr))
}

fn service_db(s: &AnyService) -> &ServiceDb {
    match s {
        AnyService::Content(x) => x.db(),
        AnyService::Bos(x) => x.db(),
        AnyService::Files(x) => x.db(),
        AnyService::Els(x) => x.db(),
        AnyService::Cms(x) => x.db(),
        AnyService::Matching(x) => x.db(),
        AnyService::Spell(x) => x.db(),
        AnyService::Cj(x) => x.db(),
        AnyService::Ras(x) => x.db(),
    }
}

/// Runs one service as this process until Ctrl-C: its relay, consumer and HTTP API (plus
/// `/metrics`) on `addr`.
pub async fn serve(
    name: &str,
    location: &DataLocation,
    broker: Broker,
    addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let (short, full, port) = SERVICES
        .iter()
        .find(|(s, f, _)| *s == name || *f == name)
        .with_context(|| format!("unknown service {name:?}; one of: {}", short_names()))?;
    runtime::prepare_broker(&broker).await?;
    let obs = Observability::default();
    let options = Options::from_env()?;
    let db = runtime::open_database(location, full, &broker, &obs, options.write_mode).await?;
    let peers = Peers::from_env()?;
    let service = AnyService::build(short, db.clone(), &options, &peers).await?;
    let addr = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], *port)));
    // One process per service and host: a restart takes the relay's partitions back at once.
    let instance = runtime::host_instance();
    let running =
        runtime::start(service.service(), db, &broker, &obs, Some(addr), instance).await?;
    println!(
        "{full}: HTTP on {}, data in {}, broker {}; Ctrl-C stops",
        running.http.map(|a| a.to_string()).unwrap_or_default(),
        location.describe(),
        broker.kind()
    );
    tokio::signal::ctrl_c().await?;
    let report = running.stop().await;
    println!(
        "{full}: stopped; its relay published {} events",
        report.published
    );
    Ok(())
}
