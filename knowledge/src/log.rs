//! The chunk log: the single source of truth of a knowledge base.
//!
//! An append-only file of checksummed records. The first record is a header (model, chunking
//! parameters, a random log id); each later record either puts a whole document (all its chunks,
//! texts and vectors) or removes a source. A record is appended and fsynced before the operation
//! is acknowledged, so an acknowledged document survives `kill -9` and power loss, and since one
//! record holds a whole document, a document is either entirely visible or not at all.
//!
//! Frame: `magic ff 'G' 'K' fe | kind u8 | 3 zero bytes | seq u64 | len u32 | sha256 | payload`, the
//! sha256 covering kind, seq, len and payload. On open, a torn tail (a crash during an append) is
//! cut off; a damaged record in the middle (media damage) is skipped by searching for the next
//! valid frame, and reported.
//!
//! Why a log of our own rather than an embedded database (sled, redb, SQLite): a knowledge base
//! has one writer, writes whole documents and never updates a chunk in place, so an append-only
//! file with one checksummed record per document gives atomic replacement and durability with a
//! single `fdatasync` per document and no extra dependency; the same file carries the vectors,
//! so it is also what the vector index is rebuilt from, and a canonical rewrite of it is the
//! snapshot format. Superseded records are reclaimed by compaction (a rewrite and an atomic
//! rename).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::chunk::{ChunkingParams, SizeUnit};
use crate::codec::{DecodeError, Decoder, Encoder};
use crate::embedder::ModelInfo;
use crate::extract::ContentType;
use crate::fsutil;

/// Starts every frame. 0xff and 0xfe never occur in UTF-8, so no document text can contain a
/// forged frame that a recovery scan would mistake for a record.
const MAGIC: [u8; 4] = [0xff, b'G', b'K', 0xfe];
/// Bytes before the payload.
pub(crate) const FRAME_HEADER: usize = 4 + 1 + 3 + 8 + 4 + 32;
/// Version of the header and record payload formats.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordKind {
    Header = 1,
    Put = 2,
    Remove = 3,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Header),
            2 => Some(Self::Put),
            3 => Some(Self::Remove),
            _ => None,
        }
    }
}

/// The first record: what every vector in the log was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogHeader {
    /// Changes whenever the log is rewritten (compaction, import); index checkpoints name it.
    pub(crate) log_id: [u8; 16],
    pub(crate) model: ModelInfo,
    pub(crate) chunking: ChunkingParams,
}

/// One chunk as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredChunk {
    /// Key in the vector index; unique over the life of the knowledge base.
    pub(crate) id: u64,
    pub(crate) ordinal: u32,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) heading: Option<String>,
    pub(crate) text: String,
    /// Empty when decoded without vectors.
    pub(crate) vector: Vec<f32>,
}

/// One document as stored: all its chunks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredDocument {
    pub(crate) source: String,
    pub(crate) title: String,
    pub(crate) content_type: ContentType,
    /// sha256 of the bytes that were ingested, to skip unchanged re-ingests.
    pub(crate) input_sha256: [u8; 32],
    /// Length of the extracted text the offsets point into.
    pub(crate) text_bytes: u64,
    pub(crate) chunks: Vec<StoredChunk>,
}

/// A damaged log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogError {
    #[error("the log header is missing or damaged")]
    BadHeader,
    #[error("the log header is from an unsupported format version {0}")]
    UnsupportedVersion(u32),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

fn checksum(kind: u8, seq: u64, len: u32, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([kind]);
    h.update(seq.to_le_bytes());
    h.update(len.to_le_bytes());
    h.update(payload);
    h.finalize().into()
}

/// A complete frame around `payload`. Fails if the payload exceeds [`MAX_PAYLOAD`].
pub(crate) fn frame(kind: RecordKind, seq: u64, payload: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(payload.len()).ok()?;
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(kind as u8, seq, len, payload));
    out.extend_from_slice(payload);
    Some(out)
}

/// Parses one frame at the start of `bytes`: `(kind, seq, payload, frame length)`.
fn parse_frame(bytes: &[u8]) -> Option<(RecordKind, u64, &[u8], usize)> {
    if bytes.len() < FRAME_HEADER || bytes[..4] != MAGIC || bytes[5..8] != [0, 0, 0] {
        return None;
    }
    let kind_byte = bytes[4];
    let kind = RecordKind::from_u8(kind_byte)?;
    let seq = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    let sum: [u8; 32] = bytes[20..52].try_into().ok()?;
    let end = FRAME_HEADER.checked_add(len as usize)?;
    if bytes.len() < end {
        return None;
    }
    let payload = &bytes[FRAME_HEADER..end];
    (checksum(kind_byte, seq, len, payload) == sum).then_some((kind, seq, payload, end))
}

/// The payload of `bytes` if it is exactly one valid frame.
pub(crate) fn frame_payload(bytes: &[u8]) -> Option<&[u8]> {
    match parse_frame(bytes) {
        Some((_, _, payload, len)) if len == bytes.len() => Some(payload),
        _ => None,
    }
}

pub(crate) fn encode_header(h: &LogHeader) -> Vec<u8> {
    let mut e = Encoder::with_capacity(256);
    e.u32(FORMAT_VERSION);
    e.bytes(&h.log_id);
    e.str(&h.model.id);
    e.str(&h.model.digest);
    e.u32(u32::try_from(h.model.dimensions).unwrap_or(u32::MAX));
    e.u8(h.chunking.unit.code());
    e.u32(u32::try_from(h.chunking.max_size).unwrap_or(u32::MAX));
    e.u32(u32::try_from(h.chunking.overlap).unwrap_or(u32::MAX));
    e.str(&h.chunking.splitter);
    e.finish()
}

pub(crate) fn decode_header(payload: &[u8]) -> Result<LogHeader, LogError> {
    let mut d = Decoder::new(payload);
    let version = d.u32("format version")?;
    if version != FORMAT_VERSION {
        return Err(LogError::UnsupportedVersion(version));
    }
    let log_id = d.array::<16>("log id")?;
    let id = d.str("model id")?.to_string();
    let digest = d.str("model digest")?.to_string();
    let dimensions = d.u32("dimensions")? as usize;
    let unit = SizeUnit::from_code(d.u8("size unit")?).ok_or(DecodeError::Invalid("size unit"))?;
    let max_size = d.u32("chunk size")? as usize;
    let overlap = d.u32("chunk overlap")? as usize;
    let splitter = d.str("splitter")?.to_string();
    d.finish()?;
    if dimensions == 0 || max_size == 0 || overlap >= max_size {
        return Err(LogError::BadHeader);
    }
    Ok(LogHeader {
        log_id,
        model: ModelInfo {
            id,
            digest,
            dimensions,
        },
        chunking: ChunkingParams {
            unit,
            max_size,
            overlap,
            splitter,
        },
    })
}

/// The payload of a put record; `digest` is the document digest (see [`crate::manifest`]).
pub(crate) fn encode_put(doc: &StoredDocument, digest: &[u8; 32]) -> Vec<u8> {
    let size: usize = doc
        .chunks
        .iter()
        .map(|c| 40 + c.text.len() + c.heading.as_ref().map_or(0, |h| h.len()) + c.vector.len() * 4)
        .sum();
    let mut e = Encoder::with_capacity(size + doc.source.len() + doc.title.len() + 64);
    e.str(&doc.source);
    e.str(&doc.title);
    e.u8(doc.content_type.code());
    e.bytes(&doc.input_sha256);
    e.bytes(digest);
    e.u64(doc.text_bytes);
    e.u32(u32::try_from(doc.chunks.len()).unwrap_or(u32::MAX));
    for c in &doc.chunks {
        e.u64(c.id);
        e.u32(c.ordinal);
        e.u64(c.start);
        e.u64(c.end);
        e.opt_str(c.heading.as_deref());
        e.str(&c.text);
        e.f32s(&c.vector);
    }
    e.finish()
}

/// Decodes a put record; vectors are skipped (left empty) unless `with_vectors`.
pub(crate) fn decode_put(
    payload: &[u8],
    dims: usize,
    with_vectors: bool,
) -> Result<StoredDocument, DecodeError> {
    decode_put_with_digest(payload, dims, with_vectors).map(|(doc, _)| doc)
}

/// Decodes a put record and the document digest stored in it.
pub(crate) fn decode_put_with_digest(
    payload: &[u8],
    dims: usize,
    with_vectors: bool,
) -> Result<(StoredDocument, [u8; 32]), DecodeError> {
    let mut d = Decoder::new(payload);
    let source = d.str("source")?.to_string();
    let title = d.str("title")?.to_string();
    let content_type = ContentType::from_code(d.u8("content type")?)
        .ok_or(DecodeError::Invalid("content type"))?;
    let input_sha256 = d.array::<32>("input digest")?;
    let digest = d.array::<32>("document digest")?;
    let text_bytes = d.u64("text length")?;
    let n = d.u32("chunk count")? as usize;
    // Each chunk takes at least 33 bytes plus its vector: bound the allocation by the input.
    let min_chunk = 33 + dims * 4;
    if n.saturating_mul(min_chunk) > d.remaining() {
        return Err(DecodeError::Truncated("chunks"));
    }
    let mut chunks = Vec::with_capacity(n);
    for _ in 0..n {
        let id = d.u64("chunk id")?;
        let ordinal = d.u32("chunk ordinal")?;
        let start = d.u64("chunk start")?;
        let end = d.u64("chunk end")?;
        let heading = d.opt_str("chunk heading")?.map(str::to_string);
        let text = d.str("chunk text")?.to_string();
        let vector = if with_vectors {
            d.f32s(dims, "vector")?
        } else {
            d.array_skip(dims * 4)?;
            Vec::new()
        };
        if end < start {
            return Err(DecodeError::Invalid("chunk offsets"));
        }
        chunks.push(StoredChunk {
            id,
            ordinal,
            start,
            end,
            heading,
            text,
            vector,
        });
    }
    d.finish()?;
    Ok((
        StoredDocument {
            source,
            title,
            content_type,
            input_sha256,
            text_bytes,
            chunks,
        },
        digest,
    ))
}

/// The chunk ids of a put record, without decoding texts into owned strings.
pub(crate) fn put_chunk_ids(
    payload: &[u8],
    dims: usize,
) -> Result<(String, Vec<u64>), DecodeError> {
    let mut d = Decoder::new(payload);
    let source = d.str("source")?.to_string();
    d.str("title")?;
    d.u8("content type")?;
    d.array::<32>("input digest")?;
    d.array::<32>("document digest")?;
    d.u64("text length")?;
    let n = d.u32("chunk count")? as usize;
    if n.saturating_mul(33 + dims * 4) > d.remaining() {
        return Err(DecodeError::Truncated("chunks"));
    }
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(d.u64("chunk id")?);
        d.u32("chunk ordinal")?;
        d.u64("chunk start")?;
        d.u64("chunk end")?;
        d.opt_str("chunk heading")?;
        d.str("chunk text")?;
        d.array_skip(dims * 4)?;
    }
    d.finish()?;
    Ok((source, ids))
}

pub(crate) fn encode_remove(source: &str) -> Vec<u8> {
    let mut e = Encoder::default();
    e.str(source);
    e.finish()
}

pub(crate) fn decode_remove(payload: &[u8]) -> Result<String, DecodeError> {
    let mut d = Decoder::new(payload);
    let source = d.str("source")?.to_string();
    d.finish()?;
    Ok(source)
}

/// A valid record found by [`scan`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordRef<'a> {
    pub(crate) kind: RecordKind,
    pub(crate) seq: u64,
    pub(crate) offset: u64,
    pub(crate) frame_len: u64,
    pub(crate) payload: &'a [u8],
}

/// The result of reading a whole log.
#[derive(Debug)]
pub(crate) struct Scan<'a> {
    pub(crate) header: LogHeader,
    /// Valid records after the header, in file order (increasing seq).
    pub(crate) records: Vec<RecordRef<'a>>,
    /// Byte ranges holding damaged data between valid records.
    pub(crate) damaged: Vec<(u64, u64)>,
    /// End of the last valid record; bytes after it are a torn tail.
    pub(crate) valid_len: u64,
}

/// Reads every valid record of a log held in memory.
pub(crate) fn scan(bytes: &[u8]) -> Result<Scan<'_>, LogError> {
    let (kind, _, payload, header_len) = parse_frame(bytes).ok_or(LogError::BadHeader)?;
    if kind != RecordKind::Header {
        return Err(LogError::BadHeader);
    }
    let header = decode_header(payload)?;
    let mut records = Vec::new();
    let mut damaged = Vec::new();
    let mut pos = header_len;
    let mut valid_len = header_len as u64;
    let mut last_seq = 0u64;
    while pos < bytes.len() {
        match parse_frame(&bytes[pos..]) {
            Some((kind, seq, payload, len)) if kind != RecordKind::Header && seq > last_seq => {
                records.push(RecordRef {
                    kind,
                    seq,
                    offset: pos as u64,
                    frame_len: len as u64,
                    payload,
                });
                last_seq = seq;
                pos += len;
                valid_len = pos as u64;
            }
            _ => {
                // Look for the next valid frame; without one, the rest is a torn tail.
                let mut next = None;
                let mut probe = pos + 1;
                while let Some(found) = find_magic(&bytes[probe..]) {
                    let at = probe + found;
                    if let Some((kind, seq, _, _)) = parse_frame(&bytes[at..])
                        && kind != RecordKind::Header
                        && seq > last_seq
                    {
                        next = Some(at);
                        break;
                    }
                    probe = at + 1;
                }
                match next {
                    Some(at) => {
                        damaged.push((pos as u64, at as u64));
                        pos = at;
                    }
                    None => break,
                }
            }
        }
    }
    Ok(Scan {
        header,
        records,
        damaged,
        valid_len,
    })
}

fn find_magic(bytes: &[u8]) -> Option<usize> {
    bytes.windows(MAGIC.len()).position(|w| w == MAGIC)
}

/// Writes a complete log (header and the given records) to `path` atomically.
pub(crate) fn write_log<'a>(
    path: &Path,
    header: &LogHeader,
    records: impl IntoIterator<Item = (u64, RecordKind, &'a [u8])>,
) -> io::Result<u64> {
    let mut written = 0u64;
    fsutil::atomic_write_with(path, |file| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let head = frame(RecordKind::Header, 0, &encode_header(header))
            .ok_or_else(|| io::Error::other("log header too large"))?;
        w.write_all(&head)?;
        written += head.len() as u64;
        for (seq, kind, payload) in records {
            let f = frame(kind, seq, payload)
                .ok_or_else(|| io::Error::other("record larger than 4 GiB"))?;
            w.write_all(&f)?;
            written += f.len() as u64;
        }
        w.flush()
    })?;
    Ok(written)
}

/// Writes a complete log to `path` (created or truncated) and fsyncs it, without renaming: the
/// caller moves it into place.
pub(crate) fn write_log_unplaced<'a>(
    path: &Path,
    header: &LogHeader,
    records: impl IntoIterator<Item = (u64, RecordKind, &'a [u8])>,
) -> io::Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let head = frame(RecordKind::Header, 0, &encode_header(header))
        .ok_or_else(|| io::Error::other("log header too large"))?;
    w.write_all(&head)?;
    let mut written = head.len() as u64;
    for (seq, kind, payload) in records {
        let f = frame(kind, seq, payload)
            .ok_or_else(|| io::Error::other("record larger than 4 GiB"))?;
        w.write_all(&f)?;
        written += f.len() as u64;
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(written)
}

/// Appends records to an open log, fsyncing each before returning.
#[derive(Debug)]
pub(crate) struct LogWriter {
    file: File,
    len: u64,
    /// Set when a failed append could not be rolled back; every later append fails.
    poisoned: bool,
}

impl LogWriter {
    /// Opens `path` for appending after `valid_len`, cutting off any torn tail first.
    pub(crate) fn open(path: &Path, valid_len: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len != valid_len {
            file.set_len(valid_len)?;
            file.sync_all()?;
        }
        Ok(Self {
            file,
            len: valid_len,
            poisoned: false,
        })
    }

    /// Current length of the log in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends one frame and makes it durable. On failure the log is rolled back to its previous
    /// length, so the next append still follows valid data.
    pub(crate) fn append(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.poisoned {
            return Err(io::Error::other(
                "an earlier write to the chunk log failed and could not be undone; reopen the \
                 knowledge base",
            ));
        }
        let result = (|| {
            self.file.seek(SeekFrom::Start(self.len))?;
            self.file.write_all(frame)?;
            self.file.sync_data()
        })();
        match result {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                if self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_all())
                    .is_err()
                {
                    self.poisoned = true;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LogHeader {
        LogHeader {
            log_id: [7; 16],
            model: ModelInfo {
                id: "m".into(),
                digest: "d".into(),
                dimensions: 3,
            },
            chunking: ChunkingParams {
                unit: SizeUnit::Tokens,
                max_size: 10,
                overlap: 2,
                splitter: "s".into(),
            },
        }
    }

    fn doc(source: &str, id: u64) -> StoredDocument {
        StoredDocument {
            source: source.into(),
            title: "T".into(),
            content_type: ContentType::Markdown,
            input_sha256: [1; 32],
            text_bytes: 5,
            chunks: vec![StoredChunk {
                id,
                ordinal: 0,
                start: 0,
                end: 5,
                heading: Some("H".into()),
                text: "hello".into(),
                vector: vec![1.0, 2.0, 3.0],
            }],
        }
    }

    fn build(path: &Path, n: u64) -> Vec<u8> {
        let payloads: Vec<Vec<u8>> = (1..=n)
            .map(|i| encode_put(&doc(&format!("s{i}"), i), &[0; 32]))
            .collect();
        write_log(
            path,
            &header(),
            payloads
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64 + 1, RecordKind::Put, p.as_slice())),
        )
        .unwrap();
        std::fs::read(path).unwrap()
    }

    #[test]
    fn records_round_trip() {
        let d = doc("a.md", 42);
        let payload = encode_put(&d, &[9; 32]);
        let (back, digest) = decode_put_with_digest(&payload, 3, true).unwrap();
        assert_eq!((back, digest), (d.clone(), [9; 32]));
        let light = decode_put(&payload, 3, false).unwrap();
        assert!(light.chunks[0].vector.is_empty());
        assert_eq!(
            put_chunk_ids(&payload, 3).unwrap(),
            ("a.md".to_string(), vec![42])
        );
        assert_eq!(decode_remove(&encode_remove("x")).unwrap(), "x");
        assert_eq!(decode_header(&encode_header(&header())).unwrap(), header());
        assert!(
            decode_put(&payload, 4, true).is_err(),
            "wrong dims must not decode"
        );
        let f = frame(RecordKind::Put, 5, &payload).unwrap();
        assert_eq!(frame_payload(&f), Some(payload.as_slice()));
        assert!(frame_payload(&f[..f.len() - 1]).is_none());
    }

    #[test]
    fn torn_tail_is_detected_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = build(&dir.path().join("log"), 3);
        let full = scan(&bytes).unwrap();
        assert_eq!(full.records.len(), 3);
        assert_eq!(full.valid_len, bytes.len() as u64);
        let ends: Vec<u64> = full
            .records
            .iter()
            .map(|r| r.offset + r.frame_len)
            .collect();
        let header_end = full.records[0].offset;
        for cut in header_end as usize..bytes.len() {
            let s = scan(&bytes[..cut]).unwrap();
            let complete = ends.iter().filter(|&&e| e <= cut as u64).count();
            assert_eq!(s.records.len(), complete, "cut at {cut}");
            assert!(s.damaged.is_empty());
            assert_eq!(
                s.valid_len,
                if complete == 0 {
                    header_end
                } else {
                    ends[complete - 1]
                }
            );
        }
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = build(&dir.path().join("log"), 3);
        let s = scan(&bytes).unwrap();
        let mid = s.records[1].offset as usize + FRAME_HEADER + 3;
        bytes[mid] ^= 0xff;
        let s = scan(&bytes).unwrap();
        assert_eq!(
            s.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(s.damaged.len(), 1);
        assert_eq!(s.valid_len, bytes.len() as u64);
    }

    #[test]
    fn a_damaged_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = build(&dir.path().join("log"), 1);
        bytes[30] ^= 1;
        assert!(matches!(scan(&bytes), Err(LogError::BadHeader)));
    }

    #[test]
    fn append_cuts_a_torn_tail_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let bytes = build(&path, 1);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"\xffGK\xfe garbage").unwrap();
        drop(f);
        let mut w = LogWriter::open(&path, bytes.len() as u64).unwrap();
        let p = encode_put(&doc("b", 9), &[0; 32]);
        w.append(&frame(RecordKind::Put, 2, &p).unwrap()).unwrap();
        let after = std::fs::read(&path).unwrap();
        let s = scan(&after).unwrap();
        assert_eq!(s.records.len(), 2);
        assert!(s.damaged.is_empty());
        assert_eq!(w.len(), after.len() as u64);
    }
}
