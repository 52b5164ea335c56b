//! The record frames a secondary holds until its next record batch.
//!
//! Owns: the record updates and evictions received while a batch is being persisted, in
//! arrival order, and the bounds that keep a flooding primary from growing them: frames,
//! extents named, and stream hints.
//! Must not: decide what to record or evict; `persist_record_batch` does, from what `take`
//! hands it.

use crate::frame::{Eviction, Frame, StreamHint, MAX_LIST_LEN};
use crate::geometry::Geometry;
use crate::ids::ExtentId;
use crate::record::{from_runs, runs_len};
use std::collections::VecDeque;

/// Most record frames (updates and evictions) held while a record batch is being persisted.
/// An honest primary has at most `max_record_updates_in_flight` updates unanswered (the
/// config allows half of this), and sends an eviction alone at most once per
/// `eviction_idle_delay`; beyond this the peer is flooding, or this site's store has stalled
/// for seconds, and the connection is closed (the primary resends what matters on the next).
pub const MAX_QUEUED_RECORD_FRAMES: usize = 64;

/// The queued record frames may name at most this many times the volume's extents in all
/// (counting repeats, and at least this many times `MAX_LIST_LEN` on a small volume): the
/// work of one record batch is bounded by the volume, not by how many frames a peer sends.
/// An honest primary asks for each extent in at most one update in flight, and evicts only
/// extents of the record, so it names about two volumes at the very most.
pub const QUEUED_EXTENTS_PER_VOLUME: u64 = 4;

/// Most stream hints held in the queue. Hints are advice: prediction walks up to twice
/// `max_ahead` extents along each, so a flood of them would cost a batch seconds; hints past
/// this are dropped, which can only make prediction poorer (the missed extents alone keep
/// invariant R). An honest primary sends a few per stream it sees.
pub const MAX_QUEUED_HINTS: usize = 1024;

#[derive(Clone, Debug)]
pub(super) enum Queued {
    Update { id: u64, missed: Vec<ExtentId>, hints: Vec<StreamHint>, room: u32, evictions: Vec<Eviction> },
    Evict(Vec<Eviction>),
}

/// The queue, with what it names counted as frames arrive.
#[derive(Clone, Debug, Default)]
pub(super) struct RecordQueue {
    frames: VecDeque<Queued>,
    /// Extents named by the queued frames (misses and evictions, repeats counted).
    extents: u64,
    hints: usize,
}

impl RecordQueue {
    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames of a dead connection are not answered; the primary resends what matters.
    pub(super) fn clear(&mut self) {
        *self = RecordQueue::default();
    }

    /// Everything queued, in arrival order, for one batch.
    pub(super) fn take(&mut self) -> VecDeque<Queued> {
        std::mem::take(self).frames
    }

    /// The counts equal the sums they cache, and the queue is within its bounds.
    pub(super) fn check(&self) -> Result<(), String> {
        let evicted = |evictions: &[Eviction]| evictions.iter().map(|e| runs_len(&e.extents)).sum::<u64>();
        let (mut extents, mut hints) = (0u64, 0usize);
        for q in &self.frames {
            match q {
                Queued::Update { missed, hints: h, evictions, .. } => {
                    extents += missed.len() as u64 + evicted(evictions);
                    hints += h.len();
                }
                Queued::Evict(evictions) => extents += evicted(evictions),
            }
        }
        if extents != self.extents || hints != self.hints {
            return Err(format!(
                "the record queue names {extents} extents and {hints} hints but counts {} and {}",
                self.extents, self.hints
            ));
        }
        if self.frames.len() > MAX_QUEUED_RECORD_FRAMES || self.hints > MAX_QUEUED_HINTS {
            return Err(format!("the record queue holds {} frames and {} hints, over its bounds", self.frames.len(), self.hints));
        }
        Ok(())
    }

    /// Queues a `RecordUpdate` or an `Evict` that passed `Frame::validate_for`, or says why
    /// the connection must close instead (the frame is then dropped). Any other frame is a
    /// caller's mistake and is refused too.
    pub(super) fn admit(&mut self, frame: Frame, geo: &Geometry) -> Result<(), String> {
        let evicted = |evictions: &[Eviction]| evictions.iter().map(|e| runs_len(&e.extents)).sum::<u64>();
        let (named, queued) = match frame {
            Frame::RecordUpdate { id, missed, mut hints, room, evictions, .. } => {
                // Advice past the bound is dropped, not refused.
                hints.truncate(MAX_QUEUED_HINTS - self.hints);
                let named = runs_len(&missed) + evicted(&evictions);
                (named, Queued::Update { id, missed: from_runs(&missed).collect(), hints, room, evictions })
            }
            Frame::Evict { evictions, .. } => (evicted(&evictions), Queued::Evict(evictions)),
            other => return Err(format!("a {} frame is not a record frame", other.kind())),
        };
        let limit = QUEUED_EXTENTS_PER_VOLUME * geo.extent_count().max(MAX_LIST_LEN as u64);
        if self.frames.len() >= MAX_QUEUED_RECORD_FRAMES || self.extents + named > limit {
            return Err(format!(
                "the primary sent more record frames than this site holds while a record batch is persisted \
                 ({} frames naming {} extents queued, limits {MAX_QUEUED_RECORD_FRAMES} frames and {limit} extents): \
                 a flooding peer, or a stalled store here",
                self.frames.len(),
                self.extents
            ));
        }
        self.extents += named;
        if let Queued::Update { hints, .. } = &queued {
            self.hints += hints.len();
        }
        self.frames.push_back(queued);
        Ok(())
    }
}
