//! GGUF files: a reader of our own over a memory map, and dequantization.
//!
//! A GGUF file is untrusted input. [`GgufFile::open`] parses and validates the whole header up
//! front — every length, count, offset and tensor size is checked against the bytes the file
//! really has before anything is allocated — so that afterwards [`GgufFile::tensor_bytes`] can
//! hand out slices of the map without further checks. Versions 2 and 3 (little-endian) are
//! read; version 1 and big-endian files are rejected with a message that says so.
//!
//! ```no_run
//! # fn main() -> Result<(), gaia_inference::gguf::GgufError> {
//! use gaia_inference::gguf::GgufFile;
//! let file = GgufFile::open("model.gguf".as_ref())?;
//! let arch = file.get("general.architecture").and_then(|v| v.as_str());
//! let embd = file.tensor("token_embd.weight").expect("a llama model has token_embd");
//! let values: Vec<f32> = file.dequantize(embd)?;
//! # let _ = (arch, values); Ok(()) }
//! ```

mod dequant;
mod metadata;
mod reader;
pub mod synth;
mod types;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

pub use dequant::dequantize;
pub(crate) use dequant::{f16_at, q3_k_scales, scale_min_k4};
pub use metadata::{
    MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_STRING_LEN, MAX_TOTAL_ARRAY_ELEMENTS, MetadataValue,
};
pub use types::{GgmlType, QK_K};

use metadata::ValueParser;
use reader::Reader;

/// The magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Longest metadata key or tensor name accepted, in bytes.
pub const MAX_NAME_LEN: u64 = 65_535;

/// Everything that can go wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened, measured or mapped.
    #[error("cannot read gguf file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a gguf file: it starts with bytes {found:02x?} instead of the magic \"GGUF\"")]
    BadMagic {
        /// The first bytes of the file (up to four).
        found: Vec<u8>,
    },
    /// A version other than 2 or 3, or a big-endian file.
    #[error("gguf version {version} is not supported: {reason}")]
    UnsupportedVersion {
        /// The version field as read (little-endian).
        version: u32,
        /// Why, and what to do.
        reason: &'static str,
    },
    /// A read ran past the end of the file.
    #[error(
        "gguf file is truncated or corrupt: {what} at byte {offset} needs {needed} bytes but only \
         {available} remain"
    )]
    Truncated {
        /// What was being read (names the key or tensor).
        what: String,
        /// File offset of the read.
        offset: u64,
        /// Bytes the read needed.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// A string longer than the limit.
    #[error("{what} at byte {offset} claims {len} bytes, more than the limit of {limit}")]
    StringTooLong {
        /// Which string.
        what: String,
        /// File offset of its length field.
        offset: u64,
        /// The claimed length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not valid utf-8 (bad byte at offset {offset})")]
    InvalidUtf8 {
        /// Which string.
        what: String,
        /// File offset of the first invalid byte.
        offset: u64,
    },
    /// A count (tensors, keys, array elements) larger than the file or a limit allows.
    #[error("gguf file declares {count} {what}, but at most {limit} are possible: {reason}")]
    CountTooLarge {
        /// What is counted (names the key when it is an array).
        what: String,
        /// The declared count.
        count: u64,
        /// The most that could be valid.
        limit: u64,
        /// Why that is the limit.
        reason: String,
    },
    /// A metadata value type id outside 0..=12.
    #[error(
        "metadata key '{key}' has unknown value type {type_id} at byte {offset} (known: 0 to 12)"
    )]
    UnknownValueType {
        /// The key.
        key: String,
        /// File offset of the type field.
        offset: u64,
        /// The type id.
        type_id: u32,
    },
    /// A boolean byte other than 0 or 1.
    #[error("metadata key '{key}' holds a boolean byte {value} at byte {offset}; expected 0 or 1")]
    InvalidBool {
        /// The key.
        key: String,
        /// File offset of the byte.
        offset: u64,
        /// The byte.
        value: u8,
    },
    /// Arrays nested too deep.
    #[error("metadata key '{key}' nests arrays deeper than the limit of {limit} levels")]
    NestingTooDeep {
        /// The key.
        key: String,
        /// The limit.
        limit: usize,
    },
    /// A key that appears twice.
    #[error("metadata key '{key}' appears twice")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A key of zero length.
    #[error("metadata key number {index} is empty")]
    EmptyKey {
        /// Index of the key/value pair.
        index: u64,
    },
    /// A well-known key with the wrong value type.
    #[error("metadata key '{key}' must be of type {expected} but is {found}")]
    WrongKeyType {
        /// The key.
        key: String,
        /// The type it must have.
        expected: &'static str,
        /// The type it has.
        found: &'static str,
    },
    /// `general.alignment` that is zero or not a power of two.
    #[error("general.alignment is {alignment}; it must be a power of two")]
    BadAlignment {
        /// The value.
        alignment: u32,
    },
    /// A tensor name that appears twice.
    #[error("tensor '{name}' appears twice")]
    DuplicateTensor {
        /// The name.
        name: String,
    },
    /// More than [`MAX_DIMS`] dimensions.
    #[error("tensor '{name}' has {n_dims} dimensions; at most {limit} are supported")]
    TooManyDims {
        /// The tensor.
        name: String,
        /// Its declared number of dimensions.
        n_dims: u32,
        /// The limit.
        limit: u32,
    },
    /// A ggml type id that ggml does not define.
    #[error("tensor '{name}' has unknown ggml type id {type_id}; the file needs a newer reader")]
    UnknownTensorType {
        /// The tensor.
        name: String,
        /// The type id.
        type_id: u32,
    },
    /// Dimensions whose product (elements or bytes) overflows.
    #[error("tensor '{name}' with dims {dims:?} has more than {limit} {unit}")]
    ShapeOverflow {
        /// The tensor.
        name: String,
        /// Its dimensions.
        dims: Vec<u64>,
        /// The limit.
        limit: u64,
        /// "elements" or "bytes".
        unit: &'static str,
    },
    /// A row length that is not a whole number of blocks.
    #[error(
        "tensor '{name}' has rows of {cols} elements, not a multiple of the {dtype} block size \
         {block_size}"
    )]
    RowNotBlockMultiple {
        /// The tensor.
        name: String,
        /// Its type.
        dtype: GgmlType,
        /// Elements per row (`dims[0]`).
        cols: u64,
        /// The type's block size.
        block_size: usize,
    },
    /// A tensor whose data offset is not a multiple of the file's alignment.
    #[error(
        "tensor '{name}' starts at data offset {offset}, not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor that does not lie inside the file.
    #[error(
        "tensor '{name}' ({n_bytes} bytes at data offset {offset}, data section at byte \
         {data_start}) runs past the end of the {file_len}-byte file"
    )]
    TensorOutOfBounds {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// Its size.
        n_bytes: u64,
        /// Absolute offset of the data section.
        data_start: u64,
        /// The file's size.
        file_len: u64,
    },
    /// Two tensors sharing bytes.
    #[error(
        "tensors '{first}' (bytes {first_start}..{first_end}) and '{second}' (from byte \
         {second_start}) overlap"
    )]
    TensorOverlap {
        /// The tensor that starts first.
        first: String,
        /// Its absolute start.
        first_start: u64,
        /// Its absolute end.
        first_end: u64,
        /// The tensor that starts inside it.
        second: String,
        /// Its absolute start.
        second_start: u64,
    },
    /// A type this crate cannot dequantize or multiply with.
    #[error(
        "{what} has type {dtype}, which gaia cannot compute with yet (supported: F32, F16, BF16, \
         Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K); use a model quantized to \
         one of those"
    )]
    UnsupportedType {
        /// Which tensor or buffer.
        what: String,
        /// Its type.
        dtype: GgmlType,
    },
    /// A byte buffer whose size does not match the element count.
    #[error(
        "{n_bytes} bytes cannot hold exactly {n_elements} {dtype} elements ({dtype} stores \
         blocks of {} elements in {} bytes)", dtype.block_size(), dtype.type_size()
    )]
    BufferMismatch {
        /// The type.
        dtype: GgmlType,
        /// Bytes given.
        n_bytes: u64,
        /// Elements asked for.
        n_elements: u64,
    },
    /// A tensor whose shape is not what the caller needs.
    #[error("tensor '{name}' has dims {dims:?}; {expected}")]
    BadShape {
        /// The tensor.
        name: String,
        /// Its dimensions.
        dims: Vec<u64>,
        /// What was expected.
        expected: String,
    },
}

/// Where one tensor lives in the file and how it is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the fastest-varying (columns).
    pub dims: Vec<u64>,
    /// The element encoding.
    pub dtype: GgmlType,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (the product of the dimensions; 1 for a 0-dimensional tensor).
    pub fn n_elements(&self) -> u64 {
        // Validated at open: the product fits in i64.
        self.dims.iter().product()
    }
}

/// An open, validated GGUF file.
#[derive(Clone)]
pub struct GgufFile {
    mmap: Arc<Mmap>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The metadata can hold a whole vocabulary: show its size only.
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("bytes", &self.mmap.len())
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// What [`parse`] learns from a file's bytes.
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<TensorInfo>,
}

impl GgufFile {
    /// Maps and validates the GGUF file at `path`.
    ///
    /// Every header field is checked; tensors must lie inside the file, aligned and without
    /// overlapping. The file must not be modified while it is open (it is memory-mapped).
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            // Too short to map usefully; read it so the error says what is wrong with it.
            let bytes = std::fs::read(path).map_err(io)?;
            return Err(parse(&bytes).err().unwrap_or_else(|| GgufError::Truncated {
                what: "header".to_owned(),
                offset: 0,
                needed: 8,
                available: len,
            }));
        }
        // SAFETY: the map is read-only and lives as long as the `Arc`; like every reader of
        // memory-mapped files we rely on no one truncating or rewriting the file while it is
        // open (documented above). All parsing is bounds-checked against the map's length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_mmap(Arc::new(mmap))
    }

    /// Validates a GGUF image held in memory (copied into an anonymous map), e.g. a file built
    /// by a test.
    pub fn from_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        // Parse first so that a bad image costs no map.
        parse(bytes)?;
        let io = |source| GgufError::Io {
            path: PathBuf::from("<memory>"),
            source,
        };
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
        map.copy_from_slice(bytes);
        let mmap = map.make_read_only().map_err(io)?;
        Self::from_mmap(Arc::new(mmap))
    }

    fn from_mmap(mmap: Arc<Mmap>) -> Result<GgufFile, GgufError> {
        let parsed = parse(&mmap)?;
        let by_name = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            mmap,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name,
        })
    }

    /// The file's GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.metadata
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor of this file (checked at open). An `info` that does not describe
    /// a range of this file yields an empty slice.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        usize::try_from(info.offset)
            .ok()
            .zip(usize::try_from(info.n_bytes).ok())
            .and_then(|(start, len)| self.mmap.get(start..start.checked_add(len)?))
            .unwrap_or(&[])
    }

    /// The tensor's elements as f32, row-major with `dims[0]` fastest.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        if !info.dtype.is_supported() {
            return Err(GgufError::UnsupportedType {
                what: format!("tensor '{}'", info.name),
                dtype: info.dtype,
            });
        }
        let bytes = self.tensor_bytes(info);
        let n = info.n_elements();
        if info.dtype.bytes_for(n) != Some(bytes.len() as u64) {
            return Err(GgufError::BufferMismatch {
                dtype: info.dtype,
                n_bytes: bytes.len() as u64,
                n_elements: n,
            });
        }
        // `n` is bounded by the tensor's bytes, which lie inside the file.
        let mut out = vec![0f32; n as usize];
        dequantize(info.dtype, bytes, &mut out)?;
        Ok(out)
    }

    /// The shared memory map, so that weights can be used in place without copying.
    pub fn mmap(&self) -> Arc<Mmap> {
        Arc::clone(&self.mmap)
    }
}

/// Minimum encoded size of one key/value pair: key length, value type, a 1-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Minimum encoded size of one tensor info: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut r = Reader::new(bytes);
    if bytes.len() < 4 || bytes[..4] != GGUF_MAGIC {
        if bytes.len() < 4 && GGUF_MAGIC.starts_with(bytes) {
            return Err(GgufError::Truncated {
                what: "magic".to_owned(),
                offset: 0,
                needed: 4,
                available: bytes.len() as u64,
            });
        }
        return Err(GgufError::BadMagic {
            found: bytes[..bytes.len().min(4)].to_vec(),
        });
    }
    r.take(4, || "magic".to_owned())?;
    let version = r.u32(|| "version".to_owned())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                reason: "gguf v1 is obsolete; re-convert the model with a current llama.cpp",
            });
        }
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(GgufError::UnsupportedVersion {
                version,
                reason: "this is a big-endian gguf file; use the little-endian version of the model",
            });
        }
        _ => {
            return Err(GgufError::UnsupportedVersion {
                version,
                reason: "only versions 2 and 3 can be read",
            });
        }
    }
    let n_tensors = r.u64(|| "tensor count".to_owned())?;
    let n_kv = r.u64(|| "metadata key/value count".to_owned())?;
    // Every key/value pair and tensor info takes some bytes: a count larger than the rest of
    // the file can hold is a lie, caught here before anything is allocated.
    let available = r.remaining() as u64;
    let kv_limit = available / MIN_KV_SIZE;
    if n_kv > kv_limit {
        return Err(GgufError::CountTooLarge {
            what: "metadata key/value pairs".to_owned(),
            count: n_kv,
            limit: kv_limit,
            reason: format!(
                "only {available} bytes follow the header and each pair takes at least {MIN_KV_SIZE}"
            ),
        });
    }
    let ti_limit = available.saturating_sub(n_kv * MIN_KV_SIZE) / MIN_TENSOR_INFO_SIZE;
    if n_tensors > ti_limit {
        return Err(GgufError::CountTooLarge {
            what: "tensors".to_owned(),
            count: n_tensors,
            limit: ti_limit,
            reason: format!(
                "only {available} bytes follow the header and each tensor info takes at least \
                 {MIN_TENSOR_INFO_SIZE}"
            ),
        });
    }

    let mut metadata = BTreeMap::new();
    let mut values = ValueParser::new();
    for index in 0..n_kv {
        let key = r.string(MAX_NAME_LEN, || {
            format!("key of metadata pair number {index}")
        })?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { index });
        }
        let type_id = r.u32(|| format!("value type of metadata key '{key}'"))?;
        let value = values.value(&mut r, &key, type_id, 0)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey { key });
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetadataValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(MetadataValue::U32(a)) => return Err(GgufError::BadAlignment { alignment: *a }),
        Some(other) => {
            return Err(GgufError::WrongKeyType {
                key: "general.alignment".to_owned(),
                expected: "u32",
                found: other.type_name(),
            });
        }
    };

    // `n_tensors` is bounded by the file size (checked above).
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    let mut names: HashSet<String> = HashSet::with_capacity(n_tensors as usize);
    for index in 0..n_tensors {
        let name = r.string(MAX_NAME_LEN, || format!("name of tensor number {index}"))?;
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor { name });
        }
        let n_dims = r.u32(|| format!("dimension count of tensor '{name}'"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                name,
                n_dims,
                limit: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(|| format!("dimension {d} of tensor '{name}'"))?);
        }
        let type_id = r.u32(|| format!("type of tensor '{name}'"))?;
        let offset = r.u64(|| format!("data offset of tensor '{name}'"))?;
        let Some(dtype) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownTensorType { name, type_id });
        };
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        let Some(n_elements) = n_elements else {
            return Err(GgufError::ShapeOverflow {
                name,
                dims,
                limit: i64::MAX as u64,
                unit: "elements",
            });
        };
        let cols = dims.first().copied().unwrap_or(1);
        if cols % dtype.block_size() as u64 != 0 {
            return Err(GgufError::RowNotBlockMultiple {
                name,
                dtype,
                cols,
                block_size: dtype.block_size(),
            });
        }
        let Some(n_bytes) = dtype.bytes_for(n_elements) else {
            return Err(GgufError::ShapeOverflow {
                name,
                dims,
                limit: u64::MAX,
                unit: "bytes",
            });
        };
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                name,
                offset,
                alignment,
            });
        }
        // Absolute position is filled in once the data section's start is known.
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
            n_bytes,
        });
    }

    let file_len = bytes.len() as u64;
    let header_end = r.pos() as u64;
    // The data section starts at the next multiple of the alignment (it may be past the end of
    // a file without tensor data).
    let data_offset = header_end.div_ceil(alignment).saturating_mul(alignment);
    for t in &mut tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => t.offset = start,
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    offset: t.offset,
                    n_bytes: t.n_bytes,
                    data_start: data_offset,
                    file_len,
                });
            }
        }
    }
    check_overlaps(&tensors)?;
    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

/// Fails if two tensors with data share a byte.
fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut spans: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    spans.sort_by_key(|t| t.offset);
    for pair in spans.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // Offsets and sizes were checked to lie inside the file, so no overflow.
        if b.offset < a.offset + a.n_bytes {
            return Err(GgufError::TensorOverlap {
                first: a.name.clone(),
                first_start: a.offset,
                first_end: a.offset + a.n_bytes,
                second: b.name.clone(),
                second_start: b.offset,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
