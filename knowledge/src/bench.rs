//! Access to the vector index for the benchmark example (`examples/kb_bench.rs`); not a stable
//! API.

use crate::index::VectorIndex;

/// The knowledge base's usearch index with its production settings.
#[derive(Debug)]
pub struct BenchIndex(VectorIndex);

impl BenchIndex {
    /// An empty index.
    pub fn new(dims: usize) -> Result<Self, String> {
        VectorIndex::new(dims).map(Self).map_err(|e| e.to_string())
    }

    /// An empty index with another graph degree (`connectivity`) and insertion candidate list
    /// (`expansion_add`) than the knowledge base's 16 and 128.
    pub fn with_params(
        dims: usize,
        connectivity: usize,
        expansion_add: usize,
    ) -> Result<Self, String> {
        VectorIndex::with_params(dims, connectivity, expansion_add)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// Adds vectors on all cores.
    pub fn add_many(&self, items: &[(u64, &[f32])]) -> Result<(), String> {
        self.0.add_many(items).map_err(|e| e.to_string())
    }

    /// The knowledge base's search: exact up to the exact-search size, else the graph plus the
    /// orphans: `(key, cosine similarity)`.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, String> {
        self.0.search(query, k).map_err(|e| e.to_string())
    }

    /// Searches every stored vector of `keys` for itself and keeps those the graph does not
    /// lead to (orphans, searched exactly beside the graph); returns their number.
    pub fn sweep(&self, keys: &[u64]) -> Result<usize, String> {
        self.0.sweep(keys).map_err(|e| e.to_string())
    }

    /// Sets the size up to which searches are exact (the knowledge base's default is
    /// [`crate::DEFAULT_EXACT_SEARCH_MAX`]).
    pub fn set_exact_search_max(&mut self, n: usize) {
        self.0.set_exact_search_max(n);
    }

    /// The graph's approximate search alone, without the orphans.
    pub fn graph_search(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, String> {
        self.0.graph_search(query, k).map_err(|e| e.to_string())
    }

    /// Brute-force search.
    pub fn exact_search(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, String> {
        self.0.exact_search(query, k).map_err(|e| e.to_string())
    }

    /// Sets the candidate list size of searches (the knowledge base uses 96).
    pub fn set_expansion_search(&self, n: usize) {
        self.0.set_expansion_search(n);
    }

    /// The SIMD backend of the distance kernels.
    pub fn hardware_acceleration(&self) -> String {
        self.0.hardware_acceleration()
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }
}
