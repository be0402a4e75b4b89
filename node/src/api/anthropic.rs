//! `POST /v1/messages`: Anthropic's Messages API on the one chat pipeline.
//!
//! The request is translated into a chat completion request ([`to_chat`]: system blocks,
//! `tool_use` and `tool_result` blocks, tools and `tool_choice`, `stop_sequences`), which then
//! goes through [`chat::chat`] exactly as `/v1/chat/completions` does (planning, payment,
//! routing over the swarm, retrieval, generation); the answer is translated back: a whole
//! `message` ([`message`]) or Anthropic's stream events ([`Translator`]: `message_start`,
//! `content_block_start`/`_delta`/`_stop` with `text_delta` and `input_json_delta`,
//! `message_delta` with the `stop_reason` and usage, `message_stop`). Errors have Anthropic's
//! body, `{"type": "error", "error": {"type", "message"}}`, whichever layer refused the request
//! ([`error_shape`]).

use axum::body::Body as HttpBody;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json, json};

use super::billing::Caller;
use super::chat::{self, ChatReply, Chunk, Named, Translate};
use super::error::{ApiError, Body, Fields, parse_body};
use crate::agent::Shared;
use crate::agent::types::ChatRequest;

/// The route.
pub const PATH: &str = "/v1/messages";

/// Fields of a Messages request this node reads (any other is refused, as Anthropic does).
/// `temperature`, `top_p` and `top_k` are older API versions' (today's clients send them in
/// `extra_body`); `metadata`, `cache_control`, `service_tier`, `speed`, `inference_geo`,
/// `container`, `diagnostics`, `user_profile_id` and `workspace_id` are accepted and have no
/// effect here; `thinking` too (the model does not think; no thinking blocks come back).
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "output_config",
    "metadata",
    "thinking",
    "service_tier",
    "cache_control",
    "speed",
    "inference_geo",
    "container",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
];

/// A Messages request body as JSON (checked field by field in [`to_chat`]).
#[derive(Debug, serde::Deserialize)]
#[serde(transparent)]
pub struct MessagesBody(Json);

impl Fields for MessagesBody {
    const FIELDS: &'static [&'static str] = FIELDS;
}

/// `POST /v1/messages`
pub async fn messages(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    Body(MessagesBody(body)): Body<MessagesBody>,
) -> Result<Response, ApiError> {
    let raw = to_chat(&body)?;
    // Parsed as a chat request body is, so a wrong type is named by its field.
    let bytes = serde_json::to_vec(&raw).map_err(|e| ApiError::internal(e.to_string()))?;
    let req: ChatRequest = parse_body(&bytes)?;
    Ok(match chat::chat(st, caller, req, raw).await? {
        ChatReply::Whole(body, served) => {
            chat::served_header(axum::Json(message(&body)).into_response(), served)
        }
        ChatReply::Stream(chunks, served) => {
            chat::served_header(chat::named_sse(chunks, Translator::default()), served)
        }
    })
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// The text of a `system` value or of a content block list's text blocks.
fn text_of(value: &Json, param: &str) -> Result<String, ApiError> {
    match value {
        Json::String(s) => Ok(s.clone()),
        Json::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for b in blocks {
                match b["type"].as_str() {
                    Some("text") => parts.push(
                        b["text"]
                            .as_str()
                            .ok_or_else(|| {
                                invalid(param, format!("`{param}`: a text block needs `text`"))
                            })?
                            .to_string(),
                    ),
                    other => {
                        return Err(invalid(
                            param,
                            format!("`{param}` takes text blocks here, not {}", kind(other)),
                        ));
                    }
                }
            }
            Ok(parts.join("\n\n"))
        }
        _ => Err(invalid(
            param,
            format!("`{param}` must be a string or a list of text blocks"),
        )),
    }
}

fn kind(t: Option<&str>) -> String {
    t.map_or_else(
        || "blocks without a type".to_string(),
        |t| format!("`{t}` blocks"),
    )
}

/// The chat completion request equivalent to a Messages request.
pub fn to_chat(body: &Json) -> Result<Json, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    if let Some(extra) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            extra,
            format!(
                "`{extra}`: unknown field (this node reads {})",
                FIELDS.join(", ")
            ),
        ));
    }
    let model = obj.get("model").and_then(Json::as_str).ok_or_else(|| {
        invalid(
            "model",
            "`model` is required (a string; `default` is the node's)",
        )
    })?;
    let max_tokens = obj
        .get("max_tokens")
        .and_then(Json::as_u64)
        .ok_or_else(|| {
            invalid(
                "max_tokens",
                "`max_tokens` is required (a positive integer)",
            )
        })?;
    let input = obj
        .get("messages")
        .and_then(Json::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("messages", "`messages` must be a non-empty list"))?;
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("max_tokens".into(), json!(max_tokens));
    let mut msgs = Vec::new();
    if let Some(system) = obj.get("system") {
        let text = text_of(system, "system")?;
        if !text.is_empty() {
            msgs.push(json!({"role": "system", "content": text}));
        }
    }
    for (i, m) in input.iter().enumerate() {
        convert_message(m, i, &mut msgs)?;
    }
    out.insert("messages".into(), Json::Array(msgs));
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = obj.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    match obj.get("stop_sequences") {
        None | Some(Json::Null) => {}
        Some(stop @ Json::Array(_)) => {
            out.insert("stop".into(), stop.clone());
        }
        Some(other) => {
            return Err(invalid(
                "stop_sequences",
                format!("`stop_sequences` must be a list of strings, not {other}"),
            ));
        }
    }
    if obj.get("stream") == Some(&Json::Bool(true)) {
        out.insert("stream".into(), json!(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    } else if let Some(s) = obj.get("stream").filter(|s| !s.is_boolean()) {
        return Err(invalid(
            "stream",
            format!("`stream` must be a boolean, not {s}"),
        ));
    }
    if let Some(tools) = obj.get("tools") {
        out.insert("tools".into(), convert_tools(tools)?);
    }
    let format = match obj.get("output_config") {
        None => None,
        Some(Json::Object(c)) => c.get("format").filter(|f| !f.is_null()),
        Some(other) => {
            return Err(invalid(
                "output_config",
                format!("`output_config` must be an object, not {other}"),
            ));
        }
    };
    if let Some(format) = format {
        if format["type"] != "json_schema" || !format["schema"].is_object() {
            return Err(invalid(
                "output_config",
                "`output_config.format` must be {\"type\": \"json_schema\", \"schema\": {…}}",
            ));
        }
        out.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "output",
                "schema": format["schema"], "strict": true}}),
        );
    }
    if let Some(choice) = obj.get("tool_choice") {
        let (choice, parallel) = convert_tool_choice(choice)?;
        out.insert("tool_choice".into(), choice);
        if !parallel {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    Ok(Json::Object(out))
}

/// Appends the chat messages of Messages entry `i`.
fn convert_message(m: &Json, i: usize, msgs: &mut Vec<Json>) -> Result<(), ApiError> {
    let param = format!("messages[{i}]");
    let role = m["role"].as_str().unwrap_or("");
    if role != "user" && role != "assistant" {
        return Err(invalid(
            &param,
            format!(
                "`{param}.role` must be `user` or `assistant`, not {}",
                m["role"]
            ),
        ));
    }
    let blocks = match &m["content"] {
        Json::String(s) => {
            msgs.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Json::Array(blocks) if !blocks.is_empty() => blocks,
        _ => {
            return Err(invalid(
                &param,
                format!("`{param}.content` must be a string or a non-empty list of content blocks"),
            ));
        }
    };
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for b in blocks {
        match (role, b["type"].as_str()) {
            (_, Some("text")) => texts.push(
                b["text"]
                    .as_str()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        invalid(
                            &param,
                            format!("`{param}`: a text block needs a non-empty `text`"),
                        )
                    })?
                    .to_string(),
            ),
            ("assistant", Some("tool_use")) => {
                let (Some(id), Some(name)) = (b["id"].as_str(), b["name"].as_str()) else {
                    return Err(invalid(
                        &param,
                        format!("`{param}`: a tool_use block needs `id` and `name`"),
                    ));
                };
                let input = if b["input"].is_null() {
                    json!({})
                } else {
                    b["input"].clone()
                };
                calls.push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()}}));
            }
            ("assistant", Some("thinking" | "redacted_thinking")) => {}
            ("user", Some("tool_result")) => {
                let id = b["tool_use_id"].as_str().ok_or_else(|| {
                    invalid(
                        &param,
                        format!("`{param}`: a tool_result block needs `tool_use_id`"),
                    )
                })?;
                let mut text = match &b["content"] {
                    Json::Null => String::new(),
                    c => text_of(c, &param)?,
                };
                if b["is_error"] == true {
                    text = format!("Error: {text}");
                }
                // A tool's result answers the call; it comes before the user's own words.
                msgs.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
            }
            (_, other) => {
                return Err(invalid(
                    &param,
                    format!(
                        "`{param}`: {} are not supported in {role} messages (text{})",
                        kind(other),
                        if role == "user" {
                            " and tool_result"
                        } else {
                            " and tool_use"
                        }
                    ),
                ));
            }
        }
    }
    let text = texts.join("\n\n");
    if role == "assistant" {
        // A turn of thinking blocks only is kept as an empty turn: the order of turns stays.
        let content = if text.is_empty() && !calls.is_empty() {
            Json::Null
        } else {
            json!(text)
        };
        let mut a = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            a["tool_calls"] = Json::Array(calls);
        }
        msgs.push(a);
    } else if !text.is_empty() {
        msgs.push(json!({"role": "user", "content": text}));
    }
    Ok(())
}

fn convert_tools(tools: &Json) -> Result<Json, ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| invalid("tools", "`tools` must be a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        match t.get("type") {
            None | Some(Json::Null) => {}
            Some(Json::String(ty)) if ty == "custom" => {}
            Some(Json::String(ty)) => {
                return Err(ApiError::unsupported(
                    "tools",
                    &format!(
                        "tools[{i}] is Anthropic's server tool `{ty}`; this node runs client tools (name, input_schema)"
                    ),
                ));
            }
            Some(other) => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].type must be a string, not {other}"),
                ));
            }
        }
        let Some(name) = t["name"].as_str() else {
            return Err(invalid("tools", format!("tools[{i}] needs a `name`")));
        };
        let schema = t
            .get("input_schema")
            .cloned()
            .unwrap_or(json!({"type": "object"}));
        let mut f = json!({"name": name, "parameters": schema});
        match t.get("description") {
            None | Some(Json::Null) => {}
            Some(Json::String(d)) => f["description"] = json!(d),
            Some(other) => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].description must be a string, not {other}"),
                ));
            }
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Json::Array(out))
}

/// The chat `tool_choice`, and whether several calls are allowed.
fn convert_tool_choice(choice: &Json) -> Result<(Json, bool), ApiError> {
    let obj = choice.as_object().ok_or_else(|| {
        invalid(
            "tool_choice",
            "`tool_choice` must be an object such as {\"type\": \"auto\"}",
        )
    })?;
    if let Some(extra) = obj
        .keys()
        .find(|k| !["type", "name", "disable_parallel_tool_use"].contains(&k.as_str()))
    {
        return Err(invalid(
            "tool_choice",
            format!(
                "`tool_choice.{extra}`: unknown field (type, name and disable_parallel_tool_use are read)"
            ),
        ));
    }
    let parallel = match obj.get("disable_parallel_tool_use") {
        None | Some(Json::Null) => true,
        Some(Json::Bool(disable)) => !disable,
        Some(other) => {
            return Err(invalid(
                "tool_choice",
                format!("`tool_choice.disable_parallel_tool_use` must be a boolean, not {other}"),
            ));
        }
    };
    if obj.contains_key("name") && choice["type"] != "tool" {
        return Err(invalid(
            "tool_choice",
            "`tool_choice.name` goes with type `tool` only",
        ));
    }
    let c = match choice["type"].as_str() {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match choice["name"].as_str() {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => {
                return Err(invalid(
                    "tool_choice",
                    "`tool_choice` of type `tool` needs a `name`",
                ));
            }
        },
        _ => {
            return Err(invalid(
                "tool_choice",
                "`tool_choice.type` must be `auto`, `any`, `tool` or `none`",
            ));
        }
    };
    Ok((c, parallel))
}

/// Anthropic's `stop_reason` for a chat `finish_reason`.
fn stop_reason(finish: &Json) -> &'static str {
    match finish.as_str() {
        Some("length") => "max_tokens",
        Some("tool_calls") => "tool_use",
        _ => "end_turn",
    }
}

fn message_id(chat_id: &Json) -> String {
    let id = chat_id.as_str().unwrap_or("");
    format!("msg_{}", id.strip_prefix("chatcmpl-").unwrap_or(id))
}

fn usage(u: &Json) -> Json {
    json!({
        "input_tokens": u["prompt_tokens"].as_u64().unwrap_or(0),
        "output_tokens": u["completion_tokens"].as_u64().unwrap_or(0),
        "cache_read_input_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
        "cache_creation_input_tokens": 0,
    })
}

/// The `input` of a tool call's arguments (an object; `{}` for arguments cut short).
fn tool_input(arguments: &Json) -> Json {
    arguments
        .as_str()
        .and_then(|a| serde_json::from_str::<Json>(a).ok())
        .filter(Json::is_object)
        .unwrap_or_else(|| json!({}))
}

/// A whole chat completion as a Messages response.
pub fn message(body: &Json) -> Json {
    let choice = &body["choices"][0];
    let msg = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = msg["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        content.push(json!({"type": "tool_use", "id": call["id"],
            "name": call["function"]["name"], "input": tool_input(&call["function"]["arguments"])}));
    }
    let mut out = json!({
        "id": message_id(&body["id"]),
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": stop_reason(&choice["finish_reason"]),
        "stop_sequence": null,
        "usage": usage(&body["usage"]),
    });
    for ext in ["sources", "tool_results", "served_by"] {
        if let Some(v) = body.get(ext) {
            out[ext] = v.clone();
        }
    }
    out
}

/// What kind of content block is open in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Tool,
}

/// Turns chat completion chunks into Anthropic stream events.
#[derive(Debug, Default)]
pub struct Translator {
    started: bool,
    finished: bool,
    /// The open block and its index.
    open: Option<(usize, Open)>,
    blocks: usize,
    stop_reason: Option<&'static str>,
    usage: Option<Json>,
    sources: Option<Json>,
}

impl Translate for Translator {
    fn feed(&mut self, chunk: Chunk) -> Vec<Named> {
        self.feed_chunk(chunk)
    }
}

impl Translator {
    fn start(&mut self, chunk: &Json, out: &mut Vec<Named>) {
        if self.started {
            return;
        }
        self.started = true;
        out.push((
            "message_start",
            json!({"type": "message_start", "message": {
                "id": message_id(&chunk["id"]), "type": "message", "role": "assistant",
                "model": chunk["model"], "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        ));
    }

    fn close(&mut self, out: &mut Vec<Named>) {
        if let Some((index, _)) = self.open.take() {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open_block(&mut self, kind: Open, block: Json, out: &mut Vec<Named>) -> usize {
        self.close(out);
        let index = self.blocks;
        self.blocks += 1;
        self.open = Some((index, kind));
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn feed_chunk(&mut self, chunk: Chunk) -> Vec<Named> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        let c = match chunk {
            Chunk::Done => {
                self.finish(&mut out);
                return out;
            }
            Chunk::Data(c) => c,
        };
        if let Some(err) = c.get("error") {
            self.finished = true;
            out.push((
                "error",
                json!({"type": "error", "error": {
                "type": error_type_of(err), "message": err["message"]}}),
            ));
            return out;
        }
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        if let Some(s) = c.get("sources") {
            self.sources = Some(s.clone());
        }
        let Some(choice) = c["choices"].get(0) else {
            return out;
        };
        self.start(&c, &mut out);
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let index = match self.open {
                Some((index, Open::Text)) => index,
                _ => self.open_block(Open::Text, json!({"type": "text", "text": ""}), &mut out),
            };
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let f = &call["function"];
            let index = match (call.get("id"), self.open) {
                (Some(id), _) => self.open_block(
                    Open::Tool,
                    json!({"type": "tool_use", "id": id, "name": f["name"], "input": {}}),
                    &mut out,
                ),
                (None, Some((index, Open::Tool))) => index,
                // Arguments without a call: nothing to attach them to.
                (None, _) => continue,
            };
            if let Some(args) = f["arguments"].as_str().filter(|a| !a.is_empty()) {
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": args}}),
                ));
            }
        }
        if !choice["finish_reason"].is_null() {
            self.close(&mut out);
            self.stop_reason = Some(stop_reason(&choice["finish_reason"]));
        }
        out
    }

    fn finish(&mut self, out: &mut Vec<Named>) {
        self.finished = true;
        if !self.started {
            self.start(&json!({}), out);
        }
        self.close(out);
        let mut delta = json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": usage(self.usage.as_ref().unwrap_or(&Json::Null))});
        if let Some(s) = self.sources.take() {
            delta["sources"] = s;
        }
        out.push(("message_delta", delta));
        out.push(("message_stop", json!({"type": "message_stop"})));
    }
}

/// Anthropic's error type for an HTTP status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// The Anthropic type of an OpenAI error object met in a stream.
fn error_type_of(err: &Json) -> &'static str {
    match err["type"].as_str() {
        Some("invalid_request_error") => "invalid_request_error",
        Some("rate_limit_error" | "server_busy") => "overloaded_error",
        _ => "api_error",
    }
}

/// Middleware: an error answered on [`PATH`] (by any layer: auth, body limits, the handler)
/// gets Anthropic's error body; the OpenAI one's message is kept.
pub async fn error_shape(req: Request, next: Next) -> Response {
    if req.uri().path() != PATH {
        return next.run(req).await;
    }
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Error bodies are small; anything larger is not ours and passes as it is.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (status, "error").into_response();
    };
    let message = serde_json::from_slice::<Json>(&bytes)
        .ok()
        .and_then(|b| b["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    let body = json!({"type": "error", "error": {"type": error_type(status), "message": message}});
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, HttpBody::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(events: &[Named]) -> Vec<&'static str> {
        events.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn a_request_with_system_blocks_tools_and_results_becomes_a_chat_request() {
        let body = json!({
            "model": "default", "max_tokens": 64, "temperature": 0.5, "top_k": 4,
            "stop_sequences": ["END"], "stream": true,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            "tools": [{"name": "get_weather", "description": "Weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                    {"type": "text", "text": "And tomorrow?"}]}
            ]
        });
        let chat = to_chat(&body).unwrap();
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "Be brief.\n\nBe kind."})
        );
        assert_eq!(
            chat["messages"][2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(chat["messages"][2]["content"], "Let me look.");
        assert_eq!(
            chat["messages"][3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"})
        );
        assert_eq!(
            chat["messages"][4],
            json!({"role": "user", "content": "And tomorrow?"})
        );
        assert_eq!(
            chat["tools"][0]["function"]["parameters"]["properties"]["city"]["type"],
            "string"
        );
        assert_eq!(chat["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(chat["parallel_tool_calls"], false);
        assert_eq!(
            (chat["stop"].clone(), chat["top_k"].clone()),
            (json!(["END"]), json!(4))
        );
        assert_eq!(chat["stream_options"]["include_usage"], true);
        // It is a valid chat request.
        serde_json::from_value::<ChatRequest>(chat).unwrap();
        // Structured output, and the fields that change nothing here.
        let body = json!({"model": "m", "max_tokens": 5, "thinking": {"type": "adaptive"},
            "speed": "fast", "cache_control": {"type": "ephemeral"},
            "output_config": {"effort": "low", "format": {"type": "json_schema",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
            "messages": [{"role": "user", "content": "x"}]});
        let chat = to_chat(&body).unwrap();
        assert_eq!(chat["response_format"]["type"], "json_schema");
        assert_eq!(
            chat["response_format"]["json_schema"]["schema"]["properties"]["a"]["type"],
            "integer"
        );
        serde_json::from_value::<ChatRequest>(chat).unwrap();
    }

    #[test]
    fn bad_requests_are_refused_with_the_field_named() {
        let ok =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
        assert!(to_chat(&ok).is_ok());
        let cases = [
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                "max_tokens",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": []}),
                "messages",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages[0]",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
                "messages[0]",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "bogus": 1, "messages": [{"role": "user", "content": "x"}]}),
                "bogus",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "w"}], "messages": [{"role": "user", "content": "x"}]}),
                "tools",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "tool_choice": {"type": "maybe"}, "messages": [{"role": "user", "content": "x"}]}),
                "tool_choice",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "output_config": {"format": {"type": "xml"}}, "messages": [{"role": "user", "content": "x"}]}),
                "output_config",
            ),
            (json!([1, 2]), ""),
        ];
        for (body, param) in cases {
            let e = to_chat(&body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            if !param.is_empty() {
                assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            }
        }
    }

    #[test]
    fn a_whole_answer_becomes_a_message() {
        let body = json!({"id": "chatcmpl-abc", "model": "m", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "Sure.", "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 3}},
            "sources": [{"source": "s"}]});
        let m = message(&body);
        assert_eq!(m["id"], "msg_abc");
        assert_eq!(m["content"][0], json!({"type": "text", "text": "Sure."}));
        assert_eq!(
            m["content"][1],
            json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}})
        );
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(
            (
                m["usage"]["input_tokens"].clone(),
                m["usage"]["output_tokens"].clone()
            ),
            (json!(10), json!(4))
        );
        assert_eq!(m["usage"]["cache_read_input_tokens"], 3);
        assert_eq!(m["sources"][0]["source"], "s");
        let cut = json!({"id": "chatcmpl-x", "choices": [{"message": {"content": "abc"}, "finish_reason": "length"}]});
        assert_eq!(message(&cut)["stop_reason"], "max_tokens");
    }

    #[test]
    fn chunks_become_anthropic_events_in_order() {
        let chunk = |delta: Json, finish: Json| {
            Chunk::Data(json!({"id": "chatcmpl-1", "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
        };
        let mut t = Translator::default();
        let mut all = Vec::new();
        for c in [
            chunk(json!({"role": "assistant", "content": "Hel"}), Json::Null),
            chunk(json!({"content": "lo"}), Json::Null),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": ""}}]}),
                Json::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}),
                Json::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
                Json::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
            Chunk::Data(json!({"id": "chatcmpl-1", "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": 5}})),
            Chunk::Done,
        ] {
            all.extend(t.feed(c));
        }
        assert_eq!(
            names(&all),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(all[1].1["content_block"]["type"], "text");
        assert_eq!(all[3].1["delta"]["text"], "lo");
        assert_eq!(
            all[5].1["content_block"],
            json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {}})
        );
        assert_eq!(
            (
                all[5].1["index"].clone(),
                all[7].1["delta"]["partial_json"].clone()
            ),
            (json!(1), json!("1}"))
        );
        assert_eq!(all[9].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(all[9].1["usage"]["output_tokens"], 5);
        assert!(t.feed(Chunk::Done).is_empty(), "nothing after the end");
    }

    #[test]
    fn a_stream_error_is_an_error_event() {
        let mut t = Translator::default();
        let e = t.feed(Chunk::Data(
            json!({"error": {"message": "boom", "type": "server_error"}}),
        ));
        assert_eq!(names(&e), ["error"]);
        assert_eq!(
            e[0].1["error"],
            json!({"type": "api_error", "message": "boom"})
        );
        assert!(t.feed(Chunk::Done).is_empty());
    }
}
