//! The knowledge base with the real all-MiniLM-L6-v2: retrieval quality over the project's
//! corpus, and `gaia kb ...` end to end through the real binary, bad input included.
//!
//! The model comes from `GAIA_MODELS_DIR` (a model store with `all-minilm-l6-v2/` inside); these
//! tests fail, never skip, when it is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Instant;

use gaia_knowledge::testing::{ToyEmbedder, encrypted_pdf, minimal_pdf};
use gaia_knowledge::{IngestPolicy, KbOptions, KnowledgeBase, SearchMode, SearchQuery};
use gaia_node::config::AgentConfig;
use gaia_node::models::{DEFAULT_EMBEDDING, Progress, Store};

use gaia_tests::text;

/// The embedding model's directory in the model store `GAIA_MODELS_DIR` points at.
fn embedding_model_source() -> PathBuf {
    let Some(dir) = std::env::var_os("GAIA_MODELS_DIR") else {
        panic!(
            "GAIA_MODELS_DIR is not set: point it at a model store holding {}/ (locally \
             GAIA_MODELS_DIR=/work/models-store); the knowledge-base tests need the real embedder",
            DEFAULT_EMBEDDING.name
        );
    };
    let model = PathBuf::from(dir).join(DEFAULT_EMBEDDING.name);
    for f in DEFAULT_EMBEDDING.files {
        assert!(
            model.join(f.name).is_file(),
            "{} is missing: GAIA_MODELS_DIR must be a model store holding {}/{{{}}}",
            model.join(f.name).display(),
            DEFAULT_EMBEDDING.name,
            DEFAULT_EMBEDDING
                .files
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    model
}

/// A fresh data directory whose model store links the embedding model's files from
/// `GAIA_MODELS_DIR` (the store verifies their sha256 on first use).
fn data_dir() -> tempfile::TempDir {
    let src = embedding_model_source();
    let data = tempfile::tempdir().unwrap();
    let dst = data.path().join("models").join(DEFAULT_EMBEDDING.name);
    fs::create_dir_all(&dst).unwrap();
    for f in DEFAULT_EMBEDDING.files {
        std::os::unix::fs::symlink(src.join(f.name), dst.join(f.name)).unwrap();
    }
    data
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../knowledge/tests/corpus")
}

fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != "questions.json"))
        .collect();
    files.sort();
    files
}

/// Runs `gaia --data-dir DATA --quiet kb ARGS...` in `cwd`.
fn kb(cwd: &Path, data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gaia"))
        .current_dir(cwd)
        .arg("--data-dir")
        .arg(data)
        .args(["--quiet", "kb"])
        .args(args)
        .env("GAIA_DEVICE", "cpu")
        .output()
        .expect("the gaia binary runs")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "gaia failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr.
fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "gaia should have failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn info(cwd: &Path, data: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(kb(cwd, data, &["info", "--json"]))).unwrap()
}

fn sources(cwd: &Path, data: &Path) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(&ok(kb(cwd, data, &["list", "--json"]))).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["source"].as_str().unwrap().to_string())
        .collect()
}

fn top_source(cwd: &Path, data: &Path, query: &str, mode: &[&str]) -> String {
    let mut args = vec!["search", query, "--json"];
    args.extend_from_slice(mode);
    let hits: serde_json::Value = serde_json::from_str(&ok(kb(cwd, data, &args))).unwrap();
    hits[0]["source"].as_str().unwrap().to_string()
}

#[derive(Default)]
struct Score {
    hits_at_5: usize,
    reciprocal_ranks: f64,
}

#[test]
fn retrieval_quality_with_the_real_embedder() {
    let data = data_dir();
    let store = Store::new(data.path(), Progress::Quiet);
    let embedder =
        gaia_node::kb::load_embedder(&store, DEFAULT_EMBEDDING.name, "cpu").expect("load MiniLM");
    let mut kb = KnowledgeBase::open(
        &data.path().join("kb"),
        embedder.shared(),
        KbOptions::default(),
    )
    .unwrap();

    let started = Instant::now();
    let report = kb
        .ingest_path(
            &corpus_dir(),
            &IngestPolicy::new(corpus_dir()),
            &mut gaia_knowledge::no_progress,
        )
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(report.failed.is_empty(), "failures: {:?}", report.failed);
    let info = kb.info();
    assert!(info.documents >= 20, "{} documents", info.documents);
    println!(
        "ingest with all-MiniLM-L6-v2 (cpu): {} documents, {} chunks in {secs:.1} s = {:.1} \
         chunks/s (chunking {:?})",
        info.documents,
        info.chunks,
        info.chunks as f64 / secs,
        info.chunking
    );

    let questions: serde_json::Value =
        serde_json::from_slice(&fs::read(corpus_dir().join("questions.json")).unwrap()).unwrap();
    let questions = questions["questions"].as_array().unwrap();
    assert!(questions.len() >= 30, "{} questions", questions.len());

    let modes = [
        ("vector", SearchMode::Vector),
        ("keyword", SearchMode::Keyword),
        ("hybrid", SearchMode::Hybrid),
    ];
    let mut scores: Vec<Score> = modes.iter().map(|_| Score::default()).collect();
    let mut misses = Vec::new();
    let mut latencies = Vec::new();
    for q in questions {
        let text = q["question"].as_str().unwrap();
        let source = q["source"].as_str().unwrap();
        assert!(
            report.documents.iter().any(|d| d.source == source),
            "{source} is not in the corpus"
        );
        for ((name, mode), score) in modes.iter().zip(&mut scores) {
            let t = Instant::now();
            let hits = kb
                .search(&SearchQuery::new(text).top_k(10).mode(*mode))
                .unwrap();
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
            // Rank of the first chunk from the expected document.
            let rank = hits.iter().position(|h| h.source == source);
            if let Some(r) = rank {
                score.reciprocal_ranks += 1.0 / (r + 1) as f64;
            }
            if rank.is_some_and(|r| r < 5) {
                score.hits_at_5 += 1;
            } else {
                misses.push(format!(
                    "{name}: {text:?} expected {source}, got {:?}",
                    hits.iter().take(5).map(|h| &h.source).collect::<Vec<_>>()
                ));
            }
        }
    }
    // As the agent retrieves for a chat (`[agent]` top_k 3, score_threshold 0.35): does the
    // expected document reach the model's context at all?
    let agent = AgentConfig::default();
    let mut in_context = [0usize; 2];
    for q in questions {
        let (text, source) = (
            q["question"].as_str().unwrap(),
            q["source"].as_str().unwrap(),
        );
        for (count, mode) in in_context
            .iter_mut()
            .zip([SearchMode::Vector, SearchMode::Hybrid])
        {
            let hits = kb
                .search(
                    &SearchQuery::new(text)
                        .top_k(agent.top_k)
                        .min_score(agent.score_threshold)
                        .mode(mode),
                )
                .unwrap();
            *count += usize::from(hits.iter().any(|h| h.source == source));
        }
    }
    let n = questions.len() as f64;
    println!(
        "agent retrieval (top {}, threshold {}): expected document in context vector {:.3} \
         ({}/{}), hybrid {:.3} ({}/{})",
        agent.top_k,
        agent.score_threshold,
        in_context[0] as f64 / n,
        in_context[0],
        questions.len(),
        in_context[1] as f64 / n,
        in_context[1],
        questions.len()
    );
    assert_eq!(
        agent.retrieval.mode(),
        SearchMode::Hybrid,
        "the agent's default retrieval"
    );
    assert!(
        in_context[1] >= in_context[0],
        "hybrid retrieval put fewer expected documents in context than vector retrieval"
    );
    for ((name, _), score) in modes.iter().zip(&scores) {
        println!(
            "{name:>7}: hit@5 {:.3} ({}/{}), MRR@10 {:.3}",
            score.hits_at_5 as f64 / n,
            score.hits_at_5,
            questions.len(),
            score.reciprocal_ranks / n
        );
    }
    for m in &misses {
        println!("miss {m}");
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "search latency over {} chunks (query embedding included): p50 {:.1} ms, p99 {:.1} ms",
        info.chunks,
        latencies[latencies.len() / 2],
        latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
    );
    for (i, (name, _)) in modes.iter().enumerate() {
        if *name == "keyword" {
            continue;
        }
        let rate = scores[i].hits_at_5 as f64 / n;
        assert!(
            rate >= 0.9,
            "{name} hit@5 is {rate:.3}, below 0.9 with the real embedder"
        );
    }
}

#[test]
fn cli_ingest_search_list_rm_export_import_info() {
    let work = tempfile::tempdir().unwrap();
    let docs = work.path().join("docs");
    fs::create_dir_all(docs.join("more")).unwrap();
    for (i, f) in corpus_files().iter().enumerate() {
        // Half of the files one level down, to exercise the recursive walk.
        let dest = if i % 2 == 0 {
            docs.join(f.file_name().unwrap())
        } else {
            docs.join("more").join(f.file_name().unwrap())
        };
        fs::copy(f, dest).unwrap();
    }
    let cwd = work.path();
    let a = data_dir();
    let out = ok(kb(cwd, a.path(), &["ingest", "docs"]));
    assert!(out.contains("24 document(s) ingested"), "{out}");

    let listed = sources(cwd, a.path());
    assert_eq!(listed.len(), 24, "{listed:?}");
    assert!(listed.contains(&"docs/beekeeping.md".to_string()));
    assert!(
        listed.iter().any(|s| s.starts_with("docs/more/")),
        "{listed:?}"
    );
    let table = ok(kb(cwd, a.path(), &["list"]));
    assert!(table.contains("docs/volcanoes.html") || table.contains("docs/more/volcanoes.html"));

    let bees = if listed.contains(&"docs/beekeeping.md".to_string()) {
        "docs/beekeeping.md"
    } else {
        "docs/more/beekeeping.md"
    };
    let q = "which parasitic mite threatens honey bee colonies";
    assert_eq!(top_source(cwd, a.path(), q, &[]), bees);
    assert_eq!(top_source(cwd, a.path(), q, &["--hybrid"]), bees);
    assert_eq!(top_source(cwd, a.path(), "varroa", &["--keyword"]), bees);
    let human = ok(kb(cwd, a.path(), &["search", q, "--top-k", "2"]));
    assert!(human.starts_with("1. "), "{human}");
    assert!(human.contains(bees), "{human}");
    assert!(!human.contains("\n3. "), "{human}");
    // A threshold above any cosine similarity leaves nothing.
    let none = ok(kb(cwd, a.path(), &["search", q, "--threshold", "0.999"]));
    assert!(none.contains("no results"), "{none}");

    let before = info(cwd, a.path());
    assert_eq!(before["documents"], 24);
    assert_eq!(before["model"]["id"], DEFAULT_EMBEDDING.name);
    assert_eq!(before["model"]["digest"], DEFAULT_EMBEDDING.files[0].sha256);
    assert_eq!(before["model"]["dimensions"], 384);
    assert_eq!(before["chunking"]["unit"], "tokens");
    assert_eq!(before["chunks"], before["vectors"]);
    let human = ok(kb(cwd, a.path(), &["info"]));
    assert!(human.contains(before["hash"].as_str().unwrap()), "{human}");
    assert!(human.contains("all-minilm-l6-v2"), "{human}");

    // rm, and rm of something absent.
    let out = ok(kb(cwd, a.path(), &["rm", bees]));
    assert!(out.contains("removed"), "{out}");
    assert!(!sources(cwd, a.path()).contains(&bees.to_string()));
    let err = fails(kb(cwd, a.path(), &["rm", bees]));
    assert!(err.contains("no document named"), "{err}");
    let after_rm = info(cwd, a.path());
    assert_eq!(after_rm["documents"], 23);
    assert_ne!(after_rm["hash"], before["hash"]);

    // Re-ingesting an unchanged directory changes nothing.
    ok(kb(cwd, a.path(), &["ingest", "docs/more"]));
    assert_eq!(info(cwd, a.path())["hash"], after_rm["hash"]);

    // Export, import into a second data directory: the same KB hash.
    let archive = work.path().join("kb.tar");
    let out = ok(kb(cwd, a.path(), &["export", archive.to_str().unwrap()]));
    let hash = after_rm["hash"].as_str().unwrap();
    assert!(out.contains(hash), "{out}");
    let b = data_dir();
    let out = ok(kb(
        cwd,
        b.path(),
        &["import", archive.to_str().unwrap(), "--expect-hash", hash],
    ));
    assert!(out.contains(hash), "{out}");
    assert_eq!(info(cwd, b.path())["hash"], hash);
    assert_eq!(sources(cwd, b.path()), sources(cwd, a.path()));
    assert_eq!(
        top_source(cwd, b.path(), "how are tides related to the moon", &[]),
        top_source(cwd, a.path(), "how are tides related to the moon", &[]),
    );

    // A snapshot made with another embedding model is refused, and nothing changes.
    let toy_dir = tempfile::tempdir().unwrap();
    let toy_archive = work.path().join("toy.tar");
    {
        let mut toy = KnowledgeBase::open(
            toy_dir.path(),
            Arc::new(ToyEmbedder::new()),
            KbOptions::default(),
        )
        .unwrap();
        toy.ingest_bytes(
            b"# Toy\n\nA toy document.",
            "toy.md",
            None,
            &mut gaia_knowledge::no_progress,
        )
        .unwrap();
        toy.export_snapshot(&toy_archive).unwrap();
    }
    let err = fails(kb(
        cwd,
        b.path(),
        &["import", toy_archive.to_str().unwrap()],
    ));
    assert!(err.contains("built with embedding model"), "{err}");
    assert_eq!(info(cwd, b.path())["hash"], hash);
    // A wrong expected hash is refused too.
    let wrong = before["hash"].as_str().unwrap();
    let err = fails(kb(
        cwd,
        b.path(),
        &["import", archive.to_str().unwrap(), "--expect-hash", wrong],
    ));
    assert!(err.contains("expected"), "{err}");
    assert_eq!(info(cwd, b.path())["hash"], hash);
}

#[test]
fn cli_bad_input_is_refused_clearly_and_nothing_is_lost() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let docs = cwd.join("docs");
    fs::create_dir_all(&docs).unwrap();
    for name in ["tides.md", "glaciers.md", "sourdough.txt"] {
        fs::copy(corpus_dir().join(name), docs.join(name)).unwrap();
    }
    let data = data_dir();
    ok(kb(cwd, data.path(), &["ingest", "docs"]));
    let good = info(cwd, data.path());
    let good_sources = sources(cwd, data.path());
    assert_eq!(good_sources.len(), 3);
    let unchanged = |what: &str| {
        let now = info(cwd, data.path());
        assert_eq!(now["hash"], good["hash"], "after {what}");
        assert_eq!(sources(cwd, data.path()), good_sources, "after {what}");
    };

    let bad = cwd.join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::write(
        bad.join("locked.pdf"),
        encrypted_pdf("top secret plans", "hunter2"),
    )
    .unwrap();
    let pdf = minimal_pdf(&["fine text"]);
    fs::write(bad.join("broken.pdf"), &pdf[..pdf.len() / 3]).unwrap();
    let binary: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    fs::write(bad.join("blob.txt"), &binary).unwrap();
    fs::write(bad.join("program.bin"), &binary).unwrap();
    // Sparse: 60 MiB on paper, over the 50 MiB default limit, without writing it.
    let huge = fs::File::create(bad.join("huge.txt")).unwrap();
    huge.set_len(60 * 1024 * 1024).unwrap();
    drop(huge);
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.md"), "# Secret\n\nDo not read.").unwrap();

    let cases: [(&str, Vec<String>, &str); 6] = [
        (
            "an encrypted pdf",
            vec!["bad/locked.pdf".into()],
            "encrypted",
        ),
        ("a corrupt pdf", vec!["bad/broken.pdf".into()], "pdf"),
        ("a binary file", vec!["bad/blob.txt".into()], "binary"),
        ("a huge file", vec!["bad/huge.txt".into()], "limit"),
        (
            "a path outside the allowed root",
            vec![
                "--root".into(),
                "docs".into(),
                outside.path().join("secret.md").display().to_string(),
            ],
            "outside the allowed directory",
        ),
        (
            "a file over --max-bytes",
            vec!["--max-bytes".into(), "100".into(), "docs/tides.md".into()],
            "limit",
        ),
    ];
    for (what, args, expected) in &cases {
        let mut argv = vec!["ingest"];
        argv.extend(args.iter().map(String::as_str));
        let err = fails(kb(cwd, data.path(), &argv));
        assert!(
            err.to_lowercase().contains(expected),
            "{what}: expected {expected:?} in the error: {err}"
        );
        unchanged(what);
    }

    // A directory with good and bad files: the good one is stored, the bad ones are each
    // reported, and the exit code says something failed.
    fs::copy(corpus_dir().join("tides.md"), bad.join("tides-copy.md")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.md"), bad.join("escape.md")).unwrap();
    let out = kb(cwd, data.path(), &["ingest", "--root", "bad", "bad"]);
    let err = fails(out);
    for name in [
        "locked.pdf",
        "broken.pdf",
        "blob.txt",
        "huge.txt",
        "escape.md",
    ] {
        assert!(err.contains(name), "{name} not reported: {err}");
    }
    assert!(
        err.contains("could not be ingested"),
        "no summary in: {err}"
    );
    let now = sources(cwd, data.path());
    assert!(now.contains(&"tides-copy.md".to_string()), "{now:?}");
    assert!(!now.iter().any(|s| s.contains("secret")), "{now:?}");
    for s in &good_sources {
        assert!(now.contains(s), "{s} was lost");
    }
    ok(kb(cwd, data.path(), &["rm", "tides-copy.md"]));
    unchanged("removing the good file of the mixed directory");

    // A damaged index file: opening detects it, rebuilds the index from the log, says so.
    let kb_dir = data.path().join("kb");
    let index = fs::read_dir(&kb_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "usearch"))
        .expect("an index checkpoint");
    let mut bytes = fs::read(&index).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0xa5;
    }
    fs::write(&index, &bytes).unwrap();
    let out = kb(cwd, data.path(), &["info", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rebuilt"),
        "no warning about the index: {stderr}"
    );
    unchanged("a damaged index file");
    assert_eq!(
        top_source(cwd, data.path(), "why does the sea rise twice a day", &[]),
        "docs/tides.md"
    );

    // A truncated index file too.
    let index = fs::read_dir(&kb_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "usearch"))
        .expect("an index checkpoint");
    let f = fs::OpenOptions::new().write(true).open(&index).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    let out = kb(cwd, data.path(), &["search", "glacier ice flow", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rebuilt"));
    unchanged("a truncated index file");
}
