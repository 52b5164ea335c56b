//! Waiting in a test: poll a condition until it holds or a deadline passes.
//!
//! Owns: the one poll loop every test waits with, and its failure message (what was awaited,
//! for how long, and the last thing seen). Must not: wait a fixed time in place of a
//! condition; the interval between looks only spaces the polls, it never decides anything.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How long to rest between two looks at a condition that is cheap to check.
pub const POLL: Duration = Duration::from_millis(100);

/// Polls `probe` every [`POLL`] until it returns `Ok`, for at most `limit` (a bound on
/// failure, not a measurement), and returns what it returned. Fails the test with `what` (the
/// awaited state) and the last `Err` (what was seen instead) once the limit has passed.
pub fn until<T, E: Display>(limit: Duration, what: &str, probe: impl FnMut() -> Result<T, E>) -> T {
    until_every(limit, POLL, what, probe)
}

/// [`until`], looking every `every`: for a condition that is costly to check (a query to
/// another process that does work for each).
pub fn until_every<T, E: Display>(limit: Duration, every: Duration, what: &str, probe: impl FnMut() -> Result<T, E>) -> T {
    within(limit, every, probe).unwrap_or_else(|seen| panic!("never {what} within {limit:?}: {seen}"))
}

/// Polls `probe` every `every` until it returns `Ok`, for at most `limit`; returns the last
/// `Err` once the limit has passed, for a test that reports more than the wait itself saw.
pub fn within<T, E>(limit: Duration, every: Duration, mut probe: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(found) => return Ok(found),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// [`within`] for a test that runs on a tokio runtime: `probe` is awaited, and the rest
/// between two looks does not block the runtime's thread.
pub async fn within_async<T, E, F: std::future::Future<Output = Result<T, E>>>(
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> F,
) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    loop {
        match probe().await {
            Ok(found) => return Ok(found),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}
