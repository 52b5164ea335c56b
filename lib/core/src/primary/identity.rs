//! The primary's side of store identity: who its peer's store is, what that store has
//! acknowledged, and what to do when it turns out to be an amnesiac.
//!
//! Owns: this site's store identity, its memory of the peer (`PeerMemory`: exact in memory,
//! persisted lazily), the checks on the secondary's `Welcome`, the full verified resync an
//! amnesiac peer is owed, and this site stepping down when the peer shows that this site's
//! own store went back in time.
//!
//! Must not: trust an amnesiac's record or flags. Until the full resync's end is applied
//! (durably) on the peer, the peer is never told its record is authoritative.

use super::{PersistKind, Primary};
use crate::config::CoreConfig;
use crate::frame::Remembered;
use crate::ids::{Generation, Seq, StoreId};
use crate::stats::PrimaryStats;
use crate::store::{Meta, PeerMemory, SiteState, StoreWrite};
use crate::time::Time;

/// Why an approval of a rebuild was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApproveRefused {
    #[error("no full sync waits for approval on this site")]
    NothingPending,
    #[error("the peer's store is {pending}, not {given}: nothing was approved (check the store id in the peer's status)")]
    WrongStore { pending: StoreId, given: StoreId },
}

/// Identity state of a primary.
pub(super) struct Identity {
    pub(super) store_id: StoreId,
    /// What the peer acknowledged, exactly (positions grow with `Applied` and answers).
    pub(super) peer: PeerMemory,
    /// The memory as last persisted (or being persisted), and when that persist was issued.
    persisted: PeerMemory,
    persist_at: Time,
    pub(super) persisting: bool,
    /// The generation of the memory as it is in the store now (the last persist that
    /// completed): no write reaches the media resting on a newer record answer.
    pub(super) durable_generation: Generation,
    /// The store the secondary named in its hello on this connection.
    pub(super) hello_store: Option<StoreId>,
    /// Durable: the peer needs a full verified resync before its record is trusted.
    pub(super) full_resync_owed: bool,
    /// Durable: the full resync owed is onto a store that replaced the paired one (a rebuilt
    /// site) and waits for an operator's approval.
    pub(super) rebuild_pending: bool,
    /// Where this store stood when it was promoted, for the old primary's check.
    pub(super) promoted_from: Option<crate::frame::Position>,
    /// Counts full resyncs owed, so that the end of one does not clear a newer debt.
    owed_count: u64,
    /// The end of a full resync is being made durable here: no other starts meanwhile.
    pub(super) settling: bool,
    /// Why the last handshake found the peer an amnesiac, for the operator.
    pub(super) peer_amnesia: Option<String>,
}

impl Identity {
    pub(super) fn new(state: &SiteState, now: Time) -> Identity {
        Identity {
            store_id: state.store_id,
            peer: state.peer,
            persisted: state.peer,
            persist_at: now,
            persisting: false,
            durable_generation: state.peer.generation,
            hello_store: None,
            full_resync_owed: state.full_resync_owed,
            rebuild_pending: state.rebuild_pending && state.full_resync_owed,
            promoted_from: state.promoted_from,
            owed_count: 0,
            settling: false,
            peer_amnesia: None,
        }
    }

    /// What the hello tells the peer about itself.
    pub(super) fn remembered(&self) -> Option<Remembered> {
        self.peer.store.map(|store| Remembered { store, applied: self.peer.applied, generation: self.peer.generation })
    }

    /// When the memory is next persisted, if it has moved since.
    pub(super) fn memory_persist_due(&self, cfg: &CoreConfig) -> Option<Time> {
        (self.peer != self.persisted && !self.persisting).then(|| self.persist_at + cfg.peer_memory_persist_interval)
    }

    /// A persist of the memory holding generation `g` completed (persists complete in order).
    pub(super) fn memory_persisted(&mut self, g: Generation) {
        self.persisting = false;
        self.durable_generation = g;
    }

    pub(super) fn full_resync_done(&mut self, n: u64, stats: &mut PrimaryStats) {
        self.settling = false;
        if n == self.owed_count {
            self.full_resync_owed = false;
            stats.full_resyncs_completed += 1;
        }
    }
}

/// The fields of a `Welcome` that identify the secondary's store.
pub(super) struct Welcome {
    pub(super) applied: Seq,
    pub(super) store: StoreId,
    pub(super) next_generation: Generation,
    pub(super) amnesiac: bool,
    pub(super) sync_cursor: Option<u64>,
}

impl Primary {
    /// This site's store identity.
    pub fn store_id(&self) -> StoreId {
        self.ident.store_id
    }
    /// The peer's store, as remembered.
    pub fn peer_store(&self) -> Option<StoreId> {
        self.ident.peer.store
    }
    /// The peer's store is an amnesiac: it is owed a full verified resync, and its record is
    /// not authoritative until that ends.
    pub fn full_resync_owed(&self) -> bool {
        self.ident.full_resync_owed
    }
    /// The peer store a full sync waits for an operator's approval onto: a store that
    /// replaced the one this site paired with (a rebuilt site). Meanwhile the peer is
    /// untrusted, host writes still reach it, and nothing else is copied to it.
    pub fn rebuild_pending(&self) -> Option<StoreId> {
        self.ident.rebuild_pending.then_some(self.ident.peer.store).flatten()
    }

    /// An operator approves the full sync onto `store`, which must be the peer store that
    /// waits (its identity shows in status): a full sync is never started onto a store the
    /// operator did not name.
    pub fn approve_rebuild(&mut self, now: Time, store: StoreId) -> Result<(), ApproveRefused> {
        let Some(pending) = self.rebuild_pending() else { return Err(ApproveRefused::NothingPending) };
        if pending != store {
            return Err(ApproveRefused::WrongStore { pending, given: store });
        }
        self.ident.rebuild_pending = false;
        self.stats.rebuilds_approved += 1;
        self.persist(PersistKind::RebuildApproved, Vec::new(), vec![StoreWrite::Meta(Meta::RebuildPending(false))]);
        self.progress(now);
        Ok(())
    }

    /// Why the peer was last found an amnesiac.
    pub fn peer_amnesia(&self) -> Option<&str> {
        self.ident.peer_amnesia.as_deref()
    }
    /// Extents the full resync under way has reached, of the volume's; None when none runs.
    pub fn full_resync_progress(&self) -> Option<(u64, u64)> {
        self.resync.full.then(|| (self.resync.sweep.unwrap_or(0).min(self.geo.extent_count()), self.geo.extent_count()))
    }

    /// A primary of a newer epoch: this site is superseded. When it is the store this site
    /// knew as its secondary, and it was promoted from less than it had acknowledged here
    /// (its store went back before its promotion, and nobody could tell it), its failback
    /// set misses extents where this site may hold acknowledged writes: this site steps down
    /// as untrusted, so that the failback checks the whole volume and saves aside whatever
    /// differs. `Err` when it stepped down so.
    pub(super) fn check_newer_primary(
        &mut self,
        epoch: crate::ids::Epoch,
        primary: StoreId,
        promoted_from: Option<crate::frame::Position>,
    ) -> Result<(), ()> {
        let Some(p) = promoted_from else { return Ok(()) };
        if self.ident.peer.store != Some(primary) {
            return Ok(());
        }
        let m = self.ident.peer;
        #[cfg(feature = "mutations")]
        if crate::mutations::trust_amnesiac() {
            return Ok(());
        }
        if p.applied < m.applied || p.next_generation <= m.generation {
            let why = format!(
                "the primary of epoch {} was promoted from a store holding less than it had acknowledged here (applied {} of {}, \
                 next generation {} after answering {}): its failback set misses extents, so this site steps down untrusted and \
                 its failback checks the whole volume, saving aside whatever differs",
                epoch.0, p.applied.0, m.applied.0, p.next_generation.0, m.generation.0
            );
            if self.step_down(epoch, Some(&why)) {
                self.actions.push_back(crate::action::Action::Disconnect { reason: why });
            }
            return Err(());
        }
        Ok(())
    }

    /// The secondary's hello names the primary store it paired with. When that is not this
    /// store, and this site does not know the secondary's store either, the two never
    /// paired: this site is a rebuilt or replaced primary (its state lost over new media),
    /// and it must not serve over a peer that holds the data. The secondary refuses it too
    /// (`Refusal::UnknownStore`), but a refusal can be lost with the connection it closes.
    pub(super) fn check_secondary_hello(&mut self, secondary: StoreId, remembers: Option<Remembered>) {
        let Some(r) = remembers else { return };
        #[cfg(feature = "mutations")]
        if crate::mutations::trust_amnesiac() {
            return;
        }
        if r.store != self.ident.store_id && self.ident.peer.store != Some(secondary) && !self.ident.full_resync_owed {
            self.step_down_amnesiac(format!(
                "the secondary paired with primary store {}, not this store ({}), and this site does not know the secondary's store: \
                 this site's state was lost or replaced, so it stops serving until an operator promotes one site",
                r.store, self.ident.store_id
            ));
        }
    }

    /// Checks the secondary's welcome against this store and the memory of the peer. `Err`
    /// when this site stepped down: the welcome shows that this site's own store went back.
    pub(super) fn check_welcome(&mut self, w: Welcome) -> Result<(), ()> {
        if let Some(why) = self.own_rollback(&w) {
            self.step_down_amnesiac(why);
            return Err(());
        }
        if self.ident.hello_store.is_some_and(|s| s != w.store) {
            // A peer that changes its identity within one handshake is broken or hostile; the
            // connection is closed and the next one starts over.
            self.refuse("the peer's welcome names another store than its hello");
            return Err(());
        }
        let replaced = self.ident.peer.store.is_some_and(|known| known != w.store);
        let reason = match self.ident.peer.store {
            None => None,
            Some(known) if known != w.store => Some(format!(
                "the peer's store is {}, not the store {known} this site paired with: its state was lost or replaced",
                w.store
            )),
            Some(_) if w.applied < self.ident.peer.applied => Some(format!(
                "the peer acknowledged applying through sequence {} and now holds {}: it lost acknowledged writes",
                self.ident.peer.applied.0, w.applied.0
            )),
            Some(_) if w.next_generation <= self.ident.peer.generation => Some(format!(
                "the peer answered generation {} and its next is {}: it lost acknowledged record entries",
                self.ident.peer.generation.0, w.next_generation.0
            )),
            // The amnesiac this site already owes a full resync, back on a new connection: the
            // same debt, resumed where the peer's durable sync cursor says (from the first
            // extent without one).
            Some(_) if w.amnesiac && self.ident.full_resync_owed && !self.ident.settling => {
                self.resync.resume = w.sync_cursor.filter(|c| *c <= self.geo.extent_count());
                #[cfg(feature = "mutations")]
                if crate::mutations::resume_from_start() {
                    self.resync.resume = None;
                }
                self.resync.full = false;
                None
            }
            Some(_) if w.amnesiac => Some("the peer says its store is an amnesiac".to_string()),
            Some(_) => None,
        };
        #[cfg(feature = "mutations")]
        let reason = if crate::mutations::trust_amnesiac() { None } else { reason };
        match reason {
            Some(why) => self.peer_is_amnesiac(why, &w, replaced),
            None if self.ident.peer.store.is_none() => {
                // The first handshake of a new pair: remember the peer from now on. A site
                // created over media that already held data owes it a full resync.
                self.ident.peer = PeerMemory { store: Some(w.store), applied: Seq(0), generation: Generation(0) };
                self.persist_memory_now();
            }
            None => {}
        }
        Ok(())
    }

    /// Whether the welcome shows that this site's own store went back: the peer applied
    /// sequence numbers this site has not dispatched, or, at this incarnation's first
    /// contact, numbers of this incarnation (the incarnation was handed out before, and lost
    /// with the batch that recorded it: reusing it would make the peer drop new writes as
    /// already applied).
    fn own_rollback(&self, w: &Welcome) -> Option<String> {
        let reused = self.rec.resend_on_snapshot && w.applied.0 >> 40 >= self.incarnation;
        let ahead = w.applied >= self.next_seq;
        #[cfg(feature = "mutations")]
        if crate::mutations::trust_amnesiac() {
            return None;
        }
        (reused || ahead).then(|| {
            format!(
                "the peer applied through sequence {} (incarnation {}), past anything this site (incarnation {}) dispatched: \
                 this site's store went back in time, so it stops serving until an operator promotes one site",
                w.applied.0,
                w.applied.0 >> 40,
                self.incarnation
            )
        })
    }

    /// The peer's store lost acknowledged state: its record and flags are not trusted, it is
    /// owed a full verified resync (durable before anything is shipped to it), and from now on
    /// it is remembered as it is.
    /// `replaced`: the peer is another store than the one paired with (a rebuilt site); the
    /// full sync onto it then waits for an operator unless the config allows it.
    fn peer_is_amnesiac(&mut self, why: String, w: &Welcome, replaced: bool) {
        assert_eq!(self.conn.link, super::LinkState::Handshake, "amnesia is found at a welcome, before anything is shipped");
        self.stats.amnesiac_peers_detected += 1;
        self.ident.peer_amnesia = Some(why);
        self.ident.full_resync_owed = true;
        self.ident.owed_count += 1;
        self.conn.peer_authoritative = false;
        // Positions count afresh from what this store acknowledges next.
        self.ident.peer = PeerMemory { store: Some(w.store), applied: Seq(0), generation: Generation(0) };
        self.ident.persisted = self.ident.peer;
        self.ident.persisting = true;
        // A new debt onto the same store (it lost state) runs at once, as before; onto another
        // store it is a rebuild, which waits for an operator unless allowed. A pending
        // approval stays pending until given.
        self.ident.rebuild_pending |= replaced && !self.cfg.rebuild_auto;
        let batch = vec![
            StoreWrite::Meta(Meta::Peer(self.ident.peer)),
            StoreWrite::Meta(Meta::FullResyncOwed(true)),
            StoreWrite::Meta(Meta::RebuildPending(self.ident.rebuild_pending)),
        ];
        self.persist(PersistKind::FullResyncOwed, Vec::new(), batch);
        // Whatever resync was under way covered only what was known to differ: the full one
        // replaces it (`drive_resync`).
        self.resync.full = false;
    }

    /// The end of a full resync was applied on the peer: the debt is settled, durably.
    pub(super) fn finish_full_resync(&mut self) {
        assert!(self.ident.full_resync_owed, "a full resync ended that nobody owed");
        assert!(self.resync.sweep.is_none() && !self.resync.running, "the full resync's sweep is over before its end is settled");
        let n = self.ident.owed_count;
        self.ident.settling = true;
        self.persist(
            PersistKind::FullResyncDone(n),
            Vec::new(),
            vec![StoreWrite::Meta(Meta::FullResyncOwed(false)), StoreWrite::Meta(Meta::RebuildPending(false))],
        );
    }

    /// This site's store lost state (the peer shows it): it stops serving and becomes an
    /// amnesiac secondary, saving aside whatever a later resync overwrites. An operator
    /// decides which site becomes primary.
    pub(super) fn step_down_amnesiac(&mut self, why: String) {
        self.stats.stepped_down_amnesiac += 1;
        let epoch = self.epoch;
        if self.step_down(epoch, Some(&why)) {
            self.actions.push_back(crate::action::Action::Disconnect { reason: why });
        }
    }

    pub(super) fn persist_memory_now(&mut self) {
        self.ident.persisted = self.ident.peer;
        self.ident.persisting = true;
        let g = self.ident.peer.generation;
        self.persist(PersistKind::PeerMemory(g), Vec::new(), vec![StoreWrite::Meta(Meta::Peer(self.ident.peer))]);
    }

    /// Whether a write to `extents` may reach the media as far as this site's memory of the
    /// peer goes: every extent it covers through the record copy is of a generation the
    /// memory holds durably. Otherwise a crash of this site would forget the answer the
    /// write rests on, and a secondary whose store went back to before that answer (a
    /// restored backup, say) would be taken as it is, its record lacking the extent where
    /// the images differ. The cost is one synced store write per batch of answers, on the
    /// miss path only: a hit rests on an answer remembered long ago.
    pub(super) fn remembered_durably(&self, extents: &std::ops::Range<u64>) -> bool {
        #[cfg(feature = "mutations")]
        if crate::mutations::lazy_peer_memory() {
            return true;
        }
        self.cfg.mode != crate::config::Mode::Predictive
            || extents
                .clone()
                .map(crate::ids::ExtentId)
                .all(|e| self.dirty.local.contains(&e) || self.rec.copy.generation_of(e).is_none_or(|g| g <= self.ident.durable_generation))
    }

    /// Persists the memory of the peer when it moved and the interval has passed.
    pub(super) fn maybe_persist_peer_memory(&mut self, now: Time) {
        if self.ident.memory_persist_due(&self.cfg).is_some_and(|due| now >= due) {
            self.ident.persist_at = now;
            self.persist_memory_now();
        }
    }
}
