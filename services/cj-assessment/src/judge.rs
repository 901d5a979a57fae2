//! Who decides which of two essays is better. The default [`FeatureJudge`] is deterministic
//! and explains itself; [`crate::llm::LlmJudge`] asks a language model behind an
//! OpenAI-compatible API; [`crate::cache::CachingJudge`] remembers every verdict so a
//! redelivered request does not pay for the same comparison twice.

use async_trait::async_trait;

/// What the judge is told besides the essays: the assignment's task, the teacher's criteria
/// and how to weigh them (set per assignment over HTTP, see `crate::anchors`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Assessment {
    /// The task the students answered.
    pub student_prompt: Option<String>,
    /// The teacher's criteria.
    pub instructions: Option<String>,
    /// How to weigh them.
    pub rubric: Option<String>,
}

impl Assessment {
    pub fn is_empty(&self) -> bool {
        self.student_prompt.is_none() && self.instructions.is_none() && self.rubric.is_none()
    }

    /// A short fingerprint: verdicts given under one assessment are not reused for another.
    pub fn fingerprint(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        format!("{:016x}", h.finish())
    }
}

/// An essay as the judge sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub essay_id: String,
    /// The Content Service id of `text`: which text was judged.
    pub text_storage_id: String,
    pub text: String,
    /// From the spellcheck phase, when it ran.
    pub spelling_errors: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub a_wins: bool,
    /// Why, in words a teacher can check.
    pub reason: String,
    /// How sure the judge says it is, 0 to 1, when it says.
    pub confidence: Option<f64>,
    /// Tokens the judgement cost (0 for a judge that uses none).
    pub tokens: u64,
}

/// Why a comparison has no verdict.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    /// The judge did not answer (down, timing out, rate-limiting past every retry): the
    /// batch waits and tries again later; nothing is failed for it.
    #[error("the judge is unavailable: {0}")]
    Unavailable(String),
    /// The judge answered something that is not a verdict: this comparison is lost, the
    /// others go on.
    #[error("the judge's answer is not a verdict: {0}")]
    Unparseable(String),
    /// The judge refused the request (e.g. a 4xx: a wrong model or key).
    #[error("the judge refused: {0}")]
    Refused(String),
}

#[async_trait]
pub trait Judge: Send + Sync + 'static {
    /// A short name, recorded with each comparison and billed in `resource.consumption`.
    fn name(&self) -> &'static str;
    async fn compare(&self, a: &Candidate, b: &Candidate) -> Result<Judgement, JudgeError>;
    /// A verdict under an assignment's `assessment`; a judge that reads no instructions (the
    /// feature judge) ignores it.
    async fn compare_in(
        &self,
        assessment: &Assessment,
        a: &Candidate,
        b: &Candidate,
    ) -> Result<Judgement, JudgeError> {
        let _ = assessment;
        self.compare(a, b).await
    }
    /// Whether a verdict costs enough (money, seconds) to be remembered and never asked twice.
    fn costly(&self) -> bool {
        false
    }
}

#[async_trait]
impl<J: Judge + ?Sized> Judge for std::sync::Arc<J> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    async fn compare(&self, a: &Candidate, b: &Candidate) -> Result<Judgement, JudgeError> {
        (**self).compare(a, b).await
    }
    async fn compare_in(
        &self,
        assessment: &Assessment,
        a: &Candidate,
        b: &Candidate,
    ) -> Result<Judgement, JudgeError> {
        (**self).compare_in(assessment, a, b).await
    }
    fn costly(&self) -> bool {
        (**self).costly()
    }
}

/// A judge bound to one assignment's assessment (what a batch is judged under).
pub struct InAssessment<J> {
    pub judge: J,
    pub assessment: Assessment,
}

#[async_trait]
impl<J: Judge> Judge for InAssessment<J> {
    fn name(&self) -> &'static str {
        self.judge.name()
    }
    async fn compare(&self, a: &Candidate, b: &Candidate) -> Result<Judgement, JudgeError> {
        self.judge.compare_in(&self.assessment, a, b).await
    }
    fn costly(&self) -> bool {
        self.judge.costly()
    }
}

/// Measurable features of an essay.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    pub words: usize,
    pub spelling_error_rate: f64,
    /// Distinct words / words over the first 150 words (comparable across lengths).
    pub lexical_variety: f64,
    pub mean_sentence_words: f64,
}

impl Features {
    pub fn of(c: &Candidate) -> Self {
        let words: Vec<String> = c
            .text
            .split_whitespace()
            .map(|w| {
                w.trim_matches(|ch: char| !ch.is_alphanumeric())
                    .to_lowercase()
            })
            .filter(|w| !w.is_empty())
            .collect();
        let sample = &words[..words.len().min(150)];
        let distinct: std::collections::HashSet<&String> = sample.iter().collect();
        let sentences = c
            .text
            .split(['.', '!', '?'])
            .filter(|s| s.split_whitespace().count() > 0)
            .count()
            .max(1);
        Self {
            words: words.len(),
            spelling_error_rate: c.spelling_errors.unwrap_or(0) as f64 / words.len().max(1) as f64,
            lexical_variety: distinct.len() as f64 / sample.len().max(1) as f64,
            mean_sentence_words: words.len() as f64 / sentences as f64,
        }
    }

    /// Contributions to quality, by feature name. Length helps up to ~400 words; sentences
    /// read best around 12-22 words; misspellings cost the most.
    pub fn contributions(&self) -> [(&'static str, f64); 4] {
        let length = (self.words.min(400) as f64 / 400.0) * 2.0;
        let spelling = -self.spelling_error_rate * 40.0;
        let variety = self.lexical_variety * 3.0;
        let s = self.mean_sentence_words;
        let sentences = if s < 12.0 {
            -(12.0 - s) * 0.15
        } else if s > 22.0 {
            -(s - 22.0) * 0.1
        } else {
            0.0
        };
        [
            ("length", length),
            ("spelling", spelling),
            ("vocabulary", variety),
            ("sentence structure", sentences),
        ]
    }

    pub fn quality(&self) -> f64 {
        self.contributions().iter().map(|(_, v)| v).sum()
    }
}

/// The default judge: compares feature-based quality; ties go to the lower essay id, so the
/// same pair always gets the same verdict.
///
/// An essay takes part in ten or more comparisons; its features (a pass over every word) are
/// computed once and remembered by essay id and text.
#[derive(Default)]
pub struct FeatureJudge {
    features: std::sync::Mutex<std::collections::HashMap<(String, u64), Features>>,
}

/// Essays whose features are remembered; more starts over (a batch is at most 500).
const REMEMBERED: usize = 4096;

impl FeatureJudge {
    pub fn new() -> Self {
        Self::default()
    }

    fn features(&self, c: &Candidate) -> Features {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        c.text.hash(&mut h);
        c.spelling_errors.hash(&mut h);
        let key = (c.essay_id.clone(), h.finish());
        if let Some(f) = self.features.lock().expect("features lock").get(&key) {
            return f.clone();
        }
        let f = Features::of(c);
        let mut known = self.features.lock().expect("features lock");
        if known.len() >= REMEMBERED {
            known.clear();
        }
        known.insert(key, f.clone());
        f
    }
}

#[async_trait]
impl Judge for FeatureJudge {
    fn name(&self) -> &'static str {
        "feature-judge-v1"
    }

    async fn compare(&self, a: &Candidate, b: &Candidate) -> Result<Judgement, JudgeError> {
        let (fa, fb) = (self.features(a), self.features(b));
        let (qa, qb) = (fa.quality(), fb.quality());
        let a_wins = qa > qb || (qa == qb && a.essay_id < b.essay_id);
        // The reason names the feature that separated them most.
        let (ca, cb) = (fa.contributions(), fb.contributions());
        let (name, diff) = ca
            .iter()
            .zip(cb.iter())
            .map(|((n, x), (_, y))| (*n, x - y))
            .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
            .unwrap_or(("overall", 0.0));
        let reason = format!(
            "{} is stronger mainly on {name} ({:+.2}); quality {qa:.2} vs {qb:.2}",
            if a_wins { "A" } else { "B" },
            if a_wins { diff } else { -diff }
        );
        Ok(Judgement {
            a_wins,
            reason,
            confidence: None,
            tokens: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, text: &str, errors: u32) -> Candidate {
        Candidate {
            essay_id: id.into(),
            text_storage_id: format!("text-{id}"),
            text: text.into(),
            spelling_errors: Some(errors),
        }
    }

    #[tokio::test]
    async fn better_essays_win_and_say_why() {
        let good = c("g", &"Careful arguments develop steadily, weighing evidence against counterclaims before concluding. ".repeat(8), 0);
        let poor = c(
            "p",
            &"i think it is good. it is good. it is good and nice. ".repeat(6),
            9,
        );
        let j = FeatureJudge::new().compare(&good, &poor).await.unwrap();
        assert!(j.a_wins, "{}", j.reason);
        assert!(j.reason.contains("stronger mainly on"));
        let j2 = FeatureJudge::new().compare(&poor, &good).await.unwrap();
        assert!(!j2.a_wins, "symmetric");
        let same = FeatureJudge::new()
            .compare(&good, &c("h", &good.text, 0))
            .await
            .unwrap();
        assert!(same.a_wins, "a tie goes to the lower id, deterministically");
    }
}
