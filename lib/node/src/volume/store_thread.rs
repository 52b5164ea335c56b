//! The store thread: a volume's store batches made durable off its driver's thread.
//!
//! Owns: the order of store jobs (every batch, and every load after a role change, runs in
//! the order sent), group commit, and the store's checkpoints.
//!
//! Must not: reorder, drop or retry a batch; after a failed write it ends, and the volume
//! fails.

use super::ToDriver;
use crate::store::Store;
use geomirror_core::{SiteState, StoreWrite, Token};
use std::io;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Work for the store thread, done in the order sent.
pub(super) enum StoreJob {
    /// A batch of the machine of `role_changes` (see `Driver::role_changes`), answered with
    /// `ToDriver::Persisted`.
    Write { role_changes: u64, token: Token, batch: Vec<StoreWrite> },
    /// The state after every earlier write.
    Load(mpsc::Sender<SiteState>),
}

/// A synced store write slower than this is logged: every miss waits for one.
const SLOW_STORE_WRITE: Duration = Duration::from_secs(1);

/// Most batches made durable by one synced store write.
const STORE_GROUP: usize = 256;

/// The store thread: makes batches durable off the volume's driver thread, so that a slow
/// synced write (on a disk busy with writeback, an fsync can take seconds) holds back only
/// what waits for it, never hits, flushes or status. Batches queued while one write runs are
/// made durable together by the next (group commit), in order.
///
/// Between jobs, every `CHECKPOINT_INTERVAL`, and when the volume stops, the store takes a
/// checkpoint (`Store::checkpoint`): what lived only in a log moves into the store's files.
fn run(mut store: Box<dyn Store>, jobs: mpsc::Receiver<StoreJob>, back: mpsc::Sender<ToDriver>) {
    let mut next = None;
    let mut checkpoint_at = Instant::now() + crate::store::CHECKPOINT_INTERVAL;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => match jobs.recv_timeout(checkpoint_at.saturating_duration_since(Instant::now())) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) => {
                    checkpoint_at = Instant::now() + crate::store::CHECKPOINT_INTERVAL;
                    if let Err(e) = store.checkpoint() {
                        // A store that cannot flush cannot be trusted to keep what it acknowledges.
                        let _ = back.send(ToDriver::Persisted {
                            done: Vec::new(),
                            result: Err(io::Error::other(format!("store checkpoint failed: {e}"))),
                        });
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // A clean stop: leave nothing only in a log.
                    if let Err(e) = store.checkpoint() {
                        tracing::error!(error = %e, "the store's checkpoint at stop failed; it is checked at the next open");
                    }
                    return;
                }
            },
        };
        match job {
            StoreJob::Load(reply) => {
                let _ = reply.send(store.load());
            }
            StoreJob::Write { role_changes, token, batch } => {
                let mut done = vec![(role_changes, token)];
                let mut batches = vec![batch];
                while batches.len() < STORE_GROUP {
                    match jobs.try_recv() {
                        Ok(StoreJob::Write { role_changes, token, batch }) => {
                            done.push((role_changes, token));
                            batches.push(batch);
                        }
                        Ok(load) => {
                            next = Some(load);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let started = Instant::now();
                let result = store.write_group(&batches);
                let took = started.elapsed();
                if took >= SLOW_STORE_WRITE {
                    tracing::warn!(
                        batches = batches.len(),
                        took_ms = took.as_millis() as u64,
                        "a synced store write was slow: misses and other writes waiting for the store wait this long"
                    );
                }
                let failed = result.is_err();
                if back.send(ToDriver::Persisted { done, result }).is_err() || failed {
                    // After a failed write the volume fails; nothing more is written.
                    return;
                }
            }
        }
    }
}

/// Starts the store thread of volume `name`: it runs the jobs sent on the returned queue and
/// answers on `back`, and ends when the queue's sender is dropped.
pub(super) fn spawn(name: &str, store: Box<dyn Store>, back: mpsc::Sender<ToDriver>) -> (mpsc::Sender<StoreJob>, JoinHandle<()>) {
    let (tx, jobs) = mpsc::channel::<StoreJob>();
    let thread =
        std::thread::Builder::new().name(format!("store-{name}")).spawn(move || run(store, jobs, back)).expect("spawn the store thread");
    (tx, thread)
}
