//! Manifests and the knowledge-base hash.
//!
//! The KB hash is the sha256 of the canonical JSON of [`ManifestCore`]: format, embedding model,
//! chunking parameters, counts and a content digest over all documents sorted by source, each
//! document digest covering its title, type, offsets, texts and vectors (never chunk ids, file
//! names, mtimes or the HNSW graph, which differ between copies of the same content). The same
//! content therefore gives the same hash on every node, whatever the order of ingestion.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use gaia_protocol::hash::ContentHash;

use crate::chunk::ChunkingParams;
use crate::codec::Encoder;
use crate::embedder::ModelInfo;
use crate::log::StoredDocument;

/// Format name in manifests.
pub const KB_FORMAT: &str = "gaia-kb/1";

/// The digest of one document's content (chunk ids excluded).
pub(crate) fn document_digest(doc: &StoredDocument) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"gaia-kb-document/1\0");
    let mut e = Encoder::default();
    e.str(&doc.source);
    e.str(&doc.title);
    e.u8(doc.content_type.code());
    e.bytes(&doc.input_sha256);
    e.u64(doc.text_bytes);
    e.u32(u32::try_from(doc.chunks.len()).unwrap_or(u32::MAX));
    h.update(e.finish());
    for c in &doc.chunks {
        let mut e = Encoder::with_capacity(c.text.len() + c.vector.len() * 4 + 64);
        e.u32(c.ordinal);
        e.u64(c.start);
        e.u64(c.end);
        e.opt_str(c.heading.as_deref());
        e.str(&c.text);
        e.f32s(&c.vector);
        h.update(e.finish());
    }
    h.finalize().into()
}

/// The digest over `(source, document digest)` pairs, which must come sorted by source.
pub(crate) fn content_digest<'a>(
    docs: impl IntoIterator<Item = (&'a str, &'a [u8; 32])>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"gaia-kb-content/1\0");
    for (source, digest) in docs {
        h.update((source.len() as u64).to_le_bytes());
        h.update(source.as_bytes());
        h.update(digest);
    }
    h.finalize().into()
}

/// What the KB hash covers. Serialised as compact JSON in field order, which is canonical since
/// every field is a string, an integer or a struct of those.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestCore {
    /// [`KB_FORMAT`].
    pub format: String,
    /// The embedding model of every vector.
    pub model: ModelInfo,
    /// How documents were cut into chunks.
    pub chunking: ChunkingParams,
    /// Number of documents (sources).
    pub documents: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// sha256 over every document, sorted by source, in hex.
    pub content_sha256: String,
}

impl ManifestCore {
    /// The canonical JSON bytes.
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The KB hash: sha256 of the canonical JSON.
    pub fn hash(&self) -> ContentHash {
        ContentHash::of(&self.canonical_json())
    }
}

/// One file inside a snapshot archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    /// Name inside the archive.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 in hex.
    pub sha256: String,
}

/// `manifest.json` inside a snapshot archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    /// The KB hash ([`ManifestCore::hash`]) in hex.
    pub kb_hash: String,
    /// What the hash covers.
    pub core: ManifestCore,
    /// Every other file in the archive with its digest.
    pub files: Vec<SnapshotFile>,
    /// The software that wrote the archive (informational, not hashed).
    pub created_by: String,
}

/// Where the vector index checkpoint is and what it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Checkpoint {
    /// The log incarnation the checkpoint belongs to, in hex.
    pub(crate) log_id: String,
    /// Every log record up to this sequence number is in the index.
    pub(crate) seq: u64,
    /// Number of vectors in the index.
    pub(crate) chunks: u64,
    /// File name of the index inside the KB directory.
    pub(crate) index_file: String,
}

/// `manifest.json` in a KB directory: configuration, the index checkpoint and the sha256 of every
/// immutable file. The chunk log is not listed: it grows with every acknowledged document and
/// carries a sha256 per record instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreManifest {
    pub(crate) format: String,
    pub(crate) model: ModelInfo,
    pub(crate) chunking: ChunkingParams,
    pub(crate) checkpoint: Option<Checkpoint>,
    /// File name -> digest.
    pub(crate) files: BTreeMap<String, FileDigest>,
}

/// Size and sha256 of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileDigest {
    pub(crate) bytes: u64,
    pub(crate) sha256: String,
}

impl FileDigest {
    pub(crate) fn sha256_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut out).ok()?;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::SizeUnit;
    use crate::extract::ContentType;
    use crate::log::StoredChunk;

    fn doc(source: &str, text: &str, id: u64) -> StoredDocument {
        StoredDocument {
            source: source.into(),
            title: "t".into(),
            content_type: ContentType::Text,
            input_sha256: [0; 32],
            text_bytes: text.len() as u64,
            chunks: vec![StoredChunk {
                id,
                ordinal: 0,
                start: 0,
                end: text.len() as u64,
                heading: None,
                text: text.into(),
                vector: vec![0.5, 0.5],
            }],
        }
    }

    #[test]
    fn document_digest_ignores_chunk_ids_but_not_content() {
        assert_eq!(
            document_digest(&doc("a", "x", 1)),
            document_digest(&doc("a", "x", 99))
        );
        assert_ne!(
            document_digest(&doc("a", "x", 1)),
            document_digest(&doc("a", "y", 1))
        );
        let mut v = doc("a", "x", 1);
        v.chunks[0].vector[0] = 0.25;
        assert_ne!(document_digest(&doc("a", "x", 1)), document_digest(&v));
    }

    #[test]
    fn core_hash_is_stable_and_sensitive() {
        let core = ManifestCore {
            format: KB_FORMAT.into(),
            model: ModelInfo {
                id: "m".into(),
                digest: "d".into(),
                dimensions: 2,
            },
            chunking: ChunkingParams {
                unit: SizeUnit::Tokens,
                max_size: 8,
                overlap: 1,
                splitter: "s".into(),
            },
            documents: 1,
            chunks: 1,
            content_sha256: hex::encode(content_digest([("a", &[1u8; 32])])),
        };
        assert_eq!(core.hash(), core.clone().hash());
        let json = String::from_utf8(core.canonical_json()).unwrap();
        assert!(
            json.starts_with(r#"{"format":"gaia-kb/1","model":{"id":"m""#),
            "{json}"
        );
        let mut other = core.clone();
        other.model.digest = "e".into();
        assert_ne!(core.hash(), other.hash());
    }
}
