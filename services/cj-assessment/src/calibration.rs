//! Grades from anchors: essays with known grades compared with the batch project every essay
//! onto a grade scale (the original's scales, [`Scale`]).
//!
//! Each grade with anchors sits at the mean ability of its anchors; the boundary between two
//! neighbouring anchored grades lies midway between them. An essay's ability, taken as normal
//! with its standard error, gives the probability of each grade (the mass of its band); the
//! grade is the band the ability lies in, its confidence the probability of that band
//! (labelled HIGH from 0.7, MID from 0.4, else LOW, as the original labels), and its
//! normalised score its expected place on the scale (0 = lowest grade, 1 = highest). Grades
//! no anchor shows are not projected (the scale's ends stay open).

/// A grade scale of the original (`common_core/grade_scales.py`), lowest grade first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub id: &'static str,
    pub grades: &'static [&'static str],
}

pub const SCALES: [Scale; 3] = [
    Scale {
        id: "swedish_8_anchor",
        grades: &["F", "E", "D", "D+", "C", "C+", "B", "A"],
    },
    Scale {
        id: "eng5_np_legacy_9_step",
        grades: &["F+", "E-", "E+", "D-", "D+", "C-", "C+", "B", "A"],
    },
    Scale {
        id: "eng5_np_national_9_step",
        grades: &["1", "2", "3", "4", "5", "6", "7", "8", "9"],
    },
];

impl Scale {
    /// The scale called `id`; otherwise an error naming them.
    pub fn named(id: &str) -> Result<Self, String> {
        SCALES.into_iter().find(|s| s.id == id).ok_or_else(|| {
            format!(
                "no grade scale {id:?}; one of: {}",
                SCALES.map(|s| s.id).join(", ")
            )
        })
    }

    /// The position of `grade` on the scale; otherwise an error naming the grades.
    pub fn position(&self, grade: &str) -> Result<usize, String> {
        self.grades.iter().position(|g| *g == grade).ok_or_else(|| {
            format!(
                "{grade:?} is not a grade of {}; one of: {}",
                self.id,
                self.grades.join(", ")
            )
        })
    }
}

/// Where an essay lands on the scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Projection {
    pub grade: &'static str,
    /// Probability per anchored grade, lowest first.
    pub probabilities: Vec<(&'static str, f64)>,
    pub confidence: f64,
    pub label: &'static str,
    pub normalized: f64,
}

/// Projects every ability onto `scale` from the anchors' abilities and known grades
/// (`(ability, grade position)`). None without anchors of at least one grade.
pub fn project(
    scale: Scale,
    anchors: &[(f64, usize)],
    abilities: &[f64],
    standard_errors: &[f64],
) -> Option<Vec<Projection>> {
    // Mean ability per anchored grade, in scale order.
    let mut levels: Vec<(usize, f64)> = Vec::new();
    for position in 0..scale.grades.len() {
        let of_grade: Vec<f64> = anchors
            .iter()
            .filter(|(_, g)| *g == position)
            .map(|(a, _)| *a)
            .collect();
        if !of_grade.is_empty() {
            levels.push((
                position,
                of_grade.iter().sum::<f64>() / of_grade.len() as f64,
            ));
        }
    }
    if levels.is_empty() {
        return None;
    }
    // Boundaries midway between neighbouring grades (kept increasing if anchors disagree).
    let mut cuts: Vec<f64> = levels.windows(2).map(|w| (w[0].1 + w[1].1) / 2.0).collect();
    for i in 1..cuts.len() {
        if cuts[i] < cuts[i - 1] {
            cuts[i] = cuts[i - 1];
        }
    }
    let top = (scale.grades.len() - 1).max(1) as f64;
    Some(
        abilities
            .iter()
            .zip(standard_errors)
            .map(|(&ability, &se)| {
                let cdf = |x: f64| crate::bt::normal_cdf_at(x, ability, se);
                let probabilities: Vec<(&'static str, f64)> = levels
                    .iter()
                    .enumerate()
                    .map(|(k, (position, _))| {
                        let lower = if k == 0 {
                            f64::NEG_INFINITY
                        } else {
                            cuts[k - 1]
                        };
                        let upper = cuts.get(k).copied().unwrap_or(f64::INFINITY);
                        (scale.grades[*position], (cdf(upper) - cdf(lower)).max(0.0))
                    })
                    .collect();
                let band = cuts.iter().filter(|c| ability >= **c).count();
                let (grade, confidence) = probabilities[band];
                let normalized = levels
                    .iter()
                    .zip(&probabilities)
                    .map(|((position, _), (_, p))| *position as f64 / top * p)
                    .sum::<f64>();
                Projection {
                    grade,
                    confidence,
                    label: crate::bt::confidence_label(confidence),
                    normalized,
                    probabilities,
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn essays_land_between_the_anchors_of_their_grades() {
        let scale = Scale::named("swedish_8_anchor").unwrap();
        let (e, c, a) = (
            scale.position("E").unwrap(),
            scale.position("C").unwrap(),
            scale.position("A").unwrap(),
        );
        let anchors = [(-2.1, e), (-1.9, e), (0.0, c), (2.0, a)];
        let p = project(
            scale,
            &anchors,
            &[-2.0, 0.1, 0.9, 3.0],
            &[0.2, 0.2, 0.2, 0.2],
        )
        .unwrap();
        let grades: Vec<&str> = p.iter().map(|x| x.grade).collect();
        assert_eq!(grades, ["E", "C", "C", "A"]);
        assert!(p[0].confidence > 0.99 && p[0].label == "HIGH");
        // Close to the C/A boundary (1.0): unsure.
        assert!(p[2].confidence < 0.7, "{:?}", p[2]);
        let total: f64 = p[2].probabilities.iter().map(|(_, q)| q).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(p[3].normalized > 0.95 && p[0].normalized < 0.2, "{p:?}");
        assert!(project(scale, &[], &[0.0], &[1.0]).is_none());
        assert!(Scale::named("nope")
            .unwrap_err()
            .contains("swedish_8_anchor"));
        assert!(scale.position("G").unwrap_err().contains("F, E, D"));
    }
}
