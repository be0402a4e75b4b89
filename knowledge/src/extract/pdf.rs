//! The text layer of PDF files, through `pdf-extract` (on `lopdf`). PDF parsers meet hostile
//! input; a panic inside the crate is caught and reported as a corrupt file.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pdf_extract::encryption::DecryptionError;
use pdf_extract::{Document, Error as PdfError, PlainTextOutput};

use super::ExtractError;

/// Extracts the text of every page, pages separated by blank lines.
pub(crate) fn extract_text(bytes: &[u8]) -> Result<String, ExtractError> {
    if !bytes.starts_with(b"%PDF-")
        && !bytes[..bytes.len().min(1024)]
            .windows(5)
            .any(|w| w == b"%PDF-")
    {
        return Err(ExtractError::PdfCorrupt(
            "the file does not start with a %PDF- header".into(),
        ));
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| extract_inner(bytes)));
    match outcome {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(ExtractError::PdfCorrupt(format!(
                "the PDF parser crashed ({message})"
            )))
        }
    }
}

fn extract_inner(bytes: &[u8]) -> Result<String, ExtractError> {
    let mut doc = Document::load_mem(bytes).map_err(|e| match e {
        PdfError::Decryption(_) | PdfError::AlreadyEncrypted => ExtractError::PdfEncrypted,
        other => ExtractError::PdfCorrupt(other.to_string()),
    })?;
    // lopdf already opens files protected by an empty user password (owner restrictions only);
    // a document that stays encrypted needs a password we do not have.
    if doc.is_encrypted() {
        match doc.decrypt("") {
            Ok(()) => {}
            Err(PdfError::Decryption(DecryptionError::IncorrectPassword)) => {
                return Err(ExtractError::PdfEncrypted);
            }
            Err(_) => return Err(ExtractError::PdfEncrypted),
        }
    }
    let mut text = String::new();
    {
        let mut output = PlainTextOutput::new(&mut text);
        pdf_extract::output_doc(&doc, &mut output)
            .map_err(|e| ExtractError::PdfCorrupt(e.to_string()))?;
    }
    Ok(normalise(&text))
}

/// Trims trailing spaces and collapses runs of blank lines that text extraction leaves behind.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0usize;
    for line in text.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank_run += 1;
            if blank_run == 1 && !out.is_empty() {
                out.push('\n');
            }
            continue;
        }
        blank_run = 0;
        out.push_str(line);
        out.push('\n');
    }
    out.trim_end().to_string()
}

#[cfg(all(test, feature = "test-utils"))]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn text_of_a_simple_pdf_is_extracted() {
        let pdf = testing::minimal_pdf(&["Volcanoes erupt molten rock", "Second page about tides"]);
        let text = extract_text(&pdf).unwrap();
        assert!(text.contains("Volcanoes erupt molten rock"), "{text:?}");
        assert!(text.contains("Second page about tides"), "{text:?}");
    }

    #[test]
    fn encrypted_pdf_is_refused() {
        let pdf = testing::encrypted_pdf("secret text", "hunter2");
        assert!(matches!(
            extract_text(&pdf),
            Err(ExtractError::PdfEncrypted)
        ));
    }

    #[test]
    fn corrupt_pdfs_give_errors_not_panics() {
        let pdf = testing::minimal_pdf(&["hello"]);
        let cases: Vec<Vec<u8>> = vec![
            b"not a pdf at all".to_vec(),
            b"%PDF-1.4\n".to_vec(),
            pdf[..pdf.len() / 2].to_vec(),
            pdf.iter()
                .map(|b| if b.is_ascii_digit() { b'9' } else { *b })
                .collect(),
        ];
        for case in cases {
            match extract_text(&case) {
                Err(ExtractError::PdfCorrupt(_)) | Err(ExtractError::PdfEncrypted) => {}
                Ok(text) => assert!(!text.contains("hello") || case.len() == pdf.len()),
                Err(other) => panic!("unexpected error {other}"),
            }
        }
    }
}
