//! The Gaia node: the `gaia` binary's library.
//!
//! It owns the command line and configuration, the model store, the inference and swarm
//! actors, the chat pipeline (`agent`) and the OpenAI-compatible API. `main.rs` only parses
//! the command line and calls [`run`].

pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod content;
pub mod domain_cli;
pub mod embedder;
pub mod engine;
pub mod gaianet;
pub mod kb;
pub mod local;
pub mod metrics;
pub mod models;
pub mod pay;
pub mod start;
pub mod swarm;
pub mod ui;

use std::path::PathBuf;

use anyhow::Context as _;

use cli::{Cli, Command, ModelsCommand};
use models::{Progress, PullOutcome, Store};

/// The data directory: the flag or `GAIA_DATA_DIR`, else `~/.gaia`.
pub fn data_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("cannot find the home directory: set HOME, or pass --data-dir or GAIA_DATA_DIR")?;
    Ok(PathBuf::from(home).join(".gaia"))
}

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = data_dir(cli.global.data_dir)?;
    let progress = if cli.global.quiet {
        Progress::Quiet
    } else {
        Progress::Bars
    };
    let store = Store::new(&data_dir, progress);
    match cli.command {
        Command::Models(ModelsCommand::Pull(args)) => {
            if let Some(manifest) = &args.from_domain {
                return start::pull_from_domain(&data_dir, &store, manifest);
            }
            let results = store.pull(
                &args.source,
                args.name.as_deref(),
                args.kind.into(),
                args.sha256.as_deref(),
            )?;
            for (name, outcome) in results {
                print_outcome(&store, &name, &outcome)?;
            }
            Ok(())
        }
        Command::Models(ModelsCommand::List) => {
            let models = store.list()?;
            if models.is_empty() {
                println!(
                    "no models in {}; run `gaia models pull`",
                    store.root().display()
                );
                return Ok(());
            }
            println!(
                "{:<24} {:<10} {:>10}  {:<64}  FILE",
                "NAME", "KIND", "SIZE", "SHA256"
            );
            for (_, m) in models {
                for f in &m.files {
                    println!(
                        "{:<24} {:<10} {:>10}  {:<64}  {}",
                        m.name,
                        m.kind.to_string(),
                        human_size(f.size),
                        f.sha256,
                        f.name
                    );
                }
            }
            Ok(())
        }
        Command::Generate(args) => local::generate(&store, args),
        Command::Chat(args) => local::chat(&store, args),
        Command::Embed(args) => local::embed(&store, args),
        Command::Bench(args) => local::bench(&store, args),
        Command::Kb(cmd) => kb::run(&store, &data_dir, cli.global.quiet, cmd),
        Command::Start(args) => start::start(&data_dir, &store, &args),
        Command::Init(args) => start::init(&data_dir, &store, &args),
        Command::Info => start::info(&data_dir, &store),
        Command::Config(cmd) => start::config_command(&data_dir, &cmd),
        Command::Domain(cmd) => domain_cli::run(&data_dir, cmd),
        Command::Pay(cmd) => pay::run(&data_dir, cmd),
    }
}

fn print_outcome(store: &Store, name: &str, outcome: &PullOutcome) -> anyhow::Result<()> {
    let manifest = store.get(name)?;
    let size: u64 = manifest.files.iter().map(|f| f.size).sum();
    match outcome {
        PullOutcome::UpToDate => println!(
            "{name}: present and verified ({}, {} file(s)), nothing to do",
            human_size(size),
            manifest.files.len()
        ),
        PullOutcome::Fetched(files) => println!(
            "{name}: fetched {} ({}), verified against sha256",
            files.join(", "),
            human_size(size)
        ),
    }
    Ok(())
}

/// Bytes as a short human-readable size.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
