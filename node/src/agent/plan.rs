//! Planning: a chat request checked against the node's limits and turned into a [`Plan`]
//! (generation settings, the tools on offer, the tool choice, the output format, retrieval on or
//! off, and where its rounds run).

use gaia_inference::template::{ChatMessage, MessageContent};
use serde_json::{Value as Json, json};

use super::Shared;
use super::error::ApiError;
use super::route::{Route, ServedBy};
use super::tools::{self, Tool};
use super::types::{self, ChatRequest, Defaults, GenSettings, Limits, ResponseFormat, ToolChoice};

/// What the output must be.
#[derive(Debug, Clone)]
pub(crate) enum Output {
    Text,
    Json(Json),
}

/// A checked chat request.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) settings: GenSettings,
    pub(crate) tools: Vec<Tool>,
    pub(crate) choice: ToolChoice,
    pub(crate) parallel: bool,
    pub(crate) output: Output,
    pub(crate) rag: bool,
    /// Completions' `logprobs` (alternatives per token), in the text flavor.
    pub(crate) text_logprobs: Option<usize>,
    /// Where the rounds run.
    pub(crate) route: Route,
    /// The node that served the request (the last round's), for the response.
    pub(crate) served_by: ServedBy,
    /// What a paid request reserved on its access key's account, and how it is debited.
    pub(crate) tab: Option<std::sync::Arc<crate::pay::accounts::Tab>>,
}

impl Plan {
    pub(crate) fn node_tools_active(&self) -> bool {
        self.choice != ToolChoice::None && self.tools.iter().any(|t| t.node)
    }

    /// The plan of a text completion (`/v1/completions`): no tools, no retrieval, plain text,
    /// on this node's engine.
    pub(crate) fn text(settings: GenSettings, text_logprobs: Option<usize>) -> Plan {
        Plan {
            settings,
            tools: Vec::new(),
            choice: ToolChoice::None,
            parallel: false,
            output: Output::Text,
            rag: false,
            text_logprobs,
            route: Route::Local,
            served_by: ServedBy::default(),
            tab: None,
        }
    }
}

pub(crate) fn limits(st: &Shared) -> Limits {
    Limits {
        max_tokens: st.config.server.max_tokens,
        max_n: st.config.server.max_n,
        // A gateway has no vocabulary: the serving node checks token ids.
        vocab: st.local.as_ref().map_or(u32::MAX as usize, |m| {
            m.engine.model().tokenizer().vocab_size()
        }),
        defaults: Defaults::of(&st.config.agent),
    }
}

/// The OpenAI rules for one message: a known role; content on system, user and tool messages;
/// an assistant message has content or tool calls; a tool message names the call it answers.
fn check_message(i: usize, m: &ChatMessage) -> Result<(), ApiError> {
    let param = format!("messages[{i}]");
    let has_content = m.content.is_some();
    let problem = match m.role.as_str() {
        "system" | "developer" | "user" if !has_content => Some("has no `content`"),
        "assistant" if !has_content && m.tool_calls.as_ref().is_none_or(|c| c.is_empty()) => {
            Some("has neither `content` nor `tool_calls`")
        }
        "tool" if !has_content => Some("has no `content`"),
        "tool" if m.tool_call_id.is_none() => Some("is a `tool` message without `tool_call_id`"),
        "system" | "developer" | "user" | "assistant" | "tool" => None,
        _ => Some("has an unknown `role`; use system, developer, user, assistant or tool"),
    };
    if let Some(what) = problem {
        return Err(ApiError::invalid(&param, format!("`{param}` {what}")));
    }
    if let Some(MessageContent::Parts(parts)) = &m.content
        && let Some(part) = parts.iter().find(|p| p.kind != "text")
    {
        return Err(ApiError::invalid(
            &param,
            format!(
                "`{param}` has a `{}` content part; this node reads text parts",
                part.kind
            ),
        ));
    }
    Ok(())
}

/// Checks a chat request. `node_tools`: offer the node-executed tools of `[[tools]]` and
/// `[[mcp]]` (not on
/// a relayed request: the entry node runs those).
pub(crate) fn chat_plan(
    st: &Shared,
    req: &ChatRequest,
    node_tools: bool,
) -> Result<Plan, ApiError> {
    st.check_chat_model(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    if req.messages.len() > types::MAX_MESSAGES {
        return Err(ApiError::invalid(
            "messages",
            format!("at most {} messages", types::MAX_MESSAGES),
        ));
    }
    for (i, message) in req.messages.iter().enumerate() {
        check_message(i, message)?;
    }
    if req.common.max_tokens.is_some() && req.max_completion_tokens.is_some() {
        return Err(ApiError::invalid(
            "max_completion_tokens",
            "give `max_tokens` or `max_completion_tokens`, not both",
        ));
    }
    let max = req.max_completion_tokens.or(req.common.max_tokens);
    let mut settings = types::validate_common(&req.common, max, limits(st))?;
    types::chat_logprobs(&mut settings.sampling, req.logprobs, req.top_logprobs)?;
    let configured = if node_tools {
        st.node_tools()
    } else {
        Vec::new()
    };
    let tools = tools::collect(req.tools.as_deref(), &configured)?;
    let choice = types::tool_choice(req.tool_choice.as_ref(), !tools.is_empty())?;
    if let ToolChoice::Named(name) = &choice
        && !tools.iter().any(|t| &t.name == name)
    {
        return Err(ApiError::invalid(
            "tool_choice",
            format!("`tool_choice` names {name:?}, which is not among the tools"),
        ));
    }
    let output = match &req.response_format {
        None | Some(ResponseFormat::Text {}) => Output::Text,
        Some(ResponseFormat::JsonObject {}) => Output::Json(json!({"type": "object"})),
        Some(ResponseFormat::JsonSchema { json_schema }) => Output::Json(
            json_schema
                .schema
                .clone()
                .unwrap_or_else(|| json!({"type": "object"})),
        ),
    };
    if matches!(output, Output::Json(_))
        && matches!(choice, ToolChoice::Required | ToolChoice::Named(_))
    {
        return Err(ApiError::invalid(
            "response_format",
            "`response_format` cannot be combined with a required tool call",
        ));
    }
    Ok(Plan {
        settings,
        tools,
        choice,
        parallel: req.parallel_tool_calls.unwrap_or(true),
        output,
        rag: req.rag.unwrap_or(true),
        text_logprobs: None,
        route: Route::Local,
        served_by: ServedBy::default(),
        tab: None,
    })
}
