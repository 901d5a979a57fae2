//! The shared dialect of the services' SQL, spoken to MySQL and MariaDB.
//!
//! Services write SQL once, as PostgreSQL and SQLite both read it. Sessions opened by
//! `outbox_mysql::connect` already read ANSI quotes and `||`; what remains is rewritten
//! here, once per statement:
//! - `$1` placeholders become `?`, one per occurrence, bound in that order;
//! - `ON CONFLICT (...) DO NOTHING` is dropped and a unique violation of that statement reads
//!   as "nothing inserted" (MySQL keeps the transaction going after a failed statement);
//!   `INSERT IGNORE` would also turn other errors, a value too long say, into warnings;
//! - `ON CONFLICT (...) DO UPDATE SET a = excluded.a` becomes
//!   `ON DUPLICATE KEY UPDATE a = VALUES(a)` (any unique key conflicts, not only the named
//!   one: keep one unique key per table where that differs);
//! - in scripts (`CREATE TABLE`), `TEXT` columns of a key, a reference or an index become
//!   `VARCHAR(255)`
//!   (MySQL indexes no unbounded text), other `TEXT` `LONGTEXT`, `BYTEA` `LONGBLOB`.
//!
//! - `UPDATE t SET ... WHERE key = $1 [AND ...] RETURNING cols` (no MySQL form) runs the
//!   update, then, when it changed rows, reads `cols` back with the first condition of its
//!   `WHERE` (which must identify the rows, as a key does) in the same transaction, under
//!   the update's row locks. `DELETE ... RETURNING` is MariaDB's own (10.0 and later).

/// A statement rewritten for MySQL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Statement {
    pub sql: String,
    /// Index into the caller's parameters for each `?`, in order.
    pub order: Vec<usize>,
    /// A unique violation means "nothing inserted" (was `ON CONFLICT DO NOTHING`).
    pub duplicates_are_nothing: bool,
    /// For an `UPDATE ... RETURNING`: the read of the returned columns after the update.
    pub read_back: Option<Box<Statement>>,
}

/// Splits `UPDATE t ... WHERE w RETURNING cols` into the update and the read back.
fn update_returning(sql: &str) -> Result<Option<(String, String)>, String> {
    if !sql.trim_start().to_ascii_uppercase().starts_with("UPDATE") {
        return Ok(None);
    }
    let Some(returning) = find_word(sql, "RETURNING ", 0) else {
        return Ok(None);
    };
    let update = sql[..returning].to_owned();
    let cols = sql[returning..].trim_start()["RETURNING".len()..].trim();
    let table = sql
        .split_whitespace()
        .nth(1)
        .ok_or("UPDATE without a table")?;
    let where_at = find_word(&update, "WHERE", 0).ok_or_else(|| {
        format!("UPDATE ... RETURNING on MySQL needs a WHERE naming the row's key: {sql}")
    })?;
    let condition = &update[where_at + "WHERE".len()..];
    let first = match find_word(condition, " AND ", 0) {
        Some(and) => &condition[..and],
        None => condition,
    };
    if find_word(first, " OR ", 0).is_some() {
        return Err(format!(
            "UPDATE ... RETURNING on MySQL reads back by the WHERE's first condition, which \
             must be `key = $n`: {sql}"
        ));
    }
    let read_back = format!("SELECT {cols} FROM {table} WHERE {}", first.trim());
    Ok(Some((update, read_back)))
}

/// Byte ranges of `sql` outside single-quoted strings, as (start, end).
fn outside_strings(sql: &str) -> Vec<(usize, usize)> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_string = false;
    for (i, c) in sql.char_indices() {
        if c == '\'' {
            if in_string {
                start = i + 1;
            } else {
                parts.push((start, i));
            }
            in_string = !in_string;
        }
    }
    if !in_string {
        parts.push((start, sql.len()));
    }
    parts
}

/// Finds `word` (ASCII, case-insensitive) outside strings, from byte `from`.
fn find_word(sql: &str, word: &str, from: usize) -> Option<usize> {
    let upper = sql.to_ascii_uppercase();
    for (start, end) in outside_strings(sql) {
        let lo = start.max(from);
        if lo >= end {
            continue;
        }
        if let Some(i) = upper[lo..end].find(word) {
            return Some(lo + i);
        }
    }
    None
}

/// Rewrites `excluded.x` (any case) to `VALUES(x)`.
fn values_for_excluded(set: &str) -> String {
    let mut out = String::with_capacity(set.len());
    let lower = set.to_ascii_lowercase();
    let mut i = 0;
    while i < set.len() {
        if lower[i..].starts_with("excluded.") {
            let name_start = i + "excluded.".len();
            let name_end = set[name_start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(set.len(), |n| name_start + n);
            out.push_str("VALUES(");
            out.push_str(&set[name_start..name_end]);
            out.push(')');
            i = name_end;
        } else {
            let c = set[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Rewrites one statement (see the module docs).
pub(crate) fn statement(sql: &str) -> Result<Statement, String> {
    if let Some((update, read_back)) = update_returning(sql)? {
        let mut statement = plain(&update);
        statement.read_back = Some(Box::new(plain(&read_back)));
        return Ok(statement);
    }
    Ok(plain(sql))
}

fn plain(sql: &str) -> Statement {
    let mut text = sql.to_owned();
    let mut duplicates_are_nothing = false;
    if let Some(at) = find_word(&text, "ON CONFLICT", 0) {
        let tail = &text[at..];
        let upper = tail.to_ascii_uppercase();
        if let Some(d) = upper.find("DO NOTHING") {
            let rest = tail[d + "DO NOTHING".len()..].to_owned();
            text = format!("{}{}", &text[..at], rest);
            duplicates_are_nothing = true;
        } else if let Some(d) = upper.find("DO UPDATE SET") {
            let set = values_for_excluded(&tail[d + "DO UPDATE SET".len()..]);
            text = format!("{}ON DUPLICATE KEY UPDATE{}", &text[..at], set);
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut order = Vec::new();
    let mut last = 0;
    for (start, end) in outside_strings(&text) {
        out.push_str(&text[last..start]);
        let part = &text[start..end];
        let bytes = part.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'$' && i + 1 < bytes.len() && bytes[i + 1].is_ascii_digit() {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                let n: usize = part[i + 1..i + 1 + digits].parse().expect("digits");
                order.push(n.saturating_sub(1));
                out.push('?');
                i += 1 + digits;
            } else {
                let c = part[i..].chars().next().expect("in bounds");
                out.push(c);
                i += c.len_utf8();
            }
        }
        last = end;
    }
    out.push_str(&text[last..]);
    Statement {
        sql: out,
        order,
        duplicates_are_nothing,
        read_back: None,
    }
}

/// Splits a script into statements at `;` outside strings.
fn statements(script: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_string = false;
    for (i, c) in script.char_indices() {
        match c {
            '\'' => in_string = !in_string,
            ';' if !in_string => {
                out.push(&script[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&script[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// Splits `body` at commas outside parentheses.
fn top_level_items(body: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in body.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&body[start..]);
    items
}

/// The column names inside the first `( ... )` of `text`.
fn column_list(text: &str) -> Vec<String> {
    let Some(open) = text.find('(') else {
        return Vec::new();
    };
    let close = text[open..].find(')').map_or(text.len(), |c| open + c);
    text[open + 1..close]
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

/// `(table, columns)` of every `CREATE [UNIQUE] INDEX ... ON table (columns)` in `script`.
fn indexed_columns(script: &str) -> Vec<(String, Vec<String>)> {
    statements(script)
        .into_iter()
        .filter_map(|s| {
            let upper = s.trim_start().to_ascii_uppercase();
            if !(upper.starts_with("CREATE INDEX") || upper.starts_with("CREATE UNIQUE INDEX")) {
                return None;
            }
            let on = s.to_ascii_uppercase().find(" ON ")?;
            let rest = s[on + 4..].trim_start();
            let table: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            Some((table.to_ascii_lowercase(), column_list(rest)))
        })
        .collect()
}

/// Rewrites a `CREATE TABLE` statement's column types (see the module docs); other
/// statements are returned as they are.
fn create_table(sql: &str, indexed: &[(String, Vec<String>)]) -> String {
    let upper = sql.to_ascii_uppercase();
    let trimmed = upper.trim_start();
    if !trimmed.starts_with("CREATE TABLE") {
        return sql.to_owned();
    }
    let Some(open) = sql.find('(') else {
        return sql.to_owned();
    };
    let Some(close) = sql.rfind(')') else {
        return sql.to_owned();
    };
    let head = &sql[..open];
    let table = head
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let items = top_level_items(&sql[open + 1..close]);
    let mut keys: Vec<String> = indexed
        .iter()
        .filter(|(t, _)| *t == table)
        .flat_map(|(_, cols)| cols.clone())
        .collect();
    for item in &items {
        let u = item.trim().to_ascii_uppercase();
        if u.starts_with("PRIMARY KEY") || u.starts_with("UNIQUE") {
            keys.extend(column_list(item));
        } else if u.contains("PRIMARY KEY") || u.contains(" UNIQUE") || u.contains(" REFERENCES ") {
            if let Some(name) = item.split_whitespace().next() {
                keys.push(name.to_ascii_lowercase());
            }
        }
    }
    let rewritten: Vec<String> = items
        .iter()
        .map(|item| {
            let words: Vec<&str> = item.split_whitespace().collect();
            let (Some(name), Some(ty)) = (words.first(), words.get(1)) else {
                return item.to_string();
            };
            let is_constraint = ["PRIMARY", "UNIQUE", "CONSTRAINT", "FOREIGN", "CHECK"]
                .contains(&name.to_ascii_uppercase().as_str());
            if is_constraint {
                return item.to_string();
            }
            let new_ty = match ty.to_ascii_uppercase().as_str() {
                "TEXT" if keys.contains(&name.to_ascii_lowercase()) => "VARCHAR(255)",
                "TEXT" => "LONGTEXT",
                "BYTEA" => "LONGBLOB",
                _ => return item.to_string(),
            };
            let at = item.find(ty).expect("the type is in the item");
            format!("{}{}{}", &item[..at], new_ty, &item[at + ty.len()..])
        })
        .collect();
    format!("{}({}){}", head, rewritten.join(","), &sql[close + 1..])
}

/// A service's script (its `CREATE TABLE IF NOT EXISTS ...`), statement by statement.
pub(crate) fn script(script: &str) -> Vec<String> {
    let indexed = indexed_columns(script);
    statements(script)
        .into_iter()
        .map(|s| create_table(s, &indexed))
        .collect()
}

/// A column declaration of `add_column` (`TEXT` is unbounded).
pub(crate) fn declaration(declaration: &str) -> String {
    let mut words: Vec<String> = declaration.split_whitespace().map(str::to_owned).collect();
    if let Some(first) = words.first_mut() {
        match first.to_ascii_uppercase().as_str() {
            "TEXT" => *first = "LONGTEXT".into(),
            "BYTEA" => *first = "LONGBLOB".into(),
            _ => {}
        }
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_returning_reads_back_by_the_first_condition() {
        let s = statement(
            "UPDATE matches SET status = 'CONFIRMED', confirmed_by = $2
             WHERE batch_id = $1 AND status = 'PENDING'
             RETURNING class_id, suggestions",
        )
        .unwrap();
        assert!(!s.sql.contains("RETURNING"), "{}", s.sql);
        assert_eq!(s.order, vec![1, 0]);
        let back = s.read_back.expect("a read back");
        assert_eq!(
            back.sql,
            "SELECT class_id, suggestions FROM matches WHERE batch_id = ?"
        );
        assert_eq!(back.order, vec![0]);
        assert!(statement("UPDATE t SET a = 1 WHERE x = $1 OR y = $2 RETURNING a").is_err());
        let d = statement("DELETE FROM p WHERE b = $1 RETURNING e").unwrap();
        assert!(
            d.read_back.is_none() && d.sql.contains("RETURNING"),
            "MariaDB's own"
        );
    }

    #[test]
    fn placeholders_become_question_marks_in_order_of_use() {
        let s = plain("UPDATE t SET a = $2, b = '$1' WHERE id = $1 OR other = $2");
        assert_eq!(
            s.sql,
            "UPDATE t SET a = ?, b = '$1' WHERE id = ? OR other = ?"
        );
        assert_eq!(s.order, vec![1, 0, 1]);
        assert!(!s.duplicates_are_nothing);
    }

    #[test]
    fn on_conflict_becomes_mysql_s_forms() {
        let s = plain("INSERT INTO t (id, n) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING");
        assert_eq!(s.sql, "INSERT INTO t (id, n) VALUES (?, ?) ");
        assert!(s.duplicates_are_nothing);
        let s = plain(
            "INSERT INTO t (id, n) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET n = excluded.n, m = EXCLUDED.m_2, k = $3",
        );
        assert!(
            s.sql
                .ends_with("ON DUPLICATE KEY UPDATE n = VALUES(n), m = VALUES(m_2), k = ?"),
            "{}",
            s.sql
        );
        assert_eq!(s.order, vec![0, 1, 2]);
    }

    #[test]
    fn key_text_columns_are_bounded_and_the_rest_unbounded() {
        let out = script(
            "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, batch_id TEXT NOT NULL,
                 body TEXT, raw BYTEA, score DOUBLE PRECISION);
             CREATE TABLE IF NOT EXISTS pairs (a TEXT NOT NULL, b TEXT NOT NULL, note TEXT,
                 PRIMARY KEY (a, b));
             CREATE INDEX IF NOT EXISTS files_by_batch ON files (batch_id)",
        );
        assert_eq!(out.len(), 3);
        assert!(out[0].contains("id VARCHAR(255) PRIMARY KEY"), "{}", out[0]);
        assert!(
            out[0].contains("batch_id VARCHAR(255) NOT NULL"),
            "{}",
            out[0]
        );
        assert!(out[0].contains("body LONGTEXT"), "{}", out[0]);
        assert!(out[0].contains("raw LONGBLOB"), "{}", out[0]);
        assert!(
            out[1].contains("a VARCHAR(255) NOT NULL, b VARCHAR(255) NOT NULL, note LONGTEXT"),
            "{}",
            out[1]
        );
        assert_eq!(
            declaration("TEXT NOT NULL DEFAULT ''"),
            "LONGTEXT NOT NULL DEFAULT ''"
        );
    }
}
