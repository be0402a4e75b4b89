//! One error enum per operation, each variant with the context a user needs.

use std::path::PathBuf;

use crate::chunk::ChunkingError;
use crate::embedder::{EmbedError, ModelInfo};
use crate::extract::ExtractError;

/// A failure of the storage layer (chunk log, vector index, manifest).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `append to the chunk log`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The vector index failed.
    #[error(
        "the vector index failed: {0}; reopen the knowledge base to rebuild it from the chunk log"
    )]
    Index(String),
    /// An earlier failure left the in-memory state behind the log; nothing acknowledged is
    /// lost, but the knowledge base must be reopened.
    #[error(
        "the knowledge base must be reopened after an earlier failure ({0}); acknowledged documents are safe in the chunk log"
    )]
    Poisoned(String),
    /// A document is too large for one log record.
    #[error(
        "document {source_name} needs a {bytes}-byte record, more than the 4 GiB limit; split it into smaller files"
    )]
    RecordTooLarge {
        /// The document.
        source_name: String,
        /// Size of its record.
        bytes: usize,
    },
}

/// Why a knowledge base could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (or another handle in this one) has it open.
    #[error(
        "knowledge base {dir} is in use by another process; stop it or choose another directory"
    )]
    Busy {
        /// The KB directory.
        dir: PathBuf,
    },
    /// The directory or a file in it is not accessible.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The knowledge base was built with another embedding model.
    #[error(
        "knowledge base {dir} was built with embedding model {kb}, but the configured embedder is \
         {embedder}; configure the same model, or ingest the documents into a new knowledge base"
    )]
    ModelMismatch {
        /// The KB directory.
        dir: PathBuf,
        /// The model recorded in the knowledge base.
        kb: Box<ModelInfo>,
        /// The embedder passed to open.
        embedder: Box<ModelInfo>,
    },
    /// The directory holds knowledge-base files but the chunk log is gone.
    #[error(
        "knowledge base {dir} has a manifest but its chunk log {log} is missing; restore it from a snapshot with `gaia kb import`"
    )]
    LogMissing {
        /// The KB directory.
        dir: PathBuf,
        /// The expected log path.
        log: PathBuf,
    },
    /// The chunk log's header is unreadable.
    #[error(
        "the chunk log {path} is damaged beyond repair ({reason}); restore the knowledge base from a snapshot"
    )]
    LogDamaged {
        /// The log.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The chunking options do not fit the embedder.
    #[error(transparent)]
    Chunking(#[from] ChunkingError),
    /// Recovery failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a document could not be ingested. Nothing already in the knowledge base is affected.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The path resolves (after following symlinks) outside the allowed root.
    #[error("{path} is outside the allowed directory {root}; only files under it can be ingested")]
    OutsideRoot {
        /// The path as given.
        path: PathBuf,
        /// The allowed root.
        root: PathBuf,
    },
    /// The file or directory cannot be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a directory.
    #[error("{path} is not a regular file or directory")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The document exceeds the size limit.
    #[error(
        "{source_name} is {bytes} bytes, over the {limit}-byte limit; raise the limit or split the file"
    )]
    TooLarge {
        /// The document.
        source_name: String,
        /// Its size (at least).
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The document's type is not one this crate reads.
    #[error(
        "{source_name} has unsupported type {kind}; text, markdown, html and pdf are supported"
    )]
    Unsupported {
        /// The document.
        source_name: String,
        /// The type found.
        kind: String,
    },
    /// The text could not be extracted.
    #[error("cannot ingest {source_name}: {error}")]
    Extract {
        /// The document.
        source_name: String,
        /// Why.
        #[source]
        error: ExtractError,
    },
    /// The source name is unusable.
    #[error("invalid source name {source_name:?}: {reason}")]
    InvalidSource {
        /// The name.
        source_name: String,
        /// Why.
        reason: &'static str,
    },
    /// The document would have too many chunks.
    #[error("{source_name} would make {chunks} chunks, over the limit of {limit}; split the file")]
    TooManyChunks {
        /// The document.
        source_name: String,
        /// Chunks it would make.
        chunks: usize,
        /// The limit.
        limit: usize,
    },
    /// A directory holds more files than allowed.
    #[error(
        "{path} holds more than {limit} files; ingest its subdirectories separately or raise the limit"
    )]
    TooManyFiles {
        /// The directory.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// The embedder failed.
    #[error("cannot embed {source_name}: {error}")]
    Embed {
        /// The document.
        source_name: String,
        /// Why.
        #[source]
        error: EmbedError,
    },
    /// The embedder returned unusable vectors.
    #[error("the embedding model returned an unusable vector for {source_name}: {reason}")]
    BadVector {
        /// The document.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// The document was prepared by a knowledge base with another model.
    #[error("the prepared document was embedded with {prepared}, this knowledge base uses {kb}")]
    WrongModel {
        /// Model of the prepared document.
        prepared: Box<ModelInfo>,
        /// Model of this knowledge base.
        kb: Box<ModelInfo>,
    },
    /// The chunking parameters do not fit the embedder.
    #[error(transparent)]
    Chunking(#[from] ChunkingError),
    /// Storing failed; the document was not acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The query has no text.
    #[error("the search query is empty")]
    EmptyQuery,
    /// `top_k` is 0 or too large.
    #[error("top_k {top_k} is out of range; use 1 to {max}")]
    TopKOutOfRange {
        /// The requested value.
        top_k: usize,
        /// The largest allowed value.
        max: usize,
    },
    /// The query vector has the wrong size or non-finite values.
    #[error("the query vector is unusable: {0}")]
    BadVector(String),
    /// Embedding the query failed.
    #[error("cannot embed the query: {0}")]
    Embed(#[from] EmbedError),
    /// The index failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a snapshot could not be exported or imported. A failed import leaves the knowledge base
/// exactly as it was.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The archive is not a knowledge-base snapshot.
    #[error("{path} is not a knowledge-base snapshot: {reason}")]
    NotASnapshot {
        /// The archive.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The snapshot was built with another embedding model.
    #[error(
        "snapshot {path} was built with embedding model {snapshot}, but this knowledge base uses \
         {kb}; import it into a node configured with {snapshot_id}"
    )]
    ModelMismatch {
        /// The archive.
        path: PathBuf,
        /// Model of the snapshot.
        snapshot: Box<ModelInfo>,
        /// Model of this knowledge base.
        kb: Box<ModelInfo>,
        /// Id of the snapshot's model (for the advice).
        snapshot_id: String,
    },
    /// A file's digest does not match the manifest.
    #[error(
        "snapshot {path} is damaged or tampered with: {file} has sha256 {actual}, its manifest says {expected}"
    )]
    DigestMismatch {
        /// The archive.
        path: PathBuf,
        /// The file inside it.
        file: String,
        /// Digest from the manifest.
        expected: String,
        /// Digest of the content.
        actual: String,
    },
    /// The content does not hash to the expected KB hash.
    #[error("snapshot {path} has knowledge-base hash {actual}, expected {expected}")]
    HashMismatch {
        /// The archive.
        path: PathBuf,
        /// The expected hash.
        expected: String,
        /// The recomputed hash.
        actual: String,
    },
    /// The content is inconsistent.
    #[error("snapshot {path} is damaged or tampered with: {reason}")]
    Corrupt {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Storing the imported content failed; the old knowledge base is intact.
    #[error(transparent)]
    Store(#[from] StoreError),
}
