//! Typed, validated settings of the core.
//!
//! Owns: `CoreConfig` and its enums, with every bound the core enforces as a named field.
//! The policies an operator chooses deserialize by their lowercase names, as the site's
//! config file spells them.
//! Must not: parse files. The node shell reads TOML into its own config and builds this.

use crate::frame::LinkLossPolicy;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

/// How writes are replicated. All three live in one core so benchmarks compare like with like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The method: a predictive record on the secondary; hits ack at local speed.
    Predictive,
    /// Every ack waits for the secondary's durable apply (DRBD protocol C).
    Sync,
    /// No record, only a primary-side dirty map (DRBD protocol A).
    Async,
    /// No peer at all: a single site serving its volumes from local media. Nothing is
    /// recorded, shipped or tracked; a write is acknowledged once it is on local media (and
    /// synced, for FUA). A peer added later starts from a full copy. Never read from a
    /// config: a site without a peer is standalone.
    #[serde(skip_deserializing)]
    Standalone,
}

/// What a FLUSH (or FUA) waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushPolicy {
    /// Durable on the primary's media.
    Local,
    /// Also durably applied on the secondary: zero RPO at the host's flush points.
    Remote,
}

/// What happens when unshipped data exceeds `max_lag_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LagPolicy {
    /// New writes wait until the lag falls.
    Throttle,
    /// Drop the queued data and resync the dirty extents from media; the secondary is marked
    /// inconsistent until caught up.
    Resync,
}

/// How the secondary predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictorKind {
    /// Claim 19: the k extents after each missed one.
    KNext,
    /// Streams, strides, pre-extension and re-admission (see `predict`).
    Adaptive,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PredictorConfig {
    pub kind: PredictorKind,
    /// Claim 19's k: consecutive extents added after a missed one.
    pub k_next: u32,
    /// Furthest a detected stream is extended ahead, in extents.
    pub max_ahead: u32,
    /// A stream is extended again when it is within this many strides of the record's edge.
    pub pre_extend_within: u32,
    /// Recently evicted extents remembered for re-admission.
    pub ghost_capacity: usize,
    /// Concurrent streams tracked by the detector.
    pub max_streams: usize,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            kind: PredictorKind::Adaptive,
            k_next: 4,
            max_ahead: 256,
            pre_extend_within: 4,
            ghost_capacity: 4096,
            max_streams: 16,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CoreConfig {
    pub mode: Mode,
    /// Most extents the record may hold.
    pub record_capacity_extents: u64,
    pub predictor: PredictorConfig,
    /// How long a miss waits for the record answer before `on_link_loss` applies.
    pub record_update_timeout: Duration,
    pub on_link_loss: LinkLossPolicy,
    /// How much earlier the primary may notice a lost link than the secondary does (the
    /// transport's idle timeout). The secondary gives up its record's authority this long
    /// before the primary could first degrade.
    pub link_loss_detection_skew: Duration,
    /// Under `block`, how long a held write waits in all before it fails.
    pub link_loss_deadline: Duration,
    /// Most bytes dispatched but not yet durably applied on the secondary.
    pub max_lag_bytes: u64,
    pub on_lag_full: LagPolicy,
    /// Most bytes shipped and not yet acknowledged as applied (the data window).
    pub max_inflight_bytes: u64,
    /// Most record updates awaiting an answer; further misses batch into the next one. At
    /// most half of `secondary::MAX_QUEUED_RECORD_FRAMES`, so that the peer's queue always has
    /// room for them and for evictions sent alone meanwhile.
    pub max_record_updates_in_flight: usize,
    /// Ordered data streams that bulk and resync data are spread over.
    pub data_lanes: u8,
    pub flush_policy: FlushPolicy,
    /// A clean generation older than this is evicted even when the record is not full, so
    /// the record (and the failback set) shrinks back to the working set. None, the default,
    /// keeps clean generations until capacity pressure, as the record's bound asks (and
    /// as DRBD's activity log does): a workload that returns to an extent after a quiet spell
    /// hits instead of paying a round trip. The failback checks the set by block digests, so
    /// a larger record costs reads on both sites, not WAN bytes; the capacity bounds those.
    pub clean_generation_max_age: Option<Duration>,
    /// Eviction instructions wait this long for a control frame to ride on, then go alone.
    pub eviction_idle_delay: Duration,
    /// The primary syncs its media at least this often while extents wait to become clean.
    pub local_sync_interval: Duration,
    /// Most bytes the secondary buffers out of order.
    pub reorder_buffer_bytes: u64,
    /// Most extents a resync reads at once.
    pub resync_reads_in_flight: usize,
    /// How far, in extents, a full verified resync's sync cursor moves between two durable
    /// sync marks on the peer. With the extents swept but not yet answered when a site or the
    /// link fails, it bounds what a resumed sweep checks again (the sync replay window).
    pub sync_mark_every_extents: u64,
    /// A failback checks each extent of the failback set by block digests and copies only
    /// the blocks that differ; off, it copies the whole failback set.
    pub verify_failback: bool,
    /// A full sync onto a store that replaced the peer's (a rebuilt site) starts by itself;
    /// false (the default) waits for an operator's approval (`Primary::approve_rebuild`).
    pub rebuild_auto: bool,
    /// The primary persists what it remembers of its peer's acknowledgements (for amnesia
    /// detection after its own restart) at most this often, and sooner when a write rests on
    /// a record answer the persisted memory lacks. In memory the memory is exact; a longer
    /// interval only lets an applied-position rollback of the peer within that last interval
    /// before a primary restart go unnoticed (harmless: the peer's media keeps what it
    /// applied), and a shorter one costs a synced store write each time.
    pub peer_memory_persist_interval: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            mode: Mode::Predictive,
            record_capacity_extents: 4096,
            predictor: PredictorConfig::default(),
            record_update_timeout: Duration::from_secs(2),
            on_link_loss: LinkLossPolicy::Block,
            link_loss_detection_skew: Duration::ZERO,
            link_loss_deadline: Duration::from_secs(30),
            max_lag_bytes: 1 << 30,
            on_lag_full: LagPolicy::Throttle,
            max_inflight_bytes: 64 << 20,
            max_record_updates_in_flight: 4,
            data_lanes: 2,
            flush_policy: FlushPolicy::Local,
            clean_generation_max_age: None,
            eviction_idle_delay: Duration::from_millis(50),
            local_sync_interval: Duration::from_millis(200),
            reorder_buffer_bytes: 128 << 20,
            resync_reads_in_flight: 8,
            sync_mark_every_extents: 64,
            verify_failback: true,
            rebuild_auto: false,
            peer_memory_persist_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{field} must be at least {min}, got {got}")]
    TooSmall { field: &'static str, min: u64, got: u64 },
    #[error("{field} must be at most {max}, got {got}")]
    TooLarge { field: &'static str, max: u64, got: u64 },
    #[error("flush_policy = remote needs a peer; a standalone site can only flush locally")]
    RemoteFlushWithoutPeer,
    #[error("reorder_buffer_bytes ({reorder}) must be at least max_inflight_bytes ({inflight}) plus one largest frame, or the secondary could be sent more than it may buffer")]
    ReorderBelowInflight { reorder: u64, inflight: u64 },
}

impl CoreConfig {
    /// Checks the bounds once, at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let min = |field, min: u64, got: u64| {
            if got < min {
                Err(ConfigError::TooSmall { field, min, got })
            } else {
                Ok(())
            }
        };
        min("record_capacity_extents", 8, self.record_capacity_extents)?;
        min("predictor.k_next", 1, self.predictor.k_next as u64)?;
        min("predictor.max_streams", 1, self.predictor.max_streams as u64)?;
        min("predictor.max_ahead", self.predictor.pre_extend_within.max(1) as u64, self.predictor.max_ahead as u64)?;
        min("max_record_updates_in_flight", 1, self.max_record_updates_in_flight as u64)?;
        let max_updates = crate::secondary::MAX_QUEUED_RECORD_FRAMES / 2;
        if self.max_record_updates_in_flight > max_updates {
            return Err(ConfigError::TooLarge {
                field: "max_record_updates_in_flight",
                max: max_updates as u64,
                got: self.max_record_updates_in_flight as u64,
            });
        }
        min("data_lanes", 1, self.data_lanes as u64)?;
        min("max_inflight_bytes", 1 << 20, self.max_inflight_bytes)?;
        min("max_lag_bytes", self.max_inflight_bytes, self.max_lag_bytes)?;
        min("resync_reads_in_flight", 1, self.resync_reads_in_flight as u64)?;
        min("sync_mark_every_extents", 1, self.sync_mark_every_extents)?;
        if self.mode == Mode::Standalone && self.flush_policy == FlushPolicy::Remote {
            return Err(ConfigError::RemoteFlushWithoutPeer);
        }
        if self.reorder_buffer_bytes < self.max_inflight_bytes + crate::frame::MAX_FRAME_BYTES as u64 {
            return Err(ConfigError::ReorderBelowInflight { reorder: self.reorder_buffer_bytes, inflight: self.max_inflight_bytes });
        }
        Ok(())
    }
}
