//! `gaia init --from-gaianet config.json`: a GaiaNet node's `config.json` mapped onto
//! gaia.toml, for operators moving a node over.
//!
//! [`plan`] reads the file into a [`Migration`]: the gaia.toml keys it sets (system and RAG
//! prompts, RAG policy, `qdrant_limit` and `qdrant_score_threshold`, the port), the models to
//! fetch (the chat model's URL), and every field it could not map, with the reason. `gaia init`
//! applies it ([`crate::start::init`]): it writes the keys with `gaia config set`'s editor
//! (comments kept), pulls what it can, and prints the three lists.

use std::path::Path;

use anyhow::Context;
use serde_json::Value as Json;

use crate::models::ModelKind;

/// The largest config.json read.
const MAX_BYTES: u64 = 1 << 20;

/// What a GaiaNet config.json becomes.
#[derive(Debug, Default, PartialEq)]
pub struct Migration {
    /// gaia.toml keys and their values (as `gaia config set` takes them), with the GaiaNet
    /// field each came from.
    pub set: Vec<(String, String, &'static str)>,
    /// Models to pull: the kind, the source (URL or path), the GaiaNet field, and the
    /// gaia.toml key that names the model once it is pulled.
    pub pull: Vec<(ModelKind, String, &'static str, &'static str)>,
    /// Fields not mapped, and why.
    pub unmapped: Vec<(String, String)>,
}

/// A GaiaNet field's text: GaiaNet writes numbers as strings too.
fn text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads and maps `path`.
pub fn read(path: &Path) -> anyhow::Result<Migration> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening the GaiaNet config {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_BYTES,
        "{} is over 1 MiB: not a GaiaNet config.json",
        path.display()
    );
    let json: Json = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    plan(&json).with_context(|| format!("mapping {}", path.display()))
}

/// Maps a GaiaNet config.json.
pub fn plan(config: &Json) -> anyhow::Result<Migration> {
    let fields = config
        .as_object()
        .context("a GaiaNet config.json is a JSON object")?;
    let mut m = Migration::default();
    for (field, value) in fields {
        let Some(raw) = text(value) else {
            m.unmapped
                .push((field.clone(), format!("{value} is not a string or number")));
            continue;
        };
        let empty = raw.trim().is_empty();
        let mut set = |key: &str, value: String, from: &'static str| {
            m.set.push((key.to_string(), value, from));
        };
        match field.as_str() {
            "system_prompt" => set("agent.system_prompt", raw, "system_prompt"),
            "rag_prompt" if !empty => {
                // GaiaNet puts the retrieved context after the RAG prompt.
                let prompt = if raw.contains("{context}") {
                    raw
                } else {
                    format!("{}\n{{context}}", raw.trim_end())
                };
                set("agent.rag_prompt", prompt, "rag_prompt");
            }
            "rag_policy" => match raw.as_str() {
                "system-message" => set("agent.rag_policy", "system".into(), "rag_policy"),
                "last-user-message" => set("agent.rag_policy", "last-user".into(), "rag_policy"),
                other => m.unmapped.push((
                    field.clone(),
                    format!("{other:?} is not system-message or last-user-message"),
                )),
            },
            "qdrant_limit" => match raw.trim().parse::<usize>() {
                Ok(k) if (1..=gaia_knowledge::MAX_TOP_K).contains(&k) => {
                    set("agent.top_k", k.to_string(), "qdrant_limit")
                }
                _ => m.unmapped.push((
                    field.clone(),
                    format!(
                        "{raw:?} is not a number from 1 to {}",
                        gaia_knowledge::MAX_TOP_K
                    ),
                )),
            },
            "qdrant_score_threshold" => match raw.trim().parse::<f32>() {
                Ok(t) if (-1.0..=1.0).contains(&t) => set(
                    "agent.score_threshold",
                    t.to_string(),
                    "qdrant_score_threshold",
                ),
                _ => m.unmapped.push((
                    field.clone(),
                    format!("{raw:?} is not a similarity from -1 to 1"),
                )),
            },
            "llamaedge_port" => match raw.trim().parse::<u16>() {
                Ok(port) => set("server.port", port.to_string(), "llamaedge_port"),
                Err(_) => m
                    .unmapped
                    .push((field.clone(), format!("{raw:?} is not a port"))),
            },
            "chat" if !empty => {
                m.pull.push((ModelKind::Chat, raw, "chat", "models.chat"));
            }
            _ if empty => {}
            "embedding" => m.unmapped.push((
                field.clone(),
                "GGUF embedding models are not supported: the node keeps its embedding model \
                 (all-minilm-l6-v2) and embeds its own knowledge base"
                    .into(),
            )),
            "snapshot" => m.unmapped.push((
                field.clone(),
                "a Qdrant snapshot holds another embedding model's vectors: ingest the \
                 source documents with `gaia kb ingest`"
                    .into(),
            )),
            "prompt_template" | "reverse_prompt" => m.unmapped.push((
                field.clone(),
                "the chat template comes from the model's GGUF file".into(),
            )),
            "chat_ctx_size" | "embedding_ctx_size" | "chat_batch_size" | "embedding_batch_size" => {
                m.unmapped.push((
                    field.clone(),
                    "sizes come from the model (context) and server.batch_size (batching)".into(),
                ))
            }
            "domain" => m.unmapped.push((
                field.clone(),
                "a Gaia domain is joined with `gaia start --domain NAME_OR_MANIFEST`".into(),
            )),
            "address" => m.unmapped.push((
                field.clone(),
                "the node key is Gaia's own (`gaia init --import-key FILE` imports one)".into(),
            )),
            "chat_name"
            | "embedding_name"
            | "embedding_collection_name"
            | "description"
            | "context_window" => m.unmapped.push((
                field.clone(),
                "no counterpart: the model store names models, the knowledge base has one \
                 collection"
                    .into(),
            )),
            _ => m
                .unmapped
                .push((field.clone(), "not a field this mapping knows".into())),
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// GaiaNet's default node config (its fields and value styles).
    fn gaianet_default() -> Json {
        json!({
            "address": "",
            "chat": "https://huggingface.co/gaianet/Llama-3-8B-Instruct-GGUF/resolve/main/Meta-Llama-3-8B-Instruct-Q5_K_M.gguf",
            "chat_ctx_size": "16384",
            "chat_batch_size": "512",
            "chat_name": "Llama-3-8B-Instruct",
            "description": "The default GaiaNet node config with a Llama-3-8B model and a Paris tour guide knowledge base.",
            "domain": "gaia.domains",
            "embedding": "https://huggingface.co/gaianet/Nomic-embed-text-v1.5-Embedding-GGUF/resolve/main/nomic-embed-text-v1.5.f16.gguf",
            "embedding_collection_name": "default",
            "embedding_ctx_size": "8192",
            "embedding_batch_size": "8192",
            "embedding_name": "Nomic-embed-text-v1.5",
            "llamaedge_port": "8080",
            "prompt_template": "llama-3-chat",
            "qdrant_limit": "1",
            "qdrant_score_threshold": "0.5",
            "rag_policy": "system-message",
            "rag_prompt": "Use the following pieces of context to answer the user's question.\nIf you don't know the answer, just say that you don't know, don't try to make up an answer.\n----------------\n",
            "reverse_prompt": "",
            "snapshot": "https://huggingface.co/datasets/gaianet/paris/resolve/main/paris_768_nomic-embed-text-v1.5-f16.snapshot",
            "system_prompt": "You are a tour guide in Paris, France. Please answer the question from a Paris visitor accurately.",
        })
    }

    #[test]
    fn the_default_gaianet_config_maps_its_agent_and_lists_the_rest() {
        let m = plan(&gaianet_default()).unwrap();
        let get = |key: &str| {
            m.set
                .iter()
                .find(|(k, _, _)| k == key)
                .map(|(_, v, _)| v.clone())
        };
        assert!(
            get("agent.system_prompt")
                .unwrap()
                .contains("tour guide in Paris")
        );
        let rag = get("agent.rag_prompt").unwrap();
        assert!(
            rag.starts_with("Use the following pieces") && rag.ends_with("\n{context}"),
            "{rag}"
        );
        assert_eq!(get("agent.rag_policy").as_deref(), Some("system"));
        assert_eq!(get("agent.top_k").as_deref(), Some("1"));
        assert_eq!(get("agent.score_threshold").as_deref(), Some("0.5"));
        assert_eq!(get("server.port").as_deref(), Some("8080"));
        assert_eq!(m.pull.len(), 1);
        assert_eq!(m.pull[0].0, ModelKind::Chat);
        assert!(m.pull[0].1.ends_with("Q5_K_M.gguf"));
        let unmapped: Vec<&str> = m.unmapped.iter().map(|(f, _)| f.as_str()).collect();
        for field in [
            "embedding",
            "snapshot",
            "prompt_template",
            "chat_ctx_size",
            "domain",
        ] {
            assert!(
                unmapped.contains(&field),
                "{field} missing from {unmapped:?}"
            );
        }
        // Every field is accounted for once (the empty ones need nothing).
        let fields = gaianet_default().as_object().unwrap().len();
        let empty = 2; // address, reverse_prompt
        assert_eq!(
            m.set.len() + m.pull.len() + m.unmapped.len(),
            fields - empty
        );
    }

    #[test]
    fn bad_values_are_listed_not_written() {
        let m = plan(
            &json!({"qdrant_limit": "many", "qdrant_score_threshold": "7",
            "rag_policy": "sometimes", "llamaedge_port": "99999", "nonsense": [1],
            "last": 3, "rag_prompt": "Context: {context} then"}),
        )
        .unwrap();
        assert_eq!(
            m.set,
            vec![(
                "agent.rag_prompt".to_string(),
                "Context: {context} then".to_string(),
                "rag_prompt"
            )]
        );
        assert_eq!(m.unmapped.len(), 6, "{:?}", m.unmapped);
        assert!(plan(&json!([1])).is_err());
    }

    #[test]
    fn a_file_that_is_not_json_or_too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, "{not json").unwrap();
        assert!(format!("{:#}", read(&p).unwrap_err()).contains("not JSON"));
        std::fs::write(&p, vec![b' '; (MAX_BYTES + 2) as usize]).unwrap();
        assert!(format!("{:#}", read(&p).unwrap_err()).contains("over 1 MiB"));
        assert!(read(&dir.path().join("missing.json")).is_err());
    }
}
