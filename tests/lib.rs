//! Helpers shared by the scenario tests in `tests/`: running many simulation seeds on all
//! cores and reporting failures with the command that replays them.

use geomirror_sim::{run_seed, SimReport, Violation};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Seeds to run: `GEOMIRROR_SEEDS` (a count, default `default`), starting at
/// `GEOMIRROR_SEED_START` (default 0). `GEOMIRROR_SEED` runs exactly one seed.
pub fn seeds_from_env(default: u64) -> Vec<u64> {
    if let Some(one) = std::env::var("GEOMIRROR_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![one];
    }
    let count = std::env::var("GEOMIRROR_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let start = std::env::var("GEOMIRROR_SEED_START").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    (start..start + count).collect()
}

/// Runs `seeds` through `f` on every core; returns the reports in seed order.
pub fn run_parallel<F>(seeds: &[u64], f: F) -> Vec<SimReport>
where
    F: Fn(u64) -> SimReport + Sync,
{
    let next = AtomicU64::new(0);
    let out = Mutex::new(Vec::with_capacity(seeds.len()));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= seeds.len() {
                    break;
                }
                let seed = seeds[i];
                // A panic inside the core or the simulator is a failure of that seed, reported
                // with the seed like any oracle violation.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed))).unwrap_or_else(|e| {
                    let msg =
                        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                    SimReport {
                        seed,
                        violations: vec![Violation { oracle: "panic", event: 0, time_us: 0, detail: msg }],
                        ..SimReport::default()
                    }
                });
                out.lock().expect("no panics while holding the lock").push(r);
            });
        }
    });
    let mut v = out.into_inner().expect("no poisoned lock");
    v.sort_by_key(|r| r.seed);
    v
}

/// Runs the default seed configuration.
pub fn run_seeds(seeds: &[u64]) -> Vec<SimReport> {
    run_parallel(seeds, run_seed)
}

/// A failing seed as a person reads it, with the command that replays it.
pub fn describe_failure(r: &SimReport) -> String {
    let v = &r.violations[0];
    format!(
        "seed {} violates {} at event {} (t={} us): {}\n  replay: GEOMIRROR_SEED={} cargo test -p geomirror-tests --test simulation -- --nocapture",
        r.seed, v.oracle, v.event, v.time_us, v.detail, r.seed
    )
}
