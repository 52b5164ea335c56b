//! Deadlines: when the primary next has work to do with no event (`poll_timeout`), and what
//! it does then (`handle_timeout`): writes that waited too long for the record degrade or
//! fail, flushes time out, evictions idle out to the peer, and the local media is synced.

use super::*;

impl Primary {
    /// The next instant at which `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut at = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        let degrade = self.cfg.mode == Mode::Predictive && self.writes_alone_on_link_loss() && self.conn.link == LinkState::Down;
        let degrade_from = self.conn.changed + self.cfg.record_update_timeout;
        for w in self.waiting.values() {
            if degrade && !w.degraded {
                at((w.arrived + self.cfg.record_update_timeout).max(degrade_from));
            } else if !degrade {
                at(w.arrived + self.cfg.link_loss_deadline);
            }
        }
        for f in &self.flushes {
            at(f.arrived + self.cfg.link_loss_deadline);
        }
        let remote_flush = self.cfg.flush_policy == FlushPolicy::Remote;
        let degrade_any = self.writes_alone_on_link_loss() && self.conn.link == LinkState::Down;
        for d in self.dispatched.values() {
            if self.cfg.mode == Mode::Sync || (d.fua && remote_flush) {
                at(if degrade_any {
                    (d.at + self.cfg.record_update_timeout).max(degrade_from)
                } else {
                    d.at + self.cfg.link_loss_deadline
                });
            }
        }
        if let Some(since) = self.rec.evictions_since {
            at(since + self.cfg.eviction_idle_delay);
        }
        if let Some(age) = self.cfg.clean_generation_max_age {
            // The next generation to come of age. One already of age but not yet clean is
            // evicted when it becomes clean, which an `Applied` or a sync report signals.
            if let Some(t) = self.rec.generation_added.values().map(|added| *added + age).filter(|t| *t > self.last_now).min() {
                at(t);
            }
        }
        if self.sync_inflight.is_none() && self.sync_would_help() {
            at(self.last_sync + self.cfg.local_sync_interval);
        }
        if let Some(due) = self.ident.memory_persist_due(&self.cfg) {
            at(due);
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Time) {
        // Writes that have waited too long for the record.
        let mut fail = Vec::new();
        let mut degrade = Vec::new();
        for (k, w) in &self.waiting {
            let age = now.since(w.arrived);
            let missing = !self.covered(&w.extents);
            // Degrade is for a lost link only. A live link with a slow secondary keeps the write
            // waiting: the secondary could not learn of the degrade before this site failed.
            let may_degrade = self.cfg.mode == Mode::Predictive && self.may_degrade_now(now);
            if may_degrade {
                if age >= self.cfg.record_update_timeout && missing && !w.degraded {
                    degrade.push(*k);
                }
            } else if age >= self.cfg.link_loss_deadline {
                fail.push(*k);
            }
        }
        for k in fail {
            if let Some(w) = self.waiting.remove(&k) {
                self.stats.failed_writes += 1;
                self.ack(w.request, Err(HostError::LinkDown));
            }
        }
        let mut to_dirty = BTreeSet::new();
        for k in degrade {
            if let Some(w) = self.waiting.get_mut(&k) {
                w.degraded = true;
                let w = &self.waiting[&k];
                for e in w.extents.clone() {
                    let e = ExtentId(e);
                    if !self.rec.copy.contains(e) && !self.dirty.local.contains(&e) {
                        to_dirty.insert(e);
                    }
                }
                self.stats.degraded_writes += 1;
            }
        }
        if !to_dirty.is_empty() {
            self.add_local_dirty(to_dirty.into_iter().collect());
        }
        let expired: Vec<usize> =
            (0..self.flushes.len()).filter(|&i| now.since(self.flushes[i].arrived) >= self.cfg.link_loss_deadline).collect();
        for i in expired.into_iter().rev() {
            let f = self.flushes.remove(i);
            self.ack(f.request, Err(HostError::LinkDown));
        }
        if let Some(since) = self.rec.evictions_since {
            if now.since(since) >= self.cfg.eviction_idle_delay && self.conn.link == LinkState::Up && !self.rec.pending_evictions.is_empty()
            {
                let evictions = std::mem::take(&mut self.rec.pending_evictions);
                self.rec.evictions_since = None;
                self.send(Stream::Control, Frame::Evict { epoch: self.epoch, evictions });
            }
        }
        if self.sync_inflight.is_none() && self.sync_would_help() && now.since(self.last_sync) >= self.cfg.local_sync_interval {
            self.request_sync(now);
        }
        self.progress(now);
    }
}
