//! `/settings/tokens`: list, create, edit scopes, revoke, and accept the
//! safe defaults for a held legacy token.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use valet_core::grant::{UserRead, UserWrite};
use valet_core::{ScopeSet, TokenScopes};
use valet_store::{MigrationState, TokenRecord, time};

use super::layout::{self, page};
use super::scopes_form::{self, field};
use super::session::{CheckedForm, PageUser};
use crate::AppState;

fn status(t: &TokenRecord) -> Markup {
    html! {
        @if let Some(reason) = &t.revoked_reason {
            @if reason == "leaked" {
                span.status-revoked { "revoked: leaked"
                    @if let Some(url) = &t.leak_url { @if !url.is_empty() { " at " a href=(url) rel="nofollow noreferrer" { (url) } } }
                    " (reported by GitHub secret scanning)" }
            } @else {
                span.status-revoked { "revoked: " (reason) }
            }
        } @else if t.is_expired(time::now_ms()) {
            span.status-expired { "expired" }
        } @else {
            span.status-active { "active" }
        }
    }
}

fn legacy_note(t: &TokenRecord) -> Markup {
    html! {
        @if t.scopes == TokenScopes::Legacy {
            div.notice {
                strong { "Legacy token" } ": made before scopes existed, it can do everything. "
                @match t.migration_state {
                    Some(MigrationState::Held) => {
                        "Held at full access by the scope migration ("
                        (t.migration_note.clone().unwrap_or_default()) "). Upgrade: make a new token with "
                        code { "val:write" } " if it needs it, or accept the safe defaults for this one."
                    }
                    _ => { "The scope migration will move it to the safe defaults." }
                }
            }
        }
    }
}

async fn render(
    state: &AppState,
    user: &PageUser,
    created: Option<(String, String)>,
    error: Option<String>,
) -> Response {
    let grant = user.grant::<UserRead>();
    let tokens = match state.store.call(move |s| s.list_tokens(&grant)).await {
        Ok(t) => t,
        Err(e) => return crate::ApiError::from(e).into_response(),
    };
    let csrf = &user.csrf;
    let body = html! {
        h1 { "API tokens" }
        p.muted { "Tokens let scripts and tools call valet's API as you. Give each one only the scopes it needs." }
        @if let Some(e) = &error { p.notice role="alert" { (e) } }
        @if let Some((name, token)) = &created {
            section #new-token aria-live="polite" {
                h2 { "Your new token “" (name) "”" }
                p.notice { strong { "Copy it now: " } "this is the only time valet shows it. Store it somewhere safe, never in code." }
                div.secret #token-value { (token) }
                p { button type="button" #copy-token data-copy="token-value" { "Copy" } }
            }
        }
        section {
            h2 { "Your tokens" }
            @if tokens.is_empty() { p.muted { "No tokens yet." } }
            @else {
                div.scroll { table {
                    thead { tr { th { "Name" } th { "Token" } th { "Scopes" } th { "Created" } th { "Last used" } th { "Expires" } th { "Status" } } }
                    tbody {
                        @for t in &tokens {
                            tr data-token-id=(t.id) {
                                td { (t.name) }
                                td { code { "vlt_…" (t.hint) } }
                                td { @if t.scopes == TokenScopes::Legacy { span.chip.write { "legacy: every scope" } } @else { (scopes_form::chips(t.scopes.effective())) } }
                                td { (layout::time(Some(t.created_at))) }
                                td { (layout::time(t.last_used_at)) }
                                td { @if t.expires_at.is_some() { (layout::time(t.expires_at)) } @else { "never" } }
                                td.status { (status(t)) }
                            }
                            @if t.is_active(time::now_ms()) {
                                tr { td colspan="7" {
                                    (legacy_note(t))
                                    details {
                                        summary { "Edit scopes or revoke “" (t.name) "”" }
                                        form method="post" action=(format!("/settings/tokens/{}/scopes", t.id)) {
                                            input type="hidden" name="csrf" value=(csrf);
                                            (scopes_form::control(t.scopes.effective()))
                                            button.primary type="submit" { "Save scopes" }
                                        }
                                        @if t.scopes == TokenScopes::Legacy {
                                            form method="post" action=(format!("/settings/tokens/{}/accept-defaults", t.id)) {
                                                input type="hidden" name="csrf" value=(csrf);
                                                button type="submit" { "Upgrade: accept the safe defaults" }
                                            }
                                        }
                                        form method="post" action=(format!("/settings/tokens/{}/revoke", t.id))
                                            data-confirm=(format!("Revoke “{}”? Anything using it stops working.", t.name)) {
                                            input type="hidden" name="csrf" value=(csrf);
                                            p { button.danger type="submit" { "Revoke" } }
                                        }
                                    }
                                } }
                            }
                        }
                    }
                } }
            }
        }
        section {
            h2 { "Create a token" }
            form method="post" action="/settings/tokens" class="grid" {
                input type="hidden" name="csrf" value=(csrf);
                label for="name" { "Name" }
                input #name type="text" name="name" required maxlength="100" placeholder="e.g. deploy script";
                label for="expiry" { "Expires" }
                select #expiry name="expiry" {
                    option value="never" { "Never" }
                    option value="7" { "In 7 days" }
                    option value="30" selected { "In 30 days" }
                    option value="90" { "In 90 days" }
                    option value="custom" { "On a date…" }
                }
                label for="expires_on" { "Date (for “On a date…”)" }
                input #expires_on type="date" name="expires_on";
                p.muted { "Scopes (preselected: the safe defaults, everything but val:write and user:write)" }
                (scopes_form::control(ScopeSet::default_val()))
                button.primary type="submit" { "Create token" }
            }
        }
    };
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, page("API tokens", Some((&user.user, csrf)), body)).into_response()
}

pub async fn page_handler(State(state): State<AppState>, user: PageUser) -> Response {
    render(&state, &user, None, None).await
}

pub async fn create(
    State(state): State<AppState>,
    CheckedForm { user, fields }: CheckedForm,
) -> Response {
    let scopes = match scopes_form::parse(&fields) {
        Ok(s) => s,
        Err(e) => return render(&state, &user, None, Some(e)).await,
    };
    let day = 86_400_000;
    let expires_at = match field(&fields, "expiry") {
        "never" | "" => None,
        "custom" => match time::parse(field(&fields, "expires_on")) {
            Some(at) if at > time::now_ms() => Some(at),
            _ => {
                return render(
                    &state,
                    &user,
                    None,
                    Some("Pick an expiry date in the future.".into()),
                )
                .await;
            }
        },
        days => match days.parse::<i64>() {
            Ok(d) if (1..=3650).contains(&d) => Some(time::now_ms() + d * day),
            _ => {
                return render(
                    &state,
                    &user,
                    None,
                    Some(format!("invalid expiry '{days}'")),
                )
                .await;
            }
        },
    };
    let name = field(&fields, "name").trim().to_owned();
    let grant = user.grant::<UserWrite>();
    let created = state
        .store
        .call(move |s| s.create_token(&grant, &name, TokenScopes::Scoped(scopes), expires_at))
        .await;
    match created {
        Ok((record, token)) => {
            render(
                &state,
                &user,
                Some((record.name, token.expose().to_owned())),
                None,
            )
            .await
        }
        Err(e) => render(&state, &user, None, Some(e.to_string())).await,
    }
}

pub async fn update_scopes(
    State(state): State<AppState>,
    Path(id): Path<String>,
    CheckedForm { user, fields }: CheckedForm,
) -> Response {
    let scopes = match scopes_form::parse(&fields) {
        Ok(s) => s,
        Err(e) => return render(&state, &user, None, Some(e)).await,
    };
    set_scopes(&state, &user, id, scopes).await
}

/// Moves a held legacy token to the safe defaults.
pub async fn accept_defaults(
    State(state): State<AppState>,
    Path(id): Path<String>,
    CheckedForm { user, .. }: CheckedForm,
) -> Response {
    set_scopes(&state, &user, id, ScopeSet::default_val()).await
}

/// Gives a token new scopes; the store refuses a revoked token, and the
/// page says so.
async fn set_scopes(state: &AppState, user: &PageUser, id: String, scopes: ScopeSet) -> Response {
    let grant = user.grant::<UserWrite>();
    let result = state
        .store
        .call(move |s| s.set_token_scopes(&grant, &id, scopes))
        .await;
    match result {
        Ok(_) => Redirect::to("/settings/tokens").into_response(),
        Err(valet_store::StoreError::NotFound(_)) => {
            (StatusCode::NOT_FOUND, "no such token").into_response()
        }
        Err(e) => render(state, user, None, Some(e.to_string())).await,
    }
}

pub async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    CheckedForm { user, .. }: CheckedForm,
) -> Response {
    let grant = user.grant::<UserWrite>();
    match state
        .store
        .call(move |s| s.revoke_token(&grant, &id, "by its owner"))
        .await
    {
        Ok(_) => Redirect::to("/settings/tokens").into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such token").into_response(),
    }
}
