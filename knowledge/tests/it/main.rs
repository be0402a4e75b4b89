//! Integration tests of gaia-knowledge, with the deterministic toy embedder (feature
//! `test-utils`).

mod bad_input;
mod churn;
mod crash;
mod ingest;
mod recovery;
mod search;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gaia_knowledge::testing::ToyEmbedder;
use gaia_knowledge::{IngestPolicy, KbOptions, KnowledgeBase, no_progress};

/// The retrieval corpus shipped with the crate.
pub(crate) fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// Opens (or creates) a knowledge base with the toy embedder.
pub(crate) fn open(dir: &Path) -> KnowledgeBase {
    open_with(dir, ToyEmbedder::new(), KbOptions::default())
}

pub(crate) fn open_with(dir: &Path, embedder: ToyEmbedder, options: KbOptions) -> KnowledgeBase {
    KnowledgeBase::open(dir, Arc::new(embedder), options).expect("open the knowledge base")
}

/// A knowledge base holding the whole corpus.
pub(crate) fn corpus_kb(dir: &Path) -> KnowledgeBase {
    let mut kb = open(dir);
    let report = kb
        .ingest_path(
            &corpus_dir(),
            &IngestPolicy::new(corpus_dir()),
            &mut no_progress,
        )
        .unwrap();
    assert!(report.failed.is_empty(), "failures: {:?}", report.failed);
    kb
}
