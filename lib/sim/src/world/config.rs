//! What a run is: the configuration of the sites, the host's workload, the link, the faults
//! and the scenario, and how a seed draws one.
//!
//! Owns: `SimConfig`, `Faults` and `SimConfig::for_seed`, whose draws are append-only so
//! that a seed keeps naming the same run.
//! Must not: hold any state of a run.

use super::Scenario;
use crate::workload::{HostOp, Workload};
use geomirror_core::CoreConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// How often each fault strikes.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Chance, per host request issued, of each fault (per million).
    pub link_cut_ppm: u32,
    pub crash_primary_ppm: u32,
    pub crash_secondary_ppm: u32,
    /// Chance per host request that it is a FLUSH instead of a write.
    pub flush_ppm: u32,
    /// Chance that a frame in flight is lost with its connection (a cut mid-frame).
    pub drop_mid_frame_ppm: u32,
    /// Chance that a primary's local write reports an error (its data did reach the media, as
    /// with a write that times out after landing: the host sees an error, the sites must
    /// still converge).
    pub media_error_ppm: u32,
    /// Chance that a site's store is lost whole (its state directory emptied; half the time
    /// its media replaced by a blank one too, a rebuilt site), at a crash.
    pub store_loss_ppm: u32,
    /// Chance that a site's store goes back to an earlier durable state (a restored backup,
    /// a disk that lost synced writes), at a crash: only to states the design promises to
    /// detect (see `amnesia.rs`).
    pub store_rollback_ppm: u32,
    /// Per host request: the secondary's store goes back to a state its primary's durable
    /// memory cannot tell from the present, and the primary crashes with it (`amnesia.rs`).
    pub hidden_rollback_ppm: u32,
    /// Per host request: an operator starts an online verify of a random range (half of
    /// them with repair), and a block of the secondary's disk rots (`verify.rs`).
    pub verify_ppm: u32,
    pub bit_rot_ppm: u32,
}

/// What the sites hold when the run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    /// Both media blank and both stores new: the pair starts equal.
    Blank,
    /// The primary's media holds data (about `filled_permille` of its blocks, in runs, the
    /// rest holes) and an operator put it under protection (`geomirror adopt`): its store
    /// owes its peer a full verified resync. The secondary's store is new; its media is blank
    /// or, `seeded`, a copy of the primary's in which about `seed_diff_permille` of the
    /// blocks differ (an older copy, a restored backup, a disk shipped by hand).
    Adopted { filled_permille: u32, seeded: bool, seed_diff_permille: u32 },
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub volume_bytes: u64,
    pub extent_bytes: u64,
    pub core: CoreConfig,
    pub workload: Workload,
    pub write_bytes: u64,
    pub writes: u64,
    pub queue_depth: usize,
    /// One-way link delay range, microseconds.
    pub delay_us: (u64, u64),
    pub faults: Faults,
    pub scenario: Scenario,
    /// Bound on simulation steps; exceeding it is a liveness failure.
    pub max_events: u64,
    /// Check the oracles after every event (true in tests; the replay tool turns it off).
    pub check_every_event: bool,
    /// A fixed list of host writes (trace replay) instead of the generator.
    pub ops: Option<Vec<HostOp>>,
    /// Print every event and action to stderr (set by `GEOMIRROR_TRACE=1` when replaying).
    pub trace: bool,
    /// Bandwidth of the link for bulk data, bytes per second; None for unlimited.
    pub link_bytes_per_sec: Option<u64>,
    /// What the sites hold at the start (`initial.rs`).
    pub initial: Initial,
}

impl SimConfig {
    /// A configuration drawn from the seed: mode, policies, capacity, workload, lanes, faults
    /// and scenario all vary, so that 1,000 seeds cover every fault the oracles are judged under.
    ///
    /// Append-only: new draws go after the existing ones (see `media_error_ppm`), so that a
    /// seed keeps naming the same scenario and a failing seed stays a regression case.
    pub fn for_seed(seed: u64) -> SimConfig {
        use geomirror_core::{FlushPolicy, LagPolicy, LinkLossPolicy, Mode, PredictorConfig, PredictorKind};
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_cafe);
        let mode = match r.gen_range(0..10) {
            0 => Mode::Sync,
            1 => Mode::Async,
            _ => Mode::Predictive,
        };
        let scenario = match seed % 8 {
            0 | 1 => Scenario::Steady,
            2..=4 => Scenario::Failover,
            5 | 6 => Scenario::SplitBrain,
            _ => Scenario::Switchover,
        };
        let workload = Workload::ALL[r.gen_range(0..5)];
        let extent_bytes = [64u64 << 10, 128 << 10, 256 << 10][r.gen_range(0..3)];
        let core = CoreConfig {
            rebuild_auto: false,
            mode,
            record_capacity_extents: [8u64, 16, 32, 128][r.gen_range(0..4)],
            predictor: PredictorConfig {
                kind: if r.gen_bool(0.7) { PredictorKind::Adaptive } else { PredictorKind::KNext },
                k_next: r.gen_range(1..6),
                max_ahead: r.gen_range(6..48),
                pre_extend_within: r.gen_range(1..6),
                ghost_capacity: r.gen_range(0..64),
                max_streams: r.gen_range(1..8),
            },
            record_update_timeout: Duration::from_millis(r.gen_range(20..80)),
            on_link_loss: if r.gen_bool(0.5) { LinkLossPolicy::Block } else { LinkLossPolicy::Degrade },
            link_loss_detection_skew: Duration::from_millis(r.gen_range(0..10)),
            link_loss_deadline: Duration::from_millis(r.gen_range(100..400)),
            max_lag_bytes: [2u64 << 20, 4 << 20, 64 << 20][r.gen_range(0..3)],
            on_lag_full: if r.gen_bool(0.5) { LagPolicy::Throttle } else { LagPolicy::Resync },
            max_inflight_bytes: 1 << 20,
            max_record_updates_in_flight: r.gen_range(1..5),
            data_lanes: r.gen_range(1..4),
            flush_policy: if r.gen_bool(0.5) { FlushPolicy::Local } else { FlushPolicy::Remote },
            clean_generation_max_age: if r.gen_bool(0.5) { Some(Duration::from_millis(r.gen_range(5..200))) } else { None },
            eviction_idle_delay: Duration::from_millis(r.gen_range(1..10)),
            local_sync_interval: Duration::from_millis(r.gen_range(1..20)),
            reorder_buffer_bytes: (1 << 20) + geomirror_core::frame::MAX_FRAME_BYTES as u64,
            resync_reads_in_flight: r.gen_range(1..8),
            // Drawn below, after the draws that name the scenario.
            sync_mark_every_extents: 64,
            // From the seed, not the generator, so that every other draw stays as it was.
            verify_failback: !seed.is_multiple_of(5),
            // Drawn below, after the draws that name the scenario.
            peer_memory_persist_interval: Duration::from_secs(1),
        };
        let mut cfg = SimConfig {
            seed,
            volume_bytes: 8 << 20,
            extent_bytes,
            core,
            workload,
            write_bytes: [4096u64, 16384, 65536][r.gen_range(0..3)],
            writes: r.gen_range(200..500),
            queue_depth: r.gen_range(1..12),
            delay_us: (r.gen_range(100..1000), r.gen_range(1000..6000)),
            faults: Faults {
                link_cut_ppm: r.gen_range(0..8000),
                crash_primary_ppm: if scenario == Scenario::Steady { r.gen_range(0..6000) } else { r.gen_range(0..2000) },
                crash_secondary_ppm: r.gen_range(0..6000),
                flush_ppm: r.gen_range(0..80_000),
                drop_mid_frame_ppm: r.gen_range(0..300),
                media_error_ppm: 0,
                store_loss_ppm: 0,
                store_rollback_ppm: 0,
                hidden_rollback_ppm: 0,
                verify_ppm: 0,
                bit_rot_ppm: 0,
            },
            scenario,
            max_events: 2_000_000,
            check_every_event: true,
            ops: None,
            trace: std::env::var_os("GEOMIRROR_TRACE").is_some(),
            link_bytes_per_sec: if r.gen_bool(0.5) { Some(r.gen_range(20..200) << 20) } else { None },
            initial: Initial::Blank,
        };
        // Draws added later go last, so that earlier seeds keep their scenarios.
        cfg.faults.media_error_ppm = if r.gen_bool(0.3) { r.gen_range(0..5000) } else { 0 };
        cfg.faults.store_loss_ppm = if r.gen_bool(0.2) { r.gen_range(0..4000) } else { 0 };
        cfg.faults.store_rollback_ppm = if r.gen_bool(0.2) { r.gen_range(0..6000) } else { 0 };
        cfg.core.peer_memory_persist_interval = Duration::from_millis(r.gen_range(1..40));
        cfg.faults.hidden_rollback_ppm = if r.gen_bool(0.3) { r.gen_range(0..20000) } else { 0 };
        cfg.core.sync_mark_every_extents = r.gen_range(1..=16);
        if r.gen_bool(0.25) {
            cfg.initial = Initial::Adopted {
                filled_permille: r.gen_range(50..=1000),
                seeded: r.gen_bool(0.5),
                seed_diff_permille: r.gen_range(0..=100),
            };
        }
        cfg.core.rebuild_auto = r.gen_bool(0.5);
        cfg.faults.verify_ppm = if r.gen_bool(0.4) { r.gen_range(2000..30000) } else { 0 };
        // Rot only where no promotion puts a rotted image before the host (`verify.rs`).
        let no_store_faults = cfg.faults.store_loss_ppm == 0 && cfg.faults.store_rollback_ppm == 0 && cfg.faults.hidden_rollback_ppm == 0;
        if scenario == Scenario::Steady && no_store_faults && r.gen_bool(0.5) {
            cfg.faults.bit_rot_ppm = r.gen_range(2000..20000);
            if cfg.faults.verify_ppm == 0 {
                cfg.faults.verify_ppm = r.gen_range(1000..6000);
            }
        }
        cfg
    }
}
