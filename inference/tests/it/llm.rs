//! The chat model's forward pass against the independent numpy reference, and its two execution
//! paths against each other.

use gaia_inference::llm::{CpuKernels, LlmError, LlmModel, LlmOptions};
use gaia_inference::sampling::argmax;

use crate::common::{chat_model, chat_model_path, cpu, fixture};

/// Runs `prompt` and then `steps` greedy tokens (EOS ignored), returning the ids and the logits
/// of the first step.
pub fn greedy(model: &LlmModel, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<f32>) {
    let mut seq = model.new_sequence();
    let mut logits = Vec::new();
    seq.forward(prompt, &mut logits).expect("prefill");
    let first = logits.clone();
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = argmax(&logits).expect("a finite logit");
        out.push(t);
        seq.forward(&[t], &mut logits).expect("decode");
    }
    (out, first)
}

/// Asserts that `logits` holds the reference's `{ids, logits}` within `tolerance`.
pub fn assert_logits_near(name: &str, logits: &[f32], reference: &serde_json::Value, tol: f32) {
    let want = reference["logits"].as_array().expect("logits");
    for (id, logit) in ids(&reference["ids"]).iter().zip(want) {
        let want_logit = logit.as_f64().expect("logit") as f32;
        let got_logit = logits[*id as usize];
        assert!(
            (got_logit - want_logit).abs() < tol,
            "{name}: first-step logit of token {id} is {got_logit}, reference {want_logit}"
        );
    }
}

/// The ids of a fixture's JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Largest logit error the quantized path may show against the f64 reference (its activations
/// are quantized to 8 bits, like llama.cpp's); a reference step whose top-2 gap is below this
/// is a near tie that the quantized path may resolve the other way.
const QUANT_TOLERANCE: f32 = 0.5;

/// Checks `model` against `llm_greedy.json` for `steps` greedy steps on the first
/// `max_prompts` prompts. With `exact`, every id must match and the first-step logits agree to
/// 5e-3; otherwise logits agree to [`QUANT_TOLERANCE`] and the ids must match up to the first
/// step whose reference top-2 gap is below it.
pub fn check_greedy_reference(model: &LlmModel, steps: usize, max_prompts: usize, exact: bool) {
    let fx = fixture("llm_greedy.json");
    let prompts = fx["prompts"].as_array().expect("prompts");
    assert!(!prompts.is_empty());
    let tolerance = if exact { 5e-3 } else { QUANT_TOLERANCE };
    for p in prompts.iter().take(max_prompts) {
        let name = p["name"].as_str().expect("name");
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["greedy_ids"]);
        let steps = steps.min(want.len());
        let (got, first) = greedy(model, &prompt, steps);
        assert_logits_near(name, &first, &p["top2"][0], tolerance);
        if exact {
            assert_eq!(
                got,
                want[..steps],
                "{name}: greedy ids differ from the reference"
            );
            continue;
        }
        if let Some(step) = got.iter().zip(&want).position(|(a, b)| a != b) {
            let gap = p["top2"][step]["gap"].as_f64().expect("gap") as f32;
            assert!(
                gap < QUANT_TOLERANCE,
                "{name}: step {step} chose {} instead of {} although the reference's top-2 gap \
                 is {gap} (ours: {got:?})",
                got[step],
                want[step]
            );
        }
    }
}

/// The CPU kernels with f32 weights compute what the reference computes: every id of every
/// prompt, 32 steps, and the logits to 5e-3.
#[test]
fn greedy_matches_the_reference_exactly_with_f32_weights() {
    let options = LlmOptions {
        cpu_kernels: CpuKernels::F32,
        ..LlmOptions::default()
    };
    let model = LlmModel::load(&chat_model_path(), &cpu(), &options).expect("loads");
    check_greedy_reference(&model, 32, usize::MAX, true);
}

/// The Burn path (what runs on wgpu and CUDA), here on the CPU backend.
#[test]
fn greedy_matches_the_reference_exactly_on_the_burn_path() {
    let options = LlmOptions {
        cpu_kernels: CpuKernels::Burn,
        ..LlmOptions::default()
    };
    let model = LlmModel::load(&chat_model_path(), &cpu(), &options).expect("loads");
    check_greedy_reference(&model, 12, usize::MAX, true);
}

/// The default, quantized path: ids match until the reference has a near tie.
#[test]
fn greedy_matches_the_reference_with_quantized_kernels() {
    check_greedy_reference(chat_model().model(), 32, usize::MAX, false);
}

/// The sanity check of the design notes: the France prompt answers Paris. Its first step is a
/// near tie (gap 0.08), which 8-bit activations can flip, so this runs the f32-weight kernels.
#[test]
fn france_prompt_answers_paris() {
    let options = LlmOptions {
        cpu_kernels: CpuKernels::F32,
        ..LlmOptions::default()
    };
    let model = LlmModel::load(&chat_model_path(), &cpu(), &options).expect("loads");
    let prompt = chat_model()
        .chat_prompt(&[gaia_inference::template::ChatMessage::new(
            "user",
            "What is the capital of France?",
        )])
        .expect("prompt");
    let (out, _) = greedy(&model, &prompt, 8);
    let text = chat_model().tokenizer().decode(&out, true);
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn quantized_and_burn_paths_agree() {
    // The Burn path dequantizes to f32 and runs every op through the backend; the quantized
    // path quantizes activations to 8 bits. They must pick the same tokens where the choice is
    // clear and agree on the logits to a small tolerance.
    let quantized = chat_model().model();
    let options = LlmOptions {
        cpu_kernels: CpuKernels::Burn,
        ..LlmOptions::default()
    };
    let dense = LlmModel::load(&chat_model_path(), &cpu(), &options).expect("burn path loads");
    let prompt: Vec<u32> = chat_model()
        .tokenizer()
        .encode(
            "The quick brown fox jumps over the lazy dog. The capital of Italy is",
            false,
        )
        .expect("encode");
    let (a, la) = greedy(quantized, &prompt, 8);
    let (b, lb) = greedy(&dense, &prompt, 8);
    let max_diff = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 1.0,
        "first-step logits differ by up to {max_diff}"
    );
    let agree = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(
        agree >= 4,
        "the paths agree on only {agree} tokens: {a:?} vs {b:?}"
    );
}

#[test]
fn context_overflow_names_the_limit() {
    let options = LlmOptions {
        max_context: Some(16),
        ..LlmOptions::default()
    };
    let model = LlmModel::load(&chat_model_path(), &cpu(), &options).expect("loads");
    assert_eq!(model.max_context(), 16);
    let mut seq = model.new_sequence();
    let mut logits = Vec::new();
    seq.forward(&[1; 10], &mut logits).expect("fits");
    let err = seq.forward(&[1; 7], &mut logits).expect_err("overflows");
    assert!(
        matches!(
            err,
            LlmError::ContextOverflow {
                limit: 16,
                requested: 17
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("16"), "{err}");
    // The failed call left the cache untouched.
    assert_eq!(seq.len(), 10);
    seq.forward(&[1; 6], &mut logits).expect("still fits");
}

#[test]
fn invalid_token_and_truncate() {
    let model = chat_model().model();
    let mut seq = model.new_sequence();
    let mut logits = Vec::new();
    let vocab = model.config().vocab_size as u32;
    let err = seq
        .forward(&[vocab], &mut logits)
        .expect_err("out of vocabulary");
    assert!(matches!(err, LlmError::InvalidToken { .. }), "{err:?}");
    // Re-running a truncated suffix reproduces the same logits.
    let prompt = [1u32, 9690, 198, 2683, 314, 253];
    seq.forward(&prompt, &mut logits).expect("prefill");
    let full = logits.clone();
    seq.truncate(3);
    assert_eq!(seq.len(), 3);
    seq.forward(&prompt[3..], &mut logits).expect("re-run");
    let diff = full
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn prefill_in_one_call_equals_token_by_token() {
    let model = chat_model().model();
    let prompt: Vec<u32> = (0..140u32).map(|i| 100 + (i * 37) % 4000).collect();
    let mut a = model.new_sequence();
    let mut la = Vec::new();
    a.forward(&prompt, &mut la).expect("prefill");
    let mut b = model.new_sequence();
    let mut lb = Vec::new();
    for t in &prompt {
        b.forward(&[*t], &mut lb).expect("step");
    }
    let diff = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 0.05, "{diff}");
    assert_eq!(argmax(&la), argmax(&lb));
}

/// A prompt longer than 256 tokens, run the way the generation loop runs it (steps of
/// [`MAX_BATCH_TOKENS`] over a cache that already holds the earlier steps), then greedy
/// decoding: the first logits within `tol` of the CPU's f32 path on the whole prompt, and the
/// same greedy tokens. One body for every backend; it catches a causal mask aligned at the
/// wrong corner of a step's scores.
pub fn check_long_prompt_in_steps(model: &LlmModel, tol: f32) {
    let text = "The river town kept its old stone bridge, and every spring the market moved \
                across it: fishmongers first, then the weavers, then the children with kites. ";
    let prompt = chat_model()
        .tokenizer()
        .encode(&text.repeat(12), false)
        .expect("tokenizes");
    let prompt = &prompt[..300.min(prompt.len())];
    assert!(prompt.len() > 256, "{} prompt tokens", prompt.len());
    let reference = LlmModel::load(
        &chat_model_path(),
        &cpu(),
        &LlmOptions {
            cpu_kernels: CpuKernels::F32,
            ..LlmOptions::default()
        },
    )
    .expect("loads");
    let (want, want_first) = greedy(&reference, prompt, 4);
    let mut seq = model.new_sequence();
    // The generation's bound is known, so the cache is allocated once, at exactly that many
    // positions (4 bytes a value), and never grows while the steps run.
    let total = prompt.len() + want.len();
    seq.reserve(total);
    let c = model.config();
    let reserved = seq.cache_bytes();
    assert_eq!(
        reserved,
        2 * c.n_layers * total * c.n_kv_heads * c.head_dim * 4
    );
    let mut logits = Vec::new();
    for chunk in prompt.chunks(gaia_inference::llm::MAX_BATCH_TOKENS) {
        seq.forward(chunk, &mut logits).expect("a prefill step");
        assert_eq!(seq.cache_bytes(), reserved, "the reserved cache grew");
    }
    let diff = logits
        .iter()
        .zip(&want_first)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < tol, "first-step logits differ by up to {diff}");
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let t = argmax(&logits).expect("a finite logit");
        got.push(t);
        seq.forward(&[t], &mut logits).expect("decode");
    }
    assert_eq!(
        got,
        want,
        "greedy tokens after a {}-token prompt",
        prompt.len()
    );
    assert_eq!(seq.cache_bytes(), reserved, "the reserved cache grew");
}

/// The long prompt in steps on the Burn path (CPU backend).
#[test]
fn long_prompt_in_steps_matches_on_the_burn_path() {
    let options = LlmOptions {
        cpu_kernels: CpuKernels::Burn,
        ..LlmOptions::default()
    };
    let model = LlmModel::load(&chat_model_path(), &cpu(), &options).expect("loads");
    check_long_prompt_in_steps(&model, 2e-2);
}

/// The long prompt in steps on wgpu (lavapipe in CI), where autotune may pick a flash kernel.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_long_prompt_in_steps_matches_the_cpu() {
    let (_gpu, device) = crate::common::wgpu();
    let model = LlmModel::load(&chat_model_path(), &device, &LlmOptions::default()).expect("loads");
    check_long_prompt_in_steps(&model, 2e-2);
}

/// The same reference test on a GPU backend (run in CI on Mesa lavapipe: only a few tokens).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_greedy_matches_the_reference() {
    let (_gpu, device) = crate::common::wgpu();
    let model = LlmModel::load(&chat_model_path(), &device, &LlmOptions::default()).expect("loads");
    check_greedy_reference(&model, 3, 1, true);
}

/// The reference test on CUDA where an NVIDIA GPU is present (CI has none: there the backend
/// must report its absence as an error, not a panic).
#[cfg(feature = "cuda")]
#[test]
fn cuda_greedy_matches_the_reference_when_a_gpu_is_present() {
    let _gpu = crate::common::gpu_lock();
    match gaia_inference::device::DeviceChoice::Cuda.resolve() {
        Ok(device) => {
            let model =
                LlmModel::load(&chat_model_path(), &device, &LlmOptions::default()).expect("loads");
            check_greedy_reference(&model, 12, usize::MAX, true);
            check_long_prompt_in_steps(&model, 2e-2);
        }
        Err(e) => eprintln!("no cuda device here ({e}); the cuda check needs a gpu machine"),
    }
}

/// Continuous batching on a GPU backend (lavapipe in CI): one step of several sequences, which
/// stacks their rows for every weight product, gives each the logits it gets alone.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_batched_steps_match_each_sequence_alone() {
    use gaia_inference::llm::Sequence;
    let (_gpu, device) = crate::common::wgpu();
    let model = LlmModel::load(&chat_model_path(), &device, &LlmOptions::default()).expect("loads");
    let prompts: [&[u32]; 3] = [&[1, 9690, 198, 2683], &[1, 314], &[1, 253, 198]];
    let next: [u32; 3] = [28, 314, 2683];
    let mut alone = Vec::new();
    for (prompt, token) in prompts.iter().zip(next) {
        let mut seq = model.new_sequence();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        seq.forward(prompt, &mut first).expect("prefill");
        seq.forward(&[token], &mut second).expect("decode");
        alone.push([first, second]);
    }
    let mut seqs: Vec<Sequence> = (0..3).map(|_| model.new_sequence()).collect();
    let steps: [Vec<Vec<u32>>; 2] = [
        prompts.iter().map(|p| p.to_vec()).collect(),
        next.iter().map(|&t| vec![t]).collect(),
    ];
    for (step, inputs) in steps.iter().enumerate() {
        let mut outs = vec![Vec::new(); 3];
        let mut batch: Vec<(&mut Sequence, &[u32])> = seqs
            .iter_mut()
            .zip(inputs)
            .map(|(seq, input)| (seq, input.as_slice()))
            .collect();
        model
            .forward_batch(&mut batch, &mut outs)
            .expect("a batched step");
        for (i, out) in outs.iter().enumerate() {
            let want = &alone[i][step];
            assert_eq!(out.len(), want.len());
            let diff = out
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                diff < 5e-3,
                "step {step} sequence {i}: max logit difference {diff}"
            );
            assert_eq!(argmax(out), argmax(want), "step {step} sequence {i}");
        }
    }
    for (seq, prompt) in seqs.iter().zip(prompts) {
        assert_eq!(seq.len(), prompt.len() + 1);
    }
}

/// A 1B-shaped Q4_K model (Llama 3.2 1B's shape, random blocks, written by a test helper) on
/// wgpu (lavapipe in CI): its weights take about the file's size on the device, not the ~5 GB
/// of f32, and a step runs to finite logits.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_a_1b_q4_k_model_takes_its_file_size_on_the_device() {
    use gaia_inference::gguf::GgmlType;
    use gaia_inference::gguf::synth::{LlamaShape, write_llama};
    let (_gpu, device) = crate::common::wgpu();
    let dir = std::env::temp_dir().join(format!("gaia-1b-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("llama-1b-q4_k.gguf");
    let file = write_llama(&path, LlamaShape::LLAMA_1B, GgmlType::Q4K, 3).expect("writes");
    let model = LlmModel::load(&path, &device, &LlmOptions::default()).expect("loads");
    let on_device = model.device_weight_bytes().expect("the burn path");
    eprintln!(
        "1B Q4_K: file {file} bytes, weights on the device {on_device} bytes ({:.3}x)",
        on_device as f64 / file as f64
    );
    assert!(
        (on_device as f64) < 1.15 * file as f64,
        "{on_device} bytes on the device for a {file}-byte file"
    );
    let mut seq = model.new_sequence();
    let mut logits = Vec::new();
    seq.forward(&[1, 2, 3], &mut logits).expect("prefill");
    seq.forward(&[4], &mut logits).expect("decode");
    assert_eq!(logits.len(), LlamaShape::LLAMA_1B.vocab);
    assert!(logits.iter().all(|l| l.is_finite()));
    drop((seq, model));
    let _ = std::fs::remove_dir_all(&dir);
}
