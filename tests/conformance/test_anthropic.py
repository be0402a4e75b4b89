#!/usr/bin/env python3
"""Anthropic Messages API conformance of a running Gaia node, checked with the official
`anthropic` package.

Environment:
  ANTHROPIC_BASE_URL  the node, e.g. http://127.0.0.1:8080 (required; the client adds /v1/messages)
  ANTHROPIC_API_KEY   a key, if the node requires one (any string otherwise)
  GAIA_CHAT_MODEL     the chat model's id   [smollm2-135m-instruct]

Run by node/tests/it/conformance.rs (through `cargo test`), or by hand against any node:
  ANTHROPIC_BASE_URL=http://127.0.0.1:8080 target/test-venv/bin/python tests/conformance/test_anthropic.py

Every check runs even when an earlier one fails (checks.py); the exit status is 1 if any failed.
"""

import json
import os
import sys

import anthropic
from checks import check, expect, run

CHAT = os.environ.get("GAIA_CHAT_MODEL", "smollm2-135m-instruct")

if not os.environ.get("ANTHROPIC_BASE_URL"):
    sys.exit("ANTHROPIC_BASE_URL is not set: point it at a node, e.g. http://127.0.0.1:8080")

client = anthropic.Anthropic(
    api_key=os.environ.get("ANTHROPIC_API_KEY") or "not-needed",
    max_retries=0,
    timeout=300,
)

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city name"}},
        "required": ["city"],
    },
}


# Today's Messages API has no sampling fields; a local server takes them as extensions (older
# API versions had them), which the client sends with `extra_body`.
GREEDY = {"temperature": 0}


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


@check
def message_with_a_system_prompt():
    m = client.messages.create(
        model=CHAT,
        max_tokens=24,
        extra_body=GREEDY,
        system="You are a terse assistant. Answer in one short sentence.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    expect(m.type == "message" and m.role == "assistant", f"not a message: {m}")
    expect(m.id.startswith("msg_"), f"id {m.id}")
    expect(m.model == CHAT, f"model {m.model}")
    expect(m.stop_reason in ("end_turn", "max_tokens"), f"stop_reason {m.stop_reason}")
    expect(text_of(m).strip(), f"no text: {m.content}")
    expect(m.usage.input_tokens > 10 and 0 < m.usage.output_tokens <= 24, f"usage {m.usage}")
    # System blocks are the same system prompt.
    blocks = client.messages.create(
        model=CHAT,
        max_tokens=24,
        extra_body=GREEDY,
        system=[
            {"type": "text", "text": "You are a terse assistant."},
            {"type": "text", "text": "Answer in one short sentence."},
        ],
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    expect(blocks.usage.input_tokens > 10, f"usage {blocks.usage}")
    # A budget that runs out is max_tokens.
    short = client.messages.create(
        model=CHAT,
        max_tokens=3,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
    )
    expect(short.stop_reason == "max_tokens", f"stop_reason {short.stop_reason}")
    expect(short.usage.output_tokens == 3, f"usage {short.usage}")


@check
def streaming_events():
    seen = []
    with client.messages.stream(
        model=CHAT,
        max_tokens=32,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Count from one to five."}],
    ) as stream:
        for event in stream:
            seen.append(event.type)
        final = stream.get_final_message()
    raw = [e for e in seen if e in (
        "message_start", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop")]
    expect(raw[0] == "message_start", f"first event {raw[:3]}")
    expect(raw[-2:] == ["message_delta", "message_stop"], f"last events {raw[-3:]}")
    expect("content_block_delta" in raw, f"no deltas: {raw}")
    expect(raw.count("content_block_start") == raw.count("content_block_stop"), f"{raw}")
    expect(final.stop_reason in ("end_turn", "max_tokens"), f"stop_reason {final.stop_reason}")
    expect(text_of(final).strip(), f"no text: {final}")
    expect(final.usage.output_tokens > 0, f"usage {final.usage}")
    # The same answer without streaming (greedy).
    whole = client.messages.create(
        model=CHAT,
        max_tokens=32,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Count from one to five."}],
    )
    expect(text_of(whole) == text_of(final), f"{text_of(whole)!r} != {text_of(final)!r}")


@check
def tool_use_round_trip():
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = client.messages.create(
        model=CHAT,
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=question,
    )
    expect(m.stop_reason == "tool_use", f"stop_reason {m.stop_reason}: {m.content}")
    uses = [b for b in m.content if b.type == "tool_use"]
    expect(len(uses) == 1, f"tool_use blocks: {m.content}")
    use = uses[0]
    expect(use.name == "get_weather", f"name {use.name}")
    expect(isinstance(use.input, dict) and isinstance(use.input.get("city"), str),
           f"input {use.input}")
    expect(set(use.input) <= {"city"}, f"undeclared properties: {use.input}")
    answer = client.messages.create(
        model=CHAT,
        max_tokens=40,
        extra_body=GREEDY,
        tools=[WEATHER],
        messages=question + [
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 18 C"}]},
        ],
    )
    expect(answer.type == "message" and answer.stop_reason in ("end_turn", "max_tokens"),
           f"{answer}")
    expect(text_of(answer).strip(), f"no text after the tool result: {answer.content}")
    # Any tool, streamed: the input arrives as input_json_delta and the SDK parses it.
    with client.messages.stream(
        model=CHAT,
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=question,
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    expect("input_json" in kinds or "content_block_delta" in kinds, f"events {kinds}")
    uses = [b for b in final.content if b.type == "tool_use"]
    expect(final.stop_reason == "tool_use" and len(uses) == 1, f"{final}")
    expect(isinstance(uses[0].input.get("city"), str), f"input {uses[0].input}")


@check
def structured_output():
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    m = client.messages.create(
        model=CHAT,
        max_tokens=60,
        output_config={"format": {"type": "json_schema", "schema": schema}},
        messages=[{"role": "user", "content": "Give the largest city of Japan as JSON."}],
    )
    value = json.loads(text_of(m))
    expect(set(value) == {"city", "population"}, f"{value}")
    expect(isinstance(value["population"], int), f"{value}")


@check
def bad_input_is_a_400_with_anthropics_error_body():
    try:
        client.messages.create(model=CHAT, max_tokens=10, messages=[])
        raise AssertionError("empty messages were accepted")
    except anthropic.BadRequestError as e:
        expect(e.status_code == 400, f"status {e.status_code}")
        expect(e.body["type"] == "error", f"body {e.body}")
        expect(e.body["error"]["type"] == "invalid_request_error", f"body {e.body}")
        expect("messages" in e.body["error"]["message"], f"body {e.body}")
    try:
        client.messages.create(
            model=CHAT, max_tokens=10,
            messages=[{"role": "user", "content": "hi"}], extra_body={"temperature": "hot"})
        raise AssertionError("a string temperature was accepted")
    except anthropic.BadRequestError as e:
        expect("temperature" in e.body["error"]["message"], f"body {e.body}")
    try:
        client.messages.create(
            model="claude-nonexistent", max_tokens=10,
            messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("an unknown model was accepted")
    except anthropic.NotFoundError as e:
        expect(e.body["error"]["type"] == "not_found_error", f"body {e.body}")


if __name__ == "__main__":
    sys.exit(run(f"conformance against {client.base_url} (anthropic {anthropic.__version__}), model {CHAT}"))
