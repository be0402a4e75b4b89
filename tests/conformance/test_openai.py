#!/usr/bin/env python3
"""OpenAI API conformance of a running Gaia node, checked with the official `openai` package.

Environment:
  OPENAI_BASE_URL   the node's API, e.g. http://127.0.0.1:8080/v1 (required)
  OPENAI_API_KEY    a key, if the node requires one (any string otherwise)
  GAIA_CHAT_MODEL   the chat model's id        [smollm2-135m-instruct]
  GAIA_EMBED_MODEL  the embedding model's id   [all-minilm-l6-v2]

Run by node/tests/it/conformance.rs (through `cargo test`), or by hand against any node:
  OPENAI_BASE_URL=http://127.0.0.1:8080/v1 target/test-venv/bin/python tests/conformance/test_openai.py

Every check runs even when an earlier one fails (checks.py); the exit status is 1 if any failed.
"""

import json
import math
import os
import sys

import jsonschema
import openai
from checks import check, expect, run

CHAT = os.environ.get("GAIA_CHAT_MODEL", "smollm2-135m-instruct")
EMBED = os.environ.get("GAIA_EMBED_MODEL", "all-minilm-l6-v2")

if not os.environ.get("OPENAI_BASE_URL"):
    sys.exit("OPENAI_BASE_URL is not set: point it at a node's API, e.g. http://127.0.0.1:8080/v1")

client = openai.OpenAI(
    api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
    max_retries=0,
    timeout=300,
)

def user(text):
    return [{"role": "user", "content": text}]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}


@check
def models_list():
    ids = [m.id for m in client.models.list()]
    expect(CHAT in ids, f"{CHAT} not in /v1/models: {ids}")
    for m in client.models.list().data:
        expect(m.object == "model", f"model object is {m.object!r}")
        expect(isinstance(m.owned_by, str), "owned_by is not a string")


@check
def chat_non_streaming():
    r = client.chat.completions.create(
        model=CHAT, messages=user("What is the capital of France?"), max_tokens=16, temperature=0
    )
    expect(r.object == "chat.completion", f"object is {r.object!r}")
    expect(isinstance(r.id, str) and r.id, "no id")
    expect(isinstance(r.created, int) and r.created > 1_600_000_000, f"created is {r.created!r}")
    expect(r.model, "no model in the answer")
    expect(len(r.choices) == 1, f"{len(r.choices)} choices")
    c = r.choices[0]
    expect(c.index == 0, f"index {c.index}")
    expect(c.message.role == "assistant", f"role {c.message.role!r}")
    expect(isinstance(c.message.content, str) and c.message.content.strip(), "empty content")
    expect(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
    u = r.usage
    expect(u is not None, "no usage")
    expect(u.prompt_tokens > 0, f"prompt_tokens {u.prompt_tokens}")
    expect(0 < u.completion_tokens <= 16, f"completion_tokens {u.completion_tokens}")
    expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, "total_tokens is not the sum")
    print(f"    answer: {c.message.content!r}")


@check
def max_tokens_and_length():
    r = client.chat.completions.create(
        model=CHAT, messages=user("Count from one to one hundred."), max_tokens=3, temperature=0
    )
    expect(r.choices[0].finish_reason == "length", f"finish_reason {r.choices[0].finish_reason!r}")
    expect(r.usage.completion_tokens == 3, f"completion_tokens {r.usage.completion_tokens}")
    r = client.chat.completions.create(
        model=CHAT, messages=user("Count from one to one hundred."), max_completion_tokens=2, temperature=0
    )
    expect(r.usage.completion_tokens == 2, f"max_completion_tokens ignored: {r.usage.completion_tokens}")


@check
def chat_streaming_with_usage():
    messages = user("Write one sentence about the sea.")
    stream = client.chat.completions.create(
        model=CHAT,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, content_chunks, finish, usage, ids = "", 0, None, None, set()
    for chunk in stream:
        expect(chunk.object == "chat.completion.chunk", f"object is {chunk.object!r}")
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
            expect(chunk.choices == [], "the usage chunk must have no choices")
            continue
        expect(usage is None, "a chunk came after the usage chunk")
        for c in chunk.choices:
            if c.delta.content:
                text += c.delta.content
                content_chunks += 1
            if c.finish_reason:
                finish = c.finish_reason
    expect(len(ids) == 1, f"chunks carry {len(ids)} different ids")
    expect(content_chunks >= 2, f"only {content_chunks} content chunks: not streamed")
    expect(text.strip(), "empty streamed text")
    expect(finish in ("stop", "length"), f"finish_reason {finish!r}")
    expect(usage is not None, "no usage chunk with include_usage")
    expect(usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24, f"usage {usage}")
    expect(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, "total_tokens")
    # Greedy decoding: the same prompt gives the same text streamed or not.
    r = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=24, temperature=0)
    expect(r.choices[0].message.content == text,
           f"greedy stream and non-stream differ:\n  {text!r}\n  {r.choices[0].message.content!r}")
    # Without include_usage no chunk carries usage.
    stream = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=4, stream=True)
    expect(all(chunk.usage is None for chunk in stream), "usage sent without include_usage")


@check
def seed_is_reproducible():
    args = dict(model=CHAT, messages=user("Invent a name for a cat."), max_tokens=12,
                temperature=1.0, seed=1234)
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    expect(a == b, f"same seed, different answers: {a!r} vs {b!r}")


@check
def n_choices():
    r = client.chat.completions.create(
        model=CHAT, messages=user("Say a color."), max_tokens=4, n=2, temperature=1.0, seed=7
    )
    expect(len(r.choices) == 2, f"n=2 gave {len(r.choices)} choices")
    expect(sorted(c.index for c in r.choices) == [0, 1], "choice indexes")


@check
def logprobs():
    r = client.chat.completions.create(
        model=CHAT, messages=user("Say yes."), max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    lp = r.choices[0].logprobs
    expect(lp is not None and lp.content, "no logprobs")
    expect(len(lp.content) == r.usage.completion_tokens,
           f"{len(lp.content)} logprobs for {r.usage.completion_tokens} tokens")
    for t in lp.content:
        expect(t.logprob <= 0.0, f"logprob {t.logprob}")
        expect(len(t.top_logprobs) == 2, f"{len(t.top_logprobs)} top_logprobs")


@check
def tool_call_round_trip():
    messages = user("What is the weather in Paris right now? Use the tool.")
    r = client.chat.completions.create(
        model=CHAT, messages=messages, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=256, temperature=0
    )
    c = r.choices[0]
    expect(c.finish_reason == "tool_calls", f"finish_reason {c.finish_reason!r}, message {c.message!r}")
    calls = c.message.tool_calls
    expect(calls, "no tool_calls with tool_choice=required")
    call = calls[0]
    expect(call.type == "function", f"type {call.type!r}")
    expect(call.id, "tool call without id")
    expect(call.function.name == "get_weather", f"name {call.function.name!r}")
    args = json.loads(call.function.arguments)
    expect(isinstance(args, dict) and isinstance(args.get("city"), str), f"arguments {args!r}")
    print(f"    tool call: {call.function.name}({call.function.arguments})")
    messages.append({
        "role": "assistant",
        "content": c.message.content,
        "tool_calls": [{"id": call.id, "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments}}],
    })
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": args["city"], "temperature_c": 21, "sky": "sunny"})})
    r = client.chat.completions.create(
        model=CHAT, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=48, temperature=0
    )
    final = r.choices[0].message
    expect(not final.tool_calls, "tool_choice=none still called a tool")
    expect(final.content and final.content.strip(), "empty final answer after the tool result")
    print(f"    final answer: {final.content!r}")


def streamed_calls(stream):
    """The tool calls and finish reason a client rebuilds from a stream's deltas."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": "", "chunks": 0})
                entry["chunks"] += 1
                if d.id:
                    entry["id"] = d.id
                if d.function and d.function.name:
                    entry["name"] += d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
            if c.finish_reason:
                finish = c.finish_reason
    return calls, finish, content


@check
def named_tool_choice_and_streamed_tool_calls():
    stream = client.chat.completions.create(
        model=CHAT,
        messages=user("Weather in Tokyo?"),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    calls, finish, _ = streamed_calls(stream)
    expect(calls, "no tool_calls deltas in the stream")
    first = calls[min(calls)]
    expect(first["id"], "streamed tool call without id")
    expect(first["name"] == "get_weather", f"name {first['name']!r}")
    args = json.loads(first["arguments"])
    expect(isinstance(args, dict), f"arguments {args!r}")
    # A named choice forces the function, so the schema's required field is present.
    expect(isinstance(args.get("city"), str), f"arguments {args!r}")
    expect(finish in ("tool_calls", "stop"), f"finish_reason {finish!r}")


# A tool whose parameters leave additionalProperties unsaid, as most clients send them.
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Search flights between two cities on a date.",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "description": "City of departure"},
                "destination": {"type": "string", "description": "City of arrival"},
                "date": {"type": "string", "description": "Date, YYYY-MM-DD"},
            },
            "required": ["origin", "destination"],
        },
    },
}


@check
def forced_tool_calls_fit_a_small_budget():
    declared = set(SEARCH_TOOL["function"]["parameters"]["properties"])
    messages = user("Find me a flight from Paris to Rome on 2026-05-01.")
    for choice in ("required", {"type": "function", "function": {"name": "search_flights"}}):
        # One call: a named choice, or parallel_tool_calls false.
        r = client.chat.completions.create(model=CHAT, messages=messages, tools=[SEARCH_TOOL, WEATHER_TOOL],
                                           tool_choice=choice, parallel_tool_calls=False, max_tokens=60,
                                           temperature=0)
        c = r.choices[0]
        expect(c.finish_reason == "tool_calls", f"{choice}: finish_reason {c.finish_reason!r}, message {c.message!r}")
        calls = c.message.tool_calls or []
        expect(len(calls) == 1, f"{choice}: calls {calls!r}")
        for call in calls:
            args = json.loads(call.function.arguments)
            fn = SEARCH_TOOL if call.function.name == "search_flights" else WEATHER_TOOL
            allowed = set(fn["function"]["parameters"]["properties"])
            expect(set(args) <= allowed, f"{choice}: undeclared arguments in {args!r}")
        expect(r.usage.completion_tokens <= 60, f"{r.usage.completion_tokens} tokens")
    # Streamed: the call arrives as deltas while it is generated (its name first, the
    # arguments in several pieces), and the pieces make the call.
    stream = client.chat.completions.create(
        model=CHAT, messages=messages, tools=[SEARCH_TOOL], stream=True, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "search_flights"}})
    calls, finish, content = streamed_calls(stream)
    expect(finish == "tool_calls", f"streamed finish_reason {finish!r}, calls {calls!r}, content {content!r}")
    expect(list(calls) == [0], f"streamed calls {calls!r}")
    call = calls[0]
    expect(call["id"] and call["name"] == "search_flights", f"streamed call {call!r}")
    expect(call["chunks"] >= 3, f"the call came in {call['chunks']} chunk(s), not as it was generated")
    args = json.loads(call["arguments"])
    expect(set(args) <= declared and {"origin", "destination"} <= set(args), f"streamed arguments {args!r}")
    print(f"    forced call: search_flights({call['arguments']}) in {call['chunks']} chunks")
    # A budget too small for the call: `length`, with the call so far.
    r = client.chat.completions.create(model=CHAT, messages=messages, tools=[SEARCH_TOOL], max_tokens=24,
                                       temperature=0, tool_choice="required")
    c = r.choices[0]
    expect(c.finish_reason == "length", f"finish_reason {c.finish_reason!r} at max_tokens=24")
    expect(c.message.tool_calls and c.message.tool_calls[0].function.name == "search_flights",
           f"no partial call at length: {c.message!r}")
    stream = client.chat.completions.create(model=CHAT, messages=messages, tools=[SEARCH_TOOL], max_tokens=24,
                                            temperature=0, tool_choice="required", stream=True)
    calls, finish, _ = streamed_calls(stream)
    expect(finish == "length" and calls and calls[0]["name"] == "search_flights",
           f"streamed at max_tokens=24: {finish!r} {calls!r}")


@check
def tiny_temperature_is_greedy_and_bad_schemas_are_one_sentence():
    greedy = client.chat.completions.create(model=CHAT, messages=user("Name a planet."), max_tokens=8,
                                            temperature=0).choices[0].message.content
    tiny = client.chat.completions.create(model=CHAT, messages=user("Name a planet."), max_tokens=8,
                                          temperature=1e-45).choices[0].message.content
    expect(tiny == greedy, f"temperature 1e-45 gave {tiny!r}, greedy {greedy!r}")
    schema = {"anyOf": [{"$ref": "#"}]}  # refers only to itself: no value satisfies it
    try:
        client.chat.completions.create(
            model=CHAT, messages=user("hi"), max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}})
        raise AssertionError("a schema that cannot be compiled was accepted")
    except openai.BadRequestError as e:
        message = (e.body or {}).get("message", "") if isinstance(e.body, dict) else ""
        expect(message and "\n" not in message and len(message) <= 300,
               f"not one clean sentence: {message!r}")
        print(f"    schema error: {message}")


@check
def json_schema_response():
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "age", "languages"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=CHAT,
        messages=user("Describe a fictional programmer as JSON."),
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}},
        max_tokens=128,
        temperature=0,
    )
    content = r.choices[0].message.content
    expect(r.choices[0].finish_reason == "stop", f"finish_reason {r.choices[0].finish_reason!r}: {content!r}")
    value = json.loads(content)
    jsonschema.validate(value, schema)
    print(f"    json: {content}")


@check
def json_object_response():
    r = client.chat.completions.create(
        model=CHAT,
        messages=user("Give me a JSON object with a key 'fruit'."),
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    value = json.loads(r.choices[0].message.content)
    expect(isinstance(value, dict), f"not an object: {value!r}")


@check
def legacy_completions():
    r = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=8, temperature=0)
    expect(r.object == "text_completion", f"object is {r.object!r}")
    expect(r.choices[0].text, "empty text")
    expect(r.usage.completion_tokens > 0, "no completion tokens")
    chunks = list(client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=8, stream=True))
    expect(sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2, "completions did not stream")


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@check
def embeddings():
    texts = ["A cat sits on the mat.", "A kitten is lying on a rug.", "Stock markets fell sharply today."]
    # The client asks for base64 by default and decodes it; ask for floats explicitly too.
    for fmt in (openai.NOT_GIVEN, "float"):
        r = client.embeddings.create(model=EMBED, input=texts, encoding_format=fmt)
        expect(r.object == "list", f"object is {r.object!r}")
        expect(len(r.data) == 3, f"{len(r.data)} embeddings for 3 inputs")
        expect([d.index for d in r.data] == [0, 1, 2], "indexes out of order")
        vectors = [d.embedding for d in r.data]
        expect(all(len(v) == 384 for v in vectors), f"dims {[len(v) for v in vectors]}")
        expect(all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3 for v in vectors), "not unit length")
        near, far = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
        expect(near > far + 0.2, f"cosine(cat, kitten)={near:.3f} not above cosine(cat, stocks)={far:.3f}")
        expect(r.usage.prompt_tokens > 0, "no usage.prompt_tokens")
    single = client.embeddings.create(model=EMBED, input="A cat sits on the mat.", encoding_format="float")
    expect(abs(cosine(single.data[0].embedding, vectors[0]) - 1.0) < 1e-4, "batch and single differ")


@check
def responses_two_turns_through_previous_response_id():
    first = client.responses.create(
        model=CHAT,
        instructions="You are a terse assistant.",
        input="My name is Ada. Say hello to me.",
        max_output_tokens=24,
        temperature=0,
    )
    expect(first.object == "response" and first.id.startswith("resp_"), f"{first}")
    expect(first.status in ("completed", "incomplete"), f"status {first.status}")
    expect(first.output_text.strip(), f"no output_text: {first.output}")
    expect(first.usage.input_tokens > 5 and first.usage.output_tokens > 0, f"usage {first.usage}")
    second = client.responses.create(
        model=CHAT,
        previous_response_id=first.id,
        input="What is my name?",
        max_output_tokens=24,
        temperature=0,
    )
    expect(second.previous_response_id == first.id, f"{second.previous_response_id}")
    # The second turn's prompt holds the first turn (question and answer).
    expect(second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 10,
           f"the history was not carried: {first.usage} then {second.usage}")
    fetched = client.responses.retrieve(second.id)
    expect(fetched.id == second.id and fetched.output_text == second.output_text, f"{fetched}")
    # store: false keeps nothing to continue from.
    gone = client.responses.create(model=CHAT, input="Hi", max_output_tokens=4, store=False)
    try:
        client.responses.create(model=CHAT, previous_response_id=gone.id, input="Again",
                                max_output_tokens=4)
        raise AssertionError("a response made with store=false was continued")
    except openai.NotFoundError as e:
        expect(e.status_code == 404, f"status {e.status_code}")
    client.responses.delete(first.id)
    try:
        client.responses.retrieve(first.id)
        raise AssertionError("a deleted response was returned")
    except openai.NotFoundError:
        pass


@check
def responses_streaming_events():
    kinds = []
    text = ""
    final = None
    for event in client.responses.create(model=CHAT, input="Count from one to five.",
                                         max_output_tokens=24, temperature=0, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    expect(kinds[:2] == ["response.created", "response.in_progress"], f"first events {kinds[:3]}")
    expect(kinds[-1] in ("response.completed", "response.incomplete"), f"last event {kinds[-1]}")
    expect("response.output_text.delta" in kinds and "response.output_item.done" in kinds, f"{kinds}")
    expect(final is not None and final.output_text == text and text.strip(), f"{text!r} vs {final}")
    whole = client.responses.create(model=CHAT, input="Count from one to five.",
                                    max_output_tokens=24, temperature=0)
    expect(whole.output_text == text, f"streamed {text!r}, whole {whole.output_text!r}")


@check
def responses_forced_function_call():
    tool = {"type": "function", "name": "get_weather", "description": "Get the weather in a city.",
            "parameters": WEATHER_TOOL["function"]["parameters"]}
    r = client.responses.create(
        model=CHAT,
        input="What is the weather in Paris?",
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    expect(len(calls) == 1 and calls[0].name == "get_weather", f"output {r.output}")
    args = json.loads(calls[0].arguments)
    expect(isinstance(args.get("city"), str) and set(args) <= {"city"}, f"arguments {args}")
    # The result goes back as a function_call_output after the stored turn.
    answer = client.responses.create(
        model=CHAT,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 18 C"}],
        tools=[tool],
        max_output_tokens=30,
        temperature=0,
    )
    expect(answer.output_text.strip(), f"no answer after the call's output: {answer.output}")
    # Streamed: the arguments arrive as deltas.
    kinds = [e.type for e in client.responses.create(
        model=CHAT, input="Weather in Rome?", tools=[tool], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=60, stream=True)]
    expect("response.function_call_arguments.delta" in kinds, f"{kinds}")
    expect("response.function_call_arguments.done" in kinds, f"{kinds}")


@check
def unknown_model_is_404():
    try:
        client.chat.completions.create(model="no-such-model", messages=user("hi"), max_tokens=1)
        raise AssertionError("an unknown model did not raise")
    except openai.NotFoundError as e:
        expect(e.status_code == 404, f"status {e.status_code}")
        body = e.body if isinstance(e.body, dict) else {}
        expect(body.get("message"), f"no error message in {e.body!r}")
        expect("no-such-model" in str(body.get("message")), f"the message does not name the model: {e.body!r}")
    try:
        client.embeddings.create(model="no-such-model", input="x")
        raise AssertionError("an unknown embedding model did not raise")
    except openai.NotFoundError as e:
        expect(e.status_code == 404, f"status {e.status_code}")


@check
def unhonourable_field_is_400():
    try:
        client.chat.completions.create(model=CHAT, messages=user("hi"), max_tokens=1, temperature=5)
        raise AssertionError("temperature=5 did not raise")
    except openai.BadRequestError as e:
        expect(e.status_code == 400, f"status {e.status_code}")


if __name__ == "__main__":
    sys.exit(run(f"conformance against {client.base_url} (openai {openai.__version__}), models {CHAT}, {EMBED}"))
