//! The console page: three static files embedded in the binary (no framework, no CDN, nothing
//! fetched at run time). They carry no data; the page reads everything from `/v1`.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::Api;

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");

/// The paths of the static files: served without a token even beyond loopback.
const ASSETS: [&str; 3] = ["/", "/console.js", "/console.css"];

pub(super) fn is_asset(path: &str) -> bool {
    ASSETS.contains(&path)
}

pub(super) fn routes() -> Router<Api> {
    let file = |content_type: &'static str, body: &'static str| {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, content_type),
                    // The page may run only its own script and talk only to this origin.
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                    ),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                body,
            )
                .into_response()
        })
    };
    Router::new()
        .route(ASSETS[0], file("text/html; charset=utf-8", INDEX))
        .route(ASSETS[1], file("text/javascript; charset=utf-8", SCRIPT))
        .route(ASSETS[2], file("text/css; charset=utf-8", STYLE))
}
