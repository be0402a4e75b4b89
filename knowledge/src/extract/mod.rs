//! Turning the bytes of a document into text with its title and headings: plain text, Markdown,
//! HTML and the text layer of PDF files. Binary files and undecodable text are refused.

mod html;
mod pdf;

use std::path::Path;

use pulldown_cmark::{Event, Parser, Tag, TagEnd};
use serde::{Deserialize, Serialize};

/// The kinds of documents a knowledge base ingests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    /// Plain UTF-8 text.
    Text,
    /// CommonMark Markdown.
    Markdown,
    /// HTML; the readable text is extracted.
    Html,
    /// PDF; the text layer is extracted (scanned images without text are empty).
    Pdf,
}

impl ContentType {
    /// The type implied by a file extension (case-insensitive), if it is one this crate reads.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "md" | "markdown" | "mdown" | "mkd" => Some(Self::Markdown),
            "html" | "htm" | "xhtml" => Some(Self::Html),
            "pdf" => Some(Self::Pdf),
            "txt" | "text" | "rst" | "org" | "adoc" | "asciidoc" | "log" => Some(Self::Text),
            _ => None,
        }
    }

    /// The type for a path's extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(Self::from_extension)
    }

    /// The type and charset of a MIME content type such as `text/html; charset=utf-8`.
    pub fn from_mime(mime: &str) -> (Option<Self>, Option<String>) {
        let mut parts = mime.split(';');
        let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let charset = parts.find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("charset"))
                .then(|| v.trim().trim_matches('"').to_string())
        });
        let kind = match essence.as_str() {
            "text/markdown" | "text/x-markdown" => Some(Self::Markdown),
            "text/html" | "application/xhtml+xml" => Some(Self::Html),
            "application/pdf" | "application/x-pdf" => Some(Self::Pdf),
            "text/plain" => Some(Self::Text),
            _ => None,
        };
        (kind, charset)
    }

    /// The type recognised from the first bytes: PDF and HTML have telltale openings.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"%PDF-") {
            return Some(Self::Pdf);
        }
        let head = &bytes[..bytes.len().min(512)];
        let head = String::from_utf8_lossy(head)
            .trim_start()
            .to_ascii_lowercase();
        if head.starts_with("<!doctype html") || head.starts_with("<html") {
            return Some(Self::Html);
        }
        None
    }

    /// Lowercase name: `text`, `markdown`, `html`, `pdf`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Markdown => "markdown",
            Self::Html => "html",
            Self::Pdf => "pdf",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Text => 1,
            Self::Markdown => 2,
            Self::Html => 3,
            Self::Pdf => 4,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Text),
            2 => Some(Self::Markdown),
            3 => Some(Self::Html),
            4 => Some(Self::Pdf),
            _ => None,
        }
    }
}

impl std::fmt::Display for ContentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a document's text could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The bytes look like a binary file (NUL bytes or many control characters).
    #[error(
        "it is a binary file, not text; only text, markdown, html and pdf files can be ingested"
    )]
    Binary,
    /// The bytes are not valid UTF-8 and no usable charset was given.
    #[error("it is not valid UTF-8 text; convert it to UTF-8 first")]
    NotUtf8,
    /// The declared charset is unknown.
    #[error("its charset {0:?} is unknown; convert it to UTF-8 first")]
    UnknownCharset(String),
    /// The PDF needs a password.
    #[error("the PDF is encrypted with a password; remove the password and ingest it again")]
    PdfEncrypted,
    /// The PDF could not be parsed.
    #[error("the PDF is damaged or unsupported: {0}")]
    PdfCorrupt(String),
    /// No text was found.
    #[error("it contains no text (a PDF of scanned images has no text layer)")]
    Empty,
}

/// A heading found in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Heading {
    /// Byte offset of the heading's line in the extracted text.
    pub(crate) offset: usize,
    /// 1 for a top-level heading.
    pub(crate) level: usize,
    pub(crate) text: String,
}

/// The text of a document, ready for chunking.
#[derive(Debug, Clone)]
pub(crate) struct Extracted {
    pub(crate) text: String,
    pub(crate) title: Option<String>,
    pub(crate) headings: Vec<Heading>,
    /// Whether the text is Markdown (use the Markdown splitter).
    pub(crate) markdown: bool,
}

impl Extracted {
    /// The heading in force at byte `offset`: the last one that starts at or before it.
    pub(crate) fn heading_at(&self, offset: usize) -> Option<&str> {
        let idx = self.headings.partition_point(|h| h.offset <= offset);
        idx.checked_sub(1).map(|i| self.headings[i].text.as_str())
    }
}

/// Extracts the text of `bytes` read as `kind`. `charset` comes from a MIME type, if any.
pub(crate) fn extract(
    bytes: &[u8],
    kind: ContentType,
    charset: Option<&str>,
) -> Result<Extracted, ExtractError> {
    let extracted = match kind {
        ContentType::Text => {
            let text = decode_text(bytes, charset)?;
            Extracted {
                text,
                title: None,
                headings: Vec::new(),
                markdown: false,
            }
        }
        ContentType::Markdown => {
            let text = decode_text(bytes, charset)?;
            let headings = markdown_headings(&text);
            let title = headings.first().map(|h| h.text.clone());
            Extracted {
                text,
                title,
                headings,
                markdown: true,
            }
        }
        ContentType::Html => html::extract(&decode_text(bytes, charset)?),
        ContentType::Pdf => {
            let text = pdf::extract_text(bytes)?;
            Extracted {
                text,
                title: None,
                headings: Vec::new(),
                markdown: false,
            }
        }
    };
    if extracted.text.trim().is_empty() {
        return Err(ExtractError::Empty);
    }
    Ok(extracted)
}

/// Decodes text: a UTF-8 or UTF-16 byte-order mark wins, then a declared charset, then UTF-8.
/// NUL bytes or a high share of control characters mark a binary file.
pub(crate) fn decode_text(bytes: &[u8], charset: Option<&str>) -> Result<String, ExtractError> {
    if let Some((encoding, bom_len)) = encoding_rs::Encoding::for_bom(bytes) {
        let (text, had_errors) = encoding.decode_without_bom_handling(&bytes[bom_len..]);
        if had_errors && encoding == encoding_rs::UTF_8 {
            return Err(ExtractError::NotUtf8);
        }
        return check_not_binary(text.into_owned());
    }
    if bytes.contains(&0) {
        return Err(ExtractError::Binary);
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => match charset {
            Some(label) => {
                let encoding = encoding_rs::Encoding::for_label(label.trim().as_bytes())
                    .ok_or_else(|| ExtractError::UnknownCharset(label.to_string()))?;
                let (text, _, had_errors) = encoding.decode(bytes);
                if had_errors {
                    return Err(ExtractError::NotUtf8);
                }
                text.into_owned()
            }
            None => {
                // A few stray bytes in otherwise UTF-8 text are replaced; more means the file is
                // in another encoding or not text at all.
                let text = String::from_utf8_lossy(bytes);
                let bad = text
                    .chars()
                    .filter(|&c| c == char::REPLACEMENT_CHARACTER)
                    .count();
                if bad * 100 > text.chars().count().max(1) {
                    return Err(if looks_binary(bytes) {
                        ExtractError::Binary
                    } else {
                        ExtractError::NotUtf8
                    });
                }
                text.into_owned()
            }
        },
    };
    check_not_binary(text)
}

fn check_not_binary(text: String) -> Result<String, ExtractError> {
    let mut total = 0usize;
    let mut control = 0usize;
    for c in text.chars().take(1 << 16) {
        total += 1;
        if c == '\0' || (c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\x0c')) {
            control += 1;
        }
    }
    if control * 20 > total {
        return Err(ExtractError::Binary);
    }
    Ok(text)
}

/// Whether raw bytes have many bytes outside printable ASCII and common UTF-8 lead bytes.
fn looks_binary(bytes: &[u8]) -> bool {
    let sample = &bytes[..bytes.len().min(8192)];
    let odd = sample
        .iter()
        .filter(|&&b| b < 0x09 || (0x0e..0x20).contains(&b))
        .count();
    odd * 20 > sample.len()
}

/// ATX and setext headings of a Markdown document with their byte offsets.
fn markdown_headings(text: &str) -> Vec<Heading> {
    let mut headings = Vec::new();
    let mut current: Option<(usize, usize, String)> = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                current = Some((range.start, level as usize, String::new()));
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some((_, _, s)) = current.as_mut() {
                    s.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some((offset, level, s)) = current.take() {
                    let text = s.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !text.is_empty() {
                        headings.push(Heading {
                            offset,
                            level,
                            text,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    headings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_come_from_extensions_mime_types_and_sniffing() {
        assert_eq!(
            ContentType::from_extension("MD"),
            Some(ContentType::Markdown)
        );
        assert_eq!(ContentType::from_extension("exe"), None);
        assert_eq!(
            ContentType::from_mime("text/html; charset=\"ISO-8859-1\""),
            (Some(ContentType::Html), Some("ISO-8859-1".to_string()))
        );
        assert_eq!(ContentType::from_mime("application/octet-stream").0, None);
        assert_eq!(ContentType::sniff(b"%PDF-1.7 ..."), Some(ContentType::Pdf));
        assert_eq!(
            ContentType::sniff(b"  <!DOCTYPE html><p>x"),
            Some(ContentType::Html)
        );
        assert_eq!(ContentType::sniff(b"hello"), None);
        for t in [
            ContentType::Text,
            ContentType::Markdown,
            ContentType::Html,
            ContentType::Pdf,
        ] {
            assert_eq!(ContentType::from_code(t.code()), Some(t));
        }
    }

    #[test]
    fn binary_and_undecodable_input_is_refused() {
        assert!(matches!(
            decode_text(b"ELF\0\x01\x02", None),
            Err(ExtractError::Binary)
        ));
        let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        assert!(decode_text(&noise, None).is_err());
        assert!(matches!(
            decode_text(b"caf\xe9 cr\xe8me br\xfbl\xe9e", None),
            Err(ExtractError::NotUtf8)
        ));
        assert_eq!(decode_text(b"caf\xe9", Some("latin1")).unwrap(), "café");
        assert!(matches!(
            decode_text(b"caf\xe9", Some("klingon")),
            Err(ExtractError::UnknownCharset(_))
        ));
        assert!(matches!(
            decode_text(b"\x01\x02\x03\x04\x05 text", None),
            Err(ExtractError::Binary)
        ));
    }

    #[test]
    fn byte_order_marks_are_honoured() {
        assert_eq!(decode_text(b"\xef\xbb\xbfhello", None).unwrap(), "hello");
        assert_eq!(decode_text(b"\xff\xfeh\0i\0", None).unwrap(), "hi");
    }

    #[test]
    fn markdown_headings_have_offsets_and_the_first_is_the_title() {
        let text = "intro\n\n# First `code`\n\ntext\n\nSecond\n------\n\nmore";
        let e = extract(text.as_bytes(), ContentType::Markdown, None).unwrap();
        assert_eq!(e.title.as_deref(), Some("First code"));
        assert_eq!(e.headings.len(), 2);
        assert_eq!(e.headings[1].level, 2);
        assert!(text[e.headings[1].offset..].starts_with("Second"));
        assert_eq!(e.heading_at(0), None);
        assert_eq!(e.heading_at(text.len() - 1), Some("Second"));
        assert_eq!(e.heading_at(e.headings[0].offset), Some("First code"));
    }

    #[test]
    fn empty_documents_are_refused() {
        assert!(matches!(
            extract(b"  \n\t", ContentType::Text, None),
            Err(ExtractError::Empty)
        ));
        assert!(matches!(
            extract(b"<script>x()</script>", ContentType::Html, None),
            Err(ExtractError::Empty)
        ));
    }
}
