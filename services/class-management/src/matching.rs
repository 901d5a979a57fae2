//! Essay-student associations for REGULAR batches, from the matching service's suggestions.
//!
//! `batch.author.matches.suggested` brings up to three suggestions per essay, with
//! confidences; they are kept as *pending* with a deadline. The teacher confirms them over
//! HTTP, as suggested or with their own choices (students of the batch's class only). If the
//! teacher does not answer in time, the suggestions confirm themselves, but only the confident
//! ones (0.7 or more, the original's threshold): an essay without a confident suggestion is
//! confirmed *unassigned* rather than given to a guess (the original points such essays at a
//! per-class "UNKNOWN" student; here the student is simply absent, so the roster stays clean).
//! Either way `student.associations.confirmed` goes out exactly once per batch.

use serde::{Deserialize, Serialize};

/// The confidence from which a suggestion confirms itself at the deadline.
pub const AUTO_CONFIRM_THRESHOLD: f64 = 0.7;

/// One suggested student, as the matching service sends it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Suggested {
    pub student_id: String,
    pub student_name: String,
    #[serde(default)]
    pub student_email: Option<String>,
    pub confidence_score: f64,
    #[serde(default)]
    pub match_reasons: Vec<String>,
}

/// One essay's result, as the matching service sends it (`EssayMatchResult`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EssayMatches {
    pub essay_id: String,
    #[serde(default)]
    pub suggestions: Vec<Suggested>,
    #[serde(default)]
    pub no_match_reason: Option<String>,
}

/// An essay's confirmed student (none: confirmed unassigned).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Association {
    pub essay_id: String,
    #[serde(default)]
    pub student_id: Option<String>,
    #[serde(default)]
    pub student_name: Option<String>,
    #[serde(default)]
    pub confidence_score: Option<f64>,
}

/// Who confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmedBy {
    /// The teacher accepted the suggestions: every essay's best one, however confident.
    Teacher,
    /// Nobody answered in time: only confident suggestions.
    Timeout,
}

impl ConfirmedBy {
    /// The original's `AssociationValidationMethod` value.
    pub fn method(self) -> &'static str {
        match self {
            Self::Teacher => "human",
            Self::Timeout => "timeout",
        }
    }
}

/// The associations the suggestions give when `by` confirms them as they are.
pub fn from_suggestions(results: &[EssayMatches], by: ConfirmedBy) -> Vec<Association> {
    results
        .iter()
        .map(|r| {
            let best = r
                .suggestions
                .iter()
                .max_by(|a, b| a.confidence_score.total_cmp(&b.confidence_score))
                .filter(|s| {
                    by == ConfirmedBy::Teacher || s.confidence_score >= AUTO_CONFIRM_THRESHOLD
                });
            Association {
                essay_id: r.essay_id.clone(),
                student_id: best.map(|s| s.student_id.clone()),
                student_name: best.map(|s| s.student_name.clone()),
                confidence_score: best.map(|s| s.confidence_score),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn essay(id: &str, suggestions: &[(&str, f64)]) -> EssayMatches {
        EssayMatches {
            essay_id: id.into(),
            suggestions: suggestions
                .iter()
                .map(|(s, c)| Suggested {
                    student_id: s.to_string(),
                    student_name: format!("Student {s}"),
                    student_email: None,
                    confidence_score: *c,
                    match_reasons: vec!["name_fuzzy".into()],
                })
                .collect(),
            no_match_reason: None,
        }
    }

    #[test]
    fn the_deadline_confirms_only_confident_suggestions() {
        let results = [
            essay("e1", &[("s1", 0.95)]),
            essay("e2", &[("s2", 0.64), ("s3", 0.61)]),
            essay("e3", &[]),
            essay("e4", &[("s4", 0.7)]),
        ];
        let auto = from_suggestions(&results, ConfirmedBy::Timeout);
        let ids: Vec<Option<&str>> = auto.iter().map(|a| a.student_id.as_deref()).collect();
        assert_eq!(
            ids,
            [Some("s1"), None, None, Some("s4")],
            "unconfident essays stay unassigned"
        );
        let teacher = from_suggestions(&results, ConfirmedBy::Teacher);
        let ids: Vec<Option<&str>> = teacher.iter().map(|a| a.student_id.as_deref()).collect();
        assert_eq!(
            ids,
            [Some("s1"), Some("s2"), None, Some("s4")],
            "the teacher accepted the best guesses"
        );
    }
}
