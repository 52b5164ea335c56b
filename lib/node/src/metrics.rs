//! Prometheus metrics: the one module that names them and exports them.
//!
//! Owns: the process's recorder (metrics-exporter-prometheus, installed once, with explicit
//! buckets so that latencies and lag aggregate across sites), the name, unit and help of
//! every metric, the per-volume write handles the volume driver feeds on each ack
//! (`VolumeMetrics`), and the refresher that turns everything else into gauges and counters
//! once a second: each volume's status and its core's plain stats, the NBD front end's
//! counters and in-flight budget, refused handshakes, the QUIC connections' stats and the
//! certificates' expiry.
//!
//! The admin API's connection gauges and refusal and timeout counters are fed directly as
//! connections come and go (`admin_connections`, `admin_refused`, `admin_timeouts`).
//!
//! Labels are bounded: `site` (global), `volume`, `role`, `path` (hit or miss), `reason`,
//! `kind`, `pool`, `limit` (site or connection), `connection` (control or data) and
//! `certificate` (site or ca); never an offset, an address or a request.
//!
//! Counters taken from a core's stats restart from zero when the volume changes role (a new
//! state machine): Prometheus reads a drop as a counter reset, which `rate()` handles.
//!
//! Must not: sit on a decision path. Nothing here is read back by replication.

use crate::nbd::server::NbdCounters;
use crate::transport::link::LinkConns;
use crate::transport::tls::{Refusals, REFUSAL_REASONS};
use crate::volume::{Volume, VolumePhase, VolumeStatus};
use geomirror_core::stats::{PrimaryStats, SecondaryStats};
use geomirror_core::{Role, WritePath};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// How often gauges are refreshed and histograms' upkeep runs.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// How long the refresher waits for a volume's status before skipping it this round.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Write latency buckets, seconds: from a local hit (tens of µs) to a miss over a long
/// WAN, and writes held by a throttle or a link loss.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Replication lag buckets, seconds: the RPO, sampled each refresh.
pub const LAG_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

pub const WRITES: &str = "geomirror_writes_total";
pub const WRITE_LATENCY: &str = "geomirror_write_latency_seconds";
pub const LAG_SAMPLED: &str = "geomirror_replication_lag_sampled_seconds";
pub const ADMIN_CONNECTIONS: &str = "geomirror_admin_connections";
pub const ADMIN_REFUSED: &str = "geomirror_admin_connections_refused_total";
pub const ADMIN_TIMEOUTS: &str = "geomirror_admin_timeouts_total";
pub const NBD_INFLIGHT: &str = "geomirror_nbd_inflight_bytes";
pub const NBD_INFLIGHT_PEAK: &str = "geomirror_nbd_inflight_peak_bytes";
pub const NBD_INFLIGHT_LIMIT: &str = "geomirror_nbd_inflight_limit_bytes";
pub const NBD_BUDGET_EXHAUSTED: &str = "geomirror_nbd_budget_exhausted_total";

static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the process's recorder, once; `site` becomes every metric's `site` label. A
/// second call (another site in the same process, as in tests) gets the first one's handle.
pub fn install(site: &str) -> anyhow::Result<PrometheusHandle> {
    let mut installed = HANDLE.lock().expect("not poisoned");
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .add_global_label("site", site)
        .set_buckets_for_metric(Matcher::Full(WRITE_LATENCY.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(LAG_SAMPLED.into()), LAG_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    gauge!("geomirror_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    *installed = Some(handle.clone());
    Ok(handle)
}

/// The write handles of one volume, made when it starts (after `install`, or they record
/// nothing). Both paths exist from the start, at zero, so a ratio has both terms.
pub struct VolumeMetrics {
    hit: (Counter, Histogram),
    miss: (Counter, Histogram),
}

impl VolumeMetrics {
    pub fn new(volume: &str) -> VolumeMetrics {
        let make = |path: &'static str| {
            let c = counter!(WRITES, "volume" => volume.to_owned(), "path" => path);
            c.increment(0);
            (c, histogram!(WRITE_LATENCY, "volume" => volume.to_owned(), "path" => path))
        };
        VolumeMetrics { hit: make(WritePath::Hit.as_str()), miss: make(WritePath::Miss.as_str()) }
    }

    /// A host write acknowledged (successfully) by `path`, `latency` after it arrived.
    pub fn write_acked(&self, path: WritePath, latency: Duration) {
        let (c, h) = match path {
            WritePath::Hit => &self.hit,
            WritePath::Miss => &self.miss,
        };
        c.increment(1);
        h.record(latency.as_secs_f64());
    }
}

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
    let handle = HANDLE.lock().expect("not poisoned").clone()?;
    for (label, not_after) in &sources.certificates {
        gauge!("geomirror_certificate_expiry_timestamp_seconds", "certificate" => *label).set(*not_after as f64);
    }
    for reason in REFUSAL_REASONS {
        counter!("geomirror_handshakes_refused_total", "reason" => *reason).increment(0);
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

/// The admin API's connection slots in use, by pool (general, admin), set on every change
/// so that a scrape sees the count of that moment.
pub fn admin_connections(pool: &'static str, in_use: usize) {
    gauge!(ADMIN_CONNECTIONS, "pool" => pool).set(in_use as f64);
}

/// `n` more admin connections refused after their handshake, by reason (0 creates the series).
pub fn admin_refused(reason: &'static str, n: u64) {
    counter!(ADMIN_REFUSED, "reason" => reason).increment(n);
}

/// `n` more admin connections or requests ended by a deadline, by kind (handshake, header,
/// body; 0 creates the series).
pub fn admin_timeouts(kind: &'static str, n: u64) {
    counter!(ADMIN_TIMEOUTS, "kind" => kind).increment(n);
}

/// The current metrics in Prometheus's text format (empty without a recorder).
pub fn render() -> String {
    HANDLE.lock().expect("not poisoned").as_ref().map(PrometheusHandle::render).unwrap_or_default()
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
            counter!("geomirror_handshakes_refused_total", "reason" => reason).absolute(n);
        }
    }
    if let Some(l) = &s.link {
        for (conn, st) in l.stats() {
            let conn = conn.as_str();
            gauge!("geomirror_link_rtt_seconds", "connection" => conn).set(st.path.rtt.as_secs_f64());
            gauge!("geomirror_link_congestion_window_bytes", "connection" => conn).set(st.path.cwnd as f64);
            counter!("geomirror_link_sent_bytes_total", "connection" => conn).absolute(st.udp_tx.bytes);
            counter!("geomirror_link_received_bytes_total", "connection" => conn).absolute(st.udp_rx.bytes);
            counter!("geomirror_link_lost_packets_total", "connection" => conn).absolute(st.path.lost_packets);
            counter!("geomirror_link_congestion_events_total", "connection" => conn).absolute(st.path.congestion_events);
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
    gauge!("geomirror_role", "volume" => name.clone(), "role" => "primary").set(flag(primary));
    gauge!("geomirror_role", "volume" => name.clone(), "role" => "secondary").set(flag(!primary));
    g("geomirror_epoch", st.epoch.0 as f64);
    g("geomirror_fenced", flag(st.phase == VolumePhase::Fenced));
    g("geomirror_volume_failed", flag(st.failed));
    g("geomirror_link_up", flag(st.link_up));
    g("geomirror_record_extents", st.record_extents as f64);
    g("geomirror_record_bytes", (st.record_extents * st.extent_bytes) as f64);
    g("geomirror_record_capacity_extents", st.record_capacity_extents as f64);
    g("geomirror_record_capacity_bytes", (st.record_capacity_extents * st.extent_bytes) as f64);
    g("geomirror_record_authoritative", flag(st.authoritative));
    g("geomirror_image_consistent", flag(st.consistent));
    g("geomirror_split_brain", flag(st.split_brain));
    g("geomirror_amnesiac", flag(st.amnesiac));
    if let Some((checked, total)) = st.full_resync {
        g("geomirror_full_resync_checked_extents", checked as f64);
        g("geomirror_full_resync_total_extents", total as f64);
    }
    g("geomirror_applied_sequence", st.durable_applied.0 as f64);
    g("geomirror_replication_lag_bytes", st.lag_bytes as f64);
    g("geomirror_replication_lag_seconds", st.lag_ms as f64 / 1000.0);
    g("geomirror_failback_debt_bytes", st.failback_debt_bytes as f64);
    g("geomirror_resync_in_progress", flag(st.resync_in_progress));
    g("geomirror_resync_remaining_bytes", st.resync_remaining_bytes as f64);
    if let Some(rate) = bulk_bytes_per_sec {
        g("geomirror_failback_debt_seconds", st.failback_debt_bytes as f64 / rate.max(1) as f64);
        g("geomirror_resync_remaining_seconds", st.resync_remaining_bytes as f64 / rate.max(1) as f64);
    }
    if primary {
        histogram!(LAG_SAMPLED, "volume" => name.clone()).record(st.lag_ms as f64 / 1000.0);
    }
    let k = v.counters();
    c("geomirror_host_write_bytes_total", k.write_bytes.load(Ordering::Relaxed));
    c("geomirror_host_reads_total", k.reads.load(Ordering::Relaxed));
    c("geomirror_host_read_bytes_total", k.read_bytes.load(Ordering::Relaxed));
    c("geomirror_host_flushes_total", k.flushes.load(Ordering::Relaxed));
    c("geomirror_media_errors_total", k.media_errors.load(Ordering::Relaxed));
    if let Some(p) = &st.primary_stats {
        g("geomirror_record_update_rtt_seconds", p.record_rtt_smoothed_us as f64 / 1e6);
        g("geomirror_record_generations", p.record_generations as f64);
        primary_stats(&c, p);
    }
    if let Some(s) = &st.secondary_stats {
        secondary_stats(&c, s);
    }
}

fn primary_stats(c: &impl Fn(&'static str, u64), p: &PrimaryStats) {
    c("geomirror_record_updates_total", p.record_updates_sent);
    c("geomirror_record_pre_extensions_total", p.pre_extensions_sent);
    c("geomirror_record_answers_total", p.record_answers);
    c("geomirror_predicted_extents_total", p.predicted_extents);
    c("geomirror_predicted_extents_used_total", p.predicted_extents_used);
    c("geomirror_evicted_extents_total", p.evicted_extents);
    c("geomirror_evicted_generations_total", p.evicted_generations);
    c("geomirror_resyncs_started_total", p.resyncs_started);
    c("geomirror_resync_copied_bytes_total", p.resync_bytes_copied);
    c("geomirror_resync_verified_bytes_total", p.resync_bytes_verified);
    c("geomirror_resync_mismatched_extents_total", p.resync_extents_mismatched);
    c("geomirror_amnesiac_peers_detected_total", p.amnesiac_peers_detected);
    c("geomirror_full_resyncs_completed_total", p.full_resyncs_completed);
    c("geomirror_failed_writes_total", p.failed_writes);
    c("geomirror_degraded_writes_total", p.degraded_writes);
    c("geomirror_throttled_writes_total", p.throttled_writes);
    c("geomirror_record_full_waits_total", p.record_full_waits);
    c("geomirror_frames_refused_total", p.frames_refused);
}

fn secondary_stats(c: &impl Fn(&'static str, u64), s: &SecondaryStats) {
    c("geomirror_record_updates_total", s.record_updates);
    c("geomirror_predicted_extents_total", s.extents_predicted);
    c("geomirror_evicted_extents_total", s.extents_evicted);
    c("geomirror_applied_writes_total", s.writes_applied);
    c("geomirror_applied_bytes_total", s.bytes_applied);
    c("geomirror_extents_saved_aside_total", s.extents_saved_aside);
    c("geomirror_failback_verified_extents_total", s.extents_verified);
    c("geomirror_failback_mismatched_extents_total", s.extents_mismatched);
    c("geomirror_amnesia_detected_total", s.amnesia_detected);
    c("geomirror_full_resyncs_completed_total", s.full_resyncs_completed);
    c("geomirror_frames_refused_total", s.frames_refused);
}

fn nbd(n: &NbdCounters) {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter!("geomirror_nbd_connections_total").absolute(get(&n.connections_accepted));
    counter!("geomirror_nbd_requests_total").absolute(get(&n.requests));
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
        counter!("geomirror_nbd_errors_total", "kind" => kind).absolute(get(value));
    }
    let b = &n.inflight;
    gauge!(NBD_INFLIGHT).set(get(&b.held_bytes) as f64);
    gauge!(NBD_INFLIGHT_PEAK).set(get(&b.peak_bytes) as f64);
    gauge!(NBD_INFLIGHT_LIMIT).set(get(&b.limit_bytes) as f64);
    counter!(NBD_BUDGET_EXHAUSTED, "limit" => "site").absolute(get(&b.exhausted_site));
    counter!(NBD_BUDGET_EXHAUSTED, "limit" => "connection").absolute(get(&b.exhausted_connection));
}

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric, with its unit and what it tells an operator.
const CATALOGUE: &[(Kind, &str, Unit, &str)] = &[
    (Kind::Counter, WRITES, Unit::Count, "Host writes acknowledged, by path: hit (nothing remote waited for) or miss (waited for a record update, or a local dirty-map store)"),
    (Kind::Histogram, WRITE_LATENCY, Unit::Seconds, "Host write latency, from arrival at the volume to the ack, by path"),
    (Kind::Gauge, "geomirror_role", Unit::Count, "1 for the volume's present role, 0 for the other"),
    (Kind::Gauge, "geomirror_epoch", Unit::Count, "The volume's epoch: bumped by every promotion"),
    (Kind::Gauge, "geomirror_fenced", Unit::Count, "1 while this site is fenced: a newer epoch exists elsewhere"),
    (Kind::Gauge, "geomirror_volume_failed", Unit::Count, "1 once the volume failed (media or store error) and stopped serving"),
    (Kind::Gauge, "geomirror_link_up", Unit::Count, "1 while the volume's replication session is up"),
    (Kind::Gauge, "geomirror_record_extents", Unit::Count, "Extents in the record (the primary's copy, or the secondary's durable record)"),
    (Kind::Gauge, "geomirror_record_bytes", Unit::Bytes, "Bytes the record covers"),
    (Kind::Gauge, "geomirror_record_capacity_extents", Unit::Count, "The record's bound, record_capacity_extents"),
    (Kind::Gauge, "geomirror_record_capacity_bytes", Unit::Bytes, "The record's bound in bytes"),
    (Kind::Gauge, "geomirror_record_generations", Unit::Count, "Generations in the primary's record copy"),
    (Kind::Gauge, "geomirror_record_authoritative", Unit::Count, "0 after a degrade: the record may not cover every difference until the next resync ends"),
    (Kind::Gauge, "geomirror_image_consistent", Unit::Count, "0 while a secondary is mid-resync: its image is not a prefix of the primary's history"),
    (Kind::Gauge, "geomirror_split_brain", Unit::Count, "1 while a split brain is detected and waits for an operator"),
    (
        Kind::Gauge,
        "geomirror_amnesiac",
        Unit::Count,
        "1 while a store is an amnesiac (it lost state it had acknowledged): on a secondary its own, untrusted and not promoted without --force; on a primary its peer's, owed a full verified resync",
    ),
    (Kind::Gauge, "geomirror_full_resync_checked_extents", Unit::Count, "Extents the full verified resync under way has checked"),
    (Kind::Gauge, "geomirror_full_resync_total_extents", Unit::Count, "Extents the full verified resync under way checks in all: the volume's"),
    (Kind::Counter, "geomirror_amnesiac_peers_detected_total", Unit::Count, "Handshakes at which the peer's store turned out to be an amnesiac"),
    (Kind::Counter, "geomirror_amnesia_detected_total", Unit::Count, "Handshakes at which this site's own store turned out to be an amnesiac"),
    (Kind::Counter, "geomirror_full_resyncs_completed_total", Unit::Count, "Full verified resyncs completed (each makes an amnesiac trusted again)"),
    (Kind::Gauge, "geomirror_applied_sequence", Unit::Count, "Highest write sequence durably applied on the secondary"),
    (Kind::Gauge, "geomirror_replication_lag_bytes", Unit::Bytes, "Bytes written on the primary and not yet durably applied on the secondary"),
    (Kind::Gauge, "geomirror_replication_lag_seconds", Unit::Seconds, "Age of the oldest write the secondary may lack: the RPO now"),
    (Kind::Histogram, LAG_SAMPLED, Unit::Seconds, "The replication lag in seconds, sampled every second on a primary"),
    (Kind::Gauge, "geomirror_failback_debt_bytes", Unit::Bytes, "What a failover now would copy back to this site afterwards"),
    (Kind::Gauge, "geomirror_failback_debt_seconds", Unit::Seconds, "The failback debt at the paced bulk rate"),
    (Kind::Gauge, "geomirror_resync_in_progress", Unit::Count, "1 while a resync (a failback) onto the peer runs"),
    (Kind::Gauge, "geomirror_resync_remaining_bytes", Unit::Bytes, "What the running resync still has to check or copy"),
    (Kind::Gauge, "geomirror_resync_remaining_seconds", Unit::Seconds, "The resync's remaining bytes at the paced bulk rate"),
    (Kind::Counter, "geomirror_resyncs_started_total", Unit::Count, "Resyncs (failbacks) started by this primary"),
    (Kind::Counter, "geomirror_resync_copied_bytes_total", Unit::Bytes, "Bytes a resync copied over the link"),
    (Kind::Counter, "geomirror_resync_verified_bytes_total", Unit::Bytes, "Bytes a resync checked by digest on both sites instead of copying"),
    (Kind::Counter, "geomirror_resync_mismatched_extents_total", Unit::Count, "Extents a resync's digest check found different (copied by block)"),
    (Kind::Counter, "geomirror_record_updates_total", Unit::Count, "Record updates: sent by a primary, applied by a secondary"),
    (Kind::Counter, "geomirror_record_pre_extensions_total", Unit::Count, "Record updates sent ahead of a stream, with no host write waiting"),
    (Kind::Counter, "geomirror_record_answers_total", Unit::Count, "Record updates answered by the secondary"),
    (Kind::Gauge, "geomirror_record_update_rtt_seconds", Unit::Seconds, "Record-update round trip, smoothed: one RTT plus the secondary's synced store write"),
    (Kind::Counter, "geomirror_predicted_extents_total", Unit::Count, "Extents recorded beyond those missed: the predictor's guesses"),
    (Kind::Counter, "geomirror_predicted_extents_used_total", Unit::Count, "Predicted extents a later write used (accuracy = used / predicted)"),
    (Kind::Counter, "geomirror_evicted_extents_total", Unit::Count, "Extents evicted from the record"),
    (Kind::Counter, "geomirror_evicted_generations_total", Unit::Count, "Generations evicted from the record"),
    (Kind::Counter, "geomirror_failed_writes_total", Unit::Count, "Host writes failed (link-loss deadline, media error, fencing)"),
    (Kind::Counter, "geomirror_degraded_writes_total", Unit::Count, "Writes acknowledged without the record (degrade policy) or, in sync mode, before the peer applied them"),
    (Kind::Counter, "geomirror_throttled_writes_total", Unit::Count, "Host writes held back because the lag reached max_lag_bytes"),
    (Kind::Counter, "geomirror_record_full_waits_total", Unit::Count, "Misses that waited because the record was full of extents not yet clean"),
    (Kind::Counter, "geomirror_frames_refused_total", Unit::Count, "Peer frames refused as malformed or stale"),
    (Kind::Counter, "geomirror_applied_writes_total", Unit::Count, "Shipped writes applied by a secondary"),
    (Kind::Counter, "geomirror_applied_bytes_total", Unit::Bytes, "Shipped bytes applied by a secondary"),
    (Kind::Counter, "geomirror_extents_saved_aside_total", Unit::Count, "Extents a secondary saved aside before a failback overwrote them"),
    (Kind::Counter, "geomirror_failback_verified_extents_total", Unit::Count, "Failback digest checks answered by this (returning) site"),
    (Kind::Counter, "geomirror_failback_mismatched_extents_total", Unit::Count, "Failback digest checks that found this site's extent different"),
    (Kind::Counter, "geomirror_host_write_bytes_total", Unit::Bytes, "Bytes hosts wrote"),
    (Kind::Counter, "geomirror_host_reads_total", Unit::Count, "Host reads"),
    (Kind::Counter, "geomirror_host_read_bytes_total", Unit::Bytes, "Bytes hosts read"),
    (Kind::Counter, "geomirror_host_flushes_total", Unit::Count, "Host flushes"),
    (Kind::Counter, "geomirror_media_errors_total", Unit::Count, "Errors of the local media"),
    (Kind::Counter, "geomirror_nbd_connections_total", Unit::Count, "NBD connections accepted"),
    (Kind::Counter, "geomirror_nbd_requests_total", Unit::Count, "NBD requests read"),
    (Kind::Gauge, NBD_INFLIGHT, Unit::Bytes, "Bytes NBD requests read and not yet answered hold, over all connections: write payloads not yet applied, read data not yet sent, replies a client has not read"),
    (Kind::Gauge, NBD_INFLIGHT_PEAK, Unit::Bytes, "The most geomirror_nbd_inflight_bytes has been since the site started"),
    (Kind::Gauge, NBD_INFLIGHT_LIMIT, Unit::Bytes, "The site's bound on geomirror_nbd_inflight_bytes, [nbd] max_inflight_bytes"),
    (Kind::Counter, NBD_BUDGET_EXHAUSTED, Unit::Count, "NBD requests that waited, their connection unread, because the site's in-flight budget (limit=site) or their connection's bound (limit=connection) was spent"),
    (Kind::Counter, "geomirror_nbd_errors_total", Unit::Count, "NBD errors by kind: error replies (inval, nospc, overflow, io, other), protocol violations, refused or timed-out handshakes, connections over the limit"),
    (Kind::Counter, "geomirror_handshakes_refused_total", Unit::Count, "Replication handshakes refused, by reason (unknown_ca, expired, wrong_identity, ...)"),
    (Kind::Gauge, "geomirror_link_rtt_seconds", Unit::Seconds, "QUIC's round-trip estimate, by connection (control, data)"),
    (Kind::Gauge, "geomirror_link_congestion_window_bytes", Unit::Bytes, "QUIC's congestion window, by connection"),
    (Kind::Counter, "geomirror_link_sent_bytes_total", Unit::Bytes, "UDP bytes sent on the link, by connection"),
    (Kind::Counter, "geomirror_link_received_bytes_total", Unit::Bytes, "UDP bytes received on the link, by connection"),
    (Kind::Counter, "geomirror_link_lost_packets_total", Unit::Count, "Packets QUIC declared lost, by connection"),
    (Kind::Counter, "geomirror_link_congestion_events_total", Unit::Count, "QUIC congestion events, by connection"),
    (Kind::Gauge, ADMIN_CONNECTIONS, Unit::Count, "Admin API connections holding a slot, by pool: general (tokens, metrics, anonymous) or admin (the reserve for admin certificates)"),
    (Kind::Counter, ADMIN_REFUSED, Unit::Count, "Admin API connections refused with 503 after their handshake, by reason: address_limit (one source's share) or connection_limit (the general pool)"),
    (Kind::Counter, ADMIN_TIMEOUTS, Unit::Count, "Admin API connections ended by a deadline, by kind: handshake, header (request head) or body"),
    (Kind::Gauge, "geomirror_certificate_expiry_timestamp_seconds", Unit::Seconds, "When the site's certificate (site) and the CA (ca) expire, Unix time"),
    (Kind::Gauge, "geomirror_build_info", Unit::Count, "1, labelled with the version"),
];

fn describe() {
    for (kind, name, unit, help) in CATALOGUE {
        match kind {
            Kind::Counter => describe_counter!(*name, *unit, *help),
            Kind::Gauge => describe_gauge!(*name, *unit, *help),
            Kind::Histogram => describe_histogram!(*name, *unit, *help),
        }
    }
}
