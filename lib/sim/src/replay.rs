//! Replay: a workload through the two cores with no faults and no I/O, to measure prediction.
//!
//! Owns: the comparison of claim 19's k-next predictor with the adaptive predictor over a
//! grid of record capacities and extent sizes, on synthetic workloads or a block trace.
//! Must not: judge correctness (the simulation does) or time anything: every figure here is
//! a count, so the same input always gives the same table.

use crate::workload::{HostOp, Workload};
use crate::world::{run, Faults, Initial, Scenario, SimConfig, SimReport};
use geomirror_core::{CoreConfig, LinkLossPolicy, Mode, PredictorConfig, PredictorKind};
use std::time::Duration;

/// What to replay.
#[derive(Clone, Debug)]
pub enum Source {
    Synthetic { workload: Workload, writes: u64, write_bytes: u64 },
    Trace { name: String, ops: Vec<HostOp> },
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::Synthetic { workload, .. } => workload.name().to_string(),
            Source::Trace { name, .. } => name.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReplaySettings {
    pub volume_bytes: u64,
    pub queue_depth: usize,
    pub rtt: Duration,
    /// Link bandwidth for bulk data, bytes per second (None: unlimited).
    pub link_bytes_per_sec: Option<u64>,
    /// Unapplied bytes at which the host is throttled, as the product does.
    pub max_lag_bytes: u64,
    /// Age at which clean generations leave the record without pressure.
    pub clean_generation_max_age: Option<Duration>,
    pub k_next: u32,
    pub seed: u64,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        ReplaySettings {
            volume_bytes: 1 << 30,
            queue_depth: 8,
            rtt: Duration::from_millis(10),
            link_bytes_per_sec: Some(125_000_000),
            max_lag_bytes: 64 << 20,
            clean_generation_max_age: Some(Duration::from_secs(1)),
            k_next: 4,
            seed: 1,
        }
    }
}

/// One replay's figures.
#[derive(Clone, Debug)]
pub struct ReplayResult {
    pub workload: String,
    pub predictor: PredictorKind,
    pub extent_bytes: u64,
    pub capacity_extents: u64,
    pub writes: u64,
    pub hits: u64,
    pub misses: u64,
    pub max_record_extents: u64,
    pub final_record_extents: u64,
    /// Failback debt when the workload ended: bytes a failover then would copy back.
    pub failback_debt_bytes: u64,
    /// Record length sampled at ten evenly spaced points of the run.
    pub record_over_time: Vec<u64>,
    pub violations: usize,
}

impl ReplayResult {
    pub fn hit_ratio(&self) -> f64 {
        if self.hits + self.misses == 0 {
            return 1.0;
        }
        self.hits as f64 / (self.hits + self.misses) as f64
    }
}

/// Replays `source` once with the given predictor, extent size and capacity.
pub fn replay_one(
    source: &Source,
    settings: &ReplaySettings,
    kind: PredictorKind,
    extent_bytes: u64,
    capacity_extents: u64,
) -> ReplayResult {
    let (workload, writes, write_bytes, ops) = match source {
        Source::Synthetic { workload, writes, write_bytes } => (*workload, *writes, *write_bytes, None),
        Source::Trace { ops, .. } => (Workload::Uniform, ops.len() as u64, 4096, Some(ops.clone())),
    };
    let one_way = settings.rtt.as_micros() as u64 / 2;
    let core = CoreConfig {
        mode: Mode::Predictive,
        record_capacity_extents: capacity_extents,
        predictor: PredictorConfig { kind, k_next: settings.k_next, ..PredictorConfig::default() },
        record_update_timeout: Duration::from_secs(10),
        on_link_loss: LinkLossPolicy::Block,
        link_loss_deadline: Duration::from_secs(60),
        max_lag_bytes: settings.max_lag_bytes,
        on_lag_full: geomirror_core::LagPolicy::Throttle,
        max_inflight_bytes: (16 << 20).min(settings.max_lag_bytes),
        clean_generation_max_age: settings.clean_generation_max_age,
        eviction_idle_delay: Duration::from_millis(5),
        local_sync_interval: Duration::from_millis(5),
        reorder_buffer_bytes: (16 << 20) + geomirror_core::frame::MAX_FRAME_BYTES as u64,
        ..CoreConfig::default()
    };
    let cfg = SimConfig {
        seed: settings.seed,
        volume_bytes: settings.volume_bytes,
        extent_bytes,
        core,
        workload,
        write_bytes,
        writes,
        queue_depth: settings.queue_depth,
        delay_us: (one_way, one_way),
        faults: Faults {
            link_cut_ppm: 0,
            crash_primary_ppm: 0,
            crash_secondary_ppm: 0,
            flush_ppm: 0,
            drop_mid_frame_ppm: 0,
            media_error_ppm: 0,
            store_loss_ppm: 0,
            store_rollback_ppm: 0,
            hidden_rollback_ppm: 0,
            verify_ppm: 0,
            bit_rot_ppm: 0,
        },
        scenario: Scenario::Steady,
        max_events: 200_000_000,
        check_every_event: false,
        ops,
        trace: std::env::var_os("GEOMIRROR_TRACE").is_some(),
        link_bytes_per_sec: settings.link_bytes_per_sec,
        initial: Initial::Blank,
    };
    summarise(source.name(), kind, extent_bytes, capacity_extents, run(cfg))
}

fn summarise(workload: String, kind: PredictorKind, extent_bytes: u64, capacity: u64, r: SimReport) -> ReplayResult {
    let n = r.record_samples.len();
    let record_over_time = (1..=10).map(|i| if n == 0 { 0 } else { r.record_samples[(n * i / 10).saturating_sub(1)].1 }).collect();
    ReplayResult {
        workload,
        predictor: kind,
        extent_bytes,
        capacity_extents: capacity,
        writes: r.writes_acked,
        hits: r.hits,
        misses: r.misses,
        max_record_extents: r.max_record_len,
        final_record_extents: r.final_record_len,
        failback_debt_bytes: r.failback_debt_bytes,
        record_over_time,
        violations: r.violations.len(),
    }
}

/// Both predictors over every (extent size, capacity) pair.
pub fn compare(source: &Source, settings: &ReplaySettings, extent_sizes: &[u64], capacities: &[u64]) -> Vec<(ReplayResult, ReplayResult)> {
    let mut out = Vec::new();
    for &e in extent_sizes {
        for &c in capacities {
            let k = replay_one(source, settings, PredictorKind::KNext, e, c);
            let a = replay_one(source, settings, PredictorKind::Adaptive, e, c);
            out.push((k, a));
        }
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A Markdown table of comparison rows.
pub fn markdown_table(rows: &[(ReplayResult, ReplayResult)]) -> String {
    let mut s = String::from(
        "| workload | extent | capacity | k-next hit % | adaptive hit % | k-next max record | adaptive max record | k-next debt | adaptive debt |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (k, a) in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} |\n",
            k.workload,
            human_bytes(k.extent_bytes),
            k.capacity_extents,
            100.0 * k.hit_ratio(),
            100.0 * a.hit_ratio(),
            k.max_record_extents,
            a.max_record_extents,
            human_bytes(k.failback_debt_bytes),
            human_bytes(a.failback_debt_bytes),
        ));
    }
    s
}

pub fn format_bytes(b: u64) -> String {
    human_bytes(b)
}
