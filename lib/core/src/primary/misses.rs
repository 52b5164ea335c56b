//! The record copy and the misses that grow it: a write to an extent outside the copy asks
//! the secondary (one `RecordUpdate` for many misses, with the streams' hints and room for
//! predictions) and waits for its answer; eviction of whole clean generations keeps the copy
//! (and the secondary's record) under its capacity (claims 13-17).

use super::*;

pub(super) struct RecordCopy {
    /// The secondary's durable record as this site knows it: it only grows from record
    /// answers and snapshots, which the secondary sends after its synced store.
    pub(super) copy: Record,
    /// Record updates in flight, by id.
    pub(super) updates: BTreeMap<u64, Update>,
    pub(super) next_update_id: u64,
    /// Extents asked for: those in flight (named by `updates`) and those waiting to be sent.
    pub(super) requested: BTreeSet<ExtentId>,
    pub(super) pending_hints: Vec<StreamHint>,
    pub(super) pending_evictions: Vec<Eviction>,
    pub(super) evictions_since: Option<Time>,
    /// First contact of this incarnation is still to come: its snapshot makes every recorded
    /// extent be copied again (what was in flight before a restart is unknown).
    pub(super) resend_on_snapshot: bool,
    /// Extents named by the snapshot chunks of this connection: an honest secondary names each
    /// recorded and each divergent extent once, so past twice the volume it is refused.
    pub(super) snapshot_extents: u64,
    /// Smoothed record-update round trip, µs: how far ahead a stream must be recorded.
    pub(super) srtt_us: u64,
    /// When each generation in the copy was added (from its answer or the snapshot); bounded
    /// by the record's generations, pruned as they are evicted or emptied.
    pub(super) generation_added: BTreeMap<Generation, Time>,
    /// Extents added as predictions and not yet written.
    pub(super) predicted: BTreeSet<ExtentId>,
    pub(super) detector: StreamDetector,
}

impl RecordCopy {
    pub(super) fn new(cfg: &CoreConfig, geo: &Geometry) -> RecordCopy {
        RecordCopy {
            copy: Record::new(geo.extent_count()),
            updates: BTreeMap::new(),
            next_update_id: 1,
            requested: BTreeSet::new(),
            pending_hints: Vec::new(),
            pending_evictions: Vec::new(),
            evictions_since: None,
            resend_on_snapshot: true,
            snapshot_extents: 0,
            srtt_us: 0,
            generation_added: BTreeMap::new(),
            predicted: BTreeSet::new(),
            detector: StreamDetector::new(cfg.predictor.max_streams),
        }
    }
}

impl Primary {
    /// Misses: ask the secondary to record them, or cover them locally.
    pub(super) fn cover_misses(&mut self) {
        if !matches!(self.phase, Phase::Serving | Phase::Draining) {
            return;
        }
        let mut local = BTreeSet::new();
        let mut hints = Vec::new();
        let keys: Vec<u64> = self.waiting.keys().copied().collect();
        for k in keys {
            let extents = self.waiting[&k].extents.clone();
            let missing: Vec<ExtentId> = extents.map(ExtentId).filter(|e| !self.covers(*e)).collect();
            if missing.is_empty() {
                continue;
            }
            let w = self.waiting.get_mut(&k).expect("present");
            if !w.counted_miss {
                w.counted_miss = true;
                self.stats.misses += 1;
            }
            match self.cfg.mode {
                Mode::Predictive => {
                    if let Some(h) = w.hint {
                        hints.push(h);
                    }
                    for e in missing {
                        if !self.rec.requested.contains(&e) && !self.dirty.persisting.contains(&e) {
                            self.rec.requested.insert(e);
                        }
                    }
                }
                Mode::Async | Mode::Sync => local.extend(missing.into_iter().filter(|e| !self.dirty.persisting.contains(e))),
                Mode::Standalone => {}
            }
        }
        for h in hints {
            if !self.rec.pending_hints.contains(&h) {
                self.rec.pending_hints.push(h);
            }
        }
        if !local.is_empty() {
            self.add_local_dirty(local.into_iter().collect());
        }
    }

    /// Requested extents not yet sent, oldest waiting write first, so that a batch cut short by
    /// the record's capacity still completes whole writes. `requested` holds both these and
    /// those in flight; the ones in flight are exactly those named by `updates`.
    pub(super) fn pending_miss(&self) -> Vec<ExtentId> {
        let inflight: BTreeSet<ExtentId> = self.rec.updates.values().flat_map(|u| u.missed.iter().copied()).collect();
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for w in self.waiting.values() {
            for e in w.extents.clone().map(ExtentId) {
                if self.rec.requested.contains(&e) && !inflight.contains(&e) && seen.insert(e) {
                    out.push(e);
                }
            }
        }
        out
    }

    /// Extents the oldest waiting miss still needs: an empty record admits at least these.
    pub(super) fn oldest_miss_span(&self) -> u64 {
        self.waiting.values().find(|w| !self.covered(&w.extents)).map_or(0, |w| w.extents.end - w.extents.start)
    }

    pub(super) fn send_record_update(&mut self, now: Time) {
        if self.conn.link != LinkState::Up || self.cfg.mode != Mode::Predictive {
            return;
        }
        while self.rec.updates.len() < self.cfg.max_record_updates_in_flight {
            let mut missed = self.pending_miss();
            if missed.is_empty() && self.rec.pending_hints.is_empty() {
                return;
            }
            missed.truncate(MAX_LIST_LEN);
            let reserved: u64 = self.rec.updates.values().map(|u| u.reserved).sum();
            // The record stays within its capacity: misses beyond the free room wait until an
            // eviction frees some. An empty record with nothing in flight admits a whole miss
            // even if one write spans more extents than the capacity, so that it can progress.
            let free = self.cfg.record_capacity_extents.saturating_sub(self.rec.copy.len() as u64 + reserved);
            let lone = self.rec.copy.is_empty() && self.rec.updates.is_empty();
            let admit = if lone { free.max(self.oldest_miss_span()) } else { free };
            if (missed.len() as u64) > admit {
                missed.truncate(admit as usize);
                self.stats.record_full_waits += 1;
            }
            let hints: Vec<StreamHint> = self.rec.pending_hints.iter().take(MAX_LIST_LEN).copied().collect();
            // Grant the secondary only the room its prediction can use: the streams' measured
            // needs, or k per miss (plus one extent per miss for a stream's start). Granting
            // all free space would make the record look full and evict predictions unused.
            let p = &self.cfg.predictor;
            let need = hints.iter().map(|h| h.want.max(p.k_next) as u64).sum::<u64>() + (p.k_next as u64 + 1) * missed.len() as u64;
            let room = free.saturating_sub(missed.len() as u64).min(need).min(u32::MAX as u64) as u32;
            if missed.is_empty() && (room == 0 || hints.is_empty()) {
                // Nothing fits now (or a pre-extension with no room would add nothing).
                return;
            }
            self.rec.pending_hints.clear();
            let id = self.rec.next_update_id;
            self.rec.next_update_id += 1;
            let evictions = std::mem::take(&mut self.rec.pending_evictions);
            self.rec.evictions_since = None;
            if missed.is_empty() {
                self.stats.pre_extensions_sent += 1;
            }
            self.stats.record_updates_sent += 1;
            self.rec.updates.insert(id, Update { missed: missed.clone(), reserved: missed.len() as u64 + room as u64, sent_at: now });
            self.send(Stream::Control, Frame::RecordUpdate { epoch: self.epoch, id, missed: to_runs(missed), hints, room, evictions });
        }
    }

    /// How far ahead a stream must be recorded: as far as it goes in two record round trips,
    /// one for the update in flight and one of margin.
    pub(super) fn lookahead(&self, stream: usize) -> u32 {
        let horizon = Duration::from_micros(2 * self.rec.srtt_us.max(1));
        let p = &self.cfg.predictor;
        self.rec.detector.lookahead(stream, horizon, p.pre_extend_within, p.max_ahead)
    }

    /// Extends the record ahead of a stream before the stream reaches unrecorded space, so the
    /// host never waits: once less than one lookahead of recorded (or requested) space is
    /// left, ask for two, so that requests go out about once per lookahead, not per write.
    pub(super) fn consider_pre_extension(&mut self, stream: usize) {
        if self.cfg.mode != Mode::Predictive || self.cfg.predictor.kind != crate::config::PredictorKind::Adaptive {
            return;
        }
        let within = self.lookahead(stream);
        let Some((hint, ahead)) = self.rec.detector.ahead(stream, within) else {
            return;
        };
        let asked = self.rec.detector.asked_through(stream);
        let remaining = (asked - hint.last as i64) / hint.stride;
        if remaining >= within as i64 {
            return;
        }
        let gap = ahead
            .iter()
            .any(|e| *e < self.geo.extent_count() && !self.rec.copy.contains(ExtentId(*e)) && !self.rec.requested.contains(&ExtentId(*e)));
        if !gap {
            return;
        }
        let want = within.saturating_mul(2).min(self.cfg.predictor.max_ahead);
        self.rec.detector.mark_asked(stream, hint.last as i64 + hint.stride * want as i64);
        let hint = StreamHint { want, ..hint };
        if !self.rec.pending_hints.contains(&hint) {
            self.rec.pending_hints.push(hint);
        }
    }

    pub(super) fn on_answer(&mut self, now: Time, id: u64, generation: Generation, added: &[crate::record::ExtentRun]) {
        let Some(u) = self.rec.updates.remove(&id) else {
            return;
        };
        if runs_len(added) > u.reserved {
            // The secondary adds the misses and at most `room` predictions: more would grow the
            // record copy past what this site allowed.
            self.refuse(&format!("record answer {id} adds {} extents, more than the {} its update allowed", runs_len(added), u.reserved));
            return;
        }
        self.stats.record_answers += 1;
        self.ident.peer.generation = self.ident.peer.generation.max(generation);
        let rtt = now.since(u.sent_at).as_micros() as u64;
        self.rec.srtt_us = if self.rec.srtt_us == 0 { rtt } else { (7 * self.rec.srtt_us + rtt) / 8 };
        self.stats.record_rtt_us_total += rtt;
        self.stats.record_rtt_count += 1;
        self.stats.record_rtt_smoothed_us = self.rec.srtt_us;
        let missed: BTreeSet<ExtentId> = u.missed.iter().copied().collect();
        for e in &u.missed {
            self.rec.requested.remove(e);
        }
        for e in from_runs(added) {
            self.rec.copy.insert(e, generation);
            self.rec.generation_added.entry(generation).or_insert(now);
            if !missed.contains(&e) {
                self.stats.predicted_extents += 1;
                self.rec.predicted.insert(e);
            }
        }
        // An answer that lacks a missed extent (a peer bug) leaves the write waiting; it is
        // asked for again rather than assumed.
        for e in &u.missed {
            if !self.rec.copy.contains(*e) {
                self.rec.requested.insert(*e);
            }
        }
    }

    /// Predictive mode: keep the record copy under its capacity by evicting the oldest whole
    /// generations whose every extent is clean (claims 13-17).
    pub(super) fn evict(&mut self, now: Time) {
        if self.cfg.mode != Mode::Predictive || self.conn.link != LinkState::Up {
            return;
        }
        let cap = self.cfg.record_capacity_extents;
        let target = cap - cap / 8;
        let reserved: u64 = self.rec.updates.values().map(|u| u.reserved).sum();
        let max_age = self.cfg.clean_generation_max_age;
        let oldest_expired = self.rec.copy.generations().next().is_some_and(|(g, _)| self.generation_expired(g, now, max_age));
        if self.rec.copy.len() as u64 + reserved <= target && self.pending_miss().is_empty() && !oldest_expired {
            return;
        }
        // Extents a waiting host write needs are in flight from the host's point of view:
        // evicting one would only make that write miss again.
        let pinned: BTreeSet<ExtentId> = self.waiting.values().flat_map(|w| w.extents.clone().map(ExtentId)).collect();
        let mut victims: Vec<Generation> = Vec::new();
        let mut size = self.rec.copy.len() as u64 + reserved + self.pending_miss().len() as u64;
        for (g, members) in self.rec.copy.generations().take(EVICTION_SCAN_GENERATIONS) {
            // Under the watermark, only generations past their age go: the record shrinks back
            // to its working size, and with it the failback debt.
            if size <= target && !self.generation_expired(g, now, max_age) {
                break;
            }
            #[cfg(feature = "mutations")]
            let clean = crate::mutations::evict_dirty() || members.iter().all(|e| self.is_clean(*e) && !pinned.contains(e));
            #[cfg(not(feature = "mutations"))]
            let clean = members.iter().all(|e| self.is_clean(*e) && !pinned.contains(e));
            if clean {
                victims.push(g);
                size = size.saturating_sub(members.len() as u64);
            }
        }
        for g in victims {
            let members: Vec<ExtentId> = self.rec.copy.members_of(g).map(|m| m.iter().copied().collect()).unwrap_or_default();
            for e in &members {
                self.rec.copy.remove(*e);
                self.rec.predicted.remove(e);
            }
            self.stats.evicted_extents += members.len() as u64;
            self.stats.evicted_generations += 1;
            self.rec.pending_evictions.push(Eviction { generation: g, extents: to_runs(members) });
            self.rec.generation_added.remove(&g);
            if self.rec.evictions_since.is_none() {
                self.rec.evictions_since = Some(now);
            }
        }
    }

    pub(super) fn generation_expired(&self, g: Generation, now: Time, max_age: Option<std::time::Duration>) -> bool {
        match (max_age, self.rec.generation_added.get(&g)) {
            (Some(age), Some(added)) => now.since(*added) >= age,
            _ => false,
        }
    }
}
