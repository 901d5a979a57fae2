//! Comparative judgement maths: which pairs to compare, and the Bradley-Terry fit.
//!
//! The fit is a maximum a posteriori estimate with a weak Gaussian prior on the abilities
//! (standard deviation [`PRIOR_SD`]): with consistent judgements the plain maximum likelihood
//! estimate runs off to infinity, the prior keeps it finite without changing the order.
//! Newton-Raphson on the log posterior; standard errors from the inverse of its negative
//! Hessian at the optimum.

/// Prior standard deviation of the abilities (logits).
pub const PRIOR_SD: f64 = 2.0;

/// Pairs `(i, j)`, `i != j`, no pair twice, each essay in about `2 * per_side` comparisons:
/// a round-robin over offsets `1..=per_side` of the essays in the given order.
pub fn choose_pairs(n: usize, comparisons_per_essay: usize) -> Vec<(usize, usize)> {
    if n < 2 {
        return Vec::new();
    }
    if n == 2 {
        return vec![(0, 1)];
    }
    let max_offset = (n - 1) / 2;
    let per_side = (comparisons_per_essay.div_ceil(2)).clamp(1, max_offset);
    let mut pairs = Vec::with_capacity(n * per_side);
    for d in 1..=per_side {
        for i in 0..n {
            pairs.push((i, (i + d) % n));
        }
    }
    pairs
}

/// The fitted ability of each item, centred on 0, with its standard error.
#[derive(Clone, Debug, PartialEq)]
pub struct Fit {
    pub scores: Vec<f64>,
    pub standard_errors: Vec<f64>,
    pub iterations: usize,
}

/// Fits abilities from `(winner, loser)` outcomes over `n` items.
pub fn fit(n: usize, outcomes: &[(usize, usize)]) -> Fit {
    let prior = 1.0 / (PRIOR_SD * PRIOR_SD);
    let mut theta = vec![0.0; n];
    let mut iterations = 0;
    let mut info = vec![vec![0.0; n]; n];
    for iter in 0..100 {
        iterations = iter + 1;
        let mut grad: Vec<f64> = theta.iter().map(|t| -t * prior).collect();
        for row in info.iter_mut() {
            row.fill(0.0);
        }
        for (i, row) in info.iter_mut().enumerate() {
            row[i] = prior;
        }
        for &(w, l) in outcomes {
            let p = sigmoid(theta[w] - theta[l]); // P(w beats l)
            grad[w] += 1.0 - p;
            grad[l] -= 1.0 - p;
            let v = p * (1.0 - p);
            info[w][w] += v;
            info[l][l] += v;
            info[w][l] -= v;
            info[l][w] -= v;
        }
        let step = solve(info.clone(), grad);
        let mut biggest: f64 = 0.0;
        for (t, s) in theta.iter_mut().zip(&step) {
            *t += s;
            biggest = biggest.max(s.abs());
        }
        if biggest < 1e-9 {
            break;
        }
    }
    let inverse = invert(&info);
    let mean = theta.iter().sum::<f64>() / n.max(1) as f64;
    Fit {
        scores: theta.iter().map(|t| t - mean).collect(),
        standard_errors: (0..n).map(|i| inverse[i][i].max(0.0).sqrt()).collect(),
        iterations,
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting (`a` is positive definite).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let d = a[col][col];
        for row in col + 1..n {
            let f = a[row][col] / d;
            if f == 0.0 {
                continue;
            }
            let (upper, lower) = a.split_at_mut(row);
            for (target, pivot) in lower[0][col..].iter_mut().zip(&upper[col][col..]) {
                *target -= f * pivot;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

fn invert(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = a.len();
    let mut columns = Vec::with_capacity(n);
    for i in 0..n {
        let mut e = vec![0.0; n];
        e[i] = 1.0;
        columns.push(solve(a.to_vec(), e));
    }
    // columns[i] is column i of the inverse; it is symmetric, so rows = columns.
    columns
}

/// Grade bands in batch standard deviations from the batch mean: A at 1.2 and above, then
/// B, C, D down to -1.2, E below.
const BANDS: [(f64, &str); 4] = [(1.2, "A"), (0.4, "B"), (-0.4, "C"), (-1.2, "D")];

fn mean_sd(scores: &[f64]) -> (f64, f64) {
    let n = scores.len().max(1) as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let sd = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    (mean, sd)
}

/// Letter grade from a score's distance to the batch mean, in batch standard deviations.
pub fn grade(score: f64, scores: &[f64]) -> &'static str {
    let (mean, sd) = mean_sd(scores);
    let z = if sd > 0.0 { (score - mean) / sd } else { 0.0 };
    BANDS
        .iter()
        .find(|(lower, _)| z >= *lower)
        .map_or("E", |(_, g)| g)
}

/// How sure the grade is: the probability that the essay's true score lies in the band of
/// its grade, its score taken as normal with its standard error. With no spread in the batch
/// every essay is C, and certainly so.
pub fn grade_confidence(score: f64, standard_error: f64, scores: &[f64]) -> f64 {
    let (mean, sd) = mean_sd(scores);
    if sd <= 0.0 {
        return 1.0;
    }
    let z = (score - mean) / sd;
    // The band's edges in score units.
    let upper = BANDS
        .iter()
        .rev()
        .find(|(lower, _)| *lower > z)
        .map_or(f64::INFINITY, |(lower, _)| mean + lower * sd);
    let lower = BANDS
        .iter()
        .find(|(lower, _)| z >= *lower)
        .map_or(f64::NEG_INFINITY, |(lower, _)| mean + lower * sd);
    if standard_error <= 0.0 || !standard_error.is_finite() {
        return 1.0;
    }
    let cdf = |x: f64| normal_cdf_at(x, score, standard_error);
    (cdf(upper) - cdf(lower)).clamp(0.0, 1.0)
}

/// Spearman's rank correlation of two score lists (1: the same order, -1: reversed).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    let rank = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        for (pos, &i) in idx.iter().enumerate() {
            r[i] = pos as f64;
        }
        r
    };
    let (rx, ry) = (rank(x), rank(y));
    let n = x.len() as f64;
    let d2: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - b).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

/// The original's confidence labels: HIGH from 0.7, MID from 0.4, else LOW.
pub fn confidence_label(confidence: f64) -> &'static str {
    match confidence {
        c if c >= 0.7 => "HIGH",
        c if c >= 0.4 => "MID",
        _ => "LOW",
    }
}

/// A score's place between the batch's lowest (0) and highest (1); 0.5 when all are equal.
pub fn normalized(score: f64, scores: &[f64]) -> f64 {
    let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max > min {
        (score - min) / (max - min)
    } else {
        0.5
    }
}

/// P(X <= x) for X normal with `mean` and standard deviation `sd` (a point mass when `sd`
/// is 0).
pub fn normal_cdf_at(x: f64, mean: f64, sd: f64) -> f64 {
    if x == f64::INFINITY {
        return 1.0;
    }
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    if sd <= 0.0 || !sd.is_finite() {
        return if x >= mean { 1.0 } else { 0.0 };
    }
    normal_cdf((x - mean) / sd)
}

/// The standard normal distribution function (Abramowitz and Stegun 7.1.26, error < 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    if x == f64::INFINITY {
        return 1.0;
    }
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    let t = x.abs() / std::f64::consts::SQRT_2;
    let k = 1.0 / (1.0 + 0.327_591_1 * t);
    let poly = k
        * (0.254_829_592
            + k * (-0.284_496_736
                + k * (1.421_413_741 + k * (-1.453_152_027 + k * 1.061_405_429))));
    let erf = 1.0 - poly * (-t * t).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grade_confidence_is_the_chance_of_staying_in_the_band() {
        let scores = [-2.0, -1.0, 0.0, 1.0, 2.0];
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-3);
        // Far inside the top band with a small error: nearly certain.
        let sure = grade_confidence(2.0, 0.05, &scores);
        assert!(sure > 0.99, "{sure}");
        // The same essay measured loosely: less sure, never above certainty.
        let loose = grade_confidence(2.0, 2.0, &scores);
        assert!(loose < sure && loose > 0.0, "{loose}");
        // In the middle band (C spans 0.4 sd each side): symmetric and below 1.
        let mid = grade_confidence(0.0, 0.5, &scores);
        assert!(mid > 0.5 && mid < 1.0, "{mid}");
        assert_eq!(confidence_label(0.8), "HIGH");
        assert_eq!(confidence_label(0.5), "MID");
        assert_eq!(confidence_label(0.1), "LOW");
        assert_eq!(normalized(2.0, &scores), 1.0);
        assert_eq!(normalized(-2.0, &scores), 0.0);
        assert_eq!(normalized(0.0, &scores), 0.5);
    }

    #[test]
    fn pairs_are_unique_and_balanced() {
        for n in 2..40 {
            let pairs = choose_pairs(n, 8);
            let mut seen = std::collections::HashSet::new();
            let mut count = vec![0; n];
            for &(a, b) in &pairs {
                assert_ne!(a, b);
                assert!(
                    seen.insert((a.min(b), a.max(b))),
                    "n={n}: pair {a},{b} repeated"
                );
                count[a] += 1;
                count[b] += 1;
            }
            let (lo, hi) = (count.iter().min().unwrap(), count.iter().max().unwrap());
            assert_eq!(lo, hi, "n={n}: every essay as often");
            assert!(
                *lo >= (n - 1).min(8) - 1,
                "n={n}: {lo} comparisons per essay"
            );
        }
    }

    /// Simulated judges following a planted Bradley-Terry model: the fit recovers the order.
    #[test]
    fn recovers_a_planted_ranking() {
        let n = 20;
        let truth: Vec<f64> = (0..n).map(|i| (i as f64 - 9.5) * 0.35).collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut outcomes = Vec::new();
        for _round in 0..4 {
            for (a, b) in choose_pairs(n, 10) {
                let p = sigmoid(truth[a] - truth[b]);
                outcomes.push(if rng.f64() < p { (a, b) } else { (b, a) });
            }
        }
        let fit = fit(n, &outcomes);
        let rho = spearman(&truth, &fit.scores);
        assert!(rho > 0.9, "spearman {rho}");
        assert!(fit.scores.iter().sum::<f64>().abs() < 1e-9, "centred");
        assert!(
            fit.standard_errors
                .iter()
                .all(|&s| s > 0.05 && s < PRIOR_SD),
            "{:?}",
            fit.standard_errors
        );
        // The extremes are the least certain: fewer informative comparisons.
        assert!(fit.iterations < 100, "converged");
    }

    #[test]
    fn consistent_judgements_stay_finite_and_ordered() {
        // 0 beats everyone, 1 beats all but 0, ...: a perfect order.
        let n = 5;
        let outcomes: Vec<(usize, usize)> = choose_pairs(n, 4)
            .into_iter()
            .map(|(a, b)| (a.min(b), a.max(b)))
            .collect();
        let fit = fit(n, &outcomes);
        assert!(fit.scores.iter().all(|s| s.is_finite()));
        assert!(
            fit.scores.windows(2).all(|w| w[0] > w[1]),
            "{:?}",
            fit.scores
        );
        assert_eq!(grade(fit.scores[0], &fit.scores), "A");
        assert_eq!(grade(fit.scores[4], &fit.scores), "E");
    }
}
