//! Spellchecker: on `essay.spellcheck.requested` corrects the essay against a real English
//! dictionary and emits the thin `batch.spellcheck.phase.completed` (for Essay Lifecycle) and
//! the rich `essay.spellcheck.results` (for Result Aggregator) **in one transaction** with its
//! result row. (The original used two transactions: a crash between them lost one event.)
//!
//! The dictionary is Hunspell's en_US (from `dictionary/en_US`, checked by the `spellbook`
//! crate). It is GPL-2.0 and WordNet licensed (see `dictionary/en_US/*license.txt`), so it
//! is shipped as a data file read at start-up, not compiled into the binary; point
//! `SPELLCHECK_DICTIONARY_DIR` at another Hunspell `en_US.aff`/`en_US.dic` pair to replace it.
//!
//! Text is by reference: `prepare` fetches the essay by `text_storage_id` from the Content
//! Service, checks it and stores the corrected text there (provisionally, until the results
//! event names it), all before the transaction; the events carry
//! `corrected_text_storage_id`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use essay_common::content::ContentClient;
use essay_common::prepared::Prepared;
use essay_common::util::{now_ms, utc_timestamp};
use essay_common::wire::system_metadata;
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub const NAME: &str = "spellchecker_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spellcheck_results (
    essay_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    error_count BIGINT NOT NULL,
    word_count BIGINT NOT NULL,
    corrections TEXT NOT NULL,
    corrected_text_storage_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
";

/// Where the shipped dictionary lives, unless `SPELLCHECK_DICTIONARY_DIR` says otherwise.
pub fn dictionary_dir() -> PathBuf {
    std::env::var_os("SPELLCHECK_DICTIONARY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("dictionary/en_US"))
}

#[derive(Debug, thiserror::Error)]
pub enum DictionaryError {
    #[error("cannot read {path}: {source}; set SPELLCHECK_DICTIONARY_DIR to a folder with en_US.aff and en_US.dic")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a Hunspell dictionary: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// One corrected word.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Correction {
    pub original: String,
    pub suggestion: Option<String>,
    /// Character offset in the original text.
    pub position: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub corrections: Vec<Correction>,
    pub word_count: usize,
    pub corrected_text: String,
}

/// An English spellchecker over a Hunspell dictionary.
pub struct Speller {
    dictionary: spellbook::Dictionary,
}

impl Speller {
    pub fn load(dir: &Path) -> Result<Self, DictionaryError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| DictionaryError::Read { path, source })
        };
        let (aff, dic) = (read("en_US.aff")?, read("en_US.dic")?);
        let dictionary =
            spellbook::Dictionary::new(&aff, &dic).map_err(|e| DictionaryError::Parse {
                path: dir.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self { dictionary })
    }

    /// Finds misspelled words and replaces each with the dictionary's first suggestion.
    /// Numbers, words with digits and capitalised words inside a sentence (names: "by Maya
    /// Lindqvist") are left alone.
    pub fn check(&self, text: &str) -> Checked {
        let mut corrections = Vec::new();
        let mut corrected = String::with_capacity(text.len());
        let mut word_count = 0;
        let mut suggestions = Vec::new();
        // A suggestion costs ~15 ms, a lookup nanoseconds: an essay that repeats a misspelt
        // word pays for it once.
        let mut suggested: std::collections::HashMap<&str, Option<String>> =
            std::collections::HashMap::new();
        let mut sentence_start = true;
        for (position, token, is_word) in tokens(text) {
            if !is_word {
                corrected.push_str(token);
                if token.contains(['.', '!', '?', '\n']) {
                    sentence_start = true;
                }
                continue;
            }
            word_count += 1;
            let word = token.trim_matches('\'');
            let proper_noun = !sentence_start && word.starts_with(char::is_uppercase);
            sentence_start = false;
            if word.is_empty()
                || proper_noun
                || word.chars().any(|c| c.is_ascii_digit())
                || self.dictionary.check(word)
            {
                corrected.push_str(token);
                continue;
            }
            let suggestion = suggested
                .entry(word)
                .or_insert_with(|| {
                    suggestions.clear();
                    self.dictionary.suggest(word, &mut suggestions);
                    suggestions.first().cloned()
                })
                .clone();
            corrected.push_str(suggestion.as_deref().unwrap_or(token));
            corrections.push(Correction {
                original: word.to_owned(),
                suggestion,
                position,
            });
        }
        Checked {
            corrections,
            word_count,
            corrected_text: corrected,
        }
    }
}

/// Splits text into (char offset, slice, is_word) runs; words are letters and apostrophes.
fn tokens(text: &str) -> Vec<(usize, &str, bool)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut start_char = 0;
    let mut current: Option<bool> = None;
    for (char_index, (byte, c)) in text.char_indices().enumerate() {
        let is_word = c.is_alphabetic() || c == '\'' || c.is_ascii_digit();
        match current {
            Some(kind) if kind == is_word => {}
            Some(kind) => {
                out.push((start_char, &text[start..byte], kind));
                start = byte;
                start_char = char_index;
                current = Some(is_word);
            }
            None => current = Some(is_word),
        }
    }
    if let Some(kind) = current {
        out.push((start_char, &text[start..], kind));
    }
    out
}

pub struct Spellchecker {
    db: ServiceDb,
    speller: Arc<Speller>,
    content: ContentClient,
    /// Checks done in `prepare`, outside the transaction, by event id.
    prepared: Prepared<Done>,
}

/// A checked essay whose corrected text is stored.
struct Done {
    checked: Checked,
    empty: bool,
    corrected_text_storage_id: String,
    /// Fetching, checking and storing, measured (the original's `processing_duration_ms`).
    duration_ms: u64,
}

/// `EssayLifecycleSpellcheckRequestV1`: the essay is `entity_id`, its batch `parent_id`.
#[derive(Deserialize)]
struct Requested {
    #[serde(rename = "entity_id")]
    essay_id: String,
    #[serde(rename = "parent_id")]
    batch_id: Option<String>,
    text_storage_id: String,
}

impl Requested {
    fn of(env: &Envelope) -> Result<Self, HandlerError> {
        let req: Self = env.data()?;
        if req.batch_id.is_none() {
            return Err(HandlerError::poison(
                "a spellcheck request without its batch (parent_id) cannot be reported",
            ));
        }
        Ok(req)
    }

    fn batch(&self) -> &str {
        self.batch_id.as_deref().unwrap_or_default()
    }
}

impl Spellchecker {
    pub async fn open(
        db: ServiceDb,
        speller: Arc<Speller>,
        content: ContentClient,
    ) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        Ok(Self {
            db,
            speller,
            content,
            prepared: Prepared::default(),
        })
    }

    /// Fetches, checks and stores the corrected text: the slow part, outside any transaction.
    async fn run(&self, req: &Requested, correlation: uuid::Uuid) -> Result<Done, HandlerError> {
        let started = std::time::Instant::now();
        let text = self.content.fetch_text(&req.text_storage_id).await?;
        let checked = self.check(&text).await?;
        let corrected = self
            .content
            .store(
                checked.corrected_text.clone().into_bytes(),
                "text/plain; charset=utf-8",
                correlation,
            )
            .await?;
        Ok(Done {
            checked,
            empty: text.trim().is_empty(),
            corrected_text_storage_id: corrected.to_string(),
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn check(&self, text: &str) -> Result<Checked, HandlerError> {
        let (speller, text) = (self.speller.clone(), text.to_owned());
        tokio::task::spawn_blocking(move || speller.check(&text))
            .await
            .map_err(HandlerError::retry)
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }
}

#[async_trait]
impl Service for Spellchecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[topics::SPELLCHECK_REQUESTED]
    }

    /// Fetching, checking (~100 ms for an essay with misspellings) and storing the corrected
    /// text run before the transaction.
    async fn prepare(&self, env: &Envelope) -> Result<(), HandlerError> {
        let req = Requested::of(env)?;
        let done = self.run(&req, env.correlation_id).await?;
        self.prepared.put(env.event_id, done);
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let req = Requested::of(env)?;
        let done = match self.prepared.take(&env.event_id) {
            Some(done) => done,
            None => self.run(&req, env.correlation_id).await?,
        };
        let Done {
            checked,
            empty,
            corrected_text_storage_id,
            duration_ms,
        } = done;
        let inserted = tx
            .execute(
                "INSERT INTO spellcheck_results (essay_id, batch_id, error_count, word_count,
                                                 corrections, corrected_text_storage_id, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (essay_id) DO NOTHING",
                params![
                    &req.essay_id,
                    req.batch(),
                    checked.corrections.len(),
                    checked.word_count,
                    serde_json::to_string(&checked.corrections).expect("serialises"),
                    &corrected_text_storage_id,
                    now_ms()
                ],
            )
            .await?;
        if inserted == 0 {
            return Ok(()); // this essay was checked before (a re-sent request): results went out then
        }
        let error_count = checked.corrections.len();
        let thin = EVENTS.event(
            topics::SPELLCHECK_PHASE_COMPLETED,
            ("essay", &req.essay_id),
            env.correlation_id,
            // The original's `SpellcheckPhaseCompletedV1`, plus the error count Essay Lifecycle
            // passes on to CJ (absent from the original's: then unknown).
            &json!({"entity_id": req.essay_id, "batch_id": req.batch(),
                    "correlation_id": env.correlation_id.to_string(),
                    "status": if empty { "failed" } else { "completed" },
                    "corrected_text_storage_id": (!empty).then_some(&corrected_text_storage_id),
                    "error_code": empty.then_some("EMPTY_CONTENT"),
                    "processing_duration_ms": duration_ms,
                    "timestamp": utc_timestamp(),
                    "error_count": error_count}),
        )?;
        let rich = EVENTS.event(
            topics::SPELLCHECK_RESULTS,
            ("essay", &req.essay_id),
            env.correlation_id,
            // `SpellcheckResultV1`; `essay_id`, `error_count`, `word_count` and the corrections
            // themselves are this platform's extras.
            &json!({"event_name": "essay.spellcheck.completed", "entity_id": req.essay_id,
                    "entity_type": "essay", "parent_id": req.batch(), "timestamp": utc_timestamp(),
                    "status": if empty { "spellcheck_failed" } else { "spellchecked_success" },
                    "system_metadata": system_metadata(&req.essay_id, "essay", Some(req.batch()),
                        "essay.spellcheck.completed", Some(if empty { "failed" } else { "completed" })),
                    "batch_id": req.batch(), "correlation_id": env.correlation_id,
                    "user_id": null, "corrections_made": error_count,
                    "correction_metrics": {
                        "total_corrections": error_count, "l2_dictionary_corrections": 0,
                        "spellchecker_corrections": error_count,
                        "word_count": checked.word_count,
                        "correction_density": density(error_count, checked.word_count)},
                    "original_text_storage_id": req.text_storage_id,
                    "corrected_text_storage_id": corrected_text_storage_id,
                    "processing_duration_ms": duration_ms,
                    "processor_version": concat!("spellbook/", env!("CARGO_PKG_VERSION")),
                    "essay_id": req.essay_id,
                    "error_count": error_count, "word_count": checked.word_count,
                    "corrections": checked.corrections}),
        )?;
        tx.enqueue(&thin).await?;
        tx.enqueue(&rich).await?;
        Ok(())
    }
}

/// Corrections per 100 words (the original's `correction_density`).
fn density(corrections: usize, words: usize) -> f64 {
    if words == 0 {
        0.0
    } else {
        corrections as f64 * 100.0 / words as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_corrects_misspellings() {
        let speller = Speller::load(&dictionary_dir()).expect("the shipped dictionary loads");
        let c = speller.check("The quick brown fox jumpd over the lazzy dog in 2024.");
        let originals: Vec<_> = c.corrections.iter().map(|c| c.original.as_str()).collect();
        assert_eq!(originals, ["jumpd", "lazzy"]);
        assert_eq!(c.corrections[0].position, 20);
        assert_eq!(c.word_count, 11, "numbers count as words");
        assert!(
            c.corrected_text.contains("lazy dog"),
            "{}",
            c.corrected_text
        );
        assert!(c.corrected_text.ends_with(" 2024."));
        let repeated = speller.check("A lazzy cat and a lazzy dog.");
        assert_eq!(
            repeated.corrections.len(),
            2,
            "each occurrence is a correction"
        );
        assert_eq!(repeated.corrected_text, "A lazy cat and a lazy dog.");
        let clean = speller.check("It's a well written essay by Maya Lindqvist, isn't it?");
        assert!(clean.corrections.is_empty(), "{:?}", clean.corrections);
    }

    #[test]
    fn a_missing_dictionary_says_what_to_set() {
        let e = Speller::load(Path::new("/nonexistent"))
            .err()
            .expect("fails");
        assert!(e.to_string().contains("SPELLCHECK_DICTIONARY_DIR"));
    }
}
