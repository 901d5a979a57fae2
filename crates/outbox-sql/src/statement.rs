//! Statements with named parameters, compiled once into each database's placeholders.
//!
//! A dialect writes `@relay`, `@seqs`, ... where a value goes; [`Statement::compile`] turns
//! them into `$1` (PostgreSQL), `?1` (SQLite) or `?` (MySQL, one per occurrence) and records
//! the order in which values must be bound. The store logic then binds values by name, so
//! each dialect orders its SQL as its grammar needs (MySQL binds a name again for each
//! occurrence). Names are fixed strings in the code, never input.

/// How a database spells its placeholders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placeholders {
    /// `$1`, `$2`, ...: each name once, reused by number.
    Dollar,
    /// `?1`, `?2`, ...: each name once, reused by number.
    QuestionNumbered,
    /// `?` per occurrence, bound in order of appearance.
    Question,
}

/// A compiled statement: its SQL and the names of its values in binding order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub order: Vec<&'static str>,
}

impl Statement {
    /// Compiles `text`, whose parameters are `@name` (`[a-z_][a-z0-9_]*`), taking each name
    /// from `names` (the parameters the store logic knows). Panics on an unknown name: the
    /// statements are the dialect's code, and a unit test compiles every one of them.
    pub fn compile(text: &str, style: Placeholders, names: &[&'static str]) -> Self {
        let mut sql = String::with_capacity(text.len());
        let mut order: Vec<&'static str> = Vec::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let starts_name = c == '@'
                && chars
                    .peek()
                    .is_some_and(|(_, n)| n.is_ascii_lowercase() || *n == '_');
            if !starts_name {
                sql.push(c);
                continue;
            }
            let mut end = i + 1;
            while let Some(&(j, n)) = chars.peek() {
                if n.is_ascii_lowercase() || n.is_ascii_digit() || n == '_' {
                    end = j + n.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let name = &text[i + 1..end];
            let known = names
                .iter()
                .copied()
                .find(|n| *n == name)
                .unwrap_or_else(|| panic!("statement parameter @{name} is not one of {names:?}"));
            match style {
                Placeholders::Question => {
                    order.push(known);
                    sql.push('?');
                }
                Placeholders::Dollar | Placeholders::QuestionNumbered => {
                    let n = match order.iter().position(|o| *o == known) {
                        Some(p) => p + 1,
                        None => {
                            order.push(known);
                            order.len()
                        }
                    };
                    sql.push(if style == Placeholders::Dollar {
                        '$'
                    } else {
                        '?'
                    });
                    sql.push_str(&n.to_string());
                }
            }
        }
        Self { sql, order }
    }
}

/// Statements run in order, in one transaction when there are several. A script that
/// returns rows returns those of its last step; one that counts changed rows counts those of
/// step `counted` (the last unless said otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    pub steps: Vec<Statement>,
    pub counted: usize,
}

impl Script {
    pub fn new(steps: Vec<Statement>) -> Self {
        assert!(!steps.is_empty(), "a script has at least one statement");
        Self {
            counted: steps.len() - 1,
            steps,
        }
    }

    /// Counts the changed rows of step `index` instead of the last.
    pub fn counting(mut self, index: usize) -> Self {
        assert!(index < self.steps.len());
        self.counted = index;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["relay", "seqs", "limit"];

    #[test]
    fn numbered_styles_reuse_a_name_and_casts_stay() {
        let s = Statement::compile(
            "SELECT @relay, @seqs::int8[], @relay LIMIT @limit",
            Placeholders::Dollar,
            NAMES,
        );
        assert_eq!(s.sql, "SELECT $1, $2::int8[], $1 LIMIT $3");
        assert_eq!(s.order, ["relay", "seqs", "limit"]);
        let s = Statement::compile(
            "DELETE FROM t WHERE a = @seqs OR b = @relay",
            Placeholders::QuestionNumbered,
            NAMES,
        );
        assert_eq!(s.sql, "DELETE FROM t WHERE a = ?1 OR b = ?2");
    }

    #[test]
    fn question_marks_bind_each_occurrence_in_order() {
        let s = Statement::compile(
            "UPDATE t SET a = @limit WHERE r = @relay OR r2 = @relay",
            Placeholders::Question,
            NAMES,
        );
        assert_eq!(s.sql, "UPDATE t SET a = ? WHERE r = ? OR r2 = ?");
        assert_eq!(s.order, ["limit", "relay", "relay"]);
    }

    #[test]
    #[should_panic(expected = "@nope")]
    fn an_unknown_name_is_refused() {
        Statement::compile("SELECT @nope", Placeholders::Dollar, NAMES);
    }
}
