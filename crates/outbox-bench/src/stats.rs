//! Percentiles, medians and table printing.

use std::future::Future;
use std::time::{Duration, Instant};

/// Latency summary of one run.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub count: usize,
    pub per_sec: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

pub fn summarize(mut latencies: Vec<Duration>, wall: Duration) -> Summary {
    latencies.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pick = |p: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            us(latencies[((latencies.len() - 1) as f64 * p).round() as usize])
        }
    };
    let mean = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().map(|d| us(*d)).sum::<f64>() / latencies.len() as f64
    };
    Summary {
        count: latencies.len(),
        per_sec: latencies.len() as f64 / wall.as_secs_f64().max(1e-9),
        mean_us: mean,
        p50_us: pick(0.5),
        p99_us: pick(0.99),
        max_us: pick(1.0),
    }
}

/// The median of `values` (the lower middle for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[(values.len() - 1) / 2]
}

/// The median run of several, field by field.
pub fn median_summary(runs: &[Summary]) -> Summary {
    let field = |f: fn(&Summary) -> f64| median(runs.iter().map(f).collect());
    Summary {
        count: runs.iter().map(|r| r.count).sum(),
        per_sec: field(|s| s.per_sec),
        mean_us: field(|s| s.mean_us),
        p50_us: field(|s| s.p50_us),
        p99_us: field(|s| s.p99_us),
        max_us: field(|s| s.max_us),
    }
}

pub fn header(title: &str, columns: &[&str]) {
    println!("\n## {title}");
    println!("| {} |", columns.join(" | "));
    println!("|{}", "---|".repeat(columns.len()));
}

pub fn row(cells: &[String]) {
    println!("| {} |", cells.join(" | "));
}

/// `txns` transactions spread over `writers` concurrent tasks; `one(writer, i)` runs one and
/// returns its latency. The summary of all of them over the wall time.
pub async fn burst<F, Fut>(writers: usize, txns: usize, one: F) -> anyhow::Result<Summary>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<Duration>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(txns / writers + 1);
            for i in 0..txns / writers {
                lat.push(one(w, i).await?);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(summarize(all, start.elapsed()))
}
