//! Shared helpers: where the real models are, loaded once per test binary.

use std::path::PathBuf;
use std::sync::OnceLock;

use gaia_inference::device::Device;
use gaia_inference::embed::Embedder;
use gaia_inference::generate::ChatModel;

/// The model store the tests read (`GAIA_MODELS_DIR`). Panics with instructions if unset.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("GAIA_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "GAIA_MODELS_DIR is not set: point it at a model store holding \
             smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf and all-minilm-l6-v2/ \
             (e.g. GAIA_MODELS_DIR=/work/models-store)"
        ),
    }
}

/// The default chat model's GGUF file; panics if it is missing.
pub fn chat_model_path() -> PathBuf {
    let path = models_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the default chat model is missing at {}; fill the model store first",
        path.display()
    );
    path
}

/// The default embedding model's directory; panics if it is missing.
pub fn embed_model_dir() -> PathBuf {
    let dir = models_dir().join("all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the default embedding model is missing at {}; fill the model store first",
        dir.display()
    );
    dir
}

/// A test fixture of `inference/tests/fixtures`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fixture {} is not json: {e}", path.display()))
}

/// The CPU device.
pub fn cpu() -> Device {
    gaia_inference::device::DeviceChoice::Cpu
        .resolve()
        .expect("the cpu backend is compiled in")
}

/// The default chat model on the CPU (quantized kernels, 2 threads), loaded once.
pub fn chat_model() -> &'static ChatModel {
    static MODEL: OnceLock<ChatModel> = OnceLock::new();
    MODEL.get_or_init(|| ChatModel::load(&chat_model_path(), &cpu(), 2).expect("chat model loads"))
}

/// The default embedder on the CPU, loaded once.
pub fn embedder() -> &'static Embedder {
    static MODEL: OnceLock<Embedder> = OnceLock::new();
    MODEL.get_or_init(|| Embedder::load(&embed_model_dir(), &cpu()).expect("embedder loads"))
}

/// Serialises the tests that use a GPU backend: burn's wgpu and cuda device handles are shared
/// per process, and two tests driving the same device at once fail (seen on lavapipe).
#[allow(dead_code)] // used only with the `wgpu` or `cuda` feature
pub fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The wgpu device (lavapipe in CI), held for the caller's test alone.
#[cfg(feature = "wgpu")]
pub fn wgpu() -> (std::sync::MutexGuard<'static, ()>, Device) {
    let guard = gpu_lock();
    let device = gaia_inference::device::DeviceChoice::Wgpu
        .resolve()
        .expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
    (guard, device)
}
