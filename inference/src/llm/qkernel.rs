//! CubeCL kernels over repacked quantized weights (see `qweight`), wired into Burn's GPU
//! backends (wgpu, CUDA) as custom operations, through kernel fusion's custom-op hook.
//!
//! Two kernels share one element decoder, [`weight_at`], which follows `gguf::dequant` (and so
//! ggml's `dequantize_row_*`) operation for operation:
//! - `qmatvec`: a few activation rows (decode steps, batched decode) times the quantized
//!   matrix. One cube (64 units) per output feature and tile of up to 8 rows; the units stride
//!   over the columns, so neighbouring units read neighbouring bytes of one weight row, each
//!   weight is decoded once per tile in registers, and a shared-memory tree sums the partials.
//! - `qdequant`: the matrix decoded to f32 on the device, for a prefill step of many rows: it
//!   is then multiplied by Burn's tuned matmul and dropped (one matrix at a time, never the
//!   model).

use burn::tensor::DType;
use burn::tensor::Shape;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::qweight::{QSpec, QuantOps, layout};

/// Units per cube.
const UNITS: usize = 64;
/// Activation rows up to which a product runs `qmatvec` (more: dequantize, then matmul).
const MATVEC_ROWS: usize = 16;
/// Cubes along x at most (wgpu's limit per dimension is 65 535).
const MAX_CUBES_X: usize = 32_768;

/// Elements per block of type `code` (the order of `qweight::DEVICE_TYPES`).
fn block_elems(code: u32) -> usize {
    layout(code).0
}

/// Bytes of one block's head (its f16 scales).
fn head_bytes(code: u32) -> usize {
    layout(code).1
}

/// 32-bit words of one block's body.
fn body_words(code: u32) -> usize {
    layout(code).2
}

/// An f16 (the low 16 bits of `h`) as f32, by its bits (no f16 support needed on the device).
#[cube]
fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u32) << 16u32;
    let exp = (h >> 10u32) & 0x1Fu32;
    let man = h & 0x3FFu32;
    let normal = f32::reinterpret(sign | ((exp + 112u32) << 23u32) | (man << 13u32));
    let special = f32::reinterpret(sign | 0x7F80_0000u32 | (man << 13u32));
    let magnitude = f32::cast_from(man) * 0.000_000_059_604_645f32;
    let subnormal = select(sign != 0u32, -magnitude, magnitude);
    let value = select(exp == 0u32, subnormal, normal);
    select(exp == 31u32, special, value)
}

/// Byte `i` of the body that starts at word `base`.
#[cube]
fn byte(w: &Array<u32>, base: usize, i: usize) -> u32 {
    (w[base + i / 4] >> (u32::cast_from(i % 4) * 8u32)) & 0xFFu32
}

/// A byte as the i8 it encodes, in f32.
#[cube]
fn signed(b: u32) -> f32 {
    f32::cast_from(b) - select(b >= 128u32, 256.0f32, 0.0f32)
}

/// Element (`row`, `col`) of the repacked `[rows, cols]` matrix of type `code`.
#[cube]
fn weight_at(
    w: &Array<u32>,
    row: usize,
    col: usize,
    cols: usize,
    body0: usize,
    #[comptime] code: u32,
) -> f32 {
    let bs = comptime!(block_elems(code));
    let blk = row * (cols / bs) + col / bs;
    let e = col % bs;
    let head = if comptime!(head_bytes(code) == 4) {
        w[blk]
    } else {
        (w[blk / 2] >> (u32::cast_from(blk % 2) * 16u32)) & 0xFFFFu32
    };
    let base = body0 + blk * comptime!(body_words(code));
    let d = f16_to_f32(head & 0xFFFFu32);
    if comptime!(code == 0) {
        // Q4_0: low nibbles are elements 0..16, high nibbles 16..32; (q - 8) * d.
        let q = (byte(w, base, e % 16) >> (u32::cast_from(e / 16) * 4u32)) & 0xFu32;
        (f32::cast_from(q) - 8.0f32) * d
    } else if comptime!(code == 1) {
        // Q4_1: q * d + m.
        let m = f16_to_f32(head >> 16u32);
        let q = (byte(w, base, e % 16) >> (u32::cast_from(e / 16) * 4u32)) & 0xFu32;
        f32::cast_from(q) * d + m
    } else if comptime!(code == 2) {
        // Q8_0: i8 * d.
        signed(byte(w, base, e)) * d
    } else if comptime!(code >= 6) {
        // Q5_0 and Q5_1: body qh (bit e is element e's fifth bit), qs[16] as in Q4_0.
        let lo = (byte(w, base, 4 + e % 16) >> (u32::cast_from(e / 16) * 4u32)) & 0xFu32;
        let q = f32::cast_from(lo | (((w[base] >> u32::cast_from(e)) & 1u32) << 4u32));
        if comptime!(code == 6) {
            (q - 16.0f32) * d
        } else {
            q * d + f16_to_f32(head >> 16u32)
        }
    } else if comptime!(code == 5) {
        // Q6_K: body ql[128], qh[64], scales[16]; d * scale * (q - 32).
        let n = e / 128;
        let r = e % 128;
        let k = r / 32;
        let l = r % 32;
        let lo =
            (byte(w, base, 64 * n + l + 32 * (k % 2)) >> (u32::cast_from(k / 2) * 4u32)) & 0xFu32;
        let hi = (byte(w, base, 128 + 32 * n + l) >> (u32::cast_from(k) * 2u32)) & 3u32;
        let scale = signed(byte(w, base, 192 + 8 * n + l / 16 + 2 * k));
        d * scale * (f32::cast_from(lo | (hi << 4u32)) - 32.0f32)
    } else {
        // Q4_K and Q5_K: body scales[12], (Q5_K: qh[32],) qs[128]; group g of 32 elements
        // has a 6-bit scale and minimum (ggml's get_scale_min_k4); d * scale * q - dmin * min.
        let dmin = f16_to_f32(head >> 16u32);
        let g = e / 32;
        let l = e % 32;
        let a = byte(w, base, g + 4);
        let b = byte(w, base, g % 4);
        let c = byte(w, base, g);
        let low = g < 4;
        let sc = select(low, b & 63u32, (a & 0xFu32) | ((b >> 6u32) << 4u32));
        let mn = select(low, a & 63u32, (a >> 4u32) | ((c >> 6u32) << 4u32));
        let qs0 = comptime!(if code == 3 { 12usize } else { 44usize });
        let mut q =
            (byte(w, base, qs0 + 32 * (g / 2) + l) >> (u32::cast_from(g % 2) * 4u32)) & 0xFu32;
        if comptime!(code == 4) {
            q += ((byte(w, base, 12 + l) >> u32::cast_from(g)) & 1u32) * 16u32;
        }
        d * f32::cast_from(sc) * f32::cast_from(q) - dmin * f32::cast_from(mn)
    }
}

/// `out[r, o] = Σ_c x[r, c] · W[o, c]` for the rows of one tile and one output feature `o`.
#[cube(launch_unchecked)]
fn qmatvec(
    x: &Array<f32>,
    w: &Array<u32>,
    out: &mut Array<f32>,
    n: usize,
    rows: usize,
    cols: usize,
    body0: usize,
    #[comptime] code: u32,
    #[comptime] tile: usize,
) {
    let o = usize::cast_from(CUBE_POS_X)
        + usize::cast_from(CUBE_COUNT_X) * usize::cast_from(CUBE_POS_Z);
    if o >= rows {
        terminate!();
    }
    let r0 = usize::cast_from(CUBE_POS_Y) * tile;
    let unit = usize::cast_from(UNIT_POS_X);
    let mut acc = Array::<f32>::new(tile);
    #[unroll]
    for t in 0..tile {
        acc[t] = 0.0f32;
    }
    let mut c = unit;
    while c < cols {
        let wv = weight_at(w, o, c, cols, body0, code);
        #[unroll]
        for t in 0..tile {
            if r0 + t < n {
                acc[t] += wv * x[(r0 + t) * cols + c];
            }
        }
        c += comptime!(UNITS);
    }
    let mut partial = SharedMemory::<f32>::new(comptime!(tile * UNITS));
    #[unroll]
    for t in 0..tile {
        partial[t * comptime!(UNITS) + unit] = acc[t];
    }
    sync_cube();
    // A tree over the 64 units: 32, 16, 8, 4, 2 and 1 apart.
    reduce_step(&mut partial, unit, 32, tile);
    reduce_step(&mut partial, unit, 16, tile);
    reduce_step(&mut partial, unit, 8, tile);
    reduce_step(&mut partial, unit, 4, tile);
    reduce_step(&mut partial, unit, 2, tile);
    reduce_step(&mut partial, unit, 1, tile);
    if unit == 0 {
        #[unroll]
        for t in 0..tile {
            if r0 + t < n {
                out[(r0 + t) * rows + o] = partial[t * comptime!(UNITS)];
            }
        }
    }
}

/// One level of the partial sums' tree: unit `u < stride` adds unit `u + stride`'s sums.
#[cube]
fn reduce_step(
    partial: &mut SharedMemory<f32>,
    unit: usize,
    stride: usize,
    #[comptime] tile: usize,
) {
    if unit < stride {
        #[unroll]
        for t in 0..tile {
            let i = t * comptime!(UNITS) + unit;
            partial[i] += partial[i + stride];
        }
    }
    sync_cube();
}

/// `out[row - row0, col]` for `rows` rows from `row0`: part of the matrix decoded to f32.
#[cube(launch_unchecked)]
fn qdequant(
    w: &Array<u32>,
    out: &mut Array<f32>,
    row0: usize,
    rows: usize,
    cols: usize,
    body0: usize,
    #[comptime] code: u32,
) {
    let pos = ABSOLUTE_POS;
    if pos >= rows * cols {
        terminate!();
    }
    out[pos] = weight_at(w, row0 + pos / cols, pos % cols, cols, body0, code);
}

/// Launches `qdequant` on `rows` of the matrix: `[rows.len(), cols]` f32.
fn dequant_cube<R: CubeRuntime>(
    words: burn_cubecl::tensor::CubeTensor<R>,
    spec: QSpec,
    rows: std::ops::Range<usize>,
) -> burn_cubecl::tensor::CubeTensor<R> {
    let words = into_contiguous(words);
    let out = empty_device_dtype(
        words.client.clone(),
        words.device.clone(),
        Shape::new([rows.len(), spec.cols]),
        DType::F32,
    );
    let total = rows.len() * spec.cols;
    let cubes = total.div_ceil(256);
    let (x, y) = (cubes.min(MAX_CUBES_X), cubes.div_ceil(MAX_CUBES_X));
    // The kernel's position is linear over the grid: cubes past the end stop at once.
    let client = words.client.clone();
    unsafe {
        qdequant::launch_unchecked::<R>(
            &client,
            CubeCount::Static(x as u32, y as u32, 1),
            CubeDim::new_1d(256),
            words.into_array_arg(),
            out.clone().into_array_arg(),
            rows.start,
            rows.len(),
            spec.cols,
            spec.head_words(),
            spec.code,
        );
    }
    out
}

impl<R: CubeRuntime, BT: BoolElement> QuantOps for CubeBackend<R, f32, i32, BT> {
    const ON_DEVICE: bool = true;

    fn qmatmul(x: FloatTensor<Self>, words: IntTensor<Self>, spec: QSpec) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let dims = x.meta.shape().clone();
        let n = dims[0];
        if n > MATVEC_ROWS || x.dtype != DType::F32 {
            // Decoded in parts the device can bind, each multiplied and dropped at once.
            let max =
                (x.client.properties().memory.max_page_size as usize / (spec.cols * 4)).max(1);
            let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
            let mut outs = Vec::new();
            for start in (0..spec.rows).step_by(max) {
                let rows = start..(start + max).min(spec.rows);
                let w = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(dequant_cube(
                    words.clone(),
                    spec,
                    rows,
                )));
                outs.push(x.clone().matmul(w.transpose()));
            }
            let out = if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(outs, 1)
            };
            return out.into_primitive().tensor();
        }
        let words = into_contiguous(words);
        let out = empty_device_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::new([n, spec.rows]),
            DType::F32,
        );
        let tile = n.next_power_of_two().min(8);
        let (cx, cz) = (spec.rows.min(MAX_CUBES_X), spec.rows.div_ceil(MAX_CUBES_X));
        let client = x.client.clone();
        unsafe {
            qmatvec::launch_unchecked::<R>(
                &client,
                CubeCount::Static(cx as u32, n.div_ceil(tile) as u32, cz as u32),
                CubeDim::new_1d(UNITS as u32),
                x.into_array_arg(),
                words.into_array_arg(),
                out.clone().into_array_arg(),
                n,
                spec.rows,
                spec.cols,
                spec.head_words(),
                spec.code,
                tile,
            );
        }
        out
    }

    fn qdequant(words: IntTensor<Self>, spec: QSpec) -> FloatTensor<Self> {
        dequant_cube(words, spec, 0..spec.rows)
    }

    fn max_buffer_bytes(device: &Self::Device) -> usize {
        usize::try_from(R::client(device).properties().memory.max_page_size).unwrap_or(usize::MAX)
    }
}

/// The fused backends (what `burn::backend::Wgpu` and `Cuda` are) register the products as
/// custom operations: fusion runs what it queued before them, then the inner backend's kernel.
mod fusion {
    use burn::tensor::Element;
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use super::*;

    #[derive(Clone, Debug)]
    struct QOp<B> {
        desc: CustomOpIr,
        spec: QSpec,
        /// Whether this is the product (inputs x and the words) or the dequantization (words).
        product: bool,
        _backend: std::marker::PhantomData<B>,
    }

    impl<B: FusionBackend + QuantOps> Operation<B::FusionRuntime> for QOp<B> {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            if self.product {
                let ([x, w], [out]) = self.desc.as_fixed();
                let x = handles.get_float_tensor::<B>(x);
                let w = handles.get_int_tensor::<B>(w);
                handles.register_float_tensor::<B>(&out.id, B::qmatmul(x, w, self.spec));
            } else {
                let ([w], [out]) = self.desc.as_fixed();
                let w = handles.get_int_tensor::<B>(w);
                handles.register_float_tensor::<B>(&out.id, B::qdequant(w, self.spec));
            }
        }
    }

    impl<B: FusionBackend + QuantOps> QuantOps for Fusion<B> {
        const ON_DEVICE: bool = B::ON_DEVICE;

        fn max_buffer_bytes(device: &Self::Device) -> usize {
            B::max_buffer_bytes(device)
        }

        fn qmatmul(x: FloatTensor<Self>, words: IntTensor<Self>, spec: QSpec) -> FloatTensor<Self> {
            let client = x.client.clone();
            let n = x.shape[0];
            let streams = OperationStreams::with_inputs([&x, &words]);
            let out = TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([n, spec.rows]),
                B::FloatElem::dtype(),
            );
            let desc = CustomOpIr::new("gaia_qmatmul", &[x.into_ir(), words.into_ir()], &[out]);
            let op = QOp::<B> {
                desc: desc.clone(),
                spec,
                product: true,
                _backend: std::marker::PhantomData,
            };
            client
                .register(streams, OperationIr::Custom(desc), op)
                .output()
        }

        fn qdequant(words: IntTensor<Self>, spec: QSpec) -> FloatTensor<Self> {
            let client = words.client.clone();
            let streams = OperationStreams::with_inputs([&words]);
            let out = TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([spec.rows, spec.cols]),
                B::FloatElem::dtype(),
            );
            let desc = CustomOpIr::new("gaia_qdequant", &[words.into_ir()], &[out]);
            let op = QOp::<B> {
                desc: desc.clone(),
                spec,
                product: false,
                _backend: std::marker::PhantomData,
            };
            client
                .register(streams, OperationIr::Custom(desc), op)
                .output()
        }
    }
}
