//! The page session: a signed cookie naming a stored session, the
//! extractor that turns it into a signed-in user (or a redirect to sign
//! in), CSRF checks, and the failed-login limiter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use valet_core::{Granted, GrantedSet, ScopeKind, ScopeSet};
use valet_store::User;

use crate::AppState;

pub const COOKIE: &str = "valet_session";
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

/// A signed-in person.
pub struct PageUser {
    pub user: User,
    pub csrf: String,
    pub session_id: String,
}

fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn mac(key: &[u8], id: &str) -> String {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    m.update(id.as_bytes());
    URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
}

/// `; Secure` when people reach valet over https: the cookie then never
/// travels in clear text.
pub fn secure_attribute(state: &AppState) -> &'static str {
    if state
        .config
        .public_url
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    {
        "; Secure"
    } else {
        ""
    }
}

/// Starts a session; returns the `Set-Cookie` value.
pub async fn start(state: &AppState, user_id: &str) -> Result<String, String> {
    let id = random_token()?;
    let csrf = random_token()?;
    let cookie = format!(
        "{COOKIE}={id}.{}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        mac(&state.session_key, &id),
        SESSION_TTL_MS / 1000,
        secure_attribute(state)
    );
    let user_id = user_id.to_owned();
    state
        .store
        .call(move |s| s.create_session(&id, &user_id, &csrf, SESSION_TTL_MS))
        .await
        .map_err(|e| e.to_string())?;
    Ok(cookie)
}

pub fn clear_cookie(state: &AppState) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure_attribute(state)
    )
}

pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The session id in a validly signed cookie.
fn session_id(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let (id, signature) = cookie(headers, COOKIE)?.split_once('.')?;
    let expected = mac(&state.session_key, id);
    bool::from(expected.as_bytes().ct_eq(signature.as_bytes())).then(|| id.to_owned())
}

/// Not signed in: go sign in, then come back.
pub struct SignIn(String);

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        Redirect::to(&format!("/login?next={}", self.0)).into_response()
    }
}

impl FromRequestParts<AppState> for PageUser {
    type Rejection = SignIn;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<PageUser, SignIn> {
        let back = SignIn(parts.uri.path().to_owned().replace(['&', '?', '#'], ""));
        let Some(id) = session_id(state, &parts.headers) else {
            return Err(back);
        };
        let lookup = id.clone();
        let found = state
            .store
            .call(move |s| {
                let Some(session) = s.session(&lookup)? else {
                    return Ok(None);
                };
                Ok(s.user_by_id(&session.user_id)?.map(|u| (u, session.csrf)))
            })
            .await
            .ok()
            .flatten();
        match found {
            Some((user, csrf)) => Ok(PageUser {
                user,
                csrf,
                session_id: id,
            }),
            None => Err(back),
        }
    }
}

impl PageUser {
    /// A proof of scope `S` on this person's own data. A signed-in person
    /// is the account's owner and holds every scope (pages are not audited
    /// as scope uses: the audit log is of tokens and runs).
    pub fn grant<S: ScopeKind>(&self) -> Granted<S> {
        #[expect(
            clippy::disallowed_methods,
            reason = "a signed-in person is the account's owner, with every scope"
        )]
        Granted::for_operator(&self.user.id)
    }

    /// Proof that this person holds every scope (what hands power on).
    pub fn grant_all(&self) -> GrantedSet {
        #[expect(
            clippy::disallowed_methods,
            reason = "a signed-in person is the account's owner, with every scope"
        )]
        GrantedSet::for_operator(&self.user.id, ScopeSet::all())
    }

    /// Refuses a form without this session's CSRF token.
    pub fn check_csrf(&self, submitted: &str) -> Result<(), CsrfRefused> {
        if bool::from(self.csrf.as_bytes().ct_eq(submitted.as_bytes())) {
            Ok(())
        } else {
            Err(CsrfRefused)
        }
    }
}

/// Failed sign-ins per username and per client, in a sliding window.
#[derive(Default)]
pub struct LoginLimiter {
    /// A std `Mutex`: held for a map update, never across an `.await`.
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

const WINDOW: Duration = Duration::from_secs(15 * 60);
const MAX_FAILURES: u32 = 5;

impl LoginLimiter {
    pub fn blocked(&self, keys: &[String]) -> bool {
        let Ok(map) = self.failures.lock() else {
            return true;
        };
        keys.iter().any(|k| {
            map.get(k)
                .is_some_and(|(n, since)| *n >= MAX_FAILURES && since.elapsed() < WINDOW)
        })
    }

    pub fn failed(&self, keys: &[String]) {
        if let Ok(mut map) = self.failures.lock() {
            for k in keys {
                let entry = map.entry(k.clone()).or_insert((0, Instant::now()));
                if entry.1.elapsed() >= WINDOW {
                    *entry = (0, Instant::now());
                }
                entry.0 += 1;
            }
        }
    }

    pub fn succeeded(&self, keys: &[String]) {
        if let Ok(mut map) = self.failures.lock() {
            for k in keys {
                map.remove(k);
            }
        }
    }
}

/// A form without this session's CSRF token.
#[derive(Debug)]
pub struct CsrfRefused;

impl IntoResponse for CsrfRefused {
    fn into_response(self) -> Response {
        let body = super::layout::page(
            "Form refused",
            None,
            maud::html! { h1 { "Form refused" } p { "This form has expired or did not come from valet. Go back, reload the page and try again." } },
        );
        (StatusCode::FORBIDDEN, body).into_response()
    }
}

/// A form posted by a signed-in user with this session's CSRF token: the
/// only way a page handler gets at a form's fields, so no form handler can
/// forget the check.
pub struct CheckedForm {
    pub user: PageUser,
    pub fields: Vec<(String, String)>,
}

impl axum::extract::FromRequest<AppState> for CheckedForm {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        state: &AppState,
    ) -> Result<CheckedForm, Response> {
        let (mut parts, body) = request.into_parts();
        let user = PageUser::from_request_parts(&mut parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let request = axum::extract::Request::from_parts(parts, body);
        let axum::Form(fields) = axum::Form::<Vec<(String, String)>>::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let submitted = fields
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        user.check_csrf(submitted)
            .map_err(IntoResponse::into_response)?;
        Ok(CheckedForm { user, fields })
    }
}
