//! Online verify through the admin API: `POST /v1/verify`, `POST /v1/verify/cancel`, and the
//! verify's part of a volume's status.
//!
//! Owns: checking a verify's byte range against the volume (400 before anything starts), its
//! translation to extents, and the report of what a verify found.
//! Must not: compare anything itself; the primary's core orders the checks against the host's
//! writes (see `geomirror_core::primary::verify`).

use super::auth::Operator;
use super::routes::{ask, checked_reason, object_body, the_volume, volume_geometry, OPERATION_TIMEOUT};
use super::{ApiError, AppState};
use crate::volume::{Volume, VolumeStatus};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use geomirror_core::{Geometry, VerifyWait};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// At most this many out-of-sync ranges are listed in a status; the counts are whole.
pub const MAX_LISTED_RANGES: usize = 1000;

/// The body of `POST /v1/verify`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The volume; may be left out when the site has one.
    #[serde(default)]
    pub volume: Option<String>,
    /// The range to compare, in bytes (default: the whole volume). It is widened to whole
    /// extents, the unit a check compares.
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub length: Option<u64>,
    /// Copy what differs from this site (the primary) to the peer once found.
    #[serde(default)]
    pub repair: bool,
    #[serde(default)]
    pub reason: String,
}

/// The body of `POST /v1/verify/cancel`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyCancel {
    #[serde(default)]
    pub volume: Option<String>,
}

/// What `POST /v1/verify` started.
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifyStarted {
    pub volume: String,
    pub first_extent: u64,
    pub end_extent: u64,
    pub extent_bytes: u64,
    /// The byte range compared: the request's, widened to whole extents.
    pub offset: u64,
    pub length: u64,
    pub repair: bool,
}

/// A verify in a volume's status (the primary's): running or the last one done.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    pub first_extent: u64,
    pub end_extent: u64,
    pub repair: bool,
    pub done: bool,
    /// An operator cancelled it: the extents not checked were not compared.
    #[serde(default)]
    pub cancelled: bool,
    pub checked_extents: u64,
    pub total_extents: u64,
    pub checked_bytes: u64,
    pub total_bytes: u64,
    /// Why a running verify waits instead of reading, when it does.
    pub waiting: Option<String>,
    /// Extents found different, the 4 KiB blocks of them that differ, and the byte ranges
    /// of those extents (at most `MAX_LISTED_RANGES`, merged where adjacent).
    pub out_of_sync_extents: u64,
    pub out_of_sync_blocks: u64,
    pub out_of_sync_ranges: Vec<[u64; 2]>,
    /// Extents any verify found different that no resync has copied yet (a verify without
    /// repair leaves them for the next resync: a reconnect, a restart, or a verify --repair).
    pub unrepaired_extents: u64,
}

impl VerifyReport {
    pub(super) fn of(s: &VolumeStatus, volume_bytes: u64) -> Option<VerifyReport> {
        let v = s.verify.as_ref()?;
        let eb = s.extent_bytes;
        let bytes_of = |first: u64, end: u64| (end * eb).min(volume_bytes).saturating_sub(first * eb);
        let mut ranges: Vec<[u64; 2]> = Vec::new();
        for e in v.found.keys() {
            let (start, end) = (e.0 * eb, ((e.0 + 1) * eb).min(volume_bytes));
            let full = ranges.len() >= MAX_LISTED_RANGES;
            match ranges.last_mut() {
                Some(last) if last[0] + last[1] == start => last[1] += end - start,
                _ if full => break,
                _ => ranges.push([start, end - start]),
            }
        }
        let checked_to = v.extents.start + v.checked;
        Some(VerifyReport {
            first_extent: v.extents.start,
            end_extent: v.extents.end,
            repair: v.repair,
            done: v.done,
            cancelled: v.cancelled,
            checked_extents: v.checked,
            total_extents: v.extents.end - v.extents.start,
            checked_bytes: bytes_of(v.extents.start, checked_to),
            total_bytes: bytes_of(v.extents.start, v.extents.end),
            waiting: v.waiting.map(|w| {
                match w {
                    VerifyWait::LinkDown => "the link to the peer is down",
                    VerifyWait::FullResyncOwed => "the peer is owed a full verified resync first",
                    VerifyWait::Resyncing => "a resync is under way; the comparison goes on once it ends",
                    VerifyWait::Paced => "host writes fill the lag budget; checks go as the peer catches up",
                }
                .to_owned()
            }),
            out_of_sync_extents: v.found.len() as u64,
            out_of_sync_blocks: v.found.values().map(|n| u64::from(*n)).sum(),
            out_of_sync_ranges: ranges,
            unrepaired_extents: s.verify_unrepaired,
        })
    }
}

/// The request's byte range as extents `[first, end)`, refused (400) when it is empty or
/// reaches past the end of the volume; computed without overflow.
pub(super) fn verify_extents(volume: &str, geo: &Geometry, offset: Option<u64>, length: Option<u64>) -> Result<(u64, u64), ApiError> {
    let size = geo.volume_bytes();
    let offset = offset.unwrap_or(0);
    let bad = |why: String| Err(ApiError(StatusCode::BAD_REQUEST, why));
    if offset >= size {
        return bad(format!("offset {offset} is at or past the end of volume {volume} ({size} bytes): nothing was started"));
    }
    let length = length.unwrap_or(size - offset);
    if length == 0 {
        return bad("the range to verify is empty (length 0): nothing was started".into());
    }
    let Some(end) = offset.checked_add(length).filter(|end| *end <= size) else {
        return bad(format!(
            "the range offset {offset}, length {length} reaches past the end of volume {volume} ({size} bytes): nothing was started"
        ));
    };
    let eb = geo.extent_bytes();
    Ok((offset / eb, end.div_ceil(eb)))
}

pub(super) async fn verify(
    State(st): State<Arc<AppState>>,
    Operator(caller): Operator,
    req: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<VerifyStarted>, ApiError> {
    let req: VerifyRequest = object_body(req)?;
    checked_reason(&req.reason)?;
    let v = the_volume(&st, req.volume.as_deref())?;
    let geo = volume_geometry(&v).await?;
    let (first, end) = verify_extents(v.name(), &geo, req.offset, req.length)?;
    tracing::warn!(site = st.site.site, volume = v.name(), who = %caller, why = req.reason, first, end, repair = req.repair, "verify requested");
    let repair = req.repair;
    ask(&v, OPERATION_TIMEOUT, |v, reply| v.verify(first..end, repair, reply)).await?;
    let eb = geo.extent_bytes();
    let offset = first * eb;
    Ok(Json(VerifyStarted {
        volume: v.name().to_owned(),
        first_extent: first,
        end_extent: end,
        extent_bytes: eb,
        offset,
        length: (end * eb).min(geo.volume_bytes()) - offset,
        repair,
    }))
}

pub(super) async fn cancel(
    State(st): State<Arc<AppState>>,
    Operator(caller): Operator,
    req: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: VerifyCancel = object_body(req)?;
    let v = the_volume(&st, req.volume.as_deref())?;
    tracing::warn!(site = st.site.site, volume = v.name(), who = %caller, "verify cancel requested");
    let cancelled = ask(&v, OPERATION_TIMEOUT, Volume::cancel_verify).await?;
    Ok(Json(serde_json::json!({ "volume": v.name(), "cancelled": cancelled })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_widened_to_extents_and_refused_past_the_end_without_wrapping() {
        let g = Geometry::new(64 << 20, 1 << 20).unwrap();
        assert_eq!(verify_extents("v", &g, None, None).ok(), Some((0, 64)));
        assert_eq!(verify_extents("v", &g, Some(4096), Some(4096)).ok(), Some((0, 1)));
        assert_eq!(verify_extents("v", &g, Some((1 << 20) - 1), Some(2)).ok(), Some((0, 2)));
        assert_eq!(verify_extents("v", &g, Some(63 << 20), None).ok(), Some((63, 64)));
        for (o, l) in
            [(Some(64 << 20), None), (Some(0), Some(0)), (Some(1), Some(64 << 20)), (Some(u64::MAX), Some(2)), (Some(2), Some(u64::MAX))]
        {
            let e = verify_extents("v", &g, o, l).expect_err("refused");
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{o:?} {l:?}: {}", e.1);
        }
        let e = verify_extents("vol0", &g, Some(1), Some(64 << 20)).unwrap_err();
        assert_eq!(e.1, "the range offset 1, length 67108864 reaches past the end of volume vol0 (67108864 bytes): nothing was started");
    }
}
