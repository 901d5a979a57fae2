//! Text out of uploaded files (.txt, .docx, .pdf) and the checks an essay must pass.
//! Formats are read by crates (`zip` + `quick-xml` for Word's XML, `pdf-extract` for PDF);
//! nothing here parses a file format by hand.

use std::io::Read;

/// Why a file cannot become an essay; `error_code` goes on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    WrongType(String),
    Unreadable(String),
    Empty,
    TooShort { words: usize },
    TooLong { chars: usize },
}

impl std::error::Error for Invalid {}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WrongType(ext) => write!(
                f,
                "file type {ext:?} is not accepted; upload .txt, .docx or .pdf"
            ),
            Self::Unreadable(why) => write!(f, "the file could not be read: {why}"),
            Self::Empty => write!(f, "the file contains no text"),
            Self::TooShort { words } => write!(
                f,
                "the essay has {words} words; at least {MIN_WORDS} are needed"
            ),
            Self::TooLong { chars } => write!(
                f,
                "the essay has {chars} characters; at most {MAX_CHARS} are accepted"
            ),
        }
    }
}

impl Invalid {
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::WrongType(_) => "UNSUPPORTED_FILE_TYPE",
            Self::Unreadable(_) => "TEXT_EXTRACTION_FAILED",
            Self::Empty => "EMPTY_CONTENT",
            Self::TooShort { .. } => "CONTENT_TOO_SHORT",
            Self::TooLong { .. } => "CONTENT_TOO_LONG",
        }
    }

    /// The original's `FileValidationErrorCode` on the wire: a file of a type that cannot be
    /// read is a failed extraction there.
    pub fn wire_code(&self) -> &'static str {
        match self {
            Self::WrongType(_) => "TEXT_EXTRACTION_FAILED",
            other => other.error_code(),
        }
    }

    /// The step that failed, as the original's `ErrorDetail.operation` names it.
    pub fn operation(&self) -> &'static str {
        match self {
            Self::WrongType(_) | Self::Unreadable(_) => "extract_text",
            _ => "validate_content",
        }
    }
}

pub const MIN_WORDS: usize = 25;
pub const MAX_CHARS: usize = 50_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Txt,
    Docx,
    Pdf,
}

impl FileKind {
    pub fn of(filename: &str) -> Result<Self, Invalid> {
        let ext = filename
            .rsplit_once('.')
            .map(|(_, e)| e.to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "txt" => Ok(Self::Txt),
            "docx" => Ok(Self::Docx),
            "pdf" => Ok(Self::Pdf),
            _ => Err(Invalid::WrongType(ext)),
        }
    }
}

/// Extracts and validates; returns the essay text (whitespace tidied).
pub fn essay_text(filename: &str, bytes: &[u8]) -> Result<String, Invalid> {
    let raw = match FileKind::of(filename)? {
        FileKind::Txt => std::str::from_utf8(bytes)
            .map(|s| s.trim_start_matches('\u{feff}').to_owned())
            .map_err(|e| Invalid::Unreadable(format!("not UTF-8 text ({e})")))?,
        FileKind::Docx => docx_text(bytes)?,
        FileKind::Pdf => pdf_text(bytes)?,
    };
    validate(&raw)
}

/// The length checks, on text from any format.
pub fn validate(raw: &str) -> Result<String, Invalid> {
    let text: String = raw
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned();
    if text.is_empty() {
        return Err(Invalid::Empty);
    }
    let chars = text.chars().count();
    if chars > MAX_CHARS {
        return Err(Invalid::TooLong { chars });
    }
    let words = text.split_whitespace().count();
    if words < MIN_WORDS {
        return Err(Invalid::TooShort { words });
    }
    Ok(text)
}

/// A .docx is a zip; the body is `word/document.xml`, text in `<w:t>`, paragraphs `<w:p>`.
fn docx_text(bytes: &[u8]) -> Result<String, Invalid> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| Invalid::Unreadable(format!("not a .docx (zip) file: {e}")))?;
    let mut xml = String::new();
    archive
        .by_name("word/document.xml")
        .map_err(|e| Invalid::Unreadable(format!("no word/document.xml: {e}")))?
        .take(20 * 1024 * 1024)
        .read_to_string(&mut xml)
        .map_err(|e| Invalid::Unreadable(format!("word/document.xml: {e}")))?;
    let mut reader = quick_xml::Reader::from_str(&xml);
    let mut out = String::new();
    let mut in_text = false;
    loop {
        use quick_xml::events::Event;
        match reader.read_event() {
            Ok(Event::Start(e)) if e.name().as_ref() == "w:t" => in_text = true,
            Ok(Event::End(e)) => match e.name().as_ref() {
                "w:t" => in_text = false,
                "w:p" => out.push('\n'),
                _ => {}
            },
            Ok(Event::Empty(e)) => match e.name().as_ref() {
                "w:tab" => out.push(' '),
                "w:br" => out.push('\n'),
                _ => {}
            },
            Ok(Event::Text(t)) if in_text => {
                out.push_str(&t.into_inner());
            }
            Ok(Event::GeneralRef(r)) if in_text => {
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    out.push(c);
                    continue;
                }
                let resolved = match r.as_ref() {
                    "amp" => "&",
                    "lt" => "<",
                    "gt" => ">",
                    "quot" => "\"",
                    "apos" => "'",
                    _ => "",
                };
                out.push_str(resolved);
            }
            Ok(Event::Eof) => break,
            Err(e) => return Err(Invalid::Unreadable(format!("document XML: {e}"))),
            _ => {}
        }
    }
    Ok(out)
}

/// PDF text via `pdf-extract`. It may panic on hostile files; a panic is an unreadable file,
/// not a crashed service.
fn pdf_text(bytes: &[u8]) -> Result<String, Invalid> {
    let bytes = bytes.to_vec();
    std::panic::catch_unwind(move || pdf_extract::extract_text_from_mem(&bytes))
        .map_err(|_| Invalid::Unreadable("the PDF could not be parsed".into()))?
        .map_err(|e| Invalid::Unreadable(format!("PDF: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_lengths_are_checked() {
        assert_eq!(FileKind::of("a.TXT"), Ok(FileKind::Txt));
        assert!(matches!(FileKind::of("a.exe"), Err(Invalid::WrongType(_))));
        assert!(matches!(FileKind::of("noext"), Err(Invalid::WrongType(_))));
        assert_eq!(validate("  \n "), Err(Invalid::Empty));
        assert_eq!(validate("too short"), Err(Invalid::TooShort { words: 2 }));
        let long = "word ".repeat(MAX_CHARS / 4);
        assert!(matches!(validate(&long), Err(Invalid::TooLong { .. })));
        let ok = "word ".repeat(MIN_WORDS);
        assert_eq!(validate(&ok).unwrap().split(' ').count(), MIN_WORDS);
        assert!(matches!(
            essay_text("a.txt", &[0xff, 0xfe, 0x00]),
            Err(Invalid::Unreadable(_))
        ));
        assert!(matches!(
            essay_text("a.docx", b"not a zip"),
            Err(Invalid::Unreadable(_))
        ));
        assert!(matches!(
            essay_text("a.pdf", b"%PDF-1.4 garbage"),
            Err(Invalid::Unreadable(_))
        ));
    }
}
