//! Chat completion streams: the frames exchanged on one substream per completion.
//!
//! The entry node opens a substream to the serving node and sends one
//! [`StreamFrame::Request`]; the serving node answers with [`StreamFrame::Token`] (and
//! [`StreamFrame::ToolCall`]) frames as it generates (on version 3, after a
//! [`StreamFrame::Sources`] frame when it retrieved context), and ends with exactly one
//! [`StreamFrame::Done`] or [`StreamFrame::Error`]. Closing the substream early cancels the
//! generation. Frames travel with [`crate::codec::encode_frame`] and
//! [`crate::codec::FrameDecoder`].
//!
//! Failover: if the serving node dies mid-stream, the entry node sends the same request to
//! another member with [`Resume`] holding the text already streamed to the client; that node
//! continues the assistant message after that text, numbering its tokens from
//! `Resume::tokens_sent`.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::codec::{MAX_FRAME, impl_wire};
use crate::domain::MembershipCertificate;
use crate::payment::Receipt;
use crate::signed::Signed;
use crate::validate::{self, Validate, ValidationError};

/// The longest request body (OpenAI chat-completion JSON), in bytes.
pub const MAX_BODY_JSON: usize = 512 * 1024;
/// The longest resumed text, in bytes.
pub const MAX_RESUME_TEXT: usize = 256 * 1024;
/// The longest text in one token frame (a node may batch several tokens into one frame).
pub const MAX_TOKEN_TEXT: usize = 16 * 1024;
/// The most alternatives in `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The longest alternative token text in `top_logprobs`.
pub const MAX_LOGPROB_TEXT: usize = 256;
/// The longest tool-call id, in bytes.
pub const MAX_TOOL_CALL_ID: usize = 64;
/// The longest tool name, in bytes.
pub const MAX_TOOL_NAME: usize = 128;
/// The longest tool-call arguments text, in bytes.
pub const MAX_TOOL_ARGUMENTS: usize = 256 * 1024;
/// The longest error message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4 * 1024;
/// The most retrieval sources in one [`StreamFrame::Sources`].
pub const MAX_SOURCES: usize = 16;
/// The longest source name, title or heading, in bytes.
pub const MAX_SOURCE_LABEL: usize = 1024;
/// The longest source passage, in bytes.
pub const MAX_SOURCE_TEXT: usize = 16 * 1024;

/// A request's id: 16 random bytes, unique across the swarm, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub [u8; 16]);

crate::bytes::fixed_bytes_serde!(RequestId);

impl RequestId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// The text is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request id {0:?}: expected 32 hex digits")]
pub struct ParseRequestIdError(String);

impl FromStr for RequestId {
    type Err = ParseRequestIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out)
            .map_err(|_| ParseRequestIdError(s.chars().take(64).collect()))?;
        Ok(Self(out))
    }
}

/// Where to pick up a completion that another node started (failover).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The assistant text already sent to the client; continue right after it.
    pub text: String,
    /// How many tokens were already sent: the next token's index, and what to subtract from
    /// `max_tokens`.
    pub tokens_sent: u32,
}

/// One alternative token and its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token text.
    pub text: String,
    /// Its log-probability (finite, <= 0).
    pub logprob: f32,
}

/// A knowledge-base passage the serving node put in the prompt (the `sources` of an answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The document's source name.
    pub source: String,
    /// The document's title.
    pub title: String,
    /// The heading the passage is under.
    pub heading: Option<String>,
    /// Its ranking score.
    pub score: f32,
    /// The passage.
    pub text: String,
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens processed.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Why generation stopped (the OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// A stop sequence or the end-of-turn token.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    /// Output was withheld by a content filter.
    ContentFilter,
}

impl FinishReason {
    /// The OpenAI wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// Why a request failed, for the entry node to decide what to do (retry elsewhere or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is invalid; retrying elsewhere will not help.
    BadRequest,
    /// The node is at capacity; retry on another node.
    Busy,
    /// The node does not serve the requested model or domain; retry on another node.
    NotServed,
    /// The requester is not allowed (not a member, no valid voucher, …).
    Unauthorized,
    /// The request or its output exceeds a limit (context window, frame size).
    TooLarge,
    /// The node failed; retry on another node.
    Internal,
    /// The node is shutting down; retry on another node.
    ShuttingDown,
}

impl ErrorCode {
    /// Whether sending the same request to another node may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy | ErrorCode::NotServed | ErrorCode::Internal | ErrorCode::ShuttingDown
        )
    }
}

/// One frame of a completion stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamFrame {
    /// The request, first frame from the entry node.
    Request {
        /// The request id (also in the receipt).
        id: RequestId,
        /// The OpenAI chat-completion request body, as JSON text.
        body_json: String,
        /// Set when continuing a completion that another node started.
        resume: Option<Resume>,
        /// The requester's membership certificate, in domains that are not open: the serving
        /// node need not have heard of it over gossip yet (a gateway has no advert).
        certificate: Option<Signed<MembershipCertificate>>,
    },
    /// Generated text.
    Token {
        /// The text of one token (or of a few, batched).
        text: String,
        /// The index of the (first) token in the completion, from 0.
        index: u32,
        /// Its log-probability, when the request asked for logprobs.
        logprob: Option<f32>,
        /// The most likely alternatives, when the request asked for `top_logprobs`.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_TOP_LOGPROBS>")]
        top_logprobs: Vec<TopLogprob>,
    },
    /// A complete tool call, sent as soon as the model has finished writing it.
    ToolCall {
        /// Its position among this completion's tool calls, from 0.
        index: u32,
        /// The call id the client echoes in its tool result.
        id: String,
        /// The function name.
        name: String,
        /// The arguments, as JSON text.
        arguments: String,
    },
    /// [`StreamFrame::Done`] with the receipt in version 1's layout (one price), as streams of
    /// version 1 carry it.
    DoneV1 {
        /// Token counts.
        usage: Usage,
        /// Why it stopped.
        finish_reason: FinishReason,
        /// The serving node's signed receipt, when the domain meters usage.
        #[serde(with = "crate::layouts::legacy::option")]
        receipt: Option<Signed<Receipt>>,
    },
    /// The request failed; last frame.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A message for the user.
        message: String,
    },
    /// [`StreamFrame::Done`] in version 2's layout (no cached-token count), as streams of
    /// version 2 carry it.
    DoneV2 {
        /// Token counts.
        usage: Usage,
        /// Why it stopped.
        finish_reason: FinishReason,
        /// The serving node's signed receipt, when the domain meters usage.
        receipt: Option<Signed<Receipt>>,
    },
    /// The knowledge-base passages the serving node put in the prompt, before the first token
    /// (version 3).
    Sources {
        /// The passages, best first.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_SOURCES>")]
        sources: Vec<Source>,
    },
    /// The completion ended normally; last frame (version 3: with the prompt tokens the
    /// serving node's prefix cache held; since version 2 the receipt may state two prices).
    Done {
        /// Token counts.
        usage: Usage,
        /// Prompt tokens whose state the serving node reused rather than computed.
        cached_tokens: u32,
        /// Why it stopped.
        finish_reason: FinishReason,
        /// The serving node's signed receipt, when the domain meters usage.
        receipt: Option<Signed<Receipt>>,
    },
}

impl StreamFrame {
    /// The frame as a stream of protocol `version` carries it, or `None` for a frame that
    /// version has no room for (sources before version 3). Before version 3 a final frame
    /// drops its cached-token count; on version 1 it takes the version-1 layout, and a
    /// receipt with two prices (which that layout cannot state) becomes an error telling the
    /// entry node to upgrade.
    pub fn for_version(self, version: u32) -> Option<Self> {
        match self {
            StreamFrame::Sources { .. } if version < 3 => None,
            StreamFrame::Done {
                usage,
                finish_reason,
                receipt,
                ..
            } if version < 3 => StreamFrame::DoneV2 {
                usage,
                finish_reason,
                receipt,
            }
            .for_version(version),
            StreamFrame::DoneV2 {
                usage,
                finish_reason,
                receipt,
            } if version < 2 => Some({
                if let Some(price) = receipt
                    .as_ref()
                    .map(|r| r.payload.price())
                    .filter(|p| !p.is_flat())
                {
                    StreamFrame::Error {
                        code: ErrorCode::BadRequest,
                        message: format!(
                            "this node charges {price}, which the entry node's Gaia (stream \
                             protocol 1) cannot pay: upgrade it"
                        ),
                    }
                } else {
                    StreamFrame::DoneV1 {
                        usage,
                        finish_reason,
                        receipt,
                    }
                }
            }),
            other => Some(other),
        }
    }

    /// The frame with an older version's final frame read as [`StreamFrame::Done`] (no
    /// cached tokens reported).
    pub fn upgrade(self) -> Self {
        match self {
            StreamFrame::DoneV1 {
                usage,
                finish_reason,
                receipt,
            }
            | StreamFrame::DoneV2 {
                usage,
                finish_reason,
                receipt,
            } => StreamFrame::Done {
                usage,
                cached_tokens: 0,
                finish_reason,
                receipt,
            },
            other => other,
        }
    }
}

impl Validate for StreamFrame {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            StreamFrame::Request {
                body_json,
                resume,
                certificate,
                ..
            } => {
                validate::non_empty("request.body_json", body_json, MAX_BODY_JSON)?;
                if let Some(resume) = resume {
                    validate::max_len("request.resume.text", &resume.text, MAX_RESUME_TEXT)?;
                }
                if let Some(certificate) = certificate {
                    certificate.validate()?;
                }
            }
            StreamFrame::Token {
                text,
                logprob,
                top_logprobs,
                ..
            } => {
                validate::max_len("token.text", text, MAX_TOKEN_TEXT)?;
                if let Some(logprob) = logprob {
                    validate::log_probability("token.logprob", *logprob)?;
                }
                validate::max_count("token.top_logprobs", top_logprobs, MAX_TOP_LOGPROBS)?;
                for alt in top_logprobs {
                    validate::max_len("token.top_logprobs[].text", &alt.text, MAX_LOGPROB_TEXT)?;
                    validate::log_probability("token.top_logprobs[].logprob", alt.logprob)?;
                }
            }
            StreamFrame::ToolCall {
                id,
                name,
                arguments,
                ..
            } => {
                validate::non_empty("tool_call.id", id, MAX_TOOL_CALL_ID)?;
                validate::non_empty("tool_call.name", name, MAX_TOOL_NAME)?;
                validate::max_len("tool_call.arguments", arguments, MAX_TOOL_ARGUMENTS)?;
            }
            StreamFrame::Done { receipt, .. }
            | StreamFrame::DoneV2 { receipt, .. }
            | StreamFrame::DoneV1 { receipt, .. } => {
                if let Some(receipt) = receipt {
                    receipt.validate()?;
                }
            }
            StreamFrame::Sources { sources } => {
                validate::max_count("sources", sources, MAX_SOURCES)?;
                for s in sources {
                    validate::max_len("sources[].source", &s.source, MAX_SOURCE_LABEL)?;
                    validate::max_len("sources[].title", &s.title, MAX_SOURCE_LABEL)?;
                    if let Some(heading) = &s.heading {
                        validate::max_len("sources[].heading", heading, MAX_SOURCE_LABEL)?;
                    }
                    validate::max_len("sources[].text", &s.text, MAX_SOURCE_TEXT)?;
                    if !s.score.is_finite() {
                        return Err(ValidationError::BadNumber {
                            field: "sources[].score",
                            expected: "a finite number",
                            value: s.score.to_string(),
                        });
                    }
                }
            }
            StreamFrame::Error { message, .. } => {
                validate::max_len("error.message", message, MAX_ERROR_MESSAGE)?;
            }
        }
        Ok(())
    }
}

impl_wire!(StreamFrame, "stream frame", MAX_FRAME);
