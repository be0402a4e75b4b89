//! Integration tests of gaia-inference: the one test binary of the crate, one module per topic.
//! Tests that need the real models read them from `GAIA_MODELS_DIR` and fail if they are missing.

mod common;
mod embed;
mod gemma3;
mod generate;
mod llm;
