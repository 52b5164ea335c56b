//! The primary's dirty map: which extents may differ on the peer, and why.
//!
//! Two kinds of dirtiness. `by_extent`/`by_seq` hold each extent's last dispatched write
//! until the peer has durably applied it and the local media has synced it (an extent with
//! such a write is never clean, so its generation is never evicted). `local` is the durable
//! local dirty map: extents the peer's record may not cover (misses in async, sync or degrade
//! mode, a promoted site's failback set, differences found by checks). A write to an extent
//! in `local` is covered without the record; an extent leaves `local` only once clean.

use super::*;

pub(super) struct DirtyMap {
    /// Durable local dirty map: extents the peer's record may not cover.
    pub(super) local: BTreeSet<ExtentId>,
    /// Extents on their way into `local` (their `PutDirty` is being persisted).
    pub(super) persisting: BTreeSet<ExtentId>,
    /// Last dispatched sequence per extent, until durably applied remotely and synced locally.
    pub(super) by_extent: BTreeMap<ExtentId, Seq>,
    /// The same, by sequence: `by_seq[s]` holds exactly the extents whose `by_extent` is `s`.
    pub(super) by_seq: BTreeMap<Seq, BTreeSet<ExtentId>>,
    /// Since when the peer has been behind by more than the buffer knows: a dirty map found at
    /// start, or written while the link was down. Cleared once the dirty map empties.
    pub(super) behind_since: Option<Time>,
}

impl DirtyMap {
    pub(super) fn new(state: &SiteState, now: Time) -> DirtyMap {
        DirtyMap {
            local: state.dirty.clone(),
            persisting: BTreeSet::new(),
            by_extent: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            behind_since: (!state.dirty.is_empty()).then_some(now),
        }
    }
}

impl Primary {
    /// When the oldest write the peer may lack was made: the replication lag is `now` minus
    /// this. `None` when the peer has applied everything.
    pub fn behind_since(&self) -> Option<Time> {
        let buffered = self.unapplied.front().map(|g| g.at);
        match (buffered, self.dirty.behind_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn mark_dirty(&mut self, e: ExtentId, seq: Seq) {
        if let Some(old) = self.dirty.by_extent.insert(e, seq) {
            if let Some(s) = self.dirty.by_seq.get_mut(&old) {
                s.remove(&e);
                if s.is_empty() {
                    self.dirty.by_seq.remove(&old);
                }
            }
        }
        self.dirty.by_seq.entry(seq).or_default().insert(e);
    }

    /// Extents whose every write is durably applied remotely and synced locally are clean.
    pub(super) fn clean_dirty(&mut self) {
        let bound = self.applied_ack.min(self.local_synced);
        let keep = self.dirty.by_seq.split_off(&bound.next());
        let done = std::mem::replace(&mut self.dirty.by_seq, keep);
        for (_, set) in done {
            for e in set {
                self.dirty.by_extent.remove(&e);
            }
        }
    }

    pub(super) fn is_clean(&self, e: ExtentId) -> bool {
        !self.dirty.by_extent.contains_key(&e)
            && !self.resync.needs_copy.contains(&e)
            && !self.being_read(e.0)
            && !self.verify.unrepaired.contains(&e)
            && !self.local_busy.contains_key(&e)
    }

    pub(super) fn add_local_dirty(&mut self, extents: Vec<ExtentId>) {
        let new: Vec<ExtentId> =
            extents.into_iter().filter(|e| !self.dirty.local.contains(e) && !self.dirty.persisting.contains(e)).collect();
        if new.is_empty() {
            return;
        }
        self.dirty.persisting.extend(new.iter().copied());
        let batch = new.iter().map(|e| StoreWrite::PutDirty(*e)).collect();
        self.persist(PersistKind::Dirty, new, batch);
    }

    pub(super) fn extents_locally_covered(&self, extents: &Range<u64>) -> bool {
        extents.clone().all(|e| self.dirty.local.contains(&ExtentId(e)))
    }

    /// Removes clean extents from the local dirty map.
    pub(super) fn undirty(&mut self) {
        if self.conn.link != LinkState::Up || self.dirty.local.is_empty() {
            return;
        }
        // Extents a waiting host write needs stay covered, as in `evict`: withdrawing one
        // while the write waits for another to be persisted makes the write miss again, and
        // a write spanning extents (2 MiB writes across 1 MiB extents in sync mode) could
        // chase its own coverage forever.
        #[cfg(feature = "mutations")]
        let pin = !crate::mutations::undirty_waiting();
        #[cfg(not(feature = "mutations"))]
        let pin = true;
        let pinned: BTreeSet<ExtentId> =
            if pin { self.waiting.values().flat_map(|w| w.extents.clone().map(ExtentId)).collect() } else { BTreeSet::new() };
        let clean: Vec<ExtentId> = self
            .dirty
            .local
            .iter()
            .copied()
            .filter(|e| self.is_clean(*e) && !self.dirty.persisting.contains(e) && !pinned.contains(e))
            .collect();
        if clean.is_empty() {
            return;
        }
        // Withdrawn from coverage before the delete is persisted: a write arriving meanwhile
        // misses and re-adds the extent in a later batch, which the store applies after this.
        for e in &clean {
            self.dirty.local.remove(e);
        }
        if self.dirty.local.is_empty() {
            self.dirty.behind_since = None;
        }
        let batch = clean.iter().map(|e| StoreWrite::DelDirty(*e)).collect();
        self.persist(PersistKind::Undirty, clean, batch);
    }

    pub(super) fn maybe_authoritative(&mut self) {
        if !self.conn.peer_authoritative
            && self.conn.link == LinkState::Up
            && !self.ident.full_resync_owed
            && self.cfg.mode == Mode::Predictive
            && self.dirty.local.is_empty()
            && self.dirty.persisting.is_empty()
            && !self.persists.values().any(|(k, _)| *k == PersistKind::Undirty)
        {
            self.conn.peer_authoritative = true;
            assert!(!self.ident.full_resync_owed, "an amnesiac peer is told its record is authoritative before its full resync ended");
            self.send(Stream::Control, Frame::Authoritative { epoch: self.epoch });
        }
    }
}
