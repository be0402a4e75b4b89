//! `POST /v1/responses` (and `GET`/`DELETE /v1/responses/{id}`): OpenAI's Responses API on the
//! one chat pipeline.
//!
//! A request is translated into a chat completion request ([`to_chat`]: `instructions`, the
//! input items — messages, `function_call`, `function_call_output` — function tools,
//! `tool_choice`, `text.format`, `max_output_tokens`) after the stored conversation of its
//! `previous_response_id`, and runs through [`chat::chat`] as `/v1/chat/completions` does
//! (routing, payment, retrieval). The answer comes back as a `response` object, or as the
//! Responses stream events ([`Translator`]: `response.created`, `response.output_item.added`,
//! `response.output_text.delta`, `response.function_call_arguments.delta`, … ending in
//! `response.completed`). Unless `store` is false, the conversation so far (without the
//! instructions, which OpenAI does not carry over either) and the response are kept in
//! `<data_dir>/responses/<id>.json` ([`Store`]: at most [`MAX_STORED`] files, the oldest
//! removed first).

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json, json};

use super::billing::Caller;
use super::chat::{self, ChatReply, Chunk, Named, Translate};
use super::error::{ApiError, Body, Fields, parse_body};
use super::now_secs;
use crate::agent::Shared;
use crate::agent::types::ChatRequest;

/// Stored responses kept at most; the oldest go first.
pub const MAX_STORED: usize = 1000;
/// The largest stored conversation, in bytes of JSON.
const MAX_STORED_BYTES: usize = 8 << 20;

/// Fields of a Responses request this node reads. `metadata` is stored and echoed; `user`,
/// `safety_identifier`, `prompt_cache_key`, `prompt_cache_retention`, `service_tier`,
/// `truncation`, `include`, `reasoning`, `stream_options` and `max_tool_calls` have no effect
/// here; `background`, `conversation` and `prompt` are refused when used.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "store",
    "stream",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
    "truncation",
    "include",
    "reasoning",
    "stream_options",
    "max_tool_calls",
    "background",
    "conversation",
    "prompt",
    "top_logprobs",
];

/// A Responses request body as JSON (checked field by field in [`to_chat`]).
#[derive(Debug, serde::Deserialize)]
#[serde(transparent)]
pub struct ResponsesBody(Json);

impl Fields for ResponsesBody {
    const FIELDS: &'static [&'static str] = FIELDS;
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// Stored responses, one JSON file each under `<data_dir>/responses`.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(data_dir: &Path) -> Store {
        Store {
            dir: data_dir.join("responses"),
        }
    }

    fn path(&self, id: &str) -> Result<PathBuf, ApiError> {
        let ok = id.starts_with("resp_")
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(ApiError::not_found(
                "previous_response_id",
                format!("there is no response {id:?}"),
            ));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    /// The stored record of `id`: `{"response": …, "conversation": [chat messages]}`.
    pub fn load(&self, id: &str) -> Result<Json, ApiError> {
        let path = self.path(id)?;
        let bytes = std::fs::read(&path).map_err(|_| {
            ApiError::not_found(
                "previous_response_id",
                format!("there is no stored response {id} (it was never stored, was deleted, or was made with store: false)"),
            )
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::internal(format!("stored response {id} is unreadable: {e}")))
    }

    /// Stores a record; a failure is logged, not the client's problem.
    pub fn save(&self, id: &str, record: &Json) {
        let result = (|| -> std::io::Result<()> {
            let bytes = serde_json::to_vec(record)?;
            if bytes.len() > MAX_STORED_BYTES {
                return Err(std::io::Error::other("the conversation is over 8 MiB"));
            }
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(format!("{id}.json"));
            let tmp = self.dir.join(format!(".{id}.tmp"));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)?;
            self.prune()
        })();
        if let Err(e) = result {
            tracing::warn!(%id, error = %e, "could not store a response");
        }
    }

    /// Removes the oldest files beyond [`MAX_STORED`].
    fn prune(&self) -> std::io::Result<()> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= MAX_STORED {
            return Ok(());
        }
        files.sort();
        for (_, path) in &files[..files.len() - MAX_STORED] {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<(), ApiError> {
        let path = self.path(id)?;
        std::fs::remove_file(&path)
            .map_err(|_| ApiError::not_found("id", format!("there is no stored response {id}")))
    }
}

/// Text of a message's content: a string, or `input_text`/`output_text` parts.
fn content_text(content: &Json, param: &str) -> Result<String, ApiError> {
    match content {
        Json::String(s) => Ok(s.clone()),
        Json::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                match p["type"].as_str() {
                    Some("input_text" | "output_text" | "text") => match p.get("text") {
                        None => {}
                        Some(Json::String(t)) => out.push(t.clone()),
                        Some(other) => {
                            return Err(invalid(
                                param,
                                format!("`{param}`: a part's `text` must be a string, not {other}"),
                            ));
                        }
                    },
                    Some(other) => {
                        return Err(ApiError::unsupported(
                            param,
                            &format!("`{other}` content is not supported here (text only)"),
                        ));
                    }
                    None => {
                        return Err(invalid(param, format!("`{param}`: a part needs a `type`")));
                    }
                }
            }
            Ok(out.join("\n"))
        }
        _ => Err(invalid(
            param,
            format!("`{param}.content` must be a string or a list of parts"),
        )),
    }
}

/// The chat messages of the `input` field.
fn input_messages(input: &Json) -> Result<Vec<Json>, ApiError> {
    let items = match input {
        Json::String(s) => return Ok(vec![json!({"role": "user", "content": s})]),
        Json::Array(items) => items,
        _ => {
            return Err(invalid(
                "input",
                "`input` must be a string or a list of items",
            ));
        }
    };
    let mut msgs: Vec<Json> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let param = format!("input[{i}]");
        let kind = match item.get("type") {
            None => "message",
            Some(Json::String(t)) => t.as_str(),
            Some(other) => {
                return Err(invalid(
                    &param,
                    format!("`{param}.type` must be a string, not {other}"),
                ));
            }
        };
        match kind {
            "message" => {
                let role = match item["role"].as_str() {
                    Some("developer" | "system") => "system",
                    Some("user") => "user",
                    Some("assistant") => "assistant",
                    _ => {
                        return Err(invalid(
                            &param,
                            format!("`{param}.role` must be user, assistant, system or developer"),
                        ));
                    }
                };
                let text = content_text(&item["content"], &param)?;
                msgs.push(json!({"role": role, "content": text}));
            }
            "function_call" => {
                let (Some(id), Some(name)) = (item["call_id"].as_str(), item["name"].as_str())
                else {
                    return Err(invalid(
                        &param,
                        format!("`{param}`: a function_call needs `call_id` and `name`"),
                    ));
                };
                let arguments = match item.get("arguments") {
                    None | Some(Json::Null) => "{}",
                    Some(Json::String(a)) => a.as_str(),
                    Some(other) => {
                        return Err(invalid(
                            &param,
                            format!("`{param}.arguments` must be a JSON string, not {other}"),
                        ));
                    }
                };
                let call = json!({"id": id, "type": "function", "function": {"name": name,
                    "arguments": arguments}});
                // Calls in a row are one assistant turn.
                match msgs.last_mut() {
                    Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => msgs
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let Some(id) = item["call_id"].as_str() else {
                    return Err(invalid(
                        &param,
                        format!("`{param}`: a function_call_output needs `call_id`"),
                    ));
                };
                let output = match &item["output"] {
                    Json::String(s) => s.clone(),
                    other => content_text(other, &param)?,
                };
                msgs.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
            }
            "reasoning" => {}
            other => {
                return Err(ApiError::unsupported(
                    &param,
                    &format!(
                        "`{other}` items are not supported (message, function_call and function_call_output are)"
                    ),
                ));
            }
        }
    }
    Ok(msgs)
}

/// `previous_response_id` and `store` (default true), type-checked: a wrong type is refused
/// rather than read as absent.
fn previous_and_store(body: &Json) -> Result<(Option<&str>, bool), ApiError> {
    let previous = match body.get("previous_response_id") {
        None | Some(Json::Null) => None,
        Some(Json::String(id)) => Some(id.as_str()),
        Some(other) => {
            return Err(invalid(
                "previous_response_id",
                format!("`previous_response_id` must be a response id (a string), not {other}"),
            ));
        }
    };
    let store = match body.get("store") {
        None | Some(Json::Null) => true,
        Some(Json::Bool(b)) => *b,
        Some(other) => {
            return Err(invalid(
                "store",
                format!("`store` must be a boolean, not {other}"),
            ));
        }
    };
    Ok((previous, store))
}

/// The chat request for a Responses request, given the stored conversation it continues;
/// also returns the conversation this request adds (input messages, without instructions).
pub fn to_chat(body: &Json, history: &[Json]) -> Result<(Json, Vec<Json>), ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    for (key, refused) in [
        (
            "background",
            "background responses are not offered; leave `background` out",
        ),
        (
            "conversation",
            "conversations objects are not offered; use `previous_response_id`",
        ),
        (
            "prompt",
            "stored prompt templates are not offered; send `instructions` and `input`",
        ),
    ] {
        if obj
            .get(key)
            .is_some_and(|v| !v.is_null() && *v != json!(false))
        {
            return Err(ApiError::unsupported(key, refused));
        }
    }
    let model = obj.get("model").and_then(Json::as_str).ok_or_else(|| {
        invalid(
            "model",
            "`model` is required (a string; `default` is the node's)",
        )
    })?;
    let input = obj
        .get("input")
        .ok_or_else(|| invalid("input", "`input` is required"))?;
    let added = input_messages(input)?;
    if added.is_empty() && history.is_empty() {
        return Err(invalid("input", "`input` is empty"));
    }
    let mut messages = Vec::new();
    if let Some(instructions) = obj.get("instructions").filter(|v| !v.is_null()) {
        let text = instructions
            .as_str()
            .ok_or_else(|| invalid("instructions", "`instructions` must be a string"))?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    messages.extend(history.iter().cloned());
    messages.extend(added.iter().cloned());
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Json::Array(messages));
    for (from, to) in [
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
    ] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    match obj.get("stream") {
        None | Some(Json::Null | Json::Bool(false)) => {}
        Some(Json::Bool(true)) => {
            out.insert("stream".into(), json!(true));
            out.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Some(other) => {
            return Err(invalid(
                "stream",
                format!("`stream` must be a boolean, not {other}"),
            ));
        }
    }
    if let Some(tools) = obj.get("tools").filter(|t| !t.is_null()) {
        let list = tools
            .as_array()
            .ok_or_else(|| invalid("tools", "`tools` must be a list"))?;
        let mut chat_tools = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            if t["type"] != "function" {
                return Err(ApiError::unsupported(
                    "tools",
                    &format!(
                        "tools[{i}] is a `{}` tool; this node runs function tools",
                        t["type"].as_str().unwrap_or("?")
                    ),
                ));
            }
            let mut f = json!({"name": t["name"], "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
            if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
                f["description"] = d.clone();
            }
            chat_tools.push(json!({"type": "function", "function": f}));
        }
        out.insert("tools".into(), Json::Array(chat_tools));
    }
    if let Some(choice) = obj.get("tool_choice").filter(|c| !c.is_null()) {
        let c = match choice {
            Json::String(s) if ["auto", "none", "required"].contains(&s.as_str()) => choice.clone(),
            Json::Object(o) if o.get("type") == Some(&json!("function")) => {
                json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Json::Null)}})
            }
            _ => {
                return Err(invalid(
                    "tool_choice",
                    "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"name\": …}",
                ));
            }
        };
        out.insert("tool_choice".into(), c);
    }
    let text = match obj.get("text") {
        None | Some(Json::Null) => None,
        Some(Json::Object(t)) => t.get("format").filter(|f| !f.is_null()),
        Some(other) => {
            return Err(invalid(
                "text",
                format!(
                    "`text` must be an object such as {{\"format\": {{\"type\": \"text\"}}}}, not {other}"
                ),
            ));
        }
    };
    if let Some(format) = text {
        match format["type"].as_str() {
            Some("text") => {}
            Some("json_object") => {
                out.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                out.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {
                        "name": format.get("name").cloned().unwrap_or(json!("output")),
                        "schema": format["schema"], "strict": format.get("strict").cloned().unwrap_or(json!(true))}}),
                );
            }
            _ => {
                return Err(invalid(
                    "text",
                    "`text.format.type` must be text, json_object or json_schema",
                ));
            }
        }
    }
    Ok((Json::Object(out), added))
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// The request's settings a response echoes.
fn echo(body: &Json, id: &str, model: &Json, created: u64) -> Json {
    let get = |k: &str, default: Json| {
        body.get(k)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "error": null,
        "incomplete_details": null,
        "instructions": get("instructions", Json::Null),
        "max_output_tokens": get("max_output_tokens", Json::Null),
        "model": model,
        "output": [],
        "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
        "previous_response_id": get("previous_response_id", Json::Null),
        "store": get("store", json!(true)),
        "temperature": get("temperature", Json::Null),
        "top_p": get("top_p", Json::Null),
        "text": get("text", json!({"format": {"type": "text"}})),
        "tool_choice": get("tool_choice", json!("auto")),
        "tools": get("tools", json!([])),
        "truncation": "disabled",
        "metadata": get("metadata", json!({})),
        "usage": null,
    })
}

fn usage(u: &Json) -> Json {
    let input = u["prompt_tokens"].as_u64().unwrap_or(0);
    let output = u["completion_tokens"].as_u64().unwrap_or(0);
    json!({"input_tokens": input,
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)},
        "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output})
}

fn text_item(id: &str, text: &str, status: &str) -> Json {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, call_id: &Json, name: &Json, arguments: &str, status: &str) -> Json {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status})
}

/// Completes `response` from the answer's output items, finish reason and usage.
fn complete(response: &mut Json, output: Vec<Json>, finish: &Json, u: &Json) {
    let cut = finish == "length";
    response["status"] = json!(if cut { "incomplete" } else { "completed" });
    if cut {
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    response["output"] = Json::Array(output);
    response["usage"] = usage(u);
}

/// The chat messages an answer adds to the conversation.
fn answer_messages(output: &[Json]) -> Vec<Json> {
    let text: String = output
        .iter()
        .filter(|i| i["type"] == "message")
        .filter_map(|i| i["content"][0]["text"].as_str())
        .collect();
    let calls: Vec<Json> = output
        .iter()
        .filter(|i| i["type"] == "function_call")
        .map(|i| {
            json!({"id": i["call_id"], "type": "function",
            "function": {"name": i["name"], "arguments": i["arguments"]}})
        })
        .collect();
    let mut m = json!({"role": "assistant", "content": if text.is_empty() { Json::Null } else { json!(text) }});
    if !calls.is_empty() {
        m["tool_calls"] = Json::Array(calls);
    }
    vec![m]
}

/// What one request needs to finish its response (and store it).
struct Finish {
    store: Option<(Store, Vec<Json>)>,
    response: Json,
}

impl Finish {
    fn done(mut self, output: Vec<Json>, finish: &Json, u: &Json) -> Json {
        complete(&mut self.response, output.clone(), finish, u);
        if let Some((store, mut conversation)) = self.store.take() {
            conversation.extend(answer_messages(&output));
            let id = self.response["id"].as_str().unwrap_or_default().to_string();
            store.save(
                &id,
                &json!({"response": self.response, "conversation": conversation}),
            );
        }
        self.response
    }
}

/// `POST /v1/responses`
pub async fn create(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    Body(ResponsesBody(body)): Body<ResponsesBody>,
) -> Result<Response, ApiError> {
    let store = Store::new(&st.info.data_dir);
    let (previous, keep) = previous_and_store(&body)?;
    let history = match previous {
        Some(prev) => {
            let record = store.load(prev)?;
            record["conversation"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let (raw, added) = to_chat(&body, &history)?;
    let bytes = serde_json::to_vec(&raw).map_err(|e| ApiError::internal(e.to_string()))?;
    let req: ChatRequest = parse_body(&bytes)?;
    let id = new_id("resp");
    let mut conversation = history;
    conversation.extend(added);
    let model = json!(if req.model == "default" {
        st.config.models.chat.clone()
    } else {
        req.model.clone()
    });
    let finish = Finish {
        store: keep.then_some((store, conversation)),
        response: echo(&body, &id, &model, now_secs()),
    };
    Ok(match chat::chat(st, caller, req, raw).await? {
        ChatReply::Whole(answer, served) => {
            let choice = &answer["choices"][0];
            let msg = &choice["message"];
            let mut output = Vec::new();
            if let Some(text) = msg["content"].as_str().filter(|t| !t.is_empty()) {
                output.push(text_item(&new_id("msg"), text, "completed"));
            }
            for call in msg["tool_calls"].as_array().into_iter().flatten() {
                let args = call["function"]["arguments"].as_str().unwrap_or_default();
                output.push(call_item(
                    &new_id("fc"),
                    &call["id"],
                    &call["function"]["name"],
                    args,
                    "completed",
                ));
            }
            let mut response = finish.done(output, &choice["finish_reason"], &answer["usage"]);
            if let Some(s) = answer.get("sources") {
                response["sources"] = s.clone();
            }
            chat::served_header(axum::Json(response).into_response(), served)
        }
        ChatReply::Stream(chunks, served) => {
            chat::served_header(chat::named_sse(chunks, Translator::new(finish)), served)
        }
    })
}

/// `GET /v1/responses/{id}`
pub async fn get(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let record = Store::new(&st.info.data_dir).load(&id)?;
    Ok(axum::Json(record["response"].clone()).into_response())
}

/// `DELETE /v1/responses/{id}`
pub async fn delete(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    Store::new(&st.info.data_dir).delete(&id)?;
    Ok(axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
}

/// The item being streamed.
enum Item {
    Text {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: Json,
        name: Json,
        args: String,
    },
}

/// Turns chat completion chunks into Responses stream events, and finishes the response.
pub struct Translator {
    finish: Option<Finish>,
    seq: u64,
    started: bool,
    open: Option<Item>,
    output: Vec<Json>,
    reason: Json,
    usage: Json,
    sources: Option<Json>,
}

impl Translate for Translator {
    fn feed(&mut self, chunk: Chunk) -> Vec<Named> {
        self.feed_chunk(chunk)
    }
}

impl Translator {
    fn new(finish: Finish) -> Translator {
        Translator {
            finish: Some(finish),
            seq: 0,
            started: false,
            open: None,
            output: Vec::new(),
            reason: Json::Null,
            usage: Json::Null,
            sources: None,
        }
    }

    fn push(&mut self, out: &mut Vec<Named>, name: &'static str, mut data: Json) {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push((name, data));
    }

    fn start(&mut self, out: &mut Vec<Named>) {
        if self.started {
            return;
        }
        self.started = true;
        let response = self
            .finish
            .as_ref()
            .map(|f| f.response.clone())
            .unwrap_or_default();
        self.push(out, "response.created", json!({"response": response}));
        self.push(out, "response.in_progress", json!({"response": response}));
    }

    fn close(&mut self, out: &mut Vec<Named>) {
        let index = self.output.len();
        match self.open.take() {
            None => {}
            Some(Item::Text { id, text }) => {
                self.push(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index,
                    "content_index": 0, "text": text, "logprobs": []}),
                );
                self.push(out, "response.content_part.done", json!({"item_id": id, "output_index": index,
                    "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}));
                let item = text_item(&id, &text, "completed");
                self.push(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
            Some(Item::Call {
                id,
                call_id,
                name,
                args,
            }) => {
                self.push(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id,
                    "output_index": index, "name": name, "arguments": args}),
                );
                let item = call_item(&id, &call_id, &name, &args, "completed");
                self.push(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
        }
    }

    fn feed_chunk(&mut self, chunk: Chunk) -> Vec<Named> {
        let mut out = Vec::new();
        let Some(_) = self.finish else {
            return out;
        };
        let c = match chunk {
            Chunk::Done => {
                self.end(&mut out);
                return out;
            }
            Chunk::Data(c) => c,
        };
        if let Some(err) = c.get("error") {
            self.start(&mut out);
            let mut response = self.finish.take().map(|f| f.response).unwrap_or_default();
            response["status"] = json!("failed");
            response["error"] = json!({"code": err.get("code").cloned().unwrap_or(json!("server_error")), "message": err["message"]});
            self.push(&mut out, "response.failed", json!({"response": response}));
            return out;
        }
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            self.usage = u.clone();
        }
        if let Some(s) = c.get("sources") {
            self.sources = Some(s.clone());
        }
        let Some(choice) = c["choices"].get(0) else {
            return out;
        };
        self.start(&mut out);
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some(Item::Text { .. })) {
                self.close(&mut out);
                let id = new_id("msg");
                let index = self.output.len();
                self.push(&mut out, "response.output_item.added", json!({"output_index": index,
                    "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
                self.push(&mut out, "response.content_part.added", json!({"item_id": id, "output_index": index,
                    "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}));
                self.open = Some(Item::Text {
                    id,
                    text: String::new(),
                });
            }
            let index = self.output.len();
            if let Some(Item::Text { id, text: all }) = &mut self.open {
                all.push_str(text);
                let id = id.clone();
                self.push(
                    &mut out,
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": index,
                    "content_index": 0, "delta": text, "logprobs": []}),
                );
            }
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let f = &call["function"];
            if let Some(call_id) = call.get("id") {
                self.close(&mut out);
                let id = new_id("fc");
                let index = self.output.len();
                let item = call_item(&id, call_id, &f["name"], "", "in_progress");
                self.push(
                    &mut out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                self.open = Some(Item::Call {
                    id,
                    call_id: call_id.clone(),
                    name: f["name"].clone(),
                    args: String::new(),
                });
            }
            let index = self.output.len();
            if let (Some(Item::Call { id, args, .. }), Some(delta)) = (
                &mut self.open,
                f["arguments"].as_str().filter(|a| !a.is_empty()),
            ) {
                args.push_str(delta);
                let id = id.clone();
                self.push(
                    &mut out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id,
                    "output_index": index, "delta": delta}),
                );
            }
        }
        if !choice["finish_reason"].is_null() {
            self.close(&mut out);
            self.reason = choice["finish_reason"].clone();
        }
        out
    }

    fn end(&mut self, out: &mut Vec<Named>) {
        self.start(out);
        self.close(out);
        let Some(finish) = self.finish.take() else {
            return;
        };
        let mut response = finish.done(std::mem::take(&mut self.output), &self.reason, &self.usage);
        if let Some(s) = self.sources.take() {
            response["sources"] = s;
        }
        let name = if response["status"] == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.push(out, name, json!({"response": response}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_instructions_and_history_become_chat_messages() {
        let body = json!({"model": "default", "instructions": "Be brief.", "max_output_tokens": 20,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"a\":1}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"}]});
        let history = vec![
            json!({"role": "user", "content": "before"}),
            json!({"role": "assistant", "content": "ok"}),
        ];
        let (chat, added) = to_chat(&body, &history).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1]["content"], "before");
        assert_eq!(m[3], json!({"role": "user", "content": "hi"}));
        assert_eq!(m[4]["tool_calls"].as_array().unwrap().len(), 2, "{}", m[4]);
        assert_eq!(
            m[6],
            json!({"role": "tool", "tool_call_id": "c2", "content": "two"})
        );
        assert_eq!(
            added.len(),
            4,
            "the instructions are not part of the conversation"
        );
        assert_eq!(chat["max_tokens"], 20);
        assert_eq!(chat["response_format"]["json_schema"]["name"], "x");
        assert_eq!(chat["tool_choice"]["function"]["name"], "f");
        serde_json::from_value::<ChatRequest>(chat).unwrap();
    }

    #[test]
    fn refused_and_malformed_requests_name_the_field() {
        let cases = [
            (json!({"model": "m"}), "input"),
            (json!({"input": "x"}), "model"),
            (
                json!({"model": "m", "input": "x", "background": true}),
                "background",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "tools",
            ),
            (
                json!({"model": "m", "input": [{"type": "input_image"}]}),
                "input[0]",
            ),
            (
                json!({"model": "m", "input": [{"role": "robot", "content": "x"}]}),
                "input[0]",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}),
                "text",
            ),
            (json!({"model": "m", "input": []}), "input"),
        ];
        for (body, param) in cases {
            let e = to_chat(&body, &[]).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
    }

    #[test]
    fn previous_response_id_and_store_of_the_wrong_type_are_refused() {
        assert_eq!(previous_and_store(&json!({})).unwrap(), (None, true));
        assert_eq!(
            previous_and_store(&json!({"previous_response_id": "resp_1", "store": false})).unwrap(),
            (Some("resp_1"), false)
        );
        for (body, param) in [
            (json!({"previous_response_id": 7}), "previous_response_id"),
            (json!({"store": "no"}), "store"),
        ] {
            let e = previous_and_store(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn a_stream_becomes_response_events_and_a_stored_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let finish = Finish {
            store: Some((
                Store::new(dir.path()),
                vec![json!({"role": "user", "content": "q"})],
            )),
            response: echo(&json!({}), "resp_abc", &json!("m"), 1),
        };
        let chunk = |delta: Json, finish: Json| {
            Chunk::Data(json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
        };
        let mut t = Translator::new(finish);
        let mut all = Vec::new();
        for c in [
            chunk(json!({"role": "assistant", "content": "Hi"}), Json::Null),
            chunk(json!({"content": " there"}), Json::Null),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]}),
                Json::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                Json::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
            Chunk::Data(
                json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}),
            ),
            Chunk::Done,
        ] {
            all.extend(t.feed(c));
        }
        let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, (_, d))| d["sequence_number"] == i as u64)
        );
        let done = &all.last().unwrap().1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "Hi there");
        assert_eq!(done["output"][1]["arguments"], "{}");
        assert_eq!(done["usage"]["total_tokens"], 8);
        let record = store.load("resp_abc").unwrap();
        assert_eq!(record["response"]["id"], "resp_abc");
        let conv = record["conversation"].as_array().unwrap();
        assert_eq!(conv[1]["content"], "Hi there");
        assert_eq!(conv[1]["tool_calls"][0]["id"], "call_1");
        store.delete("resp_abc").unwrap();
        assert!(store.load("resp_abc").is_err());
        assert!(store.load("../../etc/passwd").is_err());
    }
}
