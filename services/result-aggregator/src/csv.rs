//! A batch's results as CSV (RFC 4180: comma-separated, fields with commas, quotes or line
//! breaks quoted, quotes doubled), one essay per row in rank order.

use serde_json::Value;

const COLUMNS: [&str; 12] = [
    "rank",
    "grade",
    "grade_confidence",
    "confidence_label",
    "score",
    "standard_error",
    "normalized_score",
    "spelling_errors",
    "word_count",
    "student_name",
    "filename",
    "essay_id",
];

fn field(v: &Value) -> String {
    let text = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// The CSV of a results view (`ResultAggregator::results`).
pub fn of(view: &Value) -> String {
    let mut out = COLUMNS.join(",");
    out.push_str("\r\n");
    for essay in view["essays"].as_array().into_iter().flatten() {
        let row: Vec<String> = COLUMNS.iter().map(|c| field(&essay[*c])).collect();
        out.push_str(&row.join(","));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_as_rfc_4180_says() {
        let view = serde_json::json!({"essays": [
            {"rank": 1, "grade": "A", "score": 1.23456, "student_name": "Lindqvist, Maya",
             "filename": "say \"hi\".txt", "essay_id": "e1"},
            {"rank": null, "essay_id": "e2"}]});
        let csv = of(&view);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], COLUMNS.join(","));
        assert_eq!(
            lines[1],
            "1,A,,,1.235,,,,,\"Lindqvist, Maya\",\"say \"\"hi\"\".txt\",e1"
        );
        assert_eq!(lines[2], ",,,,,,,,,,,e2");
    }
}
