//! Hostile files: random bytes and corrupted real documents under every accepted extension
//! end as text or as a validation failure with a reason, never a panic or a hang.

use file_service::extract::essay_text;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_under_any_name(ext in prop::sample::select(vec!["txt", "docx", "pdf", "exe", ""]),
                                   bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        let name = format!("essay.{ext}");
        match essay_text(&name, &bytes) {
            Ok(text) => prop_assert!(text.split_whitespace().count() >= file_service::extract::MIN_WORDS),
            Err(e) => prop_assert!(!e.to_string().is_empty() && !e.error_code().is_empty()),
        }
    }

    #[test]
    fn corrupted_pdf_and_docx_headers(prefix in prop::sample::select(vec![&b"%PDF-1.4\n"[..], &b"PK\x03\x04"[..]]),
                                      tail in prop::collection::vec(any::<u8>(), 0..4000)) {
        let mut bytes = prefix.to_vec();
        bytes.extend(tail);
        let name = if bytes.starts_with(b"%PDF") { "a.pdf" } else { "a.docx" };
        let _ = essay_text(name, &bytes);
    }
}
