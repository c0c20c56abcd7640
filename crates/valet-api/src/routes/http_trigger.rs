//! The public endpoints of http vals, on an origin of their own (never the
//! pages'): `/{user}/{val}/…` on the vals listener, or the whole path on
//! `<user>-<val>.<vals domain>`. One run per request.
//!
//! The path and query reach the val byte for byte, as the visitor sent
//! them. valet's own credentials never do: its session cookie and any
//! valet token in `Authorization` are removed first.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use valet_store::{Val, ValKind};

use super::blocking;
use crate::pages::session::COOKIE;
use crate::{ApiError, AppState};

pub async fn handle(State(state): State<AppState>, request: Request<Body>) -> Response {
    match dispatch(state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// Which val a request is for, and the path it should see.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `(user, val)`: the one val a path or host names (none when a host
    /// label has no dash).
    names: Vec<(String, String)>,
    path_and_query: String,
}

fn target(host: Option<&str>, vals_domain: Option<&str>, path_and_query: &str) -> Option<Target> {
    if let (Some(host), Some(domain)) = (host, vals_domain) {
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if let Some(label) = host
            .strip_suffix(domain)
            .and_then(|l| l.strip_suffix('.'))
            .filter(|l| !l.contains('.'))
        {
            // Split at the first dash only: one host names one val. (Trying
            // every dash would let user `a` with val `b-c` shadow user
            // `a-b`'s val `c` on the same host name, and with it that
            // val's cookies.) Users whose names hold a dash use paths.
            let names = label
                .split_once('-')
                .filter(|(u, v)| !u.is_empty() && !v.is_empty())
                .map(|(u, v)| vec![(u.to_owned(), v.to_owned())])
                .unwrap_or_default();
            return Some(Target {
                names,
                path_and_query: path_and_query.to_owned(),
            });
        }
    }
    // `/{user}/{val}` then the val's own path, from `/`.
    let rest = path_and_query.strip_prefix('/')?;
    let (user, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (val, tail) = rest.split_at(end);
    let (user, val) = (user.split('?').next().unwrap_or(user), val);
    if user.is_empty() || val.is_empty() {
        return None;
    }
    let path_and_query = match tail {
        "" => "/".to_owned(),
        t if t.starts_with('?') => format!("/{t}"),
        t => t.to_owned(),
    };
    Some(Target {
        names: vec![(user.to_owned(), val.to_owned())],
        path_and_query,
    })
}

async fn dispatch(state: AppState, request: Request<Body>) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let raw = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let target = target(host.as_deref(), state.config.vals_domain.as_deref(), &raw)
        .ok_or_else(|| ApiError::not_found("http val"))?;
    // A hot val's request usually finds its val in memory, without a hop
    // to the blocking pool.
    let cached = match &target.names[..] {
        [(user, val)] => state.store.cached_val(user, val),
        _ => None,
    };
    let val: Option<Val> = match cached {
        Some(val) => Some(val),
        None => {
            let names = target.names.clone();
            blocking(&state, move |s| {
                for (user, val) in &names {
                    if let Some(val) = s.val_by_names(user, val)? {
                        return Ok(Some(val));
                    }
                }
                Ok(None)
            })
            .await?
        }
    };
    let val = val
        .filter(|v| v.kind == ValKind::Http)
        .ok_or_else(|| ApiError::not_found("http val"))?;
    let runner = state.runner.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_runner",
            "this server does not run vals",
        )
    })?;
    parts.uri = target
        .path_and_query
        .parse()
        .map_err(|_| ApiError::bad_request("the request path is not a valid URI"))?;
    strip_valet_credentials(&state, &mut parts.headers);
    Ok(runner
        .serve_http(val, Request::from_parts(parts, body))
        .await)
}

/// Removes valet's session cookie and any valet token, so that a val never
/// sees a visitor's credentials for valet itself.
fn strip_valet_credentials(state: &AppState, headers: &mut HeaderMap) {
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split('=').next() != Some(COOKIE))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(value) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, value);
    }
    let is_valet_token = |value: &HeaderValue| {
        let Some(token) = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.get(7..)
                    .filter(|_| v[..7].eq_ignore_ascii_case("bearer "))
            })
            .map(str::trim)
        else {
            return false;
        };
        token.starts_with(valet_core::api_token::PREFIX)
            || state
                .keys
                .verify(token, (valet_store::time::now_ms() / 1000) as u64)
                .is_ok()
    };
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(is_valet_token)
    {
        headers.remove(header::AUTHORIZATION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(
        host: Option<&str>,
        domain: Option<&str>,
        path: &str,
    ) -> Option<(Vec<(String, String)>, String)> {
        target(host, domain, path).map(|t| (t.names, t.path_and_query))
    }

    fn one(u: &str, v: &str, p: &str) -> Option<(Vec<(String, String)>, String)> {
        Some((vec![(u.into(), v.into())], p.into()))
    }

    #[test]
    fn paths_reach_the_val_byte_for_byte() {
        assert_eq!(t(None, None, "/ada/hello"), one("ada", "hello", "/"));
        assert_eq!(t(None, None, "/ada/hello/"), one("ada", "hello", "/"));
        assert_eq!(
            t(None, None, "/ada/hello?q=1"),
            one("ada", "hello", "/?q=1")
        );
        assert_eq!(
            t(None, None, "/ada/hello/a%2Fb/c%20d?x=%41"),
            one("ada", "hello", "/a%2Fb/c%20d?x=%41")
        );
        assert_eq!(t(None, None, "/ada"), None);
        assert_eq!(t(None, None, "/"), None);
    }

    #[test]
    fn hosts_under_the_vals_domain_name_their_val() {
        let got = t(Some("ada-my-val.vals.test:8080"), Some("vals.test"), "/p?q").expect("target");
        assert_eq!(got.0, vec![("ada".to_owned(), "my-val".to_owned())]);
        assert_eq!(got.1, "/p?q");
        // Another host falls back to paths.
        assert_eq!(
            t(Some("other.test"), Some("vals.test"), "/ada/x"),
            one("ada", "x", "/")
        );
    }
}
