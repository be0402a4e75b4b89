//! The BERT embedder against the sentence-transformers reference.

use gaia_inference::embed::{EmbedPrecision, Embedder, EmbedderOptions, cosine};

use crate::common::{cpu, embed_model_dir, embedder, fixture};

/// How close an encoder must come to the sentence-transformers reference.
#[derive(Clone, Copy)]
struct Tolerance {
    /// Least cosine between an embedding and the reference's.
    cosine: f32,
    /// Largest error of a pair's similarity.
    pair: f32,
}

/// The f32 encoders (Burn on any backend): the reference's arithmetic, up to summation order.
const F32: Tolerance = Tolerance {
    cosine: 0.999,
    pair: 2e-3,
};

/// The default CPU encoder: Q8_0 weights and 8-bit activations, as llama.cpp runs a Q8_0
/// embedding model. Measured: cosine at least 0.9981 (the empty sentence, two tokens), pair
/// errors at most 0.0035; rankings of clearly different similarities do not change.
const Q8: Tolerance = Tolerance {
    cosine: 0.997,
    pair: 6e-3,
};

#[test]
fn embeddings_match_the_reference() {
    check_reference_embeddings(embedder(), usize::MAX, Q8);
}

/// The f32 encoder on the CPU, for users who want the reference's arithmetic.
fn f32_embedder() -> Embedder {
    let options = EmbedderOptions {
        precision: EmbedPrecision::F32,
        ..EmbedderOptions::default()
    };
    Embedder::load_with(&embed_model_dir(), &cpu(), options).expect("embedder loads")
}

#[test]
fn f32_embeddings_match_the_reference() {
    let embedder = f32_embedder();
    check_reference_embeddings(&embedder, usize::MAX, F32);
    check_cosine_pairs(&embedder, F32);
}

/// The same reference check on wgpu (in CI: Mesa's lavapipe software Vulkan driver, where every
/// new tensor shape compiles and tunes kernels on the CPU, so only a few sentences, one batch).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_embeddings_match_the_reference() {
    let (_gpu, device) = crate::common::wgpu();
    let embedder =
        Embedder::load(&crate::common::embed_model_dir(), &device).expect("embedder loads");
    check_reference_embeddings(&embedder, 3, F32);
}

/// The same reference check on CUDA, where an NVIDIA GPU is present; CI has none, so there the
/// test only checks that the backend reports its absence as an error (not a panic).
#[cfg(feature = "cuda")]
#[test]
fn cuda_embeddings_match_the_reference_when_a_gpu_is_present() {
    let _gpu = crate::common::gpu_lock();
    match gaia_inference::device::DeviceChoice::Cuda.resolve() {
        Ok(device) => {
            let embedder =
                Embedder::load(&crate::common::embed_model_dir(), &device).expect("embedder loads");
            check_reference_embeddings(&embedder, usize::MAX, F32);
        }
        Err(e) => eprintln!("no cuda device here ({e}); the cuda check needs a gpu machine"),
    }
}

/// Checks the first `limit` reference sentences (all of them when `limit` covers the fixture:
/// then each is also embedded on its own, besides the batch).
fn check_reference_embeddings(embedder: &Embedder, limit: usize, tol: Tolerance) {
    let fx = fixture("embeddings.json");
    let sentences = fx["sentences"].as_array().expect("sentences");
    assert!(
        sentences.len() >= 20,
        "the fixture should hold 20+ sentences"
    );
    let sentences = &sentences[..limit.min(sentences.len())];
    let singles = sentences.len() >= 20;
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().expect("text"))
        .collect();
    assert_eq!(embedder.dim(), fx["dim"].as_u64().expect("dim") as usize);
    assert_eq!(
        embedder.max_seq_len(),
        fx["max_seq_length"].as_u64().expect("max") as usize
    );
    // All at once (mixed lengths, padded batches) and one by one must both match.
    let batched = embedder.embed(&texts).expect("embed");
    for (i, s) in sentences.iter().enumerate() {
        let want: Vec<f32> = s["vector"]
            .as_array()
            .expect("vector")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        let c_batch = cosine(&batched[i], &want);
        assert!(
            c_batch >= tol.cosine,
            "sentence {i} {:?}: cosine {c_batch} (batched)",
            texts[i]
        );
        if singles {
            let single = embedder.embed(&[texts[i]]).expect("embed one");
            let c_single = cosine(&single[0], &want);
            assert!(
                c_single >= tol.cosine,
                "sentence {i} {:?}: cosine {c_single} (single)",
                texts[i]
            );
        }
        let norm: f32 = batched[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "embeddings are L2-normalised, got {norm}"
        );
        if let Some(n) = s["n_tokens"].as_u64() {
            let counted = embedder.count_tokens(texts[i]).expect("count");
            let untruncated = s["n_tokens_untruncated"].as_u64().unwrap_or(n) as usize;
            assert_eq!(counted, untruncated, "token count of sentence {i}");
        }
    }
}

#[test]
fn cosine_pairs_match_the_reference() {
    check_cosine_pairs(embedder(), Q8);
}

fn check_cosine_pairs(embedder: &Embedder, tol: Tolerance) {
    let fx = fixture("embeddings.json");
    let sentences = fx["sentences"].as_array().expect("sentences");
    let text = |i: u64| sentences[i as usize]["text"].as_str().expect("text");
    for pair in fx["cosine_pairs"].as_array().expect("pairs") {
        let (a, b) = (
            pair["a"].as_u64().expect("a"),
            pair["b"].as_u64().expect("b"),
        );
        let want = pair["cosine"].as_f64().expect("cosine") as f32;
        let v = embedder.embed(&[text(a), text(b)]).expect("embed");
        let got = cosine(&v[0], &v[1]);
        assert!(
            (got - want).abs() < tol.pair,
            "cos({:?}, {:?}) = {got}, reference {want}",
            text(a),
            text(b)
        );
    }
    let v = embedder
        .embed(&["A man is eating food.", "A man is eating a piece of bread."])
        .expect("embed");
    let c = cosine(&v[0], &v[1]);
    assert!((c - 0.755).abs() < tol.pair, "{c}");
}

#[test]
fn long_input_is_truncated_at_256_tokens_not_128() {
    let embedder = embedder();
    let long = "word ".repeat(400);
    let n = embedder.count_tokens(&long).expect("count");
    assert!(n > 256);
    let v = embedder.embed(&[long.as_str()]).expect("embed long");
    assert_eq!(v[0].len(), embedder.dim());
    // Truncation at 256: changing token 300 does not change the embedding, token 200 does.
    let mut words: Vec<&str> = long.split_whitespace().collect();
    words[290] = "elephant";
    let after = words.join(" ");
    words[290] = "word";
    words[150] = "elephant";
    let before = words.join(" ");
    let e = embedder
        .embed(&[long.as_str(), after.as_str(), before.as_str()])
        .expect("embed");
    assert!(cosine(&e[0], &e[1]) > 0.99999);
    assert!(cosine(&e[0], &e[2]) < 0.9999);
    assert!(embedder.embed::<&str>(&[]).expect("empty").is_empty());
}
