//! `gaia kb ...`: the node's knowledge base from the command line, and the demo knowledge base a
//! fresh node starts with.
//!
//! The knowledge base lives in `<data_dir>/kb` and is embedded with the store's
//! all-MiniLM-L6-v2 (pulled on first use). Every command opens it, does its work and closes it;
//! the library behind it ([`gaia_knowledge`]) makes each acknowledged document durable.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use gaia_inference::device::DeviceChoice;
use gaia_knowledge::{
    IngestPolicy, KbOptions, KnowledgeBase, Progress, SearchHit, SearchMode, SearchQuery,
    no_progress,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::embedder::NodeEmbedder;
use crate::models::{self, Store};

/// The knowledge base's directory inside a data directory.
pub const KB_DIR: &str = "kb";
/// How long fetching one URL may take, in seconds, by default.
pub const DEFAULT_URL_TIMEOUT_SECS: u64 = 30;
/// Most redirects followed when fetching a URL.
const MAX_REDIRECTS: usize = 5;
/// Longest chunk text shown by `gaia kb search` (characters) without `--full`.
const SNIPPET_CHARS: usize = 240;

/// The demo documents: Gaia's own documentation, compiled into the binary, with the source names
/// they get in the knowledge base.
pub const DEMO_DOCS: [(&str, &str); 6] = [
    (
        "gaia-docs/what-is-gaia.md",
        include_str!("../../knowledge/demo/what-is-gaia.md"),
    ),
    (
        "gaia-docs/running-a-node.md",
        include_str!("../../knowledge/demo/running-a-node.md"),
    ),
    (
        "gaia-docs/knowledge-bases.md",
        include_str!("../../knowledge/demo/knowledge-bases.md"),
    ),
    (
        "gaia-docs/domains.md",
        include_str!("../../knowledge/demo/domains.md"),
    ),
    (
        "gaia-docs/api.md",
        include_str!("../../knowledge/demo/api.md"),
    ),
    (
        "gaia-docs/faq.md",
        include_str!("../../knowledge/demo/faq.md"),
    ),
];

/// `gaia kb ...`
#[derive(Debug, Args)]
pub struct KbCommand {
    /// What to do with the knowledge base.
    #[command(subcommand)]
    pub action: KbAction,
    /// The embedding model: a name in the model store (the default is pulled on first use).
    #[arg(long, global = true, default_value = models::DEFAULT_EMBEDDING.name)]
    pub embedding_model: String,
    /// Where the embedder runs: `auto`, `cpu`, `wgpu` or `cuda`.
    #[arg(long, global = true, env = "GAIA_DEVICE", default_value = "auto")]
    pub device: String,
}

/// The `gaia kb` subcommands.
#[derive(Debug, Subcommand)]
pub enum KbAction {
    /// Add files, directories (recursively) and http(s) URLs; a source ingested again is
    /// replaced.
    Ingest(IngestArgs),
    /// Search the knowledge base.
    Search(SearchArgs),
    /// List the documents.
    List(ListArgs),
    /// Remove one document by its source name (as `gaia kb list` shows it).
    Rm(RmArgs),
    /// Write a snapshot archive (manifest, model, chunking, sha256 of every file).
    Export(ExportArgs),
    /// Replace the knowledge base with a verified snapshot made with the same embedding model.
    Import(ImportArgs),
    /// Show the KB hash, counts, embedding model and chunking parameters.
    Info(InfoArgs),
}

/// `gaia kb ingest`
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Files, directories or http(s):// URLs.
    #[arg(required = true, value_name = "PATH|URL")]
    pub inputs: Vec<String>,
    /// Only read files that resolve (symbolic links followed) inside this directory; source names
    /// are relative to it. [default: the current directory for paths under it, otherwise the
    /// directory that holds the named file or directory]
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Largest document accepted, in bytes (files and URLs).
    #[arg(long, default_value_t = gaia_knowledge::DEFAULT_MAX_DOCUMENT_BYTES, value_name = "BYTES")]
    pub max_bytes: u64,
    /// How long fetching one URL may take, in seconds.
    #[arg(long, default_value_t = DEFAULT_URL_TIMEOUT_SECS, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Also visit files and directories whose names start with a dot.
    #[arg(long)]
    pub include_hidden: bool,
}

/// `gaia kb search`
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The question or keywords.
    pub query: String,
    /// Fuse keyword (BM25) and vector rankings (reciprocal rank fusion).
    #[arg(long, conflicts_with = "keyword")]
    pub hybrid: bool,
    /// Keyword (BM25) ranking only.
    #[arg(long)]
    pub keyword: bool,
    /// How many chunks to return.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=gaia_knowledge::MAX_TOP_K as u64))]
    pub top_k: u64,
    /// Smallest score: cosine similarity for vector and hybrid search, BM25 score for keyword
    /// search.
    #[arg(long, value_name = "X")]
    pub threshold: Option<f32>,
    /// Print the hits as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print whole chunks instead of snippets.
    #[arg(long)]
    pub full: bool,
}

/// `gaia kb list`
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `gaia kb rm`
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The source name, as `gaia kb list` shows it.
    pub source: String,
}

/// `gaia kb export`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The archive to write (replaced if it exists).
    pub file: PathBuf,
}

/// `gaia kb import`
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The archive written by `gaia kb export`.
    pub file: PathBuf,
    /// Refuse the archive unless its KB hash is this (hex, as `gaia kb info` prints it).
    #[arg(long, value_name = "HASH")]
    pub expect_hash: Option<String>,
}

/// `gaia kb info`
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The knowledge base directory of a data directory.
pub fn kb_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(KB_DIR)
}

/// Loads the embedding model `name` from the store onto `device` (`auto`, `cpu`, ...); a pinned
/// model that is not in the store yet is pulled first.
pub fn load_embedder(store: &Store, name: &str, device: &str) -> anyhow::Result<NodeEmbedder> {
    if store.get(name).is_err()
        && let Some(pinned) = models::pinned(name)
    {
        store
            .pull_pinned(pinned)
            .with_context(|| format!("pulling the embedding model {name}"))?;
    }
    let manifest = store.get(name)?;
    if manifest.kind != models::ModelKind::Embedding {
        bail!(
            "model {name:?} is a {} model; the knowledge base needs an embedding model",
            manifest.kind
        );
    }
    let choice: DeviceChoice = device.parse()?;
    NodeEmbedder::from_store(store, name, &choice.resolve()?)
}

/// Opens (or creates) the knowledge base of `data_dir` with `embedder`, reporting on stderr what
/// opening had to repair.
pub fn open_kb(
    data_dir: &Path,
    embedder: &NodeEmbedder,
    options: KbOptions,
) -> anyhow::Result<KnowledgeBase> {
    let dir = kb_dir(data_dir);
    let kb = KnowledgeBase::open(&dir, embedder.shared(), options)
        .with_context(|| format!("opening the knowledge base in {}", dir.display()))?;
    let r = kb.recovery();
    if r.torn_tail_bytes > 0 {
        eprintln!(
            "warning: cut {} bytes of an unfinished write from the end of the chunk log (an \
             interrupted ingest; every acknowledged document is intact)",
            r.torn_tail_bytes
        );
    }
    if !r.damaged_ranges.is_empty() {
        eprintln!(
            "warning: the chunk log had {} damaged record(s), which were dropped{}; re-ingest the \
             documents `gaia kb list` no longer shows",
            r.damaged_ranges.len(),
            r.damaged_log_copy
                .as_ref()
                .map(|p| format!(" (the damaged log was kept as {})", p.display()))
                .unwrap_or_default()
        );
    }
    if let Some(why) = &r.index_rebuilt {
        eprintln!("warning: the vector index was rebuilt from the chunk log: {why}");
    }
    Ok(kb)
}

/// Ingests Gaia's own documentation ([`DEMO_DOCS`]) when `kb` has no documents yet, so that a
/// fresh node can answer questions about itself. Returns whether it ingested.
pub fn ensure_demo_kb(kb: &mut KnowledgeBase) -> anyhow::Result<bool> {
    if !kb.list_sources().is_empty() {
        return Ok(false);
    }
    for (source, text) in DEMO_DOCS {
        kb.ingest_bytes(
            text.as_bytes(),
            source,
            Some("text/markdown"),
            &mut no_progress,
        )
        .with_context(|| format!("ingesting the demo document {source}"))?;
    }
    kb.checkpoint()
        .context("saving the index of the demo knowledge base")?;
    Ok(true)
}

/// Runs `gaia kb ...`.
pub fn run(store: &Store, data_dir: &Path, quiet: bool, cmd: KbCommand) -> anyhow::Result<()> {
    let embedder = load_embedder(store, &cmd.embedding_model, &cmd.device)?;
    match cmd.action {
        KbAction::Ingest(args) => {
            let options = KbOptions {
                max_document_bytes: args.max_bytes,
                ..KbOptions::default()
            };
            let mut kb = open_kb(data_dir, &embedder, options)?;
            ingest(&mut kb, &args, quiet)
        }
        KbAction::Search(args) => {
            let kb = open_kb(data_dir, &embedder, KbOptions::default())?;
            search(&kb, &args)
        }
        KbAction::List(args) => {
            let kb = open_kb(data_dir, &embedder, KbOptions::default())?;
            list(&kb, args.json)
        }
        KbAction::Rm(args) => {
            let mut kb = open_kb(data_dir, &embedder, KbOptions::default())?;
            if !kb.remove_source(&args.source)? {
                bail!(
                    "no document named {:?} in the knowledge base; `gaia kb list` shows the \
                     source names",
                    args.source
                );
            }
            kb.close()?;
            println!("removed {}", args.source);
            Ok(())
        }
        KbAction::Export(args) => {
            let kb = open_kb(data_dir, &embedder, KbOptions::default())?;
            let snap = kb.export_snapshot(&args.file)?;
            println!(
                "exported {} document(s), {} chunk(s) to {} ({})",
                snap.documents,
                snap.chunks,
                snap.path.display(),
                crate::human_size(snap.archive_bytes)
            );
            println!("kb hash {}", snap.hash);
            Ok(())
        }
        KbAction::Import(args) => {
            let expected = args
                .expect_hash
                .as_deref()
                .map(|h| {
                    h.parse::<gaia_knowledge::ContentHash>()
                        .map_err(|e| anyhow::anyhow!("--expect-hash {h:?} is not a KB hash ({e})"))
                })
                .transpose()?;
            let mut kb = open_kb(data_dir, &embedder, KbOptions::default())?;
            let snap = kb.import_snapshot(&args.file, expected.as_ref())?;
            kb.close()?;
            println!(
                "imported {} document(s), {} chunk(s) from {}",
                snap.documents,
                snap.chunks,
                snap.path.display()
            );
            println!("kb hash {}", snap.hash);
            Ok(())
        }
        KbAction::Info(args) => {
            let kb = open_kb(data_dir, &embedder, KbOptions::default())?;
            info(&kb, args.json)
        }
    }
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Progress bars of one `gaia kb ingest`: documents overall, and chunks of the current one.
struct Bars {
    multi: MultiProgress,
    docs: ProgressBar,
    chunks: ProgressBar,
}

impl Bars {
    fn new(quiet: bool, inputs: usize) -> Self {
        let multi = MultiProgress::with_draw_target(if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        let docs = multi.add(ProgressBar::new(inputs as u64));
        docs.set_style(bar_style(
            "{prefix:>9} [{bar:30}] {pos}/{len} documents {wide_msg}",
        ));
        docs.set_prefix("ingest");
        let chunks = multi.add(ProgressBar::new(0));
        chunks.set_style(bar_style(
            "{prefix:>9} [{bar:30}] {pos}/{len} chunks {per_sec} {eta}",
        ));
        chunks.set_prefix("embed");
        Self {
            multi,
            docs,
            chunks,
        }
    }

    /// Prints a line above the bars (or plainly when they are hidden).
    fn println(&self, line: &str) {
        if self.multi.is_hidden() {
            println!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    fn on(&self, event: Progress<'_>) {
        match event {
            Progress::Discovered { files } => {
                self.docs
                    .set_length(self.docs.length().unwrap_or(0) + files as u64);
            }
            Progress::Started { source, .. } => {
                self.docs.set_message(source.to_string());
                self.chunks.set_length(0);
                self.chunks.set_position(0);
            }
            Progress::Chunked { chunks, .. } => {
                self.chunks.set_length(chunks as u64);
                self.chunks.reset_eta();
            }
            Progress::Embedded { done, .. } => self.chunks.set_position(done as u64),
            Progress::Stored { document } => {
                self.docs.inc(1);
                let what = if document.unchanged {
                    "unchanged"
                } else if document.replaced {
                    "replaced"
                } else {
                    "stored"
                };
                self.println(&format!(
                    "{what} {} ({} chunk(s), {})",
                    document.source, document.chunks, document.content_type
                ));
            }
            Progress::Skipped { path, reason } => {
                self.println(&format!("skipped {}: {reason}", path.display()));
            }
            Progress::Failed { .. } => self.docs.inc(1),
        }
    }

    fn finish(&self) {
        self.docs.finish_and_clear();
        self.chunks.finish_and_clear();
    }
}

fn is_url(input: &str) -> bool {
    let lower = input.get(..8).unwrap_or(input).to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// The allowed root for a path named on the command line: `--root`, else the current directory
/// when the path is under it, else the directory that holds the path.
fn root_for(path: &Path, flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(root) = flag {
        return Ok(root.to_path_buf());
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let absolute = cwd.join(path);
    let canonical = absolute.canonicalize().unwrap_or(absolute);
    let cwd = cwd.canonicalize().unwrap_or(cwd);
    if canonical.starts_with(&cwd) {
        return Ok(cwd);
    }
    Ok(canonical
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(canonical))
}

fn ingest(kb: &mut KnowledgeBase, args: &IngestArgs, quiet: bool) -> anyhow::Result<()> {
    let bars = Bars::new(quiet, 0);
    let mut failures: Vec<String> = Vec::new();
    let mut stored = 0usize;
    let mut client = None;
    for input in &args.inputs {
        if is_url(input) {
            bars.docs.inc_length(1);
            let client = match &mut client {
                Some(c) => c,
                None => client.insert(http_client(args.timeout)?),
            };
            let result = fetch(client, input, args.max_bytes).and_then(|(bytes, mime, source)| {
                kb.ingest_bytes(&bytes, &source, mime.as_deref(), &mut |p| bars.on(p))
                    .map_err(anyhow::Error::from)
            });
            match result {
                Ok(_) => stored += 1,
                Err(e) => {
                    bars.docs.inc(1);
                    failures.push(format!("{input}: {e:#}"));
                }
            }
            continue;
        }
        // Relative paths are relative to the current directory, whatever the root.
        let path = &std::env::current_dir()
            .context("cannot read the current directory")?
            .join(input);
        let root = root_for(path, args.root.as_deref())?;
        let mut policy = IngestPolicy::new(root);
        policy.include_hidden = args.include_hidden;
        if path.is_file() {
            bars.docs.inc_length(1);
        }
        match kb.ingest_path(path, &policy, &mut |p| bars.on(p)) {
            Ok(report) => {
                stored += report.documents.len();
                for (file, error) in report.failed {
                    failures.push(format!("{}: {error}", file.display()));
                }
            }
            Err(e) => {
                if path.is_file() {
                    bars.docs.inc(1);
                }
                failures.push(e.to_string());
            }
        }
    }
    bars.finish();
    kb.checkpoint()
        .context("saving the vector index (the ingested documents are safe in the chunk log)")?;
    let info = kb.info();
    println!(
        "{stored} document(s) ingested; the knowledge base holds {} document(s), {} chunk(s); kb \
         hash {}",
        info.documents, info.chunks, info.hash
    );
    if failures.is_empty() {
        return Ok(());
    }
    for f in &failures {
        eprintln!("error: {f}");
    }
    bail!(
        "{} input(s) could not be ingested (listed above); everything else is stored",
        failures.len()
    )
}

fn http_client(timeout_secs: u64) -> anyhow::Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(timeout_secs))
        .connect_timeout(Duration::from_secs(timeout_secs.min(10)))
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        .user_agent(concat!("gaia/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot set up the HTTP client")
}

/// Fetches a URL with a size cap: `(bytes, content type, source name)`.
fn fetch(
    client: &reqwest::blocking::Client,
    url: &str,
    max_bytes: u64,
) -> anyhow::Result<(Vec<u8>, Option<String>, String)> {
    let mut parsed =
        reqwest::Url::parse(url).with_context(|| format!("{url:?} is not a valid URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("only http:// and https:// URLs can be ingested");
    }
    parsed.set_fragment(None);
    let source = parsed.to_string();
    let response = client
        .get(parsed)
        .send()
        .with_context(|| format!("cannot fetch {source}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("fetching {source} failed with HTTP status {status}");
    }
    if let Some(len) = response.content_length()
        && len > max_bytes
    {
        bail!(
            "{source} is {len} bytes, over the {max_bytes}-byte limit; raise it with --max-bytes"
        );
    }
    let mime = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut bytes = Vec::new();
    response
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {source} failed"))?;
    if bytes.len() as u64 > max_bytes {
        bail!("{source} is over the {max_bytes}-byte limit; raise it with --max-bytes");
    }
    Ok((bytes, mime, source))
}

fn snippet(text: &str, full: bool) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if full || flat.chars().count() <= SNIPPET_CHARS {
        return flat;
    }
    let mut s: String = flat.chars().take(SNIPPET_CHARS - 1).collect();
    s.push('…');
    s
}

fn hit_json(hit: &SearchHit) -> serde_json::Value {
    serde_json::json!({
        "source": hit.source,
        "title": hit.title,
        "heading": hit.heading,
        "ordinal": hit.ordinal,
        "start": hit.start,
        "end": hit.end,
        "score": hit.score,
        "vector_score": hit.vector_score,
        "keyword_score": hit.keyword_score,
        "text": hit.text,
    })
}

fn search(kb: &KnowledgeBase, args: &SearchArgs) -> anyhow::Result<()> {
    let mode = if args.keyword {
        SearchMode::Keyword
    } else if args.hybrid {
        SearchMode::Hybrid
    } else {
        SearchMode::Vector
    };
    let top_k = usize::try_from(args.top_k).unwrap_or(gaia_knowledge::MAX_TOP_K);
    let mut query = SearchQuery::new(&args.query).top_k(top_k).mode(mode);
    if let Some(t) = args.threshold {
        if !t.is_finite() {
            bail!("--threshold must be a finite number");
        }
        query = query.min_score(t);
    }
    let hits = kb.search(&query)?;
    if args.json {
        let out: Vec<_> = hits.iter().map(hit_json).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if hits.is_empty() {
        if kb.list_sources().is_empty() {
            println!(
                "no results: the knowledge base is empty; add documents with `gaia kb ingest`"
            );
        } else {
            println!("no results");
        }
        return Ok(());
    }
    for (i, hit) in hits.iter().enumerate() {
        let heading = hit
            .heading
            .as_deref()
            .map(|h| format!(" > {h}"))
            .unwrap_or_default();
        println!(
            "{}. {:.4}  {} (chunk {}){heading}",
            i + 1,
            hit.score,
            hit.source,
            hit.ordinal
        );
        println!("   {}", snippet(&hit.text, args.full));
    }
    Ok(())
}

fn list(kb: &KnowledgeBase, json: bool) -> anyhow::Result<()> {
    let sources = kb.list_sources();
    if json {
        let out: Vec<_> = sources
            .iter()
            .map(|s| {
                serde_json::json!({
                    "source": s.source,
                    "title": s.title,
                    "content_type": s.content_type.to_string(),
                    "chunks": s.chunks,
                    "text_bytes": s.text_bytes,
                    "digest": s.digest.to_string(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if sources.is_empty() {
        println!("the knowledge base is empty; add documents with `gaia kb ingest PATH|URL`");
        return Ok(());
    }
    println!(
        "{:<48} {:<9} {:>6} {:>10}  TITLE",
        "SOURCE", "TYPE", "CHUNKS", "TEXT"
    );
    for s in &sources {
        println!(
            "{:<48} {:<9} {:>6} {:>10}  {}",
            s.source,
            s.content_type.to_string(),
            s.chunks,
            crate::human_size(s.text_bytes),
            s.title
        );
    }
    Ok(())
}

fn info(kb: &KnowledgeBase, json: bool) -> anyhow::Result<()> {
    let info = kb.info();
    if json {
        let out = serde_json::json!({
            "hash": info.hash.to_string(),
            "documents": info.documents,
            "chunks": info.chunks,
            "vectors": info.vectors,
            "model": info.model,
            "chunking": info.chunking,
            "log_bytes": info.log_bytes,
            "reclaimable_bytes": info.reclaimable_bytes,
            "dir": info.dir,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let c = &info.chunking;
    println!("kb hash      {}", info.hash);
    println!("directory    {}", info.dir.display());
    println!(
        "documents    {}\nchunks       {}\nvectors      {}",
        info.documents, info.chunks, info.vectors
    );
    println!("model        {}", info.model.id);
    println!("model digest {}", info.model.digest);
    println!("dimensions   {}", info.model.dimensions);
    println!(
        "chunking     {} {:?} per chunk, {} overlap ({})",
        c.max_size, c.unit, c.overlap, c.splitter
    );
    println!(
        "log          {} ({} reclaimable)",
        crate::human_size(info.log_bytes),
        crate::human_size(info.reclaimable_bytes)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use gaia_knowledge::testing::ToyEmbedder;

    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("https://example.org/a.md"));
        assert!(is_url("HTTP://example.org"));
        assert!(!is_url("docs/https.md"));
        assert!(!is_url("ftp://example.org"));
        assert!(!is_url("é"));
    }

    #[test]
    fn the_root_is_the_flag_or_the_current_directory_or_the_parent() {
        let flag = Path::new("/some/root");
        assert_eq!(root_for(Path::new("x.md"), Some(flag)).unwrap(), flag);
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(root_for(Path::new("Cargo.toml"), None).unwrap(), cwd);
        let outside = tempfile::tempdir().unwrap();
        let file = outside.path().join("a.md");
        std::fs::write(&file, "a").unwrap();
        assert_eq!(
            root_for(&file, None).unwrap(),
            outside.path().canonicalize().unwrap()
        );
    }

    #[test]
    fn snippets_are_flattened_and_clipped() {
        assert_eq!(snippet("a\n\n b", false), "a b");
        let long = "word ".repeat(200);
        let s = snippet(&long, false);
        assert_eq!(s.chars().count(), SNIPPET_CHARS);
        assert!(s.ends_with('…'));
        assert_eq!(snippet(&long, true).len(), long.trim_end().len());
    }

    #[test]
    fn the_demo_kb_is_ingested_once_and_only_into_an_empty_kb() {
        let dir = tempfile::tempdir().unwrap();
        let mut kb = KnowledgeBase::open(
            dir.path(),
            Arc::new(ToyEmbedder::new()),
            KbOptions::default(),
        )
        .unwrap();
        assert!(ensure_demo_kb(&mut kb).unwrap());
        let sources: Vec<String> = kb.list_sources().into_iter().map(|s| s.source).collect();
        assert_eq!(sources.len(), DEMO_DOCS.len());
        assert!(sources.contains(&"gaia-docs/running-a-node.md".to_string()));
        let hash = kb.hash();
        assert!(!ensure_demo_kb(&mut kb).unwrap());
        assert_eq!(kb.hash(), hash);

        let other = tempfile::tempdir().unwrap();
        let mut kb = KnowledgeBase::open(
            other.path(),
            Arc::new(ToyEmbedder::new()),
            KbOptions::default(),
        )
        .unwrap();
        kb.ingest_bytes(b"my own notes", "notes.txt", None, &mut no_progress)
            .unwrap();
        assert!(!ensure_demo_kb(&mut kb).unwrap());
        assert_eq!(kb.list_sources().len(), 1);
    }
}
