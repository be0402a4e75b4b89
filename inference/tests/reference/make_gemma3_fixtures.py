#!/usr/bin/env python3
"""Independent reference fixture for gaia-inference's gemma3 architecture (Gemma 3 270M, Q4_K_M GGUF).

Nothing here uses gaia code. The pieces are:

* weights: read with llama.cpp's own Python package `gguf` (GGUFReader) and dequantized with
  `gguf.quants.dequantize` (this file mixes Q8_0, Q5_0, Q4_K and Q6_K);
* forward pass: plain numpy in float64, written from the Gemma 3 model definition (see `Gemma3`);
* prompts: lists of vocabulary pieces, each looked up in the GGUF's `tokenizer.ggml.tokens`, so the
  ids need no tokenizer at all.

Writes gemma3_greedy.json (into --out, default ../fixtures next to this script): for every prompt
the greedy ids (EOS ignored), the top 2 of every step with their gap, and the top 5 of the first
step; the model file's sha256.

Usage:
  /work/venv-ref/bin/python make_gemma3_fixtures.py [--model PATH.gguf] [--out DIR] [--steps N]
"""

import argparse
import hashlib
import json
import os
import sys
import time
from importlib import metadata as importlib_metadata

import numpy as np
import gguf
from gguf import quants

MODEL_DIR = "gemma-3-270m"  # the name in gaia's model store
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
STEPS = 8
TOP = 5

# name -> pieces of the vocabulary ("▁" is SentencePiece's space). Short prompts keep the float64
# pass at seconds per prompt; the 270M's sliding window (512) is not reached.
PROMPTS = [
    ("france", ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]),
    ("chat_turn", ["<bos>", "<start_of_turn>", "user", "\n", "What", "▁is", "▁the", "▁capital", "▁of",
                   "▁Italy", "?", "<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]),
    ("story", ["<bos>", "Once", "▁upon", "▁a", "▁time", ",", "▁there", "▁was", "▁a", "▁little", "▁girl",
               "▁who", "▁lived", "▁in", "▁a", "▁small", "▁village", "▁near", "▁the", "▁forest", ".",
               "▁Every", "▁morning", ",", "▁she", "▁walked", "▁to", "▁the", "▁river", "▁with", "▁her",
               "▁dog", ",", "▁and", "▁every", "▁evening", "▁she"]),
]


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


def default_model_path():
    store = os.environ.get("GAIA_MODELS_DIR")
    if store:
        p = os.path.join(store, MODEL_DIR, MODEL_FILE)
        if os.path.exists(p):
            return p
    return os.path.join("/work/models", MODEL_DIR, MODEL_FILE)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"# wrote {path} ({os.path.getsize(path)} bytes)")


class Gemma3:
    """The Gemma 3 decoder, one token at a time with a KV cache, in float64.

    Per layer: RMSNorm -> q, k, v -> RMSNorm of every q and k head (QK-norm) -> RoPE in NEOX mode
    (halves rotated) -> causal attention scaled by 1/sqrt(head_dim), GQA (query head h reads KV
    head h / (heads / kv_heads)); every 6th layer (5, 11, 17) is global with rope base
    `gemma3.rope.freq_base`, the others attend only to the last `sliding_window` positions with
    base 10000 -> output projection -> RMSNorm (post-attention) -> residual; then RMSNorm ->
    GeGLU (tanh GELU of the gate times up) -> down -> RMSNorm (post-FFN) -> residual. Embeddings
    are scaled by sqrt(embedding_length); the output head is the tied `token_embd`. The GGUF's
    norm weights already hold Gemma's (1 + w) (convert_hf_to_gguf adds the 1), so they multiply
    as they are.
    """

    LAYER_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm",
                     "attn_output", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down", "post_ffw_norm"]

    def __init__(self, path):
        r = gguf.GGUFReader(path)
        field = lambda k: r.fields[k].contents()
        if field("general.architecture") != "gemma3":
            raise SystemExit(f"{path} is not a gemma3 GGUF")
        self.tokens = field("tokenizer.ggml.tokens")
        self.eos = int(field("tokenizer.ggml.eos_token_id"))
        self.n_layers = field("gemma3.block_count")
        self.dim = field("gemma3.embedding_length")
        self.heads = field("gemma3.attention.head_count")
        self.kv_heads = field("gemma3.attention.head_count_kv")
        self.head_dim = field("gemma3.attention.key_length")
        self.eps = field("gemma3.attention.layer_norm_rms_epsilon")
        self.global_base = field("gemma3.rope.freq_base")
        self.window = field("gemma3.attention.sliding_window")
        self.hparams = {k: v for k, v in [
            ("block_count", self.n_layers), ("embedding_length", self.dim), ("head_count", self.heads),
            ("head_count_kv", self.kv_heads), ("key_length", self.head_dim), ("rms_eps", self.eps),
            ("rope_freq_base_global", self.global_base), ("rope_freq_base_local", 10000.0),
            ("sliding_window", self.window), ("vocab_size", len(self.tokens))]}
        self.types = {}
        tensors = {t.name: t for t in r.tensors}

        def weight(name):
            t = tensors[name]
            self.types[name] = t.tensor_type.name
            a = quants.dequantize(t.data, t.tensor_type)
            return np.asarray(a, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])

        self.embedding = weight("token_embd.weight")  # [vocab, dim]
        self.layers = [{n: weight(f"blk.{i}.{n}.weight") for n in self.LAYER_TENSORS}
                       for i in range(self.n_layers)]
        self.output_norm = weight("output_norm.weight")
        self.reset()

    def reset(self):
        self.keys = [[] for _ in range(self.n_layers)]
        self.values = [[] for _ in range(self.n_layers)]

    def is_global(self, layer):
        return layer % 6 == 5

    def rms(self, x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * g

    def rope(self, x, pos, base):
        half = self.head_dim // 2
        inv = base ** (-np.arange(half) * 2.0 / self.head_dim)
        c, s = np.cos(pos * inv), np.sin(pos * inv)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, a * s + b * c], -1)

    @staticmethod
    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    def step(self, token, pos):
        """The logits after `token` at position `pos` (the cache holds positions 0..pos-1)."""
        hd = self.head_dim
        group = self.heads // self.kv_heads
        x = self.embedding[token] * np.sqrt(self.dim)
        for i, p in enumerate(self.layers):
            h = self.rms(x, p["attn_norm"])
            q = (p["attn_q"] @ h).reshape(self.heads, hd)
            k = (p["attn_k"] @ h).reshape(self.kv_heads, hd)
            v = (p["attn_v"] @ h).reshape(self.kv_heads, hd)
            q = self.rms(q, p["attn_q_norm"])
            k = self.rms(k, p["attn_k_norm"])
            base = self.global_base if self.is_global(i) else 10000.0
            q, k = self.rope(q, pos, base), self.rope(k, pos, base)
            self.keys[i].append(k)
            self.values[i].append(v)
            first = 0 if self.is_global(i) else max(0, pos + 1 - self.window)
            ks, vs = np.stack(self.keys[i][first:]), np.stack(self.values[i][first:])
            att = np.zeros((self.heads, hd))
            for head in range(self.heads):
                kv = head // group
                scores = ks[:, kv] @ q[head] / np.sqrt(hd)
                e = np.exp(scores - scores.max())
                att[head] = (e / e.sum()) @ vs[:, kv]
            x = x + self.rms(p["attn_output"] @ att.reshape(-1), p["post_attention_norm"])
            h = self.rms(x, p["ffn_norm"])
            a = self.gelu(p["ffn_gate"] @ h) * (p["ffn_up"] @ h)
            x = x + self.rms(p["ffn_down"] @ a, p["post_ffw_norm"])
        return self.embedding @ self.rms(x, self.output_norm)


def top(logits, n):
    ids = np.argsort(-logits, kind="stable")[:n]
    return [int(i) for i in ids], [round(float(logits[i]), 4) for i in ids]


def run_prompt(model, name, pieces, steps):
    index = {t: i for i, t in enumerate(model.tokens)}
    missing = [p for p in pieces if p not in index]
    if missing:
        raise SystemExit(f"{name}: pieces not in the vocabulary: {missing}")
    prompt = [index[p] for p in pieces]
    model.reset()
    t0 = time.time()
    for pos, t in enumerate(prompt):
        logits = model.step(t, pos)
    first_ids, first_logits = top(logits, TOP)
    greedy, top2 = [], []
    for s in range(steps):
        ids, vals = top(logits, 2)
        top2.append({"ids": ids, "logits": vals, "gap": round(vals[0] - vals[1], 4)})
        greedy.append(ids[0])
        if s + 1 < steps:
            logits = model.step(ids[0], len(prompt) + s)
    print(f"# {name}: {len(prompt)} prompt tokens, {steps} steps in {time.time() - t0:.1f}s: "
          f"{''.join(model.tokens[i] for i in greedy)!r}")
    return {
        "name": name,
        "prompt_pieces": pieces,
        "prompt_ids": prompt,
        "greedy_ids": greedy,
        "greedy_pieces": [model.tokens[i] for i in greedy],
        "top2": top2,
        "min_gap": min(t["gap"] for t in top2),
        "first_step_top5": {"ids": first_ids, "logits": first_logits},
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "fixtures")))
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"model not found at {args.model}: pass --model or set GAIA_MODELS_DIR "
                 f"(gaia models pull {MODEL_DIR})")
    sha = sha256_file(args.model)
    print(f"# model {args.model} sha256 {sha}")
    t0 = time.time()
    model = Gemma3(args.model)
    print(f"# dequantized in {time.time() - t0:.1f}s")
    prompts = [run_prompt(model, name, pieces, args.steps) for name, pieces in PROMPTS]
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "gemma3_greedy.json"), {
        "generated_by": {
            "script": "inference/tests/reference/make_gemma3_fixtures.py",
            "versions": versions("numpy", "gguf"),
            "model_file": os.path.basename(args.model),
            "model_sha256": sha,
        },
        "notes": [
            "greedy_ids: argmax at every step, EOS ignored, from a float64 numpy forward pass over "
            "weights dequantized by gguf-py (activations are not quantized).",
            "top2: the two best ids of every greedy step with their logits (4 decimals) and gap; a "
            "gap below an engine's logit error is a near tie it may resolve the other way.",
            "first_step_top5: the five best ids and logits after the prompt.",
            "prompt_ids: the prompt_pieces looked up in tokenizer.ggml.tokens (no tokenizer ran).",
        ],
        "model": dict(model.hparams, eos_token_id=model.eos,
                      tensor_types=sorted(set(model.types.values()))),
        "prompts": prompts,
    })


if __name__ == "__main__":
    main()
