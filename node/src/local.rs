//! Local inference commands: `gaia generate`, `gaia chat`, `gaia embed`, `gaia bench`.
//!
//! They load the models from the store (pulling the defaults on first use) and run on the
//! calling thread; the node's server runs the same engine behind its actor instead.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use gaia_inference::device::{Device, DeviceChoice};
use gaia_inference::embed::Embedder;
use gaia_inference::generate::{ChatModel, GenerateEvent, GenerateRequest};
use gaia_inference::sampling::SamplingParams;
use gaia_inference::template::ChatMessage;

use crate::cli::{BenchArgs, ChatArgs, EmbedArgs, GenerateArgs, InferenceArgs, SamplingArgs};
use crate::models::{self, ModelKind, Store};

/// The GGUF file of a chat model: a path to a `.gguf` file, or a name in the store (a pinned
/// model, such as the default, is pulled on first use).
pub fn chat_model_path(store: &Store, model: &str) -> anyhow::Result<PathBuf> {
    model_path(store, model, ModelKind::Chat)
}

/// The directory of an embedding model: a directory, or a name in the store.
pub fn embedding_model_dir(store: &Store, model: &str) -> anyhow::Result<PathBuf> {
    model_path(store, model, ModelKind::Embedding)
}

fn model_path(store: &Store, model: &str, kind: ModelKind) -> anyhow::Result<PathBuf> {
    let as_path = Path::new(model);
    if as_path.exists() {
        return Ok(as_path.to_path_buf());
    }
    if let Some(pinned) = models::pinned(model) {
        store.pull_pinned(pinned)?;
    }
    let manifest = store.get(model)?;
    if manifest.kind != kind {
        bail!(
            "model {model:?} is a {} model; a {kind} model is needed here",
            manifest.kind
        );
    }
    let dir = store.model_dir(model);
    Ok(match kind {
        ModelKind::Chat => {
            let gguf = manifest
                .files
                .iter()
                .find(|f| f.name.ends_with(".gguf"))
                .with_context(|| format!("model {model:?} has no .gguf file"))?;
            dir.join(&gguf.name)
        }
        ModelKind::Embedding => dir,
    })
}

fn device(args: &InferenceArgs) -> anyhow::Result<Device> {
    let choice: DeviceChoice = args.device.parse()?;
    Ok(choice.resolve()?)
}

fn load_chat(store: &Store, args: &InferenceArgs) -> anyhow::Result<ChatModel> {
    let path = chat_model_path(store, &args.model)?;
    let device = device(args)?;
    ChatModel::load(&path, &device, usize::from(args.threads))
        .with_context(|| format!("loading {}", path.display()))
}

fn sampling(args: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    }
}

/// Streams one generation to stdout; returns the text.
fn stream(model: &ChatModel, request: GenerateRequest) -> anyhow::Result<String> {
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    let mut failure = None;
    let mut sink = |event: GenerateEvent| {
        match event {
            GenerateEvent::Token { text_delta, .. } => {
                text.push_str(&text_delta);
                return write!(out, "{text_delta}")
                    .and_then(|_| out.flush())
                    .is_ok();
            }
            GenerateEvent::Done { .. } => {}
            GenerateEvent::Error(e) => failure = Some(e),
        }
        true
    };
    model.generate(request, &mut sink);
    println!();
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(text),
    }
}

/// `gaia generate`
pub fn generate(store: &Store, args: GenerateArgs) -> anyhow::Result<()> {
    let model = load_chat(store, &args.inference)?;
    let prompt = if args.raw {
        let tok = model.tokenizer();
        let mut ids = Vec::new();
        if tok.add_bos()
            && let Some(bos) = tok.bos()
        {
            ids.push(bos);
        }
        ids.extend(tok.encode(&args.prompt, false)?);
        ids
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        model.chat_prompt(&messages)?
    };
    let constraint = match &args.json_schema {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the schema {}", file.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("the schema {} is not JSON", file.display()))?;
            Some(model.constraints()?.json_schema(&schema)?)
        }
        None => None,
    };
    stream(
        &model,
        GenerateRequest {
            prompt,
            sampling: sampling(&args.sampling),
            max_tokens: Some(args.max_tokens),
            stop: args.stop.clone(),
            constraint,
            ..GenerateRequest::default()
        },
    )?;
    Ok(())
}

/// `gaia chat`: an interactive conversation in the terminal.
pub fn chat(store: &Store, args: ChatArgs) -> anyhow::Result<()> {
    let model = load_chat(store, &args.inference)?;
    let mut history = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage::new("system", system.clone()));
    }
    eprintln!(
        "chatting with {} — /reset starts over, /exit or Ctrl-D leaves",
        args.inference.model
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m: &ChatMessage| m.role == "system");
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let prompt = model.chat_prompt(&history)?;
        let reply = stream(
            &model,
            GenerateRequest {
                prompt,
                sampling: sampling(&args.sampling),
                max_tokens: Some(args.max_tokens),
                ..GenerateRequest::default()
            },
        );
        match reply {
            Ok(text) => history.push(ChatMessage::new("assistant", text)),
            Err(e) => {
                history.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

/// `gaia embed`: one JSON line per text with its vector.
pub fn embed(store: &Store, args: EmbedArgs) -> anyhow::Result<()> {
    let dir = embedding_model_dir(store, &args.model)?;
    let choice: DeviceChoice = args.device.parse()?;
    let embedder = Embedder::load(&dir, &choice.resolve()?)?;
    let vectors = embedder.embed(&args.texts)?;
    let mut out = std::io::stdout().lock();
    for (text, vector) in args.texts.iter().zip(&vectors) {
        let line = serde_json::json!({ "text": text, "embedding": vector });
        writeln!(out, "{line}")?;
    }
    if vectors.len() >= 2 {
        for i in 1..vectors.len() {
            eprintln!(
                "cosine(1, {}) = {:.4}",
                i + 1,
                gaia_inference::embed::cosine(&vectors[0], &vectors[i])
            );
        }
    }
    Ok(())
}

/// `gaia bench`: performance figures of the chat model and the embedder.
pub fn bench(store: &Store, args: BenchArgs) -> anyhow::Result<()> {
    let device = device(&args.inference)?;
    // Both models stay loaded until the end so the peak RSS covers a node serving both.
    let mut _chat = None;
    let mut _embedder = None;
    if !args.skip_llm {
        let path = chat_model_path(store, &args.inference.model)?;
        let (figures, model) =
            gaia_inference::bench::bench_llm(&path, &device, usize::from(args.inference.threads))?;
        println!("{figures}");
        _chat = Some(model);
    }
    if !args.skip_embed {
        let dir = embedding_model_dir(store, &args.embedding_model)?;
        let (figures, embedder) = gaia_inference::bench::bench_embed(&dir, &device)?;
        println!("{figures}");
        _embedder = Some(embedder);
    }
    if let Some(rss) = gaia_inference::bench::peak_rss_bytes() {
        println!("peak RSS {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
    }
    Ok(())
}
