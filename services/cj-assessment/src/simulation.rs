//! Simulated judges for measuring pairing strategies: essays with planted abilities, and a
//! judge that prefers the abler essay with the Bradley-Terry probability
//! `1 / (1 + exp(-(a - b)))`, its coin flips a pure function of (seed, pair) so a run is
//! repeatable whatever order the pairs are asked in.

use async_trait::async_trait;

use crate::bt::spearman;
use crate::judge::{Candidate, Judge, JudgeError, Judgement};
use crate::{assess_with, AssessError, Strategy};

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn uniform(seed: u64, a: u64, b: u64) -> f64 {
    let h = splitmix(seed ^ splitmix(a.wrapping_mul(1_000_003) ^ splitmix(b)));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// `n` essays with abilities drawn from a normal distribution of standard deviation `spread`.
pub fn planted(n: usize, spread: f64, seed: u64) -> (Vec<Candidate>, Vec<f64>) {
    let abilities: Vec<f64> = (0..n as u64)
        .map(|i| {
            // Box-Muller from two uniforms.
            let (u, v) = (uniform(seed, i, 1).max(1e-12), uniform(seed, i, 2));
            spread * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect();
    let essays = (0..n)
        .map(|i| Candidate {
            essay_id: format!("e{i:03}"),
            text_storage_id: format!("t{i}"),
            text: String::new(),
            spelling_errors: None,
        })
        .collect();
    (essays, abilities)
}

/// A judge with the planted abilities and Bradley-Terry noise.
pub struct SimulatedJudge {
    pub abilities: Vec<f64>,
    pub seed: u64,
}

/// The planted index of a simulated essay id (`e007` -> 7).
fn index(essay_id: &str) -> usize {
    essay_id[1..].parse().expect("a simulated essay id")
}

#[async_trait]
impl Judge for SimulatedJudge {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn compare(&self, a: &Candidate, b: &Candidate) -> Result<Judgement, JudgeError> {
        let (i, j) = (index(&a.essay_id), index(&b.essay_id));
        let p = 1.0 / (1.0 + (-(self.abilities[i] - self.abilities[j])).exp());
        let a_wins = uniform(self.seed, i as u64, j as u64) < p;
        Ok(Judgement {
            a_wins,
            reason: String::new(),
            confidence: None,
            tokens: 0,
        })
    }
}

/// One simulated batch: (comparisons asked, Spearman of the fitted ranking with the truth).
pub async fn trial(
    n: usize,
    seed: u64,
    strategy: Strategy,
    budget: usize,
) -> Result<(usize, f64), AssessError> {
    let (essays, abilities) = planted(n, 1.5, seed);
    let judge = SimulatedJudge {
        abilities: abilities.clone(),
        seed: seed ^ 0xABCD,
    };
    let assessed = assess_with(&judge, &essays, budget, strategy).await?;
    let mut fitted = vec![0.0; n];
    for r in &assessed.ranked {
        fitted[index(&r.essay_id)] = r.score;
    }
    Ok((assessed.comparisons.len(), spearman(&fitted, &abilities)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pairing::Pairing;

    /// The adaptive default is as accurate as the round-robin with fewer comparisons, on
    /// simulated batches of 50 essays (means over seeds; the full table is the
    /// `pairing_bench` example's).
    /// Anchors with known grades on a simulated corpus: the anchors' projected grades are
    /// (mostly) their known grades, and the essays' grades their planted grades or next to them.
    #[tokio::test]
    async fn anchors_project_grades_that_match_what_is_known() {
        use crate::calibration::Scale;
        let scale = Scale::named("swedish_8_anchor").unwrap();
        // Grades 1.5 logits apart: a judge tells an E from a D about four times in five.
        let levels = [("E", -3.0), ("D", -1.5), ("C", 0.0), ("B", 1.5), ("A", 3.0)];
        let (mut anchors_right, mut anchors_all) = (0, 0);
        let (mut exact, mut near, mut essays_all) = (0, 0, 0);
        for seed in 0..3 {
            let (mut candidates, mut abilities) = planted(40, 2.0, seed);
            let mut known = Vec::new();
            for (k, (grade, level)) in levels.iter().enumerate() {
                for offset in [-0.2, 0.2] {
                    let i = candidates.len();
                    candidates.push(Candidate {
                        essay_id: format!("e{i:03}"),
                        text_storage_id: format!("anchor-{i}"),
                        text: String::new(),
                        spelling_errors: None,
                    });
                    abilities.push(level + offset);
                    known.push((i, scale.position(grade).unwrap()));
                    let _ = k;
                }
            }
            let judge = SimulatedJudge {
                abilities: abilities.clone(),
                seed,
            };
            let anchors = crate::Anchors {
                scale,
                known: known.clone(),
            };
            let assessed = crate::assess_calibrated(
                &judge,
                &candidates,
                2500,
                Strategy::Adaptive(crate::pairing::Pairing::default()),
                Some(&anchors),
            )
            .await
            .unwrap();
            assert_eq!(assessed.calibration, Some("swedish_8_anchor"));
            // The planted grade: the band of the planted ability between the levels.
            let planted_grade = |a: f64| {
                let band = [-2.25, -0.75, 0.75, 2.25]
                    .iter()
                    .filter(|c| a >= **c)
                    .count();
                scale.position(levels[band].0).unwrap() as i64
            };
            for r in &assessed.ranked {
                let i = index(&r.essay_id);
                let got = scale.position(r.grade).unwrap() as i64;
                if r.is_anchor {
                    anchors_all += 1;
                    let want = known.iter().find(|(k, _)| *k == i).unwrap().1 as i64;
                    anchors_right += usize::from(got == want);
                } else {
                    essays_all += 1;
                    let want = planted_grade(abilities[i]);
                    exact += usize::from(got == want);
                    // Neighbouring anchored grades are two positions apart on this scale.
                    near += usize::from((got - want).abs() <= 2);
                }
            }
            let ranks: Vec<usize> = assessed
                .ranked
                .iter()
                .filter(|r| !r.is_anchor)
                .map(|r| r.rank)
                .collect();
            assert_eq!(
                ranks,
                (1..=40).collect::<Vec<_>>(),
                "essays ranked among themselves"
            );
        }
        let summary = format!(
            "anchors {anchors_right} of {anchors_all}; essays exactly {exact}, \
             within a grade {near} of {essays_all}"
        );
        println!("{summary}");
        // Measured: anchors 25 of 30, essays 73 of 120 exactly and 119 of 120 within a grade.
        // An anchor's ability is measured to about 0.7 logits after its comparisons, against
        // bands 1.5 wide: more anchors per grade, or more comparisons per anchor, narrow it.
        assert!(anchors_right * 10 >= anchors_all * 8, "{summary}");
        assert!(exact * 100 >= essays_all * 55, "{summary}");
        assert!(near * 100 >= essays_all * 95, "{summary}");
    }

    #[tokio::test]
    async fn adaptive_pairing_matches_round_robin_with_fewer_comparisons() {
        let (mut rr, mut ad) = ((0.0, 0.0), (0.0, 0.0));
        for seed in 0..8 {
            let (c, r) = trial(50, seed, Strategy::RoundRobin, 2500).await.unwrap();
            rr = (rr.0 + c as f64, rr.1 + r);
            let (c, r) = trial(50, seed, Strategy::Adaptive(Pairing::default()), 2500)
                .await
                .unwrap();
            ad = (ad.0 + c as f64, ad.1 + r);
        }
        assert!(
            ad.0 < rr.0 * 0.97,
            "comparisons: adaptive {} vs round-robin {}",
            ad.0,
            rr.0
        );
        assert!(
            ad.1 >= rr.1 - 0.08,
            "accuracy (sum over 8): adaptive {} vs round-robin {}",
            ad.1,
            rr.1
        );
        assert!(spearman(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]) > 0.999);
        assert!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) < -0.999);
    }
}
