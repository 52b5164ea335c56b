//! Ordered apply: shipped data reaches media strictly in sequence order through a bounded
//! reorder buffer; failback checks by digest; save-aside before a failback overwrites; and
//! the return messages ("applied through S") once media and store are synced.
//!
//! Owns: `OrderedApply` (the reorder buffer and its byte count, what blocks applying, the
//! check waiting for its read, save-aside), the high-water mark written ahead of media,
//! resync markers, media syncs and the durable applied position (claim 14).
//! Must not: apply past a gap unless a `ResyncBegin` marker bridges it, let a write reach
//! media beyond the durable high-water mark, or send "applied through S" before a media sync
//! covering S and a synced store of S.

use super::{PersistKind, Secondary};
use crate::action::Action;
use crate::frame::{Apply, Frame};
use crate::ids::{ExtentId, Seq, Token};
use crate::store::{Meta, StoreWrite, SyncCursor};
use crate::time::Time;
use std::collections::{BTreeMap, BTreeSet};

/// The reorder buffer and what holds applying back.
#[derive(Clone, Default)]
pub(super) struct OrderedApply {
    pub(super) reorder: BTreeMap<Seq, Apply>,
    /// The sum of the buffered items' `buffered_bytes`, at most `reorder_buffer_bytes`.
    pub(super) reorder_bytes: u64,
    /// A store write (or a check's read) that must finish before anything more applies.
    pub(super) blocked: Option<Token>,
    /// A failback check waiting for this site's read: its token, sequence number and extent.
    pub(super) verifying: Option<(Token, Seq, ExtentId)>,
    pub(super) save_aside: bool,
    pub(super) saved: BTreeSet<ExtentId>,
}

impl Secondary {
    /// A data item from the primary. False when it is not held (a retransmission, or a
    /// refusal): nothing follows it then.
    pub(super) fn receive_data(&mut self, seq: Seq, apply: Apply) -> bool {
        if seq <= self.applied {
            return false; // a retransmission of something already applied
        }
        #[cfg(feature = "mutations")]
        if crate::mutations::apply_out_of_order() {
            if let Apply::Write(op) = apply {
                // The deliberate bug: apply in arrival order, not sequence order.
                self.applied = seq;
                self.actions.push_back(Action::ApplyWrite { seq, op });
                return true;
            }
        }
        // Counted only once it is held: a refused item must not use up the buffer.
        let bytes = apply.buffered_bytes();
        if self.ordered.reorder_bytes + bytes > self.cfg.reorder_buffer_bytes {
            self.refuse(None, "peer overran the reorder buffer");
            return false;
        }
        self.ordered.reorder_bytes += bytes;
        if let Some(old) = self.ordered.reorder.insert(seq, apply) {
            self.ordered.reorder_bytes -= old.buffered_bytes();
        }
        true
    }

    pub(super) fn apply_ready(&mut self) {
        while self.ordered.blocked.is_none() {
            let next = self.applied.next();
            let seq = match self.ordered.reorder.keys().next().copied() {
                Some(s) if s == next => s,
                Some(s) if matches!(self.ordered.reorder.get(&s), Some(Apply::ResyncBegin { skip: true, .. })) => s,
                _ => break,
            };
            if seq > self.high_water {
                // Write ahead the bound on what media may hold: everything contiguous now.
                let mut target = seq;
                while self.ordered.reorder.contains_key(&target.next()) {
                    target = target.next();
                }
                let token = self.persist(PersistKind::HighWater(target), vec![StoreWrite::Meta(Meta::ApplyHighWater(target))]);
                self.ordered.blocked = Some(token);
                break;
            }
            debug_assert!(seq > self.applied, "an item applies once, past what is applied");
            debug_assert!(seq <= self.high_water, "media sees nothing past the durable high-water mark");
            let item = self.ordered.reorder.remove(&seq).expect("present");
            self.ordered.reorder_bytes -= item.buffered_bytes();
            if seq != next {
                // A resync marker that bridges an abandoned buffer: what waits below it will
                // never apply (the resync copies those extents), so it leaves the buffer.
                let keep = self.ordered.reorder.split_off(&seq);
                for (_, stale) in std::mem::replace(&mut self.ordered.reorder, keep) {
                    self.ordered.reorder_bytes -= stale.buffered_bytes();
                }
            }
            if let Apply::Verify { extent, digests } = item {
                // Applied only once this site's content is read and compared, and a difference
                // is durable: nothing after it applies meanwhile.
                let token = self.token();
                self.ordered.verifying = Some((token, seq, extent));
                self.ordered.blocked = Some(token);
                self.actions.push_back(Action::VerifyExtent { token, extent, digests });
                break;
            }
            self.applied = self.applied.max(seq);
            match item {
                Apply::Write(op) => {
                    if self.must_save_aside() {
                        for e in self.geo.extents_of(op.offset, op.len) {
                            if self.ordered.saved.insert(ExtentId(e)) {
                                self.stats.extents_saved_aside += 1;
                                self.actions.push_back(Action::SaveAside { extent: ExtentId(e) });
                            }
                        }
                    }
                    self.stats.writes_applied += 1;
                    self.stats.bytes_applied += op.len;
                    self.actions.push_back(Action::ApplyWrite { seq, op });
                }
                Apply::ResyncBegin { save_aside, full, .. } => {
                    self.ordered.save_aside |= save_aside;
                    self.resync_end = None;
                    self.resyncing = true;
                    self.resync_full = full;
                    self.pending_mark = None;
                    // The sync cursor stays: a sweep that starts again below it (or a resync begun
                    // on an earlier connection, sent again) leaves what it vouches for synced.
                    // Only a new amnesia clears it (`forget_sync_cursor`).
                    let mut batch = Vec::new();
                    if self.consistent {
                        self.consistent = false;
                        batch.push(StoreWrite::Meta(Meta::Consistent(false)));
                    }
                    if full && !self.amnesiac {
                        // The primary found this store untrusted: say so durably before the
                        // first copy lands, so that a promotion meanwhile needs force.
                        self.mark_amnesiac(&mut batch);
                    }
                    if !batch.is_empty() {
                        let token = self.persist(PersistKind::ResyncBegin, batch);
                        self.ordered.blocked = Some(token);
                    }
                }
                Apply::ResyncEnd => self.resync_end = Some(seq),
                Apply::SyncMark { next } => {
                    // Meaningful only inside a full resync of an amnesiac: elsewhere the image is
                    // vouched for by other means, and a mark is ignored.
                    if self.resync_full && self.amnesiac {
                        debug_assert!(self.pending_mark.is_none_or(|(s, n)| s < seq && n <= next), "sync marks advance in order");
                        self.pending_mark = Some((seq, next));
                    }
                }
                Apply::Verify { .. } => unreachable!("handled above"),
            }
        }
    }

    /// Media sync, then a synced store of the position, then the return message.
    pub(super) fn sync_applied(&mut self) {
        if self.sync_inflight.is_some() || self.applied_persist.is_some() || self.applied <= self.durable_applied {
            return;
        }
        let token = self.token();
        self.sync_inflight = Some((token, self.applied));
        self.actions.push_back(Action::SyncMedia { token });
    }

    /// Whether media writes must first save the extent aside. Derived from durable state (this
    /// site's own split-brain evidence and divergent extents) so that it survives a restart
    /// in the middle of a failback, plus the primary's request for this resync.
    /// An amnesiac's divergent extents are those a full resync's checks found stale here,
    /// not writes of its own: they are copied, not saved aside (a rebuild onto a blank disk
    /// would otherwise save the whole volume aside). An amnesiac that may hold writes of its
    /// own says so with `wrote_alone` or `save_aside_on_resync`, or its primary asks.
    pub(super) fn must_save_aside(&self) -> bool {
        self.ordered.save_aside || self.wrote_alone || self.save_aside_on_resync || (!self.divergent.is_empty() && !self.amnesiac)
    }

    /// This site's content of the extent of a check (a failback's, a full resync's, or an
    /// online verify's), compared with the primary's
    /// digests: `differing` is the `differing_blocks` bitmap. All equal: the check is
    /// applied. Otherwise the extent becomes divergent (durably, so that it also reaches the
    /// primary, whole, in the next snapshot), the primary is told the blocks, and it copies
    /// them, the extent saved aside here first.
    pub fn handle_verified(&mut self, _now: Time, token: Token, differing: Vec<u8>) {
        let Some((t, seq, extent)) = self.ordered.verifying else {
            return;
        };
        if t != token {
            return;
        }
        debug_assert_eq!(self.ordered.blocked, Some(token), "a check blocks applying until its read is compared");
        self.ordered.verifying = None;
        self.stats.extents_verified += 1;
        let equal = differing.iter().all(|b| *b == 0);
        #[cfg(feature = "mutations")]
        let equal = equal || crate::mutations::verify_always_equal();
        if equal {
            self.applied = self.applied.max(seq);
            if self.ordered.blocked == Some(token) {
                self.ordered.blocked = None;
            }
        } else {
            self.stats.extents_mismatched += 1;
            #[cfg(feature = "mutations")]
            let differing = crate::mutations::differs_drops_block(differing);
            self.divergent.insert(extent);
            let mut batch = vec![StoreWrite::PutDirty(extent)];
            #[cfg(feature = "mutations")]
            let leave = crate::mutations::verify_leaves_consistent();
            #[cfg(not(feature = "mutations"))]
            let leave = false;
            self.mismatch_open = !leave;
            // A difference no resync is under way to fix (an online verify found it): this
            // image is not the primary's any more until a resync copies the extent.
            if self.consistent && !leave {
                self.consistent = false;
                batch.push(StoreWrite::Meta(Meta::Consistent(false)));
            }
            let p = self.persist(PersistKind::Mismatch { seq, extent, blocks: differing }, batch);
            self.ordered.blocked = Some(p);
        }
        self.progress();
    }

    pub fn handle_media_synced(&mut self, _now: Time, token: Token) {
        if let Some((t, through)) = self.sync_inflight {
            if t == token {
                debug_assert!(self.applied_persist.is_none(), "a media sync starts only once the last position is durable");
                self.sync_inflight = None;
                if self.promoting {
                    // The promotion's batch is the last word of this role: a resync's end
                    // persisted after it would delete the divergent extents from what is now
                    // the new primary's failback set (and clear its split-brain evidence).
                    return;
                }
                // Consistent again only when both hold: no resync left unfinished, and media no
                // longer ahead of what has been re-applied since a crash.
                // An amnesiac's image is vouched for by a full resync only: the end of any
                // other leaves it as it was, flags and protections included.
                let resynced = self.resync_end.is_some_and(|end| through >= end) && (!self.amnesiac || self.resync_full);
                if self.catch_up_to.is_some_and(|hw| through >= hw) {
                    self.catch_up_to = None;
                }
                // Extents found different stay inconsistent until a resync's end copied them.
                let consistent = !self.consistent && (resynced || (!self.resyncing && !self.mismatch_open)) && self.catch_up_to.is_none();
                let mut batch = vec![StoreWrite::Meta(Meta::Applied(through))];
                if consistent {
                    batch.push(StoreWrite::Meta(Meta::Consistent(true)));
                }
                // Only the end of a full resync vouches for an amnesiac's whole image.
                let full_resynced = resynced && self.resync_full && self.amnesiac;
                if resynced {
                    self.resync_end = None;
                    batch.push(StoreWrite::Meta(Meta::WroteAlone(false)));
                    batch.push(StoreWrite::Meta(Meta::SaveAsideOnResync(false)));
                    batch.extend(self.divergent.iter().map(|e| StoreWrite::DelDirty(*e)));
                }
                if full_resynced {
                    batch.push(StoreWrite::Meta(Meta::Amnesiac(false)));
                    batch.push(StoreWrite::Meta(Meta::SyncCursor(None)));
                    self.pending_mark = None;
                }
                // A sync mark the media now holds everything before: durable with this position.
                let mut cursor = None;
                if let (Some((seq, next)), Some(primary)) = (self.pending_mark, self.peer.store) {
                    if seq <= through && self.resync_full && self.amnesiac && !full_resynced {
                        let c = SyncCursor { primary, epoch: self.epoch, next };
                        batch.push(StoreWrite::Meta(Meta::SyncCursor(Some(c))));
                        cursor = Some(c);
                        self.pending_mark = None;
                    }
                }
                let token = self.persist(PersistKind::Applied { through, consistent, resynced, full_resynced, cursor }, batch);
                self.applied_persist = Some(token);
            }
        }
        self.progress();
    }

    /// The applied position is durable: the primary may learn it, and a resync that ended
    /// clears what this site protected of its own.
    pub(super) fn applied_persisted(
        &mut self,
        through: Seq,
        consistent: bool,
        resynced: bool,
        full_resynced: bool,
        cursor: Option<SyncCursor>,
    ) {
        self.applied_persist = None;
        self.durable_applied = self.durable_applied.max(through);
        if full_resynced {
            self.sync_cursor = None;
        } else if cursor.is_some() {
            self.sync_cursor = cursor;
        }
        if consistent {
            self.consistent = true;
        }
        if full_resynced {
            assert!(self.consistent, "an amnesiac is trusted again only with a consistent image");
            self.amnesiac = false;
            self.stats.full_resyncs_completed += 1;
        }
        if resynced {
            self.resyncing = self.resync_end.is_some();
            // The failback is complete: nothing of this site's own remains to protect.
            self.wrote_alone = false;
            self.divergent.clear();
            self.mismatch_open = false;
            self.ordered.save_aside = false;
            self.save_aside_on_resync = false;
            self.ordered.saved.clear();
        }
        if self.conn.connected && self.conn.welcomed {
            self.send(Frame::Applied { epoch: self.epoch, through: self.durable_applied });
        }
    }
}

impl Secondary {
    /// The durable sync cursor this store may name to the primary it is paired with now: one
    /// of that primary's store, in this epoch, while this store is an amnesiac.
    pub(super) fn sync_cursor_for_welcome(&self) -> Option<u64> {
        self.sync_cursor.filter(|c| self.amnesiac && Some(c.primary) == self.peer.store && c.epoch == self.epoch).map(|c| c.next)
    }

    /// The durable sync cursor, for status: only while it vouches for something (this store
    /// is an amnesiac, and the cursor is of the primary it is paired with, in this epoch).
    /// A cursor of an earlier primary or epoch is kept until overwritten, but says nothing.
    pub fn sync_cursor(&self) -> Option<SyncCursor> {
        self.sync_cursor.filter(|c| self.sync_cursor_for_welcome() == Some(c.next))
    }
}
