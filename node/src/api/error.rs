//! [`ApiError`] as an HTTP response: every failure as the OpenAI error body
//! `{"error": {"message", "type", "param", "code"}}` (the type itself is the pipeline's,
//! [`crate::agent::error`]), and [`Body`], the JSON extractor whose rejections (malformed JSON,
//! wrong types, invalid UTF-8, unknown fields, too large) are [`ApiError`]s too.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

pub use crate::agent::error::ApiError;

/// The errors only the HTTP layer gives (the pipeline's are in [`crate::agent::error`]).
impl ApiError {
    /// 413 for a body over `server.max_body_bytes`.
    pub fn too_large() -> ApiError {
        ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is larger than server.max_body_bytes allows",
            )
        }
    }

    /// 401
    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or invalid API key: send `Authorization: Bearer <key>` with a key from \
                 server.api_keys",
            )
        }
    }

    /// 404 for something named by `param` that does not exist (a stored response).
    pub fn not_found(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.into()),
            code: Some("not_found"),
            ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    /// 404 for a route that does not exist.
    pub fn no_route(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("there is no route {path}; see /openapi.json for the routes"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Request types that list their accepted top-level fields, so an unknown one is named.
pub trait Fields {
    /// The accepted top-level field names.
    const FIELDS: &'static [&'static str];
}

/// A JSON request body, with OpenAI-shaped rejections.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Fields,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let BodyJson(parsed, _) = BodyJson::from_request(req, state).await?;
        Ok(Body(parsed))
    }
}

/// A JSON request body parsed like [`Body`], together with the JSON value it came from (for
/// handlers that pass the request on, such as a relayed chat).
#[derive(Debug)]
pub struct BodyJson<T>(pub T, pub serde_json::Value);

impl<S, T> FromRequest<S> for BodyJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Fields,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large()
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
        let (parsed, value) = parse_body_value(&bytes)?;
        Ok(BodyJson(parsed, value))
    }
}

/// Parses a JSON body into `T`: syntax, unknown top-level fields, then types (naming the
/// field path).
pub fn parse_body<T: DeserializeOwned + Fields>(bytes: &[u8]) -> Result<T, ApiError> {
    parse_body_value(bytes).map(|(parsed, _)| parsed)
}

/// [`parse_body`], also returning the JSON value.
fn parse_body_value<T: DeserializeOwned + Fields>(
    bytes: &[u8],
) -> Result<(T, serde_json::Value), ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::bad_request(
            "the request body is not valid UTF-8; send JSON encoded as UTF-8",
        ));
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON ({e}); send a JSON object"
        ))
    })?;
    integral_floats_as_integers(&mut value);
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    if let Some(unknown) = object.keys().find(|k| !T::FIELDS.contains(&k.as_str())) {
        return Err(ApiError {
            code: Some("unknown_parameter"),
            ..ApiError::invalid(
                unknown,
                format!("unrecognized request argument supplied: {unknown}"),
            )
        });
    }
    let parsed = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            // Flattened fields lose their path: find the field whose removal changes the error.
            path = blame_field::<T>(&value, &inner).unwrap_or(path);
        }
        ApiError::invalid(&path, format!("invalid value for `{path}`: {inner}"))
    })?;
    Ok((parsed, value))
}

/// Writes every number with no fractional part (`1.0`, `2e3`) as an integer, as JSON Schema
/// counts it: clients that build bodies from floats (JavaScript, pydantic) send `max_tokens`
/// as `64.0`. Only magnitudes up to 2^53 are converted, where a float holds every integer: an
/// integer literal too large for 64 bits (which serde_json reads as a rounded float) stays a
/// float, and so is refused where an integer is expected.
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let Some(f) = n.as_f64() else { return };
            const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
            if f.fract() != 0.0 || f.abs() > EXACT {
                return;
            }
            *value = if f >= 0.0 {
                Value::from(f as u64)
            } else {
                Value::from(f as i64)
            };
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

fn blame_field<T: DeserializeOwned>(value: &serde_json::Value, error: &str) -> Option<String> {
    let object = value.as_object()?;
    object.keys().find_map(|key| {
        let mut without = object.clone();
        without.remove(key);
        match serde_json::from_value::<T>(serde_json::Value::Object(without)) {
            Err(e) if e.to_string() == error || e.to_string().starts_with("missing field") => None,
            _ => Some(key.clone()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct T {
        #[allow(dead_code)]
        n: u32,
    }
    impl Fields for T {
        const FIELDS: &'static [&'static str] = &["n"];
    }

    #[test]
    fn body_errors_name_what_is_wrong() {
        assert!(parse_body::<T>(br#"{"n": 1}"#).is_ok());
        let e = parse_body::<T>(b"{\"n\": ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_body::<T>(br#"{"n": "x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = parse_body::<T>(br#"{"n": 1, "bogus": 2}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("bogus"));
        let e = parse_body::<T>(b"{\"n\": \"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
        // JSON Schema's integers include 1.0; a fraction or a number past u64 is still refused.
        assert!(parse_body::<T>(br#"{"n": 7.0}"#).is_ok());
        assert!(parse_body::<T>(br#"{"n": 7e0}"#).is_ok());
        assert_eq!(
            parse_body::<T>(br#"{"n": 7.5}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("n")
        );
        assert_eq!(
            parse_body::<T>(br#"{"n": 1e300}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("n")
        );
        assert_eq!(
            parse_body::<T>(br#"{"n": -1.0}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("n")
        );
        let e = parse_body::<T>(b"[1]").unwrap_err();
        assert!(e.message.contains("object"));
        let body = ApiError::unknown_model("x", &["a"]).body();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
    }
}
