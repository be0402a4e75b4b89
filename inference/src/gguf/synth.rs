//! Synthetic GGUF files for tests and benchmarks: a llama-shaped model of any size with random
//! blocks of one quantized type (no real model of that size can be fetched here), and random
//! blocks of each type for kernel tests. The values are random but well-formed: every f16
//! scale is a small finite number, so a forward pass gives finite logits.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use half::f16;

use super::GgmlType;

/// A small, fast random source (xorshift64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A uniform value in `[-scale, scale)`.
    pub fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bits = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bits[..chunk.len()]);
        }
    }
}

/// `blocks` random blocks of `dtype` (one of the quantized types with f16 scales: Q4_0, Q4_1,
/// Q5_0, Q5_1, Q8_0, Q2_K..Q6_K): random quants, and scales of about `scale` in magnitude
/// (signed where the format's are).
pub fn random_blocks(dtype: GgmlType, blocks: usize, scale: f32, rng: &mut Rng) -> Vec<u8> {
    let size = dtype.type_size();
    let mut out = vec![0u8; blocks * size];
    rng.fill(&mut out);
    // Byte offsets of the block's f16 scales, and whether they may be negative.
    let (scales, signed): (&[usize], bool) = match dtype {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (&[0], true),
        GgmlType::Q4_1 | GgmlType::Q5_1 => (&[0, 2], true),
        GgmlType::Q2K => (&[80, 82], false),
        GgmlType::Q3K => (&[108], false),
        GgmlType::Q4K | GgmlType::Q5K => (&[0, 2], false),
        GgmlType::Q6K => (&[208], false),
        _ => (&[], false),
    };
    for block in out.chunks_exact_mut(size) {
        for &at in scales {
            let mut v = scale * (0.25 + 0.75 * (rng.uniform(0.5) + 0.5));
            if signed && rng.next_u64() & 1 == 1 {
                v = -v;
            }
            block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
    }
    out
}

/// The shape of a synthetic llama model.
#[derive(Clone, Copy, Debug)]
pub struct LlamaShape {
    /// Hidden size.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Feed-forward size.
    pub d_ff: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl LlamaShape {
    /// Llama 3.2 1B's shape (tied embeddings).
    pub const LLAMA_1B: LlamaShape = LlamaShape {
        d_model: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        d_ff: 8192,
        vocab: 128_256,
    };
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes a llama-shaped GGUF at `path` whose every weight matrix (the tied embedding too) is
/// random blocks of `dtype`, and norms are f32 ones. Returns the file's size.
pub fn write_llama(path: &Path, shape: LlamaShape, dtype: GgmlType, seed: u64) -> io::Result<u64> {
    let s = shape;
    let hd = s.d_model / s.heads;
    let mut kv: Vec<u8> = Vec::new();
    let mut n_kv = 0u64;
    let mut key = |kv: &mut Vec<u8>, name: &str, type_id: u32, value: &[u8]| {
        put_str(kv, name);
        kv.extend_from_slice(&type_id.to_le_bytes());
        kv.extend_from_slice(value);
        n_kv += 1;
    };
    let mut arch = Vec::new();
    put_str(&mut arch, "llama");
    key(&mut kv, "general.architecture", 8, &arch);
    for (name, value) in [
        ("llama.block_count", s.layers),
        ("llama.context_length", 4096),
        ("llama.embedding_length", s.d_model),
        ("llama.feed_forward_length", s.d_ff),
        ("llama.attention.head_count", s.heads),
        ("llama.attention.head_count_kv", s.kv_heads),
    ] {
        key(&mut kv, name, 4, &(value as u32).to_le_bytes());
    }
    key(
        &mut kv,
        "llama.rope.freq_base",
        6,
        &500_000f32.to_le_bytes(),
    );
    key(
        &mut kv,
        "llama.attention.layer_norm_rms_epsilon",
        6,
        &1e-5f32.to_le_bytes(),
    );
    // (name, [cols, rows], quantized)
    let mut tensors: Vec<(String, [usize; 2], bool)> = vec![
        ("token_embd.weight".into(), [s.d_model, s.vocab], true),
        ("output_norm.weight".into(), [s.d_model, 1], false),
    ];
    for l in 0..s.layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        tensors.push((n("attn_norm.weight"), [s.d_model, 1], false));
        tensors.push((n("ffn_norm.weight"), [s.d_model, 1], false));
        tensors.push((n("attn_q.weight"), [s.d_model, s.heads * hd], true));
        tensors.push((n("attn_k.weight"), [s.d_model, s.kv_heads * hd], true));
        tensors.push((n("attn_v.weight"), [s.d_model, s.kv_heads * hd], true));
        tensors.push((n("attn_output.weight"), [s.heads * hd, s.d_model], true));
        tensors.push((n("ffn_gate.weight"), [s.d_model, s.d_ff], true));
        tensors.push((n("ffn_up.weight"), [s.d_model, s.d_ff], true));
        tensors.push((n("ffn_down.weight"), [s.d_ff, s.d_model], true));
    }
    let bytes_of = |dims: [usize; 2], quantized: bool| {
        let n = dims[0] * dims[1];
        if quantized {
            n / dtype.block_size() * dtype.type_size()
        } else {
            n * 4
        }
    };
    let mut header = b"GGUF".to_vec();
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&n_kv.to_le_bytes());
    header.extend_from_slice(&kv);
    let mut offset = 0usize;
    for (name, dims, quantized) in &tensors {
        put_str(&mut header, name);
        let rank = if dims[1] == 1 { 1 } else { 2 };
        header.extend_from_slice(&(rank as u32).to_le_bytes());
        for d in &dims[..rank] {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        let type_id = if *quantized { dtype.id() } else { 0 };
        header.extend_from_slice(&type_id.to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + bytes_of(*dims, *quantized)).next_multiple_of(32);
    }
    header.resize(header.len().next_multiple_of(32), 0);
    let mut file = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    file.write_all(&header)?;
    let mut written = header.len();
    let mut rng = Rng(seed | 1);
    for (_, dims, quantized) in &tensors {
        let start = written;
        if *quantized {
            // Scales like a trained model's: weights of about 1/sqrt(d_in).
            let scale = 1.0 / (dims[0] as f32).sqrt() / 8.0;
            let blocks = dims[0] * dims[1] / dtype.block_size();
            // Write a row group at a time, so the file never sits whole in memory.
            let per_chunk = (1usize << 20) / dtype.type_size();
            let mut left = blocks;
            while left > 0 {
                let n = left.min(per_chunk);
                file.write_all(&random_blocks(dtype, n, scale, &mut rng))?;
                left -= n;
            }
        } else {
            for _ in 0..dims[0] * dims[1] {
                file.write_all(&1.0f32.to_le_bytes())?;
            }
        }
        written += bytes_of(*dims, *quantized);
        let padded = start + (written - start).next_multiple_of(32);
        file.write_all(&vec![0u8; padded - written])?;
        written = padded;
    }
    file.flush()?;
    Ok(written as u64)
}
