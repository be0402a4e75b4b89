//! Content fetch: a member hands the files it advertises (its model, its knowledge-base
//! snapshot, the embedding model that snapshot was built with) to another member, by content
//! hash, in verified chunks (`/gaia/content/1.0.0`).
//!
//! A fetch is one stream per seeder. The fetcher writes requests and the seeder answers each one
//! in order, so a fetcher may keep several chunk requests in flight on one stream:
//!
//! 1. [`ContentRequest::Describe`] names a content hash (and carries the fetcher's membership
//!    certificate, when the domain needs one); the seeder answers a [`ContentDescriptor`]: the
//!    files, their sizes, their sha256 and the sha256 of every [`CHUNK_SIZE`] chunk.
//! 2. [`ContentRequest::Chunk`] asks one chunk of one file; the seeder answers its bytes.
//!
//! Any request may be answered [`ContentResponse::Refused`] (not a member, not seeding, not
//! content this node advertises, too busy), after which the seeder closes the stream.
//!
//! What is trusted: the hash the fetcher asks for comes from the domain's signed manifest or a
//! member's signed advert. A chat or embedding model's hash is the sha256 of its main file, so the
//! whole file is checked against it; a knowledge base's hash covers everything its snapshot
//! serves, and the import checks it. The chunk digests come from a seeder's descriptor: they let
//! the fetcher reject a bad chunk as soon as it arrives and know which seeder sent it, and the
//! whole-file check catches a descriptor that lies (the fetcher then takes another seeder's).
//!
//! Response frames are not bincode values throughout: a chunk is a tag byte and the raw bytes,
//! so a seeder sends a file without copying it through an encoder. See [`ContentResponse`].

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, EncodeError, Wire, impl_wire};
use crate::domain::MembershipCertificate;
use crate::hash::ContentHash;
use crate::signed::Signed;
use crate::validate::{self, Validate, ValidationError};

/// The size of every chunk but a file's last: 1 MiB.
pub const CHUNK_SIZE: u32 = 1 << 20;
/// Files in one piece of content at most.
pub const MAX_FILES: usize = 16;
/// Chunks of all the files of one piece of content at most (128 GiB).
pub const MAX_CHUNKS: usize = 1 << 17;
/// Bytes in a file name at most.
pub const MAX_FILE_NAME: usize = 128;
/// Bytes in a content name (a model's store name) at most.
pub const MAX_CONTENT_NAME: usize = 128;
/// Bytes in a refusal's reason at most.
pub const MAX_REASON: usize = 512;
/// The largest request.
pub const MAX_REQUEST_BYTES: usize = 2048;
/// The largest descriptor: every chunk digest of the largest content, and the names.
pub const MAX_DESCRIPTOR_BYTES: usize = MAX_CHUNKS * 33 + 64 * 1024;
/// The largest response frame body (a descriptor; a chunk is at most [`CHUNK_SIZE`] + 1).
pub const MAX_RESPONSE_FRAME: usize = MAX_DESCRIPTOR_BYTES + 1;

/// What a piece of content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContentKind {
    /// A chat model: its hash is the sha256 of its GGUF file.
    ChatModel,
    /// An embedding model: its hash is the sha256 of its weights (`.safetensors`).
    EmbeddingModel,
    /// A knowledge-base snapshot (one archive): its hash is the KB hash, checked on import.
    KnowledgeBase,
}

impl std::fmt::Display for ContentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContentKind::ChatModel => "chat model",
            ContentKind::EmbeddingModel => "embedding model",
            ContentKind::KnowledgeBase => "knowledge base",
        })
    }
}

/// A request on a content stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ContentRequest {
    /// What the content `hash` is made of.
    Describe {
        /// The content.
        hash: ContentHash,
        /// The fetcher's membership certificate, for a domain that admits by certificate.
        certificate: Option<Signed<MembershipCertificate>>,
    },
    /// One chunk.
    Chunk {
        /// The content.
        hash: ContentHash,
        /// The file's index in the descriptor.
        file: u16,
        /// The chunk's index in the file.
        index: u32,
    },
}

impl Validate for ContentRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            ContentRequest::Describe {
                certificate: Some(certificate),
                ..
            } => certificate.validate(),
            ContentRequest::Describe { .. } => Ok(()),
            ContentRequest::Chunk { file, .. } => {
                if usize::from(*file) >= MAX_FILES {
                    return Err(ValidationError::Invalid {
                        field: "chunk.file",
                        reason: "the file index is beyond the files a descriptor may list",
                    });
                }
                Ok(())
            }
        }
    }
}

impl_wire!(ContentRequest, "content request", MAX_REQUEST_BYTES);

/// One file of a piece of content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentFile {
    /// Its name (letters, digits, `.`, `-`, `_`; not starting with `.`).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The sha256 of the whole file.
    pub sha256: ContentHash,
    /// The sha256 of each chunk, in order: `ceil(size / chunk_size)` of them.
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_CHUNKS>")]
    pub chunks: Vec<ContentHash>,
}

impl ContentFile {
    /// The byte range of chunk `index`: its offset and length.
    pub fn chunk_range(&self, chunk_size: u32, index: u32) -> Option<(u64, usize)> {
        let offset = u64::from(index).checked_mul(u64::from(chunk_size))?;
        if offset >= self.size {
            return None;
        }
        let len = (self.size - offset).min(u64::from(chunk_size));
        Some((offset, usize::try_from(len).ok()?))
    }
}

/// The number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

/// What a piece of content is made of, as a seeder describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentDescriptor {
    /// The content hash asked for.
    pub hash: ContentHash,
    /// What it is.
    pub kind: ContentKind,
    /// The name the seeder keeps it under (a model's store name; `kb` for a knowledge base).
    pub name: String,
    /// The chunk size: [`CHUNK_SIZE`] in this version.
    pub chunk_size: u32,
    /// The files; for a model the one whose sha256 is `hash` is its main file; a knowledge
    /// base is one archive.
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_FILES>")]
    pub files: Vec<ContentFile>,
}

impl ContentDescriptor {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Total chunks of all files.
    pub fn total_chunks(&self) -> usize {
        self.files.iter().map(|f| f.chunks.len()).sum()
    }
}

/// Whether `name` may name a file or a stored model: letters, digits, `.`, `-` and `_`, not
/// empty, not starting with `.`, at most `max` bytes.
pub fn is_safe_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl Validate for ContentDescriptor {
    fn validate(&self) -> Result<(), ValidationError> {
        let invalid =
            |field: &'static str, reason: &'static str| ValidationError::Invalid { field, reason };
        if !is_safe_name(&self.name, MAX_CONTENT_NAME) {
            return Err(invalid(
                "descriptor.name",
                "not a safe name (letters, digits, '.', '-', '_'; not starting with '.')",
            ));
        }
        if self.chunk_size != CHUNK_SIZE {
            return Err(invalid(
                "descriptor.chunk_size",
                "must be 1 MiB in this version",
            ));
        }
        if self.files.is_empty() {
            return Err(ValidationError::Empty {
                field: "descriptor.files",
            });
        }
        validate::max_count("descriptor.files", &self.files, MAX_FILES)?;
        let mut names = std::collections::HashSet::new();
        let mut chunks = 0usize;
        for file in &self.files {
            if !is_safe_name(&file.name, MAX_FILE_NAME) {
                return Err(invalid(
                    "descriptor.files[].name",
                    "not a safe file name (letters, digits, '.', '-', '_'; not starting with '.')",
                ));
            }
            if !names.insert(file.name.as_str()) {
                return Err(invalid("descriptor.files[].name", "a name is listed twice"));
            }
            let expected = chunk_count(file.size, self.chunk_size);
            if u64::try_from(file.chunks.len()).ok() != Some(expected) {
                return Err(invalid(
                    "descriptor.files[].chunks",
                    "the number of chunk digests does not match the file's size",
                ));
            }
            chunks = chunks.saturating_add(file.chunks.len());
        }
        if chunks > MAX_CHUNKS {
            return Err(ValidationError::TooMany {
                field: "descriptor.files[].chunks",
                count: chunks,
                limit: MAX_CHUNKS,
            });
        }
        match self.kind {
            ContentKind::KnowledgeBase if self.files.len() != 1 => Err(invalid(
                "descriptor.files",
                "a knowledge base is one archive",
            )),
            ContentKind::KnowledgeBase => Ok(()),
            ContentKind::ChatModel | ContentKind::EmbeddingModel => {
                if self.files.iter().any(|f| f.sha256 == self.hash) {
                    Ok(())
                } else {
                    Err(invalid(
                        "descriptor.files",
                        "no file has the model's sha256",
                    ))
                }
            }
        }
    }
}

impl_wire!(
    ContentDescriptor,
    "content descriptor",
    MAX_DESCRIPTOR_BYTES
);

/// Why a seeder refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Whether asking again later may succeed (the seeder is busy), rather than never.
    pub retry: bool,
    /// Why, for the fetcher's log.
    pub reason: String,
}

impl Validate for Refusal {
    fn validate(&self) -> Result<(), ValidationError> {
        validate::max_len("refusal.reason", &self.reason, MAX_REASON)
    }
}

impl_wire!(Refusal, "content refusal", MAX_REASON + 16);

/// An answer on a content stream.
///
/// A frame body is a tag byte and then: a bincode [`ContentDescriptor`] (tag 1), the chunk's raw
/// bytes (tag 2), or a bincode [`Refusal`] (tag 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentResponse {
    /// The answer to [`ContentRequest::Describe`].
    Descriptor(ContentDescriptor),
    /// The answer to [`ContentRequest::Chunk`]: at most [`CHUNK_SIZE`] bytes.
    Chunk(Vec<u8>),
    /// The request is refused; the seeder closes the stream.
    Refused(Refusal),
}

const TAG_DESCRIPTOR: u8 = 1;
const TAG_CHUNK: u8 = 2;
const TAG_REFUSED: u8 = 3;

impl ContentResponse {
    /// The frame body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        match self {
            ContentResponse::Descriptor(d) => Ok(tagged(TAG_DESCRIPTOR, &d.to_bytes()?)),
            ContentResponse::Chunk(bytes) => {
                if bytes.len() > CHUNK_SIZE as usize {
                    return Err(EncodeError::TooLarge {
                        what: "content chunk",
                        size: bytes.len(),
                        limit: CHUNK_SIZE as usize,
                    });
                }
                Ok(tagged(TAG_CHUNK, bytes))
            }
            ContentResponse::Refused(r) => Ok(tagged(TAG_REFUSED, &r.to_bytes()?)),
        }
    }

    /// Reads a frame body.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let Some((&tag, rest)) = body.split_first() else {
            return Err(DecodeError::Invalid {
                what: "content response",
                source: ValidationError::Empty { field: "tag" },
            });
        };
        match tag {
            TAG_DESCRIPTOR => Ok(ContentResponse::Descriptor(ContentDescriptor::from_bytes(
                rest,
            )?)),
            TAG_CHUNK => {
                if rest.len() > CHUNK_SIZE as usize {
                    return Err(DecodeError::TooLarge {
                        what: "content chunk",
                        size: rest.len(),
                        limit: CHUNK_SIZE as usize,
                    });
                }
                Ok(ContentResponse::Chunk(rest.to_vec()))
            }
            TAG_REFUSED => Ok(ContentResponse::Refused(Refusal::from_bytes(rest)?)),
            _ => Err(DecodeError::Invalid {
                what: "content response",
                source: ValidationError::Invalid {
                    field: "tag",
                    reason: "an unknown response tag",
                },
            }),
        }
    }
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(tag);
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, bytes: &[u8]) -> ContentFile {
        ContentFile {
            name: name.into(),
            size: bytes.len() as u64,
            sha256: ContentHash::of(bytes),
            chunks: bytes
                .chunks(CHUNK_SIZE as usize)
                .map(ContentHash::of)
                .collect(),
        }
    }

    fn model(bytes: &[u8]) -> ContentDescriptor {
        ContentDescriptor {
            hash: ContentHash::of(bytes),
            kind: ContentKind::ChatModel,
            name: "smollm2-135m-instruct".into(),
            chunk_size: CHUNK_SIZE,
            files: vec![file("model.gguf", bytes), file("tokenizer.json", b"{}")],
        }
    }

    #[test]
    fn every_response_round_trips() {
        let big = vec![7u8; CHUNK_SIZE as usize * 2 + 5];
        let d = model(&big);
        assert_eq!(d.files[0].chunks.len(), 3);
        assert_eq!(d.total_chunks(), 4);
        for response in [
            ContentResponse::Descriptor(d.clone()),
            ContentResponse::Chunk(vec![1, 2, 3]),
            ContentResponse::Chunk(Vec::new()),
            ContentResponse::Refused(Refusal {
                retry: true,
                reason: "busy".into(),
            }),
        ] {
            let body = response.encode().unwrap();
            assert_eq!(ContentResponse::decode(&body).unwrap(), response);
        }
        let request = ContentRequest::Chunk {
            hash: d.hash,
            file: 0,
            index: 2,
        };
        assert_eq!(
            ContentRequest::from_bytes(&request.to_bytes().unwrap()).unwrap(),
            request
        );
        assert_eq!(d.files[0].chunk_range(CHUNK_SIZE, 2), Some((2 << 20, 5)));
        assert_eq!(d.files[0].chunk_range(CHUNK_SIZE, 3), None);
    }

    #[test]
    fn hostile_frames_are_refused() {
        // Empty, unknown tag, oversized chunk, garbage descriptor.
        assert!(ContentResponse::decode(&[]).is_err());
        assert!(ContentResponse::decode(&[9, 1, 2]).is_err());
        let mut big = vec![TAG_CHUNK];
        big.resize(CHUNK_SIZE as usize + 2, 0);
        assert!(ContentResponse::decode(&big).is_err());
        assert!(ContentResponse::decode(&[TAG_DESCRIPTOR, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(
            ContentResponse::Chunk(vec![0; CHUNK_SIZE as usize + 1])
                .encode()
                .is_err()
        );
        assert!(ContentRequest::from_bytes(&[0xff; 40]).is_err());
        let too_far = ContentRequest::Chunk {
            hash: ContentHash::of(b"x"),
            file: MAX_FILES as u16,
            index: 0,
        };
        assert!(too_far.to_bytes().is_err());
    }

    #[test]
    fn descriptors_that_break_the_rules_are_refused() {
        let good = model(b"weights");
        good.validate().unwrap();
        let mut d = good.clone();
        d.files[0].name = "../../etc/passwd".into();
        assert!(d.validate().is_err(), "a path is not a file name");
        let mut d = good.clone();
        d.files[1].name = d.files[0].name.clone();
        assert!(d.validate().is_err(), "names are unique");
        let mut d = good.clone();
        d.files[0].chunks.push(ContentHash::of(b""));
        assert!(d.validate().is_err(), "chunk digests match the size");
        let mut d = good.clone();
        d.files[0].size = u64::MAX;
        assert!(d.validate().is_err(), "a hostile size");
        let mut d = good.clone();
        d.hash = ContentHash::of(b"another");
        assert!(d.validate().is_err(), "a model's main file has its hash");
        let mut d = good.clone();
        d.kind = ContentKind::KnowledgeBase;
        assert!(d.validate().is_err(), "a knowledge base is one archive");
        let mut d = good.clone();
        d.chunk_size = 4096;
        assert!(d.validate().is_err(), "the chunk size of this version");
        let mut d = good;
        d.name = ".hidden".into();
        assert!(d.validate().is_err());
        // Decoding checks the same rules.
        let bytes = tagged(
            TAG_DESCRIPTOR,
            &crate::codec::canonical_bytes("d", &d).unwrap(),
        );
        assert!(ContentResponse::decode(&bytes).is_err());
    }
}
