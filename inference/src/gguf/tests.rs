//! Tests of the GGUF reader: the real default model, fixtures made by the PyPI `gguf` package
//! (`inference/tests/reference/make_quant_fixtures.py`), and hostile files.

use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e}; regenerate with \
             inference/tests/reference/make_quant_fixtures.py",
            path.display()
        )
    })
}

fn read_f32(name: &str) -> Vec<f32> {
    fixture(name)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The default chat model, found through `GAIA_MODELS_DIR` (a node model store).
pub(crate) fn default_model_path() -> PathBuf {
    let Some(dir) = std::env::var_os("GAIA_MODELS_DIR") else {
        panic!(
            "GAIA_MODELS_DIR is not set: point it at a model store holding \
             smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf (locally: \
             GAIA_MODELS_DIR=/work/models-store)"
        );
    };
    let path = PathBuf::from(dir).join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the default model is missing at {}",
        path.display()
    );
    path
}

#[test]
fn reads_the_default_model() {
    let file = GgufFile::open(&default_model_path()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data_offset(), 1_785_664);
    assert_eq!(
        file.get("general.architecture")
            .and_then(MetadataValue::as_str),
        Some("llama")
    );
    let u = |k: &str| file.get(k).and_then(MetadataValue::as_u64);
    assert_eq!(u("llama.block_count"), Some(30));
    assert_eq!(u("llama.embedding_length"), Some(576));
    assert_eq!(u("llama.feed_forward_length"), Some(1536));
    assert_eq!(u("llama.attention.head_count"), Some(9));
    assert_eq!(u("llama.attention.head_count_kv"), Some(3));
    assert_eq!(u("llama.context_length"), Some(8192));
    assert_eq!(u("tokenizer.ggml.bos_token_id"), Some(1));
    assert_eq!(
        file.get("llama.rope.freq_base")
            .and_then(MetadataValue::as_f64),
        Some(100_000.0)
    );
    assert_eq!(
        file.get("tokenizer.ggml.add_bos_token")
            .and_then(MetadataValue::as_bool),
        Some(false)
    );
    assert_eq!(
        file.get("tokenizer.ggml.pre")
            .and_then(MetadataValue::as_str),
        Some("smollm")
    );
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetadataValue::as_array)
        .unwrap();
    assert_eq!(tokens.len(), 49_152);
    assert_eq!(tokens[0].as_str(), Some("<|endoftext|>"));
    assert_eq!(tokens[2].as_str(), Some("<|im_end|>"));
    assert_eq!(tokens[49_151].as_str(), Some("ectable"));
    let types = file
        .get("tokenizer.ggml.token_type")
        .and_then(MetadataValue::as_array)
        .unwrap();
    assert_eq!(types.len(), 49_152);
    assert!(matches!(types[0], MetadataValue::I32(_)));
    let merges = file
        .get("tokenizer.ggml.merges")
        .and_then(MetadataValue::as_array)
        .unwrap();
    assert_eq!(merges.len(), 48_900);
    assert!(
        file.get("tokenizer.chat_template")
            .and_then(MetadataValue::as_str)
            .unwrap()
            .contains("<|im_start|>")
    );
    assert_eq!(file.metadata().len(), 33);

    assert_eq!(file.tensors().len(), 272);
    let count = |t: GgmlType| file.tensors().iter().filter(|i| i.dtype == t).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );

    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dims, vec![576, 49_152]);
    assert_eq!(embd.dtype, GgmlType::Q8_0);
    assert_eq!((embd.offset, embd.n_bytes), (1_785_664, 30_081_024));
    assert_eq!(file.tensor_bytes(embd).len(), 30_081_024);

    // Values and sums from the PyPI `gguf` package's dequantization of the same file.
    let check = |name: &str, first: [f32; 3], last: [f32; 2], sum: f64| {
        let info = file.tensor(name).unwrap();
        let v = file.dequantize(info).unwrap();
        assert_eq!(v.len() as u64, info.n_elements());
        assert_eq!(&v[..3], &first, "{name}");
        assert_eq!(&v[v.len() - 2..], &last, "{name}");
        let s: f64 = v.iter().map(|&x| f64::from(x)).sum();
        assert!(
            (s - sum).abs() < 1e-6 * sum.abs().max(1.0),
            "{name}: sum {s} vs {sum}"
        );
    };
    check(
        "blk.0.attn_k.weight",
        [-0.155_273_44, 0.340_209_96, -0.485_595_7],
        [0.188_110_35, 0.363_647_46],
        26.937_057_495_117_188,
    );
    check(
        "blk.29.ffn_down.weight",
        [-0.273_315_43, 0.186_279_3, 0.186_279_3],
        [-0.089_843_75, 0.056_640_625],
        49.835_708_618_164_06,
    );
    check(
        "output_norm.weight",
        [1.757_812_5, 1.820_312_5, 1.781_25],
        [1.921_875, 1.984_375],
        1_038.332_031_25,
    );
    check(
        "token_embd.weight",
        [-0.106_544_495, 0.032_978_058, 0.048_198_7],
        [-0.119_894_03, -0.041_702_27],
        -15_353.044_494_152_07,
    );
}

/// Every supported type: our dequantization equals the `gguf` package's, bit for bit.
#[test]
fn dequantization_matches_the_reference_package() {
    for dtype in GgmlType::SUPPORTED {
        let stem = dtype.name().to_lowercase();
        let file = GgufFile::from_bytes(&fixture(&format!("{stem}.gguf"))).unwrap();
        let expected = read_f32(&format!("{stem}.f32"));
        let info = file.tensor("w").unwrap();
        assert_eq!(info.dtype, dtype);
        let rows = file
            .get("test.rows")
            .and_then(MetadataValue::as_u64)
            .unwrap();
        let cols = file
            .get("test.cols")
            .and_then(MetadataValue::as_u64)
            .unwrap();
        assert_eq!(info.dims, vec![cols, rows], "{dtype}");
        assert_eq!(
            file.get("test.type").and_then(MetadataValue::as_str),
            Some(dtype.name())
        );
        let got = file.dequantize(info).unwrap();
        assert_eq!(got.len(), expected.len(), "{dtype}");
        let mismatches: Vec<_> = got
            .iter()
            .zip(&expected)
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .take(5)
            .collect();
        assert!(
            mismatches.is_empty(),
            "{dtype}: (index, (ours, reference)): {mismatches:?}"
        );
        assert!(
            expected.iter().any(|&x| x != 0.0),
            "{dtype}: fixture is all zeros"
        );
    }
}

#[test]
fn metadata_fixture_has_every_value_type() {
    let file = GgufFile::from_bytes(&fixture("metadata.gguf")).unwrap();
    let m = file.metadata();
    use MetadataValue as V;
    assert_eq!(m["general.architecture"], V::String("test".into()));
    assert_eq!(m["general.alignment"], V::U32(64));
    assert_eq!(file.alignment(), 64);
    assert_eq!(m["t.u8"], V::U8(200));
    assert_eq!(m["t.i8"], V::I8(-100));
    assert_eq!(m["t.u16"], V::U16(60_000));
    assert_eq!(m["t.i16"], V::I16(-30_000));
    assert_eq!(m["t.u32"], V::U32(4_000_000_000));
    assert_eq!(m["t.i32"], V::I32(-2_000_000_000));
    assert_eq!(m["t.u64"], V::U64(18_000_000_000_000_000_000));
    assert_eq!(m["t.i64"], V::I64(-9_000_000_000_000_000_000));
    assert_eq!(m["t.f32"], V::F32(1.5));
    assert_eq!(m["t.f64"], V::F64(-2.25));
    assert_eq!(m["t.bool_true"], V::Bool(true));
    assert_eq!(m["t.bool_false"], V::Bool(false));
    assert_eq!(m["t.string"], V::String("héllo, gguf ✓".into()));
    assert_eq!(m["t.empty_string"], V::String(String::new()));
    assert_eq!(
        m["t.arr_i32"],
        V::Array(vec![V::I32(1), V::I32(-2), V::I32(3)])
    );
    assert_eq!(
        m["t.arr_str"],
        V::Array(vec![
            V::String("a".into()),
            V::String("bc".into()),
            V::String(String::new())
        ])
    );
    assert_eq!(m["t.arr_f32"], V::Array(vec![V::F32(0.5), V::F32(-0.25)]));
    assert_eq!(
        m["t.arr_u8"],
        V::Array(vec![V::U8(1), V::U8(2), V::U8(255)])
    );
    assert_eq!(
        m["t.arr_bool"],
        V::Array(vec![V::Bool(true), V::Bool(false), V::Bool(true)])
    );
    assert_eq!(
        m["t.nested"],
        V::Array(vec![
            V::Array(vec![V::I32(1), V::I32(2)]),
            V::Array(vec![V::I32(3)]),
            V::Array(vec![V::I32(4), V::I32(5), V::I32(6)]),
        ])
    );
    assert_eq!(
        m["t.nested_str"],
        V::Array(vec![
            V::Array(vec![V::String("x".into()), V::String("y".into())]),
            V::Array(vec![V::String("z".into())]),
        ])
    );
    assert_eq!(m.len(), 23);

    // Tensors (values from make_quant_fixtures.py's metadata_tensor_values).
    let names: Vec<_> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    for t in file.tensors() {
        assert_eq!(t.offset % 64, 0, "{} is not 64-aligned", t.name);
    }
    let a = file.tensor("a").unwrap();
    assert_eq!((a.dims.clone(), a.dtype), (vec![7], GgmlType::F32));
    let expected: Vec<f32> = (0..7).map(|i| i as f32 * 0.5 - 1.0).collect();
    assert_eq!(file.dequantize(a).unwrap(), expected);
    let b = file.tensor("b").unwrap();
    assert_eq!(b.dims, vec![3, 2]);
    assert_eq!(
        file.dequantize(b).unwrap(),
        (0..6).map(|i| i as f32 + 10.0).collect::<Vec<_>>()
    );
    let c = file.tensor("c").unwrap();
    assert_eq!((c.dims.clone(), c.dtype), (vec![4, 3, 2], GgmlType::F16));
    assert_eq!(c.n_elements(), 24);
    assert_eq!(
        file.dequantize(c).unwrap(),
        (0..24).map(|i| i as f32 - 5.0).collect::<Vec<_>>()
    );
}

#[test]
fn version_2_is_read_and_version_1_is_refused() {
    let v2 = fixture("v2.gguf");
    let file = GgufFile::from_bytes(&v2).unwrap();
    assert_eq!(file.version(), 2);
    let v3 = GgufFile::from_bytes(&fixture("q4_0.gguf")).unwrap();
    assert_eq!(
        file.dequantize(file.tensor("w").unwrap()).unwrap(),
        v3.dequantize(v3.tensor("w").unwrap()).unwrap()
    );

    for (version, needle) in [
        (1u32, "v1 is obsolete"),
        (4, "only versions 2 and 3"),
        (3u32.swap_bytes(), "big-endian"),
        (0, "only versions"),
    ] {
        let mut bytes = v2.clone();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let err = GgufFile::from_bytes(&bytes).unwrap_err();
        assert!(matches!(err, GgufError::UnsupportedVersion { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn open_reads_from_disk_and_reports_missing_files() {
    let path = fixture_dir().join("q8_0.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensor("w").unwrap().dtype, GgmlType::Q8_0);
    assert_eq!(file.mmap().len(), fixture("q8_0.gguf").len());
    let err = GgufFile::open(&fixture_dir().join("no-such-file.gguf")).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(err.to_string().contains("no-such-file.gguf"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    for content in [&b""[..], b"GG", b"GGUF\x03\x00", b"abcdefgh"] {
        let p = dir.path().join("short.gguf");
        std::fs::write(&p, content).unwrap();
        let err = GgufFile::open(&p).unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. } | GgufError::BadMagic { .. }
            ),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile files.

/// Builds GGUF images field by field, so that tests can make each field lie.
struct Builder {
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    kv: Vec<u8>,
    kv_count: u64,
    ti: Vec<u8>,
    ti_count: u64,
    alignment: u64,
    data: Vec<u8>,
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            n_tensors: None,
            n_kv: None,
            kv: Vec::new(),
            kv_count: 0,
            ti: Vec::new(),
            ti_count: 0,
            alignment: 32,
            data: Vec::new(),
        }
    }

    fn kv_raw(mut self, key: &str, type_id: u32, value: &[u8]) -> Self {
        self.kv.extend(gguf_string(key));
        self.kv.extend(type_id.to_le_bytes());
        self.kv.extend_from_slice(value);
        self.kv_count += 1;
        self
    }

    fn alignment(mut self, a: u32) -> Self {
        self.alignment = u64::from(a);
        self.kv_raw("general.alignment", 4, &a.to_le_bytes())
    }

    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        self.ti.extend(gguf_string(name));
        self.ti.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.ti.extend(d.to_le_bytes());
        }
        self.ti.extend(type_id.to_le_bytes());
        self.ti.extend(offset.to_le_bytes());
        self.ti_count += 1;
        self
    }

    fn data(mut self, len: usize) -> Self {
        self.data = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend(self.n_tensors.unwrap_or(self.ti_count).to_le_bytes());
        b.extend(self.n_kv.unwrap_or(self.kv_count).to_le_bytes());
        b.extend_from_slice(&self.kv);
        b.extend_from_slice(&self.ti);
        while !(b.len() as u64).is_multiple_of(self.alignment) {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }
}

fn open_err(bytes: &[u8]) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("a hostile file was accepted"),
        Err(e) => e,
    }
}

#[test]
fn builder_makes_valid_files() {
    let bytes = Builder::new()
        .kv_raw("k", 8, &gguf_string("v"))
        .tensor("t", &[32, 2], GgmlType::Q8_0.id(), 0)
        .tensor("u", &[4], GgmlType::F32.id(), 96)
        .data(96 + 16)
        .build();
    let file = GgufFile::from_bytes(&bytes).unwrap();
    assert_eq!(file.tensors().len(), 2);
    assert_eq!(file.tensor("u").unwrap().offset, file.data_offset() + 96);
}

#[test]
fn bad_magic() {
    let err = open_err(b"GGML\x03\x00\x00\x00");
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    assert!(err.to_string().contains("GGUF"), "{err}");
    assert!(matches!(open_err(b""), GgufError::Truncated { .. }));
    assert!(matches!(open_err(b"\x7fELF"), GgufError::BadMagic { .. }));
}

#[test]
fn lying_counts_fail_before_allocating() {
    let mut b = Builder::new().kv_raw("k", 4, &1u32.to_le_bytes());
    b.n_kv = Some(1 << 40);
    assert!(matches!(
        open_err(&b.build()),
        GgufError::CountTooLarge { .. }
    ));
    b.n_kv = None;
    b.n_tensors = Some(u64::MAX);
    let err = open_err(&b.build());
    assert!(
        matches!(err, GgufError::CountTooLarge { ref what, .. } if what == "tensors"),
        "{err}"
    );
    // A count that fits the bytes but is still a lie ends in a truncation, not a panic.
    b.n_tensors = Some(1);
    assert!(matches!(open_err(&b.build()), GgufError::Truncated { .. }));
}

#[test]
fn lying_string_and_array_lengths() {
    // Key length far beyond the file.
    let mut bytes = Builder::new().kv_raw("key", 4, &[0; 4]).build();
    bytes[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let err = open_err(&bytes);
    assert!(
        matches!(
            err,
            GgufError::StringTooLong { .. } | GgufError::Truncated { .. }
        ),
        "{err}"
    );

    // String value claiming 2^40 bytes.
    let mut v = (1u64 << 40).to_le_bytes().to_vec();
    v.extend_from_slice(b"short");
    let err = open_err(&Builder::new().kv_raw("s", 8, &v).build());
    assert!(matches!(err, GgufError::StringTooLong { .. }), "{err}");
    assert!(err.to_string().contains("'s'"), "{err}");

    // Array of 2^40 u8 in a tiny file.
    let mut v = 0u32.to_le_bytes().to_vec();
    v.extend((1u64 << 40).to_le_bytes());
    v.extend([1, 2, 3]);
    let err = open_err(&Builder::new().kv_raw("arr", 9, &v).build());
    assert!(matches!(err, GgufError::CountTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("'arr'"), "{err}");

    // Array of strings whose count fits the bytes / 8 but whose strings do not.
    let mut v = 8u32.to_le_bytes().to_vec();
    v.extend(4u64.to_le_bytes());
    v.extend(gguf_string("a"));
    v.extend((1u64 << 20).to_le_bytes());
    v.extend([0; 24]);
    let err = open_err(&Builder::new().kv_raw("strs", 9, &v).build());
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
}

#[test]
fn duplicate_and_empty_keys_and_bad_alignment() {
    let b = Builder::new().kv_raw("k", 0, &[1]).kv_raw("k", 0, &[2]);
    assert!(matches!(
        open_err(&b.build()),
        GgufError::DuplicateKey { .. }
    ));
    let b = Builder::new().kv_raw("", 0, &[1]);
    assert!(matches!(
        open_err(&b.build()),
        GgufError::EmptyKey { index: 0 }
    ));
    let mut b = Builder::new().alignment(48);
    b.alignment = 16;
    assert!(matches!(
        open_err(&b.build()),
        GgufError::BadAlignment { alignment: 48 }
    ));
    let b = Builder::new().alignment(0);
    assert!(matches!(
        open_err(
            &{
                let mut b = b;
                b.alignment = 1;
                b
            }
            .build()
        ),
        GgufError::BadAlignment { alignment: 0 }
    ));
    let b = Builder::new().kv_raw("general.alignment", 10, &64u64.to_le_bytes());
    let err = open_err(&b.build());
    assert!(
        matches!(
            err,
            GgufError::WrongKeyType {
                expected: "u32",
                found: "u64",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn hostile_tensor_infos() {
    let q8 = GgmlType::Q8_0.id();
    // Too many dims.
    let err = open_err(
        &Builder::new()
            .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
            .data(4)
            .build(),
    );
    assert!(
        matches!(err, GgufError::TooManyDims { n_dims: 5, .. }),
        "{err}"
    );
    // n_dims = u32::MAX, without the dims.
    let mut b = Builder::new().tensor("t", &[], 0, 0);
    let at = 8 + "t".len();
    b.ti[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        open_err(&b.build()),
        GgufError::TooManyDims { .. }
    ));
    // Dims overflowing u64 multiplication.
    let err = open_err(
        &Builder::new()
            .tensor("big", &[1 << 32, 1 << 32, 16], 0, 0)
            .build(),
    );
    assert!(
        matches!(
            err,
            GgufError::ShapeOverflow {
                unit: "elements",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("'big'"), "{err}");
    // Elements fit, bytes do not.
    let err = open_err(
        &Builder::new()
            .tensor("big", &[1 << 31, 1 << 31], 0, 0)
            .build(),
    );
    assert!(matches!(err, GgufError::ShapeOverflow { .. }), "{err}");
    // Unknown and removed type ids.
    for id in [4, 31, 1000] {
        let err = open_err(&Builder::new().tensor("t", &[32], id, 0).data(64).build());
        assert!(
            matches!(err, GgufError::UnknownTensorType { type_id, .. } if type_id == id),
            "{err}"
        );
    }
    // Row not a whole number of blocks.
    let err = open_err(
        &Builder::new()
            .tensor("t", &[33, 2], q8, 0)
            .data(256)
            .build(),
    );
    assert!(
        matches!(
            err,
            GgufError::RowNotBlockMultiple {
                cols: 33,
                block_size: 32,
                ..
            }
        ),
        "{err}"
    );
    // Misaligned data offset.
    let err = open_err(&Builder::new().tensor("t", &[32], q8, 8).data(64).build());
    assert!(
        matches!(
            err,
            GgufError::MisalignedTensor {
                offset: 8,
                alignment: 32,
                ..
            }
        ),
        "{err}"
    );
    // Tensor overlapping the end of the file.
    let err = open_err(&Builder::new().tensor("t", &[64], q8, 0).data(67).build());
    assert!(
        matches!(err, GgufError::TensorOutOfBounds { n_bytes: 68, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("'t'"), "{err}");
    // Offset so large that offset + size overflows.
    let err = open_err(
        &Builder::new()
            .tensor("t", &[32], q8, u64::MAX - 31)
            .data(64)
            .build(),
    );
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    // Overlapping tensors.
    let b = Builder::new()
        .tensor("a", &[64], q8, 0)
        .tensor("b", &[32], q8, 64)
        .data(128);
    let err = open_err(&b.build());
    assert!(
        matches!(err, GgufError::TensorOverlap { ref first, ref second, .. } if first == "a" && second == "b"),
        "{err}"
    );
    // Duplicate names.
    let b = Builder::new()
        .tensor("a", &[32], q8, 0)
        .tensor("a", &[32], q8, 64)
        .data(128);
    assert!(matches!(
        open_err(&b.build()),
        GgufError::DuplicateTensor { .. }
    ));
}

#[test]
fn unsupported_types_open_but_do_not_dequantize() {
    let bytes = Builder::new()
        .tensor("iq", &[256], GgmlType::IQ2_XXS.id(), 0)
        .data(66)
        .build();
    let file = GgufFile::from_bytes(&bytes).unwrap();
    let info = file.tensor("iq").unwrap();
    let err = file.dequantize(info).unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::UnsupportedType {
                dtype: GgmlType::IQ2_XXS,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("IQ2_XXS") && err.to_string().contains("'iq'"),
        "{err}"
    );
    // A TensorInfo that is not from this file gives an empty slice, not a panic.
    let bogus = TensorInfo {
        offset: u64::MAX,
        ..info.clone()
    };
    assert!(file.tensor_bytes(&bogus).is_empty());
    assert!(
        file.dequantize(&TensorInfo {
            dtype: GgmlType::Q8_0,
            ..bogus
        })
        .is_err()
    );
}

#[test]
fn every_truncation_is_an_error() {
    for name in ["metadata.gguf", "q4_k.gguf", "q5_1.gguf"] {
        let bytes = fixture(name);
        let file = GgufFile::from_bytes(&bytes).unwrap();
        let last_end = file
            .tensors()
            .iter()
            .map(|t| t.offset + t.n_bytes)
            .max()
            .unwrap();
        for len in 0..bytes.len() {
            // Cutting only the padding after the last tensor's data is not a truncation.
            let ok = parse(&bytes[..len]).is_ok();
            assert_eq!(ok, len as u64 >= last_end, "{name} cut at {len}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random byte edits of a valid file: open either succeeds with in-bounds tensors or fails
    /// with an error; it never panics. Successful opens can be dequantized without panics.
    #[test]
    fn mutated_files_never_panic(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let name = ["metadata.gguf", "q4_k.gguf", "q8_0.gguf"][which];
        let mut bytes = fixture(name);
        for (i, v) in edits {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(file) = GgufFile::from_bytes(&bytes) {
            for t in file.tensors() {
                prop_assert!(t.offset + t.n_bytes <= bytes.len() as u64);
                prop_assert_eq!(file.tensor_bytes(t).len() as u64, t.n_bytes);
                let _ = file.dequantize(t);
            }
        }
    }

    /// Mutations aimed at the header's length and count fields (large values).
    #[test]
    fn mutated_lengths_never_panic(at in 0usize..200, value in prop_oneof![Just(u64::MAX), Just(1u64 << 40), Just(1u64 << 32), 0u64..100_000]) {
        let mut bytes = fixture("metadata.gguf");
        if at + 8 <= bytes.len() {
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        let _ = GgufFile::from_bytes(&bytes);
    }
}
