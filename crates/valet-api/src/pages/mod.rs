//! The web pages: sign-in, API tokens (`/settings/tokens`) and a val's
//! settings (`/vals/{val}/settings`), server-rendered with maud, with
//! progressive JavaScript only for "copy" and "are you sure?".
//!
//! Sessions live in a signed, HttpOnly, SameSite=Strict cookie (Secure when
//! the public URL is https) whose id is stored (hashed) in the store; every
//! form carries the session's CSRF token, checked in constant time. Every
//! response of the pages forbids framing and carries a strict CSP: no
//! inline script or style, only valet's own `/assets/`.

mod layout;
mod login;
mod scopes_form;
pub(crate) mod session;
mod tokens;
mod vals;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::AppState;

/// The pages' content security policy: nothing inline, nothing from
/// elsewhere, forms only to valet, and no framing (clickjacking).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the pages' security headers to every response, errors and
/// redirects included.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    // A page may show a new token once: never keep it in a cache.
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

pub use session::LoginLimiter;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/settings/tokens") }),
        )
        .route("/login", get(login::form).post(login::submit))
        .route("/logout", post(login::logout))
        .route(
            "/settings/tokens",
            get(tokens::page_handler).post(tokens::create),
        )
        .route("/settings/tokens/{id}/scopes", post(tokens::update_scopes))
        .route("/settings/tokens/{id}/revoke", post(tokens::revoke))
        .route(
            "/settings/tokens/{id}/accept-defaults",
            post(tokens::accept_defaults),
        )
        .route("/vals", get(vals::index))
        .route(
            "/vals/{val}/settings",
            get(vals::settings_page).post(vals::update),
        )
        .route(
            "/vals/{val}/scope-requests/{scope}/{decision}",
            post(vals::decide),
        )
        .route("/vals/{val}/remove-unused", post(vals::remove_unused))
        .route(
            layout::CSS_PATH,
            get(|| async { asset("text/css; charset=utf-8", layout::CSS) }),
        )
        .route(
            layout::JS_PATH,
            get(|| async { asset("text/javascript; charset=utf-8", layout::JS) }),
        )
        .layer(middleware::from_fn(security_headers))
}
