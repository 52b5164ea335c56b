//! The secondary site's state machine.
//!
//! Owns: the durable record (claim 1) and its generations, prediction on record updates
//! (claims 18-19), evictions (claims 13, 17), ordered apply of shipped data through a bounded
//! reorder buffer, return messages (claim 14), resync markers, save-aside before failback
//! overwrites, the non-authoritative flag, and promotion.
//!
//! Must not: perform I/O or read a clock.
//!
//! Ordering rules enforced here:
//! - A record answer leaves only after the synced store of exactly the extents it names.
//! - Data reaches media strictly in sequence order; a gap is bridged only by a `ResyncBegin`
//!   marker that says so, after "inconsistent" is durable.
//! - "Applied through S" leaves only after a media sync covering S and a synced store of S.

use crate::action::Action;
use crate::config::CoreConfig;
use crate::frame::{Apply, Eviction, Frame, LinkLossPolicy, RecordEntries, Refusal, Remembered, Role, Stream, MAX_LIST_LEN};
use crate::geometry::Geometry;
use crate::ids::{Epoch, ExtentId, Generation, Seq, StoreId, Token};
use crate::predict::Predictor;
use crate::record::{from_runs, to_runs, ExtentRun, Record};
use crate::stats::SecondaryStats;
use crate::store::{Meta, PeerMemory, SiteState, StoreWrite};
use crate::time::Time;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use thiserror::Error;

mod identity;
mod queue;

use queue::{Queued, RecordQueue};
pub use queue::{MAX_QUEUED_HINTS, MAX_QUEUED_RECORD_FRAMES, QUEUED_EXTENTS_PER_VOLUME};

#[derive(Clone, Debug, PartialEq, Eq)]
enum PersistKind {
    /// A record batch: on completion the working record becomes the durable one.
    Record,
    /// Epoch adoption and authority flags at handshake; the welcome follows.
    Handshake,
    /// Durable "inconsistent" before a resync's first write reaches media.
    ResyncBegin,
    /// Durable high-water mark before media writes pass it.
    HighWater(Seq),
    /// Durable "inconsistent" at start, when media may be ahead of the stored position.
    CatchUp,
    /// Applied position; "consistent" again when a resync ended or a catch-up completed,
    /// and no longer an amnesiac when that resync was a full one.
    Applied {
        through: Seq,
        consistent: bool,
        resynced: bool,
        full_resynced: bool,
    },
    Authoritative(bool),
    /// What this site remembers of its primary's store.
    PeerMemory,
    Promote,
    /// A failback check found blocks of the extent different: durable as divergent before
    /// the check counts as applied and before the primary is told which blocks.
    Mismatch {
        seq: Seq,
        extent: ExtentId,
        blocks: Vec<u8>,
    },
}

/// How far a forced promotion of an amnesiac moves its epoch ahead. Its store does not know
/// how far its peer's epoch went while it was gone, and two primaries of one epoch cannot be
/// told apart (each would refuse the other forever). Normal promotions add one, so the peer
/// would need this many promotions meanwhile to meet it.
pub const AMNESIAC_EPOCH_JUMP: u64 = 1 << 20;

/// What a promotion found, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromoteReport {
    pub new_epoch: Epoch,
    pub record_extents: u64,
    /// False after a degrade: differences outside the record may exist. Said loudly.
    pub authoritative: bool,
    /// False mid-resync: the image is not a prefix of the old primary's history.
    pub consistent: bool,
    /// True when an amnesiac was promoted by force: its image may lack acknowledged writes
    /// anywhere, and its failback onto the old primary checks the whole volume.
    pub amnesiac: bool,
    pub applied: Seq,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PromoteError {
    #[error("the primary of epoch {0} is connected and alive; promoting now would make two writers (use force to override)")]
    PeerAlive(u64),
    #[error("a promotion is already being persisted")]
    InProgress,
    #[error("this site has never paired with a primary (its store is new and no handshake has completed): its image holds nothing known of the primary's data; promote it only if the primary is lost for good, with --force (force: true in the API)")]
    NeverPaired,
    #[error("this site's store lost state it had acknowledged to its primary (an amnesiac): its image may lack acknowledged writes anywhere, not only in recorded extents, until a full verified resync from the primary ends; promote it only if the primary is lost for good, with --force (force: true in the API)")]
    Amnesiac,
}

pub struct Secondary {
    cfg: CoreConfig,
    geo: Geometry,
    epoch: Epoch,
    record: Record,
    next_generation: Generation,
    predictor: Predictor,
    /// Highest sequence applied to media (volatile until synced).
    applied: Seq,
    durable_applied: Seq,
    /// Durable bound on what may have reached media.
    high_water: Seq,
    /// The image is a prefix again once durably applied through this (after a crash left
    /// media ahead of the stored position).
    catch_up_to: Option<Seq>,
    consistent: bool,
    authoritative: bool,
    wrote_alone: bool,
    /// This site's own persisted dirty map, from a time it was primary: extents it may hold
    /// that a new primary lacks.
    divergent: BTreeSet<ExtentId>,
    /// Durable: save aside everything the next resync overwrites (see `Meta`).
    save_aside_on_resync: bool,
    /// This store's identity, and what it remembers of its primary's (see `identity.rs`).
    store_id: StoreId,
    peer: PeerMemory,
    /// Durable: this store lost acknowledged state; untrusted until a full resync ends.
    amnesiac: bool,
    /// The resync under way began as a full one (`ResyncBegin { full }`): its durable end is
    /// what clears `amnesiac`.
    resync_full: bool,
    /// Why this store was last found an amnesiac at a handshake (for status and logs).
    last_amnesia: Option<String>,
    connected: bool,
    /// Peer's hello processed and welcome sent.
    welcomed: bool,
    welcome_due: bool,
    peer_epoch: Option<Epoch>,
    /// Durable: the primary degrades on link loss, so losing it for long makes the record
    /// non-authoritative (the primary may then be writing outside the record).
    peer_may_degrade: bool,
    /// When the link to the primary was lost; None while connected.
    link_down_since: Option<Time>,
    /// Record updates and evictions waiting for the next record batch.
    queue: RecordQueue,
    /// The primary's hello on this connection was processed: a second one is refused.
    hello_seen: bool,
    record_persist: Option<(Token, Record, Vec<Frame>)>,
    reorder: BTreeMap<Seq, Apply>,
    reorder_bytes: u64,
    apply_blocked: Option<Token>,
    /// A failback check waiting for this site's read: its token, sequence number and extent.
    verifying: Option<(Token, Seq, ExtentId)>,
    save_aside: bool,
    saved: BTreeSet<ExtentId>,
    /// Between a `ResyncBegin` applied and the durable end of that resync.
    resyncing: bool,
    resync_end: Option<Seq>,
    sync_inflight: Option<(Token, Seq)>,
    applied_persist: Option<Token>,
    promoting: bool,
    persists: BTreeMap<Token, PersistKind>,
    next_token: u64,
    actions: VecDeque<Action>,
    stats: SecondaryStats,
}

impl Secondary {
    pub fn new(cfg: CoreConfig, geo: Geometry, state: &SiteState) -> Secondary {
        let mut record = Record::new(geo.extent_count());
        for (e, g) in &state.record {
            record.insert(*e, *g);
        }
        let mut s = Secondary {
            predictor: Predictor::new(cfg.predictor.clone()),
            cfg,
            geo,
            epoch: state.epoch,
            record,
            next_generation: state.next_generation,
            applied: state.applied,
            durable_applied: state.applied,
            high_water: state.apply_high_water.max(state.applied),
            catch_up_to: None,
            consistent: state.consistent,
            authoritative: state.authoritative,
            wrote_alone: state.wrote_alone,
            divergent: state.dirty.clone(),
            save_aside_on_resync: state.save_aside_on_resync,
            store_id: state.store_id,
            peer: state.peer,
            amnesiac: state.amnesiac,
            resync_full: false,
            last_amnesia: None,
            connected: false,
            welcomed: false,
            welcome_due: false,
            peer_epoch: None,
            peer_may_degrade: state.peer_may_degrade,
            link_down_since: None,
            queue: RecordQueue::default(),
            hello_seen: false,
            record_persist: None,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            apply_blocked: None,
            verifying: None,
            save_aside: false,
            saved: BTreeSet::new(),
            // Inconsistent at start: only a resync can vouch for the image again. The welcome
            // says so, and the primary starts one.
            resyncing: !state.consistent || state.amnesiac,
            resync_end: None,
            sync_inflight: None,
            applied_persist: None,
            promoting: false,
            persists: BTreeMap::new(),
            next_token: 1,
            actions: VecDeque::new(),
            stats: SecondaryStats::default(),
        };
        // Started without a primary that may degrade, for an unknown time: it may already be
        // writing outside the record.
        s.lose_authority();
        if state.apply_high_water > state.applied {
            // Media may hold writes past the stored position: replaying them from there passes
            // through states that never existed, so the image is not a prefix until caught up,
            // whatever else (a resync) must also finish first.
            s.catch_up_to = Some(state.apply_high_water);
            if s.consistent {
                s.consistent = false;
                s.persist(PersistKind::CatchUp, vec![StoreWrite::Meta(Meta::Consistent(false))]);
            }
        }
        s.refresh_stats();
        s
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn record(&self) -> &Record {
        &self.record
    }
    pub fn applied(&self) -> Seq {
        self.applied
    }
    pub fn durable_applied(&self) -> Seq {
        self.durable_applied
    }
    pub fn is_consistent(&self) -> bool {
        self.consistent
    }
    pub fn is_authoritative(&self) -> bool {
        self.authoritative
    }
    /// A primary is connected (its hello may still be on the way).
    pub fn is_connected(&self) -> bool {
        self.connected
    }
    pub fn stats(&self) -> &SecondaryStats {
        &self.stats
    }
    pub fn split_brain_evidence(&self) -> bool {
        self.wrote_alone
    }
    /// This store lost state it had acknowledged: nothing it says about its image is trusted
    /// until a full verified resync ends.
    pub fn is_amnesiac(&self) -> bool {
        self.amnesiac
    }
    pub fn store_id(&self) -> StoreId {
        self.store_id
    }
    /// The primary's store this site is paired with, once known.
    pub fn peer_store(&self) -> Option<StoreId> {
        self.peer.store
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The one timer: when a primary that degrades could first write outside the record.
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.link_down_since {
            Some(since) if self.peer_may_degrade && self.authoritative => Some(self.authority_deadline(since)),
            _ => None,
        }
    }

    fn authority_deadline(&self, since: Time) -> Time {
        since + self.cfg.record_update_timeout.saturating_sub(self.cfg.link_loss_detection_skew)
    }

    pub fn handle_timeout(&mut self, now: Time) {
        if let Some(since) = self.link_down_since {
            if now >= self.authority_deadline(since) {
                self.lose_authority();
            }
        }
        self.progress();
    }

    /// Without a connection to a primary that degrades on link loss, nothing guarantees the
    /// record covers every difference: mark it so, durably, before anything else happens.
    fn lose_authority(&mut self) {
        if self.peer_may_degrade && self.authoritative {
            self.authoritative = false;
            self.persist(PersistKind::Authoritative(false), vec![StoreWrite::Meta(Meta::Authoritative(false))]);
        }
    }

    pub fn handle_connected(&mut self, _now: Time) {
        self.connected = true;
        self.welcomed = false;
        self.welcome_due = false;
        self.hello_seen = false;
        self.send(Frame::Hello {
            epoch: self.epoch,
            role: Role::Secondary,
            volume_bytes: self.geo.volume_bytes(),
            extent_bytes: self.geo.extent_bytes(),
            on_link_loss: self.cfg.on_link_loss,
            authoritative: self.authoritative,
            wrote_alone: self.wrote_alone,
            store: self.store_id,
            remembers: self.peer.store.map(|store| Remembered { store, applied: Seq(0), generation: Generation(0) }),
            promoted_from: None,
            owes_full_resync: false,
        });
    }

    pub fn handle_disconnected(&mut self, now: Time) {
        self.connected = false;
        self.welcomed = false;
        self.welcome_due = false;
        self.link_down_since = Some(now);
        if self.cfg.record_update_timeout <= self.cfg.link_loss_detection_skew {
            self.lose_authority();
        }
        // Frames of a dead connection are not answered; the primary resends what matters.
        self.hello_seen = false;
        self.queue.clear();
        self.reorder.clear();
        self.reorder_bytes = 0;
    }

    pub fn handle_frame(&mut self, now: Time, frame: Frame) {
        let _ = now;
        if let Err(e) = frame.validate_for(&self.geo) {
            self.refuse(None, &format!("invalid frame from the primary: {e}"));
            return;
        }
        if matches!(frame, Frame::Hello { .. }) && std::mem::replace(&mut self.hello_seen, true) {
            // One hello per connection: each answer is a whole record snapshot, which a peer
            // must not be able to ask for again and again.
            self.refuse(None, "a second hello on one connection");
            return;
        }
        if let Frame::Hello {
            epoch,
            role,
            volume_bytes,
            extent_bytes,
            on_link_loss,
            authoritative,
            store,
            remembers,
            owes_full_resync,
            ..
        } = frame
        {
            let hello = PeerHello {
                epoch,
                role,
                volume_bytes,
                extent_bytes,
                policy: on_link_loss,
                authoritative,
                store,
                remembers,
                owes_full_resync,
            };
            self.on_hello(hello);
            self.progress();
            return;
        }
        if !self.welcomed || frame.epoch() != self.epoch {
            // Fencing: a frame of another epoch, or before the handshake, is never applied.
            self.refuse(
                Some(Refusal::StaleEpoch),
                &format!("{} frame of epoch {} refused at epoch {}", frame.kind(), frame.epoch().0, self.epoch.0),
            );
            return;
        }
        match frame {
            Frame::RecordUpdate { .. } | Frame::Evict { .. } => {
                if let Err(why) = self.queue.admit(frame, &self.geo) {
                    self.refuse(None, &why);
                    return;
                }
            }
            Frame::Data { seq, apply, .. } => {
                if seq <= self.applied {
                    return; // a retransmission of something already applied
                }
                #[cfg(feature = "mutations")]
                if crate::mutations::apply_out_of_order() {
                    if let Apply::Write(op) = apply {
                        // The deliberate bug: apply in arrival order, not sequence order.
                        self.applied = seq;
                        self.actions.push_back(Action::ApplyWrite { seq, op });
                        self.progress();
                        return;
                    }
                }
                // Counted only once it is held: a refused item must not use up the buffer.
                let bytes = apply.buffered_bytes();
                if self.reorder_bytes + bytes > self.cfg.reorder_buffer_bytes {
                    self.refuse(None, "peer overran the reorder buffer");
                    return;
                }
                self.reorder_bytes += bytes;
                if let Some(old) = self.reorder.insert(seq, apply) {
                    self.reorder_bytes -= old.buffered_bytes();
                }
            }
            // An amnesiac's record becomes authoritative only after its full resync ended (the
            // primary says so only then; an earlier word is not taken).
            Frame::Authoritative { .. } => {
                if !self.authoritative && !self.amnesiac {
                    self.authoritative = true;
                    self.persist(PersistKind::Authoritative(true), vec![StoreWrite::Meta(Meta::Authoritative(true))]);
                }
            }
            Frame::Refused { reason, .. } => {
                self.stats.frames_refused += 1;
                self.actions.push_back(Action::Disconnect { reason: format!("peer refused: {reason:?}") });
            }
            other => {
                self.refuse(None, &format!("unexpected {} frame at the secondary", other.kind()));
                return;
            }
        }
        self.progress();
    }

    pub fn handle_persisted(&mut self, _now: Time, token: Token) {
        let Some(kind) = self.persists.remove(&token) else {
            return;
        };
        match kind {
            PersistKind::Record => {
                if let Some((t, work, answers)) = self.record_persist.take() {
                    debug_assert_eq!(t, token);
                    self.record = work;
                    if self.connected && self.welcomed {
                        for a in answers {
                            self.send(a);
                        }
                    }
                }
            }
            PersistKind::Handshake => self.welcome_due = true,
            PersistKind::ResyncBegin => {
                if self.apply_blocked == Some(token) {
                    self.apply_blocked = None;
                }
            }
            PersistKind::HighWater(seq) => {
                self.high_water = self.high_water.max(seq);
                if self.apply_blocked == Some(token) {
                    self.apply_blocked = None;
                }
            }
            PersistKind::Applied { through, consistent, resynced, full_resynced } => {
                self.applied_persist = None;
                self.durable_applied = self.durable_applied.max(through);
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
                    self.save_aside = false;
                    self.save_aside_on_resync = false;
                    self.saved.clear();
                }
                if self.connected && self.welcomed {
                    self.send(Frame::Applied { epoch: self.epoch, through: self.durable_applied });
                }
            }
            PersistKind::Mismatch { seq, extent, blocks } => {
                self.applied = self.applied.max(seq);
                if self.apply_blocked == Some(token) {
                    self.apply_blocked = None;
                }
                // On the control stream, so before any `Applied` that covers the check.
                if self.connected && self.welcomed {
                    self.send(Frame::Differs { epoch: self.epoch, seq, extent, blocks });
                }
            }
            PersistKind::Authoritative(_) | PersistKind::CatchUp | PersistKind::PeerMemory => {}
            PersistKind::Promote => {
                self.actions.push_back(Action::RoleChanged { role: Role::Primary });
                return;
            }
        }
        self.progress();
    }

    /// This site's content of the extent of a failback check, compared with the primary's
    /// digests: `differing` is the `differing_blocks` bitmap. All equal: the check is
    /// applied. Otherwise the extent becomes divergent (durably, so that it also reaches the
    /// primary, whole, in the next snapshot), the primary is told the blocks, and it copies
    /// them, the extent saved aside here first.
    pub fn handle_verified(&mut self, _now: Time, token: Token, differing: Vec<u8>) {
        let Some((t, seq, extent)) = self.verifying else {
            return;
        };
        if t != token {
            return;
        }
        self.verifying = None;
        self.stats.extents_verified += 1;
        let equal = differing.iter().all(|b| *b == 0);
        #[cfg(feature = "mutations")]
        let equal = equal || crate::mutations::verify_always_equal();
        if equal {
            self.applied = self.applied.max(seq);
            if self.apply_blocked == Some(token) {
                self.apply_blocked = None;
            }
        } else {
            self.stats.extents_mismatched += 1;
            #[cfg(feature = "mutations")]
            let differing = crate::mutations::differs_drops_block(differing);
            self.divergent.insert(extent);
            let p = self.persist(PersistKind::Mismatch { seq, extent, blocks: differing }, vec![StoreWrite::PutDirty(extent)]);
            self.apply_blocked = Some(p);
        }
        self.progress();
    }

    pub fn handle_media_synced(&mut self, _now: Time, token: Token) {
        if let Some((t, through)) = self.sync_inflight {
            if t == token {
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
                let consistent = !self.consistent && (resynced || !self.resyncing) && self.catch_up_to.is_none();
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
                }
                let token = self.persist(PersistKind::Applied { through, consistent, resynced, full_resynced }, batch);
                self.applied_persist = Some(token);
            }
        }
        self.progress();
    }

    /// Makes this site the primary of a new epoch. The failback set starts as the durable
    /// record: it is persisted as the new primary's dirty map in the same batch as the epoch.
    pub fn promote(&mut self, force: bool) -> Result<PromoteReport, PromoteError> {
        if self.promoting {
            return Err(PromoteError::InProgress);
        }
        if self.connected && self.welcomed && self.peer_epoch == Some(self.epoch) && !force {
            return Err(PromoteError::PeerAlive(self.epoch.0));
        }
        if self.amnesiac && !force {
            assert!(!self.authoritative && !self.consistent, "an amnesiac claims nothing about its image");
            return Err(PromoteError::Amnesiac);
        }
        if self.peer.store.is_none() && !force {
            return Err(PromoteError::NeverPaired);
        }
        // Neither an amnesiac nor a store that never paired knows how far its peer's epoch
        // went, nor which extents differ from the peer's image.
        let untrusted = self.amnesiac || self.peer.store.is_none();
        self.promoting = true;
        let new_epoch = if untrusted { Epoch(self.epoch.0.saturating_add(AMNESIAC_EPOCH_JUMP)) } else { self.epoch.next() };
        let mut batch = vec![
            StoreWrite::Meta(Meta::Epoch(new_epoch)),
            StoreWrite::Meta(Meta::Role(Role::Primary)),
            StoreWrite::Meta(Meta::WroteAlone(false)),
            StoreWrite::Meta(Meta::FailbackPending(true)),
            // A request from an earlier fencing to save aside on the next resync: as the
            // primary, this site's image is the one kept, so nothing of it needs saving. Left
            // set, it would outlive this epoch and make a later failback onto this site save
            // aside every extent it overwrites.
            StoreWrite::Meta(Meta::SaveAsideOnResync(false)),
            StoreWrite::Meta(Meta::Peer(self.peer.across_role_change())),
            StoreWrite::Meta(Meta::PromotedFrom(crate::frame::Position {
                applied: self.durable_applied,
                next_generation: self.next_generation,
            })),
        ];
        if untrusted {
            // Promoted by force: nothing tells which extents may differ from the old primary,
            // so its failback (onto whatever peer it meets next) checks the whole volume.
            batch.push(StoreWrite::Meta(Meta::Amnesiac(false)));
            batch.push(StoreWrite::Meta(Meta::FullResyncOwed(true)));
        }
        batch.extend(self.record.iter().map(|(e, _)| StoreWrite::PutDirty(e)));
        batch.push(StoreWrite::ClearRecord);
        let report = PromoteReport {
            new_epoch,
            record_extents: self.record.len() as u64,
            authoritative: self.authoritative,
            consistent: self.consistent,
            amnesiac: untrusted,
            applied: self.applied,
        };
        self.persist(PersistKind::Promote, batch);
        if self.connected {
            self.actions.push_back(Action::Disconnect { reason: format!("promoted to epoch {}", new_epoch.0) });
        }
        Ok(report)
    }

    // ----- internals -----

    fn on_hello(&mut self, hello: PeerHello) {
        let PeerHello { epoch, role, volume_bytes, extent_bytes, policy, authoritative, store, remembers, owes_full_resync } = hello;
        if volume_bytes != self.geo.volume_bytes() || extent_bytes != self.geo.extent_bytes() {
            self.refuse(Some(Refusal::Geometry), "peer volume geometry differs");
            return;
        }
        if role != Role::Primary {
            self.refuse(Some(Refusal::Roles), "both sites are secondaries");
            return;
        }
        if epoch < self.epoch {
            self.refuse(Some(Refusal::StaleEpoch), &format!("primary of stale epoch {} (this site is at {})", epoch.0, self.epoch.0));
            return;
        }
        if self.promoting {
            self.refuse(Some(Refusal::Roles), "this site is being promoted");
            return;
        }
        let mut batch = Vec::new();
        if self.check_identity(epoch, store, remembers, owes_full_resync, &mut batch).is_err() {
            return;
        }
        self.peer_epoch = Some(epoch);
        self.link_down_since = None;
        let degrades = policy == LinkLossPolicy::Degrade;
        if degrades != self.peer_may_degrade {
            self.peer_may_degrade = degrades;
            batch.push(StoreWrite::Meta(Meta::PeerMayDegrade(degrades)));
        }
        if epoch > self.epoch {
            self.epoch = epoch;
            batch.push(StoreWrite::Meta(Meta::Epoch(epoch)));
            // A primary of a newer epoch numbers its writes in a sequence space of its own:
            // what this site applied before counts nothing there. (A fenced or demoted site
            // starts its new epoch so already; a secondary that saw its peer promoted while it
            // was a secondary too, after the primary's store was lost, gets here. Kept, a
            // position above the new primary's numbers would make this site drop its writes
            // as already applied.) Its resync marker bridges the gap.
            if self.applied > Seq(0) || self.high_water > Seq(0) {
                self.applied = Seq(0);
                self.durable_applied = Seq(0);
                self.high_water = Seq(0);
                self.catch_up_to = None;
                batch.push(StoreWrite::Meta(Meta::Applied(Seq(0))));
                batch.push(StoreWrite::Meta(Meta::ApplyHighWater(Seq(0))));
            }
        }
        if !authoritative && self.authoritative {
            self.authoritative = false;
            batch.push(StoreWrite::Meta(Meta::Authoritative(false)));
        }
        self.welcomed = false;
        if batch.is_empty() {
            self.welcome_due = true;
        } else {
            self.persist(PersistKind::Handshake, batch);
        }
    }

    fn progress(&mut self) {
        if self.promoting {
            return;
        }
        self.send_welcome();
        self.persist_record_batch();
        self.apply_ready();
        self.sync_applied();
        self.refresh_stats();
        #[cfg(debug_assertions)]
        if let Err(e) = self.check_invariants() {
            panic!("secondary invariant broken: {e}");
        }
    }

    /// Checks every invariant; the first broken one, described. Run at the end of each
    /// `progress` with debug assertions, and after every event in the simulation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let reordered: u64 = self.reorder.values().map(Apply::buffered_bytes).sum();
        if reordered != self.reorder_bytes {
            return Err(format!("the reorder buffer holds {reordered} bytes but counts {}", self.reorder_bytes));
        }
        if self.reorder_bytes > self.cfg.reorder_buffer_bytes {
            return Err(format!("the reorder buffer holds {} bytes, over its {}", self.reorder_bytes, self.cfg.reorder_buffer_bytes));
        }
        if self.durable_applied > self.applied {
            return Err(format!("durably applied {} past applied {}", self.durable_applied.0, self.applied.0));
        }
        // Generations are handed out in order: the record holds none not yet handed out.
        if let Some((e, g)) = self.record.iter().find(|(_, g)| *g >= self.next_generation) {
            return Err(format!("extent {} is recorded in generation {}, not below the next {}", e.0, g.0, self.next_generation.0));
        }
        if self.amnesiac && self.authoritative {
            return Err("an amnesiac's record is taken as authoritative".into());
        }
        Ok(())
    }

    /// Welcome and snapshot, once nothing record-related is being persisted: a snapshot must
    /// never include an eviction or addition that is not yet durable.
    fn send_welcome(&mut self) {
        if !self.welcome_due || !self.connected || self.record_persist.is_some() {
            return;
        }
        self.welcome_due = false;
        self.welcomed = true;
        self.send(Frame::Welcome {
            epoch: self.epoch,
            applied: self.applied,
            consistent: self.consistent,
            authoritative: self.authoritative,
            store: self.store_id,
            next_generation: self.next_generation,
            amnesiac: self.amnesiac,
        });
        let mut entries: Vec<RecordEntries> = Vec::new();
        for (e, g) in self.record.iter() {
            match entries.last_mut() {
                Some(last) if last.generation == g && last.run.start + last.run.len as u64 == e.0 && last.run.len < u32::MAX => {
                    last.run.len += 1
                }
                _ => entries.push(RecordEntries { run: ExtentRun { start: e.0, len: 1 }, generation: g }),
            }
        }
        for chunk in entries.chunks(MAX_LIST_LEN) {
            self.send(Frame::RecordChunk { epoch: self.epoch, entries: chunk.to_vec() });
        }
        let runs = to_runs(self.divergent.iter().copied());
        for chunk in runs.chunks(MAX_LIST_LEN) {
            self.send(Frame::DivergentChunk { epoch: self.epoch, extents: chunk.to_vec() });
        }
        self.send(Frame::SnapshotEnd { epoch: self.epoch, record_len: self.record.len() as u64 });
    }

    /// Group commit: every queued update and eviction becomes one synced batch.
    fn persist_record_batch(&mut self) {
        if self.record_persist.is_some() || self.queue.is_empty() || !self.welcomed {
            return;
        }
        let mut work = self.record.clone();
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        let evict = |work: &mut Record,
                     predictor: &mut Predictor,
                     batch: &mut Vec<StoreWrite>,
                     stats: &mut SecondaryStats,
                     evictions: &[Eviction]| {
            for ev in evictions {
                for e in from_runs(&ev.extents) {
                    if work.remove_if_not_younger(e, ev.generation) {
                        batch.push(StoreWrite::DelRecord(e));
                        predictor.note_evicted(e, ev.generation);
                        stats.extents_evicted += 1;
                    }
                }
            }
        };
        for q in self.queue.take() {
            match q {
                Queued::Evict(evictions) => evict(&mut work, &mut self.predictor, &mut batch, &mut self.stats, &evictions),
                Queued::Update { id, missed, hints, room, evictions } => {
                    // Evictions first: a piggybacked eviction and a re-add of the same extent
                    // in one frame must leave the extent recorded.
                    evict(&mut work, &mut self.predictor, &mut batch, &mut self.stats, &evictions);
                    let g = self.next_generation;
                    self.next_generation = Generation(g.0 + 1);
                    let predicted = self.predictor.predict(&missed, &hints, room, &work);
                    let mut added: BTreeSet<ExtentId> = missed.iter().copied().collect();
                    self.stats.extents_predicted += predicted.len() as u64;
                    added.extend(predicted);
                    for e in &added {
                        work.insert(*e, g);
                        batch.push(StoreWrite::PutRecord(*e, g));
                    }
                    self.stats.extents_added += added.len() as u64;
                    self.stats.record_updates += 1;
                    answers.push(Frame::RecordAnswer { epoch: self.epoch, id, generation: g, added: to_runs(added) });
                }
            }
        }
        batch.push(StoreWrite::Meta(Meta::NextGeneration(self.next_generation)));
        let token = self.persist(PersistKind::Record, batch);
        #[cfg(feature = "mutations")]
        if crate::mutations::ack_before_durable() {
            self.record = work.clone();
            for a in answers.drain(..) {
                self.send(a);
            }
        }
        self.record_persist = Some((token, work, answers));
    }

    fn apply_ready(&mut self) {
        while self.apply_blocked.is_none() {
            let next = self.applied.next();
            let seq = match self.reorder.keys().next().copied() {
                Some(s) if s == next => s,
                Some(s) if matches!(self.reorder.get(&s), Some(Apply::ResyncBegin { skip: true, .. })) => s,
                _ => break,
            };
            if seq > self.high_water {
                // Write ahead the bound on what media may hold: everything contiguous now.
                let mut target = seq;
                while self.reorder.contains_key(&target.next()) {
                    target = target.next();
                }
                let token = self.persist(PersistKind::HighWater(target), vec![StoreWrite::Meta(Meta::ApplyHighWater(target))]);
                self.apply_blocked = Some(token);
                break;
            }
            let item = self.reorder.remove(&seq).expect("present");
            self.reorder_bytes -= item.buffered_bytes();
            if seq != next {
                // A resync marker that bridges an abandoned buffer: what waits below it will
                // never apply (the resync copies those extents), so it leaves the buffer.
                let keep = self.reorder.split_off(&seq);
                for (_, stale) in std::mem::replace(&mut self.reorder, keep) {
                    self.reorder_bytes -= stale.buffered_bytes();
                }
            }
            if let Apply::Verify { extent, digests } = item {
                // Applied only once this site's content is read and compared, and a difference
                // is durable: nothing after it applies meanwhile.
                let token = self.token();
                self.verifying = Some((token, seq, extent));
                self.apply_blocked = Some(token);
                self.actions.push_back(Action::VerifyExtent { token, extent, digests });
                break;
            }
            self.applied = self.applied.max(seq);
            match item {
                Apply::Write(op) => {
                    if self.must_save_aside() {
                        for e in self.geo.extents_of(op.offset, op.len) {
                            if self.saved.insert(ExtentId(e)) {
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
                    self.save_aside |= save_aside;
                    self.resync_end = None;
                    self.resyncing = true;
                    self.resync_full = full;
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
                        self.apply_blocked = Some(token);
                    }
                }
                Apply::ResyncEnd => self.resync_end = Some(seq),
                Apply::Verify { .. } => unreachable!("handled above"),
            }
        }
    }

    /// Media sync, then a synced store of the position, then the return message.
    fn sync_applied(&mut self) {
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
    fn must_save_aside(&self) -> bool {
        self.save_aside || self.wrote_alone || self.save_aside_on_resync || (!self.divergent.is_empty() && !self.amnesiac)
    }

    fn refuse(&mut self, reason: Option<Refusal>, text: &str) {
        self.stats.frames_refused += 1;
        if let Some(reason) = reason {
            self.send(Frame::Refused { epoch: self.epoch, reason });
        }
        self.actions.push_back(Action::Disconnect { reason: text.to_string() });
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn persist(&mut self, kind: PersistKind, batch: Vec<StoreWrite>) -> Token {
        let token = self.token();
        self.persists.insert(token, kind);
        self.actions.push_back(Action::Persist { token, batch });
        token
    }

    fn send(&mut self, frame: Frame) {
        self.actions.push_back(Action::Send { stream: Stream::Control, frame });
    }

    fn refresh_stats(&mut self) {
        self.stats.record_len = self.record.len() as u64;
        self.stats.generations = self.record.generation_count() as u64;
        self.stats.applied_seq = self.applied.0;
        self.stats.durable_applied_seq = self.durable_applied.0;
        self.stats.reorder_bytes = self.reorder_bytes;
    }
}

/// A primary's hello, as `on_hello` reads it.
struct PeerHello {
    epoch: Epoch,
    role: Role,
    volume_bytes: u64,
    extent_bytes: u64,
    policy: LinkLossPolicy,
    authoritative: bool,
    store: StoreId,
    remembers: Option<Remembered>,
    owes_full_resync: bool,
}
