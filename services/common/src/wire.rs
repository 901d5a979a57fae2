//! Pieces of the original's models that many payloads share: its course codes (and the
//! language each implies), its `SystemProcessingMetadata`, its essay reference
//! (`EssayProcessingInputRefV1`). Payloads are built with these so that every topic speaks the
//! original's model, not a look-alike.

use std::fmt;

use serde_json::{json, Value};

use crate::util::utc_timestamp;

/// The original's `CourseCode`: the courses a batch or class can be for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CourseCode {
    Eng5,
    Eng6,
    Eng7,
    Sv1,
    Sv2,
    Sv3,
}

impl CourseCode {
    pub const ALL: [CourseCode; 6] = [
        Self::Eng5,
        Self::Eng6,
        Self::Eng7,
        Self::Sv1,
        Self::Sv2,
        Self::Sv3,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eng5 => "ENG5",
            Self::Eng6 => "ENG6",
            Self::Eng7 => "ENG7",
            Self::Sv1 => "SV1",
            Self::Sv2 => "SV2",
            Self::Sv3 => "SV3",
        }
    }

    /// A course code as the original spells it; otherwise an error listing them.
    pub fn parse(code: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == code)
            .ok_or_else(|| {
                format!(
                    "course_code {code:?} is not a course; one of: {}",
                    Self::ALL.map(|c| c.as_str()).join(", ")
                )
            })
    }

    /// The original's `Language` value of the course (`get_course_language`).
    pub fn language(self) -> &'static str {
        match self {
            Self::Eng5 | Self::Eng6 | Self::Eng7 => "en",
            Self::Sv1 | Self::Sv2 | Self::Sv3 => "sv",
        }
    }
}

impl fmt::Display for CourseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The language of a stored course code (`en` unless it is a Swedish course: codes stored
/// before they were checked read as English).
pub fn language_of(course_code: &str) -> &'static str {
    CourseCode::parse(course_code).map_or("en", CourseCode::language)
}

/// The original's `SystemProcessingMetadata` for `entity_id` of `entity_type`, stamped now.
pub fn system_metadata(
    entity_id: &str,
    entity_type: &str,
    parent_id: Option<&str>,
    event: &str,
    stage: Option<&str>,
) -> Value {
    json!({
        "entity_id": entity_id, "entity_type": entity_type, "parent_id": parent_id,
        "timestamp": utc_timestamp(), "processing_stage": stage, "started_at": null,
        "completed_at": null, "event": event, "error_info": {},
    })
}

/// The original's `EssayProcessingInputRefV1`.
pub fn essay_ref(essay_id: &str, text_storage_id: &str) -> Value {
    json!({"essay_id": essay_id, "text_storage_id": text_storage_id, "spellcheck_metrics": null})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn course_codes_are_the_originals() {
        assert_eq!(CourseCode::parse("SV2"), Ok(CourseCode::Sv2));
        assert_eq!(CourseCode::Sv2.language(), "sv");
        assert_eq!(CourseCode::Eng7.language(), "en");
        let e = CourseCode::parse("eng5").unwrap_err();
        assert!(e.contains("ENG5, ENG6, ENG7, SV1, SV2, SV3"), "{e}");
        assert_eq!(language_of("SV1"), "sv");
    }
}
