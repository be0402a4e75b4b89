//! Vector, keyword and hybrid search.

use std::sync::Arc;

use gaia_knowledge::testing::ToyEmbedder;
use gaia_knowledge::{
    EmbedError, Embedder, KbOptions, KnowledgeBase, SearchError, SearchMode, SearchQuery,
    no_progress,
};

use crate::{corpus_dir, corpus_kb};

/// Like the toy embedder, but blind to tokens containing digits, the way sentence embeddings
/// blur identifiers and codes.
struct BlindToIdentifiers(ToyEmbedder);

impl Embedder for BlindToIdentifiers {
    fn model_id(&self) -> &str {
        "toy-blind-to-identifiers"
    }
    fn model_digest(&self) -> &str {
        "0000"
    }
    fn dimensions(&self) -> usize {
        self.0.dimensions()
    }
    fn max_input_tokens(&self) -> Option<usize> {
        self.0.max_input_tokens()
    }
    fn count_tokens(&self, text: &str) -> usize {
        self.0.count_tokens(text)
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts
            .iter()
            .map(|t| {
                let words: Vec<&str> = t
                    .split_whitespace()
                    .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
                    .collect();
                self.0.vector(&words.join(" "))
            })
            .collect())
    }
}

#[test]
fn hybrid_search_finds_exact_terms_that_vectors_miss() {
    let dir = tempfile::tempdir().unwrap();
    let mut kb = KnowledgeBase::open(
        dir.path(),
        Arc::new(BlindToIdentifiers(ToyEmbedder::new())),
        KbOptions::default(),
    )
    .unwrap();
    let codes = "# Replica leases\n\nStatus X9Z7 is raised when a replica loses its lease. Leases are \
        renewed every few seconds by the coordinator; a replica that misses three renewals stops \
        accepting writes, drops its cached locks, waits for a fresh lease and rejoins the group \
        after replaying the journal from the last acknowledged position.";
    kb.ingest_bytes(codes.as_bytes(), "codes.md", None, &mut no_progress)
        .unwrap();
    for (i, text) in [
        "What does a status page show? What does each colour on it stand for? What does the history tell?",
        "What does an operator do first when the dashboard turns red, and what does the on-call rota say?",
    ]
    .iter()
    .enumerate()
    {
        kb.ingest_bytes(text.as_bytes(), &format!("status-{i}.md"), None, &mut no_progress).unwrap();
    }
    for name in [
        "beekeeping.md",
        "tides.md",
        "sourdough.txt",
        "chess-openings.md",
    ] {
        let bytes = std::fs::read(corpus_dir().join(name)).unwrap();
        kb.ingest_bytes(&bytes, name, None, &mut no_progress)
            .unwrap();
    }
    // The blind embedder sees "what does mean"; BM25 sees "x9z7" and "mean".
    let query = "what does X9Z7 mean";
    let top = |mode| -> Vec<String> {
        kb.search(&SearchQuery::new(query).mode(mode).top_k(3))
            .unwrap()
            .into_iter()
            .map(|h| h.source)
            .collect()
    };
    let keyword = top(SearchMode::Keyword);
    let vector = top(SearchMode::Vector);
    let hybrid = top(SearchMode::Hybrid);
    assert_eq!(keyword[0], "codes.md", "keyword: {keyword:?}");
    assert!(
        !vector.contains(&"codes.md".to_string()),
        "vector search should miss it: {vector:?}"
    );
    assert!(
        hybrid.contains(&"codes.md".to_string()),
        "hybrid: {hybrid:?} (vector {vector:?})"
    );

    // A hybrid hit found by keywords alone still reports its cosine similarity.
    let hits = kb.search(&SearchQuery::new(query).top_k(3)).unwrap();
    let hit = hits.iter().find(|h| h.source == "codes.md").unwrap();
    assert!(hit.keyword_score.unwrap() > 0.0);
    assert!(hit.vector_score.is_some());
}

#[test]
fn vector_search_respects_top_k_and_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let kb = corpus_kb(dir.path());
    let hits = kb
        .search(
            &SearchQuery::new("honey bees hive queen brood")
                .mode(SearchMode::Vector)
                .top_k(4),
        )
        .unwrap();
    assert_eq!(hits.len(), 4);
    assert_eq!(hits[0].source, "beekeeping.md");
    assert!(
        hits.windows(2).all(|w| w[0].score >= w[1].score),
        "sorted by score"
    );
    for h in &hits {
        assert_eq!(h.vector_score, Some(h.score));
        assert!(h.score <= 1.0 + 1e-5);
    }
    let threshold = hits[2].score;
    let strict = kb
        .search(
            &SearchQuery::new("honey bees hive queen brood")
                .mode(SearchMode::Vector)
                .top_k(50)
                .min_score(threshold),
        )
        .unwrap();
    assert!(strict.len() >= 3);
    assert!(strict.iter().all(|h| h.score >= threshold));
    assert!(strict.len() < 50);
    let none = kb
        .search(
            &SearchQuery::new("honey")
                .mode(SearchMode::Vector)
                .min_score(0.999),
        )
        .unwrap();
    assert!(none.is_empty());
    // search_by_vector with the embedder's own vector gives the same order.
    let v = ToyEmbedder::new().vector("honey bees hive queen brood");
    let by_vector = kb.search_by_vector(&v, 4, None).unwrap();
    assert_eq!(
        by_vector.iter().map(|h| h.chunk_id).collect::<Vec<_>>(),
        hits.iter().map(|h| h.chunk_id).collect::<Vec<_>>()
    );
}

#[test]
fn invalid_queries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kb = corpus_kb(dir.path());
    assert!(matches!(
        kb.search(&SearchQuery::new("  ")),
        Err(SearchError::EmptyQuery)
    ));
    assert!(matches!(
        kb.search(&SearchQuery::new("x").top_k(0)),
        Err(SearchError::TopKOutOfRange { .. })
    ));
    assert!(matches!(
        kb.search(&SearchQuery::new("x").top_k(100_000)),
        Err(SearchError::TopKOutOfRange { .. })
    ));
    assert!(matches!(
        kb.search_by_vector(&[0.5; 3], 3, None),
        Err(SearchError::BadVector(_))
    ));
    assert!(matches!(
        kb.search_by_vector(&[f32::NAN; 384], 3, None),
        Err(SearchError::BadVector(_))
    ));
    assert!(
        kb.search(&SearchQuery::new("the of and").mode(SearchMode::Keyword))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_toy_embedder_answers_many_corpus_questions_with_hybrid_search() {
    // The real retrieval-quality test uses MiniLM in the node crate; with a bag-of-words toy the
    // paraphrased questions are hard, so this only checks that the plumbing ranks sensibly.
    let dir = tempfile::tempdir().unwrap();
    let kb = corpus_kb(dir.path());
    let questions: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus_dir().join("questions.json")).unwrap())
            .unwrap();
    let questions = questions["questions"].as_array().unwrap();
    assert!(questions.len() >= 35);
    let mut found = 0;
    for q in questions {
        let text = q["question"].as_str().unwrap();
        let source = q["source"].as_str().unwrap();
        assert!(corpus_dir().join(source).exists(), "{source} is missing");
        let hits = kb.search(&SearchQuery::new(text).top_k(5)).unwrap();
        if hits.iter().any(|h| h.source == source) {
            found += 1;
        }
    }
    eprintln!(
        "toy embedder hybrid recall@5 on the corpus questions: {found}/{}",
        questions.len()
    );
    assert!(
        found * 2 >= questions.len(),
        "only {found} of {} questions found",
        questions.len()
    );
}
