//! String similarity as the original measures it (rapidfuzz's `ratio` and
//! `token_sort_ratio`), on characters rather than bytes so that å, ä and ö count once.

/// Normalised Indel similarity in 0..=1: `1 - (insertions + deletions) / (len a + len b)`,
/// i.e. `2 * LCS / (len a + len b)`. Two empty strings are identical.
pub fn ratio(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let total = a.len() + b.len();
    if total == 0 {
        return 1.0;
    }
    2.0 * lcs(&a, &b) as f64 / total as f64
}

/// [`ratio`] of the two strings' words, each sorted: word order does not matter
/// ("Lindqvist Maya" against "Maya Lindqvist" is 1.0).
pub fn token_sort_ratio(a: &str, b: &str) -> f64 {
    ratio(&sorted_tokens(a), &sorted_tokens(b))
}

fn sorted_tokens(s: &str) -> String {
    let mut words: Vec<String> = s
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.sort();
    words.join(" ")
}

/// Length of the longest common subsequence (two rows of the classic table).
fn lcs(a: &[char], b: &[char]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut row = vec![0usize; b.len() + 1];
    for &x in a {
        for (j, &y) in b.iter().enumerate() {
            row[j + 1] = if x == y {
                prev[j] + 1
            } else {
                row[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_match_rapidfuzz() {
        // Values rapidfuzz gives (fuzz.ratio / 100).
        assert_eq!(ratio("", ""), 1.0);
        assert_eq!(ratio("abc", "abc"), 1.0);
        assert!((ratio("this is a test", "this is a test!") - 0.9655).abs() < 1e-3);
        assert!((ratio("maya lindqvist", "maja lindkvist") - 0.857).abs() < 1e-3);
        assert_eq!(token_sort_ratio("Lindqvist Maya", "maya lindqvist"), 1.0);
        assert!(token_sort_ratio("Omar Haddad", "Elin Berg") < 0.5);
        assert_eq!(
            ratio("åsa", "asa"),
            2.0 * 2.0 / 6.0,
            "characters, not bytes"
        );
    }
}
