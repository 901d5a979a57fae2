//! The class roster, asked of Class Management as the original's NLP service asks it:
//! `GET /v1/classes/{class_id}/roster` answers `{"students": [{student_id, first_name,
//! last_name, full_legal_name, email}]}`.

use essay_common::http::{self, Failure, Policy};
use outbox::HandlerError;

use crate::matcher::Student;

/// Where services find Class Management unless told (`CLASS_MANAGEMENT_URL`).
pub const DEFAULT_URL: &str = "http://127.0.0.1:4104";

#[derive(Clone, Debug)]
pub struct RosterClient {
    base: String,
    http: reqwest::Client,
    policy: Policy,
}

impl RosterClient {
    pub fn new(base_url: &str, policy: Policy) -> Result<Self, String> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(format!(
                "CLASS_MANAGEMENT_URL must be an http:// URL (Class Management's address), got {base_url:?}"
            ));
        }
        Ok(Self {
            http: policy.client()?,
            base,
            policy,
        })
    }

    /// `CLASS_MANAGEMENT_URL`, default [`DEFAULT_URL`].
    pub fn from_env() -> Result<Self, String> {
        let url = std::env::var("CLASS_MANAGEMENT_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        Self::new(&url, Policy::default())
    }

    /// The students of `class_id`. Class Management not answering is an outage; a class it
    /// does not know is the request's problem (poison).
    pub async fn roster(&self, class_id: &str) -> Result<Vec<Student>, HandlerError> {
        #[derive(serde::Deserialize)]
        struct Roster {
            students: Vec<Student>,
        }
        let url = format!("{}/v1/classes/{class_id}/roster", self.base);
        let body = http::send(&self.policy, || self.http.get(&url))
            .await
            .map_err(|e| match e {
                Failure::Unavailable(cause) => HandlerError::unavailable(format!(
                    "Class Management at {} did not answer ({cause}); retried until it does",
                    self.base
                )),
                Failure::Refused { status, body } => HandlerError::poison(format!(
                    "Class Management refused the roster of class {class_id}: HTTP {status} {body}"
                )),
            })?;
        let roster: Roster = serde_json::from_slice(&body).map_err(|e| {
            HandlerError::retry(format!("Class Management's roster is not as expected: {e}"))
        })?;
        Ok(roster.students)
    }
}
