//! The metrics refresher: once a second, turns what the site's parts say about themselves
//! into gauges and counters.
//!
//! Owns: reading each volume's status and its core's plain stats, the NBD front end's
//! counters and in-flight budget, refused handshakes, the QUIC connections' stats and the
//! certificates' expiry, and setting the metrics `crate::metrics` names; and the recorder's
//! histogram upkeep. It sits above everything it reports on, and `metrics` below them all.
//!
//! Counters taken from a core's stats restart from zero when the volume changes role (a new
//! state machine): Prometheus reads a drop as a counter reset, which `rate()` handles.
//!
//! Must not: sit on a decision path. Nothing it sets is read back by replication.

use crate::metrics::*;
use crate::nbd::server::NbdCounters;
use crate::transport::link::LinkConns;
use crate::transport::tls::{Refusals, REFUSAL_REASONS};
use crate::volume::{Volume, VolumePhase, VolumeStatus};
use geomirror_core::stats::{PrimaryStats, SecondaryStats};
use geomirror_core::Role;
use metrics::{counter, gauge, histogram};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// How often gauges are refreshed and histograms' upkeep runs.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// How long the refresher waits for a volume's status before skipping it this round.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// What the refresher reads, besides each volume's status.
pub struct Sources {
    pub volumes: Vec<Volume>,
    pub nbd: Arc<NbdCounters>,
    /// With a peer: refused handshakes and the link's connections.
    pub refusals: Option<Arc<Refusals>>,
    pub link: Option<Arc<LinkConns>>,
    /// The paced bulk rate, for failback and resync estimates in seconds.
    pub bulk_bytes_per_sec: Option<u64>,
    /// Each certificate's label and its notAfter, in Unix seconds.
    pub certificates: Vec<(&'static str, i64)>,
}

/// Refreshes every gauge and counter each `REFRESH_INTERVAL` until `shutdown`, and runs the
/// histograms' upkeep. Returns at once if no recorder is installed.
pub fn spawn_refresher(sources: Sources, mut shutdown: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
    let handle = crate::metrics::handle()?;
    for (label, not_after) in &sources.certificates {
        gauge!(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "certificate" => *label).set(*not_after as f64);
    }
    for reason in REFUSAL_REASONS {
        counter!(HANDSHAKES_REFUSED_TOTAL, "reason" => *reason).increment(0);
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            refresh(&sources).await;
            handle.run_upkeep();
        }
    }))
}

async fn refresh(s: &Sources) {
    for v in &s.volumes {
        let (tx, rx) = oneshot::channel();
        v.status(move |st| {
            let _ = tx.send(st);
        });
        match tokio::time::timeout(STATUS_TIMEOUT, rx).await {
            Ok(Ok(st)) => volume(v, &st, s.bulk_bytes_per_sec),
            _ => tracing::debug!(volume = v.name(), "no status for the metrics this round"),
        }
    }
    nbd(&s.nbd);
    if let Some(r) = &s.refusals {
        for (reason, n) in r.snapshot() {
            counter!(HANDSHAKES_REFUSED_TOTAL, "reason" => reason).absolute(n);
        }
    }
    if let Some(l) = &s.link {
        for (conn, st) in l.stats() {
            let conn = conn.as_str();
            gauge!(LINK_RTT_SECONDS, "connection" => conn).set(st.path.rtt.as_secs_f64());
            gauge!(LINK_CONGESTION_WINDOW_BYTES, "connection" => conn).set(st.path.cwnd as f64);
            counter!(LINK_SENT_BYTES_TOTAL, "connection" => conn).absolute(st.udp_tx.bytes);
            counter!(LINK_RECEIVED_BYTES_TOTAL, "connection" => conn).absolute(st.udp_rx.bytes);
            counter!(LINK_LOST_PACKETS_TOTAL, "connection" => conn).absolute(st.path.lost_packets);
            counter!(LINK_CONGESTION_EVENTS_TOTAL, "connection" => conn).absolute(st.path.congestion_events);
        }
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn volume(v: &Volume, st: &VolumeStatus, bulk_bytes_per_sec: Option<u64>) {
    let name = v.name().to_owned();
    let g = |metric: &'static str, value: f64| gauge!(metric, "volume" => name.clone()).set(value);
    let c = |metric: &'static str, value: u64| counter!(metric, "volume" => name.clone()).absolute(value);
    let primary = st.role == Role::Primary;
    gauge!(ROLE, "volume" => name.clone(), "role" => "primary").set(flag(primary));
    gauge!(ROLE, "volume" => name.clone(), "role" => "secondary").set(flag(!primary));
    g(EPOCH, st.epoch.0 as f64);
    g(FENCED, flag(st.phase == VolumePhase::Fenced));
    g(VOLUME_FAILED, flag(st.failed));
    g(LINK_UP, flag(st.link_up));
    g(RECORD_EXTENTS, st.record_extents as f64);
    g(RECORD_BYTES, (st.record_extents * st.extent_bytes) as f64);
    g(RECORD_CAPACITY_EXTENTS, st.record_capacity_extents as f64);
    g(RECORD_CAPACITY_BYTES, (st.record_capacity_extents * st.extent_bytes) as f64);
    g(RECORD_AUTHORITATIVE, flag(st.authoritative));
    g(IMAGE_CONSISTENT, flag(st.consistent));
    g(SPLIT_BRAIN, flag(st.split_brain));
    g(AMNESIAC, flag(st.amnesiac));
    if let Some((checked, total)) = st.full_resync {
        g(FULL_RESYNC_CHECKED_EXTENTS, checked as f64);
        g(FULL_RESYNC_TOTAL_EXTENTS, total as f64);
    }
    if let Some((bytes, eta)) = st.full_resync_left {
        g(FULL_RESYNC_REMAINING_BYTES, bytes as f64);
        if let Some(eta) = eta {
            g(FULL_RESYNC_REMAINING_SECONDS, eta.as_secs_f64());
        }
    }
    if let Some(c) = st.sync_cursor {
        g(SYNC_CURSOR_EXTENT, c as f64);
    }
    if let Some(vs) = &st.verify {
        g(VERIFY_RUNNING, flag(!vs.done));
        g(VERIFY_CHECKED_EXTENTS, vs.checked as f64);
        g(VERIFY_TOTAL_EXTENTS, (vs.extents.end - vs.extents.start) as f64);
        g(VERIFY_OUT_OF_SYNC_EXTENTS, vs.found.len() as f64);
        // Summed as integers: a float sum of nothing is -0, which Prometheus prints so.
        g(VERIFY_OUT_OF_SYNC_BLOCKS, vs.found.values().map(|n| u64::from(*n)).sum::<u64>() as f64);
    }
    if let Some(ps) = &st.primary_stats {
        g(REBUILD_PENDING, flag(st.rebuild_pending.is_some()));
        g(VERIFY_UNREPAIRED_EXTENTS, st.verify_unrepaired as f64);
        c(VERIFIES_STARTED_TOTAL, ps.verifies_started);
        c(VERIFIES_COMPLETED_TOTAL, ps.verifies_completed);
        c(VERIFY_CHECKED_BYTES_TOTAL, ps.verify_bytes_checked);
    }
    g(APPLIED_SEQUENCE, st.durable_applied.0 as f64);
    g(REPLICATION_LAG_BYTES, st.lag_bytes as f64);
    g(REPLICATION_LAG_SECONDS, st.lag_ms as f64 / 1000.0);
    g(FAILBACK_DEBT_BYTES, st.failback_debt_bytes as f64);
    g(RESYNC_IN_PROGRESS, flag(st.resync_in_progress));
    g(RESYNC_REMAINING_BYTES, st.resync_remaining_bytes as f64);
    if let Some(rate) = bulk_bytes_per_sec {
        g(FAILBACK_DEBT_SECONDS, st.failback_debt_bytes as f64 / rate.max(1) as f64);
        g(RESYNC_REMAINING_SECONDS, st.resync_remaining_bytes as f64 / rate.max(1) as f64);
    }
    if primary {
        histogram!(LAG_SAMPLED, "volume" => name.clone()).record(st.lag_ms as f64 / 1000.0);
    }
    let k = v.counters();
    c(HOST_WRITE_BYTES_TOTAL, k.write_bytes.load(Ordering::Relaxed));
    c(HOST_READS_TOTAL, k.reads.load(Ordering::Relaxed));
    c(HOST_READ_BYTES_TOTAL, k.read_bytes.load(Ordering::Relaxed));
    c(HOST_FLUSHES_TOTAL, k.flushes.load(Ordering::Relaxed));
    c(MEDIA_ERRORS_TOTAL, k.media_errors.load(Ordering::Relaxed));
    if let Some(p) = &st.primary_stats {
        g(RECORD_UPDATE_RTT_SECONDS, p.record_rtt_smoothed_us as f64 / 1e6);
        g(RECORD_GENERATIONS, p.record_generations as f64);
        primary_stats(&c, p);
    }
    if let Some(s) = &st.secondary_stats {
        secondary_stats(&c, s);
    }
}

fn primary_stats(c: &impl Fn(&'static str, u64), p: &PrimaryStats) {
    c(RECORD_UPDATES_TOTAL, p.record_updates_sent);
    c(RECORD_PRE_EXTENSIONS_TOTAL, p.pre_extensions_sent);
    c(RECORD_ANSWERS_TOTAL, p.record_answers);
    c(PREDICTED_EXTENTS_TOTAL, p.predicted_extents);
    c(PREDICTED_EXTENTS_USED_TOTAL, p.predicted_extents_used);
    c(EVICTED_EXTENTS_TOTAL, p.evicted_extents);
    c(EVICTED_GENERATIONS_TOTAL, p.evicted_generations);
    c(RESYNCS_STARTED_TOTAL, p.resyncs_started);
    c(RESYNC_COPIED_BYTES_TOTAL, p.resync_bytes_copied);
    c(RESYNC_VERIFIED_BYTES_TOTAL, p.resync_bytes_verified);
    c(RESYNC_MISMATCHED_EXTENTS_TOTAL, p.resync_extents_mismatched);
    c(AMNESIAC_PEERS_DETECTED_TOTAL, p.amnesiac_peers_detected);
    c(FULL_RESYNCS_COMPLETED_TOTAL, p.full_resyncs_completed);
    c(FAILED_WRITES_TOTAL, p.failed_writes);
    c(DEGRADED_WRITES_TOTAL, p.degraded_writes);
    c(THROTTLED_WRITES_TOTAL, p.throttled_writes);
    c(RECORD_FULL_WAITS_TOTAL, p.record_full_waits);
    c(FRAMES_REFUSED_TOTAL, p.frames_refused);
}

fn secondary_stats(c: &impl Fn(&'static str, u64), s: &SecondaryStats) {
    c(RECORD_UPDATES_TOTAL, s.record_updates);
    c(PREDICTED_EXTENTS_TOTAL, s.extents_predicted);
    c(EVICTED_EXTENTS_TOTAL, s.extents_evicted);
    c(APPLIED_WRITES_TOTAL, s.writes_applied);
    c(APPLIED_BYTES_TOTAL, s.bytes_applied);
    c(EXTENTS_SAVED_ASIDE_TOTAL, s.extents_saved_aside);
    c(FAILBACK_VERIFIED_EXTENTS_TOTAL, s.extents_verified);
    c(FAILBACK_MISMATCHED_EXTENTS_TOTAL, s.extents_mismatched);
    c(AMNESIA_DETECTED_TOTAL, s.amnesia_detected);
    c(FULL_RESYNCS_COMPLETED_TOTAL, s.full_resyncs_completed);
    c(FRAMES_REFUSED_TOTAL, s.frames_refused);
}

fn nbd(n: &NbdCounters) {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter!(NBD_CONNECTIONS_TOTAL).absolute(get(&n.connections_accepted));
    counter!(NBD_REQUESTS_TOTAL).absolute(get(&n.requests));
    for (kind, value) in [
        ("inval", &n.errors_inval),
        ("nospc", &n.errors_nospc),
        ("overflow", &n.errors_overflow),
        ("io", &n.errors_io),
        ("other", &n.errors_other),
        ("protocol_violation", &n.protocol_violations),
        ("handshake_refused", &n.handshakes_refused),
        ("handshake_timeout", &n.handshakes_timed_out),
        ("connection_limit", &n.connections_refused_at_cap),
    ] {
        counter!(NBD_ERRORS_TOTAL, "kind" => kind).absolute(get(value));
    }
    let b = &n.inflight;
    gauge!(NBD_INFLIGHT).set(get(&b.held_bytes) as f64);
    gauge!(NBD_INFLIGHT_PEAK).set(get(&b.peak_bytes) as f64);
    gauge!(NBD_INFLIGHT_LIMIT).set(get(&b.limit_bytes) as f64);
    counter!(NBD_BUDGET_EXHAUSTED, "limit" => "site").absolute(get(&b.exhausted_site));
    counter!(NBD_BUDGET_EXHAUSTED, "limit" => "connection").absolute(get(&b.exhausted_connection));
}
