//! Running many seeds: on every core, with panics caught and reported against their seed.
//!
//! Owns: the fan-out used by the simulation tests and by `geomirror simulate`.
//! Must not: change what a seed does; a seed's run is the same on one thread or many.

use crate::world::{SimReport, Violation};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `seeds` through `f` on every core; returns the reports in seed order. A panic inside
/// the core or the simulator becomes a failure of that seed, reported like any violation.
pub fn run_parallel<F>(seeds: &[u64], f: F) -> Vec<SimReport>
where
    F: Fn(u64) -> SimReport + Sync,
{
    run_parallel_with_progress(seeds, f, |_| {})
}

/// As `run_parallel`, calling `progress(done)` after each seed.
pub fn run_parallel_with_progress<F, P>(seeds: &[u64], f: F, progress: P) -> Vec<SimReport>
where
    F: Fn(u64) -> SimReport + Sync,
    P: Fn(usize) + Sync,
{
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let out = Mutex::new(Vec::with_capacity(seeds.len()));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= seeds.len() {
                    break;
                }
                let seed = seeds[i];
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed))).unwrap_or_else(|e| {
                    let msg =
                        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                    SimReport {
                        seed,
                        violations: vec![Violation { oracle: "panic", event: 0, time_us: 0, detail: msg }],
                        ..SimReport::default()
                    }
                });
                out.lock().expect("no panic while holding the lock").push(r);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            });
        }
    });
    let mut v = out.into_inner().expect("no poisoned lock");
    v.sort_by_key(|r| r.seed);
    v
}

/// A failing seed as a person reads it, with the command that replays it.
pub fn describe_failure(r: &SimReport) -> String {
    match r.violations.first() {
        None => format!("seed {} passed", r.seed),
        Some(v) => format!(
            "seed {} violates {} at event {} (t={} us): {}\n  replay: geomirror simulate --seed {} --trace   (or GEOMIRROR_SEED={} cargo test -p geomirror-tests --test simulation)",
            r.seed, v.oracle, v.event, v.time_us, v.detail, r.seed, r.seed
        ),
    }
}

/// What a batch of seeds exercised, summed: the coverage the simulation must show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedTotals {
    pub seeds: u64,
    pub failed: u64,
    pub writes_acked: u64,
    pub crashes: u64,
    pub media_errors: u64,
    pub link_cuts: u64,
    pub promotions: u64,
    pub loud_promotions: u64,
    pub split_brains: u64,
    pub switchovers: u64,
    pub resyncs: u64,
    pub evicted_generations: u64,
    pub degraded_writes: u64,
    /// Writes failed back to the host (block policy deadlines, fencing, media errors).
    pub writes_failed: u64,
    pub extents_saved_aside: u64,
    pub extents_verified: u64,
    pub extents_verified_equal: u64,
    pub lost_acked_blocks_reported: u64,
    /// Stores lost or rolled back, amnesias healed by a full verified resync, and promotions
    /// an operator made because no site was primary.
    pub store_faults: u64,
    pub amnesias_healed: u64,
    pub recoveries: u64,
    /// Store rollbacks hidden from a primary that crashed with them (invariant R held).
    pub hidden_rollbacks: u64,
    /// Runs that started from an adopted volume (data on the primary only), and the O8
    /// probes made while a full verified resync was owed.
    pub adopted: u64,
    pub o8_probes: u64,
    pub sync_resumes: u64,
    pub verifies: u64,
    pub rotted_blocks: u64,
    pub verify_found: u64,
    pub rebuilds_approved: u64,
}

impl SeedTotals {
    pub fn of(reports: &[SimReport]) -> SeedTotals {
        let mut t = SeedTotals { seeds: reports.len() as u64, ..SeedTotals::default() };
        for r in reports {
            t.failed += u64::from(!r.violations.is_empty());
            t.writes_acked += r.writes_acked;
            t.crashes += r.crashes;
            t.media_errors += r.media_errors;
            t.link_cuts += r.link_cuts;
            t.promotions += r.promotions;
            t.loud_promotions += r.loud_promotions;
            t.split_brains += r.split_brains_detected;
            t.switchovers += r.switchovers;
            t.resyncs += r.resyncs;
            t.evicted_generations += r.evicted_generations;
            t.degraded_writes += r.degraded_writes;
            t.writes_failed += r.writes_failed;
            t.extents_saved_aside += r.saved_aside_extents;
            t.extents_verified += r.extents_verified;
            t.extents_verified_equal += r.extents_verified_equal;
            t.lost_acked_blocks_reported += r.lost_acked_blocks_reported;
            t.store_faults += r.store_faults;
            t.amnesias_healed += r.amnesias_healed;
            t.recoveries += r.recoveries;
            t.hidden_rollbacks += r.hidden_rollbacks;
            t.adopted += u64::from(r.adopted);
            t.o8_probes += r.o8_probes;
            t.sync_resumes += r.sync_resumes;
            t.verifies += r.verifies;
            t.rotted_blocks += r.rotted_blocks;
            t.verify_found += r.verify_found;
            t.rebuilds_approved += r.rebuilds_approved;
        }
        t
    }
}

impl std::fmt::Display for SeedTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} seeds: {} writes acknowledged, {} crashes, {} media errors, {} link cuts, {} promotions ({} loud), {} split brains, {} switchovers, {} resyncs, {} generations evicted, {} writes degraded, {} writes failed, {} extents saved aside, {} failback extents checked by digest ({} equal, not copied), {} acknowledged blocks lost after promotion (inside recorded extents, or reported by a loud promotion), {} stores lost or rolled back ({} amnesias healed by a full verified resync, {} recoveries promoting a site when none was primary, {} rollbacks hidden from a primary that crashed with them), {} volumes adopted with data on the primary, {} promotions probed while a full verified resync was owed (O8), {} full verified resyncs resumed from a durable sync cursor, {} online verifies (O9) over {} rotted blocks ({} extents found different), {} rebuilds onto a replaced store approved by an operator",
            self.seeds,
            self.writes_acked,
            self.crashes,
            self.media_errors,
            self.link_cuts,
            self.promotions,
            self.loud_promotions,
            self.split_brains,
            self.switchovers,
            self.resyncs,
            self.evicted_generations,
            self.degraded_writes,
            self.writes_failed,
            self.extents_saved_aside,
            self.extents_verified,
            self.extents_verified_equal,
            self.lost_acked_blocks_reported,
            self.store_faults,
            self.amnesias_healed,
            self.recoveries,
            self.hidden_rollbacks,
            self.adopted,
            self.o8_probes,
            self.sync_resumes,
            self.verifies,
            self.rotted_blocks,
            self.verify_found,
            self.rebuilds_approved
        )
    }
}
