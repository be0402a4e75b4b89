//! Gaia inference: the node's brain.
//!
//! A GGUF reader of our own with dequantization and quantized matrix kernels, llama-family chat
//! models and the BERT sentence embedder on Burn, tokenizers, chat templates, sampling and
//! constrained decoding. Backends are cargo features (`flex` for the CPU, `wgpu`, `cuda`) and the
//! device is chosen at run time.
#![deny(unreachable_pub)]
pub mod bench;
pub mod constraint;
pub mod device;
pub mod embed;
pub mod generate;
pub mod gguf;
pub mod llm;
pub mod prefix;
pub mod quant;
pub mod sampling;
pub mod template;
pub mod tokenizer;
