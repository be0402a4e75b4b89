//! Ingestion: files, directories and already-fetched bytes (URLs) become documents.
//!
//! Ingest is split in two steps so that a node can embed without blocking readers:
//! [`KnowledgeBase::prepare_bytes`] / [`KnowledgeBase::prepare_file`] (extract, chunk, embed; takes
//! `&self`) and [`KnowledgeBase::commit`] (one fsynced log record; takes `&mut self`). The
//! `ingest_*` methods do both.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::chunk;
use crate::embedder::ModelInfo;
use crate::error::IngestError;
use crate::extract::{self, ContentType, ExtractError};
use crate::kb::{IngestedDocument, KnowledgeBase};
use crate::log::{StoredChunk, StoredDocument};

/// Longest source name, in bytes.
pub const MAX_SOURCE_BYTES: usize = 4096;
/// Longest title kept, in characters.
const MAX_TITLE_CHARS: usize = 200;

/// Where files may be read from, and how far a directory walk goes.
#[derive(Debug, Clone)]
pub struct IngestPolicy {
    /// Only paths that resolve (symlinks followed) inside this directory are read.
    pub root: PathBuf,
    /// Most files taken from one directory walk (default 100 000).
    pub max_files: usize,
    /// Deepest directory level visited (default 32).
    pub max_depth: usize,
    /// Whether files and directories whose names start with `.` are visited (default false).
    pub include_hidden: bool,
}

impl IngestPolicy {
    /// A policy allowing everything under `root`, with default limits.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            max_files: 100_000,
            max_depth: 32,
            include_hidden: false,
        }
    }
}

/// Progress of an ingest, for progress bars. Sent in order; `index` counts from 0.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A directory walk found this many files to ingest.
    Discovered {
        /// Number of files.
        files: usize,
    },
    /// Work on a document started.
    Started {
        /// Position among the files of this call.
        index: usize,
        /// Number of files of this call.
        total: usize,
        /// The source name.
        source: &'a str,
    },
    /// The document was cut into this many chunks; embedding starts.
    Chunked {
        /// The source name.
        source: &'a str,
        /// Number of chunks.
        chunks: usize,
    },
    /// Chunks embedded so far.
    Embedded {
        /// The source name.
        source: &'a str,
        /// Chunks done.
        done: usize,
        /// Chunks in the document.
        total: usize,
    },
    /// The document is stored (acknowledged).
    Stored {
        /// What was stored.
        document: &'a IngestedDocument,
    },
    /// A file was skipped (unsupported type, hidden, not a regular file).
    Skipped {
        /// The file.
        path: &'a Path,
        /// Why.
        reason: &'a str,
    },
    /// A file failed; the walk goes on.
    Failed {
        /// The file.
        path: &'a Path,
        /// Why.
        error: &'a IngestError,
    },
}

/// A progress callback that ignores everything.
pub fn no_progress(_: Progress<'_>) {}

/// A document that is extracted, chunked and embedded, ready for [`KnowledgeBase::commit`].
#[derive(Debug, Clone)]
pub struct PreparedDocument {
    pub(crate) model: ModelInfo,
    pub(crate) doc: StoredDocument,
    /// The knowledge base already holds this source with identical input bytes.
    pub(crate) unchanged: bool,
}

impl PreparedDocument {
    /// The source name.
    pub fn source(&self) -> &str {
        &self.doc.source
    }

    /// The title.
    pub fn title(&self) -> &str {
        &self.doc.title
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.doc.chunks.len()
    }
}

/// The outcome of ingesting a file or a directory.
#[derive(Debug, Default)]
pub struct IngestReport {
    /// Documents stored (or found unchanged).
    pub documents: Vec<IngestedDocument>,
    /// Files skipped, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Files that failed, with the error. Nothing else was affected by them.
    pub failed: Vec<(PathBuf, IngestError)>,
}

fn validate_source(source: &str) -> Result<(), IngestError> {
    let invalid = |reason| {
        Err(IngestError::InvalidSource {
            source_name: source.to_string(),
            reason,
        })
    };
    if source.trim().is_empty() {
        return invalid("it is empty");
    }
    if source.len() > MAX_SOURCE_BYTES {
        return invalid("it is longer than 4096 bytes");
    }
    if source.chars().any(char::is_control) {
        return invalid("it contains control characters");
    }
    Ok(())
}

/// The last path segment of a file path or URL, for titles.
fn display_name(source: &str) -> &str {
    let trimmed = source
        .split(['?', '#'])
        .next()
        .unwrap_or(source)
        .trim_end_matches('/');
    trimmed
        .rsplit(['/', '\\'])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(source)
}

fn clip_title(title: &str) -> String {
    let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
    if title.chars().count() > MAX_TITLE_CHARS {
        let mut t: String = title.chars().take(MAX_TITLE_CHARS - 1).collect();
        t.push('…');
        t
    } else {
        title
    }
}

impl KnowledgeBase {
    /// Extracts, chunks and embeds a document from bytes, e.g. a page the node fetched.
    /// `mime` is the Content-Type if known (`text/html; charset=...`); otherwise the type comes
    /// from the source name's extension, then from the bytes.
    pub fn prepare_bytes(
        &self,
        bytes: &[u8],
        source: &str,
        mime: Option<&str>,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<PreparedDocument, IngestError> {
        validate_source(source)?;
        let limit = self.options.max_document_bytes;
        if bytes.len() as u64 > limit {
            return Err(IngestError::TooLarge {
                source_name: source.to_string(),
                bytes: bytes.len() as u64,
                limit,
            });
        }
        let (from_mime, charset) = match mime {
            Some(m) => ContentType::from_mime(m),
            None => (None, None),
        };
        let kind = match (mime, from_mime) {
            (_, Some(kind)) => kind,
            (Some(m), None) if !m.trim().is_empty() && !is_generic_mime(m) => {
                return Err(IngestError::Unsupported {
                    source_name: source.to_string(),
                    kind: m.split(';').next().unwrap_or(m).trim().to_string(),
                });
            }
            _ => ContentType::sniff(bytes)
                .or_else(|| ContentType::from_path(Path::new(display_name(source))))
                .unwrap_or(ContentType::Text),
        };
        self.prepare_typed(bytes, source, kind, charset.as_deref(), progress)
    }

    fn prepare_typed(
        &self,
        bytes: &[u8],
        source: &str,
        kind: ContentType,
        charset: Option<&str>,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<PreparedDocument, IngestError> {
        let model = self.state.header.model.clone();
        let input_sha256: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(existing) = self.state.docs.get(source)
            && existing.input_sha256 == input_sha256
            && existing.content_type == kind
        {
            let doc = StoredDocument {
                source: source.to_string(),
                title: existing.title.to_string(),
                content_type: kind,
                input_sha256,
                text_bytes: existing.text_bytes,
                chunks: Vec::new(),
            };
            return Ok(PreparedDocument {
                model,
                doc,
                unchanged: true,
            });
        }
        let extract_err = |error: ExtractError| IngestError::Extract {
            source_name: source.to_string(),
            error,
        };
        let extracted = extract::extract(bytes, kind, charset).map_err(extract_err)?;
        let title = clip_title(
            extracted
                .title
                .as_deref()
                .unwrap_or_else(|| display_name(source)),
        );
        let pieces = chunk::split(
            &extracted.text,
            extracted.markdown,
            &self.state.header.chunking,
            self.embedder.as_ref(),
        )?;
        if pieces.is_empty() {
            return Err(extract_err(ExtractError::Empty));
        }
        let limit = self.options.max_chunks_per_document;
        if pieces.len() > limit {
            return Err(IngestError::TooManyChunks {
                source_name: source.to_string(),
                chunks: pieces.len(),
                limit,
            });
        }
        progress(Progress::Chunked {
            source,
            chunks: pieces.len(),
        });

        let dims = model.dimensions;
        let batch = self.options.embed_batch.max(1);
        let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(pieces.len());
        for group in pieces.chunks(batch) {
            let texts: Vec<&str> = group.iter().map(|p| p.text).collect();
            let out = self
                .embedder
                .embed(&texts)
                .map_err(|error| IngestError::Embed {
                    source_name: source.to_string(),
                    error,
                })?;
            if out.len() != texts.len() {
                return Err(IngestError::BadVector {
                    source_name: source.to_string(),
                    reason: format!("{} vectors for {} texts", out.len(), texts.len()),
                });
            }
            for v in out {
                check_vector(&v, dims).map_err(|reason| IngestError::BadVector {
                    source_name: source.to_string(),
                    reason,
                })?;
                vectors.push(v);
            }
            progress(Progress::Embedded {
                source,
                done: vectors.len(),
                total: pieces.len(),
            });
        }
        let chunks = pieces
            .iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (p, vector))| StoredChunk {
                id: 0,
                ordinal: i as u32,
                start: p.start as u64,
                end: (p.start + p.text.len()) as u64,
                heading: extracted.heading_at(p.start).map(clip_title),
                text: p.text.to_string(),
                vector,
            })
            .collect();
        let doc = StoredDocument {
            source: source.to_string(),
            title,
            content_type: kind,
            input_sha256,
            text_bytes: extracted.text.len() as u64,
            chunks,
        };
        Ok(PreparedDocument {
            model,
            doc,
            unchanged: false,
        })
    }

    /// Reads a file under `policy.root` and prepares it. The source name is the path relative to
    /// the root, with `/` separators.
    pub fn prepare_file(
        &self,
        path: &Path,
        policy: &IngestPolicy,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<PreparedDocument, IngestError> {
        let root = canonical_root(policy)?;
        let (canonical, source) = resolve_inside(path, &root)?;
        let kind = ContentType::from_path(&canonical);
        let bytes = read_limited(&canonical, &root, &source, self.options.max_document_bytes)?;
        let kind = match kind.or_else(|| ContentType::sniff(&bytes)) {
            Some(kind) => kind,
            None => ContentType::Text,
        };
        self.prepare_typed(&bytes, &source, kind, None, progress)
    }

    /// Stores a prepared document: acknowledged (durable) when this returns `Ok`.
    pub fn commit(&mut self, prepared: PreparedDocument) -> Result<IngestedDocument, IngestError> {
        if prepared.model != self.state.header.model {
            return Err(IngestError::WrongModel {
                prepared: Box::new(prepared.model),
                kb: Box::new(self.state.header.model.clone()),
            });
        }
        if prepared.unchanged {
            if let Some(existing) = self.state.docs.get(&prepared.doc.source)
                && existing.input_sha256 == prepared.doc.input_sha256
            {
                return Ok(IngestedDocument {
                    source: prepared.doc.source,
                    title: existing.title.to_string(),
                    content_type: existing.content_type,
                    chunks: existing.chunk_ids.len(),
                    replaced: false,
                    unchanged: true,
                });
            }
            return Err(IngestError::InvalidSource {
                source_name: prepared.doc.source,
                reason: "it changed while it was being prepared; ingest it again",
            });
        }
        for c in &prepared.doc.chunks {
            check_vector(&c.vector, prepared.model.dimensions).map_err(|reason| {
                IngestError::BadVector {
                    source_name: prepared.doc.source.clone(),
                    reason,
                }
            })?;
        }
        Ok(self.store_document(prepared.doc)?)
    }

    /// Prepares and stores a document from bytes (see [`KnowledgeBase::prepare_bytes`]).
    pub fn ingest_bytes(
        &mut self,
        bytes: &[u8],
        source: &str,
        mime: Option<&str>,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<IngestedDocument, IngestError> {
        progress(Progress::Started {
            index: 0,
            total: 1,
            source,
        });
        let prepared = self.prepare_bytes(bytes, source, mime, progress)?;
        let done = self.commit(prepared)?;
        progress(Progress::Stored { document: &done });
        Ok(done)
    }

    /// Ingests one file under `policy.root`.
    pub fn ingest_file(
        &mut self,
        path: &Path,
        policy: &IngestPolicy,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<IngestedDocument, IngestError> {
        let name = path.display().to_string();
        progress(Progress::Started {
            index: 0,
            total: 1,
            source: &name,
        });
        let prepared = self.prepare_file(path, policy, progress)?;
        let done = self.commit(prepared)?;
        progress(Progress::Stored { document: &done });
        Ok(done)
    }

    /// Ingests a file, or every supported file under a directory (recursively, symlinks followed
    /// only while they stay inside the root). A failing file is reported and the walk goes on;
    /// an index checkpoint is written at the end.
    pub fn ingest_path(
        &mut self,
        path: &Path,
        policy: &IngestPolicy,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<IngestReport, IngestError> {
        let root = canonical_root(policy)?;
        let (canonical, _) = resolve_inside(path, &root)?;
        let meta = fs::metadata(&canonical).map_err(|source| IngestError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let mut report = IngestReport::default();
        if meta.is_file() {
            report
                .documents
                .push(self.ingest_file(path, policy, progress)?);
            return Ok(report);
        }
        if !meta.is_dir() {
            return Err(IngestError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let files = walk(&canonical, &root, policy, &mut report, progress)?;
        progress(Progress::Discovered { files: files.len() });
        let total = files.len();
        for (index, file) in files.iter().enumerate() {
            let name = file
                .strip_prefix(&root)
                .unwrap_or(file)
                .to_string_lossy()
                .replace('\\', "/");
            progress(Progress::Started {
                index,
                total,
                source: &name,
            });
            let result = self
                .prepare_file(file, policy, progress)
                .and_then(|p| self.commit(p));
            match result {
                Ok(done) => {
                    progress(Progress::Stored { document: &done });
                    report.documents.push(done);
                }
                Err(error) => {
                    progress(Progress::Failed {
                        path: file,
                        error: &error,
                    });
                    // A storage failure affects every later file too: stop.
                    if matches!(error, IngestError::Store(_)) {
                        return Err(error);
                    }
                    report.failed.push((file.clone(), error));
                }
            }
        }
        if report.documents.iter().any(|d| !d.unchanged) {
            self.checkpoint()?;
        }
        Ok(report)
    }
}

/// MIME types that say nothing about the content, so the bytes decide.
fn is_generic_mime(mime: &str) -> bool {
    let essence = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "application/octet-stream" | "binary/octet-stream" | "text/x-unknown"
    )
}

/// Checks an embedder's output.
pub(crate) fn check_vector(v: &[f32], dims: usize) -> Result<(), String> {
    if v.len() != dims {
        return Err(format!("it has {} dimensions, expected {dims}", v.len()));
    }
    if let Some(x) = v.iter().find(|x| !x.is_finite()) {
        return Err(format!("it contains the non-finite value {x}"));
    }
    if v.iter().all(|x| *x == 0.0) {
        return Err("it is all zeros".to_string());
    }
    Ok(())
}

fn canonical_root(policy: &IngestPolicy) -> Result<PathBuf, IngestError> {
    policy
        .root
        .canonicalize()
        .map_err(|source| IngestError::Unreadable {
            path: policy.root.clone(),
            source,
        })
}

/// Resolves `path` (relative paths are taken relative to the root) and checks that it stays
/// inside `root`. Returns the canonical path and the source name.
fn resolve_inside(path: &Path, root: &Path) -> Result<(PathBuf, String), IngestError> {
    let joined = if path.is_relative() {
        root.join(path)
    } else {
        path.to_path_buf()
    };
    let canonical = joined
        .canonicalize()
        .map_err(|source| IngestError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
    let Ok(relative) = canonical.strip_prefix(root) else {
        return Err(IngestError::OutsideRoot {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        });
    };
    let mut source = relative.to_string_lossy().replace('\\', "/");
    if source.is_empty() {
        source = canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    Ok((canonical, source))
}

/// Reads at most `limit` bytes of a regular file, re-checking after opening that the opened file
/// is still inside the root (a path component may have been swapped for a symlink meanwhile).
fn read_limited(
    path: &Path,
    root: &Path,
    source: &str,
    limit: u64,
) -> Result<Vec<u8>, IngestError> {
    let unreadable = |e| IngestError::Unreadable {
        path: path.to_path_buf(),
        source: e,
    };
    let file = File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(IngestError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Ok(real) = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            && !real.starts_with(root)
        {
            return Err(IngestError::OutsideRoot {
                path: path.to_path_buf(),
                root: root.to_path_buf(),
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = root;
    if meta.len() > limit {
        return Err(IngestError::TooLarge {
            source_name: source.to_string(),
            bytes: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > limit {
        return Err(IngestError::TooLarge {
            source_name: source.to_string(),
            bytes: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Collects the supported files under `dir`, sorted, following symlinks that stay inside `root`.
fn walk(
    dir: &Path,
    root: &Path,
    policy: &IngestPolicy,
    report: &mut IngestReport,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<PathBuf>, IngestError> {
    let mut files = Vec::new();
    let mut visited = std::collections::HashSet::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    visited.insert(dir.to_path_buf());
    while let Some((current, depth)) = stack.pop() {
        let entries = match fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(source) => {
                if current == dir {
                    return Err(IngestError::Unreadable {
                        path: current,
                        source,
                    });
                }
                let error = IngestError::Unreadable {
                    path: current.clone(),
                    source,
                };
                progress(Progress::Failed {
                    path: &current,
                    error: &error,
                });
                report.failed.push((current, error));
                continue;
            }
        };
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden && !policy.include_hidden {
                continue;
            }
            let canonical = match path.canonicalize() {
                Ok(c) => c,
                Err(source) => {
                    let error = IngestError::Unreadable {
                        path: path.clone(),
                        source,
                    };
                    progress(Progress::Failed {
                        path: &path,
                        error: &error,
                    });
                    report.failed.push((path, error));
                    continue;
                }
            };
            if !canonical.starts_with(root) {
                let error = IngestError::OutsideRoot {
                    path: path.clone(),
                    root: root.to_path_buf(),
                };
                progress(Progress::Failed {
                    path: &path,
                    error: &error,
                });
                report.failed.push((path, error));
                continue;
            }
            let meta = match fs::metadata(&canonical) {
                Ok(m) => m,
                Err(source) => {
                    let error = IngestError::Unreadable {
                        path: path.clone(),
                        source,
                    };
                    progress(Progress::Failed {
                        path: &path,
                        error: &error,
                    });
                    report.failed.push((path, error));
                    continue;
                }
            };
            if meta.is_dir() {
                if depth + 1 > policy.max_depth {
                    let reason = "deeper than the directory depth limit";
                    progress(Progress::Skipped {
                        path: &path,
                        reason,
                    });
                    report.skipped.push((path, reason.to_string()));
                } else if visited.insert(canonical.clone()) {
                    stack.push((canonical, depth + 1));
                }
            } else if meta.is_file() {
                if ContentType::from_path(&canonical).is_some() {
                    if files.len() >= policy.max_files {
                        return Err(IngestError::TooManyFiles {
                            path: dir.to_path_buf(),
                            limit: policy.max_files,
                        });
                    }
                    files.push(canonical);
                } else {
                    let reason = "unsupported file type";
                    progress(Progress::Skipped {
                        path: &path,
                        reason,
                    });
                    report.skipped.push((path, reason.to_string()));
                }
            } else {
                let reason = "not a regular file";
                progress(Progress::Skipped {
                    path: &path,
                    reason,
                });
                report.skipped.push((path, reason.to_string()));
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_come_from_paths_and_urls() {
        assert_eq!(display_name("docs/intro.md"), "intro.md");
        assert_eq!(
            display_name("https://example.org/a/b.html?x=1#top"),
            "b.html"
        );
        assert_eq!(display_name("https://example.org/"), "example.org");
        assert_eq!(display_name("plain"), "plain");
    }

    #[test]
    fn source_names_are_validated() {
        assert!(validate_source("ok.md").is_ok());
        assert!(validate_source("  ").is_err());
        assert!(validate_source("a\nb").is_err());
        assert!(validate_source(&"x".repeat(MAX_SOURCE_BYTES + 1)).is_err());
    }

    #[test]
    fn vectors_are_checked() {
        assert!(check_vector(&[0.1, 0.2], 2).is_ok());
        assert!(check_vector(&[0.1], 2).is_err());
        assert!(check_vector(&[f32::NAN, 0.2], 2).is_err());
        assert!(check_vector(&[0.0, 0.0], 2).is_err());
    }

    #[test]
    fn titles_are_clipped_and_whitespace_collapsed() {
        assert_eq!(clip_title(" a \n b "), "a b");
        let long = "x".repeat(500);
        assert_eq!(clip_title(&long).chars().count(), MAX_TITLE_CHARS);
    }
}
