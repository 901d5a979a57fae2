//! The demo: a class with students, a REGULAR batch, the sample essays uploaded, spellcheck
//! then CJ assessment, progress while it runs, ranked results and an outbox summary at the
//! end. Everything goes through the services' HTTP APIs and events; nothing reaches into a
//! service's tables.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::client::Gateway;

/// Students of the demo class; several sample essays are signed by them.
pub const STUDENTS: &[(&str, &str)] = &[
    ("Maya", "Lindqvist"),
    ("Omar", "Haddad"),
    ("Elin", "Berg"),
    ("Jonas", "Ek"),
    ("Sara", "Nilsson"),
    ("Leo", "Karlsson"),
];

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Folder of essay files; every file in it is uploaded.
    pub essays_dir: PathBuf,
    /// A REGULAR batch (with a class and student matching) instead of a GUEST batch.
    pub with_class: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// Print progress and results.
    pub verbose: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            essays_dir: default_essays_dir(),
            with_class: true,
            timeout: Duration::from_secs(120),
            verbose: true,
        }
    }
}

/// `examples/essays` at the repository root.
pub fn default_essays_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/essays")
}

/// What the demo saw.
#[derive(Debug)]
pub struct DemoReport {
    pub batch_id: String,
    pub uploaded: usize,
    pub failed_validation: Vec<String>,
    /// The Result Aggregator's JSON view of the batch.
    pub results: Value,
    pub elapsed: Duration,
}

/// Reads every file of `dir`, sorted by name.
pub fn read_essays(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading essays from {}", dir.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.push((name, std::fs::read(&path)?));
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no essay files in {}", dir.display());
    Ok(files)
}

fn expect(reply: (StatusCode, Value), want: StatusCode, what: &str) -> anyhow::Result<Value> {
    if reply.0 != want {
        bail!("{what}: HTTP {} {}", reply.0, reply.1);
    }
    Ok(reply.1)
}

/// Runs one batch through the services behind `api` (in process or remote).
pub async fn run(api: &Gateway, options: &DemoOptions) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let say = |line: String| {
        if options.verbose {
            println!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
        }
    };
    let files = read_essays(&options.essays_dir)?;

    let mut class_id = None;
    if options.with_class {
        let class = expect(
            api.post(
                "/v1/classes",
                &json!({"name": "English 9B", "course_code": "ENG5"}),
            )
            .await?,
            StatusCode::CREATED,
            "create class",
        )?;
        let id = class["class_id"].as_str().context("class_id")?.to_owned();
        for (first, last) in STUDENTS {
            expect(
                api.post(
                    &format!("/v1/classes/{id}/students"),
                    &json!({"first_name": first, "last_name": last}),
                )
                .await?,
                StatusCode::CREATED,
                "add student",
            )?;
        }
        say(format!(
            "class \"English 9B\" created with {} students",
            STUDENTS.len()
        ));
        class_id = Some(id);
    }

    let registered = expect(
        api.post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": files.len(),
                                          "class_id": class_id}),
        )
        .await?,
        StatusCode::CREATED,
        "register batch",
    )?;
    let batch_id = registered["batch_id"]
        .as_str()
        .context("batch_id")?
        .to_owned();
    let correlation: uuid::Uuid = registered["correlation_id"]
        .as_str()
        .context("correlation_id")?
        .parse()?;
    say(format!(
        "batch {batch_id} registered ({}, {} essays expected)",
        registered["batch_kind"],
        files.len()
    ));

    // Asked for before the batch is ready: it waits, then starts by itself.
    let pipeline = expect(
        api.post(
            &format!("/v1/batches/{batch_id}/pipelines"),
            &json!({"requested_pipeline": "cj_assessment"}),
        )
        .await?,
        StatusCode::ACCEPTED,
        "request pipeline",
    )?;
    say(format!(
        "pipeline cj_assessment requested: runs {}",
        pipeline["phases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(" -> ")
    ));

    // As a browser would: several requests when the batch exceeds what one request may carry.
    let mut outcomes = Vec::new();
    for chunk in upload_chunks(&files) {
        let uploaded = expect(
            api.upload(&batch_id, Some(correlation), chunk).await?,
            StatusCode::CREATED,
            "upload",
        )?;
        outcomes.extend(uploaded["files"].as_array().cloned().unwrap_or_default());
    }
    let failed_validation: Vec<String> = outcomes
        .iter()
        .filter(|f| f["status"] != "PROVISIONED")
        .map(|f| {
            format!(
                "{} ({})",
                f["filename"].as_str().unwrap_or("?"),
                f["error_code"].as_str().unwrap_or("?")
            )
        })
        .collect();
    say(format!(
        "uploaded {} files: {} provisioned, {} failed validation {}",
        outcomes.len(),
        outcomes.len() - failed_validation.len(),
        failed_validation.len(),
        failed_validation.join(", ")
    ));

    let mut last = String::new();
    let mut confirmed = false;
    let results = loop {
        ensure!(
            started.elapsed() < options.timeout,
            "the batch did not finish within {:?}; last: {last}",
            options.timeout
        );
        let (_, status) = api.get(&format!("/v1/batches/{batch_id}")).await?;
        let (_, essays) = api.get(&format!("/v1/batches/{batch_id}/essays")).await?;
        let mut states = std::collections::BTreeMap::<String, usize>::new();
        for e in essays["essays"].as_array().into_iter().flatten() {
            *states
                .entry(e["state"].as_str().unwrap_or("?").to_lowercase())
                .or_default() += 1;
        }
        let line = format!(
            "batch {} | pipeline {} | essays: {}",
            status["status"].as_str().unwrap_or("?").to_lowercase(),
            status["pipeline"]["status"]
                .as_str()
                .unwrap_or("-")
                .to_lowercase(),
            states
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if line != last {
            say(line.clone());
            last = line;
        }
        if options.with_class && !confirmed {
            let (code, matches) = api.get(&format!("/v1/matches/{batch_id}")).await?;
            if code == StatusCode::OK && matches["status"] == "PENDING" {
                let found: Vec<String> = matches["suggestions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["student_name"].as_str().map(str::to_owned))
                    .collect();
                expect(
                    api.post(&format!("/v1/matches/{batch_id}/confirm"), &json!({}))
                        .await?,
                    StatusCode::OK,
                    "confirm matches",
                )?;
                say(format!(
                    "teacher confirmed the suggested student matches: {}",
                    found.join(", ")
                ));
                confirmed = true;
            }
        }
        let (code, results) = api.get(&format!("/v1/batches/{batch_id}/results")).await?;
        if code == StatusCode::OK
            && matches!(results["status"].as_str(), Some("COMPLETED" | "FAILED"))
        {
            break results;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    say(format!(
        "results ready: batch {}",
        results["status"].as_str().unwrap_or("?").to_lowercase()
    ));
    Ok(DemoReport {
        batch_id,
        uploaded: files.len(),
        failed_validation,
        results,
        elapsed: started.elapsed(),
    })
}

/// Consecutive groups of files, each within File Service's per-request limits.
fn upload_chunks(files: &[(String, Vec<u8>)]) -> Vec<&[(String, Vec<u8>)]> {
    // Half the request limit: multipart framing adds a little to every file.
    let budget = file_service::MAX_UPLOAD_BYTES / 2;
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, b)) in files.iter().enumerate() {
        if i > start
            && (i - start == file_service::MAX_FILES_PER_UPLOAD / 2 || bytes + b.len() > budget)
        {
            chunks.push(&files[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += b.len();
    }
    if start < files.len() {
        chunks.push(&files[start..]);
    }
    chunks
}

/// The ranked results as a table: rank, grade with its confidence, score, spelling, the
/// student (when matched) or the file; then which judge ranked them and what the grades mean.
pub fn results_table(results: &Value) -> String {
    let mut out =
        String::from("rank grade  sure   score    ±se  spelling  words  student / essay\n");
    for e in results["essays"].as_array().into_iter().flatten() {
        let Some(rank) = e["rank"].as_i64() else {
            continue;
        };
        let who = match (e["student_name"].as_str(), e["filename"].as_str()) {
            (Some(name), Some(file)) => format!("{name} ({file})"),
            (Some(name), None) => name.to_owned(),
            (None, file) => file.unwrap_or("?").to_owned(),
        };
        out.push_str(&format!(
            "{rank:>4} {:<5} {:>4} {:>7.2} {:>6.2} {:>9} {:>6}  {who}\n",
            e["grade"].as_str().unwrap_or("-"),
            e["confidence_label"].as_str().unwrap_or("-"),
            e["score"].as_f64().unwrap_or(0.0),
            e["standard_error"].as_f64().unwrap_or(0.0),
            e["spelling_errors"]
                .as_i64()
                .map(|n| n.to_string())
                .unwrap_or("-".into()),
            e["word_count"]
                .as_i64()
                .map(|n| n.to_string())
                .unwrap_or("-".into()),
        ));
    }
    if let Some(judge) = results["judge"].as_str() {
        out.push_str(&format!(
            "judged by {judge}{}; grades {}\n",
            if judge.starts_with("llm:") {
                ""
            } else {
                " (set CJ_LLM_URL for a language model)"
            },
            results["grades"]
                .as_str()
                .unwrap_or("as the judge gave them")
        ));
    }
    out
}

/// p50 and p99 (seconds) of commit-to-ack over every service, estimated from the Prometheus
/// histogram buckets the way `histogram_quantile` does.
pub fn commit_to_ack_quantiles(metrics_text: &str) -> Option<(f64, f64)> {
    let mut buckets = std::collections::BTreeMap::<u64, (f64, f64)>::new(); // le bits -> (le, count)
    for line in metrics_text.lines() {
        let Some(rest) = line.strip_prefix("outbox_commit_to_ack_seconds_bucket{") else {
            continue;
        };
        let labels = &rest[..rest.find('}')?];
        let le = labels
            .split(',')
            .find_map(|pair| pair.strip_prefix("le=\""))?
            .trim_end_matches('"');
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let count: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last()?.1;
    if total == 0.0 {
        return None;
    }
    let quantile = |q: f64| {
        let rank = q * total;
        let (mut prev_le, mut prev_count) = (0.0, 0.0);
        for &(le, count) in &sorted {
            if count >= rank {
                if le.is_infinite() {
                    return prev_le;
                }
                let within = if count > prev_count {
                    (rank - prev_count) / (count - prev_count)
                } else {
                    1.0
                };
                return prev_le + (le - prev_le) * within;
            }
            (prev_le, prev_count) = (le, count);
        }
        prev_le
    };
    Some((quantile(0.5), quantile(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_buckets() {
        let text = "\
outbox_commit_to_ack_seconds_bucket{service=\"a\",table=\"t\",le=\"0.01\"} 50
outbox_commit_to_ack_seconds_bucket{service=\"a\",table=\"t\",le=\"0.1\"} 100
outbox_commit_to_ack_seconds_bucket{service=\"a\",table=\"t\",le=\"+Inf\"} 100
outbox_commit_to_ack_seconds_bucket{le=\"0.01\",service=\"b\",table=\"t\"} 50
outbox_commit_to_ack_seconds_bucket{service=\"b\",table=\"t\",le=\"0.1\"} 100
outbox_commit_to_ack_seconds_bucket{service=\"b\",table=\"t\",le=\"+Inf\"} 100
";
        let (p50, p99) = commit_to_ack_quantiles(text).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        assert!(p99 > 0.09 && p99 <= 0.1, "{p99}");
        assert_eq!(commit_to_ack_quantiles("nothing"), None);
    }
}
