//! The retransmit buffer and shipping: every dispatched item gets the next sequence number
//! and stays buffered until the peer has durably applied it; shipping sends the buffer in
//! order within the data window; `Applied` frees it and cleans the extents it made dirty.

use super::*;

impl Primary {
    /// Remembers when host write `seq` was dispatched, for the lag in seconds. Writes within a
    /// millisecond share a group, and the groups are bounded: past the bound, neighbours merge
    /// under the older time, so the lag is never understated.
    pub(super) fn note_unapplied(&mut self, now: Time, seq: Seq) {
        match self.unapplied.back_mut() {
            Some(g) if now.since(g.at) < LAG_CLOCK_GRAIN => g.last = seq,
            _ => self.unapplied.push_back(UnappliedGroup { at: now, last: seq }),
        }
        if self.unapplied.len() > LAG_CLOCK_GROUPS {
            let merged: VecDeque<UnappliedGroup> = self
                .unapplied
                .iter()
                .collect::<Vec<_>>()
                .chunks(2)
                .map(|pair| UnappliedGroup { at: pair[0].at, last: pair[pair.len() - 1].last })
                .collect();
            self.unapplied = merged;
        }
    }

    /// Gives an item the next sequence number and puts it in the retransmit buffer.
    pub(super) fn dispatch_item(&mut self, item: Apply) -> Seq {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        self.buffer_bytes += item_bytes(&item);
        self.buffer.insert(seq, item);
        seq
    }

    pub(super) fn on_applied(&mut self, through: Seq) {
        if through <= self.applied_ack {
            return;
        }
        if through >= self.next_seq {
            self.refuse("peer claims to have applied writes never sent");
            return;
        }
        self.applied_ack = through;
        self.ident.peer.applied = self.ident.peer.applied.max(through);
        while self.unapplied.front().is_some_and(|g| g.last <= through) {
            self.unapplied.pop_front();
        }
        self.resync_seqs = self.resync_seqs.split_off(&through.next());
        let keep = self.buffer.split_off(&through.next());
        for (seq, item) in std::mem::replace(&mut self.buffer, keep) {
            self.buffer_bytes -= item_bytes(&item);
            if seq < self.ship_next {
                self.shipped_bytes -= item_bytes(&item);
            }
        }
        if self.ship_next <= through {
            self.ship_next = through.next();
        }
        self.clean_dirty();
        if let Some(end) = self.resync.end {
            if through >= end {
                self.resync.end = None;
                self.resync.running = false;
                if std::mem::take(&mut self.resync.full) {
                    self.resync.sweep = None;
                    self.finish_full_resync();
                }
            }
        }
    }

    pub(super) fn ship(&mut self) {
        if self.conn.link != LinkState::Up {
            return;
        }
        let lanes = self.cfg.data_lanes.max(1) as u64;
        while let Some((seq, item)) = self.buffer.range(self.ship_next..).next() {
            let bytes = item_bytes(item);
            // The window may be exceeded only by a single item sent when nothing is in flight;
            // the secondary's reorder buffer is sized for that (see `CoreConfig::validate`).
            if self.shipped_bytes > 0 && self.shipped_bytes + bytes > self.cfg.max_inflight_bytes {
                break;
            }
            let (seq, apply) = (*seq, item.clone());
            self.ship_next = seq.next();
            self.shipped_bytes += bytes;
            #[cfg(feature = "mutations")]
            if crate::mutations::miscount_window() {
                self.shipped_bytes -= 1;
            }
            let stream = if self.resync_seqs.contains(&seq) { Stream::Resync } else { Stream::Data((seq.0 % lanes) as u8) };
            self.send(stream, Frame::Data { epoch: self.epoch, seq, apply });
        }
    }

    /// Recounts the bytes sent and not yet applied, after `ship_next` moved back (a new
    /// connection); everywhere else the count is kept as items are sent and applied.
    pub(super) fn recount_shipped(&mut self) {
        self.shipped_bytes = self.buffer.range(..self.ship_next).map(|(_, i)| item_bytes(i)).sum();
    }

    pub(super) fn request_sync(&mut self, now: Time) {
        if self.sync_inflight.is_some() {
            // The sync in flight may not cover the newest writes; another follows it.
            if let Some((_, through)) = self.sync_inflight {
                if through >= self.last_dispatched() {
                    return;
                }
            }
        }
        let token = self.token();
        self.sync_inflight = Some((token, self.last_dispatched()));
        self.last_sync = now;
        self.actions.push_back(Action::SyncMedia { token });
    }

    pub(super) fn sync_would_help(&self) -> bool {
        self.dirty.by_seq.keys().next().is_some_and(|s| *s <= self.applied_ack && *s > self.local_synced)
    }
}

/// Groups of host writes dispatched within this long of each other share one time.
pub(super) const LAG_CLOCK_GRAIN: Duration = Duration::from_millis(1);

/// Most dispatch-time groups kept; beyond, neighbours merge.
pub(super) const LAG_CLOCK_GROUPS: usize = 4096;

/// Host writes dispatched from `at` on, through sequence `last`.
#[derive(Clone, Copy, Debug)]
pub(super) struct UnappliedGroup {
    pub(super) at: Time,
    pub(super) last: Seq,
}

pub(super) fn item_bytes(item: &Apply) -> u64 {
    item.buffered_bytes()
}
