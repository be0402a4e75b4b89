//! Knowledge-base benchmark.
//!
//! 1. Ingest throughput of the store (toy embedder, so the numbers measure extraction, chunking,
//!    the fsynced log, the HNSW insertions and BM25, not a model).
//! 2. The vector index at scale: build time for N random 384-d vectors, search latency p50/p99
//!    and recall@10 against exact brute-force search.
//!
//! Run: `cargo run --release -p gaia-knowledge --features test-utils --example kb_bench --
//! [--docs 300] [--vectors 100000] [--queries 1000] [--recall-queries 300] [--data random|clustered]
//! [--dims 384] [--connectivity 16] [--expansion-add 128]`
//!
//! Ingest with the real all-MiniLM-L6-v2 is measured by the node's retrieval test
//! (`node/tests/it/kb.rs`, printed as `ingest with all-MiniLM-L6-v2`).

use std::sync::Arc;
use std::time::Instant;

use gaia_knowledge::bench::BenchIndex;
use gaia_knowledge::testing::ToyEmbedder;
use gaia_knowledge::{KbOptions, KnowledgeBase, SearchMode, SearchQuery, no_progress};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DIMS: usize = 384;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The `k` most similar unit vectors to `q` by exhaustive search: `(index, cosine)`.
fn brute_force(data: &[Vec<f32>], q: &[f32], k: usize) -> Vec<(u64, f32)> {
    let mut scored: Vec<(u64, f32)> = data
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, dot(v, q)))
        .collect();
    scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    scored.truncate(k);
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored
}

fn random_unit(rng: &mut StdRng, dims: usize) -> Vec<f32> {
    // Gaussian coordinates (Box-Muller) give directions uniform on the sphere.
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
            let u2: f32 = rng.r#gen();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn document(rng: &mut StdRng, i: usize) -> String {
    const WORDS: &[&str] = &[
        "node", "domain", "advert", "route", "honey", "tide", "magma", "glacier", "chess", "bread",
        "vector", "index", "snapshot", "gossip", "stream", "voucher", "receipt", "kernel", "token",
        "model", "prompt", "chunk", "search", "hash", "ledger", "orbit", "pollen", "crust",
    ];
    let mut s = format!("# Document {i}\n\n");
    for p in 0..6 {
        s.push_str(&format!("## Section {p}\n\n"));
        for w in 0..90 {
            s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
            s.push(if w % 12 == 11 { '.' } else { ' ' });
            if w % 12 == 11 {
                s.push(' ');
            }
        }
        s.push_str("\n\n");
    }
    s
}

fn ingest_figures(docs: usize, rng: &mut StdRng) -> Result<(), Box<dyn std::error::Error>> {
    // 1. Ingest throughput.
    let dir = tempfile::tempdir()?;
    let mut kb = KnowledgeBase::open(
        dir.path(),
        Arc::new(ToyEmbedder::new()),
        KbOptions::default(),
    )?;
    let texts: Vec<String> = (0..docs).map(|i| document(rng, i)).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    let start = Instant::now();
    let mut chunks = 0;
    for (i, text) in texts.iter().enumerate() {
        chunks += kb
            .ingest_bytes(
                text.as_bytes(),
                &format!("doc-{i}.md"),
                None,
                &mut no_progress,
            )?
            .chunks;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ingest (toy embedder, fsync per document): {docs} documents, {chunks} chunks, {:.1} MiB in {secs:.2} s = {:.0} chunks/s, {:.0} documents/s",
        bytes as f64 / (1 << 20) as f64,
        chunks as f64 / secs,
        docs as f64 / secs
    );
    let start = Instant::now();
    kb.checkpoint()?;
    println!(
        "checkpoint of {chunks} vectors: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let mut lat = Vec::new();
    for i in 0..200 {
        let q = format!(
            "{} vector search snapshot",
            ["honey", "tide", "magma", "chess"][i % 4]
        );
        let t = Instant::now();
        kb.search(&SearchQuery::new(&q).mode(SearchMode::Hybrid).top_k(5))?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "hybrid search over {chunks} chunks (toy query embedding included): p50 {:.3} ms, p99 {:.3} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    drop(kb);
    let start = Instant::now();
    let kb = KnowledgeBase::open(
        dir.path(),
        Arc::new(ToyEmbedder::new()),
        KbOptions::default(),
    )?;
    println!(
        "reopen (checkpoint loaded, log scanned): {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    drop(kb);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let docs = arg("--docs", 300);
    let n = arg("--vectors", 100_000);
    let queries = arg("--queries", 1000);
    let recall_queries = arg("--recall-queries", 300);
    let mut rng = StdRng::seed_from_u64(42);
    println!(
        "cores: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    if docs > 0 {
        ingest_figures(docs, &mut rng)?;
    }

    // 2. The index at scale.
    let dims = arg("--dims", DIMS);
    let connectivity = arg("--connectivity", 16);
    let expansion_add = arg("--expansion-add", 128);
    let data_kind = std::env::args()
        .skip_while(|a| a != "--data")
        .nth(1)
        .unwrap_or_else(|| "random".to_string());
    let clustered = data_kind == "clustered";
    let centers: Vec<Vec<f32>> = (0..1000).map(|_| random_unit(&mut rng, dims)).collect();
    let sample = |rng: &mut StdRng| -> Vec<f32> {
        if !clustered {
            return random_unit(rng, dims);
        }
        // A point near one of 1000 centres: closer to the structure of real embeddings.
        let c = &centers[rng.gen_range(0..centers.len())];
        let noise = random_unit(rng, dims);
        let mut v: Vec<f32> = c.iter().zip(&noise).map(|(a, b)| a + 0.7 * b).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    };
    println!("generating {n} {data_kind} {dims}-d unit vectors");
    let data: Vec<Vec<f32>> = (0..n).map(|_| sample(&mut rng)).collect();
    let mut index = BenchIndex::with_params(dims, connectivity, expansion_add)?;
    // Graph searches at every size, to measure the graph (the knowledge base searches exactly
    // up to gaia_knowledge::DEFAULT_EXACT_SEARCH_MAX vectors).
    index.set_exact_search_max(0);
    println!(
        "usearch distance kernels: {}; connectivity {connectivity}, expansion_add {expansion_add}",
        index.hardware_acceleration()
    );
    let items: Vec<(u64, &[f32])> = data
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v.as_slice()))
        .collect();
    let start = Instant::now();
    index.add_many(&items)?;
    let build = start.elapsed().as_secs_f64();
    println!(
        "HNSW build: {n} vectors in {build:.2} s ({:.0} vectors/s, {} threads)",
        n as f64 / build,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // Vectors the graph does not lead to: each stored vector searched for itself.
    let keys: Vec<u64> = (0..n as u64).collect();
    let start = Instant::now();
    let orphans = index.sweep(&keys)?;
    println!(
        "self-search sweep (every stored vector searched for itself, {} threads): {:.2} s; {orphans} orphans ({:.4}%), now searched exactly beside the graph",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        start.elapsed().as_secs_f64(),
        orphans as f64 * 100.0 / n as f64
    );

    let qs: Vec<Vec<f32>> = (0..queries).map(|_| sample(&mut rng)).collect();
    let mut lat = Vec::new();
    for q in qs.iter().take(200) {
        let t = Instant::now();
        index.exact_search(q, 10)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "exact top-10 search over {n} vectors (one thread): p50 {:.3} ms, p99 {:.3} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    // Ground truth by our own brute force (dot products of unit vectors), checked against
    // usearch's exact search so that a recall figure never rests on one implementation.
    let start = Instant::now();
    let truths: Vec<Vec<(u64, f32)>> = qs
        .iter()
        .take(recall_queries)
        .map(|q| brute_force(&data, q, 10))
        .collect();
    let mut agree = 0usize;
    for (q, truth) in qs.iter().zip(&truths) {
        let exact = index.exact_search(q, 10)?;
        agree += exact
            .iter()
            .filter(|(k, _)| truth.iter().any(|(t, _)| t == k))
            .count();
    }
    let tenth: f64 = truths.iter().map(|t| f64::from(t[9].1)).sum::<f64>() / truths.len() as f64;
    let first: f64 = truths.iter().map(|t| f64::from(t[0].1)).sum::<f64>() / truths.len() as f64;
    let mut pair = 0f64;
    for i in 0..1000.min(n) {
        pair += f64::from(dot(&data[i], &qs[i % qs.len()]));
    }
    println!(
        "brute force for {} queries: {:.1} s; usearch exact_search agrees on {:.4} of the top-10; \
         mean cosine of the 1st / 10th true neighbour {first:.3} / {tenth:.3}, of a random pair {:.3}",
        truths.len(),
        start.elapsed().as_secs_f64(),
        agree as f64 / (truths.len() * 10) as f64,
        pair / 1000.min(n) as f64
    );
    for ef in [96, 256, 1024, 4096] {
        index.set_expansion_search(ef);
        let mut lat = Vec::with_capacity(queries);
        let mut found = 0usize;
        for (i, q) in qs.iter().enumerate() {
            let t = Instant::now();
            let hits = index.search(q, 10)?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            if let Some(truth) = truths.get(i) {
                found += hits
                    .iter()
                    .filter(|(k, _)| truth.iter().any(|(t, _)| t == k))
                    .count();
            }
        }
        lat.sort_by(f64::total_cmp);
        println!(
            "expansion_search {ef}{}: top-10 search p50 {:.3} ms, p99 {:.3} ms ({queries} queries, one thread); recall@10 vs brute force {:.4} ({recall_queries} queries)",
            if ef == 96 {
                " (the knowledge base's setting)"
            } else {
                ""
            },
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            found as f64 / (truths.len() * 10) as f64
        );
    }
    Ok(())
}
