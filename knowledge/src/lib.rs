//! Gaia knowledge bases: documents are ingested, chunked along their structure, embedded through
//! the [`Embedder`] trait and indexed for retrieval-augmented generation.
//!
//! - **Ingest** ([`KnowledgeBase::ingest_path`], [`KnowledgeBase::ingest_bytes`]): plain text,
//!   Markdown, HTML and the text layer of PDFs, from files under an allowed root or from bytes the
//!   node fetched; binary, oversized, encrypted or damaged inputs are refused with clear errors.
//! - **Chunk**: `text-splitter` following headings, paragraphs and sentences, sized by the
//!   embedder's tokenizer, with overlap; parameters fixed per knowledge base.
//! - **Store**: an append-only, checksummed chunk log, fsynced before each acknowledgement, is the
//!   source of truth; a usearch HNSW index (cosine, f32) and a BM25 index are derived from it.
//!   Index checkpoints are written atomically and verified by sha256 before use; anything doubtful
//!   is rebuilt from the log on open.
//! - **Search** ([`KnowledgeBase::search`]): vector, keyword or hybrid (reciprocal rank fusion).
//! - **Snapshots** ([`KnowledgeBase::export_snapshot`], [`KnowledgeBase::import_snapshot`]): one
//!   tar archive with a manifest; the KB hash ([`KnowledgeBase::hash`]) depends on content only.
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! use std::sync::Arc;
//! use gaia_knowledge::{KbOptions, KnowledgeBase, SearchQuery, no_progress, testing::ToyEmbedder};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let mut kb = KnowledgeBase::open(dir.path(), Arc::new(ToyEmbedder::new()), KbOptions::default()).unwrap();
//! kb.ingest_bytes(b"# Bees\n\nBees make honey.", "bees.md", None, &mut no_progress).unwrap();
//! let hits = kb.search(&SearchQuery::new("who makes honey?")).unwrap();
//! assert_eq!(hits[0].source, "bees.md");
//! # }
//! ```
#![deny(missing_docs, unreachable_pub)]

mod bm25;
mod chunk;
mod codec;
mod embedder;
mod error;
mod extract;
mod fsutil;
mod index;
pub use index::DEFAULT_EXACT_SEARCH_MAX;
mod ingest;
mod kb;
mod log;
pub mod manifest;
mod search;
mod snapshot;
#[cfg(feature = "test-utils")]
pub mod testing;

#[doc(hidden)]
pub mod bench;

pub use chunk::{
    ChunkingError, ChunkingParams, DEFAULT_CHUNK_CHARS, DEFAULT_CHUNK_TOKENS, SPLITTER, SizeUnit,
};
pub use embedder::{EmbedError, Embedder, ModelInfo};
pub use error::{IngestError, OpenError, SearchError, SnapshotError, StoreError};
pub use extract::{ContentType, ExtractError};
pub use gaia_protocol::hash::ContentHash;
pub use ingest::{
    IngestPolicy, IngestReport, MAX_SOURCE_BYTES, PreparedDocument, Progress, no_progress,
};
pub use kb::{
    CompactReport, DEFAULT_MAX_DOCUMENT_BYTES, IngestedDocument, KbInfo, KbOptions, KnowledgeBase,
    RecoveryReport, SourceInfo,
};
pub use manifest::{ManifestCore, SnapshotFile, SnapshotManifest};
pub use search::{MAX_TOP_K, RRF_K, SearchHit, SearchMode, SearchQuery, keyword_floor};
pub use snapshot::{SNAPSHOT_LOG, SNAPSHOT_MANIFEST, SnapshotInfo, read_snapshot_manifest};
