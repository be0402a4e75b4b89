//! The knowledge base: a directory holding the chunk log (source of truth), a checkpoint of the
//! vector index and a manifest; in memory, the chunk texts, the HNSW index and a BM25 index.
//!
//! Files in the directory:
//! - `kb.log`: the chunk log (see [`crate::log`]); fsynced before any acknowledgement.
//! - `index-<seq>-<id>.usearch`: the latest index checkpoint, written atomically.
//! - `manifest.json`: model, chunking parameters, checkpoint and the sha256 of the index file,
//!   written atomically.
//! - `LOCK`: held (advisory lock) while a process has the knowledge base open.
//!
//! On open, the log is scanned (a torn tail is cut off, damaged records are skipped, reported and
//! compacted away after a copy of the damaged log is kept), the checkpoint is loaded only if its
//! sha256 and log id match, later records are replayed into it, and any doubt leads to a rebuild
//! of the index from the vectors stored in the log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gaia_protocol::hash::ContentHash;
use memmap2::Mmap;

use crate::bm25::Bm25;
use crate::chunk::ChunkingParams;
use crate::embedder::{Embedder, ModelInfo};
use crate::error::{OpenError, StoreError};
use crate::extract::ContentType;
use crate::fsutil;
use crate::index::{IndexError, VectorIndex};
use crate::log::{self, LogHeader, LogWriter, RecordKind, StoredDocument};
use crate::manifest::{
    Checkpoint, FileDigest, KB_FORMAT, ManifestCore, StoreManifest, content_digest, document_digest,
};

pub(crate) const LOG_FILE: &str = "kb.log";
pub(crate) const MANIFEST_FILE: &str = "manifest.json";
const LOCK_FILE: &str = "LOCK";
/// How long `open` waits for the lock before reporting the knowledge base busy.
const LOCK_WAIT: Duration = Duration::from_millis(1500);
const INDEX_PREFIX: &str = "index-";
const INDEX_SUFFIX: &str = ".usearch";

/// Default largest document, in bytes (50 MiB).
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 50 * 1024 * 1024;

/// Options of [`KnowledgeBase::open`].
#[derive(Debug, Clone)]
pub struct KbOptions {
    /// Chunk size for a new knowledge base (default: the embedder's limit, at most 256 tokens).
    /// An existing knowledge base keeps the parameters it was created with.
    pub chunk_size: Option<usize>,
    /// Chunk overlap for a new knowledge base (default: one eighth of the chunk size).
    pub chunk_overlap: Option<usize>,
    /// Largest document accepted, in bytes (default [`DEFAULT_MAX_DOCUMENT_BYTES`]).
    pub max_document_bytes: u64,
    /// Most chunks one document may make (default 100 000).
    pub max_chunks_per_document: usize,
    /// Texts per call to [`Embedder::embed`] (default 32).
    pub embed_batch: usize,
    /// Write an index checkpoint after this many chunk changes (default 20 000), so that opening
    /// never replays more than that.
    pub checkpoint_every_chunks: usize,
    /// Rewrite the log when superseded records take more than this many bytes and more than the
    /// live ones (default 64 MiB).
    pub compact_after_dead_bytes: u64,
    /// Searches are exact (brute force) while the knowledge base holds at most this many
    /// chunks (default [`crate::DEFAULT_EXACT_SEARCH_MAX`]); above it they use the HNSW
    /// graph plus the vectors the graph does not lead to (see `index.rs`).
    pub exact_search_max_vectors: usize,
}

impl Default for KbOptions {
    fn default() -> Self {
        Self {
            chunk_size: None,
            chunk_overlap: None,
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            max_chunks_per_document: 100_000,
            embed_batch: 32,
            checkpoint_every_chunks: 20_000,
            compact_after_dead_bytes: 64 * 1024 * 1024,
            exact_search_max_vectors: crate::index::DEFAULT_EXACT_SEARCH_MAX,
        }
    }
}

/// What opening had to repair. Empty after a clean shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Bytes of an incomplete record cut from the end of the log (a crash during an append).
    pub torn_tail_bytes: u64,
    /// Byte ranges of damaged records skipped in the middle of the log (media damage).
    pub damaged_ranges: Vec<(u64, u64)>,
    /// Where a copy of the damaged log was kept before it was compacted.
    pub damaged_log_copy: Option<PathBuf>,
    /// Why the vector index was rebuilt from the log, if it was.
    pub index_rebuilt: Option<String>,
    /// Chunks added to the checkpointed index from later log records.
    pub chunks_replayed: usize,
    /// Leftover temporary or stale files removed.
    pub stale_files_removed: usize,
}

impl RecoveryReport {
    /// Whether opening found nothing to repair (stale files and replay do not count).
    pub fn is_clean(&self) -> bool {
        self.torn_tail_bytes == 0 && self.damaged_ranges.is_empty() && self.index_rebuilt.is_none()
    }
}

/// Summary of a knowledge base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbInfo {
    /// The content hash (see [`crate::manifest`]).
    pub hash: ContentHash,
    /// What the hash covers: model, chunking, counts, content digest.
    pub manifest: ManifestCore,
    /// Number of documents.
    pub documents: usize,
    /// Number of chunks.
    pub chunks: usize,
    /// Number of vectors in the vector index (equal to `chunks` unless something is wrong).
    pub vectors: usize,
    /// Vectors the HNSW graph does not lead to, compared exactly with every query (0 while
    /// searches are exact).
    pub orphan_vectors: usize,
    /// The embedding model.
    pub model: ModelInfo,
    /// The chunking parameters.
    pub chunking: ChunkingParams,
    /// Size of the chunk log.
    pub log_bytes: u64,
    /// Bytes of superseded records that compaction would reclaim.
    pub reclaimable_bytes: u64,
    /// The KB directory.
    pub dir: PathBuf,
}

/// One document of a knowledge base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// The source name (relative path or URL).
    pub source: String,
    /// Its title.
    pub title: String,
    /// Its type.
    pub content_type: ContentType,
    /// Number of chunks.
    pub chunks: usize,
    /// Length of the extracted text.
    pub text_bytes: u64,
    /// Digest of the document's content (texts, offsets, vectors).
    pub digest: ContentHash,
}

/// The outcome of ingesting one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestedDocument {
    /// The source name.
    pub source: String,
    /// Its title.
    pub title: String,
    /// Its type.
    pub content_type: ContentType,
    /// Number of chunks stored.
    pub chunks: usize,
    /// Whether an older version of the source was replaced.
    pub replaced: bool,
    /// Whether the source was already stored with identical content (nothing was written).
    pub unchanged: bool,
}

/// What [`KnowledgeBase::compact`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// Log size before.
    pub bytes_before: u64,
    /// Log size after.
    pub bytes_after: u64,
}

#[derive(Debug)]
pub(crate) struct DocEntry {
    pub(crate) title: Arc<str>,
    pub(crate) content_type: ContentType,
    pub(crate) input_sha256: [u8; 32],
    pub(crate) text_bytes: u64,
    pub(crate) digest: [u8; 32],
    pub(crate) chunk_ids: Vec<u64>,
    pub(crate) seq: u64,
    /// Position of the record's frame in the log.
    pub(crate) offset: u64,
    pub(crate) frame_len: u64,
}

#[derive(Debug)]
pub(crate) struct ChunkEntry {
    pub(crate) source: Arc<str>,
    pub(crate) ordinal: u32,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) heading: Option<Arc<str>>,
    pub(crate) text: Box<str>,
}

/// Everything loaded from the directory.
pub(crate) struct State {
    pub(crate) header: LogHeader,
    pub(crate) log: LogWriter,
    pub(crate) next_seq: u64,
    pub(crate) next_chunk_id: u64,
    pub(crate) docs: BTreeMap<String, DocEntry>,
    pub(crate) chunks: HashMap<u64, ChunkEntry>,
    pub(crate) index: VectorIndex,
    pub(crate) bm25: Bm25,
    pub(crate) changes_since_checkpoint: usize,
    pub(crate) dead_bytes: u64,
    pub(crate) poisoned: Option<String>,
}

/// A knowledge base opened from a directory. Reads (`search`, `info`, `list_sources`) take
/// `&self` and may run concurrently; writes take `&mut self`. Share it behind an `RwLock`; embed
/// with [`KnowledgeBase::prepare_bytes`] under the read lock and [`KnowledgeBase::commit`] under
/// the write lock to keep writers short.
pub struct KnowledgeBase {
    pub(crate) dir: PathBuf,
    pub(crate) embedder: Arc<dyn Embedder>,
    pub(crate) options: KbOptions,
    pub(crate) state: State,
    recovery: RecoveryReport,
    _lock: File,
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeBase")
            .field("dir", &self.dir)
            .field("model", &self.state.header.model)
            .field("documents", &self.state.docs.len())
            .field("chunks", &self.state.chunks.len())
            .finish()
    }
}

fn open_io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + use<> {
    let path = path.to_path_buf();
    move |source| OpenError::Io {
        action,
        path,
        source,
    }
}

pub(crate) fn store_io(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

fn index_err(e: IndexError) -> StoreError {
    StoreError::Index(e.to_string())
}

impl KnowledgeBase {
    /// Opens the knowledge base in `dir`, creating it (and the directory) if it does not exist.
    /// Recovers from crashes and damaged files as described in the module docs; see
    /// [`KnowledgeBase::recovery`] for what was repaired.
    pub fn open(
        dir: &Path,
        embedder: Arc<dyn Embedder>,
        options: KbOptions,
    ) -> Result<Self, OpenError> {
        fs::create_dir_all(dir).map_err(open_io("create the directory", dir))?;
        let dir = dir.canonicalize().map_err(open_io("resolve", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(open_io("create the lock file", &lock_path))?;
        // A lock can look taken for a moment after its holder closed it: a child process forked
        // by any thread holds copies of every descriptor until it executes its program. Retry
        // briefly before calling the knowledge base busy.
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(fs::TryLockError::WouldBlock) => return Err(OpenError::Busy { dir }),
                Err(fs::TryLockError::Error(e)) => return Err(open_io("lock", &lock_path)(e)),
            }
        }
        let model = ModelInfo::of(embedder.as_ref());
        let mut recovery = RecoveryReport::default();
        recovery.stale_files_removed += remove_temp_files(&dir);

        let log_path = dir.join(LOG_FILE);
        if !log_path.exists() {
            if dir.join(MANIFEST_FILE).exists() {
                return Err(OpenError::LogMissing {
                    dir: dir.clone(),
                    log: log_path,
                });
            }
            let chunking = ChunkingParams::for_embedder(
                embedder.as_ref(),
                options.chunk_size,
                options.chunk_overlap,
            )?;
            let header = LogHeader {
                log_id: fsutil::unique_id(),
                model: model.clone(),
                chunking,
            };
            log::write_log(&log_path, &header, std::iter::empty())
                .map_err(open_io("create the chunk log", &log_path))?;
        }

        let mut state = load_state(&dir, &model, &mut recovery)?;
        state
            .index
            .set_exact_search_max(options.exact_search_max_vectors);
        let mut kb = Self {
            dir,
            embedder,
            options,
            state,
            recovery,
            _lock: lock,
        };
        if !kb.recovery.damaged_ranges.is_empty() {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let copy = kb.dir.join(format!("{LOG_FILE}.damaged-{stamp}"));
            fs::copy(kb.dir.join(LOG_FILE), &copy)
                .map_err(open_io("keep a copy of the damaged log as", &copy))?;
            tracing::error!(
                ranges = ?kb.recovery.damaged_ranges,
                copy = %copy.display(),
                "the chunk log had damaged records; they were skipped and the log was compacted"
            );
            kb.recovery.damaged_log_copy = Some(copy);
            kb.compact()?;
        } else if kb.recovery.index_rebuilt.is_some()
            || kb.state.changes_since_checkpoint >= 1000
            || !kb.dir.join(MANIFEST_FILE).exists()
        {
            kb.checkpoint()?;
        } else {
            kb.sweep_index().map_err(OpenError::Store)?;
        }
        kb.recovery.stale_files_removed += kb.remove_stale_index_files();
        if !kb.recovery.is_clean() {
            tracing::warn!(report = ?kb.recovery, dir = %kb.dir.display(), "knowledge base recovered");
        }
        Ok(kb)
    }

    /// What opening had to repair.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The KB directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The embedder this knowledge base uses.
    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }

    /// The options it was opened with.
    pub fn options(&self) -> &KbOptions {
        &self.options
    }

    /// The embedding model of every vector.
    pub fn model(&self) -> &ModelInfo {
        &self.state.header.model
    }

    /// The chunking parameters (fixed at creation).
    pub fn chunking(&self) -> &ChunkingParams {
        &self.state.header.chunking
    }

    /// The canonical manifest of the current content.
    pub fn manifest_core(&self) -> ManifestCore {
        let digest = content_digest(self.state.docs.iter().map(|(s, d)| (s.as_str(), &d.digest)));
        ManifestCore {
            format: KB_FORMAT.to_string(),
            model: self.state.header.model.clone(),
            chunking: self.state.header.chunking.clone(),
            documents: self.state.docs.len() as u64,
            chunks: self.state.chunks.len() as u64,
            content_sha256: hex::encode(digest),
        }
    }

    /// The KB hash: equal for equal content, whatever the order of ingestion or the files.
    pub fn hash(&self) -> ContentHash {
        self.manifest_core().hash()
    }

    /// Hash, counts, model and chunking parameters.
    pub fn info(&self) -> KbInfo {
        let manifest = self.manifest_core();
        KbInfo {
            hash: manifest.hash(),
            documents: self.state.docs.len(),
            chunks: self.state.chunks.len(),
            vectors: self.state.index.len(),
            orphan_vectors: self.state.index.orphan_count(),
            model: manifest.model.clone(),
            chunking: manifest.chunking.clone(),
            manifest,
            log_bytes: self.state.log.len(),
            reclaimable_bytes: self.state.dead_bytes,
            dir: self.dir.clone(),
        }
    }

    /// Every document, sorted by source.
    pub fn list_sources(&self) -> Vec<SourceInfo> {
        self.state
            .docs
            .iter()
            .map(|(s, d)| source_info(s, d))
            .collect()
    }

    /// One document, if present.
    pub fn source(&self, source: &str) -> Option<SourceInfo> {
        self.state.docs.get(source).map(|d| source_info(source, d))
    }

    /// The texts of a document's chunks in order, if present.
    pub fn source_chunks(&self, source: &str) -> Option<Vec<String>> {
        let doc = self.state.docs.get(source)?;
        Some(
            doc.chunk_ids
                .iter()
                .filter_map(|id| self.state.chunks.get(id).map(|c| c.text.to_string()))
                .collect(),
        )
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        match &self.state.poisoned {
            Some(reason) => Err(StoreError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Stores a document: one log record, fsynced, then the in-memory indexes. Replaces any
    /// older version of the same source atomically.
    pub(crate) fn store_document(
        &mut self,
        mut doc: StoredDocument,
    ) -> Result<IngestedDocument, StoreError> {
        self.check_poisoned()?;
        let dims = self.state.header.model.dimensions;
        let first_id = self.state.next_chunk_id;
        for (i, c) in doc.chunks.iter_mut().enumerate() {
            c.id = first_id + i as u64;
        }
        let digest = document_digest(&doc);
        let old = self.state.docs.get(&doc.source);
        if let Some(old) = old
            && old.digest == digest
        {
            return Ok(IngestedDocument {
                source: doc.source,
                title: old.title.to_string(),
                content_type: old.content_type,
                chunks: old.chunk_ids.len(),
                replaced: false,
                unchanged: true,
            });
        }
        let replaced = old.is_some();
        let seq = self.state.next_seq;
        let payload = log::encode_put(&doc, &digest);
        let frame = log::frame(RecordKind::Put, seq, &payload).ok_or_else(|| {
            StoreError::RecordTooLarge {
                source_name: doc.source.clone(),
                bytes: payload.len(),
            }
        })?;
        drop(payload);
        // Make room first, so that adding to the index cannot fail for capacity after the
        // record is durable.
        self.state
            .index
            .reserve(doc.chunks.len())
            .map_err(index_err)?;
        let offset = self.state.log.len();
        let log_path = self.dir.join(LOG_FILE);
        self.state
            .log
            .append(&frame)
            .map_err(store_io("append to the chunk log", &log_path))?;

        // Durable: from here on the document is acknowledged; bring memory up to date.
        self.state.next_seq += 1;
        self.state.next_chunk_id += doc.chunks.len() as u64;
        let mut changes = doc.chunks.len();
        if let Some(old) = self.state.docs.remove(&doc.source) {
            changes += old.chunk_ids.len();
            self.state.dead_bytes += old.frame_len;
            self.forget_chunks(&old.chunk_ids);
        }
        let source: Arc<str> = Arc::from(doc.source.as_str());
        let mut chunk_ids = Vec::with_capacity(doc.chunks.len());
        let mut failure = None;
        for c in doc.chunks {
            debug_assert_eq!(c.vector.len(), dims);
            if failure.is_none()
                && let Err(e) = self.state.index.add(c.id, &c.vector)
            {
                failure = Some(e.to_string());
            }
            self.state.bm25.insert(c.id, &c.text);
            chunk_ids.push(c.id);
            self.state.chunks.insert(
                c.id,
                ChunkEntry {
                    source: source.clone(),
                    ordinal: c.ordinal,
                    start: c.start,
                    end: c.end,
                    heading: c.heading.map(Arc::from),
                    text: c.text.into_boxed_str(),
                },
            );
        }
        let chunks = chunk_ids.len();
        self.state.docs.insert(
            doc.source.clone(),
            DocEntry {
                title: Arc::from(doc.title.as_str()),
                content_type: doc.content_type,
                input_sha256: doc.input_sha256,
                text_bytes: doc.text_bytes,
                digest,
                chunk_ids,
                seq,
                offset,
                frame_len: frame.len() as u64,
            },
        );
        if let Some(reason) = failure {
            self.state.poisoned = Some(format!("adding vectors to the index failed: {reason}"));
        }
        self.state.changes_since_checkpoint += changes;
        self.after_write();
        Ok(IngestedDocument {
            source: doc.source,
            title: doc.title,
            content_type: doc.content_type,
            chunks,
            replaced,
            unchanged: false,
        })
    }

    /// Finds the vectors the HNSW graph no longer leads to (see `index.rs`); a no-op while
    /// searches are exact.
    fn sweep_index(&mut self) -> Result<(), StoreError> {
        let keys: Vec<u64> = self.state.chunks.keys().copied().collect();
        let orphans = self.state.index.sweep(&keys).map_err(index_err)?;
        if orphans > 0 {
            tracing::debug!(
                orphans,
                vectors = keys.len(),
                "vectors the search graph does not lead to are searched exactly"
            );
        }
        Ok(())
    }

    fn forget_chunks(&mut self, ids: &[u64]) {
        let mut removed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Err(e) = self.state.index.remove(*id) {
                self.state.poisoned = Some(format!("removing vectors from the index failed: {e}"));
            }
            if let Some(c) = self.state.chunks.remove(id) {
                removed.push((*id, c.text));
            }
        }
        self.state
            .bm25
            .remove(removed.iter().map(|(id, t)| (*id, &**t)));
    }

    /// Removes a source. Returns whether it was present. Durable when it returns.
    pub fn remove_source(&mut self, source: &str) -> Result<bool, StoreError> {
        self.check_poisoned()?;
        if !self.state.docs.contains_key(source) {
            return Ok(false);
        }
        let seq = self.state.next_seq;
        let frame =
            log::frame(RecordKind::Remove, seq, &log::encode_remove(source)).ok_or_else(|| {
                StoreError::RecordTooLarge {
                    source_name: source.to_string(),
                    bytes: source.len(),
                }
            })?;
        let log_path = self.dir.join(LOG_FILE);
        self.state
            .log
            .append(&frame)
            .map_err(store_io("append to the chunk log", &log_path))?;
        self.state.next_seq += 1;
        if let Some(old) = self.state.docs.remove(source) {
            self.state.dead_bytes += old.frame_len + frame.len() as u64;
            self.state.changes_since_checkpoint += old.chunk_ids.len();
            self.forget_chunks(&old.chunk_ids);
        }
        self.after_write();
        Ok(true)
    }

    /// Housekeeping after a durable write: checkpoint or compact when due. Failures are logged,
    /// not returned: the write itself succeeded, and both are retried later.
    fn after_write(&mut self) {
        let live: u64 = self.state.docs.values().map(|d| d.frame_len).sum();
        if self.state.dead_bytes > self.options.compact_after_dead_bytes
            && self.state.dead_bytes > live
        {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "compacting the chunk log failed; will retry later");
            }
        } else if self.state.changes_since_checkpoint >= self.options.checkpoint_every_chunks
            && let Err(e) = self.checkpoint()
        {
            tracing::warn!(error = %e, "writing an index checkpoint failed; will retry later");
        }
    }

    /// Writes the vector index to disk (crash-safely) so that the next open does not replay the
    /// log. Called automatically; call it before a planned shutdown.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.check_poisoned()?;
        self.sweep_index()?;
        let seq = self.state.next_seq - 1;
        let name = format!(
            "{INDEX_PREFIX}{seq:016}-{}{INDEX_SUFFIX}",
            hex::encode(&fsutil::unique_id()[..4])
        );
        let path = self.dir.join(&name);
        let (sha, bytes) = self.state.index.save_atomic(&path).map_err(index_err)?;
        let manifest = StoreManifest {
            format: KB_FORMAT.to_string(),
            model: self.state.header.model.clone(),
            chunking: self.state.header.chunking.clone(),
            checkpoint: Some(Checkpoint {
                log_id: hex::encode(self.state.header.log_id),
                seq,
                chunks: self.state.index.len() as u64,
                index_file: name.clone(),
            }),
            files: BTreeMap::from([(
                name,
                FileDigest {
                    bytes,
                    sha256: hex::encode(sha),
                },
            )]),
        };
        let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        let manifest_path = self.dir.join(MANIFEST_FILE);
        fsutil::atomic_write(&manifest_path, &json).map_err(store_io("write", &manifest_path))?;
        self.state.changes_since_checkpoint = 0;
        self.remove_stale_index_files();
        Ok(())
    }

    /// Removes index files the manifest does not name.
    fn remove_stale_index_files(&self) -> usize {
        let keep = read_manifest(&self.dir)
            .ok()
            .flatten()
            .and_then(|m| m.checkpoint)
            .map(|c| c.index_file);
        let mut removed = 0;
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(INDEX_PREFIX)
                    && name.ends_with(INDEX_SUFFIX)
                    && Some(&name) != keep.as_ref()
                    && fs::remove_file(entry.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Rewrites the chunk log with only the live documents, reclaiming superseded records, and
    /// rebuilds the vector index from their vectors.
    pub fn compact(&mut self) -> Result<CompactReport, StoreError> {
        self.check_poisoned()?;
        let log_path = self.dir.join(LOG_FILE);
        let bytes_before = self.state.log.len();
        let tmp = self
            .dir
            .join(format!(".{LOG_FILE}.compact{}", fsutil::TMP_SUFFIX));
        let mut header = self.state.header.clone();
        header.log_id = fsutil::unique_id();
        // (source, seq, offset, frame length) of the live records, in log order.
        let mut order: Vec<(String, u64, u64, u64)> = self
            .state
            .docs
            .iter()
            .map(|(s, d)| (s.clone(), d.seq, d.offset, d.frame_len))
            .collect();
        order.sort_by_key(|o| o.1);
        let mut new_offsets = Vec::with_capacity(order.len());
        // The vector index is rebuilt too: HNSW graphs lose recall as removed nodes accumulate.
        let dims = self.state.header.model.dimensions;
        let mut new_index = VectorIndex::new(dims).map_err(index_err)?;
        new_index.set_exact_search_max(self.options.exact_search_max_vectors);
        new_index
            .reserve(self.state.chunks.len())
            .map_err(index_err)?;
        let written = (|| -> std::io::Result<u64> {
            let mut batch: Vec<(u64, Vec<f32>)> = Vec::new();
            let flush = |batch: &mut Vec<(u64, Vec<f32>)>| -> std::io::Result<()> {
                let items: Vec<(u64, &[f32])> =
                    batch.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                new_index.add_many(&items).map_err(std::io::Error::other)?;
                batch.clear();
                Ok(())
            };
            let mut reader = File::open(&log_path)?;
            let mut out = std::io::BufWriter::with_capacity(
                1 << 20,
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)?,
            );
            let head = log::frame(RecordKind::Header, 0, &log::encode_header(&header))
                .ok_or_else(|| std::io::Error::other("log header too large"))?;
            out.write_all(&head)?;
            let mut pos = head.len() as u64;
            let mut buf = Vec::new();
            for (source, _, offset, frame_len) in &order {
                buf.resize(*frame_len as usize, 0);
                reader.seek(SeekFrom::Start(*offset))?;
                reader.read_exact(&mut buf)?;
                let payload = log::frame_payload(&buf).ok_or_else(|| {
                    std::io::Error::other(format!(
                        "the record of {source} at offset {offset} no longer matches its checksum"
                    ))
                })?;
                let doc = log::decode_put(payload, dims, true)
                    .map_err(|e| std::io::Error::other(format!("the record of {source}: {e}")))?;
                batch.extend(doc.chunks.into_iter().map(|c| (c.id, c.vector)));
                if batch.len() >= 4096 {
                    flush(&mut batch)?;
                }
                out.write_all(&buf)?;
                new_offsets.push(pos);
                pos += buf.len() as u64;
            }
            flush(&mut batch)?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok(pos)
        })();
        let written = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(store_io("rewrite the chunk log into", &tmp)(e));
            }
        };
        // Checkpoint the index under the new log id first; then switch logs. A crash in between
        // only costs an index rebuild on the next open.
        if new_index.len() != self.state.chunks.len() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Index(format!(
                "the rebuilt index holds {} vectors for {} chunks",
                new_index.len(),
                self.state.chunks.len()
            )));
        }
        let old_header = std::mem::replace(&mut self.state.header, header);
        let old_index = std::mem::replace(&mut self.state.index, new_index);
        if let Err(e) = self.checkpoint() {
            self.state.header = old_header;
            self.state.index = old_index;
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = fsutil::durable_rename(&tmp, &log_path) {
            self.state.poisoned = Some(format!("switching to the compacted log failed: {e}"));
            return Err(store_io("replace the chunk log with", &tmp)(e));
        }
        match LogWriter::open(&log_path, written) {
            Ok(writer) => self.state.log = writer,
            Err(e) => {
                self.state.poisoned = Some(format!("reopening the compacted log failed: {e}"));
                return Err(store_io("reopen", &log_path)(e));
            }
        }
        let seqs: Vec<u64> = order.iter().map(|o| o.1).collect();
        let by_seq: HashMap<u64, u64> = seqs.into_iter().zip(new_offsets).collect();
        for doc in self.state.docs.values_mut() {
            if let Some(off) = by_seq.get(&doc.seq) {
                doc.offset = *off;
            }
        }
        self.state.dead_bytes = 0;
        Ok(CompactReport {
            bytes_before,
            bytes_after: written,
        })
    }

    /// Reads a live document back from the log with its vectors.
    pub(crate) fn read_document(
        &self,
        reader: &mut File,
        source: &str,
    ) -> Result<StoredDocument, StoreError> {
        let log_path = self.dir.join(LOG_FILE);
        let doc = self.state.docs.get(source).ok_or_else(|| {
            StoreError::Poisoned(format!("document {source} vanished from memory"))
        })?;
        let mut buf = vec![0u8; doc.frame_len as usize];
        reader
            .seek(SeekFrom::Start(doc.offset))
            .and_then(|_| reader.read_exact(&mut buf))
            .map_err(store_io("read the chunk log", &log_path))?;
        let payload = log::frame_payload(&buf).ok_or_else(|| StoreError::Io {
            action: "verify a record of",
            path: log_path.clone(),
            source: std::io::Error::other(format!("the record of {source} fails its checksum")),
        })?;
        log::decode_put(payload, self.state.header.model.dimensions, true).map_err(|e| {
            StoreError::Io {
                action: "decode a record of",
                path: log_path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })
    }

    /// Replaces the whole state after a new log was put in place (snapshot import).
    pub(crate) fn reload(&mut self) -> Result<(), OpenError> {
        let model = ModelInfo::of(self.embedder.as_ref());
        let mut recovery = RecoveryReport::default();
        self.state = load_state(&self.dir, &model, &mut recovery)?;
        self.checkpoint()?;
        self.remove_stale_index_files();
        Ok(())
    }

    /// Writes a final checkpoint and closes the knowledge base.
    pub fn close(mut self) -> Result<(), StoreError> {
        if self.state.changes_since_checkpoint > 0 {
            self.checkpoint()?;
        }
        Ok(())
    }
}

impl Drop for KnowledgeBase {
    fn drop(&mut self) {
        if self.state.changes_since_checkpoint > 0
            && self.state.poisoned.is_none()
            && let Err(e) = self.checkpoint()
        {
            tracing::warn!(error = %e, "final index checkpoint failed; the next open replays the log");
        }
    }
}

fn source_info(source: &str, d: &DocEntry) -> SourceInfo {
    SourceInfo {
        source: source.to_string(),
        title: d.title.to_string(),
        content_type: d.content_type,
        chunks: d.chunk_ids.len(),
        text_bytes: d.text_bytes,
        digest: ContentHash(d.digest),
    }
}

/// Removes temporary files left by a crash.
fn remove_temp_files(dir: &Path) -> usize {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.')
                && name.ends_with(fsutil::TMP_SUFFIX)
                && fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

/// The manifest, `None` if absent; an unreadable manifest is an error for the caller to report.
pub(crate) fn read_manifest(dir: &Path) -> Result<Option<StoreManifest>, String> {
    let path = dir.join(MANIFEST_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("manifest.json is damaged ({e})")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("manifest.json is unreadable ({e})")),
    }
}

struct RecordMeta<'a> {
    seq: u64,
    kind: RecordKind,
    ids: Vec<u64>,
    offset: u64,
    frame_len: u64,
    payload: &'a [u8],
}

/// Loads everything from the directory: scans the log, builds the in-memory indexes and brings
/// the vector index up to date (from its checkpoint when that can be trusted, else from scratch).
fn load_state(
    dir: &Path,
    model: &ModelInfo,
    recovery: &mut RecoveryReport,
) -> Result<State, OpenError> {
    let log_path = dir.join(LOG_FILE);
    let damaged = |reason: String| OpenError::LogDamaged {
        path: log_path.clone(),
        reason,
    };
    let file = File::open(&log_path).map_err(open_io("open", &log_path))?;
    let file_len = file.metadata().map_err(open_io("read", &log_path))?.len();
    if file_len == 0 {
        return Err(damaged("the file is empty".into()));
    }
    // SAFETY: the map is read-only and dropped before this function returns; the exclusive lock
    // on the directory keeps other cooperating processes from changing the file meanwhile.
    let map = unsafe { Mmap::map(&file) }.map_err(open_io("map", &log_path))?;
    let scan = log::scan(&map).map_err(|e| damaged(e.to_string()))?;
    if scan.header.model != *model {
        return Err(OpenError::ModelMismatch {
            dir: dir.to_path_buf(),
            kb: Box::new(scan.header.model.clone()),
            embedder: Box::new(model.clone()),
        });
    }
    let dims = model.dimensions;
    recovery.torn_tail_bytes = file_len - scan.valid_len;
    recovery.damaged_ranges = scan.damaged.clone();

    // Pass 1: which record is the live version of each source.
    let mut metas: Vec<RecordMeta<'_>> = Vec::with_capacity(scan.records.len());
    let mut live: HashMap<String, usize> = HashMap::new();
    let mut max_id = 0u64;
    for r in &scan.records {
        let (source, ids) = match r.kind {
            RecordKind::Put => log::put_chunk_ids(r.payload, dims)
                .map_err(|e| damaged(format!("record {} at offset {}: {e}", r.seq, r.offset)))?,
            RecordKind::Remove => (
                log::decode_remove(r.payload).map_err(|e| {
                    damaged(format!("record {} at offset {}: {e}", r.seq, r.offset))
                })?,
                Vec::new(),
            ),
            RecordKind::Header => continue,
        };
        max_id = ids.iter().copied().fold(max_id, u64::max);
        match r.kind {
            RecordKind::Put => {
                live.insert(source, metas.len());
            }
            _ => {
                live.remove(&source);
            }
        }
        metas.push(RecordMeta {
            seq: r.seq,
            kind: r.kind,
            ids,
            offset: r.offset,
            frame_len: r.frame_len,
            payload: r.payload,
        });
    }
    let last_seq = metas.last().map_or(0, |m| m.seq);
    let live_set: HashSet<usize> = live.values().copied().collect();

    // Pass 2: texts and keyword index of the live documents.
    let mut docs = BTreeMap::new();
    let mut chunks = HashMap::new();
    let mut bm25 = Bm25::default();
    let mut dead_bytes = 0u64;
    let mut live_in_order: Vec<usize> = live_set.iter().copied().collect();
    live_in_order.sort_unstable();
    for (i, m) in metas.iter().enumerate() {
        if !live_set.contains(&i) {
            dead_bytes += m.frame_len;
        }
    }
    for &i in &live_in_order {
        let m = &metas[i];
        let (doc, digest) = log::decode_put_with_digest(m.payload, dims, false)
            .map_err(|e| damaged(format!("record {} at offset {}: {e}", m.seq, m.offset)))?;
        let source: Arc<str> = Arc::from(doc.source.as_str());
        let mut ids = Vec::with_capacity(doc.chunks.len());
        for c in doc.chunks {
            if chunks.contains_key(&c.id) {
                return Err(damaged(format!("chunk id {} is used twice", c.id)));
            }
            bm25.insert(c.id, &c.text);
            ids.push(c.id);
            chunks.insert(
                c.id,
                ChunkEntry {
                    source: source.clone(),
                    ordinal: c.ordinal,
                    start: c.start,
                    end: c.end,
                    heading: c.heading.map(Arc::from),
                    text: c.text.into_boxed_str(),
                },
            );
        }
        docs.insert(
            doc.source,
            DocEntry {
                title: Arc::from(doc.title.as_str()),
                content_type: doc.content_type,
                input_sha256: doc.input_sha256,
                text_bytes: doc.text_bytes,
                digest,
                chunk_ids: ids,
                seq: m.seq,
                offset: m.offset,
                frame_len: m.frame_len,
            },
        );
    }

    // The vector index: the checkpoint if it can be trusted, then the records after it.
    let checkpoint = match read_manifest(dir) {
        Ok(Some(manifest)) => usable_checkpoint(dir, &manifest, &scan.header, last_seq),
        Ok(None) => Err("there is no checkpoint".to_string()),
        Err(reason) => Err(reason),
    };
    let mut replayed = 0usize;
    let index = match checkpoint {
        Ok((index, cp_seq)) => {
            let result = (|| -> Result<(), IndexError> {
                for (i, m) in metas.iter().enumerate() {
                    if m.kind != RecordKind::Put {
                        continue;
                    }
                    if !live_set.contains(&i) {
                        for id in &m.ids {
                            index.remove(*id)?;
                        }
                    } else if m.seq > cp_seq {
                        let doc = log::decode_put(m.payload, dims, true)
                            .map_err(|e| IndexError::Mismatch(e.to_string()))?;
                        index.reserve(doc.chunks.len())?;
                        for c in &doc.chunks {
                            if !index.contains(c.id) {
                                index.add(c.id, &c.vector)?;
                                replayed += 1;
                            }
                        }
                    }
                }
                Ok(())
            })();
            let consistent = result.is_ok()
                && index.len() == chunks.len()
                && chunks.keys().all(|id| index.contains(*id));
            if consistent {
                recovery.chunks_replayed = replayed;
                Some(index)
            } else {
                recovery.index_rebuilt = Some(match result {
                    Err(e) => format!("replaying the log into the checkpoint failed ({e})"),
                    Ok(()) => "the checkpoint does not match the chunk log".to_string(),
                });
                None
            }
        }
        Err(reason) => {
            if !chunks.is_empty() {
                recovery.index_rebuilt = Some(reason);
            }
            None
        }
    };
    let index = match index {
        Some(index) => index,
        None => rebuild_index(&metas, &live_in_order, dims)
            .map_err(|e| OpenError::Store(index_err(e)))?,
    };
    let valid_len = scan.valid_len;
    let header = scan.header.clone();
    drop(scan);
    drop(map);
    drop(file);
    let writer =
        LogWriter::open(&log_path, valid_len).map_err(open_io("open for writing", &log_path))?;
    Ok(State {
        header,
        log: writer,
        next_seq: last_seq + 1,
        next_chunk_id: max_id + 1,
        docs,
        chunks,
        index,
        bm25,
        changes_since_checkpoint: replayed,
        dead_bytes,
        poisoned: None,
    })
}

/// Loads the checkpoint named by `manifest` if it belongs to this log and verifies.
fn usable_checkpoint(
    dir: &Path,
    manifest: &StoreManifest,
    header: &LogHeader,
    last_seq: u64,
) -> Result<(VectorIndex, u64), String> {
    let cp = manifest
        .checkpoint
        .as_ref()
        .ok_or("the manifest names no checkpoint")?;
    if manifest.model != header.model {
        return Err("the manifest's model differs from the chunk log's".into());
    }
    if cp.log_id != hex::encode(header.log_id) {
        return Err("the checkpoint belongs to an earlier chunk log".into());
    }
    if cp.seq > last_seq {
        return Err(format!(
            "the checkpoint covers record {} but the chunk log ends at record {last_seq}",
            cp.seq
        ));
    }
    if cp.index_file.contains(['/', '\\']) || !cp.index_file.starts_with(INDEX_PREFIX) {
        return Err("the manifest names an invalid index file".into());
    }
    let digest = manifest
        .files
        .get(&cp.index_file)
        .ok_or("the manifest has no digest for the index file")?;
    let sha = digest
        .sha256_bytes()
        .ok_or("the manifest's index digest is malformed")?;
    let index = VectorIndex::load_verified(
        &dir.join(&cp.index_file),
        header.model.dimensions,
        &sha,
        digest.bytes,
    )
    .map_err(|e| e.to_string())?;
    Ok((index, cp.seq))
}

/// Builds the vector index from the vectors stored in the live records.
fn rebuild_index(
    metas: &[RecordMeta<'_>],
    live: &[usize],
    dims: usize,
) -> Result<VectorIndex, IndexError> {
    let index = VectorIndex::new(dims)?;
    let total: usize = live.iter().map(|&i| metas[i].ids.len()).sum();
    index.reserve(total)?;
    // Decode in batches of documents to bound memory while keeping all cores busy.
    let mut batch: Vec<(u64, Vec<f32>)> = Vec::new();
    let flush = |batch: &mut Vec<(u64, Vec<f32>)>| -> Result<(), IndexError> {
        let items: Vec<(u64, &[f32])> = batch.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        index.add_many(&items)?;
        batch.clear();
        Ok(())
    };
    for &i in live {
        let doc = log::decode_put(metas[i].payload, dims, true)
            .map_err(|e| IndexError::Mismatch(e.to_string()))?;
        batch.extend(doc.chunks.into_iter().map(|c| (c.id, c.vector)));
        if batch.len() >= 4096 {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_knowledge_base_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<KnowledgeBase>();
    }
}
