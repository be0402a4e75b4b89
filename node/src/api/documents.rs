//! `/v1/kb/documents`: the knowledge base's documents, for the web UI and for scripts.
//!
//! Listing follows the API's access rules. Adding or removing a document changes what the
//! agent answers from, so only the node's operator may: a caller with a key from
//! `server.api_keys`, or, on a node without keys, a caller on the node's own machine (a
//! loopback address; a reverse proxy on the same machine makes every caller look local, so
//! such a node should set keys). The document is the request body, its name the `source`
//! query parameter; it is chunked and embedded like `gaia kb ingest` does, under the read
//! lock, so retrieval goes on meanwhile, and stored under the write lock. The node's adverts
//! then carry the new knowledge-base hash.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gaia_knowledge::{IngestError, SourceInfo};
use serde_json::{Value as Json, json};

use super::Caller;
use super::error::ApiError;
use crate::agent::{AppState, Shared};

/// The caller's address (absent when the router is served without connection info).
type Peer = axum::Extension<ConnectInfo<SocketAddr>>;

/// The `source` query parameter of an upload or a removal.
#[derive(Debug, serde::Deserialize)]
pub struct SourceQuery {
    source: Option<String>,
}

fn no_kb() -> ApiError {
    ApiError::not_found(
        "knowledge_base",
        "this node has no knowledge base ([knowledge] enabled = false)",
    )
}

fn document(s: &SourceInfo) -> Json {
    json!({"source": s.source, "title": s.title, "content_type": s.content_type.to_string(),
        "chunks": s.chunks, "text_bytes": s.text_bytes, "digest": s.digest.to_string()})
}

/// Whether the caller may change the knowledge base (see the module's documentation).
fn check_operator(caller: &Caller, peer: Option<Peer>) -> Result<(), ApiError> {
    let local = peer.is_some_and(|axum::Extension(ConnectInfo(addr))| addr.ip().is_loopback());
    match caller {
        Caller::Operator => Ok(()),
        Caller::Anonymous if local => Ok(()),
        _ => Err(ApiError {
            code: Some("operator_only"),
            ..ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "only the node's operator may change its knowledge base: send a key from \
                 server.api_keys, or, on a node without keys, ask from the node's own machine",
            )
        }),
    }
}

/// The longest document name, in characters (the store's limit is 4096 bytes).
pub const MAX_SOURCE_CHARS: usize = gaia_knowledge::MAX_SOURCE_BYTES / 4;

fn source_param(query: SourceQuery) -> Result<String, ApiError> {
    let source = query.source.unwrap_or_default();
    if source.trim().is_empty() || source.chars().count() > MAX_SOURCE_CHARS {
        return Err(ApiError::invalid(
            "source",
            format!(
                "`source` (a query parameter of 1 to {MAX_SOURCE_CHARS} characters) names \
                 the document, such as `guide.md`"
            ),
        ));
    }
    Ok(source)
}

/// The status an ingest failure gets: the client's document or the node's fault.
fn ingest_error(e: IngestError) -> ApiError {
    let message = e.to_string();
    match e {
        IngestError::TooLarge { .. } => ApiError {
            code: Some("document_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
        },
        IngestError::Unsupported { .. } => ApiError {
            code: Some("unsupported_document"),
            ..ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                message,
            )
        },
        IngestError::Store(_) | IngestError::Embed { .. } => ApiError::internal(message),
        IngestError::InvalidSource { .. } => ApiError::invalid("source", message),
        // The document itself: no text, binary, too many chunks.
        _ => ApiError::bad_request(message),
    }
}

/// `GET /v1/kb/documents`: every document, with its chunk count.
pub async fn list(State(st): State<Shared>) -> Result<Response, ApiError> {
    let kb = st.kb.clone().ok_or_else(no_kb)?;
    let listed = st
        .engine()?
        .run_blocking(move || {
            kb.read().ok().map(|kb| {
                let info = kb.info();
                let docs: Vec<Json> = kb.list_sources().iter().map(document).collect();
                json!({"object": "list", "hash": info.hash.to_hex(),
                    "documents": info.documents, "chunks": info.chunks, "data": docs})
            })
        })
        .await?;
    let body = listed.ok_or_else(|| ApiError::internal("the knowledge base lock is poisoned"))?;
    Ok(axum::Json(body).into_response())
}

/// `POST /v1/kb/documents?source=NAME`: adds (or replaces) a document; the body is its
/// content, `Content-Type` its type (Markdown, text, HTML, PDF…; guessed from the name when
/// absent or generic).
pub async fn add(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    peer: Option<Peer>,
    Query(query): Query<SourceQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_operator(&caller, peer)?;
    let kb = st.kb.clone().ok_or_else(no_kb)?;
    let source = source_param(query)?;
    // The store reads the charset, and takes a generic type as absent.
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let stored = st
        .engine()?
        .run_blocking(move || -> Result<Json, ApiError> {
            let poisoned = || ApiError::internal("the knowledge base lock is poisoned");
            // Chunked and embedded under the read lock: retrieval goes on meanwhile.
            let prepared = kb
                .read()
                .map_err(|_| poisoned())?
                .prepare_bytes(&body, &source, mime.as_deref(), &mut |_| {})
                .map_err(ingest_error)?;
            let mut kb = kb.write().map_err(|_| poisoned())?;
            let done = kb.commit(prepared).map_err(ingest_error)?;
            let info = kb
                .source(&done.source)
                .ok_or_else(|| ApiError::internal("the stored document is missing"))?;
            Ok(json!({"document": document(&info), "hash": kb.info().hash.to_hex()}))
        })
        .await??;
    refresh_advert(&st).await;
    tracing::info!(source = %stored["document"]["source"], "a document was added through the API");
    Ok((StatusCode::CREATED, axum::Json(stored)).into_response())
}

/// `DELETE /v1/kb/documents?source=NAME`: removes a document.
pub async fn remove(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    peer: Option<Peer>,
    Query(query): Query<SourceQuery>,
) -> Result<Response, ApiError> {
    check_operator(&caller, peer)?;
    let kb = st.kb.clone().ok_or_else(no_kb)?;
    let source = source_param(query)?;
    let name = source.clone();
    let removed = st
        .engine()?
        .run_blocking(move || -> Result<(bool, String), ApiError> {
            let mut kb = kb
                .write()
                .map_err(|_| ApiError::internal("the knowledge base lock is poisoned"))?;
            let removed = kb
                .remove_source(&name)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((removed, kb.info().hash.to_hex()))
        })
        .await??;
    let (removed, hash) = removed;
    if !removed {
        return Err(ApiError::not_found(
            "source",
            format!("the knowledge base has no document {source:?}"),
        ));
    }
    refresh_advert(&st).await;
    Ok(axum::Json(json!({"source": source, "deleted": true, "hash": hash})).into_response())
}

/// Tells the domain the knowledge base changed (its hash is in the node's adverts).
async fn refresh_advert(st: &AppState) {
    if let (Some(handle), Some(service)) = (&st.swarm, crate::start::local_service(st))
        && let Err(e) = handle.set_service(Some(service)).await
    {
        tracing::warn!(error = %e, "could not advertise the new knowledge-base hash");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(addr: &str) -> Option<Peer> {
        Some(axum::Extension(ConnectInfo(
            addr.parse().expect("an address"),
        )))
    }

    #[test]
    fn only_the_operator_changes_the_knowledge_base() {
        // A key from server.api_keys, from anywhere.
        assert!(check_operator(&Caller::Operator, peer("203.0.113.7:5000")).is_ok());
        // No keys set: the node's own machine only.
        assert!(check_operator(&Caller::Anonymous, peer("127.0.0.1:5000")).is_ok());
        assert!(check_operator(&Caller::Anonymous, peer("[::1]:5000")).is_ok());
        let remote = check_operator(&Caller::Anonymous, peer("203.0.113.7:5000")).unwrap_err();
        assert_eq!(remote.status, StatusCode::FORBIDDEN);
        assert!(remote.message.contains("operator"), "{}", remote.message);
        // Without the caller's address, nobody anonymous.
        assert!(check_operator(&Caller::Anonymous, None).is_err());
    }

    #[test]
    fn a_document_name_is_required_and_bounded() {
        let q = |s: Option<&str>| SourceQuery {
            source: s.map(str::to_string),
        };
        assert_eq!(source_param(q(Some("guide.md"))).unwrap(), "guide.md");
        for bad in [None, Some(""), Some("  ")] {
            assert_eq!(
                source_param(q(bad)).unwrap_err().param.as_deref(),
                Some("source")
            );
        }
        let long = "é".repeat(MAX_SOURCE_CHARS + 1);
        assert!(source_param(q(Some(&long))).is_err());
        assert!(source_param(q(Some(&"é".repeat(MAX_SOURCE_CHARS)))).is_ok());
    }
}
