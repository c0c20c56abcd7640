//! Errors are values that become JSON responses:
//! `{"error": {"code", "message"}}`, plus `required` for `missing_scope`.
//! A 5xx says nothing internal; the detail goes to the log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use valet_core::Scope;
use valet_store::{SqlError, StoreError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub required: Option<Scope>,
    /// Seconds after which the same request may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            required: None,
            retry_after: None,
        }
    }

    /// Too much at once: 503 with `Retry-After`.
    pub fn busy(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
        }
    }

    pub fn missing_scope(scope: Scope) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "missing_scope",
            message: format!(
                "this token lacks the '{scope}' scope; grant it to the token (or to the val's runs) and try again"
            ),
            required: Some(scope),
            retry_after: None,
        }
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// A 500 whose body says nothing about the cause; the cause is logged.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(scope) = self.required {
            error["required"] = scope.to_string().into();
        }
        let mut response =
            (self.status, Json(serde_json::json!({ "error": error }))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
            StoreError::QuotaExceeded { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "quota_exceeded",
                e.to_string(),
            ),
            StoreError::ScopeNotHeld(scope) => ApiError::missing_scope(scope),
            StoreError::EmailQuota(over) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "email_quota_exceeded",
                over.to_string(),
            ),
            StoreError::DiskFull(detail) => {
                // A 5xx whose cause is not internal: the client may retry
                // later, and reads still work.
                tracing::error!(error = %detail, "disk full: a write was refused");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    "the server's disk is full, so this write was not stored; reads still work, retry once space is freed",
                )
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<SqlError> for ApiError {
    fn from(e: SqlError) -> ApiError {
        match e {
            SqlError::Forbidden(valet_store::StatementAccess::Write) => {
                ApiError::missing_scope(Scope::SQLITE_WRITE)
            }
            SqlError::Forbidden(valet_store::StatementAccess::Read) => {
                ApiError::missing_scope(Scope::SQLITE_READ)
            }
            SqlError::Sql(m) => ApiError::new(StatusCode::BAD_REQUEST, "sqlite_error", m),
            SqlError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "sqlite_error", m),
            SqlError::Timeout(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "sqlite_timeout", e.to_string())
            }
            SqlError::Full(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "database_full",
                e.to_string(),
            ),
            SqlError::TooLarge(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "result_too_large", m)
            }
            SqlError::NotHome(detail) => {
                tracing::warn!(detail, "a node's hold on a user's database was stale");
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "sqlite_home_moved",
                        "this user's database moved to another node while it was called; nothing ran, retry",
                    )
                }
            }
            SqlError::Store(s) => s.into(),
        }
    }
}

/// Turns error responses that axum or tower produced without a JSON body
/// (405, 413, 415, 422 from extractors) into our JSON shape, so callers see
/// one error format everywhere.
pub async fn jsonify_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // JSON errors pass through, and so do the pages' own HTML answers.
    let keep = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/html")
        });
    if keep {
        return response;
    }
    // Error bodies from an http val pass through untouched.
    if response
        .extensions()
        .get::<crate::runner::ValResponse>()
        .is_some()
    {
        return response;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not accept that method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than this server accepts",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "send the body as application/json",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => (
            "invalid_body",
            "the request body does not have the expected shape",
        ),
        StatusCode::BAD_REQUEST => ("invalid_request", "the request is malformed"),
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        s if s.is_server_error() => ("internal", "internal error; the server log has the details"),
        _ => ("error", "the request failed"),
    };
    // Keep the extractor's own explanation for 4xx: it names the bad field.
    let detail = if status.is_client_error() {
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body).trim().to_owned();
        if text.is_empty() {
            message.to_owned()
        } else {
            format!("{message}: {text}")
        }
    } else {
        message.to_owned()
    };
    ApiError::new(status, code, detail).into_response()
}
