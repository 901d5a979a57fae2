//! Matching what an essay names against the class roster, as the original's roster matcher
//! does: emails exactly (0.98) or nearly (0.88 x similarity, at 90 % similarity or more); names
//! exactly in any of their forms (0.95: "Maya Lindqvist", "Lindqvist, Maya", with middle
//! initials), by first and last name ignoring middle names (0.85), or nearly (0.75 x
//! similarity, at 60 % word-order-free similarity or more). One suggestion per student (its
//! best), at most three, only the top student's when that one is confident.

use serde::{Deserialize, Serialize};

use crate::extract::Extracted;
use crate::similarity::{ratio, token_sort_ratio};

/// A student of the roster (Class Management's `GET /v1/classes/{id}/roster`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Student {
    pub student_id: String,
    pub first_name: String,
    pub last_name: String,
    #[serde(default)]
    pub full_legal_name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
}

impl Student {
    fn display_name(&self) -> String {
        format!("{} {}", self.first_name, self.last_name)
    }

    fn legal_name(&self) -> String {
        self.full_legal_name
            .clone()
            .unwrap_or_else(|| self.display_name())
    }
}

/// Why a student was suggested; the original's `MatchReason` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    EmailExact,
    EmailFuzzy,
    NameExact,
    FirstLast,
    NameFuzzy,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmailExact => "email_exact",
            Self::EmailFuzzy => "email_fuzzy",
            Self::NameExact => "name_exact",
            Self::FirstLast => "first_last_match",
            Self::NameFuzzy => "name_fuzzy",
        }
    }

    fn is_email(self) -> bool {
        matches!(self, Self::EmailExact | Self::EmailFuzzy)
    }
}

/// One suggested student for an essay (`StudentMatchSuggestion`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suggestion {
    pub student_id: String,
    pub student_name: String,
    pub student_email: Option<String>,
    pub confidence_score: f64,
    pub match_reasons: Vec<&'static str>,
    pub extraction_metadata: serde_json::Map<String, serde_json::Value>,
}

/// How sure the best suggestion is (`HIGH_CONFIDENCE` at 0.9, `NEEDS_REVIEW` at 0.7).
pub fn match_status(suggestions: &[Suggestion]) -> &'static str {
    let best = suggestions
        .iter()
        .map(|s| s.confidence_score)
        .fold(0.0, f64::max);
    if suggestions.is_empty() {
        "NO_MATCH"
    } else if best >= 0.9 {
        "HIGH_CONFIDENCE"
    } else if best >= 0.7 {
        "NEEDS_REVIEW"
    } else {
        "NO_MATCH"
    }
}

struct Candidate<'r> {
    student: &'r Student,
    confidence: f64,
    reason: Reason,
}

/// The suggestions for one essay, best first.
pub fn suggest(found: &Extracted, roster: &[Student]) -> Vec<Suggestion> {
    if roster.is_empty() || found.is_empty() {
        return Vec::new();
    }
    let mut all: Vec<Candidate> = Vec::new();
    for email in &found.emails {
        all.extend(match_email(&email.value, roster));
    }
    for name in &found.names {
        all.extend(match_name(&name.value, roster));
    }
    // The best match per student; an email match wins a tie.
    let mut best: Vec<Candidate> = Vec::new();
    for c in all {
        match best
            .iter_mut()
            .find(|b| b.student.student_id == c.student.student_id)
        {
            Some(b)
                if c.confidence > b.confidence
                    || (c.confidence == b.confidence && c.reason.is_email()) =>
            {
                *b = c
            }
            Some(_) => {}
            None => best.push(c),
        }
    }
    best.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    best.truncate(3);
    if best.first().is_some_and(|b| b.confidence >= 0.85) {
        let top = best[0].student.student_id.clone();
        best.retain(|b| b.student.student_id == top);
    }
    best.into_iter()
        .map(|c| Suggestion {
            student_id: c.student.student_id.clone(),
            student_name: c.student.display_name(),
            student_email: c.student.email.clone(),
            confidence_score: (c.confidence * 1000.0).round() / 1000.0,
            match_reasons: vec![c.reason.as_str()],
            extraction_metadata: Default::default(),
        })
        .collect()
}

/// Gmail ignores dots in the local part; everyone ignores case.
fn normal_email(email: &str) -> String {
    let e = email.trim().to_lowercase();
    match e.split_once('@') {
        Some((local, "gmail.com")) => format!("{}@gmail.com", local.replace('.', "")),
        _ => e,
    }
}

fn match_email<'r>(email: &str, roster: &'r [Student]) -> Vec<Candidate<'r>> {
    let wanted = normal_email(email);
    let with_email: Vec<(&Student, String)> = roster
        .iter()
        .filter_map(|s| s.email.as_deref().map(|e| (s, normal_email(e))))
        .collect();
    let exact: Vec<Candidate> = with_email
        .iter()
        .filter(|(_, e)| *e == wanted)
        .map(|(s, _)| Candidate {
            student: s,
            confidence: 0.98,
            reason: Reason::EmailExact,
        })
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    let mut near: Vec<Candidate> = with_email
        .iter()
        .filter_map(|(s, e)| {
            let similarity = ratio(&wanted, e);
            (similarity >= 0.9).then_some(Candidate {
                student: s,
                confidence: 0.88 * similarity,
                reason: Reason::EmailFuzzy,
            })
        })
        .collect();
    near.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    near.truncate(3);
    near
}

/// Lowercase, single spaces, no commas or full stops.
fn compare_form(s: &str) -> String {
    s.to_lowercase()
        .replace([',', '.'], "")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A name's parts: first, middle names, last (one word: a first name only).
struct NameParts {
    full: String,
    first: String,
    middle: Vec<String>,
    last: String,
}

fn parse_name(name: &str) -> NameParts {
    let full = name.to_owned();
    let tidy = name.split_whitespace().collect::<Vec<_>>().join(" ");
    // "Anna - Karin" -> "Anna-Karin": dashes bind the parts of one name.
    let tidy = tidy
        .replace(" - ", "-")
        .replace(" -", "-")
        .replace("- ", "-");
    let words: Vec<String> = tidy
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    match words.len() {
        0 => NameParts {
            full,
            first: String::new(),
            middle: vec![],
            last: String::new(),
        },
        1 => NameParts {
            full,
            first: words[0].clone(),
            middle: vec![],
            last: String::new(),
        },
        n => NameParts {
            full,
            first: words[0].clone(),
            middle: words[1..n - 1].to_vec(),
            last: words[n - 1].clone(),
        },
    }
}

/// The forms a name may be written in: as given, "First Last", "Last, First", with middle
/// initials.
fn variations(p: &NameParts) -> Vec<String> {
    let mut v = vec![p.full.clone()];
    if !p.first.is_empty() && !p.last.is_empty() {
        v.push(format!("{} {}", p.first, p.last));
        v.push(format!("{}, {}", p.last, p.first));
        if !p.middle.is_empty() {
            let initials: Vec<String> = p
                .middle
                .iter()
                .filter_map(|m| m.chars().next().map(|c| format!("{c}.")))
                .collect();
            v.push(format!("{} {} {}", p.first, initials.join(" "), p.last));
        }
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(x.to_lowercase().trim().to_owned()));
    v
}

fn match_name<'r>(name: &str, roster: &'r [Student]) -> Vec<Candidate<'r>> {
    let parts = parse_name(name);
    // "Lindqvist, Maya" as written: the surname first.
    let parts = match name.split_once(',') {
        Some((last, first)) if !first.trim().is_empty() && !last.trim().is_empty() => {
            let mut p = parse_name(&format!("{} {}", first.trim(), last.trim()));
            p.full = name.to_owned();
            p
        }
        _ => parts,
    };
    let forms: Vec<String> = variations(&parts).iter().map(|v| compare_form(v)).collect();
    let mut out = Vec::new();
    for s in roster {
        let exact = [s.legal_name(), s.display_name()]
            .iter()
            .any(|n| forms.contains(&compare_form(n)));
        if exact {
            out.push(Candidate {
                student: s,
                confidence: 0.95,
                reason: Reason::NameExact,
            });
            continue;
        }
        if !parts.first.is_empty()
            && !parts.last.is_empty()
            && compare_form(&parts.first) == compare_form(&s.first_name)
            && compare_form(&parts.last) == compare_form(&s.last_name)
        {
            out.push(Candidate {
                student: s,
                confidence: 0.85,
                reason: Reason::FirstLast,
            });
            continue;
        }
        let theirs = [
            s.legal_name(),
            s.display_name(),
            format!("{}, {}", s.last_name, s.first_name),
        ];
        let best = forms
            .iter()
            .flat_map(|f| {
                theirs
                    .iter()
                    .map(move |t| token_sort_ratio(f, &compare_form(t)))
            })
            .fold(0.0, f64::max);
        if best >= 0.6 {
            out.push(Candidate {
                student: s,
                confidence: 0.75 * best,
                reason: Reason::NameFuzzy,
            });
        }
    }
    out.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::extract;

    fn roster() -> Vec<Student> {
        [
            ("s1", "Maya", "Lindqvist", "maya.lindqvist@school.se"),
            ("s2", "Omar", "Haddad", "omar.haddad@school.se"),
            ("s3", "Elin", "Berg", "elin.berg@school.se"),
            ("s4", "Anna-Karin", "Svensson", ""),
        ]
        .iter()
        .map(|(id, f, l, e)| Student {
            student_id: id.to_string(),
            first_name: f.to_string(),
            last_name: l.to_string(),
            full_legal_name: None,
            email: (!e.is_empty()).then(|| e.to_string()),
        })
        .collect()
    }

    fn top(text: &str) -> Option<(String, f64, &'static str)> {
        suggest(&extract(text), &roster())
            .first()
            .map(|s| (s.student_id.clone(), s.confidence_score, s.match_reasons[0]))
    }

    #[test]
    fn header_formats_match_with_the_originals_confidences() {
        assert_eq!(
            top("Maya Lindqvist 2026-02-09\n\nEssay text."),
            Some(("s1".into(), 0.95, "name_exact"))
        );
        assert_eq!(
            top("Lindqvist, Maya\n\nEssay text."),
            None,
            "a comma is not exam.net's name line"
        );
        assert_eq!(
            top("Name: Lindqvist, Maya\n\nEssay text."),
            Some(("s1".into(), 0.95, "name_exact"))
        );
        assert_eq!(
            top("Namn: Omar Haddad\n\nText."),
            Some(("s2".into(), 0.95, "name_exact"))
        );
        // A middle name the roster does not know: "First Last" is one of the name's forms.
        assert_eq!(
            top("By: Elin Maria Berg\n\nText."),
            Some(("s3".into(), 0.95, "name_exact"))
        );
        assert_eq!(
            top("A title, with a comma\n\nmail: omar.haddad@school.se\n\nText."),
            Some(("s2".into(), 0.98, "email_exact"))
        );
    }

    #[test]
    fn misspelt_and_reordered_names_match_fuzzily() {
        let (id, confidence, reason) = top("Student: Maja Lindkvist\n\nText.").unwrap();
        assert_eq!((id.as_str(), reason), ("s1", "name_fuzzy"));
        assert!((0.6..0.7).contains(&confidence), "{confidence}");
        let (id, confidence, _) = top("Author: Svensson Anna-Karin\n\nText.").unwrap();
        assert_eq!(id, "s4");
        assert!(
            confidence >= 0.7,
            "word order does not matter: {confidence}"
        );
    }

    #[test]
    fn an_essay_naming_nobody_gets_no_suggestion() {
        assert!(suggest(
            &extract("Phones in class, a debate.\n\nSchools argue about it."),
            &roster()
        )
        .is_empty());
        assert!(suggest(&extract("Name: Karl Persson\n\nText."), &roster()).is_empty());
        assert_eq!(match_status(&[]), "NO_MATCH");
    }
}
