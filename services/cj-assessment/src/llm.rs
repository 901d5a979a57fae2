//! An LLM judge over the OpenAI-compatible chat-completions API (served by vLLM, llama.cpp's
//! server, Ollama and hosted providers): the assessment's instructions, rubric and student
//! prompt, then the two essays, and an answer asked for as JSON, as the original's prompt asks
//! it: `{"winner": "Essay A" | "Essay B", "justification": "...", "confidence": 1-5}`.
//!
//! Configured from the environment (`CJ_LLM_URL` turns it on; see [`LlmConfig::from_env`]).
//! A 429 or 5xx answer, a timeout or a refused connection is retried with doubling backoff
//! (a `Retry-After` is honoured up to the cap); after the last try the judge is
//! [`JudgeError::Unavailable`], which makes the batch wait rather than fail. An answer that is
//! not a verdict is [`JudgeError::Unparseable`], naming what came back.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

pub use crate::judge::Assessment;
use crate::judge::{Candidate, Judge, JudgeError, Judgement};

#[derive(Clone, Debug)]
pub struct LlmConfig {
    /// The API's base, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended).
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
    pub attempts: u32,
    pub first_backoff: Duration,
    pub assessment: Assessment,
}

/// The original's response instructions.
const RESPONSE_INSTRUCTIONS: &str = "Using the Student Assignment, Assessment Criteria, and \
Judge Instructions above, determine which essay better fulfills the requirements. Respond with \
JSON only: {\"winner\": \"Essay A\" or \"Essay B\", \"justification\": a brief reason, \
\"confidence\": 1-5 (5 = very confident)}. Provide a decisive judgment.";

impl LlmConfig {
    /// `CJ_LLM_URL` (unset: no LLM judge), `CJ_LLM_MODEL` (required with it), `CJ_LLM_API_KEY`,
    /// `CJ_LLM_TIMEOUT_MS` (default 60000), `CJ_LLM_ATTEMPTS` (default 4), and the assessment:
    /// `CJ_STUDENT_PROMPT`, `CJ_INSTRUCTIONS`, `CJ_RUBRIC` (the defaults for assignments that set
    /// none of their own).
    pub fn from_env() -> Result<Option<Self>, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let Some(base_url) = var("CJ_LLM_URL") else {
            return Ok(None);
        };
        let model = var("CJ_LLM_MODEL")
            .ok_or("CJ_LLM_URL is set but CJ_LLM_MODEL is not: name the model to ask")?;
        let number = |k: &str, default: u64| -> Result<u64, String> {
            var(k).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| format!("{k} must be a whole number, got {v:?}"))
            })
        };
        let config = Self {
            base_url,
            model,
            api_key: var("CJ_LLM_API_KEY"),
            timeout: Duration::from_millis(number("CJ_LLM_TIMEOUT_MS", 60_000)?),
            attempts: number("CJ_LLM_ATTEMPTS", 4)?.max(1) as u32,
            first_backoff: Duration::from_millis(500),
            assessment: Assessment {
                student_prompt: var("CJ_STUDENT_PROMPT"),
                instructions: var("CJ_INSTRUCTIONS"),
                rubric: var("CJ_RUBRIC"),
            },
        };
        config.check()?;
        Ok(Some(config))
    }

    fn check(&self) -> Result<(), String> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(format!(
                "CJ_LLM_URL must be an http(s) URL of an OpenAI-compatible API, got {:?}",
                self.base_url
            ));
        }
        Ok(())
    }
}

pub struct LlmJudge {
    config: LlmConfig,
    name: &'static str,
    http: reqwest::Client,
}

impl LlmJudge {
    pub fn new(config: LlmConfig) -> Result<Self, String> {
        config.check()?;
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        // Named once per judge; recorded with each comparison and cached under it.
        let name: &'static str = Box::leak(format!("llm:{}", config.model).into_boxed_str());
        Ok(Self { config, name, http })
    }

    fn messages(&self, assessment: &Assessment, a: &Candidate, b: &Candidate) -> serde_json::Value {
        // The assignment's own, else the configured default.
        let ctx = if assessment.is_empty() {
            &self.config.assessment
        } else {
            assessment
        };
        let mut context = Vec::new();
        if let Some(p) = &ctx.student_prompt {
            context.push(format!("**Student Assignment:**\n{p}"));
        }
        if let Some(i) = &ctx.instructions {
            context.push(format!("**Assessment Criteria:**\n{i}"));
        }
        if let Some(r) = &ctx.rubric {
            context.push(format!("**Judge Instructions:**\n{r}"));
        }
        let user = format!(
            "{}**Essay A:**\n{}\n\n**Essay B:**\n{}\n\n{RESPONSE_INSTRUCTIONS}",
            context
                .iter()
                .map(|c| format!("{c}\n\n"))
                .collect::<String>(),
            a.text,
            b.text
        );
        json!([
            {"role": "system", "content": "You are an experienced teacher comparing two student essays."},
            {"role": "user", "content": user},
        ])
    }

    /// One request, retried on 429, 5xx, timeouts and refused connections.
    async fn ask(&self, body: &serde_json::Value) -> Result<ChatResponse, JudgeError> {
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let mut backoff = self.config.first_backoff;
        let mut last = String::new();
        for attempt in 1..=self.config.attempts {
            let mut request = self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(key) = &self.config.api_key {
                request = request.bearer_auth(key);
            }
            let wait = match request.send().await {
                Err(e) => {
                    last = if e.is_timeout() {
                        format!("no answer within {:?}", self.config.timeout)
                    } else {
                        format!("cannot reach {url}: {e}")
                    };
                    backoff
                }
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() {
                        let bytes = response.bytes().await.map_err(|e| {
                            JudgeError::Unavailable(format!("the answer broke off: {e}"))
                        })?;
                        return serde_json::from_slice::<ChatResponse>(&bytes).map_err(|e| {
                            JudgeError::Unparseable(format!("not a chat completion: {e}"))
                        });
                    }
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text: String = response
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    if status.as_u16() != 429 && !status.is_server_error() {
                        return Err(JudgeError::Refused(format!("HTTP {status}: {text}")));
                    }
                    last = format!("HTTP {status}: {text}");
                    retry_after.unwrap_or(backoff).min(Duration::from_secs(30))
                }
            };
            if attempt < self.config.attempts {
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        Err(JudgeError::Unavailable(format!(
            "{} tries: {last}",
            self.config.attempts
        )))
    }
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// A verdict from the model's text: the first JSON object in it, with a winner of "Essay A"
/// or "Essay B" (or "A"/"B"), a justification, and a 1-5 confidence scaled to 0-1.
pub fn parse_verdict(text: &str) -> Result<(bool, String, Option<f64>), JudgeError> {
    let snippet = || text.chars().take(200).collect::<String>();
    let start = text.find('{');
    let end = text.rfind('}');
    let (Some(start), Some(end)) = (start, end) else {
        return Err(JudgeError::Unparseable(format!(
            "no JSON object in {:?}",
            snippet()
        )));
    };
    let value: serde_json::Value = serde_json::from_str(&text[start..=end])
        .map_err(|e| JudgeError::Unparseable(format!("{e} in {:?}", snippet())))?;
    let winner = value["winner"]
        .as_str()
        .map(|w| w.trim().to_ascii_uppercase());
    let a_wins = match winner.as_deref() {
        Some("ESSAY A" | "A") => true,
        Some("ESSAY B" | "B") => false,
        _ => {
            return Err(JudgeError::Unparseable(format!(
                "winner must be \"Essay A\" or \"Essay B\" in {:?}",
                snippet()
            )))
        }
    };
    let justification = value["justification"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let confidence = value["confidence"]
        .as_f64()
        .filter(|c| (1.0..=5.0).contains(c))
        .map(|c| (c - 1.0) / 4.0);
    Ok((a_wins, justification, confidence))
}

#[async_trait]
impl Judge for LlmJudge {
    fn name(&self) -> &'static str {
        self.name
    }

    fn costly(&self) -> bool {
        true
    }

    async fn compare(&self, a: &Candidate, b: &Candidate) -> Result<Judgement, JudgeError> {
        self.compare_in(&Assessment::default(), a, b).await
    }

    async fn compare_in(
        &self,
        assessment: &Assessment,
        a: &Candidate,
        b: &Candidate,
    ) -> Result<Judgement, JudgeError> {
        let body = json!({
            "model": self.config.model, "messages": self.messages(assessment, a, b),
            "temperature": 0.1,
        });
        let response = self.ask(&body).await?;
        let tokens = response.usage.as_ref().map_or(0, |u| {
            u.total_tokens
                .unwrap_or(u.prompt_tokens.unwrap_or(0) + u.completion_tokens.unwrap_or(0))
        });
        let text = response
            .choices
            .first()
            .and_then(|c| c.message.content.clone())
            .ok_or_else(|| JudgeError::Unparseable("a completion without a message".into()))?;
        let (a_wins, justification, confidence) = parse_verdict(&text)?;
        Ok(Judgement {
            a_wins,
            reason: if justification.is_empty() {
                format!(
                    "{} (no justification given)",
                    if a_wins { "A" } else { "B" }
                )
            } else {
                justification
            },
            confidence,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_from_what_models_write() {
        let (a, why, c) = parse_verdict(
            "Sure! ```json\n{\"winner\": \"Essay B\", \"justification\": \"clearer thesis\", \"confidence\": 4}\n```",
        )
        .unwrap();
        assert!(!a);
        assert_eq!(why, "clearer thesis");
        assert_eq!(c, Some(0.75));
        assert!(parse_verdict("{\"winner\": \"a\"}").unwrap().0);
        for bad in ["Essay A is better", "{\"winner\": \"both\"}", "{not json}"] {
            assert!(
                matches!(parse_verdict(bad), Err(JudgeError::Unparseable(_))),
                "{bad}"
            );
        }
    }
}
