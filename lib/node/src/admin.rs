//! The admin API: status, promote and demote over HTTPS, for operators and the CLI.
//!
//! Owns: the HTTPS listener (TLS 1.3 with the site's certificate, ring only), who a caller
//! is, and the JSON of each operation. A caller is either an admin certificate from the
//! deployment's CA (`geomirror:admin:<name>`, made by `geomirror certs --admin`) or a
//! bearer token read from `[admin] token_file`. Anonymous calls are refused (401), and so is
//! a site certificate (403): replication identities are not admin identities. Every
//! transition is logged with who asked and why. `GET /metrics` serves Prometheus, to an
//! admin or to the bearer of `[admin] metrics_token_file`, which opens nothing else.
//!
//! Must not: decide anything a core decides. Promotion and demotion are requests to the
//! volumes' state machines, which refuse what is unsafe (two writers, an undrained demote).

use crate::certs::{ADMIN_URI_PREFIX, SITE_URI_PREFIX};
use crate::transport::tls::{identities, provider, SiteTls, TlsError};
use crate::volume::{PromoteOutcome, Volume, VolumeStatus};
use axum::extract::{Extension, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use geomirror_core::Role;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a promotion or status request waits for the volumes' answers.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Most admin connections at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// Where the admin API listens and which bearer token it accepts.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
    /// A token good for `GET /metrics` only (Prometheus's).
    pub metrics_token: Option<String>,
}

/// Who made a call, as far as the TLS handshake tells.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PeerCert {
    None,
    Admin(String),
    /// A replication identity (or a certificate naming no geomirror identity).
    Other(Vec<String>),
}

/// An authenticated caller, for the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin(String),
    Token,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Admin(name) => write!(f, "admin:{name}"),
            Caller::Token => write!(f, "token"),
        }
    }
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

/// Binds the admin listener and serves until `shutdown`. Returns the bound address.
pub async fn start(
    cfg: AdminConfig,
    tls: &SiteTls,
    site: Arc<SiteControl>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(tls)?));
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|e| anyhow::anyhow!("cannot listen for the admin API on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState { site, token: cfg.token, metrics_token: cfg.metrics_token });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/promote", post(promote))
        .route("/v1/demote", post(demote))
        .route("/v1/drain", post(drain))
        .route("/v1/resume", post(resume))
        .route("/v1/checksums", post(checksums))
        .route("/v1/resolve-split-brain", post(resolve_split_brain))
        .with_state(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = shutdown.changed() => return,
            };
            let (tcp, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, say: back off rather than spin.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "admin TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "admin TLS handshake timed out");
                        return;
                    }
                };
                let peer = peer_cert(stream.get_ref().1.peer_certificates());
                let service = hyper_util::service::TowerToHyperService::new(app.layer(Extension(peer)));
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!(%remote, error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(addr)
}

/// HTTPS with the site's certificate. Client certificates are optional at the TLS level
/// (a token caller has none) but, when present, must chain to the deployment's CA.
fn server_config(tls: &SiteTls) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn peer_cert(certs: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> PeerCert {
    let Some(first) = certs.and_then(|c| c.first()) else { return PeerCert::None };
    let ids = identities(first);
    match ids.iter().find_map(|i| i.strip_prefix(ADMIN_URI_PREFIX)) {
        Some(name) => PeerCert::Admin(name.to_owned()),
        None => PeerCert::Other(ids),
    }
}

/// Who is calling: an admin certificate, or the right bearer token; anyone else is refused.
/// What every transition handler starts with: an authorized caller (checked before the body
/// is read) and what it asks, the body being optional.
struct Asked {
    caller: Caller,
    req: TransitionRequest,
}

impl FromRequest<Arc<AppState>> for Asked {
    type Rejection = Response;

    async fn from_request(request: Request, st: &Arc<AppState>) -> Result<Asked, Response> {
        let (parts, body) = request.into_parts();
        let peer = parts.extensions.get::<PeerCert>().cloned().unwrap_or(PeerCert::None);
        let caller = authorize(&peer, &parts.headers, st.token.as_deref()).map_err(IntoResponse::into_response)?;
        let body = Option::<Json<TransitionRequest>>::from_request(Request::from_parts(parts, body), st)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Asked { caller, req: body.map(|Json(b)| b).unwrap_or_default() })
    }
}

fn authorize(peer: &PeerCert, headers: &HeaderMap, token: Option<&str>) -> Result<Caller, ApiError> {
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
    let bearer = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match (bearer, token) {
        (Some(given), Some(want)) if constant_time_eq(given.trim().as_bytes(), want.as_bytes()) => Ok(Caller::Token),
        (Some(_), _) => Err(ApiError(StatusCode::UNAUTHORIZED, "invalid token".into())),
        (None, _) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "anonymous calls are refused: present an admin client certificate or a bearer token".into(),
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One volume in a status answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeReport {
    pub name: String,
    pub role: String,
    pub epoch: u64,
    pub phase: String,
    pub link_up: bool,
    pub drained: bool,
    pub applied: u64,
    pub record_extents: u64,
    pub record_bytes: u64,
    pub authoritative: bool,
    pub consistent: bool,
    pub split_brain: bool,
    pub lag_bytes: u64,
    /// Age of the oldest write the peer may lack: what a failover now would lose (the RPO).
    pub lag_seconds: f64,
    pub failback_debt_bytes: u64,
    pub resync_in_progress: bool,
    pub resync_remaining_bytes: u64,
    pub resync_bytes_copied: u64,
    /// Failback extents checked by digest on both sites instead of copied; the mismatched
    /// ones were copied after all (and count in `resync_bytes_copied`).
    pub resync_bytes_verified: u64,
    pub resync_extents_verified: u64,
    pub resync_extents_mismatched: u64,
    /// Seconds a failback of `resync_remaining_bytes` takes at the paced bulk rate.
    pub resync_estimated_seconds: Option<f64>,
    pub writes: u64,
    pub hits: u64,
    pub misses: u64,
    pub record_updates: u64,
    pub record_rtt_avg_ms: f64,
    pub extents_saved_aside: u64,
    /// Side files of failbacks: what this site held before a resync overwrote it.
    pub aside_files: Vec<AsideFile>,
    pub failed: bool,
    /// This site's store identity and its peer's, as remembered.
    #[serde(default)]
    pub store_id: String,
    #[serde(default)]
    pub peer_store: Option<String>,
    /// Secondary: this store lost acknowledged state (an amnesiac). Primary: the peer's did,
    /// and a full verified resync is owed to it.
    #[serde(default)]
    pub amnesiac: bool,
    #[serde(default)]
    pub amnesia_reason: Option<String>,
    /// Primary: the full verified resync under way, extents checked of the volume's.
    #[serde(default)]
    pub full_resync_checked_extents: Option<u64>,
    #[serde(default)]
    pub full_resync_total_extents: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AsideFile {
    pub path: String,
    pub extents: u64,
}

impl VolumeReport {
    fn new(name: &str, s: &VolumeStatus, bulk_bytes_per_sec: Option<u64>) -> VolumeReport {
        VolumeReport {
            name: name.to_owned(),
            role: role_name(s.role).into(),
            epoch: s.epoch.0,
            phase: s.phase.into(),
            link_up: s.link_up,
            drained: s.drained,
            applied: s.durable_applied.0,
            record_extents: s.record_extents,
            record_bytes: s.record_extents * s.extent_bytes,
            authoritative: s.authoritative,
            consistent: s.consistent,
            split_brain: s.split_brain,
            lag_bytes: s.lag_bytes,
            lag_seconds: s.lag_ms as f64 / 1000.0,
            failback_debt_bytes: s.failback_debt_bytes,
            resync_in_progress: s.resync_in_progress,
            resync_remaining_bytes: s.resync_remaining_bytes,
            resync_bytes_copied: s.resync_bytes_copied,
            resync_bytes_verified: s.resync_bytes_verified,
            resync_extents_verified: s.resync_extents_verified,
            resync_extents_mismatched: s.resync_extents_mismatched,
            resync_estimated_seconds: bulk_bytes_per_sec.map(|r| s.resync_remaining_bytes as f64 / r.max(1) as f64),
            writes: s.writes,
            hits: s.hits,
            misses: s.misses,
            record_updates: s.record_updates,
            record_rtt_avg_ms: s.record_rtt_avg_us as f64 / 1000.0,
            extents_saved_aside: s.extents_saved_aside,
            aside_files: Vec::new(),
            failed: s.failed,
            store_id: s.store_id.to_string(),
            peer_store: s.peer_store.map(|p| p.to_string()),
            amnesiac: s.amnesiac,
            amnesia_reason: s.amnesia_reason.clone(),
            full_resync_checked_extents: s.full_resync.map(|(c, _)| c),
            full_resync_total_extents: s.full_resync.map(|(_, t)| t),
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
    }
}

/// The answer of `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub site: String,
    pub peer: Option<String>,
    pub volumes: Vec<VolumeReport>,
}

async fn volume_status(v: &Volume) -> Result<VolumeStatus, ApiError> {
    let (tx, rx) = oneshot::channel();
    v.status(move |s| {
        let _ = tx.send(s);
    });
    match tokio::time::timeout(OPERATION_TIMEOUT, rx).await {
        Ok(Ok(s)) => Ok(s),
        _ => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("volume {} did not answer", v.name()))),
    }
}

/// Asks a volume's driver for an operator's request and waits (up to `wait`) for its reply:
/// a refusal becomes 409 with the volume's reason, silence 503.
async fn ask<T: Send + 'static>(v: &Volume, wait: Duration, send: impl FnOnce(&Volume, crate::volume::Reply<T>)) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    send(
        v,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Ok(t))) => Ok(t),
        Ok(Ok(Err(e))) => Err(ApiError(StatusCode::CONFLICT, format!("volume {}: {e}", v.name()))),
        _ => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("volume {} did not answer", v.name()))),
    }
}

async fn status(
    State(st): State<Arc<AppState>>,
    Extension(peer): Extension<PeerCert>,
    headers: HeaderMap,
) -> Result<Json<StatusReport>, ApiError> {
    authorize(&peer, &headers, st.token.as_deref())?;
    let mut volumes = Vec::new();
    for v in &st.site.volumes {
        let mut report = VolumeReport::new(v.name(), &volume_status(v).await?, st.site.bulk_bytes_per_sec);
        report.aside_files = v.aside_files().into_iter().map(|(p, extents)| AsideFile { path: p.display().to_string(), extents }).collect();
        volumes.push(report);
    }
    Ok(Json(StatusReport { site: st.site.site.clone(), peer: st.site.peer.clone(), volumes }))
}

/// `GET /metrics`: Prometheus's text format. An admin (certificate or token) may read it, and
/// so may the metrics token, which is good for nothing else.
async fn metrics(State(st): State<Arc<AppState>>, Extension(peer): Extension<PeerCert>, headers: HeaderMap) -> Result<Response, ApiError> {
    let metrics_token = st.metrics_token.as_deref().map(str::as_bytes);
    let bearer = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let by_metrics_token = matches!((bearer, metrics_token), (Some(b), Some(t)) if constant_time_eq(b.trim().as_bytes(), t));
    if !by_metrics_token {
        authorize(&peer, &headers, st.token.as_deref())?;
    }
    let body = crate::metrics::render();
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response())
}

/// The body of `POST /v1/promote` and `POST /v1/demote`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionRequest {
    /// Why: written to the log with the caller's identity.
    #[serde(default)]
    pub reason: String,
    /// Promote even though the primary is connected and alive (two writers).
    #[serde(default)]
    pub force: bool,
    /// Demote: how long to wait for the peer to apply everything (default 60 s).
    #[serde(default)]
    pub drain_timeout_secs: Option<u64>,
}

/// What a transition did, per volume.
#[derive(Debug, Serialize, Deserialize)]
pub struct TransitionReport {
    pub site: String,
    /// True when this request changed a role; false when it was already done.
    pub changed: bool,
    pub volumes: Vec<VolumeTransition>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeTransition {
    pub name: String,
    pub role: String,
    pub epoch: u64,
    pub changed: bool,
    /// Promote: extents in the record at promotion (the failback set starts as these).
    pub record_extents: Option<u64>,
    /// Promote: false if a degrade happened since the last resync: differences outside the
    /// record may exist, and data written during it may be missing here.
    pub authoritative: Option<bool>,
    /// Promote: false if the image was mid-resync (not a prefix of the old primary's history).
    pub consistent: Option<bool>,
    pub warning: Option<String>,
}

async fn promote(State(st): State<Arc<AppState>>, Asked { caller, req }: Asked) -> Result<Json<TransitionReport>, ApiError> {
    tracing::warn!(site = st.site.site, who = %caller, why = req.reason, force = req.force, "promote requested");
    let mut volumes = Vec::new();
    for v in &st.site.volumes {
        let outcome = ask(v, OPERATION_TIMEOUT, |v, reply| v.promote(req.force, reply))
            .await
            .inspect_err(|e| tracing::warn!(site = st.site.site, who = %caller, error = e.1, "promote refused"))?;
        volumes.push(match outcome {
            PromoteOutcome::Promoted(r) => {
                let warning = (!r.authoritative || !r.consistent || r.amnesiac).then(|| {
                    let mut w = Vec::new();
                    if r.amnesiac {
                        w.push("THIS SITE WAS AN AMNESIAC (promoted with --force): its store had lost state it acknowledged, so acknowledged writes may be missing anywhere on its image; its peer gets a full verified resync from it, saving aside whatever differs there");
                    }
                    if !r.authoritative {
                        w.push("THE RECORD IS NOT AUTHORITATIVE: the old primary degraded (wrote without the record) since the last resync; writes it acknowledged meanwhile may be missing here, and extents outside the record may differ");
                    }
                    if !r.consistent {
                        w.push("THE IMAGE IS INCONSISTENT: a resync was under way, so it is not a prefix of the old primary's history");
                    }
                    w.join("; ")
                });
                if let Some(w) = &warning {
                    tracing::error!(site = st.site.site, volume = v.name(), warning = w, "promoted with a warning");
                }
                tracing::warn!(site = st.site.site, volume = v.name(), who = %caller, why = req.reason, epoch = r.new_epoch.0, "promoted to primary");
                VolumeTransition {
                    name: v.name().into(),
                    role: "primary".into(),
                    epoch: r.new_epoch.0,
                    changed: true,
                    record_extents: Some(r.record_extents),
                    authoritative: Some(r.authoritative),
                    consistent: Some(r.consistent),
                    warning,
                }
            }
            PromoteOutcome::AlreadyPrimary { epoch } => VolumeTransition {
                name: v.name().into(),
                role: "primary".into(),
                epoch: epoch.0,
                changed: false,
                record_extents: None,
                authoritative: None,
                consistent: None,
                warning: None,
            },
        });
    }
    let changed = volumes.iter().any(|v| v.changed);
    Ok(Json(TransitionReport { site: st.site.site.clone(), changed, volumes }))
}

async fn demote(State(st): State<Arc<AppState>>, Asked { caller, req }: Asked) -> Result<Json<TransitionReport>, ApiError> {
    let drain = Duration::from_secs(req.drain_timeout_secs.unwrap_or(60).clamp(1, 3600));
    tracing::warn!(site = st.site.site, who = %caller, why = req.reason, ?drain, "demote requested");
    let mut volumes = Vec::new();
    for v in &st.site.volumes {
        let was_primary = volume_status(v).await?.role == Role::Primary;
        let epoch = ask(v, drain + OPERATION_TIMEOUT, |v, reply| v.demote(drain, reply))
            .await
            .inspect_err(|e| tracing::warn!(site = st.site.site, who = %caller, error = e.1, "demote failed"))?
            .epoch;
        if was_primary {
            tracing::warn!(site = st.site.site, volume = v.name(), who = %caller, why = req.reason, epoch = epoch.0, "demoted to secondary");
        }
        volumes.push(VolumeTransition {
            name: v.name().into(),
            role: "secondary".into(),
            epoch: epoch.0,
            changed: was_primary,
            record_extents: None,
            authoritative: None,
            consistent: None,
            warning: None,
        });
    }
    let changed = volumes.iter().any(|v| v.changed);
    Ok(Json(TransitionReport { site: st.site.site.clone(), changed, volumes }))
}

/// What `POST /v1/drain` found: per volume, the extents of the record.
#[derive(Debug, Serialize, Deserialize)]
pub struct DrainReport {
    pub site: String,
    pub volumes: Vec<DrainedVolume>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DrainedVolume {
    pub name: String,
    pub epoch: u64,
    pub record: Vec<u64>,
}

/// Stops taking writes on every volume and waits until the peer applied everything; the
/// site stays drained until `POST /v1/resume` or `POST /v1/demote`. The first step of a
/// switchover.
async fn drain(State(st): State<Arc<AppState>>, Asked { caller, req }: Asked) -> Result<Json<DrainReport>, ApiError> {
    let timeout = Duration::from_secs(req.drain_timeout_secs.unwrap_or(60).clamp(1, 3600));
    tracing::warn!(site = st.site.site, who = %caller, why = req.reason, ?timeout, "drain requested");
    let mut volumes = Vec::new();
    for v in &st.site.volumes {
        match ask(v, timeout + OPERATION_TIMEOUT, |v, reply| v.drain(timeout, reply)).await {
            Ok(d) => volumes.push(DrainedVolume { name: v.name().into(), epoch: d.epoch.0, record: d.record }),
            Err(e) => {
                // Nothing is left half drained: every volume takes writes again.
                for v in &st.site.volumes {
                    v.resume();
                }
                return Err(e);
            }
        }
    }
    Ok(Json(DrainReport { site: st.site.site.clone(), volumes }))
}

/// Ends a drain: the site takes writes again.
async fn resume(State(st): State<Arc<AppState>>, Asked { caller, req }: Asked) -> Result<Json<serde_json::Value>, ApiError> {
    tracing::warn!(site = st.site.site, who = %caller, why = req.reason, "resume requested");
    for v in &st.site.volumes {
        v.resume();
    }
    Ok(Json(serde_json::json!({ "site": st.site.site })))
}

/// The body of `POST /v1/checksums`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumRequest {
    pub volume: String,
    pub extents: Vec<u64>,
}

/// Most extents one checksum request may name.
const MAX_CHECKSUM_EXTENTS: usize = 1 << 20;

/// CRC-32C of extents of a volume's media, on either role: a switchover compares the
/// record's extents on both sites while the primary is drained.
async fn checksums(
    State(st): State<Arc<AppState>>,
    Extension(peer): Extension<PeerCert>,
    headers: HeaderMap,
    Json(req): Json<ChecksumRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&peer, &headers, st.token.as_deref())?;
    let Some(v) = st.site.volumes.iter().find(|v| v.name() == req.volume).cloned() else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no volume {:?} on this site", req.volume)));
    };
    if req.extents.len() > MAX_CHECKSUM_EXTENTS {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("at most {MAX_CHECKSUM_EXTENTS} extents per request")));
    }
    let extent_bytes = volume_status(&v).await?.extent_bytes;
    let sums = tokio::task::spawn_blocking(move || v.checksums(&req.extents, extent_bytes))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("cannot read those extents: {e:?}")))?;
    Ok(Json(serde_json::json!({ "volume": req.volume, "crc32c": sums })))
}

/// After a split brain, keeps this site's data: the peer saves its divergent extents aside
/// and is resynced from here. Nothing is resolved until an operator calls this.
async fn resolve_split_brain(State(st): State<Arc<AppState>>, Asked { caller, req }: Asked) -> Result<Json<serde_json::Value>, ApiError> {
    tracing::warn!(site = st.site.site, who = %caller, why = req.reason, "split-brain resolution requested: keep this site's data");
    for v in &st.site.volumes {
        ask(v, OPERATION_TIMEOUT, Volume::resolve_split_brain).await?;
    }
    Ok(Json(serde_json::json!({ "site": st.site.site, "kept": true })))
}
