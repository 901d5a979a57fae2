//! The original's example messages (`shared/contracts/original/examples`), for tests that
//! drive them through this platform's consumers: found beside the repository or at
//! `ORIGINAL_CONTRACT_DIR`, re-addressed to fresh ids, decoded as they would arrive.

use std::path::PathBuf;

use crate::Envelope;

/// The original's contract folder.
pub fn contract_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ORIGINAL_CONTRACT_DIR") {
        return dir.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("shared/contracts/original"))
        .find(|d| d.join("index.json").is_file())
        .expect(
            "the original's contract is not beside the repository (../shared/contracts/original); \
             set ORIGINAL_CONTRACT_DIR to its folder",
        )
}

/// The original's example message on `topic`, every `(old, new)` id replaced and a fresh
/// event id given: `(topic, key, envelope JSON)`.
pub fn example(
    topic: &str,
    replace: &[(&str, &str)],
) -> (String, Option<String>, serde_json::Value) {
    let path = contract_dir().join(format!("examples/{topic}.json"));
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (old, new) in replace {
        text = text.replace(old, new);
    }
    let mut message: serde_json::Value = serde_json::from_str(&text).expect("example JSON");
    message["value"]["event_id"] = serde_json::json!(uuid::Uuid::new_v4());
    (
        message["topic"].as_str().expect("topic").to_owned(),
        message["key"].as_str().map(str::to_owned),
        message["value"].clone(),
    )
}

/// The same example as an envelope, routed by its topic as a consumer receives it.
pub fn envelope(topic: &str, replace: &[(&str, &str)]) -> Envelope {
    let (topic, key, value) = example(topic, replace);
    let message = outbox::IncomingMessage {
        topic,
        partition: 0,
        offset: 0,
        key,
        headers: Default::default(),
        payload: serde_json::to_vec(&value).expect("JSON").into(),
    };
    Envelope::parse(&message).expect("the original's example is an envelope")
}

/// Ids that appear in the original's examples.
pub mod ids {
    pub const BATCH: &str = "29877c84-f212-5213-ade3-9977be2d7e6d";
    pub const ESSAY_1: &str = "13d687a3-2fad-5906-bb5b-ee9a08782b1a";
    pub const ESSAY_2: &str = "f5611ded-1da1-5213-89de-e272947cbfed";
    pub const TEXT_1: &str = "22219c382f1e50bf9bc5f69a5c5677dc";
    pub const TEXT_2: &str = "126bbbe83a3d56c195de030511501c85";
    pub const CORRECTED_1: &str = "0824dcc41e5d5e1baca6bd1b8ade8215";
    pub const CORRECTED_2: &str = "62d042ac5e355f5786a3c6e938fd1c7d";
    pub const FILE_1: &str = "41126985-5087-5020-9336-c716504f62de";
    pub const FAILED_FILE: &str = "bfd98cc6-429c-511d-8f26-ad492c412b7b";
    pub const CLASS: &str = "4ab092a3-1996-5e14-af11-e789f8d41e68";
    pub const STUDENT_1: &str = "febcc661-c50a-5e9f-9fc0-16f8ae723f3c";
    pub const STUDENT_2: &str = "cc8f99d0-9f5b-53b5-abad-44508a9f4ac4";
}
