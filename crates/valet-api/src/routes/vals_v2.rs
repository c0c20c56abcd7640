//! `/v2/vals` and `/v2/me/vals`: the hosted platform's val routes as the
//! official SDK (`@valtown/sdk`) calls them, over valet's own vals.
//!
//! A hosted v2 val is a project of files with a privacy setting; a valet val
//! is one module that only its owner can read. So a val made here starts as
//! an empty script (its code comes with `PATCH /v1/vals/{id}`), every val is
//! `private`, and a description is checked but not kept.
//! docs/COMPATIBILITY.md lists these differences.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use valet_core::ScopeSet;
use valet_store::{NewVal, StoreError, User, Val, ValKind};

use super::vals::DEFAULT_TIMEOUT_MS;
use super::{blocking, public_link};
use valet_core::Granted;
use valet_core::grant::{ValRead, ValWrite};

use crate::{ApiError, AppState, Caller};

const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;
const MAX_DESCRIPTION_CHARS: usize = 64;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Privacy {
    Public,
    Unlisted,
    Private,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    /// Required, as on the hosted API; every valet val is private whatever
    /// is asked, and the answer says so.
    #[allow(dead_code)]
    privacy: Privacy,
    description: Option<String>,
    #[serde(rename = "orgId")]
    org_id: Option<String>,
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    privacy: Option<Privacy>,
    user_id: Option<String>,
}

#[derive(Deserialize)]
pub struct MineQuery {
    limit: Option<usize>,
    #[serde(default)]
    offset: usize,
}

/// A val in the hosted API's v2 shape.
fn val_json(state: &AppState, val: &Val, owner: &User) -> serde_json::Value {
    serde_json::json!({
        "id": val.id,
        "name": val.name,
        "createdAt": valet_store::time::iso(val.created_at),
        "privacy": "private",
        "author": { "type": "user", "id": owner.id, "username": owner.username },
        "imageUrl": null,
        "description": null,
        "links": {
            "self": public_link(state, &format!("/v2/vals/{}", val.id)),
            "html": public_link(state, &format!("/vals/{}/settings", val.name)),
        },
    })
}

/// Query parameters, read after the scope check like bodies are.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

fn page_size(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::bad_request(format!(
            "limit {n} is out of range: use 1 to {MAX_LIMIT}"
        ))),
    }
}

/// The SDK's cursor pages send `links.next` back whole as the `cursor`, and
/// `links.next` is a URL (as the hosted API documents it): a cursor that is
/// a URL stands for the `cursor` in its query. A cursor is a val id.
fn cursor_value(raw: &str) -> Result<String, ApiError> {
    let cursor = match reqwest::Url::parse(raw) {
        Ok(url) => url
            .query_pairs()
            .find(|(name, _)| name == "cursor")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default(),
        Err(_) => raw.to_owned(),
    };
    if cursor
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Ok(cursor)
    } else {
        Err(ApiError::bad_request(format!(
            "invalid cursor '{cursor}': pass the cursor or the links.next URL of the previous page"
        )))
    }
}

fn owner(s: &valet_store::Store, user_id: &str) -> Result<User, StoreError> {
    s.user_by_id(user_id)?
        .ok_or_else(|| StoreError::NotFound("user".into()))
}

/// The caller's vals in creation order (ids are time-ordered), and the
/// caller as their author.
async fn vals_in_order(
    state: &AppState,
    grant: Granted<ValRead>,
) -> Result<(User, Vec<Val>), ApiError> {
    blocking(state, move |s| {
        let mut vals = s.list_vals(&grant)?;
        vals.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((owner(s, grant.user_id())?, vals))
    })
    .await
}

/// `GET /v2/vals`: the vals the caller can see. valet has no public vals,
/// so that is the caller's own; a filter for public or unlisted vals, or
/// for another author, finds none.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let q = query(q)?;
    let limit = page_size(q.limit)?;
    let cursor = q.cursor.as_deref().map(cursor_value).transpose()?;
    let visible = q.privacy.is_none_or(|p| p == Privacy::Private)
        && q.user_id.as_deref().is_none_or(|u| u == grant.user_id());
    let (owner, vals) = vals_in_order(&state, grant).await?;
    let after: Vec<&Val> = vals
        .iter()
        .filter(|v| visible && cursor.as_deref().is_none_or(|c| v.id.as_str() > c))
        .collect();
    let page = &after[..after.len().min(limit)];
    let mut links = serde_json::json!({
        "self": public_link(&state, &match &cursor {
            Some(c) => format!("/v2/vals?cursor={c}&limit={limit}"),
            None => format!("/v2/vals?limit={limit}"),
        }),
    });
    if after.len() > limit
        && let Some(last) = page.last()
    {
        links["next"] = public_link(
            &state,
            &format!("/v2/vals?cursor={}&limit={limit}", last.id),
        )
        .into();
    }
    Ok(Json(serde_json::json!({
        "data": page.iter().map(|v| val_json(&state, v, &owner)).collect::<Vec<_>>(),
        "links": links,
    })))
}

/// `GET /v2/me/vals`: the caller's vals, by offset.
pub async fn list_mine(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<MineQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let q = query(q)?;
    let limit = page_size(q.limit)?;
    let (owner, vals) = vals_in_order(&state, grant).await?;
    let page = vals.iter().skip(q.offset).take(limit);
    let link = |offset: usize| {
        public_link(
            &state,
            &format!("/v2/me/vals?offset={offset}&limit={limit}"),
        )
    };
    let mut links = serde_json::json!({ "self": link(q.offset) });
    if q.offset.saturating_add(limit) < vals.len() {
        links["next"] = link(q.offset + limit).into();
    }
    if q.offset > 0 {
        links["prev"] = link(q.offset.saturating_sub(limit)).into();
    }
    Ok(Json(serde_json::json!({
        "data": page.map(|v| val_json(&state, v, &owner)).collect::<Vec<_>>(),
        "links": links,
    })))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let (val, owner) = blocking(&state, move |s| {
        Ok((s.val_of_user(&grant, &id)?, owner(s, grant.user_id())?))
    })
    .await?;
    Ok(Json(val_json(&state, &val, &owner)))
}

/// `POST /v2/vals`: a new, empty script val. Its runs get the usual
/// default scopes, cut down to what the caller holds (the SDK cannot name
/// scopes, and a val never gets more than its maker).
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let grant = caller.require::<ValWrite>()?;
    let body = super::json_body(body)?;
    if body.org_id.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "valet has no organizations: leave out orgId to create the val in your own account",
        ));
    }
    if let Some(description) = &body.description
        && description.chars().count() > MAX_DESCRIPTION_CHARS
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("description is longer than {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    let cover = caller.require_within(ScopeSet::default_val())?;
    let new = NewVal {
        name: body.name,
        kind: ValKind::Script,
        code: String::new(),
        scopes: cover.scopes(),
        env: Default::default(),
        timeout_ms: DEFAULT_TIMEOUT_MS,
        schedule: None,
    };
    let (val, owner) = blocking(&state, move |s| {
        Ok((
            s.create_val(&grant, &cover, new)?,
            owner(s, grant.user_id())?,
        ))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(val_json(&state, &val, &owner))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_taken_from_a_next_link() {
        let ok = |raw: &str| cursor_value(raw).ok();
        assert_eq!(ok("val_0193").as_deref(), Some("val_0193"));
        assert_eq!(
            ok("http://127.0.0.1:7070/v2/vals?cursor=val_0193&limit=2").as_deref(),
            Some("val_0193")
        );
        assert_eq!(
            ok("http://127.0.0.1:7070/v2/vals?limit=2").as_deref(),
            Some("")
        );
        for bad in ["val_01&x=1", "http://h/v2/vals?cursor=%22%3E"] {
            let e = cursor_value(bad).err().map(|e| e.message);
            assert!(e.is_some_and(|m| m.contains("invalid cursor")), "{bad}");
        }
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(page_size(Some(100)).ok(), Some(100));
        for bad in [0, 101] {
            let e = page_size(Some(bad)).err().map(|e| e.message);
            assert!(e.is_some_and(|m| m.contains("1 to 100")), "{bad}");
        }
    }
}
