//! Resyncs and failback: copying (or checking by digest) the extents that may differ, in
//! sequence order with host writes, so that a resync never overwrites a newer write on the
//! peer; the full verified resync an amnesiac peer is owed; and the end of a failback.

use super::*;

pub(super) struct Resync {
    /// Extents whose peer copy is stale with no write pending to fix it: they must be copied
    /// by a resync before they can be clean.
    pub(super) needs_copy: BTreeSet<ExtentId>,
    /// A resync must run even if nothing needs copying (the peer is inconsistent).
    pub(super) forced: bool,
    pub(super) end: Option<Seq>,
    pub(super) running: bool,
    /// The running resync checks extents by digest (a failback) rather than copying them.
    pub(super) verifies: bool,
    /// The last check dispatched: the resync may end only once the peer has applied it, since
    /// every difference it finds is reported before that.
    pub(super) last_verify: Option<Seq>,
    /// Extents a check of the running resync found different in some blocks: copied, those
    /// blocks only (bitmaps as `differing_blocks` makes them).
    pub(super) copy_blocks: BTreeMap<ExtentId, Vec<u8>>,
    /// The running resync's `ResyncBegin`: a difference found by an earlier check names
    /// blocks that may no longer be all (its later writes may have been abandoned).
    pub(super) begin: Seq,
    /// Extents being read for the resync, by read token.
    pub(super) reading: BTreeMap<Token, ExtentId>,
    /// The running resync checks every extent of the volume (`ResyncBegin { full }`), and
    /// the next extent its sweep reads.
    pub(super) full: bool,
    pub(super) sweep: Option<u64>,
    /// Where the next full resync's sweep starts: the sync cursor the peer's welcome named,
    /// when it resumes this site's own debt (see `check_welcome`).
    pub(super) resume: Option<u64>,
    /// The full resync's checks not yet answered, by sequence number: until the peer has
    /// applied one (or reported its difference, whose copy then follows), its extent is not
    /// synced, and no sync mark may pass it.
    pub(super) checks: BTreeMap<Seq, ExtentId>,
    /// The last sync mark dispatched in this resync.
    pub(super) marked: u64,
    /// When the running full resync's sweep started, and at which extent: its rate so far.
    pub(super) full_started: Option<(Time, u64)>,
    /// Promoted, failback not yet complete (see `writes_alone_on_link_loss`).
    pub(super) failback_pending: bool,
}

impl Resync {
    pub(super) fn new(state: &SiteState) -> Resync {
        Resync {
            needs_copy: state.dirty.clone(),
            forced: false,
            end: None,
            running: false,
            verifies: false,
            last_verify: None,
            copy_blocks: BTreeMap::new(),
            begin: Seq(0),
            reading: BTreeMap::new(),
            full: false,
            sweep: None,
            resume: None,
            checks: BTreeMap::new(),
            marked: 0,
            full_started: None,
            failback_pending: state.failback_pending,
        }
    }
}

impl Primary {
    /// What a resync onto the current peer would copy now: the extents that may differ and
    /// that retransmission alone will not fix. Planning for a dry run and for status.
    pub fn resync_plan(&self) -> FailbackPlan {
        let mut set: BTreeSet<ExtentId> = self.dirty.local.iter().copied().collect();
        set.extend(self.resync.needs_copy.iter().copied());
        set.extend(self.dirty.by_extent.keys().copied());
        if self.rec.resend_on_snapshot {
            set.extend(self.rec.copy.iter().map(|(e, _)| e));
        }
        self.plan(set)
    }

    /// Failback debt: what a failover now would have to copy back to this site afterwards.
    /// The promoted secondary's failback set starts as its durable record, a superset of the
    /// record copy, plus whatever this site's dirty map names (unknown to the record).
    pub fn failback_debt(&self) -> FailbackPlan {
        let mut set: BTreeSet<ExtentId> = self.rec.copy.iter().map(|(e, _)| e).collect();
        set.extend(self.dirty.local.iter().copied());
        set.extend(self.dirty.by_extent.keys().copied());
        set.extend(self.resync.needs_copy.iter().copied());
        self.plan(set)
    }

    pub(super) fn plan(&self, set: BTreeSet<ExtentId>) -> FailbackPlan {
        let bytes = set.iter().map(|e| self.geo.extent_range(*e).end - self.geo.extent_range(*e).start).sum();
        FailbackPlan { extents: set.into_iter().collect(), bytes, lag_bytes: self.buffer_bytes }
    }

    pub fn handle_read_done(&mut self, now: Time, token: Token, data: Bytes) {
        if self.verify_read_done(now, token, &data) {
            return;
        }
        let Some(e) = self.resync.reading.remove(&token) else {
            return;
        };
        let range = self.geo.extent_range(e);
        let blocks = self.resync.copy_blocks.remove(&e);
        if self.resync.verifies && blocks.is_none() {
            // The peer compares its own content at this point of the order; only a difference
            // brings the extent back, with the blocks to copy.
            let digests = block_digests(&data, range.end - range.start);
            let seq = self.dispatch_resync_item(Apply::Verify { extent: e, digests });
            self.mark_dirty(e, seq);
            self.resync.last_verify = Some(seq);
            if self.resync.full {
                self.resync.checks.insert(seq, e);
            }
            self.stats.resync_extents_verified += 1;
            self.stats.resync_bytes_verified += range.end - range.start;
            self.progress(now);
            return;
        }
        // Whole, unless a check named the blocks that differ.
        let whole = blocks.is_none();
        let n = check_blocks(range.end - range.start);
        let mut i = 0;
        while i < n {
            if !whole && !blocks.as_deref().is_some_and(|b| block_set(b, i)) {
                i += 1;
                continue;
            }
            // A run of blocks to copy, in chunks of at most RESYNC_CHUNK_BYTES.
            let first = i;
            while i < n && (whole || blocks.as_deref().is_some_and(|b| block_set(b, i))) {
                i += 1;
            }
            let run_end = (range.start + i as u64 * CHECK_BLOCK).min(range.end);
            let mut off = range.start + first as u64 * CHECK_BLOCK;
            while off < run_end {
                let len = (run_end - off).min(RESYNC_CHUNK_BYTES);
                let start = (off - range.start) as usize;
                let chunk = data.slice(start.min(data.len())..(start + len as usize).min(data.len()));
                let op = if chunk.len() as u64 == len { WriteOp::data(off, chunk) } else { WriteOp::zero(off, len) };
                let seq = self.dispatch_resync_item(Apply::Write(op));
                self.mark_dirty(e, seq);
                self.stats.resync_bytes_copied += len;
                off += len;
            }
        }
        self.stats.resync_extents_copied += 1;
        self.progress(now);
    }

    /// Dispatches an item of a resync: it ships on the resync stream.
    pub(super) fn dispatch_resync_item(&mut self, item: Apply) -> Seq {
        let seq = self.dispatch_item(item);
        self.resync_seqs.insert(seq);
        seq
    }

    /// Drops the unshipped part of the retransmit buffer when it is full and the policy says
    /// resync. While a resync runs over a live link, a full buffer throttles instead: starting
    /// over would never finish if the host outpaces the link.
    pub(super) fn maybe_lag_resync(&mut self) {
        let full = self.buffer_bytes > self.cfg.max_lag_bytes;
        let policy = self.cfg.on_lag_full == LagPolicy::Resync || (self.conn.link != LinkState::Up && self.writes_alone_on_link_loss());
        let resyncing_live = self.resync.running && self.conn.link == LinkState::Up;
        if full && policy && !resyncing_live {
            self.abandon_buffer();
        }
    }

    /// Forgets everything queued for the peer and not yet sent; a resync of every extent that
    /// may differ replaces it. Items already sent stay until applied, so the data window
    /// keeps counting the bytes on the wire.
    pub(super) fn abandon_buffer(&mut self) {
        let unsent = self.buffer.split_off(&self.ship_next);
        self.resync_seqs.split_off(&self.ship_next);
        self.verify_forget_from(self.ship_next);
        for item in unsent.values() {
            self.buffer_bytes -= item_bytes(item);
        }
        self.ship_next = self.next_seq;
        self.resync.needs_copy.extend(self.rec.copy.iter().map(|(e, _)| e));
        self.resync.needs_copy.extend(self.dirty.local.iter().copied());
        self.resync.needs_copy.extend(self.dirty.by_extent.keys().copied());
        // The marker goes first, so that the peer can bridge the gap at once.
        self.start_resync(true);
        // Seqs that will never be applied must not keep extents dirty forever: the copies
        // shipped by the resync re-mark them.
        self.dirty.by_extent.clear();
        self.dirty.by_seq.clear();
    }

    /// A failback (onto a promoted site's old primary, or a split brain's loser) checks
    /// extents by digest, when configured: there the peer holds a recent image, and most of
    /// the failback set is usually equal on both sites. Other resyncs copy: their extents
    /// are known to differ.
    pub(super) fn begin_checks(&mut self) {
        // A full resync always checks: most of an amnesiac's image is usually right.
        self.resync.verifies =
            self.resync.full || (self.cfg.verify_failback && (self.resync.failback_pending || self.conn.peer_save_aside));
        self.resync.last_verify = None;
        // A check's block list holds only while every later write reaches the peer in order;
        // a new resync (after an abandoned buffer, say) starts from whole extents again, and
        // ignores the block lists of checks made before it. Called just before the
        // `ResyncBegin` is dispatched, so that is the next sequence number.
        self.resync.copy_blocks.clear();
        self.resync.begin = self.next_seq;
    }

    /// Starts a resync: full (every extent of the volume, checked by digest) while the peer
    /// is owed one, else of `needs_copy`. `skip` bridges an abandoned buffer (see
    /// `abandon_buffer`).
    pub(super) fn start_resync(&mut self, skip: bool) {
        assert!(self.conn.link == LinkState::Up || skip, "a resync starts on a live link, or bridges an abandoned buffer");
        // (One whose end is being settled is done: what follows is an ordinary resync.)
        let full = self.ident.full_resync_owed && !self.ident.settling && !self.ident.rebuild_pending;
        self.resync.running = true;
        self.resync.end = None;
        self.resync.full = full;
        let from = if full { self.resync.resume.take().unwrap_or(0).min(self.geo.extent_count()) } else { 0 };
        self.resync.resume = None;
        self.resync.sweep = full.then_some(from);
        self.resync.checks.clear();
        self.resync.marked = from;
        self.resync.full_started = full.then_some((self.last_now, from));
        if full {
            self.stats.full_resyncs_resumed += u64::from(from > 0);
            self.stats.full_resync_resumed_at = from;
        }
        self.stats.full_resync_swept_extents = from;
        self.begin_checks();
        self.stats.resyncs_started += 1;
        self.verify_resync_started();
        // A promoted site's peer is the old primary, which may hold acknowledged writes of
        // its own anywhere when the full resync is owed (this site was an amnesiac).
        let save_aside = self.conn.peer_save_aside || (full && self.resync.failback_pending);
        self.dispatch_resync_item(Apply::ResyncBegin { save_aside, skip, full, from });
    }

    /// What the full resync under way has left: bytes of extents its sweep has not reached,
    /// plus those swept whose check is unanswered or whose differing blocks are still to be
    /// copied; and the time that takes at the sweep's rate so far (None before it moved).
    pub fn full_resync_left(&self, now: Time) -> Option<(u64, Option<std::time::Duration>)> {
        let sweep = self.resync.sweep.filter(|_| self.resync.full)?;
        let count = self.geo.extent_count();
        let unswept = count.saturating_sub(sweep);
        let pending: BTreeSet<ExtentId> = self.resync_unsynced().filter(|e| e.0 < sweep).collect();
        let bytes = (unswept + pending.len() as u64) * self.geo.extent_bytes();
        let eta = self.resync.full_started.and_then(|(t0, from)| {
            let done = sweep.saturating_sub(from);
            let secs = now.since(t0).as_secs_f64();
            (done > 0 && secs > 0.0)
                .then(|| std::time::Duration::from_secs_f64((unswept + pending.len() as u64) as f64 * secs / done as f64))
        });
        Some((bytes, eta))
    }

    /// Extents the running resync has not synced on the peer yet, whatever the sweep says:
    /// being read, owed a copy, checked without an answer, or with differing blocks to copy.
    fn resync_unsynced(&self) -> impl Iterator<Item = ExtentId> + '_ {
        let r = &self.resync;
        r.reading.values().chain(r.needs_copy.iter()).chain(r.checks.values()).chain(r.copy_blocks.keys()).copied()
    }

    /// The full resync's sync cursor now: the lowest extent not yet known synced on the peer
    /// as of the next sequence number. Below it every extent was swept, its check answered
    /// equal, or the copy of its differing blocks dispatched (so ahead of the mark in order).
    fn sync_low_water(&self) -> Option<u64> {
        let sweep = self.resync.sweep?;
        let pending = self.resync_unsynced().map(|e| e.0).min();
        #[cfg(feature = "mutations")]
        if crate::mutations::mark_ahead_of_checks() {
            return Some(sweep);
        }
        Some(pending.map_or(sweep, |p| p.min(sweep)))
    }

    /// Dispatches a sync mark once the cursor has moved `sync_mark_every_extents` past the
    /// last one: with the extents swept and not yet answered when a site or the link fails,
    /// that bounds what a resumed sweep checks again (the sync replay window).
    fn maybe_sync_mark(&mut self) {
        if !self.resync.full || !self.resync.running {
            return;
        }
        let applied = self.applied_ack;
        self.resync.checks = self.resync.checks.split_off(&applied.next());
        let Some(next) = self.sync_low_water() else { return };
        if next >= self.resync.marked + self.cfg.sync_mark_every_extents && next < self.geo.extent_count() {
            self.resync.marked = next;
            self.stats.sync_marks += 1;
            self.dispatch_resync_item(Apply::SyncMark { next });
        }
    }

    pub(super) fn drive_resync(&mut self) {
        if self.conn.link != LinkState::Up || self.phase == Phase::Fenced {
            return;
        }
        // A full resync owed replaces a partial one under way: its marker tells the peer that
        // this resync's end vouches for the whole image.
        let full_due = self.ident.full_resync_owed && !self.resync.full && !self.ident.settling && !self.ident.rebuild_pending;
        if (!self.resync.running && (!self.resync.needs_copy.is_empty() || self.resync.forced)) || full_due {
            self.resync.forced = false;
            self.start_resync(false);
        }
        if !self.resync.running {
            return;
        }
        let extent_bytes = self.geo.extent_bytes();
        while self.resync.reading.len() < self.cfg.resync_reads_in_flight {
            // Resync copies share the lag budget with host writes, so they are paced by it.
            let pending = (self.resync.reading.len() as u64 + 1) * extent_bytes;
            if self.buffer_bytes > 0 && self.buffer_bytes + pending > self.cfg.max_lag_bytes {
                break;
            }
            #[cfg(feature = "mutations")]
            if crate::mutations::sweep_skips_last() && self.resync.sweep == Some(self.geo.extent_count() - 1) {
                self.resync.sweep = Some(self.geo.extent_count());
            }
            let next = self.resync.needs_copy.iter().copied().find(|e| !self.local_busy.contains_key(e));
            let e = match (next, self.resync.sweep) {
                (Some(e), _) => {
                    self.resync.needs_copy.remove(&e);
                    e
                }
                // A full resync's sweep, in extent order, once nothing else is owed; an extent
                // a local write is busy with waits for it.
                (None, Some(c)) if c < self.geo.extent_count() && !self.local_busy.contains_key(&ExtentId(c)) => {
                    self.resync.sweep = Some(c + 1);
                    self.stats.full_resync_swept_extents = c + 1;
                    ExtentId(c)
                }
                _ => break,
            };
            let token = self.token();
            self.resync.reading.insert(token, e);
            self.actions.push_back(Action::ReadExtent { token, extent: e });
        }
        self.maybe_sync_mark();
        let checks_answered = self.resync.last_verify.is_none_or(|v| self.applied_ack >= v) && self.verify_checks_answered();
        let swept = self.resync.sweep.is_none_or(|c| c >= self.geo.extent_count());
        if self.resync.needs_copy.is_empty() && self.resync.reading.is_empty() && self.resync.end.is_none() && checks_answered && swept {
            let end = self.dispatch_resync_item(Apply::ResyncEnd);
            self.resync.end = Some(end);
        }
    }

    /// The failback is complete once the peer has applied everything, no resync runs and
    /// the dirty map is empty: from then on `on_link_loss` applies as configured.
    pub(super) fn maybe_end_failback(&mut self) {
        if self.resync.failback_pending
            && !self.persists.values().any(|(k, _)| *k == PersistKind::FailbackDone)
            && self.conn.link == LinkState::Up
            && self.applied_ack >= self.up_seq
            && !self.resync_in_progress()
            && self.dirty.local.is_empty()
        {
            self.persist(PersistKind::FailbackDone, Vec::new(), vec![StoreWrite::Meta(Meta::FailbackPending(false))]);
        }
    }

    pub(super) fn maybe_clear_wrote_alone(&mut self) {
        if self.wrote_alone
            && !self.wrote_alone_persisting
            && self.conn.link == LinkState::Up
            && self.applied_ack >= self.up_seq
            && !self.resync_in_progress()
            && self.dirty.local.is_empty()
        {
            self.wrote_alone_persisting = true;
            self.persist(PersistKind::WroteAlone(false), Vec::new(), vec![StoreWrite::Meta(Meta::WroteAlone(false))]);
        }
    }
}
