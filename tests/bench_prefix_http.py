#!/usr/bin/env python3
"""Time to first token of each turn of a five-turn chat through a node's streaming
/v1/chat/completions: every user turn is about 300 tokens of text, every answer 32 greedy tokens,
so the fifth turn's prompt carries about 1,500 tokens of history. Run it against a node with its
prefix cache and one with `--set server.prefix_cache_mb=0` to see what the cache saves.

Usage: bench_prefix_http.py URL [MODEL] [TAG]   prints peer=TAG metric=ttft_turnN_ms lines
"""
import json
import sys
import time
import urllib.request

url = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "default"
tag = sys.argv[3] if len(sys.argv) > 3 else "gaia"
WORDS = ("river mountain signal network garden ledger harvest lantern orbit canvas meadow "
         "engine thunder velvet compass quarry summit ribbon falcon harbor").split()


def paragraph(turn, n=230):
    # Distinct text per turn (a fixed LCG), about 1.3 tokens per word.
    s, out = 1234 + turn, []
    for _ in range(n):
        s = (s * 1103515245 + 12345) % (1 << 31)
        out.append(WORDS[s % len(WORDS)])
    return f"Note {turn}: " + " ".join(out) + ". Summarise the note in one sentence."


def turn(messages):
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 32, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    t0, first, text, usage = time.perf_counter(), None, "", None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    text += piece
    return (first - t0) * 1000 if first else float("nan"), text, usage


messages = []
for n in range(1, 6):
    messages.append({"role": "user", "content": paragraph(n)})
    ttft, text, usage = turn(messages)
    messages.append({"role": "assistant", "content": text})
    prompt = usage["prompt_tokens"] if usage else -1
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) if usage else -1
    print(f"peer={tag} metric=ttft_turn{n}_ms value={ttft:.1f} prompt_tokens={prompt} "
          f"cached_tokens={cached}")
