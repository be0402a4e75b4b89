//! Retrieval-augmented generation: the knowledge base searched with the last user message, the
//! hits injected per `agent.rag_policy` with `agent.rag_prompt`, and reported as `sources`.

use std::sync::Arc;

use gaia_inference::template::{ChatMessage, MessageContent};
use gaia_knowledge::{SearchHit, SearchMode, SearchQuery};
use serde::Serialize;

use super::Shared;
use super::error::ApiError;
use super::prompt::prepend_system;
use crate::config::RagPolicy;

/// Longest query text searched (bytes); longer messages are cut at a character boundary.
pub const MAX_QUERY_BYTES: usize = 4096;

/// A chunk the answer was based on (the `sources` extension field).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Source {
    /// The document's source name.
    pub source: String,
    /// The document's title.
    pub title: String,
    /// The heading the chunk is under.
    pub heading: Option<String>,
    /// The ranking score (cosine similarity for vector search).
    pub score: f32,
    /// The chunk's text.
    pub text: String,
}

impl From<SearchHit> for Source {
    fn from(h: SearchHit) -> Source {
        Source {
            source: h.source,
            title: h.title,
            heading: h.heading,
            score: h.vector_score.unwrap_or(h.score),
            text: h.text,
        }
    }
}

/// The text of a message (text parts joined).
pub fn message_text(m: &ChatMessage) -> String {
    match &m.content {
        Some(MessageContent::Text(t)) => t.clone(),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .filter_map(|p| p.text.as_deref())
            .collect::<Vec<_>>()
            .join("\n"),
        None => String::new(),
    }
}

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Searches the knowledge base off the runtime.
pub async fn search(
    st: &Shared,
    query: &str,
    top_k: usize,
    min_score: Option<f32>,
    mode: SearchMode,
) -> Result<Vec<SearchHit>, ApiError> {
    let Some(kb) = st.kb.clone() else {
        return Err(ApiError::unavailable(
            "this node has no knowledge base (knowledge.enabled is false)",
        ));
    };
    let query = cut(query, MAX_QUERY_BYTES).to_string();
    let result = st
        .engine()?
        .run_blocking(move || {
            let kb = kb
                .read()
                .map_err(|_| "the knowledge base lock is poisoned".to_string())?;
            kb.search(&SearchQuery {
                text: &query,
                top_k,
                min_score,
                mode,
            })
            .map_err(|e| e.to_string())
        })
        .await?;
    result.map_err(|e| ApiError::internal(format!("searching the knowledge base failed: {e}")))
}

/// Retrieves context for the last user message and injects it; returns the sources used.
pub async fn augment(
    st: &Shared,
    messages: &mut Vec<ChatMessage>,
) -> Result<Vec<Source>, ApiError> {
    if st.kb.is_none() {
        return Ok(Vec::new());
    }
    let Some(last_user) = messages.iter().rposition(|m| m.role == "user") else {
        return Ok(Vec::new());
    };
    let query = message_text(&messages[last_user]);
    if query.trim().is_empty() {
        return Ok(Vec::new());
    }
    let agent = &st.config.agent;
    let hits = search(
        st,
        &query,
        agent.top_k,
        Some(agent.score_threshold),
        agent.retrieval.mode(),
    )
    .await?;
    if hits.is_empty() {
        return Ok(Vec::new());
    }
    let sources: Vec<Source> = hits.into_iter().map(Source::from).collect();
    inject(st, messages, last_user, &sources);
    Ok(sources)
}

fn inject(st: &Shared, messages: &mut Vec<ChatMessage>, last_user: usize, sources: &[Source]) {
    let agent = &st.config.agent;
    let context = sources
        .iter()
        .map(|s| format!("[{}]\n{}", s.source, s.text))
        .collect::<Vec<_>>()
        .join("\n\n");
    let text = agent.rag_prompt.replace("{context}", &context);
    match agent.rag_policy {
        RagPolicy::System => {
            if !messages.iter().any(|m| m.role == "system") && !agent.system_prompt.is_empty() {
                messages.insert(0, ChatMessage::new("system", agent.system_prompt.clone()));
            }
            prepend_system(messages, &text);
        }
        RagPolicy::LastUser => {
            let m = &mut messages[last_user];
            let question = message_text(m);
            m.content = Some(MessageContent::Text(format!("{text}\n\n{question}")));
        }
    }
}

/// A shared, lockable knowledge base.
pub type SharedKb = Arc<std::sync::RwLock<gaia_knowledge::KnowledgeBase>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_respects_characters() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("abc", 10), "abc");
    }

    #[test]
    fn text_of_parts() {
        let m: ChatMessage = serde_json::from_value(serde_json::json!({"role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}))
        .unwrap();
        assert_eq!(message_text(&m), "a\nb");
    }
}
