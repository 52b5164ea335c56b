//! The durable record's growth and shrinkage: each record batch group-commits every queued
//! record update and eviction (prediction adds to the updates' misses) as one synced store
//! write, and the answers leave only once it is durable.
//!
//! Owns: `RecordBatches` (the queue of record frames and the batch being persisted),
//! generations handed out, prediction on record updates (claims 18-19), evictions
//! (claims 13, 17), record answers.
//! Must not: change the durable record before its batch is durable, or answer an update
//! before then.

use super::queue::{Queued, RecordQueue};
use super::{PersistKind, Secondary};
use crate::frame::{Eviction, Frame};
use crate::ids::{ExtentId, Generation, Token};
use crate::predict::Predictor;
use crate::record::{from_runs, to_runs, Record};
use crate::stats::SecondaryStats;
use crate::store::{Meta, StoreWrite};
use std::collections::BTreeSet;

/// Record frames waiting for the next batch, and the batch being persisted.
#[derive(Clone, Default)]
pub(super) struct RecordBatches {
    /// Record updates and evictions waiting for the next record batch.
    pub(super) queue: RecordQueue,
    /// The batch being persisted: its token, the record it makes durable, and its answers.
    pub(super) persisting: Option<(Token, Record, Vec<Frame>)>,
}

impl Secondary {
    /// Group commit: every queued update and eviction becomes one synced batch.
    pub(super) fn persist_record_batch(&mut self) {
        if self.records.persisting.is_some() || self.records.queue.is_empty() || !self.conn.welcomed {
            return;
        }
        let mut work = self.record.clone();
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        let evict = |work: &mut Record,
                     predictor: &mut Predictor,
                     batch: &mut Vec<StoreWrite>,
                     stats: &mut SecondaryStats,
                     evictions: &[Eviction]| {
            for ev in evictions {
                for e in from_runs(&ev.extents) {
                    if work.remove_if_not_younger(e, ev.generation) {
                        batch.push(StoreWrite::DelRecord(e));
                        predictor.note_evicted(e, ev.generation);
                        stats.extents_evicted += 1;
                    }
                }
            }
        };
        for q in self.records.queue.take() {
            match q {
                Queued::Evict(evictions) => evict(&mut work, &mut self.predictor, &mut batch, &mut self.stats, &evictions),
                Queued::Update { id, missed, hints, room, evictions } => {
                    // Evictions first: a piggybacked eviction and a re-add of the same extent
                    // in one frame must leave the extent recorded.
                    evict(&mut work, &mut self.predictor, &mut batch, &mut self.stats, &evictions);
                    let g = self.next_generation;
                    self.next_generation = Generation(g.0 + 1);
                    let predicted = self.predictor.predict(&missed, &hints, room, &work);
                    let mut added: BTreeSet<ExtentId> = missed.iter().copied().collect();
                    self.stats.extents_predicted += predicted.len() as u64;
                    added.extend(predicted);
                    for e in &added {
                        work.insert(*e, g);
                        batch.push(StoreWrite::PutRecord(*e, g));
                    }
                    self.stats.extents_added += added.len() as u64;
                    self.stats.record_updates += 1;
                    answers.push(Frame::RecordAnswer { epoch: self.epoch, id, generation: g, added: to_runs(added) });
                }
            }
        }
        batch.push(StoreWrite::Meta(Meta::NextGeneration(self.next_generation)));
        let token = self.persist(PersistKind::Record, batch);
        #[cfg(feature = "mutations")]
        if crate::mutations::ack_before_durable() {
            self.record = work.clone();
            for a in answers.drain(..) {
                self.send(a);
            }
        }
        self.records.persisting = Some((token, work, answers));
        debug_assert!(self.records.queue.is_empty(), "a record batch takes every queued frame");
    }

    /// The batch is durable: its record becomes the durable one, and its answers leave.
    pub(super) fn record_batch_persisted(&mut self, token: Token) {
        debug_assert!(self.records.persisting.is_some(), "a record write completes only the batch being persisted");
        if let Some((t, work, answers)) = self.records.persisting.take() {
            debug_assert_eq!(t, token);
            self.record = work;
            if self.conn.connected && self.conn.welcomed {
                for a in answers {
                    self.send(a);
                }
            }
        }
    }
}
