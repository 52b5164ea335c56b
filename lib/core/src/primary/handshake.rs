//! The connection to the peer: connecting and losing it, the hello and snapshot that open
//! each connection, fencing by a newer epoch, and when a lost link lets this site write alone.

use super::*;

pub(super) struct Conn {
    pub(super) link: LinkState,
    /// When the connection last appeared or disappeared: the link-loss clock.
    pub(super) changed: Time,
    pub(super) peer_applied_at_welcome: Seq,
    pub(super) peer_wrote_alone: bool,
    pub(super) peer_save_aside: bool,
    pub(super) peer_authoritative: bool,
    pub(super) peer_consistent: bool,
    /// This connection's welcome has come (one per connection).
    pub(super) welcomed: bool,
    /// The first sequence number dispatched after the last welcome.
    pub(super) welcome_seq: Seq,
}

impl Conn {
    pub(super) fn new(now: Time) -> Conn {
        Conn {
            link: LinkState::Down,
            changed: now,
            peer_applied_at_welcome: Seq(0),
            peer_wrote_alone: false,
            peer_save_aside: false,
            peer_authoritative: true,
            peer_consistent: true,
            welcomed: false,
            welcome_seq: Seq(0),
        }
    }
}

impl Primary {
    pub fn handle_connected(&mut self, now: Time) {
        if self.cfg.mode == Mode::Standalone {
            self.actions.push_back(Action::Disconnect { reason: "this site is configured without a peer".into() });
            return;
        }
        self.set_link(now, LinkState::Handshake);
        self.rec.snapshot_extents = 0;
        self.conn.welcomed = false;
        let hello = Frame::Hello {
            epoch: self.epoch,
            role: Role::Primary,
            volume_bytes: self.geo.volume_bytes(),
            extent_bytes: self.geo.extent_bytes(),
            // A primary that writes alone when the link is lost says so, whatever its policy.
            // (the configured policy, even before this site first paired and may degrade: the
            // secondary must give up authority on link loss from this connection on).
            on_link_loss: if self.resync.failback_pending { LinkLossPolicy::Degrade } else { self.cfg.on_link_loss },
            authoritative: self.cfg.mode == Mode::Predictive && self.dirty.local.is_empty() && self.dirty.persisting.is_empty(),
            wrote_alone: self.wrote_alone,
            store: self.ident.store_id,
            remembers: self.ident.remembered(),
            promoted_from: self.resync.failback_pending.then_some(self.ident.promoted_from).flatten(),
            owes_full_resync: self.ident.full_resync_owed,
        };
        self.send(Stream::Control, hello);
    }

    pub fn handle_disconnected(&mut self, now: Time) {
        self.set_link(now, LinkState::Down);
        self.rec.updates.clear();
        self.rec.requested.clear();
        self.rec.pending_hints.clear();
        // Unsent evictions are forgotten: the secondary still holds those extents, and the
        // next snapshot puts them back in the copy.
        self.rec.pending_evictions.clear();
        self.rec.evictions_since = None;
        self.ship_next = self.applied_ack.next();
        self.recount_shipped();
        self.progress(now);
    }

    pub(super) fn on_hello(&mut self, now: Time, epoch: Epoch, role: Role, volume_bytes: u64, extent_bytes: u64, wrote_alone: bool) {
        if volume_bytes != self.geo.volume_bytes() || extent_bytes != self.geo.extent_bytes() {
            self.send(Stream::Control, Frame::Refused { epoch: self.epoch, reason: crate::frame::Refusal::Geometry });
            self.refuse("peer volume geometry differs");
            return;
        }
        if epoch > self.epoch {
            // A newer epoch exists: this site was superseded by a promotion.
            self.fence(epoch);
            return;
        }
        match role {
            Role::Secondary => self.conn.peer_wrote_alone = wrote_alone,
            Role::Primary if epoch < self.epoch => {
                // The stale peer fences itself when it reads our hello; it comes back as a
                // secondary on a new connection.
            }
            Role::Primary => {
                self.send(Stream::Control, Frame::Refused { epoch: self.epoch, reason: crate::frame::Refusal::Roles });
                self.refuse("two primaries in one epoch");
            }
        }
        let _ = now;
    }

    pub(super) fn on_snapshot_end(&mut self, now: Time) {
        if self.rec.resend_on_snapshot {
            // First contact of this incarnation: whatever was in flight before a restart is
            // unknown, so every recorded extent is copied again.
            self.rec.resend_on_snapshot = false;
            self.resync.needs_copy.extend(self.rec.copy.iter().map(|(e, _)| e));
        }
        if self.conn.peer_wrote_alone && self.wrote_alone {
            self.set_link(now, LinkState::SplitBrainHold);
            return;
        }
        if self.conn.peer_wrote_alone {
            self.conn.peer_save_aside = true;
        }
        if !self.conn.peer_consistent && !self.resync.running {
            // Only a resync can make the peer's image a prefix again; by invariant R, copying
            // the record and the dirty map is enough, even when both are empty.
            self.resync.needs_copy.extend(self.rec.copy.iter().map(|(e, _)| e));
            self.resync.needs_copy.extend(self.dirty.local.iter().copied());
            self.resync.forced = true;
        }
        self.set_link(now, LinkState::Up);
        self.start_shipping_after_snapshot();
    }

    pub(super) fn start_shipping_after_snapshot(&mut self) {
        self.up_seq = self.last_dispatched();
        let from = self.conn.peer_applied_at_welcome.next();
        let first = self.buffer.keys().next().copied();
        match first {
            Some(f) if f <= from => self.ship_next = from.max(self.applied_ack.next()),
            Some(f) if matches!(self.buffer.get(&f), Some(Apply::ResyncBegin { skip: true, .. })) => self.ship_next = f,
            None if from >= self.next_seq => self.ship_next = self.next_seq,
            _ => {
                // The peer needs items this site no longer holds: resync instead.
                self.abandon_buffer();
            }
        }
        self.recount_shipped();
        // The peer's applied position may be ahead of what it has acknowledged to us.
        let applied = self.conn.peer_applied_at_welcome.min(self.last_dispatched());
        if applied > self.applied_ack && self.buffer.keys().next().is_some_and(|f| *f <= applied.next()) {
            self.on_applied(applied);
        }
    }

    pub(super) fn fence(&mut self, newer: Epoch) {
        if self.step_down(newer, None) {
            self.actions.push_back(Action::Disconnect { reason: format!("fenced by epoch {}", newer.0) });
        }
    }

    /// Stops serving and becomes a secondary of epoch `epoch`: fenced by a newer epoch, or
    /// (with `amnesia`) because this site's own store lost state. Returns false if already
    /// stepping down.
    pub(super) fn step_down(&mut self, epoch: Epoch, amnesia: Option<&str>) -> bool {
        if self.phase == Phase::Fenced {
            return false;
        }
        self.phase = Phase::Fenced;
        let (waiting, dispatched, flushes) = self.take_pending();
        for (_, w) in waiting {
            self.ack(w.request, Err(HostError::Fenced));
        }
        for (_, d) in dispatched {
            self.ack_write(d.request, Err(HostError::Fenced), d.path);
        }
        for f in flushes {
            self.ack(f.request, Err(HostError::Fenced));
        }
        // The local dirty map stays: it names extents this site may hold that the new primary
        // lacks, and is reported to it as divergent.
        let mut batch = vec![
            StoreWrite::ClearRecord,
            StoreWrite::Meta(Meta::Epoch(epoch)),
            StoreWrite::Meta(Meta::Role(Role::Secondary)),
            StoreWrite::Meta(Meta::FailbackPending(false)),
            // This incarnation never learned its record (it was superseded before its first
            // snapshot, e.g. when it came back after a crash): it cannot name the extents
            // where it may hold acknowledged writes the new primary lacks, so the failback
            // saves aside everything it overwrites.
            StoreWrite::Meta(Meta::SaveAsideOnResync(self.rec.resend_on_snapshot)),
            StoreWrite::Meta(Meta::Consistent(false)),
            StoreWrite::Meta(Meta::Authoritative(false)),
            StoreWrite::Meta(Meta::Applied(Seq(0))),
            StoreWrite::Meta(Meta::ApplyHighWater(Seq(0))),
            StoreWrite::Meta(Meta::Peer(self.ident.peer.across_role_change())),
            StoreWrite::Meta(Meta::FullResyncOwed(false)),
        ];
        // Writes acknowledged that the peer never applied are split-brain evidence.
        if self.last_dispatched() > self.applied_ack || self.wrote_alone {
            batch.push(StoreWrite::Meta(Meta::WroteAlone(true)));
        }
        // A site that owed its peer a full resync was promoted while its own store was an
        // amnesiac (or found its peer one): superseded now, its image is as untrusted as
        // before, and the new primary must check all of it.
        if amnesia.is_some() || self.ident.full_resync_owed {
            // Whatever this store forgot, the media may hold acknowledged writes the peer
            // lacks anywhere: everything the next resync overwrites is saved aside first,
            // and only a full resync makes this store trusted again.
            batch.push(StoreWrite::Meta(Meta::SaveAsideOnResync(true)));
            batch.push(StoreWrite::Meta(Meta::Amnesiac(true)));
        }
        // Extents written here but possibly unknown to the new primary's failback set.
        let extra: Vec<StoreWrite> =
            self.dirty.by_extent.keys().filter(|e| !self.dirty.local.contains(e)).map(|e| StoreWrite::PutDirty(*e)).collect();
        batch.extend(extra);
        self.persist(PersistKind::Demote, Vec::new(), batch);
        true
    }

    /// Counts `named` more extents in this connection's snapshot chunks; past twice the volume
    /// (its record and its divergent extents, each named once) the peer is refused.
    pub(super) fn snapshot_too_long(&mut self, named: u64) -> bool {
        self.rec.snapshot_extents += named;
        let limit = 2 * self.geo.extent_count();
        if self.rec.snapshot_extents > limit {
            self.refuse(&format!("the secondary's snapshot names more than {limit} extents, twice the volume's"));
            return true;
        }
        false
    }

    pub(super) fn refuse(&mut self, reason: &str) {
        self.stats.frames_refused += 1;
        self.actions.push_back(Action::Disconnect { reason: reason.to_string() });
    }

    /// `link_changed` marks when the connection last appeared or disappeared: the link-loss
    /// clock. Both sites see a connection drop within the detection skew, which is what lets
    /// the secondary give up authority before this site may degrade.
    pub(super) fn set_link(&mut self, now: Time, state: LinkState) {
        if (self.conn.link == LinkState::Down) != (state == LinkState::Down) {
            self.conn.changed = now;
        }
        self.conn.link = state;
    }

    /// Degrade applies only with no connection at all, for at least the record-update timeout.
    /// While connected (even mid-handshake or split-brain hold) the secondary believes itself
    /// in contact and keeps its record's authority, so degrading would leave it unaware.
    pub(super) fn may_degrade_now(&self, now: Time) -> bool {
        self.writes_alone_on_link_loss()
            && self.conn.link == LinkState::Down
            && now.since(self.conn.changed) >= self.cfg.record_update_timeout
    }

    /// With the link down, misses are tracked in the dirty map rather than held: under
    /// `degrade`, and on a promoted primary whose failback has not completed (no secondary
    /// holds a record worth protecting; the dirty map is the failback set).
    ///
    /// A primary that has never paired with its peer (no memory of the peer's store) does not
    /// degrade: it may be a rebuilt site whose peer holds all the data, and writing alone
    /// before the first handshake would take acknowledged writes that the peer refuses (see
    /// `Refusal::UnknownStore`). A new pair pairs within the first connection.
    pub(super) fn writes_alone_on_link_loss(&self) -> bool {
        (self.cfg.on_link_loss == LinkLossPolicy::Degrade && self.ident.peer.store.is_some()) || self.resync.failback_pending
    }

    /// Stops accepting new writes, for a switchover. Writes already accepted complete. Refused
    /// unless the site is serving (still starting, or fenced): the operator retries.
    pub fn begin_drain(&mut self) -> Result<(), HostError> {
        match self.phase {
            Phase::Serving => {
                self.phase = Phase::Draining;
                Ok(())
            }
            Phase::Draining => Ok(()),
            Phase::Starting | Phase::Fenced => Err(HostError::NotServing),
        }
    }

    /// Ends a drain without switching over.
    pub fn end_drain(&mut self, now: Time) {
        if self.phase == Phase::Draining {
            self.phase = Phase::Serving;
            self.progress(now);
        }
    }

    /// Planned demotion after a drain: the peer holds everything, so this site becomes a
    /// secondary whose image is consistent; its (empty) record is authoritative once the new
    /// primary says so.
    pub fn demote(&mut self) -> Result<(), HostError> {
        if self.phase != Phase::Draining || !self.is_drained() {
            return Err(HostError::NotServing);
        }
        self.phase = Phase::Fenced;
        let batch = vec![
            StoreWrite::ClearRecord,
            StoreWrite::Meta(Meta::Role(Role::Secondary)),
            StoreWrite::Meta(Meta::Consistent(true)),
            // Equal images now, but the record vouches for nothing the new primary writes
            // before it connects (in async or sync mode, or degraded, it writes outside any
            // record): as for a new store, only the new primary's `Authoritative` says so.
            StoreWrite::Meta(Meta::Authoritative(false)),
            StoreWrite::Meta(Meta::WroteAlone(false)),
            StoreWrite::Meta(Meta::FailbackPending(false)),
            // The peer holds everything this site wrote: the next resync has nothing of
            // this site's to save aside.
            StoreWrite::Meta(Meta::SaveAsideOnResync(false)),
            StoreWrite::Meta(Meta::Applied(self.last_dispatched())),
            StoreWrite::Meta(Meta::ApplyHighWater(self.last_dispatched())),
            StoreWrite::Meta(Meta::Peer(self.ident.peer.across_role_change())),
        ];
        self.persist(PersistKind::Demote, Vec::new(), batch);
        Ok(())
    }

    /// The operator chose this site's data after a split brain: the peer saves its divergent
    /// extents aside and is resynced from here.
    pub fn resolve_split_brain(&mut self, now: Time) {
        if self.conn.link == LinkState::SplitBrainHold {
            self.conn.peer_save_aside = true;
            self.resync.needs_copy.extend(self.rec.copy.iter().map(|(e, _)| e));
            self.resync.needs_copy.extend(self.dirty.local.iter().copied());
            self.set_link(now, LinkState::Up);
            self.start_shipping_after_snapshot();
            self.progress(now);
        }
    }
}
