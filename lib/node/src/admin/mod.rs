//! The admin API: status, promote, demote and the rest over HTTPS, for operators and the CLI.
//!
//! Owns: the HTTPS service of a site's `[admin] listen`. A caller is either an admin
//! certificate from the deployment's CA (`geomirror:admin:<name>`, made by
//! `geomirror certs --admin`) or a bearer token read from `[admin] token_file`. Anonymous
//! calls are refused (401), and so is a site certificate (403): replication identities are
//! not admin identities. `GET /metrics` serves Prometheus, to an admin or to the bearer of
//! `[admin] metrics_token_file`, which opens nothing else. Every transition is logged with who
//! asked and why.
//!
//! The rooms: `server` (listener, TLS, each connection's deadlines and its slot), `limits`
//! (every bound, and who gets a slot: admin certificates have a reserve), `auth` (who the
//! caller is, decided in front of every route before its body is read) and `routes` (what
//! each operation does and answers; `verify` has online verify's).
//!
//! Must not: decide anything a core decides. Promotion and demotion are requests to the
//! volumes' state machines, which refuse what is unsafe (two writers, an undrained demote).

mod auth;
pub mod limits;
mod routes;
mod server;
mod verify;

pub use auth::Caller;
pub use routes::{
    ApproveRequest, AsideFile, ChecksumRequest, DrainReport, DrainedVolume, StatusReport, TransitionReport, TransitionRequest,
    VolumeReport, VolumeTransition,
};
pub use verify::{VerifyCancel, VerifyReport, VerifyRequest, VerifyStarted, MAX_LISTED_RANGES};

use crate::transport::tls::SiteTls;
use crate::volume::Volume;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Where the admin API listens and which bearer token it accepts.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
    /// A token good for `GET /metrics` only (Prometheus's).
    pub metrics_token: Option<String>,
}

/// What the API acts on: the site's name and volumes.
pub struct SiteControl {
    pub site: String,
    pub peer: Option<String>,
    pub volumes: Vec<Volume>,
    /// The paced bulk rate, for estimates of how long a failback takes.
    pub bulk_bytes_per_sec: Option<u64>,
}

struct AppState {
    site: Arc<SiteControl>,
    token: Option<String>,
    metrics_token: Option<String>,
}

/// An error as the API returns it: a status and a sentence for the operator.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Marks an answer as the connection's last: hyper closes after writing it.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Binds the admin listener and serves until `shutdown`. Returns the bound address.
pub async fn start(cfg: AdminConfig, tls: &SiteTls, site: Arc<SiteControl>, shutdown: watch::Receiver<bool>) -> anyhow::Result<SocketAddr> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server::server_config(tls)?));
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|e| anyhow::anyhow!("cannot listen for the admin API on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState { site, token: cfg.token, metrics_token: cfg.metrics_token });
    let app = routes::router().layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate)).with_state(state);
    tokio::spawn(server::serve(listener, acceptor, app, shutdown));
    Ok(addr)
}
