//! The web pages: sign-in, API tokens (`/settings/tokens`) and a val's
//! settings (`/vals/{val}/settings`), server-rendered with maud, with
//! progressive JavaScript only for "copy" and "are you sure?".
//!
//! Sessions live in a signed, HttpOnly, SameSite=Strict cookie whose id is
//! stored (hashed) in the store; every form carries the session's CSRF
//! token, checked in constant time.

mod layout;
mod login;
mod scopes_form;
pub(crate) mod session;
mod tokens;
mod vals;

use axum::Router;
use axum::routing::{get, post};

use crate::AppState;

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
}
