//! The web UI at `/`, served by the node itself.
//!
//! Three static files (`ui/index.html`, `ui/app.js`, `ui/style.css`) are compiled into the
//! binary with `include_str!`, so the user needs no build step and the node needs no files on
//! disk. The page talks to the node's own API from the browser, in four views chosen by the
//! URL's hash: the chat (`/v1/models`, `/v1/chat/completions` with streaming), the domain
//! (`/v1/info`'s members, and the `x-gaia-node` header of each answer), the knowledge base
//! (`/v1/kb/documents`) and settings.
//!
//! Every response carries a strict Content-Security-Policy (only this origin's script, style and
//! API; no inline script, no frames, no forms posting elsewhere), `nosniff` and `no-referrer`.
//! The files are revalidated on every load (`no-cache` with a strong `ETag`), so an upgraded
//! node never serves a stale UI, and an unchanged one answers `304 Not Modified`.

use std::sync::OnceLock;

use axum::Router;
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest as _, Sha256};

/// The Content-Security-Policy of every UI response.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("ui/index.html"),
    content_type: "text/html; charset=utf-8",
};
const APP_JS: Asset = Asset {
    body: include_str!("ui/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE_CSS: Asset = Asset {
    body: include_str!("ui/style.css"),
    content_type: "text/css; charset=utf-8",
};

/// The paths the UI serves, for callers that list or exempt them (e.g. from API-key checks:
/// the page itself holds no data; the API calls it makes carry the key).
pub const PATHS: [&str; 4] = ["/", "/index.html", "/ui/app.js", "/ui/style.css"];

/// The router serving the UI; merge it into the node's top-level router.
///
/// It is generic over the router state so it merges into a router with any state.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style_css))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, etag_index(), &headers)
}

async fn app_js(headers: HeaderMap) -> Response {
    serve(&APP_JS, etag_app_js(), &headers)
}

async fn style_css(headers: HeaderMap) -> Response {
    serve(&STYLE_CSS, etag_style_css(), &headers)
}

fn etag_index() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| etag(INDEX.body))
}

fn etag_app_js() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| etag(APP_JS.body))
}

fn etag_style_css() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| etag(STYLE_CSS.body))
}

/// A strong entity tag: the first 128 bits of the body's sha256, quoted.
fn etag(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    format!("\"{}\"", hex::encode(&digest[..16]))
}

/// Whether an `If-None-Match` header value matches `tag` (a list of tags, or `*`).
fn matches_etag(if_none_match: &str, tag: &str) -> bool {
    if_none_match.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate == tag || candidate.strip_prefix("W/") == Some(tag)
    })
}

fn serve(asset: &Asset, tag: &'static str, request: &HeaderMap) -> Response {
    let not_modified = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| matches_etag(v, tag));
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.body.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_static(tag));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut request = Request::builder().uri(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        let request = request.body(Body::empty()).expect("a valid request");
        router::<()>()
            .oneshot(request)
            .await
            .expect("the router is infallible")
    }

    async fn body_text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("the body is readable");
        String::from_utf8(bytes.to_vec()).expect("the body is UTF-8")
    }

    fn header_of(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn serves_each_file_with_its_type_and_security_headers() {
        for (path, ty, marker) in [
            ("/", "text/html; charset=utf-8", "<title>Gaia chat</title>"),
            ("/index.html", "text/html; charset=utf-8", "/ui/app.js"),
            (
                "/ui/app.js",
                "text/javascript; charset=utf-8",
                "/v1/chat/completions",
            ),
            ("/ui/style.css", "text/css; charset=utf-8", "#composer"),
        ] {
            let response = get(path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(header_of(&response, header::CONTENT_TYPE), ty, "{path}");
            assert_eq!(
                header_of(&response, header::CONTENT_SECURITY_POLICY),
                CONTENT_SECURITY_POLICY
            );
            assert_eq!(
                header_of(&response, header::X_CONTENT_TYPE_OPTIONS),
                "nosniff"
            );
            assert_eq!(header_of(&response, header::CACHE_CONTROL), "no-cache");
            assert!(header_of(&response, header::ETAG).starts_with('"'));
            assert!(body_text(response).await.contains(marker), "{path}");
        }
    }

    #[tokio::test]
    async fn a_matching_etag_gets_304_without_a_body() {
        let first = get("/ui/app.js", None).await;
        let tag = header_of(&first, header::ETAG).to_string();
        let second = get("/ui/app.js", Some(&tag)).await;
        assert_eq!(second.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header_of(&second, header::ETAG), tag);
        assert!(body_text(second).await.is_empty());
        let other = get("/ui/app.js", Some("\"something-else\"")).await;
        assert_eq!(other.status(), StatusCode::OK);
    }

    #[test]
    fn etag_lists_and_weak_tags_match() {
        let tag = etag("x");
        assert!(matches_etag(&tag, &tag));
        assert!(matches_etag(&format!("\"a\", {tag}"), &tag));
        assert!(matches_etag(&format!("W/{tag}"), &tag));
        assert!(matches_etag("*", &tag));
        assert!(!matches_etag("\"nope\"", &tag));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_the_policy_would_block() {
        let html = INDEX.body;
        assert!(
            !html.contains("<script>"),
            "inline scripts are blocked by the CSP"
        );
        assert!(
            !html.contains("<style"),
            "inline styles are blocked by the CSP"
        );
        assert!(
            !html.contains(" style="),
            "inline style attributes are blocked by the CSP"
        );
        assert!(
            !html.contains("onclick"),
            "inline handlers are blocked by the CSP"
        );
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn the_script_never_writes_html() {
        let js = APP_JS.body;
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!js.contains(forbidden), "app.js must not use {forbidden}");
        }
    }
}
