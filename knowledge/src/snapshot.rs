//! Snapshots: a whole knowledge base in one tar archive, to publish and to import elsewhere.
//!
//! The archive holds `manifest.json` ([`SnapshotManifest`]: KB hash, canonical core, sha256 of
//! every other file) followed by `documents.log`: a canonical chunk log (documents sorted by
//! source, chunk ids and sequence numbers renumbered from 1, zero log id), so the same content
//! gives the same archive bytes. The HNSW graph is not shipped: it is not deterministic, and
//! rebuilding it from the verified vectors means the KB hash covers everything that is served.
//!
//! Import verifies the digest of every file, every record checksum, every document digest and
//! the KB hash before it replaces anything; the current knowledge base stays untouched until the
//! new log is complete and fsynced, and then it is switched by one atomic rename.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use gaia_protocol::hash::ContentHash;
use memmap2::Mmap;
use sha2::{Digest, Sha256};

use crate::embedder::ModelInfo;
use crate::error::{SnapshotError, StoreError};
use crate::fsutil;
use crate::ingest::check_vector;
use crate::kb::{KnowledgeBase, LOG_FILE, store_io};
use crate::log::{self, LogHeader, RecordKind};
use crate::manifest::{KB_FORMAT, SnapshotFile, SnapshotManifest, content_digest, document_digest};

/// Name of the manifest inside an archive.
pub const SNAPSHOT_MANIFEST: &str = "manifest.json";
/// Name of the canonical chunk log inside an archive.
pub const SNAPSHOT_LOG: &str = "documents.log";
/// Largest manifest accepted.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// What an export or import produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The archive.
    pub path: PathBuf,
    /// The KB hash.
    pub hash: ContentHash,
    /// Number of documents.
    pub documents: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// The embedding model.
    pub model: ModelInfo,
    /// Size of the archive in bytes.
    pub archive_bytes: u64,
}

/// Deletes a temporary file when dropped, unless disarmed.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes through to a file while hashing.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn tar_header(name: &str, size: u64) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

impl KnowledgeBase {
    /// Writes the knowledge base to one archive at `path` (atomically: a crash leaves either no
    /// archive or a complete one).
    pub fn export_snapshot(&self, path: &Path) -> Result<SnapshotInfo, SnapshotError> {
        if let Some(reason) = &self.state.poisoned {
            return Err(StoreError::Poisoned(reason.clone()).into());
        }
        let io_err = |action: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| SnapshotError::Io {
                action,
                path: p,
                source,
            }
        };
        let log_tmp = TempFile(Some(fsutil::temp_path_for(path)));
        let archive_tmp = TempFile(Some(fsutil::temp_path_for(path)));

        // 1. The canonical log.
        let header = LogHeader {
            log_id: [0; 16],
            model: self.state.header.model.clone(),
            chunking: self.state.header.chunking.clone(),
        };
        let log_path = self.dir.join(LOG_FILE);
        let mut reader = File::open(&log_path).map_err(store_io("read", &log_path))?;
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(log_tmp.path())
            .map_err(io_err("create", log_tmp.path()))?;
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, out),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let head =
            log::frame(RecordKind::Header, 0, &log::encode_header(&header)).unwrap_or_default();
        w.write_all(&head)
            .map_err(io_err("write", log_tmp.path()))?;
        let mut next_id = 1u64;
        for (seq, (source, entry)) in self.state.docs.iter().enumerate() {
            let mut doc = self.read_document(&mut reader, source)?;
            for c in &mut doc.chunks {
                c.id = next_id;
                next_id += 1;
            }
            let payload = log::encode_put(&doc, &entry.digest);
            let frame = log::frame(RecordKind::Put, seq as u64 + 1, &payload).ok_or_else(|| {
                StoreError::RecordTooLarge {
                    source_name: source.clone(),
                    bytes: payload.len(),
                }
            })?;
            w.write_all(&frame)
                .map_err(io_err("write", log_tmp.path()))?;
        }
        let log_sha: [u8; 32] = w.hasher.clone().finalize().into();
        let log_bytes = w.bytes;
        let file = w
            .inner
            .into_inner()
            .map_err(|e| io_err("write", log_tmp.path())(e.into_error()))?;
        file.sync_all().map_err(io_err("sync", log_tmp.path()))?;
        drop(file);

        // 2. The manifest.
        let core = self.manifest_core();
        let hash = core.hash();
        let manifest = SnapshotManifest {
            kb_hash: hash.to_hex(),
            core: core.clone(),
            files: vec![SnapshotFile {
                name: SNAPSHOT_LOG.to_string(),
                bytes: log_bytes,
                sha256: hex::encode(log_sha),
            }],
            created_by: format!("gaia-knowledge {}", env!("CARGO_PKG_VERSION")),
        };
        let manifest_json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();

        // 3. The archive, with fixed metadata so that equal content gives equal bytes.
        let archive_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(archive_tmp.path())
            .map_err(io_err("create", archive_tmp.path()))?;
        let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, archive_file));
        let tar_result = (|| -> io::Result<BufWriter<File>> {
            builder.append(
                &tar_header(SNAPSHOT_MANIFEST, manifest_json.len() as u64)?,
                manifest_json.as_slice(),
            )?;
            let log_file = File::open(log_tmp.path())?;
            builder.append(&tar_header(SNAPSHOT_LOG, log_bytes)?, log_file)?;
            builder.into_inner()
        })();
        let buffered = tar_result.map_err(io_err("write", archive_tmp.path()))?;
        let archive_file = buffered
            .into_inner()
            .map_err(|e| io_err("write", archive_tmp.path())(e.into_error()))?;
        archive_file
            .sync_all()
            .map_err(io_err("sync", archive_tmp.path()))?;
        let archive_bytes = archive_file
            .metadata()
            .map_err(io_err("read", archive_tmp.path()))?
            .len();
        drop(archive_file);
        fsutil::durable_rename(archive_tmp.path(), path)
            .map_err(io_err("move the archive to", path))?;
        let mut archive_tmp = archive_tmp;
        archive_tmp.0 = None;
        Ok(SnapshotInfo {
            path: path.to_path_buf(),
            hash,
            documents: core.documents,
            chunks: core.chunks,
            model: core.model,
            archive_bytes,
        })
    }

    /// Replaces the content of this knowledge base with a snapshot, after verifying it entirely:
    /// file digests, record checksums, document digests, the KB hash (and `expected`, if given)
    /// and that it was built with this knowledge base's embedding model. On any failure the
    /// knowledge base is left as it was.
    pub fn import_snapshot(
        &mut self,
        archive: &Path,
        expected: Option<&ContentHash>,
    ) -> Result<SnapshotInfo, SnapshotError> {
        if let Some(reason) = &self.state.poisoned {
            return Err(StoreError::Poisoned(reason.clone()).into());
        }
        let not_snapshot = |reason: String| SnapshotError::NotASnapshot {
            path: archive.to_path_buf(),
            reason,
        };
        let corrupt = |reason: String| SnapshotError::Corrupt {
            path: archive.to_path_buf(),
            reason,
        };
        let file = File::open(archive).map_err(|source| SnapshotError::Io {
            action: "open",
            path: archive.to_path_buf(),
            source,
        })?;
        let archive_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut tar = tar::Archive::new(file);
        let entries = tar
            .entries()
            .map_err(|e| not_snapshot(format!("unreadable archive ({e})")))?;

        let mut manifest: Option<SnapshotManifest> = None;
        let staged = TempFile(Some(self.dir.join(format!(
            ".import-{}{}",
            hex::encode(fsutil::unique_id()),
            fsutil::TMP_SUFFIX
        ))));
        let mut staged_ok = false;
        for entry in entries {
            let mut entry = entry.map_err(|e| not_snapshot(format!("unreadable archive ({e})")))?;
            let name = entry
                .path()
                .map_err(|e| not_snapshot(format!("unreadable entry name ({e})")))?
                .to_string_lossy()
                .into_owned();
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(not_snapshot(format!("entry {name} is not a regular file")));
            }
            match (name.as_str(), &manifest) {
                (SNAPSHOT_MANIFEST, None) => {
                    let m = read_manifest_entry(&mut entry, archive)?;
                    self.check_manifest(&m, archive, expected)?;
                    manifest = Some(m);
                }
                (SNAPSHOT_LOG, Some(m)) if !staged_ok => {
                    let declared =
                        m.files
                            .iter()
                            .find(|f| f.name == SNAPSHOT_LOG)
                            .ok_or_else(|| {
                                not_snapshot(format!("the manifest does not list {SNAPSHOT_LOG}"))
                            })?;
                    let size = entry
                        .header()
                        .size()
                        .map_err(|e| not_snapshot(e.to_string()))?;
                    if size != declared.bytes {
                        return Err(corrupt(format!(
                            "{SNAPSHOT_LOG} has {size} bytes, the manifest says {}",
                            declared.bytes
                        )));
                    }
                    let out = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(staged.path())
                        .map_err(|source| SnapshotError::Io {
                            action: "create",
                            path: staged.path().to_path_buf(),
                            source,
                        })?;
                    let mut w = HashingWriter {
                        inner: BufWriter::with_capacity(1 << 20, out),
                        hasher: Sha256::new(),
                        bytes: 0,
                    };
                    io::copy(&mut (&mut entry).take(declared.bytes + 1), &mut w)
                        .map_err(|e| not_snapshot(format!("unreadable {SNAPSHOT_LOG} ({e})")))?;
                    w.flush().map_err(|source| SnapshotError::Io {
                        action: "write",
                        path: staged.path().to_path_buf(),
                        source,
                    })?;
                    let actual = hex::encode(w.hasher.finalize());
                    if w.bytes != declared.bytes || actual != declared.sha256 {
                        return Err(SnapshotError::DigestMismatch {
                            path: archive.to_path_buf(),
                            file: SNAPSHOT_LOG.to_string(),
                            expected: declared.sha256.clone(),
                            actual,
                        });
                    }
                    staged_ok = true;
                }
                _ => return Err(not_snapshot(format!("unexpected entry {name}"))),
            }
        }
        let manifest =
            manifest.ok_or_else(|| not_snapshot(format!("it has no {SNAPSHOT_MANIFEST}")))?;
        if !staged_ok {
            return Err(not_snapshot(format!("it has no {SNAPSHOT_LOG}")));
        }
        if manifest.files.len() != 1 {
            return Err(not_snapshot(
                "the manifest lists files the archive does not hold".into(),
            ));
        }

        // Verify the content and write the new local log beside the current one.
        let new_log = TempFile(Some(
            self.dir
                .join(format!(".{LOG_FILE}.import{}", fsutil::TMP_SUFFIX)),
        ));
        verify_and_restage(staged.path(), new_log.path(), &manifest).map_err(|e| match e {
            Restage::Corrupt(reason) => corrupt(reason),
            Restage::Io(source, path) => SnapshotError::Io {
                action: "write",
                path,
                source,
            },
        })?;

        // Switch: one atomic rename; the old checkpoint no longer matches the new log id, so the
        // index is rebuilt from the verified vectors.
        let log_path = self.dir.join(LOG_FILE);
        fsutil::durable_rename(new_log.path(), &log_path)
            .map_err(store_io("replace the chunk log with", new_log.path()))?;
        let mut new_log = new_log;
        new_log.0 = None;
        if let Err(e) = self.reload() {
            self.state.poisoned = Some(format!("loading the imported snapshot failed: {e}"));
            return Err(
                StoreError::Poisoned(format!("loading the imported snapshot failed: {e}")).into(),
            );
        }
        let hash = self.hash();
        Ok(SnapshotInfo {
            path: archive.to_path_buf(),
            hash,
            documents: manifest.core.documents,
            chunks: manifest.core.chunks,
            model: manifest.core.model,
            archive_bytes,
        })
    }

    fn check_manifest(
        &self,
        m: &SnapshotManifest,
        archive: &Path,
        expected: Option<&ContentHash>,
    ) -> Result<(), SnapshotError> {
        if m.core.format != KB_FORMAT {
            return Err(SnapshotError::NotASnapshot {
                path: archive.to_path_buf(),
                reason: format!(
                    "unsupported format {:?} (this build reads {KB_FORMAT})",
                    m.core.format
                ),
            });
        }
        let kb = &self.state.header.model;
        if m.core.model != *kb {
            return Err(SnapshotError::ModelMismatch {
                path: archive.to_path_buf(),
                snapshot: Box::new(m.core.model.clone()),
                kb: Box::new(kb.clone()),
                snapshot_id: m.core.model.id.clone(),
            });
        }
        let computed = m.core.hash().to_hex();
        if computed != m.kb_hash {
            return Err(SnapshotError::HashMismatch {
                path: archive.to_path_buf(),
                expected: m.kb_hash.clone(),
                actual: computed,
            });
        }
        if let Some(expected) = expected
            && expected.to_hex() != m.kb_hash
        {
            return Err(SnapshotError::HashMismatch {
                path: archive.to_path_buf(),
                expected: expected.to_hex(),
                actual: m.kb_hash.clone(),
            });
        }
        Ok(())
    }
}

fn read_manifest_entry(
    entry: &mut impl Read,
    archive: &Path,
) -> Result<SnapshotManifest, SnapshotError> {
    let mut bytes = Vec::new();
    entry
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SnapshotError::NotASnapshot {
            path: archive.to_path_buf(),
            reason: format!("unreadable {SNAPSHOT_MANIFEST} ({e})"),
        })?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(SnapshotError::NotASnapshot {
            path: archive.to_path_buf(),
            reason: format!("{SNAPSHOT_MANIFEST} is larger than 1 MiB"),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| SnapshotError::NotASnapshot {
        path: archive.to_path_buf(),
        reason: format!("{SNAPSHOT_MANIFEST} is malformed ({e})"),
    })
}

/// Reads the manifest of a snapshot archive without importing it.
pub fn read_snapshot_manifest(archive: &Path) -> Result<SnapshotManifest, SnapshotError> {
    let file = File::open(archive).map_err(|source| SnapshotError::Io {
        action: "open",
        path: archive.to_path_buf(),
        source,
    })?;
    let mut tar = tar::Archive::new(file);
    let not_snapshot = |reason: String| SnapshotError::NotASnapshot {
        path: archive.to_path_buf(),
        reason,
    };
    let mut entries = tar
        .entries()
        .map_err(|e| not_snapshot(format!("unreadable archive ({e})")))?;
    let mut entry = entries
        .next()
        .ok_or_else(|| not_snapshot("the archive is empty".into()))?
        .map_err(|e| not_snapshot(format!("unreadable archive ({e})")))?;
    let name = entry
        .path()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != SNAPSHOT_MANIFEST {
        return Err(not_snapshot(format!(
            "its first entry is {name}, not {SNAPSHOT_MANIFEST}"
        )));
    }
    read_manifest_entry(&mut entry, archive)
}

enum Restage {
    Corrupt(String),
    Io(io::Error, PathBuf),
}

/// Checks every record of the staged canonical log against the manifest and writes a local log
/// (same records, fresh log id) to `target`, fsynced.
fn verify_and_restage(
    staged: &Path,
    target: &Path,
    manifest: &SnapshotManifest,
) -> Result<(), Restage> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Restage::Io(e, p)
    };
    let file = File::open(staged).map_err(io(staged))?;
    let len = file.metadata().map_err(io(staged))?.len();
    if len == 0 {
        return Err(Restage::Corrupt(format!("{SNAPSHOT_LOG} is empty")));
    }
    // SAFETY: the staged file is private to this call (a fresh name in the locked KB directory)
    // and is not modified while mapped.
    let map = unsafe { Mmap::map(&file) }.map_err(io(staged))?;
    let scan = log::scan(&map).map_err(|e| Restage::Corrupt(format!("{SNAPSHOT_LOG}: {e}")))?;
    if !scan.damaged.is_empty() || scan.valid_len != len {
        return Err(Restage::Corrupt(format!(
            "{SNAPSHOT_LOG} has damaged records"
        )));
    }
    let core = &manifest.core;
    if scan.header.model != core.model || scan.header.chunking != core.chunking {
        return Err(Restage::Corrupt(format!(
            "the header of {SNAPSHOT_LOG} disagrees with the manifest"
        )));
    }
    let dims = core.model.dimensions;
    let mut digests: Vec<(String, [u8; 32])> = Vec::with_capacity(scan.records.len());
    let mut ids = HashSet::new();
    let mut chunks = 0u64;
    for (i, r) in scan.records.iter().enumerate() {
        if r.kind != RecordKind::Put || r.seq != i as u64 + 1 {
            return Err(Restage::Corrupt(format!(
                "record {} of {SNAPSHOT_LOG} is not canonical",
                i + 1
            )));
        }
        let (doc, stored) = log::decode_put_with_digest(r.payload, dims, true)
            .map_err(|e| Restage::Corrupt(format!("record {}: {e}", r.seq)))?;
        if digests
            .last()
            .is_some_and(|(prev, _)| prev.as_str() >= doc.source.as_str())
        {
            return Err(Restage::Corrupt(format!(
                "documents are not sorted by source at {}",
                doc.source
            )));
        }
        let digest = document_digest(&doc);
        if digest != stored {
            return Err(Restage::Corrupt(format!(
                "the content of {} does not match its digest",
                doc.source
            )));
        }
        for c in &doc.chunks {
            if !ids.insert(c.id) {
                return Err(Restage::Corrupt(format!("chunk id {} is used twice", c.id)));
            }
            if c.end > doc.text_bytes || c.end < c.start {
                return Err(Restage::Corrupt(format!(
                    "a chunk of {} has invalid offsets",
                    doc.source
                )));
            }
            check_vector(&c.vector, dims)
                .map_err(|e| Restage::Corrupt(format!("a vector of {}: {e}", doc.source)))?;
        }
        chunks += doc.chunks.len() as u64;
        digests.push((doc.source, digest));
    }
    let content = hex::encode(content_digest(digests.iter().map(|(s, d)| (s.as_str(), d))));
    if digests.len() as u64 != core.documents
        || chunks != core.chunks
        || content != core.content_sha256
    {
        return Err(Restage::Corrupt(format!(
            "the content ({} documents, {chunks} chunks, digest {content}) does not match the \
             manifest ({} documents, {} chunks, digest {})",
            digests.len(),
            core.documents,
            core.chunks,
            core.content_sha256
        )));
    }

    // The local log: a fresh id, the verified records unchanged.
    let header = LogHeader {
        log_id: fsutil::unique_id(),
        ..scan.header.clone()
    };
    let records: Vec<(u64, RecordKind, &[u8])> = scan
        .records
        .iter()
        .map(|r| (r.seq, r.kind, r.payload))
        .collect();
    log::write_log_unplaced(target, &header, records).map_err(io(target))?;
    Ok(())
}
