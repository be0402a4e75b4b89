//! The real Gemma 3 270M (Q4_K_M; `gaia models pull gemma-3-270m`) against the independent
//! numpy reference: `gemma3_greedy.json`, written by
//! `inference/tests/reference/make_gemma3_fixtures.py` from the same file.

use std::path::PathBuf;
use std::sync::OnceLock;

use gaia_inference::generate::ChatModel;
use gaia_inference::llm::{CpuKernels, LlmModel, LlmOptions};
use gaia_inference::template::{ChatMessage, RenderOptions};
use sha2::{Digest, Sha256};

use crate::common::{cpu, fixture, models_dir};
use crate::llm::{assert_logits_near, greedy, ids};

/// The model's store name and file.
const MODEL: &str = "gemma-3-270m/gemma-3-270m-q4_k_m.gguf";

/// The largest first-step logit error of the quantized path against the f64 reference. Its
/// weights are the same Q4_K/Q5_0/Q6_K/Q8_0 blocks the reference dequantizes; the error comes
/// from quantizing activations to 8 bits (as llama.cpp does) before every matrix product.
/// Gemma's hidden states have outliers that dominate their 32-value blocks, so the rounding of
/// the other values flips with the last bit of the previous product: the error is a sample of
/// a wide spread, not a fixed figure. Measured over the fixture's top-5 logits (which are 14
/// to 30): 0.13 with row-major Q8_0 weights, 0.45 with them interleaved
/// (`QMatrix::interleaved`, which changes only the order of float additions), and up to 0.33
/// when a single layer's value projection changes that order. 0.75 leaves room for that
/// spread without hiding a real fault (a wrong norm or rotary base moves them by whole units).
const QUANT_TOLERANCE: f32 = 0.75;

/// The f32-weight kernels and the Burn path run the reference's arithmetic in f32.
const F32_TOLERANCE: f32 = 0.02;

/// The model file, checked against the sha256 the fixture was made from (once per binary).
fn model_path() -> PathBuf {
    static CHECKED: OnceLock<PathBuf> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let path = models_dir().join(MODEL);
            assert!(
                path.is_file(),
                "Gemma 3 270M is missing at {}; run `gaia --data-dir DIR models pull \
                 gemma-3-270m` for the store GAIA_MODELS_DIR points at (tests/run does)",
                path.display()
            );
            let bytes = std::fs::read(&path).expect("read the model");
            let digest: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let fx = fixture("gemma3_greedy.json");
            assert_eq!(
                digest,
                fx["generated_by"]["model_sha256"].as_str().expect("sha256"),
                "{} is not the file the fixture was made from",
                path.display()
            );
            path
        })
        .clone()
}

/// Checks `model` against every prompt of `gemma3_greedy.json` for `steps` greedy steps: the
/// first step's top-5 logits within `tolerance`, and every greedy id, except that a step whose
/// reference top-2 gap is below `tolerance` may go the other way (the check then stops).
fn check_reference(model: &LlmModel, steps: usize, tolerance: f32) {
    let fx = fixture("gemma3_greedy.json");
    let prompts = fx["prompts"].as_array().expect("prompts");
    assert!(prompts.len() >= 2);
    for p in prompts {
        let name = p["name"].as_str().expect("name");
        let want = ids(&p["greedy_ids"]);
        let steps = steps.min(want.len());
        let (got, first) = greedy(model, &ids(&p["prompt_ids"]), steps);
        assert_logits_near(name, &first, &p["first_step_top5"], tolerance);
        if let Some(step) = got.iter().zip(&want).position(|(a, b)| a != b) {
            let gap = p["top2"][step]["gap"].as_f64().expect("gap") as f32;
            assert!(
                gap < tolerance,
                "{name}: step {step} chose {} instead of {} although the reference's top-2 gap \
                 is {gap} (ours: {got:?}, reference: {want:?})",
                got[step],
                want[step]
            );
        }
    }
}

fn load(kernels: CpuKernels) -> LlmModel {
    let options = LlmOptions {
        cpu_kernels: kernels,
        ..LlmOptions::default()
    };
    LlmModel::load(&model_path(), &cpu(), &options).expect("gemma loads")
}

/// The default CPU path: quantized weights and 8-bit activations.
#[test]
fn gemma3_greedy_matches_the_reference_with_quantized_kernels() {
    check_reference(&load(CpuKernels::Quantized), 8, QUANT_TOLERANCE);
}

/// The CPU kernels with the weights dequantized to f32: the reference's arithmetic in f32.
#[test]
fn gemma3_greedy_matches_the_reference_with_f32_weights() {
    check_reference(&load(CpuKernels::F32), 8, F32_TOLERANCE);
}

/// The Burn path (what runs on wgpu and CUDA), here on the CPU backend.
#[test]
fn gemma3_greedy_matches_the_reference_on_the_burn_path() {
    check_reference(&load(CpuKernels::Burn), 4, F32_TOLERANCE);
}

/// The GGUF has no chat template: a node serves it with Gemma's turns, and the prompt the
/// fixture's `chat_turn` spells piece by piece is what a chat request renders to.
#[test]
fn gemma3_without_a_template_chats_in_gemma_turns() {
    let chat = ChatModel::load(&model_path(), &cpu(), 2).expect("loads");
    assert!(chat.template().is_fallback());
    let rendered = chat
        .template()
        .render(
            &[ChatMessage::new("user", "What is the capital of Italy?")],
            &RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )
        .expect("render");
    assert_eq!(
        rendered.text,
        "<bos><start_of_turn>user\nWhat is the capital of Italy?<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    let fx = fixture("gemma3_greedy.json");
    let turn = fx["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .find(|p| p["name"] == "chat_turn")
        .expect("the chat_turn prompt");
    let prompt = chat
        .chat_prompt(&[ChatMessage::new("user", "What is the capital of Italy?")])
        .expect("prompt");
    assert_eq!(prompt, ids(&turn["prompt_ids"]));
    let end_of_turn = chat
        .tokenizer()
        .token_id("<end_of_turn>")
        .expect("in vocab");
    assert!(chat.tokenizer().is_eos(end_of_turn));
}

/// The reference test on CUDA where an NVIDIA GPU is present (CI has none: there the backend
/// must report its absence as an error, not a panic).
#[cfg(feature = "cuda")]
#[test]
fn cuda_gemma3_greedy_matches_the_reference_when_a_gpu_is_present() {
    let _gpu = crate::common::gpu_lock();
    match gaia_inference::device::DeviceChoice::Cuda.resolve() {
        Ok(device) => {
            let model =
                LlmModel::load(&model_path(), &device, &LlmOptions::default()).expect("loads");
            check_reference(&model, 8, F32_TOLERANCE);
        }
        Err(e) => eprintln!("no cuda device here ({e}); the cuda check needs a gpu machine"),
    }
}

/// The reference test on wgpu (lavapipe in CI): its Q5_0, Q8_0, Q4_K and Q6_K matrices stay
/// quantized on the device and go through the CubeCL kernels; its tied head (a 262k
/// vocabulary, 178 MB of Q8_0) is split in parts the device can bind.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_gemma3_greedy_matches_the_reference() {
    let (_gpu, device) = crate::common::wgpu();
    let model = LlmModel::load(&model_path(), &device, &LlmOptions::default()).expect("loads");
    assert!(model.describe().contains("quantized weights on the device"));
    let file = std::fs::metadata(model_path()).expect("the file").len() as f64;
    let on_device = model.device_weight_bytes().expect("the burn path") as f64;
    assert!(
        on_device < 1.15 * file,
        "{on_device} bytes of weights on the device for a {file}-byte file"
    );
    check_reference(&model, 3, F32_TOLERANCE);
}
