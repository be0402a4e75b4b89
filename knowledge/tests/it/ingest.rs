//! Ingesting files, directories and bytes; re-ingesting and removing sources.

use std::fs;

use gaia_knowledge::testing::{ToyEmbedder, minimal_pdf};
use gaia_knowledge::{
    ContentType, IngestPolicy, KbOptions, Progress, SearchMode, SearchQuery, SizeUnit, no_progress,
};

use crate::{corpus_dir, corpus_kb, open, open_with};

#[test]
fn a_directory_is_ingested_with_titles_types_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let mut kb = open(dir.path());
    let mut events = Vec::new();
    let report = kb
        .ingest_path(&corpus_dir(), &IngestPolicy::new(corpus_dir()), &mut |p| {
            events.push(match p {
                Progress::Discovered { files } => format!("discovered {files}"),
                Progress::Started { .. } => "started".into(),
                Progress::Chunked { .. } => "chunked".into(),
                Progress::Embedded { done, total, .. } => format!("embedded {done}/{total}"),
                Progress::Stored { .. } => "stored".into(),
                Progress::Skipped { path, .. } => format!("skipped {}", path.display()),
                Progress::Failed { path, .. } => format!("failed {}", path.display()),
            })
        })
        .unwrap();
    let docs = fs::read_dir(corpus_dir()).unwrap().filter(|e| {
        let name = e.as_ref().unwrap().file_name();
        !name.to_string_lossy().ends_with(".json")
    });
    let expected = docs.count();
    assert!(expected >= 22);
    assert_eq!(report.documents.len(), expected);
    assert!(report.failed.is_empty());
    assert_eq!(
        report.skipped.len(),
        1,
        "questions.json is skipped: {:?}",
        report.skipped
    );
    assert_eq!(
        events[0],
        "skipped ".to_string() + &corpus_dir().join("questions.json").display().to_string()
    );
    assert!(events.contains(&format!("discovered {expected}")));
    assert_eq!(events.iter().filter(|e| *e == "stored").count(), expected);
    assert!(events.iter().any(|e| e.starts_with("embedded")));

    let sources = kb.list_sources();
    assert_eq!(sources.len(), expected);
    assert!(sources.windows(2).all(|w| w[0].source < w[1].source));
    let by_name = |n: &str| sources.iter().find(|s| s.source == n).unwrap().clone();
    assert_eq!(by_name("beekeeping.md").title, "Keeping honey bees");
    assert_eq!(by_name("beekeeping.md").content_type, ContentType::Markdown);
    assert_eq!(
        by_name("gaia-payments.html").title,
        "Paying for inference: vouchers and receipts"
    );
    assert_eq!(by_name("sourdough.txt").title, "sourdough.txt");
    assert_eq!(by_name("volcanoes.html").content_type, ContentType::Html);

    // Chunks of the HTML page hold text, never markup or script.
    let chunks = kb.source_chunks("volcanoes.html").unwrap();
    assert!(
        chunks
            .iter()
            .all(|c| !c.contains('<') && !c.contains("dataLayer"))
    );
    assert!(chunks.iter().any(|c| c.contains("pyroclastic")));

    let info = kb.info();
    assert_eq!(info.documents, expected);
    assert_eq!(info.chunks, sources.iter().map(|s| s.chunks).sum::<usize>());
    assert!(
        info.chunks > expected,
        "documents are cut into several chunks"
    );
    assert_eq!(info.chunking.unit, SizeUnit::Tokens);
    assert_eq!(info.model.id, "toy-hashed-bag-of-words");

    // Hits carry positions that point into the document, and headings.
    let hits = kb
        .search(&SearchQuery::new("varroa mites sticky board").mode(SearchMode::Keyword))
        .unwrap();
    let hit = &hits[0];
    assert_eq!(hit.source, "beekeeping.md");
    // The heading in force where the chunk starts.
    assert!(
        ["Varroa", "Harvest and winter"].contains(&hit.heading.as_deref().unwrap()),
        "{:?}",
        hit.heading
    );
    let original = fs::read_to_string(corpus_dir().join("beekeeping.md")).unwrap();
    assert_eq!(&original[hit.start as usize..hit.end as usize], hit.text);
}

#[test]
fn re_ingesting_replaces_a_source_and_identical_content_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut kb = open(dir.path());
    let v1 = kb
        .ingest_bytes(
            b"# Notes\n\nThe password is zebracorn.",
            "notes.md",
            None,
            &mut no_progress,
        )
        .unwrap();
    assert!(!v1.replaced && !v1.unchanged);
    let again = kb
        .ingest_bytes(
            b"# Notes\n\nThe password is zebracorn.",
            "notes.md",
            None,
            &mut no_progress,
        )
        .unwrap();
    assert!(again.unchanged);
    let hash = kb.hash();
    let v2 = kb
        .ingest_bytes(
            b"# Notes\n\nThe password is marmotfish.",
            "notes.md",
            None,
            &mut no_progress,
        )
        .unwrap();
    assert!(v2.replaced);
    assert_ne!(kb.hash(), hash);
    assert_eq!(kb.list_sources().len(), 1);
    let kw = |kb: &gaia_knowledge::KnowledgeBase, q: &str| {
        kb.search(&SearchQuery::new(q).mode(SearchMode::Keyword))
            .unwrap()
            .len()
    };
    assert_eq!(kw(&kb, "zebracorn"), 0, "old chunks are gone");
    assert_eq!(kw(&kb, "marmotfish"), 1);
    let vector_hits = kb
        .search(
            &SearchQuery::new("zebracorn")
                .mode(SearchMode::Vector)
                .top_k(10),
        )
        .unwrap();
    assert!(vector_hits.iter().all(|h| !h.text.contains("zebracorn")));
    assert_eq!(kb.info().chunks, 1);

    // The state survives a reopen.
    drop(kb);
    let kb = open(dir.path());
    assert_eq!(kw(&kb, "marmotfish"), 1);
    assert_eq!(kw(&kb, "zebracorn"), 0);
    assert!(kb.recovery().is_clean(), "{:?}", kb.recovery());
}

#[test]
fn removing_a_source_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut kb = corpus_kb(dir.path());
    let before = kb.info();
    assert!(kb.remove_source("tides.md").unwrap());
    assert!(!kb.remove_source("tides.md").unwrap());
    assert!(kb.source("tides.md").is_none());
    let hits = kb
        .search(&SearchQuery::new("spring and neap tides").top_k(20))
        .unwrap();
    assert!(hits.iter().all(|h| h.source != "tides.md"));
    assert_eq!(kb.info().documents, before.documents - 1);
    drop(kb);
    let kb = open(dir.path());
    assert!(kb.source("tides.md").is_none());
    assert_eq!(kb.info().documents, before.documents - 1);
}

#[test]
fn prepare_and_commit_split_embedding_from_storing() {
    let dir = tempfile::tempdir().unwrap();
    let mut kb = open(dir.path());
    let prepared = kb
        .prepare_bytes(
            b"<p>Lighthouses guide ships.</p>",
            "https://example.org/lights",
            Some("text/html"),
            &mut no_progress,
        )
        .unwrap();
    assert_eq!(prepared.chunks(), 1);
    assert_eq!(prepared.title(), "lights");
    assert!(
        kb.list_sources().is_empty(),
        "nothing is stored before commit"
    );
    let done = kb.commit(prepared).unwrap();
    assert_eq!(done.content_type, ContentType::Html);
    assert_eq!(kb.list_sources().len(), 1);

    // A document prepared by a knowledge base of another model is refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other = open_with(
        other_dir.path(),
        ToyEmbedder::new().with_model_id("other-model"),
        KbOptions::default(),
    );
    let foreign = other
        .prepare_bytes(b"text", "x.txt", None, &mut no_progress)
        .unwrap();
    assert!(matches!(
        kb.commit(foreign),
        Err(gaia_knowledge::IngestError::WrongModel { .. })
    ));
}

#[test]
fn pdf_files_and_character_sizing_work() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    fs::write(
        files.path().join("report.pdf"),
        minimal_pdf(&["Quarterly lava output rose", "Second page mentions basalt"]),
    )
    .unwrap();
    let embedder = ToyEmbedder::new().with_max_tokens(None);
    let options = KbOptions {
        chunk_size: Some(40),
        chunk_overlap: Some(5),
        ..KbOptions::default()
    };
    let mut kb = open_with(dir.path(), embedder, options);
    assert_eq!(kb.chunking().unit, SizeUnit::Characters);
    assert_eq!(kb.chunking().max_size, 40);
    let done = kb
        .ingest_file(
            &files.path().join("report.pdf"),
            &IngestPolicy::new(files.path()),
            &mut no_progress,
        )
        .unwrap();
    assert_eq!(done.content_type, ContentType::Pdf);
    assert_eq!(done.title, "report.pdf");
    let hits = kb
        .search(&SearchQuery::new("basalt").mode(SearchMode::Keyword))
        .unwrap();
    assert_eq!(hits[0].source, "report.pdf");
    assert!(
        kb.source_chunks("report.pdf")
            .unwrap()
            .iter()
            .all(|c| c.chars().count() <= 40)
    );
}

#[test]
fn chunking_parameters_are_fixed_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    let kb = open_with(
        dir.path(),
        ToyEmbedder::new(),
        KbOptions {
            chunk_size: Some(64),
            ..KbOptions::default()
        },
    );
    assert_eq!(kb.chunking().max_size, 64);
    assert_eq!(kb.chunking().overlap, 8);
    drop(kb);
    let kb = open_with(
        dir.path(),
        ToyEmbedder::new(),
        KbOptions {
            chunk_size: Some(100),
            ..KbOptions::default()
        },
    );
    assert_eq!(
        kb.chunking().max_size,
        64,
        "an existing knowledge base keeps its parameters"
    );
    let fresh = tempfile::tempdir().unwrap();
    let bad = gaia_knowledge::KnowledgeBase::open(
        fresh.path(),
        std::sync::Arc::new(ToyEmbedder::new()),
        KbOptions {
            chunk_size: Some(10_000),
            ..KbOptions::default()
        },
    );
    assert!(matches!(bad, Err(gaia_knowledge::OpenError::Chunking(_))));
}
