//! Who a caller is, decided before anything else of its request is looked at.
//!
//! Owns: the identity a TLS handshake gave (`PeerCert`), the bearer tokens, and the layer
//! every route (and the fallback) sits behind: it authorizes the caller from the request
//! head alone, and only then reads the body, within `MAX_BODY_BYTES` and
//! `BODY_READ_TIMEOUT`. A refused caller gets 401 (403 for a certificate that is not an
//! admin's) with a sentence that names no route's fields, and its connection is closed.
//!
//! Must not: parse a body, or let a handler run without a `Caller`.

use super::limits::{Timeout, BODY_READ_TIMEOUT, MAX_BODY_BYTES};
use super::{closing, ApiError, AppState};
use crate::certs::{ADMIN_URI_PREFIX, SITE_URI_PREFIX};
use crate::transport::tls::identities;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::Arc;

/// Who made a call, as far as the TLS handshake tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PeerCert {
    None,
    Admin(String),
    /// A replication identity (or a certificate naming no geomirror identity).
    Other(Vec<String>),
}

impl PeerCert {
    pub(super) fn from_chain(certs: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> PeerCert {
        let Some(first) = certs.and_then(|c| c.first()) else { return PeerCert::None };
        let ids = identities(first);
        match ids.iter().find_map(|i| i.strip_prefix(ADMIN_URI_PREFIX)) {
            Some(name) => PeerCert::Admin(name.to_owned()),
            None => PeerCert::Other(ids),
        }
    }
}

/// What the server knows of a connection before its first request: put into every request.
#[derive(Clone, Debug)]
pub(super) struct Connection {
    pub peer: PeerCert,
    pub remote: SocketAddr,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin(String),
    Token,
    /// The bearer of the metrics token: `GET /metrics` only.
    Metrics,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Admin(name) => write!(f, "admin:{name}"),
            Caller::Token => write!(f, "token"),
            Caller::Metrics => write!(f, "metrics-token"),
        }
    }
}

/// A caller allowed to act (an admin certificate or the admin token), as handlers take it.
/// The layer has already refused everyone else; this extractor refuses them again, so that a
/// route can never run unauthenticated, even one added outside the layer.
pub(super) struct Operator(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Operator, Response> {
        match parts.extensions.get::<Caller>() {
            Some(c @ (Caller::Admin(_) | Caller::Token)) => Ok(Operator(c.clone())),
            _ => Err(closing(ApiError(StatusCode::UNAUTHORIZED, ANONYMOUS.into()).into_response())),
        }
    }
}

/// Any authenticated caller, the metrics token included (for `GET /metrics`).
pub(super) struct AnyCaller;

impl<S: Send + Sync> FromRequestParts<S> for AnyCaller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<AnyCaller, Response> {
        match parts.extensions.get::<Caller>() {
            Some(_) => Ok(AnyCaller),
            None => Err(closing(ApiError(StatusCode::UNAUTHORIZED, ANONYMOUS.into()).into_response())),
        }
    }
}

const ANONYMOUS: &str = "anonymous calls are refused: present an admin client certificate or a bearer token";

/// The layer in front of every route: authorize from the head, then read the body (bounded
/// in size and time), then hand the request on with its `Caller`. Nothing of a refused
/// request's body is read, and its connection is closed after the answer.
pub(super) async fn authenticate(State(st): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let Some(conn) = parts.extensions.get::<Connection>().cloned() else {
        // Every connection is served with its `Connection`; without one, nobody is known.
        return closing(ApiError(StatusCode::UNAUTHORIZED, ANONYMOUS.into()).into_response());
    };
    let metrics_route = parts.method == Method::GET && parts.uri.path() == "/metrics";
    let caller = match authorize(&conn.peer, &parts.headers, &st, metrics_route) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(remote = %conn.remote, method = %parts.method, path = parts.uri.path(), status = e.0.as_u16(), "admin call refused");
            return closing(e.into_response());
        }
    };
    let body = match read_body(&parts.headers, body).await {
        Ok(b) => b,
        Err(e) => {
            tracing::info!(remote = %conn.remote, who = %caller, status = e.0.as_u16(), error = e.1, "admin request body refused");
            return closing(e.into_response());
        }
    };
    parts.extensions.insert(caller);
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// Reads a whole request body, refusing one over `MAX_BODY_BYTES` (by its declared length
/// before reading, or as it arrives) or slower than `BODY_READ_TIMEOUT`.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than {MAX_BODY_BYTES} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, http_body_util::Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))),
        Err(_) => {
            crate::metrics::admin_timeouts(Timeout::Body.as_str(), 1);
            Err(ApiError(StatusCode::REQUEST_TIMEOUT, format!("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs())))
        }
    }
}

/// An admin certificate, or the right bearer token; on `GET /metrics` the metrics token too.
/// Anyone else is refused.
fn authorize(peer: &PeerCert, headers: &HeaderMap, st: &AppState, metrics_route: bool) -> Result<Caller, ApiError> {
    if let PeerCert::Admin(name) = peer {
        return Ok(Caller::Admin(name.clone()));
    }
    if let PeerCert::Other(ids) = peer {
        let what = if ids.iter().any(|i| i.starts_with(SITE_URI_PREFIX)) {
            "a site (replication) certificate"
        } else {
            "a certificate naming no admin"
        };
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{what} is not an admin identity ({ids:?}); use an admin certificate from `geomirror certs --admin NAME`"),
        ));
    }
    // One credential per request: with two, which one counts would depend on the order.
    if headers.get_all(header::AUTHORIZATION).iter().count() > 1 {
        return Err(ApiError(StatusCode::BAD_REQUEST, "more than one Authorization header: send exactly one".into()));
    }
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(given) = bearer.map(|b| b.trim().as_bytes()) else {
        return Err(ApiError(StatusCode::UNAUTHORIZED, ANONYMOUS.into()));
    };
    let matches = |want: &Option<String>| want.as_deref().is_some_and(|w| constant_time_eq(given, w.as_bytes()));
    if matches(&st.token) {
        return Ok(Caller::Token);
    }
    if matches(&st.metrics_token) {
        return if metrics_route {
            Ok(Caller::Metrics)
        } else {
            Err(ApiError(StatusCode::UNAUTHORIZED, "the metrics token opens GET /metrics only".into()))
        };
    }
    Err(ApiError(StatusCode::UNAUTHORIZED, "invalid token".into()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
