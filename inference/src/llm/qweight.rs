//! Quantized weights on a GPU: GGUF blocks repacked once at load into a layout of the same size
//! that a GPU reads with aligned 32-bit loads, and the backend operation that multiplies by
//! them (CubeCL kernels on wgpu and CUDA, in `qkernel`).
//!
//! A GGUF block keeps its f16 scales in front of (or behind) its quants, so most block sizes
//! (18, 34, 210 bytes) leave the quants unaligned. The repacked buffer splits every block into
//! a *head* (its f16 scales: 2 or 4 bytes) and a *body* (everything else, a whole number of
//! 32-bit words): all heads first, packed, then all bodies. Nothing is widened, so the buffer
//! is the GGUF tensor's size plus at most 2 bytes of padding.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

use crate::gguf::{GgmlType, GgufError, dequantize};

/// The block encodings the device kernels multiply by without dequantizing in memory.
pub(crate) const DEVICE_TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

/// A quantized `[rows, cols]` matrix (GGUF order: `cols` contiguous) in the repacked layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QSpec {
    /// The kernel's type code: `dtype` as a small number (see [`QSpec::code`]).
    pub code: u32,
    /// Output features (the GGUF tensor's rows).
    pub rows: usize,
    /// Input features (the GGUF tensor's columns, a multiple of the block size).
    pub cols: usize,
}

/// How a block splits into head and body, in bytes: (block elements, block bytes, head bytes,
/// offset of the head in the block).
fn split(dtype: GgmlType) -> Option<(usize, usize, usize, usize)> {
    // The kernels (`qkernel`) read their block sizes from here too, through `layout`.
    Some(match dtype {
        GgmlType::Q4_0 => (32, 18, 2, 0),
        GgmlType::Q4_1 => (32, 20, 4, 0),
        GgmlType::Q8_0 => (32, 34, 2, 0),
        GgmlType::Q4K => (256, 144, 4, 0),
        GgmlType::Q5K => (256, 176, 4, 0),
        GgmlType::Q6K => (256, 210, 2, 208),
        GgmlType::Q5_0 => (32, 22, 2, 0),
        GgmlType::Q5_1 => (32, 24, 4, 0),
        _ => return None,
    })
}

/// The layout the kernels decode for type `code` (the order of [`DEVICE_TYPES`]): elements per
/// block, bytes of its head, 32-bit words of its body.
#[cfg_attr(not(feature = "cube"), allow(dead_code))]
pub(crate) fn layout(code: u32) -> (usize, usize, usize) {
    let (block, size, head, _) = DEVICE_TYPES
        .get(code as usize)
        .and_then(|&t| split(t))
        .unwrap_or((1, 1, 0, 0));
    (block, head, (size - head) / 4)
}

impl QSpec {
    /// The spec of a `[rows, cols]` matrix of `dtype`, or `None` for a type the kernels do not
    /// take or a shape that is not whole blocks.
    pub fn new(dtype: GgmlType, rows: usize, cols: usize) -> Option<QSpec> {
        let code = DEVICE_TYPES.iter().position(|&t| t == dtype)? as u32;
        let (block, ..) = split(dtype)?;
        (cols.is_multiple_of(block) && rows > 0).then_some(QSpec { code, rows, cols })
    }

    /// The GGUF type.
    pub fn dtype(&self) -> GgmlType {
        DEVICE_TYPES[self.code as usize]
    }

    fn split(&self) -> (usize, usize, usize, usize) {
        split(self.dtype()).unwrap_or((1, 1, 0, 0))
    }

    /// Blocks in the matrix.
    pub fn blocks(&self) -> usize {
        let (block, ..) = self.split();
        self.rows * (self.cols / block)
    }

    /// 32-bit words of the heads region (two 2-byte heads share a word).
    pub fn head_words(&self) -> usize {
        let (_, _, head, _) = self.split();
        (self.blocks() * head).div_ceil(4)
    }

    /// 32-bit words of one block's body.
    pub fn body_words(&self) -> usize {
        let (_, size, head, _) = self.split();
        (size - head) / 4
    }

    /// 32-bit words of the whole repacked matrix.
    pub fn words(&self) -> usize {
        self.head_words() + self.blocks() * self.body_words()
    }

    /// Bytes on the device.
    pub fn device_bytes(&self) -> usize {
        self.words() * 4
    }
}

/// Repacks `bytes` (the GGUF tensor's blocks, row after row) into the device layout.
pub(crate) fn repack(spec: &QSpec, bytes: &[u8]) -> Result<Vec<i32>, GgufError> {
    let (_, size, head, at) = spec.split();
    let blocks = spec.blocks();
    if bytes.len() != blocks * size {
        return Err(GgufError::BufferMismatch {
            dtype: spec.dtype(),
            n_bytes: bytes.len() as u64,
            n_elements: (spec.rows * spec.cols) as u64,
        });
    }
    let mut out = vec![0u8; spec.words() * 4];
    let body0 = spec.head_words() * 4;
    let body = size - head;
    for (b, block) in bytes.chunks_exact(size).enumerate() {
        out[b * head..(b + 1) * head].copy_from_slice(&block[at..at + head]);
        let dst = &mut out[body0 + b * body..body0 + (b + 1) * body];
        if at == 0 {
            dst.copy_from_slice(&block[head..]);
        } else {
            dst[..at].copy_from_slice(&block[..at]);
            dst[at..].copy_from_slice(&block[at + head..]);
        }
    }
    Ok(out
        .chunks_exact(4)
        .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect())
}

/// The inverse of [`repack`]: the GGUF blocks again (for the host fallback and tests).
pub(crate) fn unpack(spec: &QSpec, words: &[i32]) -> Vec<u8> {
    let (_, size, head, at) = spec.split();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let body0 = spec.head_words() * 4;
    let body = size - head;
    let mut out = vec![0u8; spec.blocks() * size];
    for (b, block) in out.chunks_exact_mut(size).enumerate() {
        let src = &bytes[body0 + b * body..body0 + (b + 1) * body];
        block[at..at + head].copy_from_slice(&bytes[b * head..(b + 1) * head]);
        if at == 0 {
            block[head..].copy_from_slice(src);
        } else {
            block[..at].copy_from_slice(&src[..at]);
            block[at + head..].copy_from_slice(&src[at..]);
        }
    }
    out
}

/// A backend that can multiply by repacked quantized weights. GPU backends run CubeCL kernels
/// that dequantize in registers; the others take the host path (dequantize, then multiply),
/// which is correct but holds an f32 copy: [`QuantOps::ON_DEVICE`] tells the loader which.
pub trait QuantOps: Backend {
    /// Whether [`QuantOps::qmatmul`] reads the quantized words on the device (the loader then
    /// keeps weights quantized; otherwise it dequantizes them once at load).
    const ON_DEVICE: bool = false;

    /// `x` (`[n, cols]`) times the transpose of the quantized `[rows, cols]` matrix in `words`:
    /// `[n, rows]`.
    fn qmatmul(x: FloatTensor<Self>, words: IntTensor<Self>, spec: QSpec) -> FloatTensor<Self> {
        let device = Self::float_device(&x);
        let w = host_dequant::<Self>(words, spec, &device);
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        x.matmul(w.transpose()).into_primitive().tensor()
    }

    /// The largest buffer the device binds, in bytes (weights are split to fit).
    fn max_buffer_bytes(_device: &Self::Device) -> usize {
        usize::MAX
    }

    /// The matrix in `words` dequantized: `[rows, cols]` f32.
    fn qdequant(words: IntTensor<Self>, spec: QSpec) -> FloatTensor<Self> {
        let device = Self::int_device(&words);
        host_dequant::<Self>(words, spec, &device)
            .into_primitive()
            .tensor()
    }
}

/// The host path: reads the words back, dequantizes them on the CPU and uploads the result.
/// A bad buffer (it cannot happen for words this module packed) gives zeros, not a panic.
fn host_dequant<B: Backend>(words: IntTensor<B>, spec: QSpec, device: &B::Device) -> Tensor<B, 2> {
    let words = Tensor::<B, 1, Int>::from_primitive(words)
        .into_data()
        .convert::<i32>()
        .to_vec::<i32>()
        .unwrap_or_default();
    let mut values = vec![0.0f32; spec.rows * spec.cols];
    if words.len() == spec.words() {
        let bytes = unpack(&spec, &words);
        if let Err(e) = dequantize(spec.dtype(), &bytes, &mut values) {
            tracing::error!(error = %e, "dequantizing repacked weights");
        }
    }
    Tensor::from_data(TensorData::new(values, [spec.rows, spec.cols]), device)
}

#[cfg(feature = "flex")]
impl QuantOps for burn::backend::Flex {}

/// A weight matrix of the Burn path: f32 on the device, or quantized words that the backend's
/// kernels multiply by. Either is held in parts along its output features, each at most the
/// largest buffer the device binds (128 MiB on many wgpu adapters; a token embedding of a 128k
/// vocabulary is more).
#[derive(Clone, Debug)]
pub(crate) enum Weight<B: Backend> {
    /// Dequantized, stored `[in, part]` so that `x.matmul(w)` needs no transposed view.
    Dense(Vec<Tensor<B, 2>>),
    /// Repacked GGUF blocks of `[part, in]` rows.
    Quant(Vec<(Tensor<B, 1, Int>, QSpec)>),
}

impl<B: QuantOps> Weight<B> {
    /// `x` (`[n, in]`) times this matrix: `[n, out]`.
    pub(crate) fn apply(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut outs: Vec<Tensor<B, 2>> = match self {
            Weight::Dense(parts) => parts.iter().map(|w| x.clone().matmul(w.clone())).collect(),
            Weight::Quant(parts) => parts
                .iter()
                .map(|(words, spec)| {
                    Tensor::from_primitive(TensorPrimitive::Float(B::qmatmul(
                        x.clone().into_primitive().tensor(),
                        words.clone().into_primitive(),
                        *spec,
                    )))
                })
                .collect(),
        };
        if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(outs, 1)
        }
    }

    /// Bytes on the device.
    pub(crate) fn device_bytes(&self) -> usize {
        match self {
            Weight::Dense(parts) => parts.iter().map(|w| w.shape().num_elements() * 4).sum(),
            Weight::Quant(parts) => parts.iter().map(|(_, spec)| spec.device_bytes()).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::synth::{Rng, random_blocks};

    /// Matrices of every device type: (type, rows, cols), with a block of zero scale and one
    /// of subnormal scale among the random ones.
    fn cases() -> Vec<(GgmlType, usize, usize, Vec<u8>)> {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        DEVICE_TYPES
            .iter()
            .map(|&dtype| {
                let cols = if dtype.block_size() == 32 { 96 } else { 512 };
                let rows = 7;
                let blocks = rows * cols / dtype.block_size();
                let mut bytes = random_blocks(dtype, blocks, 0.05, &mut rng);
                let size = dtype.type_size();
                let head = if dtype == GgmlType::Q6K { 208 } else { 0 };
                bytes[head..head + 2].copy_from_slice(&0u16.to_le_bytes());
                bytes[size + head..size + head + 2].copy_from_slice(&0x0123u16.to_le_bytes());
                (dtype, rows, cols, bytes)
            })
            .collect()
    }

    #[test]
    fn repacking_keeps_the_size_and_unpacks_to_the_same_blocks() {
        for (dtype, rows, cols, bytes) in cases() {
            let spec = QSpec::new(dtype, rows, cols).expect("a device type");
            let words = repack(&spec, &bytes).expect("repacks");
            assert!(words.len() * 4 <= bytes.len() + 4, "{dtype:?}");
            assert_eq!(unpack(&spec, &words), bytes, "{dtype:?}");
            assert!(repack(&spec, &bytes[1..]).is_err());
        }
        assert!(QSpec::new(GgmlType::Q2K, 1, 256).is_none());
        assert!(QSpec::new(GgmlType::Q4K, 1, 96).is_none());
    }

    /// The host path (what a backend without kernels runs) against plain dequantization.
    #[cfg(feature = "flex")]
    #[test]
    fn host_path_multiplies_like_the_dequantized_matrix() {
        check_backend::<burn::backend::Flex>(&Default::default(), &[1, 3]);
    }

    /// The CubeCL kernels on wgpu (lavapipe in CI) against the CPU's dequantization, for
    /// random blocks of every type: each decoded element, and products of 1 to 24 rows (up
    /// to 16 rows run `qmatvec`, more the decoded matrix and Burn's matmul).
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_kernels_match_the_cpu_on_every_type() {
        let device = match crate::device::DeviceChoice::Wgpu.resolve() {
            Ok(crate::device::Device::Wgpu { device, .. }) => device,
            other => panic!("a wgpu adapter (install mesa-vulkan-drivers): {other:?}"),
        };
        const { assert!(<crate::device::Wgpu as QuantOps>::ON_DEVICE) };
        check_backend::<crate::device::Wgpu>(&device, &[1, 2, 5, 8, 13, 24]);
    }

    fn check_backend<B: QuantOps>(device: &B::Device, row_counts: &[usize]) {
        let mut rng = Rng(77);
        for (dtype, rows, cols, bytes) in cases() {
            let spec = QSpec::new(dtype, rows, cols).expect("a device type");
            let mut want = vec![0.0f32; rows * cols];
            dequantize(dtype, &bytes, &mut want).expect("dequantizes");
            let words = repack(&spec, &bytes).expect("repacks");
            let n = words.len();
            let words = Tensor::<B, 1, Int>::from_data(TensorData::new(words, [n]), device);
            let got = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::qdequant(
                words.clone().into_primitive(),
                spec,
            )))
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{dtype:?} element {i}: {g} against {w}"
                );
            }
            let weight = Weight::<B>::Quant(vec![(words.clone(), spec)]);
            for &n in row_counts {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(1.0)).collect();
                let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [n, cols]), device);
                let got = weight.apply(xt).into_data().to_vec::<f32>().expect("f32");
                assert_eq!(got.len(), n * rows);
                for r in 0..n {
                    for o in 0..rows {
                        let expect: f32 = (0..cols)
                            .map(|c| x[r * cols + c] * want[o * cols + c])
                            .sum();
                        let g = got[r * rows + o];
                        assert!(
                            (g - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                            "{dtype:?}, {n} rows: out[{r}, {o}] = {g}, want {expect}"
                        );
                    }
                }
            }
        }
    }
}
