//! Helpers for the tests in `tests/` and the benchmarks: which seeds to run, from the
//! environment; real `geomirror` processes for the end-to-end tests in `tests/e2e/`; qemu-io;
//! waiting on a condition.
//!
//! Must not: enable geomirror-core's `mutations` feature (bin dev-depends on this package, so
//! it would reach the binary the e2e tests run), or measure time for a verdict.

pub mod admin;
pub mod demo;
pub mod pair;
pub mod qemu;
pub mod site;
pub mod wait;

pub use geomirror_sim::{describe_failure, run_parallel};
use geomirror_sim::{run_seed, SimReport};

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

/// Runs the seeds with their drawn configurations, on every core.
pub fn run_seeds(seeds: &[u64]) -> Vec<SimReport> {
    run_parallel(seeds, run_seed)
}
