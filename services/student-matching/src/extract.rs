//! Finding who wrote an essay: names and email addresses in its opening, by three strategies
//! tried in the original's order, stopping early once one is confident.
//!
//! - **exam.net**: the first line (or paragraph) is the student's name, perhaps followed by a
//!   date or a number (`Maya Lindqvist 2026-02-09`, `Omar Haddad 7`); emails in the first
//!   paragraphs.
//! - **headers**: `Name:`, `Student:`, `Author:`, `By:`, `Submitted by:`, `Written by:` and the
//!   Swedish `Namn:`, `Elev:`, `Författare:` in the first 20 lines; any email there. Beyond the
//!   original: a byline without a colon (`by Maya Lindqvist`, `av Elin Berg`) on a line of its
//!   own, every word capitalised, at a little less confidence (0.8) than a labelled header.
//! - **email anchor**: every email address, with capitalised names within 50 characters of it,
//!   or else a name read from the address itself (`maya.lindqvist@…` -> "Maya Lindqvist").
//!
//! Confidences are the original's (0.6 to 0.95), so that suggestions mean the same here.

/// A name or email found, with how sure the strategy is and where it was found.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    pub value: String,
    pub strategy: &'static str,
    pub confidence: f64,
    pub location: String,
}

/// Everything found in one essay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extracted {
    pub names: Vec<Found>,
    pub emails: Vec<Found>,
}

impl Extracted {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.emails.is_empty()
    }

    fn best(list: &[Found]) -> f64 {
        list.iter().map(|f| f.confidence).fold(0.0, f64::max)
    }

    /// Adds what `other` found that is not known yet (case-insensitively).
    fn merge(&mut self, other: Extracted) {
        for (mine, theirs) in [
            (&mut self.names, other.names),
            (&mut self.emails, other.emails),
        ] {
            for f in theirs {
                if !mine
                    .iter()
                    .any(|m| m.value.to_lowercase() == f.value.to_lowercase())
                {
                    mine.push(f);
                }
            }
        }
    }

    /// The original's early exit: a confident name (with an email, or very confident), or a
    /// fair name together with a good email.
    fn sure_enough(&self) -> bool {
        let (name, email) = (Self::best(&self.names), Self::best(&self.emails));
        (name >= 0.7 && (!self.emails.is_empty() || name >= 0.85)) || (name >= 0.6 && email >= 0.8)
    }
}

/// Runs the strategies in order until one makes the result sure enough.
pub fn extract(text: &str) -> Extracted {
    let mut result = Extracted::default();
    for strategy in [examnet, headers, email_anchor] {
        result.merge(strategy(text));
        if result.sure_enough() {
            break;
        }
    }
    result
}

fn found(
    value: impl Into<String>,
    strategy: &'static str,
    confidence: f64,
    location: String,
) -> Found {
    Found {
        value: value.into(),
        strategy,
        confidence,
        location,
    }
}

/// exam.net: the name first, then header paragraphs.
fn examnet(text: &str) -> Extracted {
    let mut out = Extracted::default();
    let paragraphs: Vec<&str> = text
        .trim()
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let Some(first) = paragraphs.first() else {
        return out;
    };
    let first_line = first.lines().next().unwrap_or_default().trim();
    if let Some(at) = find_date(first_line) {
        let name = first_line[..at].trim();
        if !name.is_empty() && examnet_name(name) {
            out.names
                .push(found(name, "examnet", 0.85, "line_1".into()));
        }
    } else if examnet_name(first_line) {
        let name = strip_number_suffix(first_line);
        if name.chars().count() > 2 {
            out.names.push(found(name, "examnet", 0.8, "line_1".into()));
        }
    }
    if out.names.is_empty() && examnet_name(first) {
        let name = strip_number_suffix(first);
        if name.chars().count() > 2 {
            out.names
                .push(found(name, "examnet", 0.7, "paragraph_1".into()));
        }
    }
    for (i, line) in first.lines().take(5).enumerate() {
        for email in emails_in(line) {
            out.emails
                .push(found(email, "examnet", 0.9, format!("line_{}", i + 1)));
        }
    }
    for (i, p) in paragraphs.iter().enumerate().skip(1).take(3) {
        for email in emails_in(p) {
            out.emails
                .push(found(email, "examnet", 0.9, format!("paragraph_{}", i + 1)));
        }
    }
    dedupe(out)
}

/// Labelled header lines.
fn headers(text: &str) -> Extracted {
    const LABELS: &[&str] = &[
        "name",
        "student",
        "author",
        "by",
        "submitted by",
        "written by",
        "namn",
        "elev",
        "författare",
    ];
    let mut out = Extracted::default();
    let lines: Vec<&str> = text.lines().take(20).collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if let Some(name) = byline(line) {
            out.names
                .push(found(name, "header", 0.8, format!("line_{}_byline", i + 1)));
            continue;
        }
        let Some((label, value)) = line.split_once(':') else {
            continue;
        };
        if !LABELS.contains(&label.trim().to_lowercase().as_str()) || label.trim() != label {
            continue;
        }
        let value = value.trim();
        if value.chars().count() < 3 {
            continue;
        }
        if is_email(value) {
            out.emails.push(found(
                value.to_lowercase(),
                "header",
                0.9,
                format!("line_{}_header", i + 1),
            ));
        } else if header_name(value) {
            out.names.push(found(
                value,
                "header",
                0.85,
                format!("line_{}_header", i + 1),
            ));
        }
    }
    for email in emails_in(&lines.join("\n")) {
        out.emails
            .push(found(email, "header", 0.85, "header_area".into()));
    }
    dedupe(out)
}

/// "by Maya Lindqvist" (or Swedish "av"): the name, if every word of it is capitalised.
fn byline(line: &str) -> Option<&str> {
    let (word, rest) = line.split_once(' ')?;
    if !["by", "av"].contains(&word.to_lowercase().as_str()) {
        return None;
    }
    let rest = rest.trim();
    let words: Vec<&str> = rest.split_whitespace().collect();
    let capitalised = |w: &&str| {
        w.chars().next().is_some_and(char::is_uppercase)
            && w.chars().all(|c| c.is_alphabetic() || c == '-')
    };
    ((2..=4).contains(&words.len()) && words.iter().all(capitalised) && header_name(rest))
        .then_some(rest)
}

/// Emails anywhere, and the names near them.
fn email_anchor(text: &str) -> Extracted {
    let mut out = Extracted::default();
    for (start, end) in email_spans(text) {
        let email = &text[start..end];
        out.emails.push(found(
            email.to_lowercase(),
            "email_anchor",
            0.95,
            format!("position_{start}"),
        ));
        let from = floor_char(text, start.saturating_sub(50));
        let to = ceil_char(text, (end + 50).min(text.len()));
        let near: Vec<String> = capitalised_runs(&text[from..to])
            .into_iter()
            .filter(|n| anchor_name(n))
            .collect();
        if near.is_empty() {
            if let Some(name) = name_from_address(&email[..email.find('@').unwrap_or(0)]) {
                out.names.push(found(
                    name,
                    "email_anchor",
                    0.6,
                    format!("from_email_{email}"),
                ));
            }
        } else {
            for name in near {
                out.names.push(found(
                    name,
                    "email_anchor",
                    0.7,
                    format!("near_email_{email}"),
                ));
            }
        }
    }
    dedupe(out)
}

fn dedupe(mut e: Extracted) -> Extracted {
    let mut merged = Extracted::default();
    merged.merge(std::mem::take(&mut e));
    merged
}

/// Byte offset of a `dddd-dd-dd` date in `s`.
fn find_date(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (0..b.len().saturating_sub(9)).find(|&i| {
        let d = |k: usize| b[i + k].is_ascii_digit();
        d(0) && d(1)
            && d(2)
            && d(3)
            && b[i + 4] == b'-'
            && d(5)
            && d(6)
            && b[i + 7] == b'-'
            && d(8)
            && d(9)
    })
}

/// Drops a trailing " 12" (exam.net appends numbers to names).
fn strip_number_suffix(s: &str) -> String {
    let t = s.trim_end();
    match t.rsplit_once(char::is_whitespace) {
        Some((head, tail)) if !tail.is_empty() && tail.chars().all(|c| c.is_ascii_digit()) => {
            head.trim_end().to_owned()
        }
        _ => t.to_owned(),
    }
}

const PARTICLES: &[&str] = &["av", "von", "de", "van", "der", "la", "el"];

/// exam.net's test: short, at least two words, no sentence punctuation or essay words.
fn examnet_name(text: &str) -> bool {
    if text.chars().count() > 50 {
        return false;
    }
    let lower = text.to_lowercase();
    let banned = [
        ":",
        "?",
        "!",
        ".",
        ",",
        ";",
        "(",
        ")",
        "[",
        "]",
        "essay",
        "assignment",
        "task",
        "question",
        "answer",
        "uppsats",
        "uppgift",
        "fråga",
        "svar",
    ];
    if banned.iter().any(|b| lower.contains(b)) {
        return false;
    }
    let spaces = text.matches(' ').count();
    if spaces == 0 || spaces > 4 {
        return false;
    }
    // One real name word: not a particle ("von"), not a number, two letters or more.
    text.split_whitespace().any(|w| {
        let particle = w.chars().count() <= 3 && PARTICLES.contains(&w.to_lowercase().as_str());
        !particle && w.chars().count() >= 2 && w.chars().all(char::is_alphabetic)
    })
}

/// The header strategy's test: up to six words, no links or markup, one real word.
fn header_name(text: &str) -> bool {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let n = text.chars().count();
    if !(3..=60).contains(&n) {
        return false;
    }
    let lower = text.to_lowercase();
    let banned = [
        "@", "http", "www", ".com", ".se", "?", "!", "(", ")", "[", "]", "\\", "/", "|",
    ];
    if banned.iter().any(|b| lower.contains(b)) || text.split_whitespace().count() > 6 {
        return false;
    }
    text.split_whitespace().any(|w| {
        w.chars().count() >= 2
            && w.chars().all(char::is_alphabetic)
            && !PARTICLES.contains(&w.to_lowercase().as_str())
    })
}

/// The email anchor's test: two or more words (or hyphenated), no heading words.
fn anchor_name(text: &str) -> bool {
    const NOT_NAMES: &[&str] = &[
        "The",
        "This",
        "That",
        "These",
        "Those",
        "From",
        "Subject",
        "Date",
        "Time",
        "Email",
        "Name",
        "Student",
        "Author",
        "Written",
        "Assignment",
        "Essay",
        "Task",
        "Homework",
    ];
    let n = text.chars().count();
    (text.contains(' ') || text.contains('-'))
        && (5..=50).contains(&n)
        && !text.split([' ', '-']).any(|w| NOT_NAMES.contains(&w))
}

/// Runs of capitalised words ("Maya Lindqvist", "Anna-Karin Berg") in `text`.
fn capitalised_runs(text: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut seps: Vec<char> = Vec::new();
    let mut rest = text;
    let flush = |current: &mut Vec<&str>, seps: &mut Vec<char>, runs: &mut Vec<String>| {
        if !current.is_empty() {
            let mut s = String::from(current[0]);
            for (w, sep) in current.iter().skip(1).zip(seps.iter()) {
                s.push(*sep);
                s.push_str(w);
            }
            runs.push(s);
        }
        current.clear();
        seps.clear();
    };
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(rest.len());
        let word = &rest[..end];
        let capitalised = {
            let mut cs = word.chars();
            cs.next().is_some_and(char::is_uppercase)
                && cs.clone().count() > 0
                && cs.all(char::is_lowercase)
        };
        if capitalised {
            current.push(word);
        } else if !word.is_empty() {
            flush(&mut current, &mut seps, &mut runs);
        }
        rest = &rest[end..];
        let sep = rest.chars().next();
        match sep {
            Some(c @ (' ' | '-'))
                if !current.is_empty() && rest[1..].starts_with(char::is_uppercase) =>
            {
                seps.push(c);
                rest = &rest[1..];
            }
            Some(c) => {
                flush(&mut current, &mut seps, &mut runs);
                rest = &rest[c.len_utf8()..];
            }
            None => {}
        }
    }
    flush(&mut current, &mut seps, &mut runs);
    runs
}

/// "maya.lindqvist" -> "Maya Lindqvist"; nothing for a single word or a role address.
fn name_from_address(local: &str) -> Option<String> {
    let cleaned: String = local.chars().filter(|c| !c.is_ascii_digit()).collect();
    let parts: Vec<&str> = cleaned
        .split(['.', '_', '-'])
        .filter(|p| p.chars().count() > 1)
        .filter(|p| {
            ![
                "info", "contact", "admin", "student", "elev", "mail", "email",
            ]
            .contains(&p.to_lowercase().as_str())
        })
        .collect();
    if parts.len() < 2 {
        return None;
    }
    let cap = |w: &str| {
        let mut cs = w.chars();
        cs.next()
            .map(|c| {
                c.to_uppercase()
                    .chain(cs.flat_map(char::to_lowercase))
                    .collect::<String>()
            })
            .unwrap_or_default()
    };
    Some(format!("{} {}", cap(parts[0]), cap(parts[parts.len() - 1])))
}

fn local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._%+-".contains(c)
}

fn domain_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '-'
}

/// Byte spans of the email addresses in `text`.
fn email_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    for (at, _) in text.match_indices('@') {
        let start = text[..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| local_char(*c))
            .last()
            .map(|(i, _)| i);
        let Some(start) = start else { continue };
        let domain_len = text[at + 1..]
            .char_indices()
            .take_while(|(_, c)| domain_char(*c))
            .last()
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        let domain = text[at + 1..at + 1 + domain_len].trim_end_matches(['.', '-']);
        let Some((host, tld)) = domain.rsplit_once('.') else {
            continue;
        };
        if host.is_empty() || tld.len() < 2 || !tld.chars().all(|c| c.is_ascii_alphabetic()) {
            continue;
        }
        if spans.last().is_some_and(|&(_, e)| e > start) {
            continue;
        }
        spans.push((start, at + 1 + domain.len()));
    }
    spans
}

fn emails_in(text: &str) -> Vec<String> {
    email_spans(text)
        .into_iter()
        .map(|(s, e)| text[s..e].to_lowercase())
        .collect()
}

fn is_email(s: &str) -> bool {
    email_spans(s)
        .first()
        .is_some_and(|&(a, b)| a == 0 && b == s.len())
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(e: &Extracted) -> Vec<(&str, f64)> {
        e.names
            .iter()
            .map(|f| (f.value.as_str(), f.confidence))
            .collect()
    }

    #[test]
    fn emails_are_found_with_their_bounds() {
        assert_eq!(
            emails_in("write to Maya.Lindqvist@school.se, thanks"),
            ["maya.lindqvist@school.se"]
        );
        assert_eq!(emails_in("a@b, x@y.z, not@an.email."), ["not@an.email"]);
        assert!(is_email("omar_h@example.org"));
        assert!(!is_email("omar at example.org"));
    }

    #[test]
    fn each_strategy_finds_its_format() {
        let e = extract("Maya Lindqvist 2026-02-09\n\nEnglish 9B\n\nThe essay starts here.");
        assert_eq!(names(&e), [("Maya Lindqvist", 0.85)]);
        let e = extract("Omar Haddad 7\n\nWhy phones belong in class");
        assert_eq!(names(&e), [("Omar Haddad", 0.8)]);
        let e = extract(
            "Title of the essay, with a comma\nNamn: Elin Berg\nElev: elin.berg@skolan.se\n\nText.",
        );
        assert_eq!(names(&e), [("Elin Berg", 0.85)]);
        assert_eq!(e.emails[0].value, "elin.berg@skolan.se");
        let e = extract("Some opening sentence that is long, really.\n\nContact: sara.nilsson@example.org for questions.");
        assert!(names(&e).contains(&("Sara Nilsson", 0.6)), "{e:?}");
        assert!(extract("Phones in class, a debate.\n\nSchools argue a lot.").is_empty());
        let e = extract("Should Schools Ban Mobile Phones?\nby Maya Lindqvist\n\nText.");
        assert_eq!(names(&e), [("Maya Lindqvist", 0.8)]);
        assert!(extract("Phones, then.\nby the way, nobody asked\n\nText.").is_empty());
    }

    #[test]
    fn capitalised_runs_keep_compound_names() {
        assert_eq!(
            capitalised_runs("by Anna-Karin Berg (9B)"),
            ["Anna-Karin Berg"]
        );
        assert_eq!(capitalised_runs("Åsa Öberg wrote"), ["Åsa Öberg"]);
    }
}
