//! The chat request model: OpenAI's chat completion body as the pipeline reads it (from an
//! HTTP request or a relayed stream), and its validation into what the engine runs. The
//! other routes' bodies, and the lists of accepted fields, are `api::types`.

use std::collections::BTreeMap;

use gaia_inference::generate::{MAX_STOP_LEN, MAX_STOP_SEQUENCES};

/// The longest stop sequence, in characters (what a JSON schema can bound); four bytes a
/// character at most keeps it within the engine's [`MAX_STOP_LEN`] bytes.
pub const MAX_STOP_CHARS: usize = MAX_STOP_LEN / 4;
use gaia_inference::sampling::{MAX_TOP_LOGPROBS, SamplingParams};
use gaia_inference::template::ChatMessage;
use serde::Deserialize;
use serde_json::Value as Json;

use super::error::ApiError;

/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most messages per request.
pub const MAX_MESSAGES: usize = 2048;
/// Most tools per request.
pub const MAX_TOOLS: usize = 128;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One entry of `tools`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionSpec,
}

/// A function the model may call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of its arguments.
    #[serde(default)]
    pub parameters: Option<Json>,
    /// Strict schema adherence (always enforced when a call is required).
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type":"function","function":{"name"}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceWire {
    /// A mode.
    Mode(String),
    /// A named function.
    Named {
        /// `function`
        #[serde(rename = "type")]
        kind: String,
        /// The function.
        function: NamedFunction,
    },
}

/// `{"name": ...}`
#[derive(Debug, Clone, Deserialize)]
pub struct NamedFunction {
    /// The function's name.
    pub name: String,
}

/// What the model must do about tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No tools.
    None,
    /// The model decides.
    Auto,
    /// At least one call (enforced).
    Required,
    /// This function (enforced).
    Named(String),
}

/// `response_format`
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text. (Struct variants, so that an unknown field beside `type` is refused.)
    Text {},
    /// Any JSON object.
    JsonObject {},
    /// JSON valid against a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaSpec,
    },
}

/// `response_format.json_schema`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaSpec {
    /// The schema's name.
    pub name: String,
    /// Its description.
    #[serde(default)]
    pub description: Option<String>,
    /// The schema (absent: any JSON object).
    #[serde(default)]
    pub schema: Option<Json>,
    /// Strict adherence (always enforced).
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `POST /v1/chat/completions`
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The model's name (or `default`).
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Generation and sampling fields shared with `/v1/completions`.
    #[serde(flatten)]
    pub common: Common,
    /// Log-probabilities of the output tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token with `logprobs` (0 to 20).
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    /// Newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Option<Vec<ToolSpec>>,
    /// What the model must do about tools.
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceWire>,
    /// Allow several calls in one answer (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Structured output.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Extension: use the knowledge base (default true when it is enabled).
    #[serde(default)]
    pub rag: Option<bool>,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Temperature in [0, 2].
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Choices.
    #[serde(default)]
    pub n: Option<u64>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Presence penalty in [-2, 2].
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Frequency penalty in [-2, 2].
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string) to bias in [-100, 100].
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// End-user id (logged only).
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted and ignored (stored completions are not supported, see `store`).
    #[serde(default)]
    pub metadata: Option<Json>,
    /// Only `false`: the node stores nothing.
    #[serde(default)]
    pub store: Option<bool>,
    /// `auto` or `default`.
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Extension: top-k sampling (0 off).
    #[serde(default)]
    pub top_k: Option<u64>,
    /// Extension: min-p sampling in [0, 1].
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Extension: repetition penalty (> 0, 1 off).
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
}

/// Validated generation settings.
#[derive(Debug, Clone)]
pub struct GenSettings {
    /// Sampling parameters (seed of choice 0).
    pub sampling: SamplingParams,
    /// Requested `max_tokens` (None: up to [`GenSettings::default_max_tokens`], the cap and
    /// the context).
    pub max_tokens: Option<usize>,
    /// The agent's answer length for a request without `max_tokens`. Unlike a requested
    /// length it shrinks to fit the context instead of failing.
    pub default_max_tokens: usize,
    /// Choices.
    pub n: usize,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Streaming.
    pub stream: bool,
    /// A final usage chunk when streaming.
    pub include_usage: bool,
}

/// Limits the validation checks against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `server.max_tokens`
    pub max_tokens: usize,
    /// `server.max_n`
    pub max_n: usize,
    /// The chat model's vocabulary.
    pub vocab: usize,
    /// What a request that leaves the fields out gets.
    pub defaults: Defaults,
}

/// The agent's sampling for the fields a request leaves out (`[agent]` in gaia.toml), as
/// Ollama and llama-server apply their model's defaults. A request's own values win.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub temperature: f32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// The answer length without `max_tokens` (at most [`Limits::max_tokens`]).
    pub max_tokens: usize,
}

impl Defaults {
    /// OpenAI's own defaults: temperature 1, no nucleus, no penalty, up to the cap.
    pub const OPENAI: Defaults = Defaults {
        temperature: 1.0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        max_tokens: usize::MAX,
    };

    /// The `[agent]` section's.
    pub fn of(agent: &crate::config::AgentConfig) -> Defaults {
        Defaults {
            temperature: agent.temperature,
            top_p: agent.top_p,
            repetition_penalty: agent.repetition_penalty,
            max_tokens: agent.max_tokens,
        }
    }
}

fn finite(param: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Result<f32, ApiError> {
    let ok = v.is_finite() && v <= hi && if lo_open { v > lo } else { v >= lo };
    if !ok {
        let range = if lo_open { "(" } else { "[" };
        return Err(ApiError::invalid(
            param,
            format!("`{param}` is {v}; it must be a number in {range}{lo}, {hi}]"),
        ));
    }
    // Above an open lower bound, a value too small for an f32 is the smallest one, not 0.
    let f = v as f32;
    Ok(if lo_open && f <= lo as f32 {
        f32::MIN_POSITIVE + lo as f32
    } else {
        f
    })
}

/// Checks the shared fields; `max_tokens` is the value already chosen between `max_tokens`
/// and `max_completion_tokens`.
pub fn validate_common(
    c: &Common,
    max_tokens: Option<u64>,
    limits: Limits,
) -> Result<GenSettings, ApiError> {
    let mut s = SamplingParams {
        temperature: limits.defaults.temperature,
        top_p: limits.defaults.top_p,
        repetition_penalty: limits.defaults.repetition_penalty,
        ..SamplingParams::default()
    };
    if let Some(t) = c.temperature {
        s.temperature = finite("temperature", t, 0.0, 2.0, false)?;
    }
    if let Some(p) = c.top_p {
        s.top_p = finite("top_p", p, 0.0, 1.0, true)?;
    }
    if let Some(p) = c.presence_penalty {
        s.presence_penalty = finite("presence_penalty", p, -2.0, 2.0, false)?;
    }
    if let Some(p) = c.frequency_penalty {
        s.frequency_penalty = finite("frequency_penalty", p, -2.0, 2.0, false)?;
    }
    if let Some(p) = c.min_p {
        s.min_p = finite("min_p", p, 0.0, 1.0, false)?;
    }
    if let Some(p) = c.repetition_penalty {
        s.repetition_penalty = finite("repetition_penalty", p, 0.0, 10.0, true)?;
    }
    if let Some(k) = c.top_k {
        s.top_k = usize::try_from(k)
            .ok()
            .filter(|k| *k <= limits.vocab)
            .ok_or_else(|| ApiError::invalid("top_k", "`top_k` is larger than the vocabulary"))?;
    }
    s.seed = c.seed.map(|v| v as u64);
    if let Some(bias) = &c.logit_bias {
        s.logit_bias = logit_bias(bias, limits.vocab)?;
    }
    let n = match c.n {
        None => 1,
        Some(n) if n >= 1 && n <= limits.max_n as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "`n` is {n}; this node allows 1 to {} (server.max_n)",
                    limits.max_n
                ),
            ));
        }
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m >= 1 && m <= limits.max_tokens as u64 => Some(m as usize),
        Some(m) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "`max_tokens` is {m}; this node allows 1 to {} (server.max_tokens)",
                    limits.max_tokens
                ),
            ));
        }
    };
    let stop = stop_list(c.stop.as_ref())?;
    if c.store == Some(true) {
        return Err(ApiError::unsupported(
            "store",
            "the node stores no completions",
        ));
    }
    if let Some(tier) = &c.service_tier
        && tier != "auto"
        && tier != "default"
    {
        return Err(ApiError::unsupported(
            "service_tier",
            "only `auto` and `default` exist here",
        ));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    s.validate(limits.vocab)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(GenSettings {
        sampling: s,
        max_tokens,
        default_max_tokens: limits
            .defaults
            .max_tokens
            .clamp(1, limits.max_tokens.max(1)),
        n,
        stop,
        stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

fn logit_bias(bias: &BTreeMap<String, f64>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "`logit_bias` has {} entries; at most {MAX_LOGIT_BIAS}",
                bias.len()
            ),
        ));
    }
    bias.iter()
        .map(|(k, v)| {
            let id = k
                .parse::<u32>()
                .ok()
                .filter(|id| (*id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("`logit_bias` key {k:?} is not a token id below {vocab}"),
                    )
                })?;
            Ok((id, finite("logit_bias", *v, -100.0, 100.0, false)?))
        })
        .collect()
}

fn stop_list(stop: Option<&Stop>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if list.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` has {} sequences; at most {MAX_STOP_SEQUENCES}",
                list.len()
            ),
        ));
    }
    if list
        .iter()
        .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS)
    {
        return Err(ApiError::invalid(
            "stop",
            format!("every stop sequence must be 1 to {MAX_STOP_CHARS} characters"),
        ));
    }
    Ok(list)
}

/// Sets `logprobs`/`top_logprobs` of the chat API.
pub fn chat_logprobs(
    s: &mut SamplingParams,
    logprobs: Option<bool>,
    top: Option<u64>,
) -> Result<(), ApiError> {
    s.logprobs = logprobs.unwrap_or(false);
    if let Some(top) = top {
        if !s.logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        if top > MAX_TOP_LOGPROBS as u64 {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` is {top}; at most {MAX_TOP_LOGPROBS}"),
            ));
        }
        s.top_logprobs = top as usize;
    }
    Ok(())
}

/// Resolves `tool_choice`.
pub fn tool_choice(wire: Option<&ToolChoiceWire>, has_tools: bool) -> Result<ToolChoice, ApiError> {
    let choice = match wire {
        None if has_tools => ToolChoice::Auto,
        None => ToolChoice::None,
        Some(ToolChoiceWire::Mode(m)) => match m.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` {other:?} is not none, auto, required or a function"),
                ));
            }
        },
        Some(ToolChoiceWire::Named { kind, function }) => {
            if kind != "function" {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "`tool_choice.type` must be function",
                ));
            }
            ToolChoice::Named(function.name.clone())
        }
    };
    if !has_tools && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(ApiError::invalid(
            "tool_choice",
            "`tool_choice` asks for a tool call but no tools are given",
        ));
    }
    Ok(choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_tokens: 100,
            max_n: 2,
            vocab: 1000,
            defaults: Defaults::OPENAI,
        }
    }

    fn common(json: serde_json::Value) -> Common {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn hostile_numbers_are_named() {
        for (body, param) in [
            (serde_json::json!({"n": 0}), "n"),
            (serde_json::json!({"n": 1000000}), "n"),
            (serde_json::json!({"temperature": -1.0}), "temperature"),
            (serde_json::json!({"temperature": 2.5}), "temperature"),
            (serde_json::json!({"top_p": 1.5}), "top_p"),
            (serde_json::json!({"top_p": 0.0}), "top_p"),
            (
                serde_json::json!({"presence_penalty": 3}),
                "presence_penalty",
            ),
            (serde_json::json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (
                serde_json::json!({"logit_bias": {"99999": 1}}),
                "logit_bias",
            ),
            (serde_json::json!({"logit_bias": {"x": 1}}), "logit_bias"),
            (serde_json::json!({"stop": vec!["a"; 17]}), "stop"),
            (serde_json::json!({"stop": ""}), "stop"),
            (
                serde_json::json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ] {
            let e = validate_common(&common(body.clone()), None, limits()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
        let e = validate_common(&Common::default(), Some(101), limits()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = validate_common(&Common::default(), Some(0), limits()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn valid_settings_pass_through() {
        let c = common(serde_json::json!({
            "temperature": 0, "top_p": 0.5, "seed": 7, "n": 2, "stop": "x",
            "logit_bias": {"3": -100}, "stream": true, "stream_options": {"include_usage": true}
        }));
        let s = validate_common(&c, Some(10), limits()).unwrap();
        assert_eq!(s.sampling.temperature, 0.0);
        assert_eq!(s.sampling.seed, Some(7));
        assert_eq!(s.sampling.logit_bias, vec![(3, -100.0)]);
        assert_eq!(
            (s.n, s.max_tokens, s.stop.clone()),
            (2, Some(10), vec!["x".to_string()])
        );
        assert!(s.stream && s.include_usage);
    }

    #[test]
    fn omitted_fields_take_the_agents_defaults_and_given_ones_win() {
        let agent = Limits {
            defaults: Defaults {
                temperature: 0.3,
                top_p: 0.9,
                repetition_penalty: 1.1,
                max_tokens: 40,
            },
            ..limits()
        };
        let s = validate_common(&Common::default(), None, agent).unwrap();
        let p = &s.sampling;
        assert_eq!(
            (p.temperature, p.top_p, p.repetition_penalty),
            (0.3, 0.9, 1.1)
        );
        assert_eq!((s.max_tokens, s.default_max_tokens), (None, 40));
        let c = common(serde_json::json!({
            "temperature": 1.5, "top_p": 1, "repetition_penalty": 1
        }));
        let s = validate_common(&c, Some(90), agent).unwrap();
        let p = &s.sampling;
        assert_eq!(
            (p.temperature, p.top_p, p.repetition_penalty),
            (1.5, 1.0, 1.0)
        );
        assert_eq!(s.max_tokens, Some(90));
        // Only the omitted fields are filled in.
        let c = common(serde_json::json!({"temperature": 0}));
        let p = validate_common(&c, None, agent).unwrap().sampling;
        assert_eq!((p.temperature, p.top_p), (0.0, 0.9));
        // A default above the cap is the cap; OpenAI's defaults change nothing.
        let wide = Limits {
            defaults: Defaults {
                max_tokens: 10_000,
                ..agent.defaults
            },
            ..agent
        };
        let s = validate_common(&Common::default(), None, wide).unwrap();
        assert_eq!(s.default_max_tokens, 100);
        let s = validate_common(&Common::default(), None, limits()).unwrap();
        assert_eq!(
            s.sampling.temperature,
            SamplingParams::default().temperature
        );
        assert_eq!(s.default_max_tokens, 100);
    }

    #[test]
    fn tool_choice_forms() {
        let named: ToolChoiceWire =
            serde_json::from_value(serde_json::json!({"type":"function","function":{"name":"f"}}))
                .unwrap();
        assert_eq!(
            tool_choice(Some(&named), true).unwrap(),
            ToolChoice::Named("f".into())
        );
        assert_eq!(tool_choice(None, true).unwrap(), ToolChoice::Auto);
        assert_eq!(tool_choice(None, false).unwrap(), ToolChoice::None);
        let req = ToolChoiceWire::Mode("required".into());
        assert!(tool_choice(Some(&req), false).is_err());
        assert!(tool_choice(Some(&ToolChoiceWire::Mode("x".into())), true).is_err());
    }
}
