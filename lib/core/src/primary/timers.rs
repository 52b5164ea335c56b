//! Deadlines: when the primary next has work to do with no event (`poll_timeout`), and what
//! it does then (`handle_timeout`): writes that waited too long for the record degrade or
//! fail, flushes time out, evictions idle out to the peer, and the local media is synced.
//!
//! Owns: the timer table (`Timers`), ordered indexes of the instants the deadlines of
//! waiting writes, flushes and dispatched writes count from, so that `poll_timeout` reads
//! the earliest of each kind instead of scanning; and the only functions that insert into
//! or remove from `waiting`, `flushes` and `dispatched`, which keep the table in step.
//! Must not: decide what a deadline does; `handle_timeout` and the write path do.

use super::*;

/// A multiset of instants, earliest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Instants(BTreeMap<Time, u32>);

impl Instants {
    fn insert(&mut self, t: Time) {
        *self.0.entry(t).or_insert(0) += 1;
    }

    fn remove(&mut self, t: Time) {
        if let Some(n) = self.0.get_mut(&t) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&t);
            }
        } else {
            debug_assert!(false, "removing an instant the timer table does not hold");
        }
    }

    fn first(&self) -> Option<Time> {
        self.0.keys().next().copied()
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn collect(instants: impl Iterator<Item = Time>) -> Instants {
        let mut s = Instants::default();
        for t in instants {
            s.insert(t);
        }
        s
    }
}

/// The timer table: for each kind of deadline, the instants it counts from, as quinn's
/// `timers.next_timeout()` keeps them, mirrored from the maps it indexes.
#[derive(Clone, Debug, Default)]
pub(super) struct Timers {
    /// Arrival of every waiting write.
    pub(super) waiting: Instants,
    /// Arrival of every waiting write not yet degraded.
    pub(super) undegraded: Instants,
    /// Arrival of every flush.
    pub(super) flushes: Instants,
    /// Dispatch of every write that waits for the peer's apply (`needs_deadline`).
    pub(super) dispatched: Instants,
}

impl Primary {
    /// Whether a dispatched write waits for the peer's apply, and so has a deadline.
    pub(super) fn needs_deadline(&self, d: &Dispatched) -> bool {
        self.cfg.mode == Mode::Sync || (d.fua && self.cfg.flush_policy == FlushPolicy::Remote)
    }

    pub(super) fn insert_waiting(&mut self, arrival: u64, w: Waiting) {
        debug_assert!(!w.degraded, "a write is degraded only while it waits");
        self.timers.waiting.insert(w.arrived);
        self.timers.undegraded.insert(w.arrived);
        let old = self.waiting.insert(arrival, w);
        debug_assert!(old.is_none(), "arrival numbers are never reused");
    }

    pub(super) fn remove_waiting(&mut self, arrival: u64) -> Option<Waiting> {
        let w = self.waiting.remove(&arrival)?;
        self.timers.waiting.remove(w.arrived);
        if !w.degraded {
            self.timers.undegraded.remove(w.arrived);
        }
        Some(w)
    }

    /// Marks a waiting write degraded; false if it is not waiting.
    pub(super) fn mark_degraded(&mut self, arrival: u64) -> bool {
        let Some(w) = self.waiting.get_mut(&arrival) else {
            return false;
        };
        if !w.degraded {
            w.degraded = true;
            self.timers.undegraded.remove(w.arrived);
        }
        true
    }

    pub(super) fn insert_dispatched(&mut self, seq: Seq, d: Dispatched) {
        if self.needs_deadline(&d) {
            self.timers.dispatched.insert(d.at);
        }
        let old = self.dispatched.insert(seq, d);
        debug_assert!(old.is_none(), "a sequence number is dispatched once");
    }

    pub(super) fn remove_dispatched(&mut self, seq: Seq) -> Option<Dispatched> {
        let d = self.dispatched.remove(&seq)?;
        if self.needs_deadline(&d) {
            self.timers.dispatched.remove(d.at);
        }
        Some(d)
    }

    pub(super) fn push_flush(&mut self, f: Flush) {
        self.timers.flushes.insert(f.arrived);
        self.flushes.push(f);
    }

    pub(super) fn remove_flush(&mut self, i: usize) -> Flush {
        let f = self.flushes.remove(i);
        self.timers.flushes.remove(f.arrived);
        f
    }

    /// Empties the waiting writes, dispatched writes and flushes, with their timers.
    pub(super) fn take_pending(&mut self) -> (BTreeMap<u64, Waiting>, BTreeMap<Seq, Dispatched>, Vec<Flush>) {
        self.timers.waiting.clear();
        self.timers.undegraded.clear();
        self.timers.flushes.clear();
        self.timers.dispatched.clear();
        (std::mem::take(&mut self.waiting), std::mem::take(&mut self.dispatched), std::mem::take(&mut self.flushes))
    }

    /// The next instant at which `handle_timeout` has work to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut at = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        let degrade = self.cfg.mode == Mode::Predictive && self.writes_alone_on_link_loss() && self.conn.link == LinkState::Down;
        let degrade_from = self.conn.changed + self.cfg.record_update_timeout;
        // Each deadline grows with the instant it counts from: the earliest instant of each
        // kind gives the earliest deadline of that kind.
        if degrade {
            if let Some(arrived) = self.timers.undegraded.first() {
                at((arrived + self.cfg.record_update_timeout).max(degrade_from));
            }
        } else if let Some(arrived) = self.timers.waiting.first() {
            at(arrived + self.cfg.link_loss_deadline);
        }
        if let Some(arrived) = self.timers.flushes.first() {
            at(arrived + self.cfg.link_loss_deadline);
        }
        let degrade_any = self.writes_alone_on_link_loss() && self.conn.link == LinkState::Down;
        if let Some(sent) = self.timers.dispatched.first() {
            at(if degrade_any { (sent + self.cfg.record_update_timeout).max(degrade_from) } else { sent + self.cfg.link_loss_deadline });
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
            if let Some(w) = self.remove_waiting(k) {
                self.stats.failed_writes += 1;
                self.ack(w.request, Err(HostError::LinkDown));
            }
        }
        let mut to_dirty = BTreeSet::new();
        for k in degrade {
            if self.mark_degraded(k) {
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
            let f = self.remove_flush(i);
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
