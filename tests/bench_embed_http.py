#!/usr/bin/env python3
"""Embeddings through a node's /v1/embeddings on the peers' workload (the same sentences as
../shared/peers/ort/embed_ort.py: 8 batches of 32 pseudo-random ~40-token sentences, then 20
single sentences), in the peers' output format so tests/bench-peers can print them side by side.

Usage: bench_embed_http.py URL PEERS_DIR [REPS] [MODEL]   (MODEL: the node's embedding model,
all-minilm-l6-v2 by default)
"""
import base64
import json
import statistics
import sys
import time
import urllib.request

url, peers = sys.argv[1], sys.argv[2]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
model = sys.argv[4] if len(sys.argv) > 4 else "all-minilm-l6-v2"
sys.path.insert(0, f"{peers}/ort")
from embed_ort import sentences  # noqa: E402  (the peers' own generator: identical sentences)


def embed(texts):
    # base64, as the official openai client asks by default: floats as bytes, not JSON numbers.
    body = json.dumps({"model": model, "input": texts, "encoding_format": "base64"}).encode()
    req = urllib.request.Request(f"{url}/v1/embeddings", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.load(r)
    assert len(out["data"]) == len(texts), out
    return [base64.b64decode(d["embedding"]) for d in out["data"]]


def report(metric, samples):
    s = sorted(samples)
    med = statistics.median(s)
    print(f"peer=gaia-http metric={metric} value={med:.2f} min={s[0]:.2f} max={s[-1]:.2f} n={len(s)}")


corpus = sentences(32 * 8, 37, 42)
embed(corpus[:32])
rates, lat = [], []
for _ in range(reps):
    t = time.perf_counter()
    for i in range(0, len(corpus), 32):
        embed(corpus[i : i + 32])
    rates.append(len(corpus) / (time.perf_counter() - t))
for _ in range(reps):
    per = []
    for text in corpus[:20]:
        t = time.perf_counter()
        embed([text])
        per.append((time.perf_counter() - t) * 1000)
    lat.append(statistics.median(per))
report("embed_per_s_b32", rates)
report("single_latency_ms", lat)
