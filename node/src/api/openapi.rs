//! `GET /openapi.json`: the OpenAPI 3.1 description of the routes, written by hand and filled
//! with this node's own limits (`server.max_tokens`, `max_n`, `max_embedding_inputs`), so that
//! what it admits is what the node accepts. Bearer security is declared only when the node
//! asks for a key (`server.api_keys` or `[payments]`).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use crate::agent::Shared;

/// What the document says that depends on the node's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Requests need a bearer key.
    pub auth: bool,
    /// `server.max_tokens`.
    pub max_tokens: usize,
    /// `server.max_n`.
    pub max_n: usize,
    /// `server.max_embedding_inputs`.
    pub max_inputs: usize,
    /// The chat model's vocabulary (token ids are below it).
    pub vocab: usize,
    /// The chat model's names (its own and `default`); `None` on a gateway, which takes any.
    pub chat_models: Option<[&'a str; 2]>,
    /// The embedding model's name and dimension (none on a gateway).
    pub embedding: Option<(&'a str, usize)>,
    /// The node has tools of its own (`[[tools]]`, `[[mcp]]`), which a forced call may name.
    pub node_tools: bool,
}

impl<'a> Facts<'a> {
    fn of(st: &'a crate::agent::AppState) -> Facts<'a> {
        let s = &st.config.server;
        Facts {
            auth: !s.api_keys.is_empty() || st.payments.is_some(),
            max_tokens: s.max_tokens,
            max_n: s.max_n,
            max_inputs: s.max_embedding_inputs,
            vocab: st.local.as_ref().map_or(u32::MAX as usize, |m| {
                m.engine.model().tokenizer().vocab_size()
            }),
            chat_models: st
                .local
                .as_ref()
                .map(|_| [st.config.models.chat.as_str(), "default"]),
            embedding: st.local.as_ref().map(|m| {
                (
                    st.config.models.embedding.as_str(),
                    m.embedder.model().dim(),
                )
            }),
            node_tools: !st.config.tools.is_empty() || !st.config.mcp.is_empty(),
        }
    }
}

fn error_ref(schema: &str) -> Json {
    json!({"description": "an error body",
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

/// An operation answering `response` (a schema name) on success, with `error` bodies (a
/// schema name) for the failures it can have.
fn op_with(
    facts: &Facts<'_>,
    summary: &str,
    request: Option<&str>,
    response: &str,
    error: &str,
) -> Json {
    let mut responses = json!({
        "200": {"description": "success", "content": {"application/json":
            {"schema": {"$ref": format!("#/components/schemas/{response}")}}}},
        "404": error_ref(error), "429": error_ref(error), "503": error_ref(error),
    });
    if facts.auth {
        responses["401"] = error_ref(error);
        responses["402"] = error_ref(error);
    }
    let mut op = json!({"summary": summary, "responses": responses});
    if let Some(req) = request {
        op["responses"]["400"] = error_ref(error);
        op["responses"]["413"] = error_ref(error);
        op["requestBody"] = json!({"required": true, "content": {"application/json":
            {"schema": {"$ref": format!("#/components/schemas/{req}")}}}});
    }
    op
}

fn op(facts: &Facts<'_>, summary: &str, request: Option<&str>, response: &str) -> Json {
    op_with(facts, summary, request, response, "Error")
}

/// The document, for a node with `facts`.
pub fn spec(facts: &Facts<'_>) -> Json {
    let num = json!({"type": "number"});
    let int = json!({"type": "integer"});
    let string = json!({"type": "string"});
    let text = json!({"type": "string", "minLength": 1});
    let chat_model = match facts.chat_models {
        Some(names) => json!({"enum": names}),
        None => string.clone(),
    };
    let (embedding_model, dimensions) = match facts.embedding {
        Some((name, dim)) => (json!({"enum": [name]}), json!({"const": dim})),
        None => (string.clone(), json!({"type": "integer", "minimum": 1})),
    };
    let range = |lo: f64, hi: f64| json!({"type": "number", "minimum": lo, "maximum": hi});
    // Finite f32s.
    let f32_range = range(-f64::from(f32::MAX), f64::from(f32::MAX));
    let tool_name = json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"});
    let stop_string = json!({"type": "string", "minLength": 1,
        "maxLength": crate::agent::types::MAX_STOP_CHARS});
    let stop = json!({"oneOf": [stop_string, {"type": "array", "items": stop_string,
        "maxItems": gaia_inference::generate::MAX_STOP_SEQUENCES}]});
    let max_tokens = json!({"type": "integer", "minimum": 1, "maximum": facts.max_tokens});
    let common = json!({
        "max_tokens": max_tokens, "temperature": range(0.0, 2.0),
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": facts.max_n},
        "stream": {"type": "boolean"},
        "stop": stop, "seed": {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX},
        "presence_penalty": range(-2.0, 2.0), "frequency_penalty": range(-2.0, 2.0),
        "logit_bias": {"type": "object", "maxProperties": crate::agent::types::MAX_LOGIT_BIAS,
            // Decimal token ids with fewer digits than the vocabulary's size are all below it.
            "propertyNames": {"pattern": format!("^[0-9]{{1,{}}}$",
                facts.vocab.to_string().len().saturating_sub(1).max(1))},
            "additionalProperties": range(-100.0, 100.0)},
        "user": string,
        "top_k": {"type": "integer", "minimum": 0, "maximum": facts.vocab},
        "min_p": range(0.0, 1.0),
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
    });
    let mut chat_props = common.clone();
    for (k, v) in [
        ("model", chat_model.clone()),
        (
            "messages",
            json!({"type": "array", "minItems": 1, "maxItems": crate::agent::types::MAX_MESSAGES,
                "items": {"$ref": "#/components/schemas/Message"}}),
        ),
        ("max_completion_tokens", max_tokens.clone()),
        ("logprobs", json!({"type": "boolean"})),
        (
            "top_logprobs",
            json!({"type": "integer", "minimum": 0,
                "maximum": gaia_inference::sampling::MAX_TOP_LOGPROBS}),
        ),
        (
            "tools",
            json!({"type": "array", "maxItems": crate::agent::types::MAX_TOOLS,
                "items": {"$ref": "#/components/schemas/Tool"}}),
        ),
        (
            "tool_choice",
            json!({"oneOf": [{"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "function"], "additionalProperties": false,
                "description": "names one of the request's tools",
                "properties": {"type": {"const": "function"},
                "function": {"type": "object", "required": ["name"],
                    "additionalProperties": false, "properties": {"name": tool_name.clone()}}}}]}),
        ),
        ("parallel_tool_calls", json!({"type": "boolean"})),
        (
            "response_format",
            json!({"oneOf": [
                {"type": "object", "required": ["type"], "additionalProperties": false,
                    "properties": {"type": {"enum": ["text", "json_object"]}}},
                {"type": "object", "required": ["type", "json_schema"], "additionalProperties": false,
                    "properties": {"type": {"const": "json_schema"},
                    "json_schema": {"type": "object", "required": ["name"],
                        "additionalProperties": false, "properties": {
                        "name": string, "description": {"type": ["string", "null"]},
                        "strict": {"type": ["boolean", "null"]},
                        "schema": json_schema_value(true)}}}}]}),
        ),
        (
            "rag",
            json!({"type": "boolean", "description": "Gaia extension: use the knowledge base"}),
        ),
    ] {
        chat_props[k] = v;
    }
    let mut completion_props = common;
    completion_props["model"] = chat_model.clone();
    completion_props["prompt"] =
        json!({"oneOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]});
    completion_props["logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": 5});
    completion_props["echo"] = json!({"type": "boolean"});
    let source = json!({"type": "object", "properties": {"source": string, "title": string,
        "heading": {"type": ["string", "null"]}, "score": num, "text": string}});
    let messages_request = anthropic_request(&chat_model, &max_tokens, &stop_string, facts);
    let responses_request = responses_request(&chat_model, &max_tokens, facts);
    let message = json!({"type": "object", "description": "Anthropic's Message; errors \
                    here have Anthropic's body {type: error, error: {type, message}}",
                    "properties": {"id": string, "type": string, "role": string, "model": string,
                    "content": {"type": "array"}, "stop_reason": string,
                    "usage": {"type": "object", "properties": {"input_tokens": int, "output_tokens": int}},
                    "sources": {"type": "array", "items": source}}});
    // Rules between fields (a null field counts as absent).
    let stream_options_rule = json!({"description": "stream_options only with stream: true",
        "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
        "then": {"required": ["stream"], "properties": {"stream": {"const": true}}}});
    let one_length_rule = json!({"description": "max_tokens or max_completion_tokens, not both",
        "not": {"required": ["max_tokens", "max_completion_tokens"], "properties": {
            "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"}}}});
    let top_logprobs_rule = json!({"description": "top_logprobs only with logprobs: true",
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": true}}}});
    let format_or_call_rule = json!({"description": "structured output or a forced tool call, not both",
        "not": {"required": ["response_format", "tool_choice"], "properties": {
            "response_format": {"type": "object", "required": ["type"],
                "properties": {"type": {"enum": ["json_object", "json_schema"]}}},
            "tool_choice": {"allOf": [{"type": ["string", "object"]},
                {"not": {"enum": ["none", "auto"]}}]}}}});
    let schemas = json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"], "properties": {
            "message": string, "type": string, "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}}}},
        "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
            "type": {"const": "error"}, "error": {"type": "object",
            "required": ["type", "message"], "properties": {"type": string, "message": string}}}},
        "Message": chat_message(),
        "Tool": {"type": "object", "required": ["type", "function"], "additionalProperties": false,
            "properties": {"type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "additionalProperties": false,
                "description": "names are unique within a request", "properties": {
                "name": tool_name.clone(), "description": {"type": ["string", "null"]},
                "parameters": json_schema_value(true),
                "strict": {"type": ["boolean", "null"]}}}}},
        "ChatRequest": {"type": "object", "required": ["model", "messages"], "properties": chat_props,
            "additionalProperties": false,
            "allOf": [stream_options_rule.clone(), one_length_rule, top_logprobs_rule, format_or_call_rule, forced_call_rule(facts, json!({"not": {"enum": ["none", "auto"]}}),
                "tools", json!({"type": "array", "minItems": 1}))]},
        "ChatCompletion": {"type": "object", "properties": {"id": string, "object": string,
            "created": int, "model": string, "choices": {"type": "array"},
            "usage": {"$ref": "#/components/schemas/Usage"},
            "sources": {"type": "array", "items": source},
            "tool_results": {"type": "array"}}},
        "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": completion_props,
            "additionalProperties": false, "allOf": [stream_options_rule]},
        "Completion": {"type": "object", "properties": {"id": string, "choices": {"type": "array"},
            "usage": {"$ref": "#/components/schemas/Usage"}}},
        "Usage": {"type": "object", "properties": {"prompt_tokens": int,
            "completion_tokens": int, "total_tokens": int,
            "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": int}}}},
        "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": embedding_model,
            "input": {"oneOf": [text, {"type": "array", "items": text, "minItems": 1,
                "maxItems": facts.max_inputs}]},
            "encoding_format": {"enum": ["float", "base64"]}, "dimensions": dimensions, "user": string},
            "additionalProperties": false},
        "Embeddings": {"type": "object", "properties": {"data": {"type": "array"},
            "model": string, "usage": {"$ref": "#/components/schemas/Usage"}}},
        "Models": {"type": "object", "properties": {"data": {"type": "array"}}},
        "Model": {"type": "object", "properties": {"id": string, "object": string}},
        "RetrieveRequest": {"type": "object", "required": ["query"], "properties": {
            "query": {"type": "string", "pattern": "\\S"},
            "top_k": {"type": "integer", "minimum": 1, "maximum": gaia_knowledge::MAX_TOP_K},
            "score_threshold": f32_range,
            "mode": {"enum": ["hybrid", "vector", "keyword"]}},
            "additionalProperties": false},
        "Retrieved": {"type": "object", "properties": {"data": {"type": "array", "items": source}}},
        "Info": {"type": "object"},
        "Balance": {"type": "object", "description": "An access key's escrow account \
            as this node sees it; amounts in wei, as decimal strings", "properties": {
            "account": string, "escrow": string, "chain_id": int,
            "escrow_balance": string, "spent_here": string, "spent_elsewhere": string,
            "reserved": string,
            "remaining": string, "expires_at": int,
            "max_price": {"type": "object", "description": "The most a request may be \
                charged, in wei per 1000 prompt and per 1000 completion tokens",
                "properties": {"prompt": int, "completion": int}}}},
        "Health": {"type": "object", "properties": {"status": string}},
        "Documents": {"type": "object", "required": ["data"], "properties": {
            "hash": string, "documents": int, "chunks": int,
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Document"}}}},
        "Document": {"type": "object", "properties": {"source": string, "title": string,
            "content_type": string, "chunks": int, "text_bytes": int, "digest": string}},
        "StoredDocument": {"type": "object", "properties": {
            "document": {"$ref": "#/components/schemas/Document"}, "hash": string}},
        "ResponsesRequest": responses_request,
        "Response": {"type": "object", "required": ["id", "object", "status", "output"],
            "properties": {"id": string, "object": {"const": "response"},
            "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
            "output": {"type": "array"},
            "previous_response_id": {"type": ["string", "null"]},
            "instructions": {"type": ["string", "null"]},
            "max_output_tokens": {"type": ["integer", "null"]},
            "usage": {"type": ["object", "null"]}}},
        "Deleted": {"type": "object", "properties": {"id": string, "deleted": {"type": "boolean"}}},
        "MessagesRequest": messages_request,
        "AnthropicMessage": message,
    });
    let paths = json!({
        "/v1/chat/completions": {"post": op(facts, "Chat completion (SSE when stream is true)", Some("ChatRequest"), "ChatCompletion")},
        "/v1/completions": {"post": op(facts, "Text completion", Some("CompletionRequest"), "Completion")},
        "/v1/responses": {"post": op(facts, "OpenAI Responses (SSE events when stream is true)", Some("ResponsesRequest"), "Response")},
        "/v1/responses/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
            "get": op(facts, "A stored response", None, "Response"),
            "delete": op(facts, "Delete a stored response", None, "Deleted")},
        "/v1/messages": {"post": op_with(facts, "Anthropic Messages (SSE events when stream is true)", Some("MessagesRequest"), "AnthropicMessage", "AnthropicError")},
        "/v1/embeddings": {"post": op(facts, "Sentence embeddings", Some("EmbeddingRequest"), "Embeddings")},
        "/v1/models": {"get": op(facts, "The models this node serves", None, "Models")},
        "/v1/models/{model}": {
            "parameters": [{"name": "model", "in": "path", "required": true, "schema": {"type": "string"}}],
            "get": op(facts, "One model", None, "Model")},
        "/v1/retrieve": {"post": op(facts, "Knowledge-base search", Some("RetrieveRequest"), "Retrieved")},
        "/v1/kb/documents": documents_paths(facts),
        "/v1/info": {"get": op(facts, "Node identity, models, knowledge base, load", None, "Info")},
        "/v1/balance": {"get": op(facts, "What the calling access key has left ([payments] on; 404 otherwise)", None, "Balance")},
        "/health": {"get": {"summary": "Liveness", "security": [],
            "responses": {"200": {"description": "ok"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
            "responses": {"200": {"description": "text/plain exposition"}}}},
        "/openapi.json": {"get": {"summary": "This document",
            "responses": {"200": {"description": "the OpenAPI document"}}}},
    });
    let mut paths = paths;
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
    ] {
        paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"] = json!({"schema": {"type": "object", "description": "a server-sent event",
                "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}});
    }
    let mut schemas = schemas;
    for name in [
        "ChatRequest",
        "CompletionRequest",
        "EmbeddingRequest",
        "RetrieveRequest",
        "ResponsesRequest",
    ] {
        nullable_optionals(&mut schemas[name]);
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "Gaia node API", "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible API of a Gaia node, with knowledge-base retrieval."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": paths,
    });
    if facts.auth {
        doc["security"] = json!([{"bearer": []}]);
    }
    doc
}

/// `/v1/kb/documents`: list for any caller; add and remove for the operator (a key from
/// `server.api_keys`, or the node's own machine when no keys are set: 403 otherwise).
fn documents_paths(facts: &Facts<'_>) -> Json {
    let source = json!({"name": "source", "in": "query", "required": true,
        "description": "the document's name, such as guide.md",
        "schema": {"type": "string", "minLength": 1,
            "maxLength": super::documents::MAX_SOURCE_CHARS,
            "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"}});
    // Some text, and no control characters but tab, line breaks and form feed (a document
    // with more than 1 in 20 reads as binary).
    let text = json!({"schema": {"type": "string",
        "pattern": "^[^\\x00-\\x08\\x0b\\x0e-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x08\\x0b\\x0e-\\x1f\\x7f-\\x9f][^\\x00-\\x08\\x0b\\x0e-\\x1f\\x7f-\\x9f]*$"}});
    let mut add = op(
        facts,
        "Add or replace a document (operator only); its content is the \
        body, in the given Content-Type (text, Markdown, HTML; PDF too, which a schema cannot \
        describe)",
        None,
        "StoredDocument",
    );
    add["parameters"] = json!([source]);
    add["requestBody"] = json!({"required": true, "content": {
        "text/plain": text, "text/markdown": text, "text/html": text}});
    let created = add["responses"]["200"].take();
    let responses = add["responses"].as_object_mut().expect("an object");
    responses.remove("200");
    responses.insert("201".into(), created);
    for status in ["400", "403", "413", "415"] {
        responses.insert(status.into(), error_ref("Error"));
    }
    let mut remove = op(facts, "Remove a document (operator only)", None, "Deleted");
    remove["parameters"] = json!([source]);
    remove["responses"]["400"] = error_ref("Error");
    remove["responses"]["403"] = error_ref("Error");
    json!({"get": op(facts, "The knowledge base's documents and their chunk counts", None, "Documents"),
        "post": add, "delete": remove})
}

/// A JSON Schema given by the client (tool parameters, structured output). Any object is one:
/// unknown keywords are ignored, as the specification says; a known keyword of the wrong type
/// (`{"type": 5}`) is refused with the grammar engine's reason. `nullable`: null means absent.
fn json_schema_value(nullable: bool) -> Json {
    let description = "a JSON Schema (2020-12); unknown keywords are ignored, a known keyword \
        of the wrong type is refused";
    if nullable {
        json!({"type": ["object", "null"], "description": description})
    } else {
        json!({"type": "object", "description": description})
    }
}

/// "A forced tool call needs tools": when `tool_choice` matches `forcing`, `tools` must match
/// `tools_schema`. A node with tools of its own (`[[tools]]`, `[[mcp]]`) can be forced without
/// request tools; the named tool must exist either way (a rule JSON Schema cannot state).
fn forced_call_rule(facts: &Facts<'_>, forcing: Json, tools: &str, tools_schema: Json) -> Json {
    if facts.node_tools {
        return json!({});
    }
    json!({"description": "a forced tool call needs tools",
        "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"allOf": [
            {"type": ["string", "object"]}, forcing]}}},
        "then": {"required": [tools], "properties": {tools: tools_schema}}})
}

/// A chat message: OpenAI's rules per role (content on system, user and tool messages, an
/// assistant message with content or tool calls, a tool message naming its call).
fn chat_message() -> Json {
    let string = json!({"type": "string"});
    let parts = json!({"type": "array", "items": {"type": "object", "required": ["type"],
        "properties": {"type": {"const": "text"}, "text": {"type": ["string", "null"]}}}});
    let content = json!({"oneOf": [string, parts]});
    let name = json!({"type": ["string", "null"]});
    let call = json!({"type": "object", "required": ["function"], "properties": {
        "id": {"type": ["string", "null"]}, "type": {"type": "string", "description": "function"},
        "function": {"type": "object", "required": ["name", "arguments"], "properties": {
            "name": string, "arguments": {"description": "a JSON string, as OpenAI sends it, \
                or the arguments as JSON"}}}}});
    json!({"oneOf": [
        {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"enum": ["system", "developer", "user"]}, "content": content, "name": name}},
        {"type": "object", "required": ["role"], "properties": {
            "role": {"const": "assistant"}, "content": {"oneOf": [string, parts, {"type": "null"}]},
            "name": name, "tool_calls": {"type": ["array", "null"], "items": call}},
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
                {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}}]},
        {"type": "object", "required": ["role", "content", "tool_call_id"], "properties": {
            "role": {"const": "tool"}, "content": content, "tool_call_id": string, "name": name}}]})
}

/// Anthropic's Messages request as the node reads it: user turns of text and `tool_result`
/// blocks, assistant turns of text, `tool_use` and thinking blocks; client tools only.
fn anthropic_request(chat_model: &Json, max_tokens: &Json, stop: &Json, facts: &Facts<'_>) -> Json {
    let string = json!({"type": "string"});
    let range = |lo: f64, hi: f64| json!({"type": "number", "minimum": lo, "maximum": hi});
    let text_block = json!({"type": "object", "required": ["type", "text"], "properties": {
        "type": {"const": "text"}, "text": {"type": "string", "minLength": 1}}});
    let system_block = json!({"type": "object", "required": ["type", "text"], "properties": {
        "type": {"const": "text"}, "text": string}});
    let tool_result = json!({"type": "object", "required": ["type", "tool_use_id"], "properties": {
        "type": {"const": "tool_result"}, "tool_use_id": string,
        "content": {"oneOf": [string, {"type": "array", "items": system_block}, {"type": "null"}]},
        "is_error": {"description": "true marks the result as an error"}}});
    let tool_use = json!({"type": "object", "required": ["type", "id", "name"], "properties": {
        "type": {"const": "tool_use"}, "id": string, "name": string,
        "input": {"description": "the call's arguments, as JSON"}}});
    let thinking = json!({"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["thinking", "redacted_thinking"]}}});
    let turn = |role: &str, blocks: Json| {
        json!({"type": "object", "required": ["role", "content"], "properties": {
            "role": {"const": role},
            "content": {"oneOf": [string, {"type": "array", "minItems": 1, "items": {"oneOf": blocks}}]}}})
    };
    let no_effect = json!({"description": "accepted; no effect on this node"});
    let choice = |types: Json, name: bool| {
        let mut c = json!({"type": "object", "required": ["type"], "additionalProperties": false,
            "properties": {"type": types, "disable_parallel_tool_use": {"type": ["boolean", "null"]}}});
        if name {
            c["required"] = json!(["type", "name"]);
            c["properties"]["name"] = json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"});
        }
        c
    };
    json!({"type": "object", "description": "Anthropic's Messages request",
        "required": ["model", "max_tokens", "messages"], "additionalProperties": false,
        "properties": {
            "model": chat_model, "max_tokens": max_tokens,
            "messages": {"type": "array", "minItems": 1, "maxItems": crate::agent::types::MAX_MESSAGES,
                "items": {"oneOf": [turn("user", json!([text_block, tool_result])),
                    turn("assistant", json!([text_block, tool_use, thinking]))]}},
            "system": {"oneOf": [string, {"type": "array", "items": system_block}]},
            "stop_sequences": {"anyOf": [{"type": "array", "items": stop,
                "maxItems": gaia_inference::generate::MAX_STOP_SEQUENCES}, {"type": "null"}]},
            "stream": {"type": "boolean"},
            "temperature": {"anyOf": [range(0.0, 2.0), {"type": "null"}]},
            "top_p": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                {"type": "null"}]},
            "top_k": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": facts.vocab},
                {"type": "null"}]},
            "tools": {"type": "array", "items": {"type": "object", "required": ["name"],
                "properties": {"type": {"enum": ["custom", null]},
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "description": {"type": ["string", "null"]},
                    "input_schema": json_schema_value(true)}}},
            "tool_choice": {"oneOf": [choice(json!({"enum": ["auto", "any", "none"]}), false),
                choice(json!({"const": "tool"}), true)]},
            "output_config": {"type": "object", "properties": {"format": {"anyOf": [
                {"type": "object", "required": ["type", "schema"], "properties": {
                    "type": {"const": "json_schema"}, "schema": json_schema_value(false)}},
                {"type": "null"}]}}},
            "metadata": no_effect, "thinking": no_effect, "service_tier": no_effect,
            "cache_control": no_effect, "speed": no_effect, "inference_geo": no_effect,
            "container": no_effect, "diagnostics": no_effect, "user_profile_id": no_effect,
            "workspace_id": no_effect},
        "allOf": [forced_call_rule(facts, json!({"type": "object", "required": ["type"],
            "properties": {"type": {"enum": ["any", "tool"]}}}),
            "tools", json!({"type": "array", "minItems": 1})),
            {"description": "structured output or a forced tool call, not both",
            "not": {"required": ["output_config", "tool_choice"], "properties": {
                "output_config": {"type": "object", "required": ["format"],
                    "properties": {"format": {"type": "object"}}},
                "tool_choice": {"type": "object", "required": ["type"],
                    "properties": {"type": {"enum": ["any", "tool"]}}}}}}]})
}

/// OpenAI's Responses request as the node reads it: message, function call and function
/// output items; function tools.
fn responses_request(chat_model: &Json, max_tokens: &Json, facts: &Facts<'_>) -> Json {
    let string = json!({"type": "string"});
    let range = |lo: f64, hi: f64| json!({"type": "number", "minimum": lo, "maximum": hi});
    let parts = json!({"type": "array", "items": {"type": "object", "required": ["type"],
        "properties": {"type": {"enum": ["input_text", "output_text", "text"]}, "text": string}}});
    let content = json!({"oneOf": [string, parts]});
    let items = json!({"oneOf": [
        {"type": "object", "required": ["role", "content"], "properties": {
            "type": {"const": "message"},
            "role": {"enum": ["user", "assistant", "system", "developer"]}, "content": content}},
        {"type": "object", "required": ["type", "call_id", "name"], "properties": {
            "type": {"const": "function_call"}, "call_id": string, "name": string,
            "arguments": {"type": ["string", "null"]}}},
        {"type": "object", "required": ["type", "call_id", "output"], "properties": {
            "type": {"const": "function_call_output"}, "call_id": string, "output": content}}]});
    let format = json!({"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_schema"},
            "name": string, "schema": json_schema_value(true),
            "strict": {"type": ["boolean", "null"]}}}]});
    let no_effect = json!({"description": "accepted; no effect on this node"});
    let refused = json!({"const": false, "description": "not offered: only false or null"});
    json!({"type": "object", "description": "OpenAI's Responses request",
        "required": ["model", "input"], "additionalProperties": false, "properties": {
        "model": chat_model,
        "input": {"oneOf": [string, {"type": "array", "minItems": 1, "items": items}]},
        "instructions": string, "previous_response_id": string, "store": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"],
            "properties": {"type": {"const": "function"},
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": ["string", "null"]}, "parameters": json_schema_value(true),
            "strict": {"description": "accepted; a forced call always keeps to the schema"}}}},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "name"], "properties": {
                "type": {"const": "function"},
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}}]},
        "parallel_tool_calls": {"type": "boolean"},
        "max_output_tokens": max_tokens, "temperature": range(0.0, 2.0),
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_logprobs": no_effect,
        "text": {"type": "object", "properties": {"format": {"anyOf": [format, {"type": "null"}]}}},
        "metadata": {"description": "kept with a stored response and echoed"},
        "user": no_effect, "safety_identifier": no_effect, "prompt_cache_key": no_effect,
        "prompt_cache_retention": no_effect, "service_tier": no_effect, "truncation": no_effect,
        "include": no_effect, "reasoning": no_effect, "stream_options": no_effect,
        "max_tool_calls": no_effect,
        "background": refused, "conversation": refused, "prompt": refused},
        "allOf": [forced_call_rule(facts, json!({"not": {"enum": ["none", "auto"]}}),
            "tools", json!({"type": "array", "minItems": 1})),
            {"description": "structured output or a forced tool call, not both",
            "not": {"required": ["text", "tool_choice"], "properties": {
                "text": {"type": "object", "required": ["format"], "properties": {"format": {
                    "type": "object", "required": ["type"],
                    "properties": {"type": {"enum": ["json_object", "json_schema"]}}}}},
                "tool_choice": {"allOf": [{"type": ["string", "object"]},
                    {"not": {"enum": ["none", "auto"]}}]}}}}]})
}

/// Lets every optional property of a request object be `null` too: the node reads a null
/// field as an absent one.
fn nullable_optionals(schema: &mut Json) {
    let required: Vec<String> = schema["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if let Some(props) = schema.get_mut("properties").and_then(Json::as_object_mut) {
        for (name, prop) in props.iter_mut() {
            if !required.contains(name) {
                *prop = json!({"anyOf": [prop.take(), {"type": "null"}]});
            }
        }
    }
}

/// `GET /openapi.json`
pub async fn document(State(st): State<Shared>) -> Response {
    axum::Json(spec(&Facts::of(&st))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_route_and_declares_security_only_with_keys() {
        let mut facts = Facts {
            auth: false,
            max_tokens: 8,
            max_n: 2,
            max_inputs: 4,
            vocab: 49152,
            chat_models: Some(["m", "default"]),
            embedding: Some(("e", 384)),
            node_tools: false,
        };
        let spec = super::spec(&facts);
        assert!(spec.get("security").is_none());
        // Optional fields may be null; the node's own limits bound them.
        let chat = &spec["components"]["schemas"]["ChatRequest"]["properties"];
        assert_eq!(chat["max_tokens"]["anyOf"][0]["maximum"], 8);
        assert_eq!(chat["max_tokens"]["anyOf"][1]["type"], "null");
        assert_eq!(chat["model"]["enum"], json!(["m", "default"]));
        assert_eq!(
            chat["logit_bias"]["anyOf"][0]["propertyNames"]["pattern"],
            "^[0-9]{1,4}$"
        );
        let embed = &spec["components"]["schemas"]["EmbeddingRequest"]["properties"];
        assert_eq!(embed["dimensions"]["anyOf"][0]["const"], 384);
        assert_eq!(
            spec["paths"]["/v1/models/{model}"]["parameters"][0]["name"],
            "model"
        );
        assert!(
            spec["paths"]["/v1/info"]["get"]["responses"]
                .get("401")
                .is_none()
        );
        facts.auth = true;
        assert_eq!(super::spec(&facts)["security"], json!([{"bearer": []}]));
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/messages",
            "/v1/responses",
            "/v1/responses/{id}",
            "/v1/embeddings",
            "/v1/models",
            "/v1/retrieve",
            "/v1/kb/documents",
            "/v1/info",
            "/v1/balance",
            "/health",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(spec["paths"].get(path).is_some(), "{path}");
        }
        for r in ["ChatRequest", "ChatCompletion", "Error", "Usage"] {
            assert!(spec["components"]["schemas"].get(r).is_some(), "{r}");
        }
    }
}
