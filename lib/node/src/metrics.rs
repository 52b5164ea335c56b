//! Prometheus metrics: the one module that names them, describes them and records them.
//!
//! Owns: the process's recorder (metrics-exporter-prometheus, installed once, with explicit
//! buckets so that latencies and lag aggregate across sites), the name of every metric (a
//! constant each, which the recorder's catalogue and every writer use) with its unit and
//! help, the per-volume write handles the volume driver feeds on each ack (`VolumeMetrics`),
//! and the admin API's connection gauges and refusal and timeout counters, fed directly as
//! connections come and go (`admin_connections`, `admin_refused`, `admin_timeouts`).
//! Everything else is set once a second by `crate::refresher`, which reads what it reports on.
//!
//! Labels are bounded: `site` (global), `volume`, `role`, `path` (hit or miss), `reason`,
//! `kind`, `pool`, `limit` (site or connection), `connection` (control or data) and
//! `certificate` (site or ca); never an offset, an address or a request.
//!
//! Must not: sit on a decision path, or read what it names (volumes, NBD, the link): it is a
//! leaf that they all write to. Nothing here is read back by replication.

use geomirror_core::WritePath;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::Mutex;
use std::time::Duration;

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
pub const ROLE: &str = "geomirror_role";
pub const EPOCH: &str = "geomirror_epoch";
pub const FENCED: &str = "geomirror_fenced";
pub const VOLUME_FAILED: &str = "geomirror_volume_failed";
pub const LINK_UP: &str = "geomirror_link_up";
pub const RECORD_EXTENTS: &str = "geomirror_record_extents";
pub const RECORD_BYTES: &str = "geomirror_record_bytes";
pub const RECORD_CAPACITY_EXTENTS: &str = "geomirror_record_capacity_extents";
pub const RECORD_CAPACITY_BYTES: &str = "geomirror_record_capacity_bytes";
pub const RECORD_GENERATIONS: &str = "geomirror_record_generations";
pub const RECORD_AUTHORITATIVE: &str = "geomirror_record_authoritative";
pub const IMAGE_CONSISTENT: &str = "geomirror_image_consistent";
pub const SPLIT_BRAIN: &str = "geomirror_split_brain";
pub const AMNESIAC: &str = "geomirror_amnesiac";
pub const FULL_RESYNC_CHECKED_EXTENTS: &str = "geomirror_full_resync_checked_extents";
pub const FULL_RESYNC_TOTAL_EXTENTS: &str = "geomirror_full_resync_total_extents";
pub const FULL_RESYNC_REMAINING_BYTES: &str = "geomirror_full_resync_remaining_bytes";
pub const FULL_RESYNC_REMAINING_SECONDS: &str = "geomirror_full_resync_remaining_seconds";
pub const SYNC_CURSOR_EXTENT: &str = "geomirror_sync_cursor_extent";
pub const REBUILD_PENDING: &str = "geomirror_rebuild_pending";
pub const VERIFY_RUNNING: &str = "geomirror_verify_running";
pub const VERIFY_CHECKED_EXTENTS: &str = "geomirror_verify_checked_extents";
pub const VERIFY_TOTAL_EXTENTS: &str = "geomirror_verify_total_extents";
pub const VERIFY_OUT_OF_SYNC_EXTENTS: &str = "geomirror_verify_out_of_sync_extents";
pub const VERIFY_OUT_OF_SYNC_BLOCKS: &str = "geomirror_verify_out_of_sync_blocks";
pub const VERIFY_UNREPAIRED_EXTENTS: &str = "geomirror_verify_unrepaired_extents";
pub const VERIFIES_STARTED_TOTAL: &str = "geomirror_verifies_started_total";
pub const VERIFIES_COMPLETED_TOTAL: &str = "geomirror_verifies_completed_total";
pub const VERIFY_CHECKED_BYTES_TOTAL: &str = "geomirror_verify_checked_bytes_total";
pub const AMNESIAC_PEERS_DETECTED_TOTAL: &str = "geomirror_amnesiac_peers_detected_total";
pub const AMNESIA_DETECTED_TOTAL: &str = "geomirror_amnesia_detected_total";
pub const FULL_RESYNCS_COMPLETED_TOTAL: &str = "geomirror_full_resyncs_completed_total";
pub const APPLIED_SEQUENCE: &str = "geomirror_applied_sequence";
pub const REPLICATION_LAG_BYTES: &str = "geomirror_replication_lag_bytes";
pub const REPLICATION_LAG_SECONDS: &str = "geomirror_replication_lag_seconds";
pub const FAILBACK_DEBT_BYTES: &str = "geomirror_failback_debt_bytes";
pub const FAILBACK_DEBT_SECONDS: &str = "geomirror_failback_debt_seconds";
pub const RESYNC_IN_PROGRESS: &str = "geomirror_resync_in_progress";
pub const RESYNC_REMAINING_BYTES: &str = "geomirror_resync_remaining_bytes";
pub const RESYNC_REMAINING_SECONDS: &str = "geomirror_resync_remaining_seconds";
pub const RESYNCS_STARTED_TOTAL: &str = "geomirror_resyncs_started_total";
pub const RESYNC_COPIED_BYTES_TOTAL: &str = "geomirror_resync_copied_bytes_total";
pub const RESYNC_VERIFIED_BYTES_TOTAL: &str = "geomirror_resync_verified_bytes_total";
pub const RESYNC_MISMATCHED_EXTENTS_TOTAL: &str = "geomirror_resync_mismatched_extents_total";
pub const RECORD_UPDATES_TOTAL: &str = "geomirror_record_updates_total";
pub const RECORD_PRE_EXTENSIONS_TOTAL: &str = "geomirror_record_pre_extensions_total";
pub const RECORD_ANSWERS_TOTAL: &str = "geomirror_record_answers_total";
pub const RECORD_UPDATE_RTT_SECONDS: &str = "geomirror_record_update_rtt_seconds";
pub const PREDICTED_EXTENTS_TOTAL: &str = "geomirror_predicted_extents_total";
pub const PREDICTED_EXTENTS_USED_TOTAL: &str = "geomirror_predicted_extents_used_total";
pub const EVICTED_EXTENTS_TOTAL: &str = "geomirror_evicted_extents_total";
pub const EVICTED_GENERATIONS_TOTAL: &str = "geomirror_evicted_generations_total";
pub const FAILED_WRITES_TOTAL: &str = "geomirror_failed_writes_total";
pub const DEGRADED_WRITES_TOTAL: &str = "geomirror_degraded_writes_total";
pub const THROTTLED_WRITES_TOTAL: &str = "geomirror_throttled_writes_total";
pub const RECORD_FULL_WAITS_TOTAL: &str = "geomirror_record_full_waits_total";
pub const FRAMES_REFUSED_TOTAL: &str = "geomirror_frames_refused_total";
pub const APPLIED_WRITES_TOTAL: &str = "geomirror_applied_writes_total";
pub const APPLIED_BYTES_TOTAL: &str = "geomirror_applied_bytes_total";
pub const EXTENTS_SAVED_ASIDE_TOTAL: &str = "geomirror_extents_saved_aside_total";
pub const FAILBACK_VERIFIED_EXTENTS_TOTAL: &str = "geomirror_failback_verified_extents_total";
pub const FAILBACK_MISMATCHED_EXTENTS_TOTAL: &str = "geomirror_failback_mismatched_extents_total";
pub const HOST_WRITE_BYTES_TOTAL: &str = "geomirror_host_write_bytes_total";
pub const HOST_READS_TOTAL: &str = "geomirror_host_reads_total";
pub const HOST_READ_BYTES_TOTAL: &str = "geomirror_host_read_bytes_total";
pub const HOST_FLUSHES_TOTAL: &str = "geomirror_host_flushes_total";
pub const MEDIA_ERRORS_TOTAL: &str = "geomirror_media_errors_total";
pub const NBD_CONNECTIONS_TOTAL: &str = "geomirror_nbd_connections_total";
pub const NBD_REQUESTS_TOTAL: &str = "geomirror_nbd_requests_total";
pub const NBD_ERRORS_TOTAL: &str = "geomirror_nbd_errors_total";
pub const HANDSHAKES_REFUSED_TOTAL: &str = "geomirror_handshakes_refused_total";
pub const LINK_RTT_SECONDS: &str = "geomirror_link_rtt_seconds";
pub const LINK_CONGESTION_WINDOW_BYTES: &str = "geomirror_link_congestion_window_bytes";
pub const LINK_SENT_BYTES_TOTAL: &str = "geomirror_link_sent_bytes_total";
pub const LINK_RECEIVED_BYTES_TOTAL: &str = "geomirror_link_received_bytes_total";
pub const LINK_LOST_PACKETS_TOTAL: &str = "geomirror_link_lost_packets_total";
pub const LINK_CONGESTION_EVENTS_TOTAL: &str = "geomirror_link_congestion_events_total";
pub const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str = "geomirror_certificate_expiry_timestamp_seconds";
pub const BUILD_INFO: &str = "geomirror_build_info";

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
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
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

/// The installed recorder's handle, if any: the refresher runs its upkeep.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.lock().expect("not poisoned").clone()
}

/// The current metrics in Prometheus's text format (empty without a recorder).
pub fn render() -> String {
    HANDLE.lock().expect("not poisoned").as_ref().map(PrometheusHandle::render).unwrap_or_default()
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
    (Kind::Gauge, ROLE, Unit::Count, "1 for the volume's present role, 0 for the other"),
    (Kind::Gauge, EPOCH, Unit::Count, "The volume's epoch: bumped by every promotion"),
    (Kind::Gauge, FENCED, Unit::Count, "1 while this site is fenced: a newer epoch exists elsewhere"),
    (Kind::Gauge, VOLUME_FAILED, Unit::Count, "1 once the volume failed (media or store error) and stopped serving"),
    (Kind::Gauge, LINK_UP, Unit::Count, "1 while the volume's replication session is up"),
    (Kind::Gauge, RECORD_EXTENTS, Unit::Count, "Extents in the record (the primary's copy, or the secondary's durable record)"),
    (Kind::Gauge, RECORD_BYTES, Unit::Bytes, "Bytes the record covers"),
    (Kind::Gauge, RECORD_CAPACITY_EXTENTS, Unit::Count, "The record's bound, record_capacity_extents"),
    (Kind::Gauge, RECORD_CAPACITY_BYTES, Unit::Bytes, "The record's bound in bytes"),
    (Kind::Gauge, RECORD_GENERATIONS, Unit::Count, "Generations in the primary's record copy"),
    (Kind::Gauge, RECORD_AUTHORITATIVE, Unit::Count, "0 after a degrade: the record may not cover every difference until the next resync ends"),
    (Kind::Gauge, IMAGE_CONSISTENT, Unit::Count, "0 while a secondary is mid-resync: its image is not a prefix of the primary's history"),
    (Kind::Gauge, SPLIT_BRAIN, Unit::Count, "1 while a split brain is detected and waits for an operator"),
    (
        Kind::Gauge,
        AMNESIAC,
        Unit::Count,
        "1 while a store is an amnesiac (it lost state it had acknowledged): on a secondary its own, untrusted and not promoted without --force; on a primary its peer's, owed a full verified resync",
    ),
    (Kind::Gauge, FULL_RESYNC_CHECKED_EXTENTS, Unit::Count, "Extents the full verified resync under way has checked"),
    (Kind::Gauge, FULL_RESYNC_TOTAL_EXTENTS, Unit::Count, "Extents the full verified resync under way checks in all: the volume's"),
    (
        Kind::Gauge,
        FULL_RESYNC_REMAINING_BYTES,
        Unit::Bytes,
        "Primary: bytes of extents the full verified resync under way has still to check or copy",
    ),
    (
        Kind::Gauge,
        FULL_RESYNC_REMAINING_SECONDS,
        Unit::Seconds,
        "Primary: the time the full verified resync under way needs for what is left, at its rate so far",
    ),
    (
        Kind::Gauge,
        SYNC_CURSOR_EXTENT,
        Unit::Count,
        "Secondary: the full verified resync's durable sync cursor (extents below it are synced). Primary: the extent the resync under way resumed at",
    ),
    (
        Kind::Gauge,
        REBUILD_PENDING,
        Unit::Count,
        "Primary: 1 while a full sync onto a peer whose store was replaced (a rebuilt site) waits for an operator's approval (geomirror rebuild)",
    ),
    (Kind::Gauge, VERIFY_RUNNING, Unit::Count, "Primary: 1 while an online verify runs (geomirror verify)"),
    (Kind::Gauge, VERIFY_CHECKED_EXTENTS, Unit::Count, "Primary: extents the running (or last) online verify has compared with the peer"),
    (Kind::Gauge, VERIFY_TOTAL_EXTENTS, Unit::Count, "Primary: extents the running (or last) online verify compares in all"),
    (
        Kind::Gauge,
        VERIFY_OUT_OF_SYNC_EXTENTS,
        Unit::Count,
        "Primary: extents the running (or last) online verify found different on the peer; anything above 0 is a fault to investigate (disk, memory, or a bug)",
    ),
    (Kind::Gauge, VERIFY_OUT_OF_SYNC_BLOCKS, Unit::Count, "Primary: 4 KiB blocks of those extents that differ"),
    (
        Kind::Gauge,
        VERIFY_UNREPAIRED_EXTENTS,
        Unit::Count,
        "Primary: extents a verify found different that no resync has copied yet (verify --repair, a reconnect or a restart copies them)",
    ),
    (Kind::Counter, VERIFIES_STARTED_TOTAL, Unit::Count, "Online verifies started"),
    (Kind::Counter, VERIFIES_COMPLETED_TOTAL, Unit::Count, "Online verifies run to their end (not cancelled, not lost to a restart)"),
    (Kind::Counter, VERIFY_CHECKED_BYTES_TOTAL, Unit::Bytes, "Bytes read and sent to the peer as digests by online verifies"),
    (Kind::Counter, AMNESIAC_PEERS_DETECTED_TOTAL, Unit::Count, "Handshakes at which the peer's store turned out to be an amnesiac"),
    (Kind::Counter, AMNESIA_DETECTED_TOTAL, Unit::Count, "Handshakes at which this site's own store turned out to be an amnesiac"),
    (Kind::Counter, FULL_RESYNCS_COMPLETED_TOTAL, Unit::Count, "Full verified resyncs completed (each makes an amnesiac trusted again)"),
    (Kind::Gauge, APPLIED_SEQUENCE, Unit::Count, "Highest write sequence durably applied on the secondary"),
    (Kind::Gauge, REPLICATION_LAG_BYTES, Unit::Bytes, "Bytes written on the primary and not yet durably applied on the secondary"),
    (Kind::Gauge, REPLICATION_LAG_SECONDS, Unit::Seconds, "Age of the oldest write the secondary may lack: the RPO now"),
    (Kind::Histogram, LAG_SAMPLED, Unit::Seconds, "The replication lag in seconds, sampled every second on a primary"),
    (Kind::Gauge, FAILBACK_DEBT_BYTES, Unit::Bytes, "What a failover now would copy back to this site afterwards"),
    (Kind::Gauge, FAILBACK_DEBT_SECONDS, Unit::Seconds, "The failback debt at the paced bulk rate"),
    (Kind::Gauge, RESYNC_IN_PROGRESS, Unit::Count, "1 while a resync (a failback) onto the peer runs"),
    (Kind::Gauge, RESYNC_REMAINING_BYTES, Unit::Bytes, "What the running resync still has to check or copy"),
    (Kind::Gauge, RESYNC_REMAINING_SECONDS, Unit::Seconds, "The resync's remaining bytes at the paced bulk rate"),
    (Kind::Counter, RESYNCS_STARTED_TOTAL, Unit::Count, "Resyncs (failbacks) started by this primary"),
    (Kind::Counter, RESYNC_COPIED_BYTES_TOTAL, Unit::Bytes, "Bytes a resync copied over the link"),
    (Kind::Counter, RESYNC_VERIFIED_BYTES_TOTAL, Unit::Bytes, "Bytes a resync checked by digest on both sites instead of copying"),
    (Kind::Counter, RESYNC_MISMATCHED_EXTENTS_TOTAL, Unit::Count, "Extents a resync's digest check found different (copied by block)"),
    (Kind::Counter, RECORD_UPDATES_TOTAL, Unit::Count, "Record updates: sent by a primary, applied by a secondary"),
    (Kind::Counter, RECORD_PRE_EXTENSIONS_TOTAL, Unit::Count, "Record updates sent ahead of a stream, with no host write waiting"),
    (Kind::Counter, RECORD_ANSWERS_TOTAL, Unit::Count, "Record updates answered by the secondary"),
    (Kind::Gauge, RECORD_UPDATE_RTT_SECONDS, Unit::Seconds, "Record-update round trip, smoothed: one RTT plus the secondary's synced store write"),
    (Kind::Counter, PREDICTED_EXTENTS_TOTAL, Unit::Count, "Extents recorded beyond those missed: the predictor's guesses"),
    (Kind::Counter, PREDICTED_EXTENTS_USED_TOTAL, Unit::Count, "Predicted extents a later write used (accuracy = used / predicted)"),
    (Kind::Counter, EVICTED_EXTENTS_TOTAL, Unit::Count, "Extents evicted from the record"),
    (Kind::Counter, EVICTED_GENERATIONS_TOTAL, Unit::Count, "Generations evicted from the record"),
    (Kind::Counter, FAILED_WRITES_TOTAL, Unit::Count, "Host writes failed (link-loss deadline, media error, fencing)"),
    (Kind::Counter, DEGRADED_WRITES_TOTAL, Unit::Count, "Writes acknowledged without the record (degrade policy) or, in sync mode, before the peer applied them"),
    (Kind::Counter, THROTTLED_WRITES_TOTAL, Unit::Count, "Host writes held back because the lag reached max_lag_bytes"),
    (Kind::Counter, RECORD_FULL_WAITS_TOTAL, Unit::Count, "Misses that waited because the record was full of extents not yet clean"),
    (Kind::Counter, FRAMES_REFUSED_TOTAL, Unit::Count, "Peer frames refused as malformed or stale"),
    (Kind::Counter, APPLIED_WRITES_TOTAL, Unit::Count, "Shipped writes applied by a secondary"),
    (Kind::Counter, APPLIED_BYTES_TOTAL, Unit::Bytes, "Shipped bytes applied by a secondary"),
    (Kind::Counter, EXTENTS_SAVED_ASIDE_TOTAL, Unit::Count, "Extents a secondary saved aside before a failback overwrote them"),
    (Kind::Counter, FAILBACK_VERIFIED_EXTENTS_TOTAL, Unit::Count, "Failback digest checks answered by this (returning) site"),
    (Kind::Counter, FAILBACK_MISMATCHED_EXTENTS_TOTAL, Unit::Count, "Failback digest checks that found this site's extent different"),
    (Kind::Counter, HOST_WRITE_BYTES_TOTAL, Unit::Bytes, "Bytes hosts wrote"),
    (Kind::Counter, HOST_READS_TOTAL, Unit::Count, "Host reads"),
    (Kind::Counter, HOST_READ_BYTES_TOTAL, Unit::Bytes, "Bytes hosts read"),
    (Kind::Counter, HOST_FLUSHES_TOTAL, Unit::Count, "Host flushes"),
    (Kind::Counter, MEDIA_ERRORS_TOTAL, Unit::Count, "Errors of the local media"),
    (Kind::Counter, NBD_CONNECTIONS_TOTAL, Unit::Count, "NBD connections accepted"),
    (Kind::Counter, NBD_REQUESTS_TOTAL, Unit::Count, "NBD requests read"),
    (Kind::Gauge, NBD_INFLIGHT, Unit::Bytes, "Bytes NBD requests read and not yet answered hold, over all connections: write payloads not yet applied, read data not yet sent, replies a client has not read"),
    (Kind::Gauge, NBD_INFLIGHT_PEAK, Unit::Bytes, "The most geomirror_nbd_inflight_bytes has been since the site started"),
    (Kind::Gauge, NBD_INFLIGHT_LIMIT, Unit::Bytes, "The site's bound on geomirror_nbd_inflight_bytes, [nbd] max_inflight_bytes"),
    (Kind::Counter, NBD_BUDGET_EXHAUSTED, Unit::Count, "NBD requests that waited, their connection unread, because the site's in-flight budget (limit=site) or their connection's bound (limit=connection) was spent"),
    (Kind::Counter, NBD_ERRORS_TOTAL, Unit::Count, "NBD errors by kind: error replies (inval, nospc, overflow, io, other), protocol violations, refused or timed-out handshakes, connections over the limit"),
    (Kind::Counter, HANDSHAKES_REFUSED_TOTAL, Unit::Count, "Replication handshakes refused, by reason (unknown_ca, expired, wrong_identity, ...)"),
    (Kind::Gauge, LINK_RTT_SECONDS, Unit::Seconds, "QUIC's round-trip estimate, by connection (control, data)"),
    (Kind::Gauge, LINK_CONGESTION_WINDOW_BYTES, Unit::Bytes, "QUIC's congestion window, by connection"),
    (Kind::Counter, LINK_SENT_BYTES_TOTAL, Unit::Bytes, "UDP bytes sent on the link, by connection"),
    (Kind::Counter, LINK_RECEIVED_BYTES_TOTAL, Unit::Bytes, "UDP bytes received on the link, by connection"),
    (Kind::Counter, LINK_LOST_PACKETS_TOTAL, Unit::Count, "Packets QUIC declared lost, by connection"),
    (Kind::Counter, LINK_CONGESTION_EVENTS_TOTAL, Unit::Count, "QUIC congestion events, by connection"),
    (Kind::Gauge, ADMIN_CONNECTIONS, Unit::Count, "Admin API connections holding a slot, by pool: general (tokens, metrics, anonymous) or admin (the reserve for admin certificates)"),
    (Kind::Counter, ADMIN_REFUSED, Unit::Count, "Admin API connections refused with 503 after their handshake, by reason: address_limit (one source's share) or connection_limit (the general pool)"),
    (Kind::Counter, ADMIN_TIMEOUTS, Unit::Count, "Admin API connections ended by a deadline, by kind: handshake, header (request head) or body"),
    (Kind::Gauge, CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, Unit::Seconds, "When the site's certificate (site) and the CA (ca) expire, Unix time"),
    (Kind::Gauge, BUILD_INFO, Unit::Count, "1, labelled with the version"),
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
