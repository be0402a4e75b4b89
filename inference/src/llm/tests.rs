//! Synthetic models (small random GGUF files built here) run through both execution paths and
//! checked against a naive f64 forward pass written from the architecture's definition. They
//! cover what the default model does not: qwen2 (q/k/v biases, NEOX rotary embedding), an
//! untied LM head, Llama 3.1 `rope_freqs`, grouped-query attention with 2 groups, and errors.

use super::*;
use crate::device::Device;

/// A tiny GGUF writer (version 3, F32 tensors only).
struct GgufBuilder {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl GgufBuilder {
    fn new() -> Self {
        GgufBuilder {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
        }
    }
    fn key(&mut self, key: &str, type_id: u32) {
        put_str(&mut self.kv, key);
        self.kv.extend_from_slice(&type_id.to_le_bytes());
        self.n_kv += 1;
    }
    fn string(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key, 8);
        put_str(&mut self.kv, value);
        self
    }
    fn u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.key(key, 4);
        self.kv.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn f32(&mut self, key: &str, value: f32) -> &mut Self {
        self.key(key, 6);
        self.kv.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], values: Vec<f32>) -> &mut Self {
        assert_eq!(dims.iter().product::<u64>() as usize, values.len());
        self.tensors.push((name.to_string(), dims.to_vec(), values));
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        let mut offset = 0u64;
        for (name, dims, values) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes()); // F32
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + values.len() as u64 * 4).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        for (_, _, values) in &self.tensors {
            let start = out.len();
            out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            out.resize(start + (out.len() - start).next_multiple_of(32), 0);
        }
        out
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, scale: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(scale)).collect()
    }
}

/// Shapes of a synthetic model.
#[derive(Clone, Copy)]
struct Shape {
    arch: Architecture,
    tied: bool,
    rope_freqs: bool,
    /// Whether a llama file names a sliding window for all its layers (Mistral 7B v0.1);
    /// gemma3 always has one.
    window: bool,
}

/// The synthetic models' sliding window.
const WINDOW: usize = 4;
/// The rotary base of the global layers (the file's `rope.freq_base`).
const GLOBAL_BASE: f64 = 50_000.0;

impl Shape {
    fn is(self, arch: Architecture) -> bool {
        self.arch == arch
    }

    /// Qwen3's and Gemma 3's heads are wider than `D / H` (their `attention.key_length`).
    fn head_dim(self) -> usize {
        if self.qk_norm() { 24 } else { HD }
    }

    fn qk_norm(self) -> bool {
        self.is(Architecture::Qwen3) || self.is(Architecture::Gemma3)
    }

    /// Gemma 3's sixth layer is its first global one.
    fn layers(self) -> usize {
        if self.is(Architecture::Gemma3) {
            6
        } else {
            LAYERS
        }
    }

    /// The rotary base of layer `l` (gemma3: 10 000 for the local layers).
    fn rope_base(self, l: usize) -> f64 {
        if self.global(l) || !self.is(Architecture::Gemma3) {
            GLOBAL_BASE
        } else {
            10_000.0
        }
    }

    /// Whether layer `l` sees every position (gemma3: one in six; the others, and all layers
    /// of a windowed llama, see the last [`WINDOW`]).
    fn global(self, l: usize) -> bool {
        if self.is(Architecture::Gemma3) {
            l % 6 == 5
        } else {
            !self.window
        }
    }
}

const D: usize = 64;
const H: usize = 4;
const KV: usize = 2;
const HD: usize = 16;
const FF: usize = 96;
const VOCAB: usize = 50;
const LAYERS: usize = 2;

/// The weights by name, as the naive reference reads them (`[out][in]` row-major).
type Weights = std::collections::HashMap<String, Vec<f32>>;

fn synthetic(shape: Shape) -> (Vec<u8>, Weights) {
    let hd = shape.head_dim();
    let arch = shape.arch.name();
    let mut b = GgufBuilder::new();
    b.string("general.architecture", arch)
        .u32(&format!("{arch}.block_count"), shape.layers() as u32)
        .u32(&format!("{arch}.context_length"), 64)
        .u32(&format!("{arch}.embedding_length"), D as u32)
        .u32(&format!("{arch}.feed_forward_length"), FF as u32)
        .u32(&format!("{arch}.attention.head_count"), H as u32)
        .u32(&format!("{arch}.attention.head_count_kv"), KV as u32)
        .f32(&format!("{arch}.rope.freq_base"), GLOBAL_BASE as f32)
        .f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-6);
    if shape.is(Architecture::Gemma3) || shape.window {
        b.u32(&format!("{arch}.attention.sliding_window"), WINDOW as u32);
    }
    if shape.is(Architecture::Qwen3) || shape.is(Architecture::Gemma3) {
        // Qwen3's and Gemma 3's heads are wider than d_model / heads.
        b.u32(&format!("{arch}.attention.key_length"), hd as u32)
            .u32(&format!("{arch}.attention.value_length"), hd as u32);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut weights = Weights::new();
    let mut add = |b: &mut GgufBuilder, name: &str, dims: &[u64], values: Vec<f32>| {
        b.tensor(name, dims, values.clone());
        weights.insert(name.to_string(), values);
    };
    add(
        &mut b,
        "token_embd.weight",
        &[D as u64, VOCAB as u64],
        rng.vec(VOCAB * D, 1.0),
    );
    let norm = |rng: &mut Rng| (0..D).map(|_| 1.0 + rng.next(0.2)).collect::<Vec<f32>>();
    add(&mut b, "output_norm.weight", &[D as u64], norm(&mut rng));
    if !shape.tied {
        add(
            &mut b,
            "output.weight",
            &[D as u64, VOCAB as u64],
            rng.vec(VOCAB * D, 0.3),
        );
    }
    if shape.rope_freqs {
        let f: Vec<f32> = (0..hd / 2).map(|i| 1.0 + i as f32 * 0.7).collect();
        add(&mut b, "rope_freqs.weight", &[(hd / 2) as u64], f);
    }
    let s = 1.0 / (D as f32).sqrt();
    // phi3's fused matrices, by the names of their parts (the reference reads the parts).
    let mut parts: Vec<(String, Vec<f32>)> = Vec::new();
    for l in 0..shape.layers() {
        let n = |x: &str| format!("blk.{l}.{x}");
        add(&mut b, &n("attn_norm.weight"), &[D as u64], norm(&mut rng));
        add(&mut b, &n("ffn_norm.weight"), &[D as u64], norm(&mut rng));
        let mut fused: Vec<(&str, Vec<f32>)> = Vec::new();
        for (name, out, inp) in [
            ("attn_q.weight", H * hd, D),
            ("attn_k.weight", KV * hd, D),
            ("attn_v.weight", KV * hd, D),
            ("attn_output.weight", D, H * hd),
            ("ffn_gate.weight", FF, D),
            ("ffn_up.weight", FF, D),
            ("ffn_down.weight", D, FF),
        ] {
            let values = rng.vec(out * inp, 2.0 * s);
            let in_fused = ["attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"]
                .iter()
                .any(|p| name.starts_with(p));
            if shape.is(Architecture::Phi3) && in_fused {
                // phi3 files fuse q, k, v (rows in that order) and gate, up: the reference
                // reads the parts.
                parts.push((n(name), values.clone()));
                fused.push((name, values));
            } else {
                add(&mut b, &n(name), &[inp as u64, out as u64], values);
            }
        }
        if shape.is(Architecture::Phi3) {
            let concat = |names: &[&str]| -> Vec<f32> {
                names
                    .iter()
                    .flat_map(|want| {
                        fused
                            .iter()
                            .find(|(name, _)| name == want)
                            .unwrap()
                            .1
                            .clone()
                    })
                    .collect()
            };
            let qkv = concat(&["attn_q.weight", "attn_k.weight", "attn_v.weight"]);
            b.tensor(
                &n("attn_qkv.weight"),
                &[D as u64, ((H + 2 * KV) * hd) as u64],
                qkv,
            );
            let gate_up = concat(&["ffn_gate.weight", "ffn_up.weight"]);
            b.tensor(&n("ffn_up.weight"), &[D as u64, (2 * FF) as u64], gate_up);
        }
        if shape.is(Architecture::Gemma3) {
            add(
                &mut b,
                &n("post_attention_norm.weight"),
                &[D as u64],
                norm(&mut rng),
            );
            add(
                &mut b,
                &n("post_ffw_norm.weight"),
                &[D as u64],
                norm(&mut rng),
            );
        }
        if shape.qk_norm() {
            let norm = |rng: &mut Rng| (0..hd).map(|_| 1.0 + rng.next(0.5)).collect::<Vec<f32>>();
            add(
                &mut b,
                &n("attn_q_norm.weight"),
                &[hd as u64],
                norm(&mut rng),
            );
            add(
                &mut b,
                &n("attn_k_norm.weight"),
                &[hd as u64],
                norm(&mut rng),
            );
        }
        if shape.is(Architecture::Qwen2) {
            add(
                &mut b,
                &n("attn_q.bias"),
                &[(H * hd) as u64],
                rng.vec(H * hd, 0.5),
            );
            add(
                &mut b,
                &n("attn_k.bias"),
                &[(KV * hd) as u64],
                rng.vec(KV * hd, 0.5),
            );
            add(
                &mut b,
                &n("attn_v.bias"),
                &[(KV * hd) as u64],
                rng.vec(KV * hd, 0.5),
            );
        }
    }
    weights.extend(parts);
    (b.build(), weights)
}

/// The textbook forward pass in f64, one token at a time, returning the last logits.
fn naive(w: &Weights, shape: Shape, tokens: &[u32]) -> Vec<f64> {
    let hd = shape.head_dim();
    let get = |name: &str| -> Vec<f64> { w[name].iter().map(|&v| f64::from(v)).collect() };
    let matvec = |m: &[f64], x: &[f64]| -> Vec<f64> {
        m.chunks(x.len())
            .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let rmsnorm = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + 1e-6).sqrt();
        x.iter().zip(g).map(|(a, b)| a * r * b).collect()
    };
    let freqs = |base: f64| -> Vec<f64> {
        (0..hd / 2)
            .map(|i| {
                let f = if shape.rope_freqs {
                    1.0 + i as f64 * 0.7
                } else {
                    1.0
                };
                base.powf(-2.0 * i as f64 / hd as f64) / f64::from(f as f32)
            })
            .collect()
    };
    let rope = |v: &mut [f64], pos: usize, base: f64| {
        for (i, f) in freqs(base).iter().enumerate() {
            let (c, s) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
            // llama GGUF: adjacent pairs; qwen2, qwen3 and phi3 (HF rotate_half): halves.
            let (a, b) = if shape.arch != Architecture::Llama {
                (i, i + hd / 2)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (v[a], v[b]);
            v[a] = x0 * c - x1 * s;
            v[b] = x0 * s + x1 * c;
        }
    };
    let embd = get("token_embd.weight");
    let mut ks: Vec<Vec<Vec<f64>>> = vec![Vec::new(); shape.layers()];
    let mut vs: Vec<Vec<Vec<f64>>> = vec![Vec::new(); shape.layers()];
    let mut x = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        x = embd[t as usize * D..(t as usize + 1) * D].to_vec();
        if shape.is(Architecture::Gemma3) {
            // Gemma scales its embeddings by sqrt(d_model).
            let scale = f64::from((D as f32).sqrt());
            x.iter_mut().for_each(|v| *v *= scale);
        }
        for l in 0..shape.layers() {
            let n = |s: &str| format!("blk.{l}.{s}");
            let h = rmsnorm(&x, &get(&n("attn_norm.weight")));
            let proj = |name: &str, bias: &str| {
                let mut y = matvec(&get(&n(name)), &h);
                if shape.is(Architecture::Qwen2) {
                    y.iter_mut().zip(get(&n(bias))).for_each(|(a, b)| *a += b);
                }
                y
            };
            let mut q = proj("attn_q.weight", "attn_q.bias");
            let mut k = proj("attn_k.weight", "attn_k.bias");
            let v = proj("attn_v.weight", "attn_v.bias");
            if shape.qk_norm() {
                // Each head RMS-normalised with its own weights, before the rotation.
                let (qn, kn) = (get(&n("attn_q_norm.weight")), get(&n("attn_k_norm.weight")));
                for head in q.chunks_mut(hd) {
                    let normed = rmsnorm(head, &qn);
                    head.copy_from_slice(&normed);
                }
                for head in k.chunks_mut(hd) {
                    let normed = rmsnorm(head, &kn);
                    head.copy_from_slice(&normed);
                }
            }
            let base = shape.rope_base(l);
            q.chunks_mut(hd).for_each(|head| rope(head, pos, base));
            k.chunks_mut(hd).for_each(|head| rope(head, pos, base));
            ks[l].push(k);
            vs[l].push(v);
            // A local layer sees the last WINDOW positions, itself included.
            let first = if shape.global(l) {
                0
            } else {
                (pos + 1).saturating_sub(WINDOW)
            };
            let mut att = vec![0.0; H * hd];
            for head in 0..H {
                let kvh = head / (H / KV);
                let qh = &q[head * hd..(head + 1) * hd];
                let scores: Vec<f64> = ks[l][first..]
                    .iter()
                    .map(|k| {
                        let kh = &k[kvh * hd..(kvh + 1) * hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, v) in e.iter().zip(&vs[l][first..]) {
                    for d in 0..hd {
                        att[head * hd + d] += p / z * v[kvh * hd + d];
                    }
                }
            }
            let mut o = matvec(&get(&n("attn_output.weight")), &att);
            if shape.is(Architecture::Gemma3) {
                o = rmsnorm(&o, &get(&n("post_attention_norm.weight")));
            }
            x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
            let h = rmsnorm(&x, &get(&n("ffn_norm.weight")));
            let g = matvec(&get(&n("ffn_gate.weight")), &h);
            let u = matvec(&get(&n("ffn_up.weight")), &h);
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| {
                    if shape.is(Architecture::Gemma3) {
                        // GELU, tanh approximation.
                        let inner =
                            (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                        0.5 * g * (1.0 + inner.tanh()) * u
                    } else {
                        g / (1.0 + (-g).exp()) * u
                    }
                })
                .collect();
            let mut o = matvec(&get(&n("ffn_down.weight")), &a);
            if shape.is(Architecture::Gemma3) {
                o = rmsnorm(&o, &get(&n("post_ffw_norm.weight")));
            }
            x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
        }
    }
    let h = rmsnorm(&x, &get("output_norm.weight"));
    let head = if shape.tied {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    matvec(&get(head), &h)
}

/// The synthetic model in `bytes`, on the CPU with `kernels`.
fn load(bytes: &[u8], kernels: CpuKernels) -> LlmModel {
    let file = GgufFile::from_bytes(bytes).expect("valid gguf");
    let options = LlmOptions {
        cpu_kernels: kernels,
        ..LlmOptions::default()
    };
    LlmModel::from_gguf(file, &Device::Cpu, &options).expect("loads")
}

fn check(shape: Shape) {
    let (bytes, weights) = synthetic(shape);
    let tokens: Vec<u32> = vec![3, 17, 42, 8, 8, 29, 1, 49, 0, 13];
    let want = naive(&weights, shape, &tokens);
    for kernels in [CpuKernels::Quantized, CpuKernels::Burn] {
        let model = load(&bytes, kernels);
        assert_eq!(model.config().tied_embeddings, shape.tied);
        assert_eq!(model.config().qkv_bias, shape.is(Architecture::Qwen2));
        assert_eq!(model.config().qk_norm, shape.qk_norm());
        assert_eq!(model.config().head_dim, shape.head_dim());
        // Prefill in one call, and token by token, must both match.
        for split in [tokens.len(), 1] {
            let mut seq = model.new_sequence();
            let mut logits = Vec::new();
            for chunk in tokens.chunks(split) {
                seq.forward(chunk, &mut logits).expect("forward");
            }
            let err = max_error(&logits, &want);
            assert!(
                err < 2e-3,
                "{kernels:?} split {split}: max logit error {err}"
            );
        }
    }
}

/// Largest absolute difference between logits and a reference.
fn max_error(logits: &[f32], want: &[f64]) -> f64 {
    logits
        .iter()
        .zip(want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max)
}

/// Three sequences stepped together, as continuous batching runs them: prompts of different
/// lengths prefilled in one step, then decode steps of one token each, with a sequence joining
/// late and one leaving early. Each must get the logits the naive reference gives its own
/// tokens, on both paths (each stacks the sequences' rows for the weight products).
#[test]
fn batched_steps_give_each_sequence_its_own_logits() {
    let shape = Shape {
        arch: Architecture::Qwen2,
        tied: false,
        rope_freqs: false,
        window: false,
    };
    let (bytes, weights) = synthetic(shape);
    let prompts: [Vec<u32>; 3] = [
        vec![3, 17, 42, 8, 8],
        vec![29, 1, 49],
        vec![0, 13, 7, 7, 21, 5, 2],
    ];
    let decode: [Vec<u32>; 3] = [vec![11, 12, 13, 14], vec![40, 41], vec![9, 8, 7, 6]];
    for kernels in [CpuKernels::Quantized, CpuKernels::Burn] {
        let model = load(&bytes, kernels);
        let mut seqs: Vec<Sequence> = (0..3).map(|_| model.new_sequence()).collect();
        let mut seen: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut logits = vec![Vec::new(); 3];
        // Step 0: sequences 0 and 1 prefill together; sequence 2 joins at step 1 with its
        // whole prompt beside the others' first decoded tokens; sequence 1 leaves after two
        // decode steps.
        for step in 0..6 {
            let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
            for i in 0..3 {
                let joined = if i == 2 { step >= 1 } else { true };
                if !joined {
                    continue;
                }
                let start = if i == 2 { 1 } else { 0 };
                let t = step - start;
                let input = if t == 0 {
                    prompts[i].clone()
                } else {
                    match decode[i].get(t - 1) {
                        Some(&token) => vec![token],
                        None => continue,
                    }
                };
                inputs.push((i, input));
            }
            if inputs.is_empty() {
                break;
            }
            let mut batch: Vec<(&mut Sequence, &[u32])> = Vec::new();
            let mut outs: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
            for (seq_index, seq) in seqs.iter_mut().enumerate() {
                if let Some((_, input)) = inputs.iter().find(|(i, _)| *i == seq_index) {
                    batch.push((seq, input.as_slice()));
                }
            }
            model
                .forward_batch(&mut batch, &mut outs)
                .expect("batched step");
            for ((i, input), out) in inputs.iter().zip(outs) {
                seen[*i].extend_from_slice(input);
                logits[*i] = out;
                let want = naive(&weights, shape, &seen[*i]);
                let err = max_error(&logits[*i], &want);
                assert!(
                    err < 2e-3,
                    "{kernels:?} step {step} sequence {i}: max logit error {err}"
                );
            }
        }
        for (i, seq) in seqs.iter().enumerate() {
            assert_eq!(seq.len(), prompts[i].len() + decode[i].len(), "{kernels:?}");
        }
    }
}

#[test]
fn a_batched_step_refuses_bad_shapes_and_overflow_without_running() {
    let (bytes, _) = synthetic(Shape {
        arch: Architecture::Llama,
        tied: true,
        rope_freqs: false,
        window: false,
    });
    let file = GgufFile::from_bytes(&bytes).expect("valid gguf");
    let model = LlmModel::from_gguf(file, &Device::Cpu, &LlmOptions::default()).expect("loads");
    let (mut a, mut b) = (model.new_sequence(), model.new_sequence());
    let too_long = vec![1u32; MAX_BATCH_TOKENS];
    let mut outs = vec![Vec::new(); 2];
    assert!(
        model
            .forward_batch(
                &mut [(&mut a, &too_long[..]), (&mut b, &[2][..])],
                &mut outs
            )
            .is_err()
    );
    assert!(
        model
            .forward_batch(&mut [(&mut a, &[][..]), (&mut b, &[2][..])], &mut outs)
            .is_err()
    );
    assert!(
        model
            .forward_batch(&mut [(&mut a, &[1][..]), (&mut b, &[99][..])], &mut outs)
            .is_err(),
        "a token outside the vocabulary"
    );
    // The context is 64 positions: a 60-token prompt plus 5 overflows before anything runs.
    let long = vec![1u32; 60];
    let mut logits = Vec::new();
    a.forward(&long, &mut logits).expect("prefill");
    let err = model
        .forward_batch(
            &mut [(&mut a, &[1, 2, 3, 4, 5][..]), (&mut b, &[2][..])],
            &mut outs,
        )
        .unwrap_err();
    assert!(matches!(err, LlmError::ContextOverflow { .. }), "{err}");
    assert_eq!((a.len(), b.len()), (60, 0), "nothing ran");
}

#[test]
fn llama_with_untied_head_and_rope_freqs_matches_naive_reference() {
    check(Shape {
        arch: Architecture::Llama,
        tied: false,
        rope_freqs: true,
        window: false,
    });
}

#[test]
fn qwen2_with_biases_and_neox_rope_matches_naive_reference() {
    check(Shape {
        arch: Architecture::Qwen2,
        tied: true,
        rope_freqs: false,
        window: false,
    });
}

#[test]
fn qwen3_with_head_norms_and_wide_heads_matches_naive_reference() {
    check(Shape {
        arch: Architecture::Qwen3,
        tied: false,
        rope_freqs: false,
        window: false,
    });
}

#[test]
fn phi3_with_fused_projections_matches_naive_reference() {
    check(Shape {
        arch: Architecture::Phi3,
        tied: false,
        rope_freqs: false,
        window: false,
    });
}

#[test]
fn gemma3_with_sliding_windows_and_post_norms_matches_naive_reference() {
    let shape = Shape {
        arch: Architecture::Gemma3,
        tied: true,
        rope_freqs: false,
        window: false,
    };
    check(shape);
    let (bytes, _) = synthetic(shape);
    let config = load(&bytes, CpuKernels::Quantized).config().clone();
    let windows: Vec<Option<usize>> = (0..6).map(|l| config.window(l)).collect();
    assert_eq!(
        windows,
        [
            Some(WINDOW),
            Some(WINDOW),
            Some(WINDOW),
            Some(WINDOW),
            Some(WINDOW),
            None
        ]
    );
}

#[test]
fn mistral_llama_with_a_sliding_window_matches_naive_reference() {
    let shape = Shape {
        arch: Architecture::Llama,
        tied: false,
        rope_freqs: false,
        window: true,
    };
    check(shape);
    let (bytes, _) = synthetic(shape);
    let config = load(&bytes, CpuKernels::Quantized).config().clone();
    assert_eq!(config.sliding_window, Some(WINDOW));
    assert_eq!(
        config.rope_base_local, None,
        "one rotary base for all layers"
    );
    assert!((0..LAYERS).all(|l| config.window(l) == Some(WINDOW)));
}

#[test]
fn unsupported_architecture_and_missing_tensors_are_clear_errors() {
    let mut b = GgufBuilder::new();
    b.string("general.architecture", "mamba");
    let file = GgufFile::from_bytes(&b.build()).expect("valid gguf");
    let err = LlmModel::from_gguf(file, &Device::Cpu, &LlmOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported model architecture \"mamba\""),
        "{err}"
    );

    let (bytes, _) = synthetic(Shape {
        arch: Architecture::Llama,
        tied: true,
        rope_freqs: false,
        window: false,
    });
    // Drop the last layer's ffn_down by renaming it.
    let needle = b"blk.1.ffn_down.weight";
    let mut broken = bytes.clone();
    let at = broken
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor name present");
    broken[at..at + needle.len()].copy_from_slice(b"blk.1.ffn_dowX.weight");
    let file = GgufFile::from_bytes(&broken).expect("still a valid gguf");
    let err = LlmModel::from_gguf(file, &Device::Cpu, &LlmOptions::default()).unwrap_err();
    assert!(err.to_string().contains("blk.1.ffn_down.weight"), "{err}");
}
