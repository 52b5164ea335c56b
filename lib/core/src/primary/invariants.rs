//! The primary's invariants, checked after every step: at the end of each `progress` in
//! builds with debug assertions, and after every event in the simulation, in any build.
//! Each names a bookkeeping fact the write path relies on; a broken one is a bug in the
//! core, found at the step that broke it rather than by an oracle much later.

use super::timers::Instants;
use super::*;

impl Primary {
    /// Checks every invariant; the first broken one, described.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.verify_invariants()?;
        // A full sync onto a replaced store never runs before an operator approved it.
        if self.ident.rebuild_pending && (!self.ident.full_resync_owed || self.resync.full) {
            return Err("a rebuild awaits approval, yet no full resync is owed or one runs".into());
        }
        // The record copy's entries are all of generations the memory of the peer holds
        // (answers and snapshot entries raise it): what `remembered_durably` relies on to
        // make progress.
        if let Some((e, g)) = self.rec.copy.iter().find(|(_, g)| *g > self.ident.peer.generation) {
            return Err(format!(
                "extent {} is recorded in generation {} past the peer's remembered {}",
                e.0, g.0, self.ident.peer.generation.0
            ));
        }
        // Every extent an update in flight asked for is still requested.
        for (id, u) in &self.rec.updates {
            if let Some(e) = u.missed.iter().find(|e| !self.rec.requested.contains(e)) {
                return Err(format!("update {id} asked for extent {} which is no longer requested", e.0));
            }
        }
        // The byte counters equal the sums they cache.
        let buffered: u64 = self.buffer.values().map(item_bytes).sum();
        if buffered != self.buffer_bytes {
            return Err(format!("the buffer holds {buffered} bytes but counts {}", self.buffer_bytes));
        }
        let shipped: u64 = self.buffer.range(..self.ship_next).map(|(_, i)| item_bytes(i)).sum();
        if shipped != self.shipped_bytes {
            return Err(format!("{shipped} bytes are shipped and unapplied but the window counts {}", self.shipped_bytes));
        }
        // Sequence bookkeeping: the buffer holds dispatched, unapplied items; shipping
        // resumes past what the peer applied.
        if self.applied_ack >= self.next_seq || self.ship_next > self.next_seq || self.ship_next <= self.applied_ack {
            return Err(format!(
                "positions out of order: applied {} ship_next {} next_seq {}",
                self.applied_ack.0, self.ship_next.0, self.next_seq.0
            ));
        }
        if let Some(s) = self.buffer.keys().find(|s| **s <= self.applied_ack || **s >= self.next_seq) {
            return Err(format!("buffered item {} is applied or never dispatched", s.0));
        }
        if let Some(s) = self.resync_seqs.iter().find(|s| !self.buffer.contains_key(s)) {
            return Err(format!("resync item {} is not buffered", s.0));
        }
        // The two indexes of dirtiness mirror each other.
        for (e, s) in &self.dirty.by_extent {
            if !self.dirty.by_seq.get(s).is_some_and(|set| set.contains(e)) {
                return Err(format!("extent {} is dirty through {} but not indexed under it", e.0, s.0));
            }
        }
        for (s, set) in &self.dirty.by_seq {
            if set.is_empty() {
                return Err(format!("an empty dirty set is kept under {}", s.0));
            }
            if let Some(e) = set.iter().find(|e| self.dirty.by_extent.get(e) != Some(s)) {
                return Err(format!("extent {} is indexed under {} but dirty through {:?}", e.0, s.0, self.dirty.by_extent.get(e)));
            }
        }
        // Every write dispatched to the media and not yet acknowledged is covered, once the
        // connection's snapshot has made the copy whole again (invariant R at its source).
        // A peer found an amnesiac holds no record worth the name: every extent may differ
        // until its full verified resync ends, which is what stands in for R meanwhile.
        // Only writes dispatched since this connection's welcome: the copy of an earlier
        // connection is the peer's word, which a dishonest peer can take back at the next
        // welcome (no check on this site can tell; an honest peer's snapshot holds it all).
        let settled = self.phase != Phase::Fenced && self.conn.link != LinkState::Handshake && !self.ident.full_resync_owed;
        if settled {
            for (seq, d) in self.dispatched.range(self.conn.welcome_seq..) {
                if let Some(e) = d.extents.clone().find(|e| !self.covers(ExtentId(*e))) {
                    return Err(format!("write {} is on its way to the media but extent {e} is not covered", seq.0));
                }
            }
        }
        // The timer table mirrors the maps whose deadlines it orders.
        let mirrors = [
            ("waiting writes", Instants::collect(self.waiting.values().map(|w| w.arrived)), &self.timers.waiting),
            (
                "undegraded waiting writes",
                Instants::collect(self.waiting.values().filter(|w| !w.degraded).map(|w| w.arrived)),
                &self.timers.undegraded,
            ),
            ("flushes", Instants::collect(self.flushes.iter().map(|f| f.arrived)), &self.timers.flushes),
            (
                "dispatched writes with a deadline",
                Instants::collect(self.dispatched.values().filter(|d| self.needs_deadline(d)).map(|d| d.at)),
                &self.timers.dispatched,
            ),
        ];
        for (what, held, indexed) in mirrors {
            if held != *indexed {
                return Err(format!("the timer table's instants of {what} are {indexed:?} but the map holds {held:?}"));
            }
        }
        // An amnesiac peer is never told its record is authoritative before its full resync.
        // (Before a connection's welcome the flag is only what the last one left.)
        if self.ident.full_resync_owed && self.conn.peer_authoritative && self.conn.link == LinkState::Up {
            return Err("the peer is owed a full resync but its record is taken as authoritative".into());
        }
        Ok(())
    }
}
