//! Google's JSON error bodies: the Drive API shape and the OAuth token-endpoint shape.
//!
//! Drive errors look like (Resolve errors guide):
//! `{"error":{"code":N,"message":M,"errors":[{"domain":D,"reason":R,"message":M,...}]}}`.
//! The token endpoint answers RFC 6749 errors: `{"error":"invalid_grant","error_description":...}`.

use serde_json::{json, Value};

/// One Drive API error, ready to be turned into a response.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: u16,
    pub domain: &'static str,
    pub reason: &'static str,
    pub message: String,
    /// (locationType, location), e.g. ("parameter", "fileId").
    pub location: Option<(&'static str, String)>,
    /// Seconds for a `Retry-After` header (sent on 429).
    pub retry_after: Option<u64>,
    /// Extra headers, e.g. `WWW-Authenticate` on 401 or `Content-Range` on 416.
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: u16, domain: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            domain,
            reason,
            message: message.into(),
            location: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    pub fn at(mut self, kind: &'static str, loc: impl Into<String>) -> Self {
        self.location = Some((kind, loc.into()));
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "global", "badRequest", message)
    }

    /// Drive's answer to an unparsable parameter value (`q`, `pageToken`, `orderBy`, ...).
    pub fn invalid_param(param: &str) -> Self {
        ApiError::new(400, "global", "invalid", "Invalid Value").at("parameter", param)
    }

    pub fn invalid_param_msg(param: &str, message: impl Into<String>) -> Self {
        ApiError::new(400, "global", "invalid", message).at("parameter", param)
    }

    pub fn file_not_found(id: &str) -> Self {
        ApiError::new(404, "global", "notFound", format!("File not found: {id}.")).at("parameter", "fileId")
    }

    pub fn auth_error() -> Self {
        ApiError::new(401, "global", "authError", "Invalid Credentials")
            .at("header", "Authorization")
            .header("WWW-Authenticate", "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"")
    }

    pub fn login_required() -> Self {
        ApiError::new(401, "global", "required", "Login Required.")
            .at("header", "Authorization")
            .header("WWW-Authenticate", "Bearer realm=\"https://accounts.google.com/\"")
    }

    pub fn insufficient_scopes() -> Self {
        ApiError::new(403, "global", "insufficientPermissions", "Request had insufficient authentication scopes.")
    }

    /// Per-user request quota, as 403 (the older, still common, form).
    pub fn user_rate_limit() -> Self {
        ApiError::new(
            403,
            "usageLimits",
            "userRateLimitExceeded",
            "User Rate Limit Exceeded. Rate of requests for user exceed configured project quota.",
        )
    }

    /// Per-user request quota, as 429 with `Retry-After`.
    pub fn too_many_requests(retry_after: u64) -> Self {
        let mut e = ApiError::new(429, "usageLimits", "rateLimitExceeded", "Rate Limit Exceeded");
        e.retry_after = Some(retry_after.max(1));
        e
    }

    /// The 750 GB/day upload cap. Drive reports it as a 403 userRateLimitExceeded whose
    /// message is the lower-case "User rate limit exceeded." (not the request-rate text);
    /// clients such as rclone tell the two apart by that message.
    pub fn upload_cap() -> Self {
        ApiError::new(403, "usageLimits", "userRateLimitExceeded", "User rate limit exceeded.")
    }

    pub fn storage_quota() -> Self {
        ApiError::new(403, "usageLimits", "storageQuotaExceeded", "The user's Drive storage quota has been exceeded.")
    }

    /// A create into a folder (not a root) that holds its limit of direct children.
    pub fn folder_full() -> Self {
        ApiError::new(
            403,
            "global",
            "numChildrenInNonRootLimitExceeded",
            "The limit for this folder's number of children (files and folders) has been exceeded.",
        )
    }

    pub fn download_quota() -> Self {
        ApiError::new(
            403,
            "usageLimits",
            "downloadQuotaExceeded",
            "The download quota for this file has been exceeded.",
        )
    }

    pub fn backend(status: u16) -> Self {
        match status {
            503 => ApiError::new(503, "global", "backendError", "Service Unavailable"),
            502 => ApiError::new(502, "global", "badGateway", "Bad Gateway"),
            _ => ApiError::new(500, "global", "backendError", "Backend Error"),
        }
    }

    pub fn not_writable() -> Self {
        ApiError::new(
            403,
            "global",
            "fieldNotWritable",
            "The resource body includes fields which are not directly writable.",
        )
    }

    pub fn body(&self) -> Value {
        let mut item = json!({ "domain": self.domain, "reason": self.reason, "message": self.message });
        if let Some((kind, loc)) = &self.location {
            item["locationType"] = json!(kind);
            item["location"] = json!(loc);
        }
        json!({ "error": { "code": self.status, "message": self.message, "errors": [item] } })
    }
}

/// An OAuth 2.0 token-endpoint error (RFC 6749 section 5.2 shape, as Google sends it).
#[derive(Debug, Clone)]
pub(crate) struct OAuthError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError { status, error, description: description.into() }
    }
    pub fn invalid_grant(description: impl Into<String>) -> Self {
        OAuthError::new(400, "invalid_grant", description)
    }
    pub fn body(&self) -> Value {
        json!({ "error": self.error, "error_description": self.description })
    }
}
