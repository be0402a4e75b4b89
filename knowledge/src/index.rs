//! The vector index: a usearch HNSW graph over f32 vectors with the cosine metric, keyed by chunk
//! id. usearch's own `save` writes in place and is not crash-safe, so checkpoints go through a
//! temporary file that is fsynced, hashed and renamed; a checkpoint is only loaded after its
//! sha256 matches the manifest.
//!
//! # Every stored vector is found by itself
//!
//! An HNSW graph is approximate: its insertion heuristic prunes links, and on data without
//! neighbourhood structure (vectors all about equally far apart) or after many removals some
//! nodes keep no inbound link, so no search ever reaches them. With the crash test's workload a
//! freshly built graph of 3 000 vectors had 16 such nodes (65 when built on two threads), and a
//! search list of 400 candidates did not find them either. A knowledge base must not silently
//! lose a document that way, so:
//!
//! - up to [`DEFAULT_EXACT_SEARCH_MAX`] vectors (configurable), searches are exact (brute force
//!   over every stored vector: about 2 ms for 20 000 vectors of 384 dimensions on one core of
//!   the development machine); the graph is still kept, for when the index grows;
//! - above it, searches use the graph and also compare the query with the **orphans**: the
//!   vectors a search for themselves does not find. A vector is checked when it is added, and
//!   the whole index is swept ([`VectorIndex::sweep`]) when it is loaded or rebuilt and at each
//!   checkpoint, since later insertions can prune a node's last inbound link.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;
use std::sync::{Condvar, Mutex, RwLock};

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::fsutil;

/// Graph degree (usearch's default).
const CONNECTIVITY: usize = 16;
/// Candidate list size while inserting.
const EXPANSION_ADD: usize = 128;
/// Candidate list size while searching; raised for small `k` to keep recall high.
const EXPANSION_SEARCH: usize = 96;
/// Up to this many vectors, searches are exact by default (see the module documentation).
pub const DEFAULT_EXACT_SEARCH_MAX: usize = 20_000;
/// How many results a vector's search for itself looks through.
const SELF_CHECK_K: usize = 10;

/// An error from usearch or from the files around it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IndexError {
    #[error("vector index: {0}")]
    Usearch(String),
    #[error("vector index file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("vector index path {0} is not valid UTF-8; move the knowledge base to a UTF-8 path")]
    NonUtf8Path(String),
    #[error("vector index file does not match its manifest: {0}")]
    Mismatch(String),
}

fn usearch_err(e: impl std::fmt::Display) -> IndexError {
    IndexError::Usearch(e.to_string())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn path_str(path: &Path) -> Result<&str, IndexError> {
    path.to_str()
        .ok_or_else(|| IndexError::NonUtf8Path(path.display().to_string()))
}

/// Bounds the number of threads inside usearch at once: usearch keeps one scratch context per
/// thread and fails a call when none is free.
struct Slots {
    free: Mutex<usize>,
    cond: Condvar,
}

impl Slots {
    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.cond.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.cond.notify_one();
    }
}

/// A usearch index with crash-safe checkpoints.
pub(crate) struct VectorIndex {
    inner: Index,
    dims: usize,
    threads: usize,
    slots: Slots,
    /// Searches are exact while the index holds at most this many vectors.
    exact_max: usize,
    /// Vectors the graph does not lead to, compared with every graph search's query.
    orphans: RwLock<HashMap<u64, Vec<f32>>>,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dims", &self.dims)
            .field("len", &self.len())
            .finish()
    }
}

fn options(dims: usize, connectivity: usize, expansion_add: usize) -> IndexOptions {
    IndexOptions {
        dimensions: dims,
        metric: MetricKind::Cos,
        quantization: ScalarKind::F32,
        connectivity,
        expansion_add,
        expansion_search: EXPANSION_SEARCH,
        multi: false,
    }
}

fn thread_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(4, 64)
}

impl VectorIndex {
    /// An empty index for vectors of `dims` dimensions.
    pub(crate) fn new(dims: usize) -> Result<Self, IndexError> {
        Self::with_params(dims, CONNECTIVITY, EXPANSION_ADD)
    }

    /// An empty index with other graph parameters than the knowledge base's (for benchmarks).
    pub(crate) fn with_params(
        dims: usize,
        connectivity: usize,
        expansion_add: usize,
    ) -> Result<Self, IndexError> {
        let inner = Index::new(&options(dims, connectivity, expansion_add)).map_err(usearch_err)?;
        let threads = thread_count();
        inner
            .reserve_capacity_and_threads(64, threads)
            .map_err(usearch_err)?;
        Ok(Self {
            inner,
            dims,
            threads,
            slots: Slots {
                free: Mutex::new(threads),
                cond: Condvar::new(),
            },
            exact_max: DEFAULT_EXACT_SEARCH_MAX,
            orphans: RwLock::new(HashMap::new()),
        })
    }

    /// Sets the size up to which searches are exact (brute force).
    pub(crate) fn set_exact_search_max(&mut self, n: usize) {
        self.exact_max = n;
    }

    /// Whether searches go through the graph (the index is above the exact-search size).
    fn uses_graph(&self) -> bool {
        self.len() > self.exact_max
    }

    /// Number of vectors the graph does not lead to (searched exactly beside it).
    pub(crate) fn orphan_count(&self) -> usize {
        self.orphans.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether a graph search for `vector` finds `key`.
    fn graph_finds(&self, key: u64, vector: &[f32]) -> Result<bool, IndexError> {
        let _slot = self.slots.acquire();
        let matches = self
            .inner
            .search(vector, SELF_CHECK_K)
            .map_err(usearch_err)?;
        Ok(matches.keys.contains(&key))
    }

    /// Records `key` as an orphan if the graph does not lead to it (only while searches use
    /// the graph).
    fn check_reachable(&self, key: u64, vector: &[f32]) -> Result<(), IndexError> {
        if self.uses_graph() && !self.graph_finds(key, vector)? {
            self.orphans
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, vector.to_vec());
        }
        Ok(())
    }

    /// Searches every vector of `keys` (the stored ones) for itself, on all cores, and keeps
    /// those the graph does not lead to as orphans. Does nothing while searches are exact.
    /// Returns the number of orphans.
    pub(crate) fn sweep(&self, keys: &[u64]) -> Result<usize, IndexError> {
        if !self.uses_graph() {
            self.orphans
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            return Ok(0);
        }
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(self.threads)
            .max(1);
        let per = keys.len().div_ceil(workers).max(1);
        let found: Vec<(u64, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = keys
                .chunks(per)
                .map(|part| {
                    scope.spawn(move || -> Result<Vec<(u64, Vec<f32>)>, IndexError> {
                        let mut lost = Vec::new();
                        for &key in part {
                            let Some(vector) = self.get(key) else {
                                continue;
                            };
                            if !self.graph_finds(key, &vector)? {
                                lost.push((key, vector));
                            }
                        }
                        Ok(lost)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for h in handles {
                let part = h
                    .join()
                    .map_err(|_| IndexError::Usearch("an index sweep thread panicked".into()))??;
                all.extend(part);
            }
            Ok::<_, IndexError>(all)
        })?;
        let mut orphans = self.orphans.write().unwrap_or_else(|p| p.into_inner());
        *orphans = found.into_iter().collect();
        Ok(orphans.len())
    }

    /// Loads a checkpoint after checking its sha256 and size against the manifest.
    pub(crate) fn load_verified(
        path: &Path,
        dims: usize,
        expected_sha256: &[u8; 32],
        expected_bytes: u64,
    ) -> Result<Self, IndexError> {
        let (digest, bytes) = fsutil::sha256_file(path).map_err(io_err(path))?;
        if bytes != expected_bytes || &digest != expected_sha256 {
            return Err(IndexError::Mismatch(format!(
                "{} has {bytes} bytes with sha256 {}, the manifest says {expected_bytes} bytes with \
                 sha256 {}",
                path.display(),
                hex::encode(digest),
                hex::encode(expected_sha256)
            )));
        }
        let index = Self::new(dims)?;
        index.inner.load(path_str(path)?).map_err(usearch_err)?;
        if index.inner.dimensions() != dims {
            return Err(IndexError::Mismatch(format!(
                "{} holds {}-dimensional vectors, expected {dims}",
                path.display(),
                index.inner.dimensions()
            )));
        }
        index.inner.change_expansion_search(EXPANSION_SEARCH);
        index.inner.change_expansion_add(EXPANSION_ADD);
        let capacity = index.inner.size().max(64);
        index
            .inner
            .reserve_capacity_and_threads(capacity, index.threads)
            .map_err(usearch_err)?;
        Ok(index)
    }

    /// Sets the candidate list size of searches (recall against speed).
    pub(crate) fn set_expansion_search(&self, n: usize) {
        self.inner.change_expansion_search(n);
    }

    /// The SIMD backend usearch uses for distances, e.g. `haswell`.
    pub(crate) fn hardware_acceleration(&self) -> String {
        self.inner.hardware_acceleration()
    }

    /// Number of vectors.
    pub(crate) fn len(&self) -> usize {
        self.inner.size()
    }

    /// Makes room for `additional` more vectors, growing geometrically.
    pub(crate) fn reserve(&self, additional: usize) -> Result<(), IndexError> {
        let needed = self.inner.size() + additional;
        let capacity = self.inner.capacity();
        if needed > capacity {
            let target = needed.max(capacity.saturating_mul(2)).max(64);
            self.inner
                .reserve_capacity_and_threads(target, self.threads)
                .map_err(usearch_err)?;
        }
        Ok(())
    }

    /// Adds one vector (call [`VectorIndex::reserve`] first).
    pub(crate) fn add(&self, key: u64, vector: &[f32]) -> Result<(), IndexError> {
        self.insert(key, vector)?;
        self.check_reachable(key, vector)
    }

    fn insert(&self, key: u64, vector: &[f32]) -> Result<(), IndexError> {
        let _slot = self.slots.acquire();
        self.inner.add(key, vector).map_err(usearch_err)
    }

    /// Adds many vectors on all cores, without checking that the graph leads to each: for
    /// building an index, which the caller then [sweeps](Self::sweep).
    pub(crate) fn add_many(&self, items: &[(u64, &[f32])]) -> Result<(), IndexError> {
        self.reserve(items.len())?;
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(self.threads);
        if workers <= 1 || items.len() < 256 {
            return items.iter().try_for_each(|(k, v)| self.insert(*k, v));
        }
        let per = items.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .chunks(per)
                .map(|part| {
                    scope.spawn(move || part.iter().try_for_each(|(k, v)| self.insert(*k, v)))
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| IndexError::Usearch("an index builder thread panicked".into()))?
            })
        })
    }

    /// Removes a vector; a missing key is not an error.
    pub(crate) fn remove(&self, key: u64) -> Result<(), IndexError> {
        self.orphans
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let _slot = self.slots.acquire();
        self.inner.remove(key).map(|_| ()).map_err(usearch_err)
    }

    pub(crate) fn contains(&self, key: u64) -> bool {
        self.inner.contains(key)
    }

    /// The `k` nearest vectors as `(key, cosine similarity)`, most similar first: exact while
    /// the index is small, else the graph's answer merged with the orphans (see the module
    /// documentation).
    pub(crate) fn search(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, IndexError> {
        if k == 0 || self.len() == 0 {
            return Ok(Vec::new());
        }
        if !self.uses_graph() {
            return self.exact_search(query, k);
        }
        let mut hits = self.graph_search(query, k)?;
        let orphans = self.orphans.read().unwrap_or_else(|p| p.into_inner());
        if !orphans.is_empty() {
            let norm = dot(query, query).sqrt();
            for (key, vector) in orphans.iter() {
                if hits.iter().any(|(k, _)| k == key) {
                    continue;
                }
                let denom = norm * dot(vector, vector).sqrt();
                let score = if denom > 0.0 {
                    dot(query, vector) / denom
                } else {
                    0.0
                };
                hits.push((*key, score));
            }
            hits.sort_by(|a, b| b.1.total_cmp(&a.1));
            hits.truncate(k);
        }
        Ok(hits)
    }

    /// The graph's approximate answer alone.
    pub(crate) fn graph_search(
        &self,
        query: &[f32],
        k: usize,
    ) -> Result<Vec<(u64, f32)>, IndexError> {
        if k == 0 || self.len() == 0 {
            return Ok(Vec::new());
        }
        let _slot = self.slots.acquire();
        let matches = self.inner.search(query, k).map_err(usearch_err)?;
        Ok(matches
            .keys
            .into_iter()
            .zip(matches.distances)
            .map(|(k, d)| (k, 1.0 - d))
            .collect())
    }

    /// Exact (brute-force) search.
    pub(crate) fn exact_search(
        &self,
        query: &[f32],
        k: usize,
    ) -> Result<Vec<(u64, f32)>, IndexError> {
        if k == 0 || self.len() == 0 {
            return Ok(Vec::new());
        }
        let _slot = self.slots.acquire();
        let matches = self.inner.exact_search(query, k).map_err(usearch_err)?;
        Ok(matches
            .keys
            .into_iter()
            .zip(matches.distances)
            .map(|(k, d)| (k, 1.0 - d))
            .collect())
    }

    /// The stored vector of `key`.
    pub(crate) fn get(&self, key: u64) -> Option<Vec<f32>> {
        let mut buf = vec![0f32; self.dims];
        let _slot = self.slots.acquire();
        match self.inner.get(key, &mut buf) {
            Ok(n) if n > 0 => Some(buf),
            _ => None,
        }
    }

    /// Writes a checkpoint to `path` crash-safely and returns its sha256 and size: usearch saves
    /// into a temporary file, which is fsynced, hashed and renamed over `path`, and the directory
    /// is fsynced.
    pub(crate) fn save_atomic(&self, path: &Path) -> Result<([u8; 32], u64), IndexError> {
        let tmp = fsutil::temp_path_for(path);
        let result = (|| {
            self.inner.save(path_str(&tmp)?).map_err(usearch_err)?;
            let file = File::open(&tmp).map_err(io_err(&tmp))?;
            file.sync_all().map_err(io_err(&tmp))?;
            drop(file);
            let (digest, bytes) = fsutil::sha256_file(&tmp).map_err(io_err(&tmp))?;
            fsutil::durable_rename(&tmp, path).map_err(io_err(path))?;
            Ok((digest, bytes))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(seed: u64, dims: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..dims)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn add_search_remove_and_checkpoint_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let index = VectorIndex::new(16).unwrap();
        let vectors: Vec<(u64, Vec<f32>)> = (1..=500).map(|k| (k, vector(k, 16))).collect();
        let items: Vec<(u64, &[f32])> = vectors.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        index.add_many(&items).unwrap();
        assert_eq!(index.len(), 500);
        let hits = index.search(&vectors[41].1, 3).unwrap();
        assert_eq!(hits[0].0, 42);
        assert!((hits[0].1 - 1.0).abs() < 1e-4);
        index.remove(42).unwrap();
        index.remove(9999).unwrap();
        assert!(!index.contains(42));
        assert_eq!(index.len(), 499);
        assert_ne!(index.search(&vectors[41].1, 1).unwrap()[0].0, 42);

        let path = dir.path().join("index.usearch");
        let (sha, bytes) = index.save_atomic(&path).unwrap();
        let loaded = VectorIndex::load_verified(&path, 16, &sha, bytes).unwrap();
        assert_eq!(loaded.len(), 499);
        assert_eq!(loaded.get(7).unwrap(), vectors[6].1);
        assert_eq!(loaded.search(&vectors[99].1, 1).unwrap()[0].0, 100);
        // New vectors can be added after a load.
        loaded.reserve(1).unwrap();
        loaded.add(10_000, &vector(10_000, 16)).unwrap();
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary file left behind"
        );
    }

    #[test]
    fn a_damaged_checkpoint_is_refused_before_usearch_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let index = VectorIndex::new(8).unwrap();
        index.reserve(1).unwrap();
        index.add(1, &vector(1, 8)).unwrap();
        let path = dir.path().join("i");
        let (sha, bytes) = index.save_atomic(&path).unwrap();
        let mut data = fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0x55;
        fs::write(&path, &data).unwrap();
        assert!(matches!(
            VectorIndex::load_verified(&path, 8, &sha, bytes),
            Err(IndexError::Mismatch(_))
        ));
        fs::write(&path, &data[..10]).unwrap();
        assert!(matches!(
            VectorIndex::load_verified(&path, 8, &sha, bytes),
            Err(IndexError::Mismatch(_))
        ));
    }
}
