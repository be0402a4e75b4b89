#!/usr/bin/env python3
"""Time to first token of each turn of a five-turn chat through a node's streaming
/v1/chat/completions: every user turn is about 300 tokens of text, every answer 32 greedy tokens,
so the fifth turn's prompt carries about 1,500 tokens of history. Run it against a node with its
prefix cache and one with `--set server.prefix_cache_mb=0` to see what the cache saves.

With CHATS=N in the environment, N such chats run at once (each its own text; FIRST_CHAT=K picks
other texts than another run's, which the nodes' prefix caches may still hold), and the figures are
the mean over the chats of each turn: against a domain's gateway this shows what the router's
prefix affinity saves (tests/bench-affinity).

Usage: bench_prefix_http.py URL [MODEL] [TAG]   prints peer=TAG metric=ttft_turnN_ms lines
"""
import json
import os
import sys
import threading
import time
import urllib.request

url = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "default"
tag = sys.argv[3] if len(sys.argv) > 3 else "gaia"
WORDS = ("river mountain signal network garden ledger harvest lantern orbit canvas meadow "
         "engine thunder velvet compass quarry summit ribbon falcon harbor").split()


def paragraph(turn, chat=0, n=230):
    # Distinct text per turn and chat (a fixed LCG), about 1.3 tokens per word.
    s, out = 1234 + turn + 7919 * chat, []
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
    with urllib.request.urlopen(req, timeout=600) as r:
        node = r.headers.get("x-gaia-node", "")
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
    return (first - t0) * 1000 if first else float("nan"), text, usage, node


TURNS = 5
chats = int(os.environ.get("CHATS", "1"))
first_chat = int(os.environ.get("FIRST_CHAT", "0"))  # another run's chats share no text
results = [[None] * TURNS for _ in range(chats)]


def chat(c):
    messages = []
    for n in range(TURNS):
        messages.append({"role": "user", "content": paragraph(n + 1, first_chat + c)})
        ttft, text, usage, node = turn(messages)
        messages.append({"role": "assistant", "content": text})
        prompt = usage["prompt_tokens"] if usage else -1
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) if usage else -1
        results[c][n] = (ttft, prompt, cached, node)


threads = [threading.Thread(target=chat, args=(c,)) for c in range(chats)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for n in range(TURNS):
    done = [r[n] for r in results if r[n] is not None]
    if not done:
        sys.exit(f"turn {n + 1} did not complete")
    mean = lambda i: sum(d[i] for d in done) / len(done)
    same = sum(1 for r in results if n > 0 and r[n] and r[n - 1] and r[n][3] == r[n - 1][3])
    extra = f" same_node_as_last_turn={same}/{len(done)}" if chats > 1 and n > 0 else ""
    print(f"peer={tag} metric=ttft_turn{n + 1}_ms value={mean(0):.1f} "
          f"prompt_tokens={mean(1):.0f} cached_tokens={mean(2):.0f}{extra}")
