//! Building a round's prompt: the conversation rendered with the chat template (the agent's
//! system prompt, the tools described per [`super::tools`]) and tokenized; the generation
//! requests with their output constraint compiled (`response_format`, an enforced tool call).

use std::sync::Arc;

use gaia_inference::generate::{CancelToken, GenerateError, GenerateRequest};
use gaia_inference::template::{ChatMessage, MessageContent, RenderOptions};
use serde_json::Value as Json;

use super::Shared;
use super::error::ApiError;
use super::plan::{Output, Plan};
use super::tools::{self, Tool};
use super::types::ToolChoice;

/// The schema the output is constrained to in one round, if any.
pub(crate) fn round_schema(plan: &Plan, choice: &ToolChoice) -> Option<Json> {
    match choice {
        ToolChoice::Required | ToolChoice::Named(_) => {
            Some(tools::call_schema(&plan.tools, choice, plan.parallel))
        }
        _ => match &plan.output {
            Output::Json(schema) => Some(schema.clone()),
            Output::Text => None,
        },
    }
}

/// Renders and tokenizes the conversation for one round.
pub(crate) fn render(
    st: &Shared,
    plan: &Plan,
    messages: &[ChatMessage],
    choice: &ToolChoice,
) -> Result<Vec<u32>, ApiError> {
    let model = st.engine()?.model();
    let template = model.template();
    let native = template.supports_tools();
    let offered = *choice != ToolChoice::None && !plan.tools.is_empty();
    let mut msgs = if native {
        messages.to_vec()
    } else {
        tools::lower_messages(messages)
    };
    if offered && !native {
        let text = tools::system_prompt(&plan.tools);
        prepend_system(&mut msgs, &text);
    }
    let prompt = &st.config.agent.system_prompt;
    if !prompt.is_empty() && !msgs.iter().any(|m| m.role == "system") {
        msgs.insert(0, ChatMessage::new("system", prompt.clone()));
    }
    let schemas: Vec<Json> = plan.tools.iter().map(Tool::openai).collect();
    let rendered = template
        .render(
            &msgs,
            &RenderOptions {
                add_generation_prompt: true,
                tools: (offered && native).then_some(schemas.as_slice()),
                ..RenderOptions::default()
            },
        )
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    rendered
        .tokenize(model.tokenizer())
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// Adds `text` to the first system message, or inserts one.
pub(crate) fn prepend_system(msgs: &mut Vec<ChatMessage>, text: &str) {
    if let Some(first) = msgs.first_mut()
        && first.role == "system"
    {
        let old = match &first.content {
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.text.clone())
                .collect::<Vec<_>>()
                .join("\n"),
            None => String::new(),
        };
        first.content = Some(MessageContent::Text(format!("{old}\n\n{text}")));
        return;
    }
    msgs.insert(0, ChatMessage::new("system", text));
}

/// Builds the `n` generation requests of one round (constraints compiled here).
pub(crate) fn requests(
    st: &Shared,
    plan: &Plan,
    prompt: Vec<u32>,
    schema: Option<&Json>,
    cancel: &CancelToken,
) -> Result<Vec<GenerateRequest>, ApiError> {
    let model = st.engine()?.model();
    let ctx = model.model().max_context();
    if prompt.len() >= ctx {
        return Err(ApiError::context_length(format!(
            "the prompt is {} tokens; this model's context is {ctx} tokens; shorten the messages",
            prompt.len()
        )));
    }
    let room = ctx - prompt.len();
    let max_tokens = match plan.settings.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::context_length(format!(
                "the prompt ({} tokens) plus max_tokens ({m}) exceeds this model's context of \
                 {ctx} tokens; lower max_tokens or shorten the messages",
                prompt.len()
            )));
        }
        Some(m) => m,
        None => room.min(plan.settings.default_max_tokens),
    };
    let mut out = Vec::with_capacity(plan.settings.n);
    for i in 0..plan.settings.n {
        let constraint = match schema {
            None => None,
            Some(s) => Some(
                model
                    .constraints()
                    .and_then(|f| f.json_schema(s).map_err(GenerateError::from))
                    .map_err(|e| ApiError::invalid("response_format", e.to_string()))?,
            ),
        };
        let mut sampling = plan.settings.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
        out.push(GenerateRequest {
            prompt: prompt.clone(),
            sampling,
            max_tokens: Some(max_tokens),
            stop: plan.settings.stop.clone(),
            constraint,
            cancel: cancel.clone(),
        });
    }
    Ok(out)
}

/// Tokenizes a text completion's prompt and builds its generation requests, off the runtime;
/// returns them with the prompt's length in tokens.
pub(crate) async fn text_requests(
    st: &Shared,
    plan: &Plan,
    text: String,
    cancel: &CancelToken,
) -> Result<(Vec<GenerateRequest>, usize), ApiError> {
    let (st2, plan2, cancel2) = (Arc::clone(st), plan.clone(), cancel.clone());
    tokio::task::spawn_blocking(move || {
        let tokenizer = st2.engine()?.model().tokenizer();
        let tokens = tokenizer
            .encode_prompt(&text, std::slice::from_ref(&(0..text.len())))
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
        if tokens.is_empty() {
            return Err(ApiError::invalid("prompt", "`prompt` is empty"));
        }
        let len = tokens.len();
        Ok((requests(&st2, &plan2, tokens, None, &cancel2)?, len))
    })
    .await
    .map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepend_system_merges_or_inserts() {
        let mut m = vec![ChatMessage::new("user", "hi")];
        prepend_system(&mut m, "ctx");
        assert_eq!(m[0].role, "system");
        prepend_system(&mut m, "more");
        assert_eq!(m.len(), 2);
        let Some(MessageContent::Text(t)) = &m[0].content else {
            panic!()
        };
        assert_eq!(t, "ctx\n\nmore");
    }
}
