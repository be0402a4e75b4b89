"""schemathesis hooks for node/tests/it/conformance.rs: two rules JSON Schema cannot state,
so the document says them in words, and one artefact of generation.

A document uploaded to /v1/kb/documents is text (text/plain, text/markdown, text/html): a
"wrongly typed" body (a JSON object where the schema says string) is still text once sent,
and rightly stored, so such generated cases are not sent.

A prompt must fit in the model's context: a valid request whose messages, prompt or tools
come to more tokens than the context holds gets 400 `context_length_exceeded`, as OpenAI's
does. Valid cases whose body is over PROMPT_BUDGET characters of ASCII JSON (at least one
character per token, whatever the text) are not sent to the model endpoints.

A forced tool call names a tool the request gives (chat `tool_choice.function.name`,
Anthropic `tool_choice.name`, Responses `tool_choice.name`), and tool names are unique
within a request. Valid (positive) cases are made to keep that rule: the named tool's name
is given to the first tool, and duplicate names get a suffix. Invalid cases are left as
generated.
"""

import json

import schemathesis
from schemathesis.generation.modes import GenerationMode

# The default model's context is 4096 tokens; this leaves room for its chat template.
PROMPT_BUDGET = 3500
MODEL_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"}


def _positive(case):
    meta = case.meta
    return meta is not None and meta.generation.mode == GenerationMode.POSITIVE


@schemathesis.hook
def filter_case(context, case):
    path = context.operation.path if context.operation is not None else ""
    if path == "/v1/kb/documents" and case.method.upper() == "POST":
        return isinstance(case.body, str)
    if path not in MODEL_PATHS or not _positive(case) or not isinstance(case.body, dict):
        return True
    return len(json.dumps(case.body)) <= PROMPT_BUDGET


def _chat_names(tools):
    return [t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]


def _flat_names(tools):
    return [t for t in tools if isinstance(t, dict)]


def _unique(holders):
    seen = set()
    for i, holder in enumerate(holders):
        name = holder.get("name")
        if isinstance(name, str) and name in seen:
            holder["name"] = f"{name[:56]}_dup{i}"
        if isinstance(name, str):
            seen.add(holder["name"])


def _forced_name(path, choice):
    if not isinstance(choice, dict):
        return None
    if path == "/v1/chat/completions":
        function = choice.get("function")
        return function.get("name") if isinstance(function, dict) else None
    if path == "/v1/messages" and choice.get("type") == "tool":
        return choice.get("name")
    if path == "/v1/responses" and choice.get("type") == "function":
        return choice.get("name")
    return None


@schemathesis.hook
def map_case(context, case):
    body = case.body
    if not _positive(case) or not isinstance(body, dict):
        return case
    path = context.operation.path if context.operation is not None else ""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return case
    holders = _chat_names(tools) if path == "/v1/chat/completions" else _flat_names(tools)
    if not holders:
        return case
    name = _forced_name(path, body.get("tool_choice"))
    if isinstance(name, str):
        holders[0]["name"] = name
    _unique(holders)
    # Assigning the body marks it changed, so schemathesis checks it against the document again.
    case.body = body
    return case
