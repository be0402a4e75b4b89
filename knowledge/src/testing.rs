//! Test helpers (feature `test-utils`): a deterministic toy embedder, so tests here and in the
//! node run without a model, and generators of small PDF files.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::embedder::{EmbedError, Embedder};

/// Hashed bag of words: every lowercased word (with a crude plural stem) adds ±1 to one of
/// `dimensions` buckets; the vector is L2-normalised. Texts sharing words are similar, which is
/// enough to test retrieval plumbing; it knows nothing of meaning.
#[derive(Debug, Clone)]
pub struct ToyEmbedder {
    id: String,
    digest: String,
    dims: usize,
    max_tokens: Option<usize>,
}

impl Default for ToyEmbedder {
    fn default() -> Self {
        Self::new()
    }
}

impl ToyEmbedder {
    /// 384 dimensions (like all-MiniLM-L6-v2), at most 128 tokens per input.
    pub fn new() -> Self {
        Self::with_dimensions(384)
    }

    /// A toy embedder with `dims` dimensions.
    pub fn with_dimensions(dims: usize) -> Self {
        let id = "toy-hashed-bag-of-words".to_string();
        let digest = hex::encode(Sha256::digest(format!("{id}/v1/{dims}")));
        Self {
            id,
            digest,
            dims: dims.max(1),
            max_tokens: Some(128),
        }
    }

    /// The same embedder under another model id (and digest), to test model checks.
    pub fn with_model_id(mut self, id: &str) -> Self {
        self.digest = hex::encode(Sha256::digest(format!("{id}/v1/{}", self.dims)));
        self.id = id.to_string();
        self
    }

    /// Sets the token limit; `None` makes the knowledge base size chunks in characters.
    pub fn with_max_tokens(mut self, max_tokens: Option<usize>) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    fn words(text: &str) -> impl Iterator<Item = String> + '_ {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| {
                let w = w.to_lowercase();
                match w.strip_suffix('s') {
                    Some(stem) if stem.chars().count() > 3 && !stem.ends_with('s') => {
                        stem.to_string()
                    }
                    _ => w,
                }
            })
    }

    /// The vector of one text.
    pub fn vector(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dims];
        for word in Self::words(text) {
            let h = fnv1a(word.as_bytes());
            let idx = (h % self.dims as u64) as usize;
            v[idx] += if h >> 63 == 0 { 1.0 } else { -1.0 };
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm == 0.0 {
            v[0] = 1.0;
        } else {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Embedder for ToyEmbedder {
    fn model_id(&self) -> &str {
        &self.id
    }

    fn model_digest(&self) -> &str {
        &self.digest
    }

    fn dimensions(&self) -> usize {
        self.dims
    }

    fn max_input_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    fn count_tokens(&self, text: &str) -> usize {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .count()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.vector(t)).collect())
    }
}

fn pdf_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '(' | ')' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            _ => out.push('?'),
        }
    }
    out
}

/// A valid PDF with one page per entry of `pages`, each showing its text in Helvetica (ASCII).
pub fn minimal_pdf(pages: &[&str]) -> Vec<u8> {
    let n = pages.len().max(1);
    let mut objects: Vec<String> = Vec::new();
    objects.push("<< /Type /Catalog /Pages 2 0 R >>".to_string());
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    objects.push(format!(
        "<< /Type /Pages /Kids [{}] /Count {n} >>",
        kids.join(" ")
    ));
    objects.push(
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_string(),
    );
    for i in 0..n {
        let text = pages.get(i).copied().unwrap_or("");
        let mut content = String::from("BT /F1 12 Tf 72 720 Td 14 TL ");
        for line in text.lines() {
            let _ = write!(content, "({}) Tj T* ", pdf_escape(line));
        }
        content.push_str("ET");
        objects.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
            5 + 2 * i
        ));
        objects.push(format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ));
    }
    let mut out = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for off in offsets {
        let _ = writeln!(table, "{off:010} 00000 n ");
    }
    let _ = write!(
        table,
        "trailer\n<< /Size {} /Root 1 0 R /ID [<0123456789abcdef0123456789abcdef> <0123456789abcdef0123456789abcdef>] >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    );
    out.extend_from_slice(table.as_bytes());
    out
}

/// A PDF showing `text`, encrypted (RC4 128-bit) with `user_password`.
pub fn encrypted_pdf(text: &str, user_password: &str) -> Vec<u8> {
    use pdf_extract::{Document, EncryptionState, EncryptionVersion, Permissions};
    let plain = minimal_pdf(&[text]);
    let mut doc = Document::load_mem(&plain).expect("the generated PDF parses");
    let version = EncryptionVersion::V2 {
        document: &doc,
        owner_password: "owner-secret",
        user_password,
        key_length: 128,
        permissions: Permissions::default(),
    };
    let state = EncryptionState::try_from(version).expect("encryption parameters are valid");
    doc.encrypt(&state).expect("encryption succeeds");
    let mut out = Vec::new();
    doc.save_to(&mut out).expect("saving to memory succeeds");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toy_vectors_are_normalised_and_deterministic() {
        let e = ToyEmbedder::new();
        let a = e.vector("Bees make honey");
        assert_eq!(a, e.vector("bees make honey!"));
        assert!((a.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        let same_words = e.vector("honey bees");
        let other = e.vector("tides and the moon");
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
        assert!(dot(&a, &same_words) > dot(&a, &other));
        assert_eq!(e.vector("!!!")[0], 1.0);
        assert_ne!(
            e.model_digest(),
            e.clone().with_model_id("other").model_digest()
        );
    }

    #[test]
    fn generated_pdfs_have_the_pdf_structure() {
        let pdf = minimal_pdf(&["hello (world)"]);
        assert!(pdf.starts_with(b"%PDF-1.4"));
        assert!(pdf.ends_with(b"%%EOF\n"));
        let enc = encrypted_pdf("secret", "pw");
        assert!(String::from_utf8_lossy(&enc).contains("/Encrypt"));
    }
}

/// The deterministic workload of the crash test (`kb-crash-helper` and `tests/it/crash.rs`).
pub mod crash {
    use std::fmt::Write as _;

    /// Operation number `n` of the workload.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum CrashOp {
        /// Ingest document `id` at `version` (a new document or a replacement).
        Put {
            /// Document number.
            id: u64,
            /// Content version.
            version: u32,
        },
        /// Remove document `id`.
        Remove {
            /// Document number.
            id: u64,
        },
        /// Write an index checkpoint.
        Checkpoint,
        /// Compact the chunk log.
        Compact,
    }

    /// The `n`-th operation. Every operation is idempotent, so a run restarted at the first
    /// unacknowledged operation reaches the same state.
    pub fn op(n: u64) -> CrashOp {
        match n % 10 {
            0..=5 => CrashOp::Put { id: n, version: 1 },
            6 => CrashOp::Put {
                id: n - 5,
                version: 2,
            },
            7 => CrashOp::Remove { id: n - 5 },
            8 if (n / 10).is_multiple_of(2) => CrashOp::Checkpoint,
            8 => CrashOp::Compact,
            _ => CrashOp::Put {
                id: n - 6,
                version: 3,
            },
        }
    }

    /// The source name of document `id`.
    pub fn source(id: u64) -> String {
        format!("crash/doc-{id:06}.md")
    }

    /// The Markdown of document `id` at `version`: a few hundred words, several chunks.
    pub fn document(id: u64, version: u32) -> String {
        let mut s = format!("# Crash document {id} version {version}\n\n");
        for p in 0..5u64 {
            let _ = write!(s, "## Part {p}\n\n");
            for k in 0..45u64 {
                let _ = write!(s, "word{}x{} ", (id * 31 + p * 7 + k) % 97, version);
                if k % 9 == 8 {
                    let _ = write!(s, "marker{id}v{version}. ");
                }
            }
            s.push_str("\n\n");
        }
        s
    }
}
