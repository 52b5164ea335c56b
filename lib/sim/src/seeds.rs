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
