//! The OpenAI-compatible HTTP API (axum).
//!
//! Routes (all JSON; errors are OpenAI error bodies `{"error": {"message", "type", "param",
//! "code"}}`; the OpenAPI document is at `/openapi.json`):
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/chat/completions` | chat, streaming (SSE `data:` chunks, then `data: [DONE]`) or not; tools, `response_format`, RAG; extension fields `sources` and `tool_results` in the response (and in the last stream chunk) |
//! | `POST /v1/completions` | raw text completion |
//! | `POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}` | OpenAI's Responses API on the same chat pipeline (`responses.rs`): input items, function tools, `instructions`, `previous_response_id` (conversations stored in `<data_dir>/responses`), `store: false`, its stream events |
//! | `POST /v1/messages` | Anthropic's Messages API on the same chat pipeline (`anthropic.rs`): system blocks, `tool_use`/`tool_result`, its stream events and its error bodies |
//! | `POST /v1/embeddings` | sentence embeddings with the configured embedding model (paid, with `[payments]`) |
//! | `GET /v1/models` | the chat and embedding models |
//! | `POST /v1/retrieve` | knowledge-base search: `{"query", "top_k"?, "score_threshold"?, "mode"?}` |
//! | `GET`/`POST`/`DELETE /v1/kb/documents` | the knowledge base's documents and chunk counts; adding (the body, named by `?source=`) or removing one is for the operator only (`documents.rs`) |
//! | `GET /v1/info` | node address, models and their sha256, KB hash, versions, load, the domain's members with their load and price |
//! | `GET /health` | `{"status": "ok"}`; never needs a key |
//! | `GET /metrics` | Prometheus text |
//! | `GET /openapi.json` | the OpenAPI 3.1 document |
//!
//! The model name is the configured chat model's (`models.chat`, e.g. `smollm2-135m-instruct`)
//! or the alias `default`; anything else is a 404 `model_not_found`. Unknown request fields, and
//! fields the node cannot honour (`store: true`, `suffix`, token-array prompts, ...), are 400s
//! naming the field (`param`). Limits: `server.max_body_bytes` (413), `server.max_tokens` and
//! `server.max_n` (400), a prompt that does not fit the context (400
//! `context_length_exceeded`), a full generation queue (429 with `Retry-After`). With
//! `server.api_keys` set, every route but `/health` needs `Authorization: Bearer <key>` or
//! `x-api-key: <key>` (compared in constant time; 401 otherwise). A client that disconnects cancels its generation.
//! Sampling extensions accepted besides OpenAI's fields: `top_k`, `min_p`,
//! `repetition_penalty`, and `rag: false` to skip retrieval.

mod anthropic;
pub mod billing;
mod chat;
pub mod error;
mod responses;
pub use chat::SERVED_BY_HEADER;
mod documents;
mod metrics;
mod openapi;
pub mod types;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gaia_knowledge::SearchMode;
use serde_json::{Value as Json, json};
use subtle::ConstantTimeEq;

use crate::agent::{AppState, Shared, rag};
pub use billing::Caller;
use error::{ApiError, Body};
use types::{EmbeddingInput, EmbeddingRequest, RetrieveRequest};

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's routes with their middleware (auth, metrics, body limit), ready to serve. Routes
/// merged after this one (the web UI) are not behind the API key.
pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route(anthropic::PATH, post(anthropic::messages))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/retrieve", post(retrieve))
        .route(
            "/v1/kb/documents",
            get(documents::list)
                .post(documents::add)
                .delete(documents::remove),
        )
        .route("/v1/info", get(info))
        .route("/v1/balance", get(billing::balance))
        .route("/metrics", get(prometheus))
        .route("/openapi.json", get(openapi::document))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/health", get(health))
        .route_layer(middleware::from_fn_with_state(state.clone(), body_limit))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.config.server.max_body_bytes))
        .layer(middleware::from_fn(anthropic::error_shape))
        .fallback(fallback)
        .with_state(state);
    app(api)
}

/// Adds the routes of other modules (the web UI) to the API router.
fn app(api: Router) -> Router {
    api.merge(crate::ui::router())
}

async fn fallback(uri: axum::http::Uri) -> ApiError {
    ApiError::no_route(uri.path())
}

/// Middleware: a body announced larger than `server.max_body_bytes` is refused before it is
/// read (a body without a length is cut by the body limit layer instead).
async fn body_limit(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > st.config.server.max_body_bytes as u64) {
        return ApiError::too_large().into_response();
    }
    next.run(req).await
}

/// Middleware: who is calling ([`Caller`], left in the request's extensions). With
/// `[payments]` on, a `gaia-sk-` key is an access key (whose generations are paid, see
/// [`billing`]); any other key is compared in constant time against every configured key.
async fn auth(
    State(st): State<Shared>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let keys = &st.config.server.api_keys;
    // `Authorization: Bearer <key>` (OpenAI clients) or `x-api-key: <key>` (Anthropic's).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or("")
        .trim();
    let caller = if st.payments.is_some() && given.starts_with(crate::pay::ACCESS_KEY_PREFIX) {
        match crate::pay::parse_access_key(given) {
            Ok(key) => Caller::Paying(key),
            Err(e) => return ApiError::bad_access_key(&e.to_string()).into_response(),
        }
    } else if key_matches(keys, given) {
        Caller::Operator
    } else if keys.is_empty() {
        Caller::Anonymous
    } else {
        return ApiError::unauthorized().into_response();
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Whether `given` equals one of `keys`; every key is compared, each in constant time.
pub fn key_matches(keys: &[String], given: &str) -> bool {
    let mut found = subtle::Choice::from(0u8);
    for k in keys {
        found |= k.as_bytes().ct_eq(given.as_bytes());
    }
    bool::from(found) && !given.is_empty()
}

async fn health(State(st): State<Shared>) -> Response {
    let load = st.load();
    axum::Json(json!({"status": "ok", "in_flight": load.in_flight, "queued": load.queued}))
        .into_response()
}

fn model_entry(id: &str, created: u64, kind: &str) -> Json {
    json!({"id": id, "object": "model", "created": created, "owned_by": "gaia", "kind": kind})
}

async fn models(State(st): State<Shared>) -> Response {
    let created = now_secs() - st.started.elapsed().as_secs();
    let m = &st.config.models;
    let data = match (&st.local, &st.swarm) {
        // A gateway offers the chat models its domain's routable members serve.
        (None, Some(handle)) => {
            let mut names: Vec<String> = handle
                .members()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|member| member.routable)
                .map(|member| member.advert.model_name)
                .collect();
            names.sort();
            names.dedup();
            names
                .iter()
                .map(|name| model_entry(name, created, "chat"))
                .collect()
        }
        _ => vec![
            model_entry(&m.chat, created, "chat"),
            model_entry(&m.embedding, created, "embedding"),
        ],
    };
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(
    State(st): State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let created = now_secs() - st.started.elapsed().as_secs();
    let m = &st.config.models;
    let kind = if name == m.chat || name == "default" {
        "chat"
    } else if name == m.embedding {
        "embedding"
    } else {
        return Err(ApiError::unknown_model(&name, &[&m.chat, &m.embedding]));
    };
    Ok(axum::Json(model_entry(&name, created, kind)).into_response())
}

async fn info(State(st): State<Shared>) -> Result<Response, ApiError> {
    let kb = match st.kb.clone() {
        Some(kb) => {
            let summary = st
                .engine()?
                .run_blocking(move || {
                    kb.read().ok().map(|kb| {
                        let i = kb.info();
                        json!({"hash": i.hash.to_hex(), "documents": i.documents,
                            "chunks": i.chunks})
                    })
                })
                .await?;
            summary.unwrap_or(Json::Null)
        }
        None => Json::Null,
    };
    let m = &st.config.models;
    let models = match &st.local {
        Some(local) => json!({
            "chat": {"name": m.chat, "sha256": st.info.chat_sha256,
                "context": local.engine.model().model().max_context()},
            "embedding": {"name": m.embedding, "sha256": st.info.embedding_sha256,
                "dimensions": local.embedder.model().dim()},
        }),
        None => Json::Null,
    };
    let swarm = swarm_info(&st).await;
    Ok(axum::Json(json!({
        "address": st.info.address,
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": env!("CARGO_PKG_VERSION"),
        "data_dir": st.info.data_dir,
        "listen": st.listen.get().map(ToString::to_string),
        "gateway": st.local.is_none(),
        "models": models,
        "knowledge_base": kb,
        "load": st.load(),
        "swarm": swarm,
        "payments": billing::info(&st),
        "mcp": st.mcp.status(),
        "uptime_secs": st.started.elapsed().as_secs(),
    }))
    .into_response())
}

/// The swarm part of `/v1/info`: this node's peer id and addresses, and the member table
/// (`null` when the node is in no domain).
async fn swarm_info(st: &AppState) -> Json {
    let Some(handle) = &st.swarm else {
        return Json::Null;
    };
    let status = match handle.status().await {
        Ok(status) => status,
        Err(e) => return json!({"error": e.to_string()}),
    };
    let members: Vec<Json> = handle
        .members()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            json!({"node": m.node.to_string(),
                "peer_id": m.peer_id.map(|p| p.to_string()),
                "model": m.advert.model_name,
                "model_sha256": m.advert.model_hash.to_hex(),
                "routable": m.routable,
                "unroutable": m.unroutable,
                "in_flight": m.advert.load.in_flight,
                "price": {"prompt": m.advert.prompt_price, "completion": m.advert.completion_price},
                "queued": m.advert.load.queued,
                "last_heard_ms": m.last_heard_ms})
        })
        .collect();
    json!({
        "node": status.node.to_string(),
        "peer_id": status.peer_id.to_string(),
        "listen": status.listen_addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "connected": status.connected.len(),
        "topic": status.topic,
        "manifest_version": status.manifest_version,
        "local_status": status.local_status.map(|s| format!("{s:?}")),
        "nat": status.nat,
        "nat_changes": status.nat_changes,
        "relay_slots": status.relay_slots,
        "external_addrs": status.external_addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "relays": status.relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "hole_punches": status.hole_punches,
        "hole_punch_failures": status.hole_punch_failures,
        "penalised": status.penalised.iter()
            .map(|(peer, score)| json!({"peer_id": peer.to_string(), "score": score}))
            .collect::<Vec<_>>(),
        "members": members,
        "metering": handle.meter().map(|m| metering_info(m)),
    })
}

/// The receipts part of `/v1/info`: what this node earned serving, and what its clients owe
/// the nodes that served them (amounts as decimal strings: they may exceed 2^53).
fn metering_info(meter: &crate::swarm::meter::Meter) -> Json {
    use std::sync::atomic::Ordering::Relaxed;
    let totals = |t: &crate::pay::ledger::Totals| {
        json!({"receipts": t.receipts,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "amount": t.amount.to_string()})
    };
    let owed: serde_json::Map<String, Json> = meter
        .owed_by_clients()
        .iter()
        .map(|(node, t)| (node.to_string(), totals(t)))
        .collect();
    json!({
        "earned": totals(&meter.earned()),
        "owed_by_clients": owed,
        "receipts_accepted": meter.counters.accepted.load(Relaxed),
        "receipts_refused": meter.counters.refused.load(Relaxed),
        "receipts_missing": meter.counters.missing.load(Relaxed),
    })
}

async fn prometheus(State(st): State<Shared>) -> Response {
    let text = st.metrics.render(&st.load());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

async fn embeddings(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<billing::Caller>,
    Body(req): Body<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    let name = &st.config.models.embedding;
    if &req.model != name {
        return Err(ApiError::unknown_model(&req.model, &[name]));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` {other:?} is not float or base64"),
            ));
        }
    };
    let local = st.models()?;
    let dim = local.embedder.model().dim();
    if let Some(d) = req.dimensions
        && d != dim as u64
    {
        return Err(ApiError::unsupported(
            "dimensions",
            &format!("this model's embeddings have exactly {dim} dimensions"),
        ));
    }
    let inputs = match req.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
    };
    let max = st.config.server.max_embedding_inputs;
    if inputs.is_empty() || inputs.len() > max {
        return Err(ApiError::invalid(
            "input",
            format!("`input` must hold 1 to {max} texts"),
        ));
    }
    if inputs.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "input",
            "`input` texts must not be empty",
        ));
    }
    // Paid like generation, at this node's prompt price: reserved at the most the inputs can be (a
    // token per byte, the two special tokens, the model's window), debited what they were.
    let cap = local.embedder.model().max_seq_len() as u64;
    let bound = inputs
        .iter()
        .map(|t| (t.len() as u64 + 2).min(cap))
        .fold(0u64, u64::saturating_add);
    // Input tokens, at the prompt price.
    let tab = billing::open_tab(&st, &caller, (bound, 0)).await?;
    let embedder = local.embedder.clone();
    let (vectors, tokens) = local
        .engine
        .run_blocking(move || embedder.model().embed_counted(&inputs))
        .await?
        .map_err(|e| ApiError::bad_request(format!("cannot embed the input: {e}")))?;
    if let Some(tab) = &tab {
        tab.charge_here(tokens as u64, 0).await?;
    }
    let data: Vec<Json> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                json!(base64_f32(v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(
        axum::Json(json!({"object": "list", "data": data, "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        .into_response(),
    )
}

/// Little-endian f32s in standard base64, as OpenAI's `encoding_format: base64`.
fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn retrieve(
    State(st): State<Shared>,
    Body(req): Body<RetrieveRequest>,
) -> Result<Response, ApiError> {
    if req.query.trim().is_empty() {
        return Err(ApiError::invalid("query", "`query` must not be empty"));
    }
    let top_k = match req.top_k {
        None => st.config.agent.top_k,
        Some(k) if k >= 1 && k <= gaia_knowledge::MAX_TOP_K as u64 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!(
                    "`top_k` is {k}; it must be 1 to {}",
                    gaia_knowledge::MAX_TOP_K
                ),
            ));
        }
    };
    let mode = match req.mode.as_deref() {
        None | Some("hybrid") => SearchMode::Hybrid,
        Some("vector") => SearchMode::Vector,
        Some("keyword") => SearchMode::Keyword,
        Some(other) => {
            return Err(ApiError::invalid(
                "mode",
                format!("`mode` {other:?} is not hybrid, vector or keyword"),
            ));
        }
    };
    if req
        .score_threshold
        .is_some_and(|t| !t.is_finite() || t.abs() > f64::from(f32::MAX))
    {
        return Err(ApiError::invalid(
            "score_threshold",
            "`score_threshold` must be a finite number",
        ));
    }
    let threshold = req.score_threshold.map(|t| t as f32).or(match mode {
        SearchMode::Keyword => None,
        _ => Some(st.config.agent.score_threshold),
    });
    let hits = rag::search(&st, &req.query, top_k, threshold, mode).await?;
    let data: Vec<Json> = hits
        .into_iter()
        .map(|h| {
            json!({"source": h.source, "title": h.title, "heading": h.heading, "text": h.text,
                "score": h.score, "vector_score": h.vector_score, "chunk_id": h.chunk_id,
                "ordinal": h.ordinal})
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "query": req.query, "data": data})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_exactly() {
        let keys = vec!["secret-1".to_string(), "other".to_string()];
        assert!(key_matches(&keys, "secret-1"));
        assert!(key_matches(&keys, "other"));
        assert!(!key_matches(&keys, "secret-"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&keys, "secret-12"));
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 1.0, 1.0]), "AACAPwAAgD8AAIA/");
    }
}
