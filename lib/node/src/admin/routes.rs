//! The admin API's routes and their JSON: status, promote, demote, drain, resume, checksums,
//! split-brain resolution and `/metrics` (online verify's are in `verify.rs`).
//!
//! Owns: what each operation asks of the volumes and what it answers, and the checks of the
//! inputs that name a place in a volume (`checked_extents`: every extent is checked against
//! the volume's geometry, without overflow, before anything is read).
//!
//! Must not: decide anything a core decides, or authenticate: every handler runs behind
//! `auth::authenticate` and takes its `Operator` (or `AnyCaller`) as proof.

use super::auth::{AnyCaller, Operator};
use super::limits::MAX_CHECKSUM_EXTENTS;
use super::{ApiError, AppState};
use crate::volume::{OperatorReply, PromoteOutcome, RefusalKind, Volume, VolumeStatus};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use geomirror_core::{ExtentId, Geometry, HostError, Role};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a promotion or status request waits for the volumes' answers.
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What every transition handler starts with: an authorized caller and what it asks, the
/// body being optional.
struct Asked {
    caller: super::Caller,
    req: TransitionRequest,
}

impl FromRequest<Arc<AppState>> for Asked {
    type Rejection = Response;

    async fn from_request(request: Request, st: &Arc<AppState>) -> Result<Asked, Response> {
        let (mut parts, body) = request.into_parts();
        let Operator(caller) = <Operator as axum::extract::FromRequestParts<_>>::from_request_parts(&mut parts, st).await?;
        let body = Option::<Json<TransitionRequest>>::from_request(Request::from_parts(parts, body), st)
            .await
            .map_err(|e| bad_json(e).into_response())?;
        Ok(Asked { caller, req: body.map(|Json(b)| b).unwrap_or_default() })
    }
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
    /// Primary: what the full verified resync under way has left to check or copy, in bytes
    /// of extents, and the time that takes at its rate so far (None until it has moved).
    #[serde(default)]
    pub full_resync_remaining_bytes: Option<u64>,
    #[serde(default)]
    pub full_resync_eta_seconds: Option<f64>,
    /// Secondary: the full verified resync's durable sync cursor (every extent below it is
    /// synced; a resync resumed after a restart or a link loss starts there). Primary: the
    /// extent the full resync under way resumed at, when it resumed.
    #[serde(default)]
    pub sync_cursor_extent: Option<u64>,
    /// Primary: the peer's store, new (a rebuilt site), that a full sync waits for an
    /// operator's approval onto (`geomirror rebuild --approve`), with the bytes this site's
    /// image holds (at most what the sync copies) and the time that takes at the paced rate.
    #[serde(default)]
    pub rebuild_pending_store: Option<String>,
    #[serde(default)]
    pub rebuild_estimate_bytes: Option<u64>,
    #[serde(default)]
    pub rebuild_estimated_seconds: Option<f64>,
    /// Primary: the online verify under way, or the last one (`geomirror verify`).
    #[serde(default)]
    pub verify: Option<super::verify::VerifyReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AsideFile {
    pub path: String,
    pub extents: u64,
}

impl VolumeReport {
    fn new(name: &str, s: &VolumeStatus, volume_bytes: u64, bulk_bytes_per_sec: Option<u64>) -> VolumeReport {
        VolumeReport {
            name: name.to_owned(),
            role: role_name(s.role).into(),
            epoch: s.epoch.0,
            phase: s.phase.as_str().into(),
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
            full_resync_remaining_bytes: s.full_resync_left.map(|(b, _)| b),
            full_resync_eta_seconds: s.full_resync_left.and_then(|(_, eta)| eta).map(|d| d.as_secs_f64()),
            sync_cursor_extent: s.sync_cursor,
            verify: super::verify::VerifyReport::of(s, volume_bytes),
            rebuild_pending_store: s.rebuild_pending.map(|p| p.to_string()),
            rebuild_estimate_bytes: None,
            rebuild_estimated_seconds: None,
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
/// a refusal becomes 409 (it conflicts with the volume's role or state) or 503 (the volume
/// cannot serve it now), with the volume's reason; silence becomes 503.
pub(super) async fn ask<T: Send + 'static>(
    v: &Volume,
    wait: Duration,
    send: impl FnOnce(&Volume, OperatorReply<T>),
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    send(
        v,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Ok(t))) => Ok(t),
        Ok(Ok(Err(e))) => Err(ApiError(refusal_status(e.kind()), format!("volume {}: {e}", v.name()))),
        _ => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("volume {} did not answer", v.name()))),
    }
}

fn refusal_status(kind: RefusalKind) -> StatusCode {
    match kind {
        RefusalKind::Conflict => StatusCode::CONFLICT,
        RefusalKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn status(State(st): State<Arc<AppState>>, _: Operator) -> Result<Json<StatusReport>, ApiError> {
    let mut volumes = Vec::new();
    for v in &st.site.volumes {
        let mut report = VolumeReport::new(v.name(), &volume_status(v).await?, v.size_bytes(), st.site.bulk_bytes_per_sec);
        if report.rebuild_pending_store.is_some() {
            // What the sync reads and compares: the allocated part of this site's image (a
            // scan of its holes, off the async threads).
            let v2 = v.clone();
            let bytes = tokio::task::spawn_blocking(move || v2.allocated_bytes()).await.ok().and_then(Result::ok);
            report.rebuild_estimate_bytes = bytes;
            report.rebuild_estimated_seconds = bytes.zip(st.site.bulk_bytes_per_sec).map(|(b, r)| b as f64 / r.max(1) as f64);
        }
        report.aside_files = v.aside_files().into_iter().map(|(p, extents)| AsideFile { path: p.display().to_string(), extents }).collect();
        volumes.push(report);
    }
    Ok(Json(StatusReport { site: st.site.site.clone(), peer: st.site.peer.clone(), volumes }))
}

/// `GET /metrics`: Prometheus's text format. An admin (certificate or token) may read it, and
/// so may the metrics token, which is good for nothing else.
async fn metrics(_: AnyCaller) -> Response {
    let body = crate::metrics::render();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
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
    /// Demote and drain: how long to wait for the peer to apply everything, 1 to 3600 s
    /// (default 60 s).
    #[serde(default)]
    pub drain_timeout_secs: Option<u64>,
}

/// How long a demote or drain waits for the peer when the request does not say.
const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 60;
/// The longest wait a demote or drain may ask for: an hour is far beyond any drain that can
/// succeed on a working link, and a forgotten request still ends.
const MAX_DRAIN_TIMEOUT_SECS: u64 = 3600;

/// The drain timeout a request asks for, refused when out of range rather than changed.
fn drain_timeout(req: &TransitionRequest) -> Result<Duration, ApiError> {
    match req.drain_timeout_secs.unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECS) {
        s @ 1..=MAX_DRAIN_TIMEOUT_SECS => Ok(Duration::from_secs(s)),
        s => {
            Err(ApiError(StatusCode::BAD_REQUEST, format!("drain_timeout_secs is {s}: it must be between 1 and {MAX_DRAIN_TIMEOUT_SECS}")))
        }
    }
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
                let extent_bytes = volume_status(v).await.map(|s| s.extent_bytes).unwrap_or(0);
                let unsynced = r.unsynced_from.map(|e| {
                    let from = e.saturating_mul(extent_bytes).min(v.size_bytes());
                    format!(
                        "UNSYNCED RANGE: bytes {from} to {} (extents {e} to the end) had not been synced from the old primary: they may hold anything (older data, or none)",
                        v.size_bytes()
                    )
                });
                let warning = (!r.authoritative || !r.consistent || r.amnesiac).then(|| {
                    let mut w = Vec::new();
                    if let Some(u) = &unsynced {
                        w.push(u.as_str());
                    }
                    if r.amnesiac {
                        w.push("THIS SITE WAS AN AMNESIAC (promoted with --force): its store had lost state it acknowledged, so acknowledged writes may be missing anywhere on its image; its peer gets a full verified resync from it, saving aside whatever differs there");
                    }
                    if !r.authoritative {
                        w.push("THE RECORD IS NOT AUTHORITATIVE: the old primary may have written outside it (it degraded, a failback or resync was under way, or it never vouched for this store); writes it acknowledged meanwhile may be missing here, and extents outside the record may differ");
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
    let drain = drain_timeout(&req)?;
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
    let timeout = drain_timeout(&req)?;
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

/// CRC-32C of extents of a volume's media, on either role: a switchover compares the
/// record's extents on both sites while the primary is drained.
async fn checksums(
    State(st): State<Arc<AppState>>,
    _: Operator,
    req: Result<Json<ChecksumRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = req.map_err(bad_json)?;
    let Some(v) = st.site.volumes.iter().find(|v| v.name() == req.volume).cloned() else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no volume {:?} on this site", req.volume)));
    };
    if req.extents.len() > MAX_CHECKSUM_EXTENTS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{} extents asked; at most {MAX_CHECKSUM_EXTENTS} per request: split the list", req.extents.len()),
        ));
    }
    let geometry = volume_geometry(&v).await?;
    checked_extents(v.name(), &geometry, &req.extents)?;
    // Each extent once: a list that repeats one would read it again per copy, and the cap
    // above bounds the work only if the extents are distinct.
    let mut seen = std::collections::BTreeSet::new();
    if let Some(e) = req.extents.iter().find(|e| !seen.insert(**e)) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("extent {e} is asked more than once: name each extent once")));
    }
    let name = v.name().to_owned();
    let sums = tokio::task::spawn_blocking(move || v.checksums(&req.extents, geometry.extent_bytes()))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("the checksum task failed: {e}")))?
        .map_err(|e| match e {
            HostError::OutOfRange => ApiError(StatusCode::BAD_REQUEST, format!("volume {name}: an extent asked is past the end")),
            e => ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("volume {name}: cannot read its media ({e:?}); see the site's log")),
        })?;
    Ok(Json(serde_json::json!({ "volume": req.volume, "crc32c": sums })))
}

/// A body that is not the JSON a route takes, answered like every other error (`{"error": ...}`)
/// with the status axum chose (400, 413, 415 or 422).
pub(super) fn bad_json(e: JsonRejection) -> ApiError {
    ApiError(e.status(), e.body_text())
}

/// The longest `reason` a request may give: it goes into both sites' logs.
pub const MAX_REASON_CHARS: usize = 1024;

pub(super) fn checked_reason(reason: &str) -> Result<(), ApiError> {
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("the reason is longer than {MAX_REASON_CHARS} characters: shorten it")));
    }
    Ok(())
}

/// A JSON body that must be an object of the route's fields (serde would also take a
/// positional array for a struct, which no operator means).
pub(super) fn object_body<T: serde::de::DeserializeOwned>(req: Result<Json<serde_json::Value>, JsonRejection>) -> Result<T, ApiError> {
    let Json(v) = req.map_err(bad_json)?;
    if !v.is_object() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "the body must be a JSON object of the request's fields".into()));
    }
    serde_json::from_value(v).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// The volume a request names, or the site's only one when it names none.
pub(super) fn the_volume(st: &AppState, name: Option<&str>) -> Result<Volume, ApiError> {
    let vols = &st.site.volumes;
    match name {
        Some(n) => vols
            .iter()
            .find(|v| v.name() == n)
            .cloned()
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no volume {n:?} on this site"))),
        None if vols.len() == 1 => Ok(vols[0].clone()),
        None => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "this site has {} volumes: name one with \"volume\" (--volume): {}",
                vols.len(),
                vols.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// A volume's geometry: its size and the extent size its driver reports.
pub(super) async fn volume_geometry(v: &Volume) -> Result<Geometry, ApiError> {
    let extent_bytes = volume_status(v).await?.extent_bytes;
    Geometry::new(v.size_bytes(), extent_bytes)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("volume {}: its geometry is invalid: {e}", v.name())))
}

/// The one check of every admin input that names a place in a volume: each extent must be
/// one of the volume's, compared by `Geometry` without multiplying (an extent number times
/// the extent size can wrap around and land on another extent).
fn checked_extents(volume: &str, geometry: &Geometry, extents: &[u64]) -> Result<(), ApiError> {
    match extents.iter().find(|e| !geometry.contains(ExtentId(**e))) {
        None => Ok(()),
        Some(e) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "extent {e} is past the end of volume {volume}: it has {} extents of {} bytes, numbered 0 to {}",
                geometry.extent_count(),
                geometry.extent_bytes(),
                geometry.extent_count() - 1
            ),
        )),
    }
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

/// The body of `POST /v1/rebuild/approve`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    #[serde(default)]
    pub volume: Option<String>,
    /// The peer's new store, as this site's status shows it (`rebuild_pending_store`): an
    /// approval names exactly the store it lets the full sync run onto.
    pub peer_store: String,
    #[serde(default)]
    pub reason: String,
}

/// Approves the full sync onto a rebuilt peer: 400 for a store id that is not one, 409
/// when none waits or another store does (nothing changes then).
async fn approve_rebuild(
    State(st): State<Arc<AppState>>,
    Operator(caller): Operator,
    req: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: ApproveRequest = object_body(req)?;
    checked_reason(&req.reason)?;
    let v = the_volume(&st, req.volume.as_deref())?;
    let store: geomirror_core::StoreId = req.peer_store.parse().map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    tracing::warn!(site = st.site.site, volume = v.name(), who = %caller, why = req.reason, peer_store = %store, "rebuild approval requested");
    ask(&v, OPERATION_TIMEOUT, |v, reply| v.approve_rebuild(store, reply)).await?;
    Ok(Json(serde_json::json!({ "volume": v.name(), "approved": store.to_string() })))
}

/// Every route. `super::start` puts `auth::authenticate` in front of all of them (and of
/// the fallback, so an unknown path or method is refused like any other before it is told
/// apart).
pub(super) fn router() -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/promote", post(promote))
        .route("/v1/demote", post(demote))
        .route("/v1/drain", post(drain))
        .route("/v1/resume", post(resume))
        .route("/v1/checksums", post(checksums))
        .route("/v1/resolve-split-brain", post(resolve_split_brain))
        .route("/v1/verify", post(super::verify::verify))
        .route("/v1/rebuild/approve", post(approve_rebuild))
        .route("/v1/verify/cancel", post(super::verify::cancel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_checked_against_the_volume_without_wrapping() {
        // 64 extents of 1 MiB. 2^44 + 5 extents of 1 MiB is 2^64 + 5 MiB: a multiplication
        // would wrap to extent 5.
        let g = Geometry::new(64 << 20, 1 << 20).unwrap();
        assert!(checked_extents("vol0", &g, &[0, 63]).is_ok());
        assert!(checked_extents("vol0", &g, &[]).is_ok());
        for bad in [64, 65, (1 << 44) + 5, (1 << 44) + 255, u64::MAX / (1 << 20), u64::MAX] {
            let e = checked_extents("vol0", &g, &[0, bad]).expect_err("past the end");
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
            assert_eq!(e.1, format!("extent {bad} is past the end of volume vol0: it has 64 extents of 1048576 bytes, numbered 0 to 63"));
        }
        // A short last extent is still an extent.
        let short = Geometry::new((2 << 20) + 4096, 1 << 20).unwrap();
        assert!(checked_extents("vol0", &short, &[2]).is_ok());
        assert!(checked_extents("vol0", &short, &[3]).is_err());
    }

    #[test]
    fn a_volume_refuses_checksums_of_extents_that_would_wrap() {
        use crate::config::VolumeConfig;
        use crate::store::MemoryStore;
        use geomirror_core::{CoreConfig, SiteState};
        let dir = tempfile::tempdir().unwrap();
        let cfg = VolumeConfig {
            name: "vol0".into(),
            media: dir.path().join("vol0.img"),
            geometry: Geometry::new(64 << 20, 1 << 20).unwrap(),
            description: String::new(),
            core: CoreConfig::default(),
        };
        let (v, driver) =
            Volume::start(&cfg, Box::new(MemoryStore::new(SiteState::fresh(Role::Primary, geomirror_core::StoreId(1)))), None).unwrap();
        let zeros = crc32c::crc32c(&vec![0u8; 1 << 20]);
        assert_eq!(v.checksums(&[0, 5, 63], 1 << 20), Ok(vec![zeros; 3]));
        for bad in [64, (1 << 44) + 5, (1 << 44) + 255, u64::MAX] {
            assert_eq!(v.checksums(&[0, bad], 1 << 20), Err(HostError::OutOfRange), "extent {bad}");
        }
        v.stop();
        driver.join().unwrap();
    }

    #[test]
    fn a_drain_timeout_out_of_range_is_refused_not_changed() {
        let asked = |s: Option<u64>| drain_timeout(&TransitionRequest { drain_timeout_secs: s, ..TransitionRequest::default() });
        assert_eq!(asked(None).ok(), Some(Duration::from_secs(60)));
        assert_eq!(asked(Some(1)).ok(), Some(Duration::from_secs(1)));
        assert_eq!(asked(Some(3600)).ok(), Some(Duration::from_secs(3600)));
        for bad in [0, 3601, u64::MAX] {
            let e = asked(Some(bad)).expect_err("out of range");
            assert_eq!((e.0, e.1), (StatusCode::BAD_REQUEST, format!("drain_timeout_secs is {bad}: it must be between 1 and 3600")));
        }
    }
}
