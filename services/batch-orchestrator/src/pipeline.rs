//! Which phases a requested pipeline runs, resolved as the original's Batch Conductor does.
//!
//! A client names one pipeline (`requested_pipeline`, a phase name such as `cj_assessment`).
//! The definitions below are the original's (`services/batch_conductor_service/pipelines.yaml`):
//! the first definition containing that step gives its dependencies, ordered so that each phase
//! comes after those it depends on, and phases the batch has already completed are left out
//! (a second request, or a retry, runs only what is missing). This platform runs `spellcheck`
//! and `cj_assessment`; a pipeline that needs another phase is refused with a reason.

use crate::Phase;

/// A step of a pipeline definition and the steps it needs first.
struct Step {
    name: &'static str,
    depends_on: &'static [&'static str],
}

/// The original's pipeline definitions, in its order.
const DEFINITIONS: &[(&str, &[Step])] = &[
    (
        "ai_feedback",
        &[
            Step {
                name: "spellcheck",
                depends_on: &[],
            },
            Step {
                name: "nlp",
                depends_on: &["spellcheck"],
            },
            Step {
                name: "ai_feedback",
                depends_on: &["spellcheck", "nlp"],
            },
        ],
    ),
    (
        "cj_assessment",
        &[
            Step {
                name: "spellcheck",
                depends_on: &[],
            },
            Step {
                name: "cj_assessment",
                depends_on: &["spellcheck"],
            },
        ],
    ),
    (
        "nlp",
        &[
            Step {
                name: "spellcheck",
                depends_on: &[],
            },
            Step {
                name: "nlp",
                depends_on: &["spellcheck"],
            },
        ],
    ),
    (
        "comprehensive",
        &[
            Step {
                name: "spellcheck",
                depends_on: &[],
            },
            Step {
                name: "cj_assessment",
                depends_on: &["spellcheck"],
            },
            Step {
                name: "nlp",
                depends_on: &["spellcheck"],
            },
            Step {
                name: "ai_feedback",
                depends_on: &["spellcheck", "nlp"],
            },
        ],
    ),
];

/// The original's phase names (`PhaseName`): what `requested_pipeline` may say.
pub const PHASE_NAMES: &[&str] = &[
    "spellcheck",
    "ai_feedback",
    "cj_assessment",
    "nlp",
    "student_matching",
];

/// Why a request cannot run; `reason` is the `denial_reason` of `pipeline.denied`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: String) -> Self {
        Self { reason, detail }
    }
}

/// The phases `requested` runs for a batch that has completed `completed`, in order.
pub fn resolve(requested: &str, completed: &[Phase]) -> Result<Vec<Phase>, Refusal> {
    if !PHASE_NAMES.contains(&requested) {
        return Err(Refusal::new(
            "unknown_pipeline",
            format!(
                "{requested:?} is not a pipeline; one of: {}",
                PHASE_NAMES.join(", ")
            ),
        ));
    }
    let Some((_, steps, step)) = DEFINITIONS.iter().find_map(|(name, steps)| {
        steps
            .iter()
            .find(|s| s.name == requested)
            .map(|s| (name, steps, s.name))
    }) else {
        return Err(Refusal::new(
            "unknown_pipeline",
            format!("no pipeline definition runs {requested:?}"),
        ));
    };
    let mut ordered = Vec::new();
    visit(step, steps, &mut ordered);
    let unsupported: Vec<&str> = ordered
        .iter()
        .copied()
        .filter(|n| Phase::parse(n).is_none())
        .collect();
    if !unsupported.is_empty() {
        return Err(Refusal::new(
            "unsupported_pipeline",
            format!(
                "{requested:?} needs {}, which this platform does not run (it runs spellcheck and cj_assessment)",
                unsupported.join(" and ")
            ),
        ));
    }
    let remaining: Vec<Phase> = ordered
        .iter()
        .filter_map(|n| Phase::parse(n))
        .filter(|p| !completed.contains(p))
        .collect();
    if remaining.is_empty() {
        return Err(Refusal::new(
            "already_completed",
            format!("every phase of {requested:?} has completed for this batch"),
        ));
    }
    Ok(remaining)
}

/// Depth-first: a step after everything it depends on, each step once.
fn visit(name: &'static str, steps: &[Step], out: &mut Vec<&'static str>) {
    if out.contains(&name) {
        return;
    }
    if let Some(step) = steps.iter().find(|s| s.name == name) {
        for dep in step.depends_on {
            visit(dep, steps, out);
        }
    }
    out.push(name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::{CjAssessment, Spellcheck};

    #[test]
    fn pipelines_resolve_as_the_originals_conductor_resolves_them() {
        assert_eq!(
            resolve("cj_assessment", &[]),
            Ok(vec![Spellcheck, CjAssessment])
        );
        assert_eq!(resolve("spellcheck", &[]), Ok(vec![Spellcheck]));
        // Completed phases are pruned: a second request or a retry runs what is missing.
        assert_eq!(
            resolve("cj_assessment", &[Spellcheck]),
            Ok(vec![CjAssessment])
        );
        let done = resolve("cj_assessment", &[Spellcheck, CjAssessment]).unwrap_err();
        assert_eq!(done.reason, "already_completed");
    }

    #[test]
    fn unknown_and_unsupported_pipelines_are_refused_with_a_reason() {
        for name in ["astrology", "comprehensive", "", "CJ_ASSESSMENT"] {
            assert_eq!(
                resolve(name, &[]).unwrap_err().reason,
                "unknown_pipeline",
                "{name}"
            );
        }
        // A phase name no definition runs (the original's conductor refuses it too).
        assert_eq!(
            resolve("student_matching", &[]).unwrap_err().reason,
            "unknown_pipeline"
        );
        for name in ["nlp", "ai_feedback"] {
            let r = resolve(name, &[]).unwrap_err();
            assert_eq!(r.reason, "unsupported_pipeline");
            assert!(r.detail.contains("nlp"), "{}", r.detail);
        }
    }
}
