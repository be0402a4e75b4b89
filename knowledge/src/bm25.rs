//! A small BM25 keyword index over chunks, kept in memory and rebuilt from the chunk log on open.
//! It makes exact terms (names, numbers, identifiers) findable where embeddings blur them.

use std::collections::{HashMap, HashSet};

/// Term-frequency saturation.
const K1: f32 = 1.2;
/// Length normalisation.
const B: f32 = 0.75;
/// Longest token kept, in characters; longer runs are not words.
const MAX_TOKEN_CHARS: usize = 48;

/// Very common English words that carry no meaning for retrieval.
const STOPWORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "an", "and", "any", "are", "as", "at", "be", "been",
    "but", "by", "can", "could", "did", "do", "does", "for", "from", "had", "has", "have", "how",
    "i", "if", "in", "into", "is", "it", "its", "may", "more", "most", "no", "not", "of", "on",
    "or", "other", "our", "should", "so", "some", "such", "than", "that", "the", "their", "them",
    "then", "there", "these", "they", "this", "those", "to", "up", "use", "was", "we", "were",
    "what", "when", "where", "which", "while", "who", "why", "will", "with", "would", "you",
    "your",
];

/// Lowercased alphanumeric tokens of `text`, stopwords removed.
pub(crate) fn tokenize(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty() && t.chars().count() <= MAX_TOKEN_CHARS)
        .map(|t| t.to_lowercase())
        .filter(|t| !STOPWORDS.contains(&t.as_str()))
}

/// An inverted index: term -> (chunk id, term frequency).
#[derive(Debug, Default)]
pub(crate) struct Bm25 {
    postings: HashMap<Box<str>, Vec<(u64, u32)>>,
    lengths: HashMap<u64, u32>,
    total_length: u64,
}

impl Bm25 {
    /// Number of indexed chunks.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Indexes a chunk; its id must not be indexed already.
    pub(crate) fn insert(&mut self, id: u64, text: &str) {
        let mut counts: HashMap<String, u32> = HashMap::new();
        let mut length = 0u32;
        for token in tokenize(text) {
            *counts.entry(token).or_insert(0) += 1;
            length = length.saturating_add(1);
        }
        for (term, tf) in counts {
            self.postings
                .entry(term.into_boxed_str())
                .or_default()
                .push((id, tf));
        }
        self.lengths.insert(id, length);
        self.total_length += u64::from(length);
    }

    /// Removes chunks; `texts` yields `(id, text)` of each removed chunk so that only their terms'
    /// posting lists are touched.
    pub(crate) fn remove<'a>(&mut self, chunks: impl IntoIterator<Item = (u64, &'a str)>) {
        let mut ids = HashSet::new();
        let mut terms: HashSet<String> = HashSet::new();
        for (id, text) in chunks {
            if let Some(length) = self.lengths.remove(&id) {
                self.total_length -= u64::from(length);
                ids.insert(id);
                terms.extend(tokenize(text));
            }
        }
        for term in terms {
            if let Some(list) = self.postings.get_mut(term.as_str()) {
                list.retain(|(id, _)| !ids.contains(id));
                if list.is_empty() {
                    self.postings.remove(term.as_str());
                }
            }
        }
    }

    /// The `k` best chunks for `query` as `(id, score)`, best first.
    pub(crate) fn search(&self, query: &str, k: usize) -> Vec<(u64, f32)> {
        let n = self.lengths.len();
        if n == 0 || k == 0 {
            return Vec::new();
        }
        let avg = self.total_length as f32 / n as f32;
        let mut terms: Vec<String> = tokenize(query).collect();
        terms.sort();
        terms.dedup();
        let mut scores: HashMap<u64, f32> = HashMap::new();
        for term in &terms {
            let Some(list) = self.postings.get(term.as_str()) else {
                continue;
            };
            let df = list.len() as f32;
            let idf = (1.0 + (n as f32 - df + 0.5) / (df + 0.5)).ln();
            for &(id, tf) in list {
                let len = self.lengths.get(&id).copied().unwrap_or(0) as f32;
                let tf = tf as f32;
                let norm = tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / avg.max(1.0)));
                *scores.entry(id).or_insert(0.0) += idf * norm;
            }
        }
        let mut hits: Vec<(u64, f32)> = scores.into_iter().collect();
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(k);
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_lowercased_words_without_stopwords() {
        let t: Vec<String> = tokenize("The Port 8080, of GAIA-node! café").collect();
        assert_eq!(t, vec!["port", "8080", "gaia", "node", "café"]);
    }

    #[test]
    fn rare_exact_terms_rank_first_and_removal_forgets_them() {
        let mut idx = Bm25::default();
        idx.insert(1, "bees make honey in the hive");
        idx.insert(2, "the hive entrance faces south; bees like sun");
        idx.insert(3, "set GAIA_NODE_PORT=8080 to move the api");
        idx.insert(4, "honey honey honey honey");
        let hits = idx.search("which port: 8080?", 10);
        assert_eq!(hits[0].0, 3);
        assert_eq!(hits.len(), 1);
        let hits = idx.search("honey", 10);
        assert_eq!(hits[0].0, 4, "higher term frequency ranks first: {hits:?}");
        assert_eq!(hits.len(), 2);
        idx.remove([(4, "honey honey honey honey"), (99, "unknown")]);
        assert_eq!(idx.len(), 3);
        assert_eq!(
            idx.search("honey", 10)
                .iter()
                .map(|h| h.0)
                .collect::<Vec<_>>(),
            vec![1]
        );
        assert!(idx.search("the of and", 10).is_empty());
    }
}
