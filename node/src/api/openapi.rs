//! `GET /openapi.json`: the OpenAPI 3.1 description of the routes, written by hand.

use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

fn error_ref() -> Json {
    json!({"description": "an OpenAI error body",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn op(summary: &str, request: Option<&str>, response: &str) -> Json {
    let mut op = json!({
        "summary": summary,
        "responses": {
            "200": {"description": "success", "content": {"application/json":
                {"schema": {"$ref": format!("#/components/schemas/{response}")}}}},
            "400": error_ref(), "401": error_ref(), "404": error_ref(),
            "402": error_ref(), "413": error_ref(), "429": error_ref(), "503": error_ref(),
        }
    });
    if let Some(req) = request {
        op["requestBody"] = json!({"required": true, "content": {"application/json":
            {"schema": {"$ref": format!("#/components/schemas/{req}")}}}});
    }
    op
}

/// The document.
pub fn spec() -> Json {
    let num = json!({"type": "number"});
    let int = json!({"type": "integer"});
    let string = json!({"type": "string"});
    let stop = json!({"oneOf": [string, {"type": "array", "items": string, "maxItems": 16}]});
    let common = json!({
        "max_tokens": int, "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "n": int,
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "stop": stop, "seed": int, "presence_penalty": num, "frequency_penalty": num,
        "logit_bias": {"type": "object", "additionalProperties": num}, "user": string,
        "top_k": int, "min_p": num, "repetition_penalty": num,
    });
    let mut chat_props = common.clone();
    for (k, v) in [
        ("model", string.clone()),
        (
            "messages",
            json!({"type": "array", "items": {"$ref": "#/components/schemas/Message"}}),
        ),
        ("max_completion_tokens", int.clone()),
        ("logprobs", json!({"type": "boolean"})),
        ("top_logprobs", int.clone()),
        (
            "tools",
            json!({"type": "array", "items": {"$ref": "#/components/schemas/Tool"}}),
        ),
        (
            "tool_choice",
            json!({"oneOf": [{"enum": ["none", "auto", "required"]},
            {"type": "object", "properties": {"type": {"const": "function"},
                "function": {"type": "object", "properties": {"name": string}}}}]}),
        ),
        ("parallel_tool_calls", json!({"type": "boolean"})),
        (
            "response_format",
            json!({"type": "object", "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {"name": string, "schema": {"type": "object"}}}}}),
        ),
        (
            "rag",
            json!({"type": "boolean", "description": "Gaia extension: use the knowledge base"}),
        ),
    ] {
        chat_props[k] = v;
    }
    let mut completion_props = common;
    completion_props["model"] = string.clone();
    completion_props["prompt"] =
        json!({"oneOf": [string, {"type": "array", "items": string, "maxItems": 1}]});
    completion_props["logprobs"] = int.clone();
    completion_props["echo"] = json!({"type": "boolean"});
    let source = json!({"type": "object", "properties": {"source": string, "title": string,
        "heading": string, "score": num, "text": string}});
    let messages_request = json!({"type": "object", "description": "Anthropic's Messages \
                    request", "required": ["model", "max_tokens", "messages"], "properties": {
                    "model": string, "max_tokens": {"type": "integer", "minimum": 1},
                    "messages": {"type": "array", "minItems": 1, "items": {"type": "object",
                        "required": ["role", "content"], "properties": {
                        "role": {"enum": ["user", "assistant"]},
                        "content": {"oneOf": [string, {"type": "array", "items": {"type": "object"}}]}}}},
                    "system": {"oneOf": [string, {"type": "array", "items": {"type": "object"}}]},
                    "stop_sequences": {"type": "array", "items": string}, "stream": {"type": "boolean"},
                    "temperature": num, "top_p": num, "top_k": int,
                    "tools": {"type": "array", "items": {"type": "object"}},
                    "tool_choice": {"type": "object"}, "metadata": {"type": "object"},
                    "thinking": {"type": "object"}, "service_tier": string},
                    "additionalProperties": false});
    let responses_request = json!({"type": "object", "description": "OpenAI's Responses \
        request", "required": ["model", "input"], "properties": {"model": string,
        "input": {"oneOf": [string, {"type": "array", "items": {"type": "object"}}]},
        "instructions": string, "previous_response_id": string, "store": {"type": "boolean"},
        "stream": {"type": "boolean"}, "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {}, "parallel_tool_calls": {"type": "boolean"},
        "max_output_tokens": {"type": "integer", "minimum": 1}, "temperature": num, "top_p": num,
        "text": {"type": "object"}, "metadata": {"type": "object"}}});
    let message = json!({"type": "object", "description": "Anthropic's Message; errors \
                    here have Anthropic's body {type: error, error: {type, message}}",
                    "properties": {"id": string, "type": string, "role": string, "model": string,
                    "content": {"type": "array"}, "stop_reason": string,
                    "usage": {"type": "object", "properties": {"input_tokens": int, "output_tokens": int}},
                    "sources": {"type": "array", "items": source}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Gaia node API", "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible API of a Gaia node, with knowledge-base retrieval."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object",
                    "properties": {"message": string, "type": string, "param": string, "code": string}}}},
                "Message": {"type": "object", "required": ["role"], "properties": {
                    "role": string, "content": {"oneOf": [string, {"type": "array"}, {"type": "null"}]},
                    "name": string, "tool_calls": {"type": "array"}, "tool_call_id": string}},
                "Tool": {"type": "object", "properties": {"type": {"const": "function"},
                    "function": {"type": "object", "required": ["name"], "properties": {
                        "name": string, "description": string, "parameters": {"type": "object"}}}}},
                "ChatRequest": {"type": "object", "required": ["model", "messages"], "properties": chat_props},
                "ChatCompletion": {"type": "object", "properties": {"id": string, "object": string,
                    "created": int, "model": string, "choices": {"type": "array"},
                    "usage": {"$ref": "#/components/schemas/Usage"},
                    "sources": {"type": "array", "items": source},
                    "tool_results": {"type": "array"}}},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": completion_props},
                "Completion": {"type": "object", "properties": {"id": string, "choices": {"type": "array"},
                    "usage": {"$ref": "#/components/schemas/Usage"}}},
                "Usage": {"type": "object", "properties": {"prompt_tokens": int,
                    "completion_tokens": int, "total_tokens": int,
                    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": int}}}},
                "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
                    "model": string, "input": {"oneOf": [string, {"type": "array", "items": string}]},
                    "encoding_format": {"enum": ["float", "base64"]}, "dimensions": int, "user": string}},
                "Embeddings": {"type": "object", "properties": {"data": {"type": "array"},
                    "model": string, "usage": {"$ref": "#/components/schemas/Usage"}}},
                "Models": {"type": "object", "properties": {"data": {"type": "array"}}},
                "Model": {"type": "object", "properties": {"id": string, "object": string}},
                "RetrieveRequest": {"type": "object", "required": ["query"], "properties": {
                    "query": string, "top_k": int, "score_threshold": num,
                    "mode": {"enum": ["hybrid", "vector", "keyword"]}}},
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
                "ResponsesRequest": responses_request,
                "Response": {"type": "object", "properties": {"id": string, "object": string,
                    "status": string, "output": {"type": "array"}, "previous_response_id": string,
                    "usage": {"type": "object"}}},
                "Deleted": {"type": "object", "properties": {"id": string, "deleted": {"type": "boolean"}}},
                "MessagesRequest": messages_request,
                "Message": message,
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {"post": op("Chat completion (SSE when stream is true)", Some("ChatRequest"), "ChatCompletion")},
            "/v1/completions": {"post": op("Text completion", Some("CompletionRequest"), "Completion")},
            "/v1/responses": {"post": op("OpenAI Responses (SSE events when stream is true)", Some("ResponsesRequest"), "Response")},
            "/v1/responses/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "get": op("A stored response", None, "Response"),
                "delete": op("Delete a stored response", None, "Deleted")},
            "/v1/messages": {"post": op("Anthropic Messages (SSE events when stream is true)", Some("MessagesRequest"), "Message")},
            "/v1/embeddings": {"post": op("Sentence embeddings", Some("EmbeddingRequest"), "Embeddings")},
            "/v1/models": {"get": op("The models this node serves", None, "Models")},
            "/v1/models/{model}": {"get": op("One model", None, "Model")},
            "/v1/retrieve": {"post": op("Knowledge-base search", Some("RetrieveRequest"), "Retrieved")},
            "/v1/info": {"get": op("Node identity, models, knowledge base, load", None, "Info")},
            "/v1/balance": {"get": op("What the calling access key has left ([payments] on)", None, "Balance")},
            "/health": {"get": {"summary": "Liveness", "security": [],
                "responses": {"200": {"description": "ok"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                "responses": {"200": {"description": "text/plain exposition"}}}},
            "/openapi.json": {"get": {"summary": "This document",
                "responses": {"200": {"description": "the OpenAPI document"}}}},
        }
    })
}

/// `GET /openapi.json`
pub async fn document() -> Response {
    axum::Json(spec()).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_every_route() {
        let spec = super::spec();
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/messages",
            "/v1/responses",
            "/v1/responses/{id}",
            "/v1/embeddings",
            "/v1/models",
            "/v1/retrieve",
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
