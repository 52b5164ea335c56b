//! The secondary site's state machine: its fields, the dispatch of its inputs, and the
//! store writes that finish what the handshake, ordered apply and promotion began.
//!
//! Owns: the `Secondary`, its read-only views, the authority timer, the dispatch of frames
//! and store completions to the rooms beside it, `progress`, and the helpers every room
//! uses (tokens, persists, sends, refusals). The rooms: `handshake.rs` (hello, welcome,
//! snapshot, epoch adoption), `record_batch.rs` (the durable record, prediction on record
//! updates, evictions, answers), `apply.rs` (ordered apply through the bounded reorder
//! buffer, checks by digest, save-aside, return messages), `promotion.rs`, `identity.rs`,
//! `queue.rs` and `invariants.rs`.
//!
//! Must not: perform I/O or read a clock.
//!
//! Ordering rules enforced here and in the rooms:
//! - A record answer leaves only after the synced store of exactly the extents it names.
//! - Data reaches media strictly in sequence order; a gap is bridged only by a `ResyncBegin`
//!   marker that says so, after "inconsistent" is durable.
//! - "Applied through S" leaves only after a media sync covering S and a synced store of S.

use crate::action::Action;
use crate::config::CoreConfig;
use crate::frame::{Frame, Refusal, Role, Stream};
use crate::geometry::Geometry;
use crate::ids::{Epoch, ExtentId, Generation, Seq, StoreId, Token};
use crate::predict::Predictor;
use crate::record::Record;
use crate::stats::SecondaryStats;
use crate::store::{Meta, PeerMemory, SiteState, StoreWrite, SyncCursor};
use crate::time::Time;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod apply;
mod handshake;
mod identity;
mod invariants;
mod promotion;
mod queue;
mod record_batch;

pub use promotion::{PromoteError, PromoteReport, AMNESIAC_EPOCH_JUMP};
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
        /// A full resync's sync cursor made durable with this position.
        cursor: Option<SyncCursor>,
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

#[derive(Clone)]
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
    /// A check found an extent different here and no resync has ended since: the image is
    /// not the primary's (checked by `check_invariants` against `consistent`).
    mismatch_open: bool,
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
    /// Durable: how far the full resync of which primary has synced this image (see
    /// `Meta::SyncCursor`), and the last sync mark applied and not yet durable (its
    /// sequence number and cursor).
    sync_cursor: Option<SyncCursor>,
    pending_mark: Option<(Seq, u64)>,
    /// Why this store was last found an amnesiac at a handshake (for status and logs).
    last_amnesia: Option<String>,
    /// The connection to the primary, as the handshake left it (`handshake.rs`).
    conn: handshake::Conn,
    /// Durable: the primary degrades on link loss, so losing it for long makes the record
    /// non-authoritative (the primary may then be writing outside the record).
    peer_may_degrade: bool,
    /// Record frames waiting for the next record batch, and the batch being persisted
    /// (`record_batch.rs`).
    records: record_batch::RecordBatches,
    /// The reorder buffer, what blocks applying, and save-aside (`apply.rs`).
    ordered: apply::OrderedApply,
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
            mismatch_open: false,
            save_aside_on_resync: state.save_aside_on_resync,
            store_id: state.store_id,
            peer: state.peer,
            amnesiac: state.amnesiac,
            resync_full: false,
            sync_cursor: state.sync_cursor,
            pending_mark: None,
            last_amnesia: None,
            conn: handshake::Conn::default(),
            peer_may_degrade: state.peer_may_degrade,
            records: record_batch::RecordBatches::default(),
            ordered: apply::OrderedApply::default(),
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
        self.conn.connected
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

    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The one timer: when a primary that degrades could first write outside the record.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.conn.link_down_since {
            Some(since) if self.peer_may_degrade && self.authoritative => Some(self.authority_deadline(since)),
            _ => None,
        }
    }

    fn authority_deadline(&self, since: Time) -> Time {
        since + self.cfg.record_update_timeout.saturating_sub(self.cfg.link_loss_detection_skew)
    }

    pub fn handle_timeout(&mut self, now: Time) {
        if let Some(since) = self.conn.link_down_since {
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

    pub fn handle_frame(&mut self, now: Time, frame: Frame) {
        let _ = now;
        if let Err(e) = frame.validate_for(&self.geo) {
            self.refuse(None, &format!("invalid frame from the primary: {e}"));
            return;
        }
        if matches!(frame, Frame::Hello { .. }) && std::mem::replace(&mut self.conn.hello_seen, true) {
            // One hello per connection: each answer is a whole record snapshot, which a peer
            // must not be able to ask for again and again.
            self.refuse(None, "a second hello on one connection");
            return;
        }
        if let Some(hello) = handshake::PeerHello::of(&frame) {
            self.on_hello(hello);
            self.progress();
            return;
        }
        if !self.conn.welcomed || frame.epoch() != self.epoch {
            // Fencing: a frame of another epoch, or before the handshake, is never applied.
            self.refuse(
                Some(Refusal::StaleEpoch),
                &format!("{} frame of epoch {} refused at epoch {}", frame.kind(), frame.epoch().0, self.epoch.0),
            );
            return;
        }
        match frame {
            Frame::RecordUpdate { .. } | Frame::Evict { .. } => {
                if let Err(why) = self.records.queue.admit(frame, &self.geo) {
                    self.refuse(None, &why);
                    return;
                }
            }
            Frame::Data { seq, apply, .. } => {
                if !self.receive_data(seq, apply) {
                    return;
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
            PersistKind::Record => self.record_batch_persisted(token),
            PersistKind::Handshake => self.conn.welcome_due = true,
            PersistKind::ResyncBegin => {
                if self.ordered.blocked == Some(token) {
                    self.ordered.blocked = None;
                }
            }
            PersistKind::HighWater(seq) => {
                self.high_water = self.high_water.max(seq);
                if self.ordered.blocked == Some(token) {
                    self.ordered.blocked = None;
                }
            }
            PersistKind::Applied { through, consistent, resynced, full_resynced, cursor } => {
                self.applied_persisted(through, consistent, resynced, full_resynced, cursor)
            }
            PersistKind::Mismatch { seq, extent, blocks } => {
                self.applied = self.applied.max(seq);
                if self.ordered.blocked == Some(token) {
                    self.ordered.blocked = None;
                }
                // On the control stream, so before any `Applied` that covers the check.
                if self.conn.connected && self.conn.welcomed {
                    self.send(Frame::Differs { epoch: self.epoch, seq, extent, blocks });
                }
            }
            PersistKind::Authoritative(_) | PersistKind::CatchUp | PersistKind::PeerMemory => {}
            PersistKind::Promote => {
                debug_assert!(self.promoting, "only a promotion persists one");
                self.actions.push_back(Action::RoleChanged { role: Role::Primary });
                return;
            }
        }
        self.progress();
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
        self.stats.reorder_bytes = self.ordered.reorder_bytes;
    }
}
