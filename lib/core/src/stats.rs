//! Plain counters and gauges the state machines keep. The node shell exports them as
//! Prometheus metrics; the replay command prints them. Must not: depend on a metrics crate.

/// The primary's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrimaryStats {
    pub writes: u64,
    /// Writes acknowledged without waiting for the secondary.
    pub hits: u64,
    /// Writes that needed a record update (or, in async/sync modes, a local dirty-map store).
    pub misses: u64,
    pub failed_writes: u64,
    pub record_updates_sent: u64,
    /// Record updates sent ahead of a stream, with no host write waiting.
    pub pre_extensions_sent: u64,
    pub record_answers: u64,
    /// Extents the secondary added beyond those missed.
    pub predicted_extents: u64,
    /// Predicted extents that a later write actually used.
    pub predicted_extents_used: u64,
    pub evicted_extents: u64,
    pub evicted_generations: u64,
    pub record_len: u64,
    pub record_generations: u64,
    pub local_dirty_len: u64,
    pub lag_bytes: u64,
    pub inflight_bytes: u64,
    pub dispatched_seq: u64,
    pub applied_seq: u64,
    pub resyncs_started: u64,
    pub resync_extents_copied: u64,
    pub resync_bytes_copied: u64,
    /// Failback extents checked by digest instead of copied, and of those, the ones the peer
    /// found different (then copied).
    pub resync_extents_verified: u64,
    pub resync_bytes_verified: u64,
    pub resync_extents_mismatched: u64,
    /// Handshakes at which the peer's store turned out to be an amnesiac (another identity,
    /// or less than it had acknowledged), and full verified resyncs completed since.
    pub amnesiac_peers_detected: u64,
    pub full_resyncs_completed: u64,
    /// Extents a full resync has checked so far (the sweep's position), and the volume's
    /// extent count: the full resync's progress.
    pub full_resync_swept_extents: u64,
    /// Sync marks dispatched (`Apply::SyncMark`), full resyncs resumed from a peer's sync
    /// cursor rather than the first extent, and the extent the last full resync started at
    /// (0 when it did not resume).
    pub sync_marks: u64,
    pub full_resyncs_resumed: u64,
    pub full_resync_resumed_at: u64,
    /// Online verifies started and run to their end; bytes read and sent as checks; extents
    /// and 4 KiB blocks the peer found different.
    pub verifies_started: u64,
    /// Full syncs onto a replaced peer store that an operator approved.
    pub rebuilds_approved: u64,
    pub verifies_completed: u64,
    pub verify_bytes_checked: u64,
    pub verify_extents_found: u64,
    pub verify_blocks_found: u64,
    /// Times this site stepped down because the peer showed its own store went back.
    pub stepped_down_amnesiac: u64,
    pub degraded_writes: u64,
    /// Writes held back because unapplied data reached `max_lag_bytes` (each counted once).
    pub throttled_writes: u64,
    /// Times a miss had to wait because the record was full of extents not yet clean.
    pub record_full_waits: u64,
    pub frames_refused: u64,
    /// Sum of record-update round trips, in microseconds, and how many.
    pub record_rtt_us_total: u64,
    pub record_rtt_count: u64,
    /// The record-update round trip, smoothed (7/8 old, 1/8 new), in microseconds.
    pub record_rtt_smoothed_us: u64,
}

/// The secondary's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecondaryStats {
    pub record_updates: u64,
    pub record_len: u64,
    pub generations: u64,
    pub extents_added: u64,
    pub extents_predicted: u64,
    pub extents_evicted: u64,
    pub applied_seq: u64,
    pub durable_applied_seq: u64,
    pub writes_applied: u64,
    pub bytes_applied: u64,
    pub reorder_bytes: u64,
    pub extents_saved_aside: u64,
    /// Failback checks done here, and those that found this site's extent different.
    pub extents_verified: u64,
    pub extents_mismatched: u64,
    pub frames_refused: u64,
    /// Times this store found itself an amnesiac at a handshake, and full resyncs that ended
    /// here (each clears the amnesia).
    pub amnesia_detected: u64,
    pub full_resyncs_completed: u64,
}
