//! The consumer inbox, written once for every store: each event takes effect once, however
//! often it is delivered.
//!
//! For each delivery, [`Inbox`] (a [`MessageHandler`] for any consumer runner):
//! 1. reads the event id (none: poison, before any work is done);
//! 2. when the handler has slow work to do first ([`EffectHandler::prepares`]), asks the
//!    store whether this consumer processed the event already, and if so skips it: a
//!    redelivery neither repeats nor pays for the slow work (a remote judge, say);
//! 3. runs [`EffectHandler::prepare`] outside any transaction;
//! 4. begins a transaction and records `(consumer, event_id)` in it: the record, not the
//!    read of step 2, decides; a conflict means a duplicate and the handler is skipped;
//! 5. runs [`EffectHandler::apply`] in that transaction and commits, record and effects
//!    together.
//!
//! A store supplies only its dialect through [`InboxStore`]: how to begin, record, commit,
//! and which of its errors mean the database is unavailable. Those become
//! [`HandlerError::Unavailable`], which the runners retry without counting attempts
//! (see [`crate::consume::run_handler`]): an outage of the consumer's own database is not the
//! message's fault and must not park it.

use std::error::Error;

use async_trait::async_trait;

use crate::consume::{Handled, HandlerError, IncomingMessage, MessageHandler};
use crate::event::EventId;
use crate::metrics::ConsumerMetrics;
use crate::relay::WakeSignal;

/// An error from the store behind an inbox.
pub type InboxStoreError = Box<dyn Error + Send + Sync>;

/// What the inbox flow needs from a database.
#[async_trait]
pub trait InboxStore: Send + Sync + 'static {
    /// An open transaction.
    type Tx: Send;

    /// Whether `consumer` has processed `event_id`, read outside any transaction. A hint
    /// only: [`InboxStore::record`] in the handler's transaction decides.
    async fn seen(&self, consumer: &str, event_id: EventId) -> Result<bool, InboxStoreError>;

    async fn begin(&self) -> Result<Self::Tx, InboxStoreError>;

    /// Records that `consumer` processes `event_id`, in `tx`; `false` when it had been
    /// recorded before (a duplicate). A concurrent first delivery makes this wait for it.
    async fn record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<bool, InboxStoreError>;

    async fn commit(&self, tx: Self::Tx) -> Result<(), InboxStoreError>;

    async fn rollback(&self, tx: Self::Tx) -> Result<(), InboxStoreError>;

    /// Whether `error` (one link of an error chain) says the database is unavailable
    /// (connection lost or refused, pool exhausted, shutting down, locked, disk full) rather
    /// than that this message's work failed.
    fn is_unavailable(&self, error: &(dyn Error + 'static)) -> bool;
}

/// A consumer's business logic, on a store's transaction type.
#[async_trait]
pub trait EffectHandler<Tx: Send>: Send + Sync + 'static {
    /// Whether [`EffectHandler::prepare`] does real work: then a redelivery is recognised
    /// before it runs (one read), so the work is not repeated.
    fn prepares(&self) -> bool {
        false
    }

    /// Slow work before the transaction begins (see step 3 of the module docs).
    async fn prepare(&self, message: &IncomingMessage) -> Result<(), HandlerError> {
        let _ = message;
        Ok(())
    }

    /// The effects of one event, in `tx`. An error rolls back the record and the effects.
    async fn apply(
        &self,
        tx: &mut Tx,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError>;
}

/// The inbox flow over a store and a handler; see the module docs.
pub struct Inbox<S, H> {
    store: S,
    consumer: String,
    handler: H,
    metrics: Option<ConsumerMetrics>,
    wake: Option<WakeSignal>,
}

impl<S: InboxStore, H: EffectHandler<S::Tx>> Inbox<S, H> {
    pub fn new(store: S, consumer: impl Into<String>, handler: H) -> Self {
        Self {
            store,
            consumer: consumer.into(),
            handler,
            metrics: None,
            wake: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ConsumerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Wake this relay after each commit (for handlers that enqueue events).
    pub fn with_wake_signal(mut self, wake: WakeSignal) -> Self {
        self.wake = Some(wake);
        self
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// A store error as the runner should treat it (an outage is counted).
    fn store_error(&self, e: InboxStoreError) -> HandlerError {
        if chain_has(&*e, |link| self.store.is_unavailable(link)) {
            if let Some(m) = &self.metrics {
                m.unavailable();
            }
            HandlerError::Unavailable(e)
        } else {
            HandlerError::Retry(e)
        }
    }

    /// A failed `prepare` or handler, counted: an outage (of the database or of another
    /// dependency the handler names, e.g. a content store) apart from the handler's failures.
    fn counted(&self, e: HandlerError) -> HandlerError {
        if let Some(m) = &self.metrics {
            match e {
                HandlerError::Unavailable(_) => m.unavailable(),
                _ => m.handler_failure(),
            }
        }
        e
    }

    /// A handler's error, with database outages inside it told apart from its own failures.
    fn handler_error(&self, e: HandlerError) -> HandlerError {
        match e {
            HandlerError::Retry(inner)
                if chain_has(&*inner, |link| self.store.is_unavailable(link)) =>
            {
                HandlerError::Unavailable(inner)
            }
            other => other,
        }
    }

    fn duplicate(&self) -> Result<Handled, HandlerError> {
        if let Some(m) = &self.metrics {
            m.duplicate();
        }
        Ok(Handled::Duplicate)
    }
}

/// Whether `error` or any of its sources satisfies `test`.
fn chain_has(error: &(dyn Error + 'static), test: impl Fn(&(dyn Error + 'static)) -> bool) -> bool {
    let mut link = Some(error);
    while let Some(e) = link {
        if test(e) {
            return true;
        }
        link = e.source();
    }
    false
}

#[async_trait]
impl<S: InboxStore, H: EffectHandler<S::Tx>> MessageHandler for Inbox<S, H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        let event_id = message.event_id()?;
        if self.handler.prepares() {
            let seen = self
                .store
                .seen(&self.consumer, event_id)
                .await
                .map_err(|e| self.store_error(e))?;
            if seen {
                return self.duplicate();
            }
            self.handler
                .prepare(message)
                .await
                .map_err(|e| self.counted(self.handler_error(e)))?;
        }
        let mut tx = self.store.begin().await.map_err(|e| self.store_error(e))?;
        let first = match self
            .store
            .record(&mut tx, &self.consumer, event_id, message)
            .await
        {
            Ok(first) => first,
            Err(e) => {
                let _ = self.store.rollback(tx).await;
                return Err(self.store_error(e));
            }
        };
        if !first {
            self.store
                .rollback(tx)
                .await
                .map_err(|e| self.store_error(e))?;
            return self.duplicate();
        }
        match self.handler.apply(&mut tx, event_id, message).await {
            Ok(()) => {
                self.store
                    .commit(tx)
                    .await
                    .map_err(|e| self.store_error(e))?;
                if let Some(w) = &self.wake {
                    w.wake();
                }
                if let Some(m) = &self.metrics {
                    m.processed();
                }
                Ok(Handled::Processed)
            }
            Err(e) => {
                let _ = self.store.rollback(tx).await;
                Err(self.counted(self.handler_error(e)))
            }
        }
    }
}
