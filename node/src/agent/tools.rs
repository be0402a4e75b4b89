//! Tool calling: the prompt format, the constraint that enforces a call, parsing the model's
//! answer, and the tools the node executes itself.
//!
//! **Prompt format.** When the model's chat template renders `tools` itself (it has a tool-use
//! template), the tools go to the template and the model's own format is parsed
//! (`<tool_call>{"name": .., "arguments": {..}}</tool_call>`, as Qwen and Hermes write it).
//! Otherwise (SmolLM2, the default) the tools are described in a system message:
//!
//! ```text
//! You can call these tools: <one JSON line per tool: {"name","description","parameters"}>
//! To call tools, answer with only this JSON object and nothing else:
//! {"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}
//! ```
//!
//! and an answer that is exactly such an object is read as tool calls; anything else is text.
//! Earlier assistant tool calls are rendered in the same JSON form, and `tool` messages as
//! `tool` turns. With `tool_choice` `required` or a named function the answer is *enforced*
//! by constrained decoding against a schema built from the tools' parameter schemas
//! ([`call_schema`]), so even a tiny model produces a valid call.
//!
//! **Node-executed tools** (`[[tools]]` in gaia.toml): when the model calls one, the node POSTs
//! the arguments (a JSON object) to its URL, after resolving the host and refusing private,
//! loopback, link-local and unspecified addresses unless the host is in
//! `tools_policy.allow_hosts`; the connection is pinned to the checked address. The call has a
//! timeout and a response size cap; the response body (or the error) goes back to the model as a
//! `tool` message, and generation continues, up to `agent.max_tool_rounds`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use gaia_inference::template::{ChatMessage, FunctionCall, MessageContent, ToolCall};
use serde_json::{Value as Json, json};

use super::error::ApiError;
use super::types::{MAX_TOOLS, ToolChoice, ToolSpec};
use crate::config::{ToolConfig, ToolsPolicy, valid_function_name};

/// Most calls in one answer.
pub const MAX_PARALLEL_CALLS: usize = 8;

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// JSON schema of the arguments.
    pub parameters: Json,
    /// Executed by the node (from the config) rather than the client.
    pub node: bool,
}

impl Tool {
    /// The OpenAI form, for templates.
    pub fn openai(&self) -> Json {
        json!({"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}})
    }
}

/// The request's tools followed by the node's own (`[[tools]]`, then the MCP servers'; a
/// request tool shadows a node tool of the same name).
pub fn collect(request: Option<&[ToolSpec]>, node: &[Tool]) -> Result<Vec<Tool>, ApiError> {
    let request = request.unwrap_or_default();
    if request.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools"),
        ));
    }
    let mut tools = Vec::new();
    for (i, spec) in request.iter().enumerate() {
        let param = format!("tools[{i}]");
        if spec.kind != "function" {
            return Err(ApiError::invalid(
                &param,
                "only `function` tools are supported",
            ));
        }
        let f = &spec.function;
        if !valid_function_name(&f.name) {
            return Err(ApiError::invalid(
                &param,
                format!("tool name {:?} must be 1 to 64 of [A-Za-z0-9_-]", f.name),
            ));
        }
        if tools.iter().any(|t: &Tool| t.name == f.name) {
            return Err(ApiError::invalid(
                &param,
                format!("tool {:?} is given twice", f.name),
            ));
        }
        let parameters = f
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if !parameters.is_object() {
            return Err(ApiError::invalid(
                &param,
                "`parameters` must be a JSON schema object",
            ));
        }
        tools.push(Tool {
            name: f.name.clone(),
            description: f.description.clone().unwrap_or_default(),
            parameters,
            node: false,
        });
    }
    for t in node {
        if !tools.iter().any(|x| x.name == t.name) {
            tools.push(Tool {
                node: true,
                ..t.clone()
            });
        }
    }
    Ok(tools)
}

/// The system message describing `tools` in the documented prompt format.
pub fn system_prompt(tools: &[Tool]) -> String {
    let mut s = String::from("You can call these tools:\n");
    for t in tools {
        let line =
            json!({"name": t.name, "description": t.description, "parameters": t.parameters});
        s.push_str(&line.to_string());
        s.push('\n');
    }
    s.push_str(
        "To call tools, answer with only this JSON object and nothing else:\n\
         {\"tool_calls\": [{\"name\": \"<tool name>\", \"arguments\": {<arguments>}}]}\n\
         Otherwise answer normally.",
    );
    s
}

/// The schema an enforced answer must follow: the call object of the prompt format, each
/// tool's arguments closed to its declared parameters ([`closed`]), one call for a named
/// choice or `parallel_tool_calls: false`, and fixed separators, so that a forced call costs
/// as few tokens as it can and fits a small `max_tokens`.
pub fn call_schema(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Json {
    let named = matches!(choice, ToolChoice::Named(_));
    let allowed: Vec<&Tool> = match choice {
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    };
    let variants: Vec<Json> = allowed
        .iter()
        .map(|t| {
            json!({"type": "object",
                "properties": {"name": {"const": t.name}, "arguments": closed(&t.parameters)},
                "required": ["name", "arguments"], "additionalProperties": false})
        })
        .collect();
    let max = if parallel && !named {
        MAX_PARALLEL_CALLS
    } else {
        1
    };
    json!({"type": "object",
        "properties": {"tool_calls": {"type": "array", "minItems": 1, "maxItems": max,
            "items": {"anyOf": variants}}},
        "required": ["tool_calls"], "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ",
            "key_separator": ": "}})
}

/// `schema` with every object that declares `properties` closed to them
/// (`additionalProperties: false`) unless it says what else it allows. JSON Schema admits
/// undeclared properties by default, and a small model under a constraint fills its budget
/// with them (`"description": ...`, even `"required": [...]` inside the arguments).
pub fn closed(schema: &Json) -> Json {
    fn walk(node: &mut Json, depth: usize) {
        if depth > 32 {
            return;
        }
        if let Json::Object(map) = node {
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !map.contains_key("patternProperties")
                && !map.contains_key("unevaluatedProperties")
            {
                map.insert("additionalProperties".into(), Json::Bool(false));
            }
            for key in [
                "properties",
                "$defs",
                "definitions",
                "items",
                "anyOf",
                "oneOf",
                "allOf",
                "prefixItems",
            ] {
                match map.get_mut(key) {
                    Some(Json::Object(children)) if key != "items" => {
                        children.values_mut().for_each(|c| walk(c, depth + 1));
                    }
                    Some(Json::Array(children)) => {
                        children.iter_mut().for_each(|c| walk(c, depth + 1));
                    }
                    Some(item @ Json::Object(_)) => walk(item, depth + 1),
                    _ => {}
                }
            }
        }
    }
    let mut schema = schema.clone();
    walk(&mut schema, 0);
    schema
}

/// The opening tag of a call in the format of Qwen and Hermes templates.
const TAG: &str = "<tool_call>";

/// What a [`CallScanner`] read from the text so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallDelta {
    /// Call `index` named `name` began.
    Start {
        /// The call's position in the answer.
        index: usize,
        /// The tool's name.
        name: String,
    },
    /// More of call `index`'s arguments (raw JSON text; the pieces together make the object).
    Args {
        /// The call's position in the answer.
        index: usize,
        /// The new text.
        text: String,
    },
}

/// A JSON container open in the scanned text, and what it is to the call format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The answer's object (`{"tool_calls": [...]}`).
    Root,
    /// The `tool_calls` array.
    Calls,
    /// A call object (`{"name": .., "arguments": {..}}`).
    Call,
    /// Anything else.
    Other,
}

#[derive(Debug, Clone)]
struct Frame {
    role: Role,
    object: bool,
    key: Option<String>,
    expect_key: bool,
}

/// One call as far as it was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialCall {
    /// Its name, once complete.
    pub name: Option<String>,
    /// Its arguments' text so far.
    pub arguments: String,
    /// Whether the call object closed.
    pub complete: bool,
    /// How much of `arguments` was handed out as deltas.
    sent: usize,
}

/// Reads tool calls out of an answer while it is generated (the prompt format's
/// `{"tool_calls": [{"name": .., "arguments": {..}}]}` or `<tool_call>` blocks), so that a
/// stream carries a call's name as soon as it is complete and its arguments as they come, as
/// OpenAI streams them. Linear in the text: each feed scans only what is new.
#[derive(Debug, Default)]
pub struct CallScanner {
    seen: usize,
    stack: Vec<Frame>,
    in_string: bool,
    escape: bool,
    capture: Option<String>,
    /// Depth of the arguments value being read (0 when none).
    args_depth: usize,
    calls: Vec<PartialCall>,
    tags: bool,
    /// The text is not a call this scanner can stream (an unknown tool, another shape).
    broken: bool,
}

impl CallScanner {
    /// Scans what `text` (the whole answer so far) added since the last call; returns the
    /// deltas it completes. Names not among `tools` stop the scan (the answer is then read
    /// whole at its end).
    pub fn feed(&mut self, text: &str, tools: &[Tool]) -> Vec<CallDelta> {
        if self.seen == 0 {
            let start = text.trim_start();
            if start.len() < TAG.len() && TAG.starts_with(start) {
                // Maybe the tag of a tagged call: wait for more.
                return Vec::new();
            }
            self.tags = start.starts_with(TAG);
        }
        let Some(new) = text.get(self.seen..) else {
            return Vec::new();
        };
        self.seen = text.len();
        let mut deltas = Vec::new();
        for c in new.chars() {
            if self.broken {
                break;
            }
            self.step(c, tools, &mut deltas);
        }
        self.flush(&mut deltas);
        deltas
    }

    /// Hands out the arguments read since the last deltas, of calls whose name is known.
    fn flush(&mut self, deltas: &mut Vec<CallDelta>) {
        for (index, call) in self.calls.iter_mut().enumerate() {
            if call.name.is_some() && call.sent < call.arguments.len() {
                deltas.push(CallDelta::Args {
                    index,
                    text: call.arguments[call.sent..].to_string(),
                });
                call.sent = call.arguments.len();
            }
        }
    }

    /// The calls read so far.
    pub fn calls(&self) -> &[PartialCall] {
        &self.calls
    }

    /// Whether any call's name was read (a stream has then begun sending the calls).
    pub fn started(&self) -> bool {
        self.calls.iter().any(|c| c.name.is_some())
    }

    fn step(&mut self, c: char, tools: &[Tool], deltas: &mut Vec<CallDelta>) {
        if self.args_depth > 0 {
            let Some(call) = self.calls.last_mut() else {
                self.broken = true;
                return;
            };
            call.arguments.push(c);
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if c == '\\' {
                    self.escape = true;
                } else if c == '"' {
                    self.in_string = false;
                }
            } else {
                match c {
                    '"' => self.in_string = true,
                    '{' | '[' => self.args_depth += 1,
                    '}' | ']' => self.args_depth -= 1,
                    _ => {}
                }
            }
            return;
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
                if let Some(s) = &mut self.capture {
                    s.push(c);
                }
            } else if c == '\\' {
                self.escape = true;
            } else if c == '"' {
                self.in_string = false;
                if let Some(s) = self.capture.take() {
                    self.string_done(s, tools, deltas);
                }
            } else if let Some(s) = &mut self.capture
                && s.len() < 256
            {
                s.push(c);
            }
            return;
        }
        let Some(top) = self.stack.last_mut() else {
            if c == '{' {
                let role = if self.tags { Role::Call } else { Role::Root };
                self.open(role, true);
            } else if !self.tags && !c.is_whitespace() {
                self.broken = true;
            }
            return;
        };
        match c {
            '"' => {
                self.in_string = true;
                let wanted = (top.object && top.expect_key)
                    || (top.role == Role::Call && top.key.as_deref() == Some("name"));
                self.capture = wanted.then(String::new);
            }
            ':' => top.expect_key = false,
            ',' => {
                top.expect_key = top.object;
                top.key = None;
            }
            '{' | '[' => {
                let (role, key) = (top.role, top.key.clone());
                if role == Role::Call && key.as_deref() == Some("arguments") && c == '{' {
                    self.args_depth = 1;
                    if let Some(call) = self.calls.last_mut() {
                        call.arguments.push('{');
                    }
                    return;
                }
                let child = match (role, key.as_deref(), c) {
                    (Role::Root, Some("tool_calls"), '[') => Role::Calls,
                    (Role::Calls, _, '{') => Role::Call,
                    _ => Role::Other,
                };
                self.open(child, c == '{');
            }
            '}' | ']' => {
                if let Some(frame) = self.stack.pop()
                    && frame.role == Role::Call
                    && let Some(call) = self.calls.last_mut()
                {
                    call.complete = true;
                }
            }
            _ => {}
        }
    }

    fn open(&mut self, role: Role, object: bool) {
        if self.stack.len() >= 64 {
            self.broken = true;
            return;
        }
        if role == Role::Call {
            if self.calls.len() >= MAX_PARALLEL_CALLS {
                self.broken = true;
                return;
            }
            self.calls.push(PartialCall::default());
        }
        self.stack.push(Frame {
            role,
            object,
            key: None,
            expect_key: object,
        });
    }

    fn string_done(&mut self, s: String, tools: &[Tool], deltas: &mut Vec<CallDelta>) {
        let Some(top) = self.stack.last_mut() else {
            return;
        };
        if top.object && top.expect_key {
            top.key = Some(s);
            return;
        }
        if top.role == Role::Call && top.key.as_deref() == Some("name") {
            if !tools.iter().any(|t| t.name == s) {
                self.broken = true;
                return;
            }
            self.flush(deltas);
            let index = self.calls.len().saturating_sub(1);
            if let Some(call) = self.calls.last_mut()
                && call.name.is_none()
            {
                call.name = Some(s.clone());
                deltas.push(CallDelta::Start { index, name: s });
            }
        }
    }
}

/// Reads tool calls from an answer: the JSON object of the prompt format, or `<tool_call>`
/// blocks. `None` when the answer is text.
pub fn parse_calls(text: &str, tools: &[Tool]) -> Option<Vec<(String, Json)>> {
    let trimmed = text.trim();
    let mut calls = Vec::new();
    if trimmed.starts_with('{') {
        let value: Json = serde_json::from_str(trimmed).ok()?;
        for call in value.get("tool_calls")?.as_array()? {
            calls.push(one_call(call)?);
        }
    } else if trimmed.starts_with("<tool_call>") {
        for block in trimmed.split("<tool_call>").skip(1) {
            let body = block.split("</tool_call>").next()?.trim();
            calls.push(one_call(&serde_json::from_str(body).ok()?)?);
        }
    } else {
        return None;
    }
    let known = calls
        .iter()
        .all(|(n, _)| tools.iter().any(|t| &t.name == n));
    (!calls.is_empty() && calls.len() <= MAX_PARALLEL_CALLS && known).then_some(calls)
}

fn one_call(call: &Json) -> Option<(String, Json)> {
    let name = call.get("name")?.as_str()?.to_string();
    let args = match call.get("arguments") {
        Some(Json::String(s)) => serde_json::from_str(s).ok()?,
        Some(v @ Json::Object(_)) => v.clone(),
        None => json!({}),
        Some(_) => return None,
    };
    Some((name, args))
}

/// Whether streamed text so far may still become a tool call (so it is held back).
pub fn may_be_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty()
        || t.starts_with('{')
        || "<tool_call>".starts_with(t)
        || t.starts_with("<tool_call>")
}

/// A fresh call id.
pub fn call_id() -> String {
    format!("call_{}", hex::encode(rand::random::<[u8; 12]>()))
}

/// The OpenAI `tool_calls` of an answer, with fresh ids.
pub fn wire_calls(calls: &[(String, Json)]) -> Vec<ToolCall> {
    calls
        .iter()
        .map(|(name, args)| ToolCall {
            id: Some(call_id()),
            kind: "function".into(),
            function: FunctionCall {
                name: name.clone(),
                arguments: Json::String(args.to_string()),
            },
        })
        .collect()
}

/// Rewrites a conversation for a template without tool support: assistant tool calls become
/// the JSON answer of the prompt format, and `tool` messages carry their call's name.
pub fn lower_messages(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(calls) = m.tool_calls.take() {
                let list: Vec<Json> = calls
                    .iter()
                    .map(|c| {
                        let args = match &c.function.arguments {
                            Json::String(s) => {
                                serde_json::from_str(s).unwrap_or(Json::String(s.clone()))
                            }
                            other => other.clone(),
                        };
                        json!({"name": c.function.name, "arguments": args})
                    })
                    .collect();
                m.content = Some(MessageContent::Text(
                    json!({"tool_calls": list}).to_string(),
                ));
            }
            if m.content.is_none() {
                m.content = Some(MessageContent::Text(String::new()));
            }
            m.tool_call_id = None;
            m
        })
        .collect()
}

/// Why a node-executed tool call failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolCallError {
    /// The URL is unusable.
    #[error("tool url {0:?} is invalid")]
    Url(String),
    /// The host did not resolve.
    #[error("cannot resolve {host}: {detail}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's message.
        detail: String,
    },
    /// The address is private and not allow-listed.
    #[error(
        "{host} resolves to {ip}, a private, loopback or link-local address; add the host to \
         tools_policy.allow_hosts to allow it"
    )]
    Forbidden {
        /// The host.
        host: String,
        /// The address.
        ip: IpAddr,
    },
    /// The HTTP call failed.
    #[error("calling the tool failed: {0}")]
    Http(String),
    /// The response is too large.
    #[error("the tool's response is larger than {0} bytes")]
    TooLarge(usize),
    /// The call took too long.
    #[error("the tool did not answer within {0} seconds")]
    Timeout(u64),
    /// The MCP session failed (not connected, a protocol error).
    #[error("{0}")]
    Mcp(String),
    /// The tool ran and reported an error (an MCP result marked `isError`).
    #[error("the tool reported an error: {0}")]
    Reported(String),
}

/// Whether an address must not be reached without an allow-list entry.
pub fn is_restricted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 // CGNAT 100.64/10
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_restricted(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
        }
    }
}

/// Resolves `url`'s host and checks its addresses against `policy`: private, loopback and
/// link-local ones only for an allow-listed host. Returns the host as a resolver override
/// takes it and the address to pin the connection to.
pub async fn resolve_allowed(
    url: &reqwest::Url,
    policy: &ToolsPolicy,
) -> Result<(String, SocketAddr), ToolCallError> {
    let host = url
        .host_str()
        .ok_or_else(|| ToolCallError::Url(url.to_string()))?
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let allowed = policy.allow_hosts.iter().any(|h| h == &host);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| ToolCallError::Resolve {
                host: host.clone(),
                detail: e.to_string(),
            })?
            .collect(),
    };
    let Some(addr) = addrs.first().copied() else {
        return Err(ToolCallError::Resolve {
            host,
            detail: "no addresses".into(),
        });
    };
    if !allowed && let Some(bad) = addrs.iter().find(|a| is_restricted(a.ip())) {
        return Err(ToolCallError::Forbidden { host, ip: bad.ip() });
    }
    Ok((bare.to_string(), addr))
}

/// POSTs `arguments` to the tool's URL and returns the response body as text.
pub async fn execute(
    tool: &ToolConfig,
    policy: &ToolsPolicy,
    arguments: &Json,
) -> Result<String, ToolCallError> {
    let url = reqwest::Url::parse(&tool.url).map_err(|_| ToolCallError::Url(tool.url.clone()))?;
    let (bare, addr) = resolve_allowed(&url, policy).await?;
    let timeout = Duration::from_secs(tool.timeout_secs);
    let client = reqwest::Client::builder()
        .resolve(&bare, addr)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(|e| ToolCallError::Http(e.to_string()))?;
    let call = async {
        let mut response = client
            .post(url)
            .json(arguments)
            .send()
            .await
            .map_err(|e| ToolCallError::Http(e.to_string()))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ToolCallError::Http(e.to_string()))?
        {
            if body.len() + chunk.len() > tool.max_response_bytes {
                return Err(ToolCallError::TooLarge(tool.max_response_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(ToolCallError::Http(format!("status {status}: {text}")))
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ToolCallError::Timeout(tool.timeout_secs))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            description: String::new(),
            parameters: json!({"type": "object"}),
            node: false,
        }
    }

    #[test]
    fn call_schemas_close_declared_objects_and_allow_one_named_call() {
        let params = json!({"type": "object", "required": ["city"],
            "properties": {"city": {"type": "string"},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
                "tags": {"type": "array", "items": {"type": "object",
                    "properties": {"k": {"type": "string"}}}},
                "free": {"type": "object"},
                "open": {"type": "object", "properties": {"a": {}}, "additionalProperties": true}},
            "$defs": {"d": {"type": "object", "properties": {"x": {}}}}});
        let c = closed(&params);
        assert_eq!(c["additionalProperties"], json!(false));
        assert_eq!(
            c["properties"]["where"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            c["properties"]["tags"]["items"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(c["$defs"]["d"]["additionalProperties"], json!(false));
        // No declared properties: any object; allowed others: kept.
        assert!(
            c["properties"]["free"]
                .get("additionalProperties")
                .is_none()
        );
        assert_eq!(c["properties"]["open"]["additionalProperties"], json!(true));
        let mut t = tool("f");
        t.parameters = params;
        let both = [t.clone(), tool("g")];
        let parallel = call_schema(&both, &ToolChoice::Required, true);
        assert_eq!(parallel["properties"]["tool_calls"]["maxItems"], 8);
        let named = call_schema(&both, &ToolChoice::Named("f".into()), true);
        assert_eq!(named["properties"]["tool_calls"]["maxItems"], 1);
        let args =
            &named["properties"]["tool_calls"]["items"]["anyOf"][0]["properties"]["arguments"];
        assert_eq!(args["additionalProperties"], json!(false));
        assert_eq!(named["x-guidance"]["whitespace_flexible"], json!(false));
    }

    fn scan_in_pieces(text: &str, piece: usize, tools: &[Tool]) -> (CallScanner, Vec<CallDelta>) {
        let mut scanner = CallScanner::default();
        let mut deltas = Vec::new();
        let mut end = 0;
        while end < text.len() {
            end = (end + piece).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            deltas.extend(scanner.feed(&text[..end], tools));
        }
        (scanner, deltas)
    }

    /// The calls as a streaming client rebuilds them from the deltas.
    fn rebuild(deltas: &[CallDelta]) -> Vec<(String, String)> {
        let mut calls: Vec<(String, String)> = Vec::new();
        for d in deltas {
            match d {
                CallDelta::Start { index, name } => {
                    assert_eq!(*index, calls.len(), "{deltas:?}");
                    calls.push((name.clone(), String::new()));
                }
                CallDelta::Args { index, text } => calls[*index].1.push_str(text),
            }
        }
        calls
    }

    #[test]
    fn the_scanner_streams_names_then_arguments_in_any_split() {
        let tools = [tool("get_weather"), tool("g")];
        let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\"r}is", "n": [1, {"a": 2}]}}, {"name": "g", "arguments": {}}]}"#;
        for piece in [1, 2, 3, 7, 500] {
            let (scanner, deltas) = scan_in_pieces(text, piece, &tools);
            let calls = rebuild(&deltas);
            assert_eq!(calls.len(), 2, "piece {piece}: {deltas:?}");
            assert_eq!(calls[0].0, "get_weather");
            let args: Json = serde_json::from_str(&calls[0].1).unwrap();
            assert_eq!(args, json!({"city": "Pa\"r}is", "n": [1, {"a": 2}]}));
            assert_eq!(calls[1], ("g".to_string(), "{}".to_string()));
            assert!(scanner.calls().iter().all(|c| c.complete));
        }
        // The name arrives before the first argument byte is sent.
        let (_, deltas) = scan_in_pieces(text, 1, &tools);
        assert!(matches!(deltas[0], CallDelta::Start { .. }));
    }

    #[test]
    fn the_scanner_reads_tagged_calls_arguments_first_and_partial_calls() {
        let tools = [tool("f")];
        let text = "<tool_call>\n{\"arguments\": {\"x\": 1}, \"name\": \"f\"}\n</tool_call>\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        let (_, deltas) = scan_in_pieces(text, 4, &tools);
        assert_eq!(
            rebuild(&deltas),
            vec![
                ("f".into(), r#"{"x": 1}"#.into()),
                ("f".into(), "{}".into())
            ]
        );
        // Cut by the budget: the call so far, not complete.
        let (scanner, deltas) = scan_in_pieces(
            r#"{"tool_calls": [{"name": "f", "arguments": {"x": "ab"#,
            3,
            &tools,
        );
        assert_eq!(rebuild(&deltas), vec![("f".into(), r#"{"x": "ab"#.into())]);
        assert!(!scanner.calls()[0].complete);
        // Unknown names and text are not calls.
        for text in [
            r#"{"tool_calls": [{"name": "nope", "arguments": {}}]}"#,
            "Hello {",
            r#"{"x": 1}"#,
        ] {
            let (scanner, deltas) = scan_in_pieces(text, 2, &tools);
            assert!(
                deltas.is_empty() && !scanner.started(),
                "{text}: {deltas:?}"
            );
        }
    }

    #[test]
    fn parses_both_call_formats_and_rejects_text() {
        let tools = [tool("f"), tool("g")];
        let calls = parse_calls(
            r#" {"tool_calls": [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": "{\"b\":2}"}]}"#,
            &tools,
        )
        .unwrap();
        assert_eq!(
            calls,
            vec![("f".into(), json!({"a": 1})), ("g".into(), json!({"b": 2}))]
        );
        let calls = parse_calls(
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
            &tools,
        )
        .unwrap();
        assert_eq!(calls[0].0, "f");
        assert!(parse_calls("hello", &tools).is_none());
        assert!(
            parse_calls(
                r#"{"tool_calls": [{"name": "h", "arguments": {}}]}"#,
                &tools
            )
            .is_none()
        );
        assert!(parse_calls(r#"{"tool_calls": []}"#, &tools).is_none());
    }

    #[test]
    fn holds_back_what_may_become_a_call() {
        assert!(may_be_call("  "));
        assert!(may_be_call("<tool"));
        assert!(may_be_call(" {\"tool"));
        assert!(!may_be_call("Hello"));
    }

    #[test]
    fn restricted_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "fd00::1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "100.64.0.1",
        ] {
            assert!(is_restricted(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "2606:4700::1111"] {
            assert!(!is_restricted(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn call_schema_restricts_names() {
        let tools = [tool("f"), tool("g")];
        let s = call_schema(&tools, &ToolChoice::Named("g".into()), false);
        let items = &s["properties"]["tool_calls"]["items"]["anyOf"];
        assert_eq!(items.as_array().unwrap().len(), 1);
        assert_eq!(items[0]["properties"]["name"]["const"], "g");
        assert_eq!(s["properties"]["tool_calls"]["maxItems"], 1);
    }

    #[test]
    fn lowered_messages_carry_calls_as_json() {
        let mut m = ChatMessage::new("assistant", "");
        m.content = None;
        m.tool_calls = Some(wire_calls(&[("f".into(), json!({"x": 1}))]));
        let lowered = lower_messages(&[m]);
        let Some(MessageContent::Text(t)) = &lowered[0].content else {
            panic!()
        };
        assert_eq!(parse_calls(t, &[tool("f")]).unwrap()[0].1, json!({"x": 1}));
    }

    #[tokio::test]
    async fn refuses_loopback_unless_allow_listed() {
        let t = ToolConfig {
            name: "t".into(),
            description: String::new(),
            url: "https://127.0.0.1:1/x".into(),
            parameters: json!({}),
            timeout_secs: 1,
            max_response_bytes: 10,
        };
        let err = execute(&t, &ToolsPolicy::default(), &json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, ToolCallError::Forbidden { .. }), "{err}");
    }
}
