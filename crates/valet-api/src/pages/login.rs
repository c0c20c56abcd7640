//! Sign-in and sign-out.

use axum::Form;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::layout::page;
use super::session::{self, PageUser};
use crate::AppState;
use valet_core::password;

const LOGIN_CSRF: &str = "valet_login_csrf";

#[derive(Deserialize)]
pub struct Next {
    next: Option<String>,
}

/// Only a path on this site: `next` must not send people to another one.
/// Browsers drop tabs and line breaks from URLs and read `\` as `/`, so
/// `/\t/evil.example` and `/\\evil` mean `//evil...`, another site: any
/// character outside a plain path (or a second leading slash) sends
/// people to `/` instead.
fn safe_next(next: Option<&str>) -> String {
    let plain = |n: &str| {
        n.starts_with('/')
            && !n[1..].starts_with('/')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%?".contains(&b))
    };
    match next {
        Some(n) if plain(n) => n.to_owned(),
        _ => "/".into(),
    }
}

fn form_page(state: &AppState, next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let mut token = [0u8; 24];
    let _ = getrandom::fill(&mut token);
    let token = hex::encode(token);
    let body = page(
        "Sign in",
        None,
        html! {
            section.narrow {
                h1 { "Sign in to valet" }
                @if let Some(e) = error { p.notice role="alert" { (e) } }
                form method="post" action="/login" class="grid" {
                    input type="hidden" name="csrf" value=(token);
                    input type="hidden" name="next" value=(next);
                    label for="username" { "Username" }
                    input #username type="text" name="username" autocomplete="username" required autofocus;
                    label for="password" { "Password" }
                    input #password type="password" name="password" autocomplete="current-password" required;
                    button.primary type="submit" { "Sign in" }
                }
            }
        },
    );
    (
        status,
        [(
            header::SET_COOKIE,
            format!(
                "{LOGIN_CSRF}={token}; Path=/login; HttpOnly; SameSite=Strict; Max-Age=3600{}",
                session::secure_attribute(state)
            ),
        )],
        body,
    )
        .into_response()
}

pub async fn form(State(state): State<AppState>, Query(q): Query<Next>) -> Response {
    form_page(&state, &safe_next(q.next.as_deref()), None, StatusCode::OK)
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

pub async fn submit(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    let cookie_token = session::cookie(&headers, LOGIN_CSRF).unwrap_or("");
    if cookie_token.is_empty() || cookie_token != form.csrf {
        return form_page(
            &state,
            &next,
            Some("The sign-in form expired; please try again."),
            StatusCode::FORBIDDEN,
        );
    }
    let keys = vec![
        format!("user:{}", form.username.to_lowercase()),
        format!("ip:{}", peer.ip()),
    ];
    if state.login_limiter.blocked(&keys) {
        return form_page(
            &state,
            &next,
            Some("Too many failed attempts; wait 15 minutes and try again."),
            StatusCode::TOO_MANY_REQUESTS,
        );
    }
    let username = form.username.clone();
    let user = state
        .store
        .call(move |s| s.user_by_name(&username))
        .await
        .ok()
        .flatten();
    // Verify against a dummy hash when the user does not exist, so timing
    // does not tell which usernames exist.
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0r5Sd0YxYsR7ZTqcqKWcxw0Q8s4Bv0Hn2qO6P4y0m1A";
    let stored = user
        .as_ref()
        .and_then(|u| u.password_hash.clone())
        .unwrap_or_else(|| DUMMY.to_owned());
    let password = form.password.clone();
    let ok = tokio::task::spawn_blocking(move || password::verify(&password, &stored))
        .await
        .unwrap_or(false);
    match user.filter(|_| ok) {
        Some(user) => {
            state.login_limiter.succeeded(&keys);
            match session::start(&state, &user.id).await {
                Ok(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response(),
                Err(e) => crate::ApiError::internal(e).into_response(),
            }
        }
        None => {
            state.login_limiter.failed(&keys);
            form_page(
                &state,
                &next,
                Some("Wrong username or password."),
                StatusCode::UNAUTHORIZED,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_is_only_a_path_on_this_site() {
        for bad in [
            "/\t/evil.example",
            "/\n/evil.example",
            "//evil",
            "/\\evil",
            "https://evil",
            "evil",
            "/ /evil",
            "/ü",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
        for good in [
            "/",
            "/settings/tokens",
            "/vals/my-val/settings",
            "/a%20b?x=1",
        ] {
            assert_eq!(safe_next(Some(good)), good);
        }
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(state): State<AppState>,
    user: PageUser,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(r) = user.check_csrf(&form.csrf) {
        return r.into_response();
    }
    let id = user.session_id.clone();
    let _ = state.store.call(move |s| s.delete_session(&id)).await;
    (
        [(header::SET_COOKIE, session::clear_cookie(&state))],
        Redirect::to("/login"),
    )
        .into_response()
}
