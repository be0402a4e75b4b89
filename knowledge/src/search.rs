//! Retrieval: vector search (HNSW, cosine), keyword search (BM25) and hybrid search fusing both
//! rankings with reciprocal rank fusion, for queries where exact terms matter.

use std::collections::HashMap;

use crate::error::SearchError;
use crate::ingest::check_vector;
use crate::kb::KnowledgeBase;

/// Largest `top_k` accepted.
pub const MAX_TOP_K: usize = 1000;
/// The constant of reciprocal rank fusion: `score = Σ 1 / (RRF_K + rank)`, rank from 1.
pub const RRF_K: f32 = 60.0;

/// Which ranking to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchMode {
    /// Nearest neighbours of the query embedding; `score` is the cosine similarity.
    Vector,
    /// BM25 over the chunk texts; `score` is the BM25 score.
    Keyword,
    /// Both rankings fused with reciprocal rank fusion; `score` is the fused score.
    #[default]
    Hybrid,
}

/// A search request.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery<'a> {
    /// The query text.
    pub text: &'a str,
    /// How many hits at most (1 to [`MAX_TOP_K`]).
    pub top_k: usize,
    /// In `Vector` and `Hybrid` mode: the smallest cosine similarity of a hit. In hybrid mode
    /// it is applied after fusion, and a hit its keywords found needs only half of it
    /// ([`keyword_floor`]): exact terms vouch for a passage the embedding rates lower, but a
    /// shared digit or word alone does not make an unrelated passage context. In `Keyword`
    /// mode: the smallest BM25 score.
    pub min_score: Option<f32>,
    /// The ranking.
    pub mode: SearchMode,
}

impl<'a> SearchQuery<'a> {
    /// A hybrid query for the 5 best chunks, without threshold.
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            top_k: 5,
            min_score: None,
            mode: SearchMode::Hybrid,
        }
    }

    /// Sets `top_k`.
    pub fn top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    /// Sets the score threshold.
    pub fn min_score(mut self, min_score: f32) -> Self {
        self.min_score = Some(min_score);
        self
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: SearchMode) -> Self {
        self.mode = mode;
        self
    }
}

/// One retrieved chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    /// The chunk's key in this knowledge base (not stable across snapshots).
    pub chunk_id: u64,
    /// The document's source name.
    pub source: String,
    /// The document's title.
    pub title: String,
    /// The heading the chunk falls under, if the document has headings.
    pub heading: Option<String>,
    /// Position of the chunk in its document, from 0.
    pub ordinal: u32,
    /// Byte offset of the chunk's start in the document's extracted text.
    pub start: u64,
    /// Byte offset of the chunk's end.
    pub end: u64,
    /// The chunk's text.
    pub text: String,
    /// The ranking score (see [`SearchMode`]); higher is better.
    pub score: f32,
    /// Cosine similarity to the query, when the query was embedded.
    pub vector_score: Option<f32>,
    /// BM25 score, when the chunk matched query terms.
    pub keyword_score: Option<f32>,
}

/// A candidate of hybrid search: fused score and the scores from each ranking.
#[derive(Debug, Default, Clone, Copy)]
struct Fused {
    score: f32,
    vector: Option<f32>,
    keyword: Option<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// The similarity a hybrid hit found by its keywords needs, for a threshold `m`: half of a
/// positive threshold.
pub fn keyword_floor(m: f32) -> f32 {
    if m > 0.0 { m / 2.0 } else { m }
}

impl KnowledgeBase {
    /// Searches the knowledge base.
    pub fn search(&self, query: &SearchQuery<'_>) -> Result<Vec<SearchHit>, SearchError> {
        if query.text.trim().is_empty() {
            return Err(SearchError::EmptyQuery);
        }
        check_top_k(query.top_k)?;
        if let Some(reason) = &self.state.poisoned {
            return Err(SearchError::Store(crate::StoreError::Poisoned(
                reason.clone(),
            )));
        }
        match query.mode {
            SearchMode::Keyword => {
                let hits = self
                    .state
                    .bm25
                    .search(query.text, query.top_k)
                    .into_iter()
                    .filter(|(_, s)| query.min_score.is_none_or(|m| *s >= m))
                    .filter_map(|(id, s)| self.hit(id, s, None, Some(s)))
                    .collect();
                Ok(hits)
            }
            SearchMode::Vector => {
                let vector = self.embed_query(query.text)?;
                self.search_by_vector(&vector, query.top_k, query.min_score)
            }
            SearchMode::Hybrid => {
                let vector = self.embed_query(query.text)?;
                let depth = (query.top_k * 4).clamp(40, MAX_TOP_K);
                // Both rankings are fused whole; the threshold then drops the hits that are not
                // similar enough. (Filtering the vector list first would rank a passage that
                // both find below one only one finds.)
                let vector_hits = self.vector_candidates(&vector, depth)?;
                let keyword_hits = self.state.bm25.search(query.text, depth);
                let mut fused: HashMap<u64, Fused> = HashMap::new();
                for (rank, (id, s)) in vector_hits.iter().enumerate() {
                    let e = fused.entry(*id).or_default();
                    e.score += 1.0 / (RRF_K + rank as f32 + 1.0);
                    e.vector = Some(*s);
                }
                for (rank, (id, s)) in keyword_hits.iter().enumerate() {
                    let e = fused.entry(*id).or_default();
                    e.score += 1.0 / (RRF_K + rank as f32 + 1.0);
                    e.keyword = Some(*s);
                }
                let mut ranked: Vec<(u64, Fused)> = fused.into_iter().collect();
                ranked.sort_by(|(ia, a), (ib, b)| {
                    b.score
                        .total_cmp(&a.score)
                        .then(
                            b.vector
                                .unwrap_or(-1.0)
                                .total_cmp(&a.vector.unwrap_or(-1.0)),
                        )
                        .then(ia.cmp(ib))
                });
                if let Some(m) = query.min_score {
                    ranked.retain_mut(|(id, f)| {
                        if f.vector.is_none() {
                            f.vector = self.state.index.get(*id).map(|v| cosine(&v, &vector));
                        }
                        let similarity = f.vector.unwrap_or(-1.0);
                        let floor = if f.keyword.is_some() {
                            keyword_floor(m)
                        } else {
                            m
                        };
                        similarity >= floor
                    });
                }
                ranked.truncate(query.top_k);
                Ok(ranked
                    .into_iter()
                    .filter_map(|(id, f)| {
                        // Keyword-only hits get their similarity computed from the stored vector.
                        let vs = f
                            .vector
                            .or_else(|| self.state.index.get(id).map(|v| cosine(&v, &vector)));
                        self.hit(id, f.score, vs, f.keyword)
                    })
                    .collect())
            }
        }
    }

    /// Vector search with an already embedded query (same model as this knowledge base).
    pub fn search_by_vector(
        &self,
        vector: &[f32],
        top_k: usize,
        min_score: Option<f32>,
    ) -> Result<Vec<SearchHit>, SearchError> {
        check_top_k(top_k)?;
        check_vector(vector, self.state.header.model.dimensions).map_err(SearchError::BadVector)?;
        Ok(self
            .vector_candidates(vector, top_k)?
            .into_iter()
            .filter(|(_, s)| min_score.is_none_or(|m| *s >= m))
            .filter_map(|(id, s)| self.hit(id, s, Some(s), None))
            .collect())
    }

    fn vector_candidates(&self, vector: &[f32], k: usize) -> Result<Vec<(u64, f32)>, SearchError> {
        self.state
            .index
            .search(vector, k)
            .map_err(|e| SearchError::Store(crate::StoreError::Index(e.to_string())))
    }

    fn embed_query(&self, text: &str) -> Result<Vec<f32>, SearchError> {
        let mut out = self.embedder.embed(&[text])?;
        if out.len() != 1 {
            return Err(SearchError::BadVector(format!(
                "the embedder returned {} vectors for 1 text",
                out.len()
            )));
        }
        let v = out.remove(0);
        check_vector(&v, self.state.header.model.dimensions).map_err(SearchError::BadVector)?;
        Ok(v)
    }

    fn hit(
        &self,
        id: u64,
        score: f32,
        vector_score: Option<f32>,
        keyword_score: Option<f32>,
    ) -> Option<SearchHit> {
        let c = self.state.chunks.get(&id)?;
        let title = self
            .state
            .docs
            .get(&*c.source)
            .map(|d| d.title.to_string())
            .unwrap_or_default();
        Some(SearchHit {
            chunk_id: id,
            source: c.source.to_string(),
            title,
            heading: c.heading.as_deref().map(str::to_string),
            ordinal: c.ordinal,
            start: c.start,
            end: c.end,
            text: c.text.to_string(),
            score,
            vector_score,
            keyword_score,
        })
    }
}

fn check_top_k(top_k: usize) -> Result<(), SearchError> {
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(SearchError::TopKOutOfRange {
            top_k,
            max: MAX_TOP_K,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_parallel_orthogonal_and_zero_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn keyword_hits_need_half_a_positive_threshold() {
        assert_eq!(keyword_floor(0.35), 0.175);
        assert_eq!(keyword_floor(0.0), 0.0);
        assert_eq!(keyword_floor(-0.2), -0.2);
    }

    #[test]
    fn query_builder_sets_fields() {
        let q = SearchQuery::new("x")
            .top_k(3)
            .min_score(0.5)
            .mode(SearchMode::Keyword);
        assert_eq!(
            (q.top_k, q.min_score, q.mode),
            (3, Some(0.5), SearchMode::Keyword)
        );
        assert!(check_top_k(0).is_err());
        assert!(check_top_k(MAX_TOP_K + 1).is_err());
    }
}
