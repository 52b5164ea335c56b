//! The primary site's state machine: the write path (docs/protocol.md).
//!
//! Owns: sequence numbers, hit/miss classification against the record copy, batching of
//! record updates, the gate that holds a write until its extents are covered, shipping by
//! sequence, the retransmit buffer, cleanliness from return messages, eviction of whole clean
//! generations, the local dirty map (degrade, async, sync, and a promoted site's failback set),
//! resync, flushes, link-loss policy and fencing.
//!
//! Must not: perform I/O or read a clock. Every effect leaves as an `Action`; every outcome
//! comes back through a `handle_*` call.
//!
//! The rule that keeps invariant R: a write reaches local media (`LocalWrite`) only once each
//! extent it touches is *covered*: in the record copy (so in the secondary's durable record,
//! because the copy only grows from record answers, which the secondary sends after its synced
//! store) or in the durable local dirty map. Coverage is withdrawn only from clean extents.

use crate::action::{Action, HostError, WritePath};
use crate::config::{CoreConfig, FlushPolicy, LagPolicy, Mode};
use crate::digest::{block_digests, block_set, check_blocks, CHECK_BLOCK};
use crate::frame::{Apply, Eviction, Frame, LinkLossPolicy, Role, Stream, StreamHint, MAX_LIST_LEN};
use crate::geometry::Geometry;
use crate::ids::{Epoch, ExtentId, Generation, RequestId, Seq, Token};
use crate::op::WriteOp;
use crate::predict::StreamDetector;
use crate::record::{from_runs, runs_len, to_runs, Record};
use crate::stats::PrimaryStats;
use crate::store::{Meta, SiteState, StoreWrite};
use crate::time::Time;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::Duration;

mod dirty;
mod handshake;
mod identity;
mod invariants;
mod misses;
mod resync;
mod shipping;
mod timers;
mod verify;

pub use identity::ApproveRefused;
pub use verify::{VerifyRefused, VerifyRequest, VerifyStatus, VerifyWait};

use shipping::{item_bytes, UnappliedGroup};

/// Largest resync chunk; an extent larger than this is copied in several data items.
const RESYNC_CHUNK_BYTES: u64 = 4 << 20;
/// Generations examined per eviction pass, to bound the work of one call.
const EVICTION_SCAN_GENERATIONS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Persisting the new incarnation (and, after a promotion, the new epoch). Writes wait.
    Starting,
    Serving,
    /// New writes wait so that a switchover can find both sides equal.
    Draining,
    /// A newer epoch exists: every write fails. The site is persisting its demotion.
    Fenced,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Down,
    /// Hello sent, waiting for the secondary's welcome and record snapshot.
    Handshake,
    /// Both sides wrote under different epochs. Nothing is shipped until an operator resolves.
    SplitBrainHold,
    Up,
}

/// A host write that is not yet on local media.
#[derive(Clone, Debug)]
struct Waiting {
    request: RequestId,
    op: WriteOp,
    fua: bool,
    arrived: Time,
    extents: Range<u64>,
    hint: Option<StreamHint>,
    counted_miss: bool,
    /// Degrade mode: its missing extents were handed to the local dirty map.
    degraded: bool,
    /// Held at least once by the lag limit (counted once in the stats).
    throttled: bool,
}

/// A host write on its way to local media, not yet acknowledged.
#[derive(Clone, Debug)]
struct Dispatched {
    request: RequestId,
    path: WritePath,
    extents: Range<u64>,
    local_done: bool,
    fua: bool,
    at: Time,
}

#[derive(Clone, Debug)]
struct Update {
    missed: Vec<ExtentId>,
    reserved: u64,
    sent_at: Time,
}

#[derive(Clone, Debug)]
struct Flush {
    request: RequestId,
    /// Everything dispatched before the flush.
    through: Seq,
    arrived: Time,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PersistKind {
    Start,
    Dirty,
    Undirty,
    WroteAlone(bool),
    FailbackDone,
    Demote,
    /// What this site remembers of its peer's store (see `identity.rs`), with the
    /// generation it holds.
    PeerMemory(Generation),
    /// The peer's store was found an amnesiac: the full resync it is owed is durable.
    FullResyncOwed,
    /// The full resync numbered so (`full_resyncs_owed`) ended on the peer, durably.
    FullResyncDone(u64),
    /// An operator approved the full sync onto a replaced peer store.
    RebuildApproved,
}

/// What a failback (or any resync) would copy, for dry runs and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailbackPlan {
    pub extents: Vec<ExtentId>,
    pub bytes: u64,
    /// Bytes already shipped but not yet durably applied by the peer.
    pub lag_bytes: u64,
}

pub struct Primary {
    cfg: CoreConfig,
    geo: Geometry,
    epoch: Epoch,
    phase: Phase,
    incarnation: u64,
    /// The record copy and the misses that ask the secondary to grow it (`misses.rs`).
    rec: misses::RecordCopy,
    /// The durable local dirty map and the per-extent dirtiness of writes in flight (`dirty.rs`).
    dirty: dirty::DirtyMap,
    /// Resyncs and failback (`resync.rs`).
    resync: resync::Resync,
    /// Online verify (`verify.rs`).
    verify: verify::Verify,
    /// The connection to the peer as the handshake left it (`handshake.rs`).
    conn: handshake::Conn,
    /// Local writes not yet reported done, per extent (resync reads wait for them).
    local_busy: BTreeMap<ExtentId, u32>,
    waiting: BTreeMap<u64, Waiting>,
    next_arrival: u64,
    next_seq: Seq,
    dispatched: BTreeMap<Seq, Dispatched>,
    tokens: BTreeMap<Token, Seq>,
    /// Dispatched items not yet durably applied by the peer: the retransmit buffer.
    buffer: BTreeMap<Seq, Apply>,
    buffer_bytes: u64,
    /// Buffered items that belong to a resync: they ship on the resync stream.
    resync_seqs: BTreeSet<Seq>,
    /// When the host writes the peer has not yet applied were dispatched, oldest first, in
    /// groups: the replication lag in seconds (the RPO) is the age of the first group.
    unapplied: VecDeque<UnappliedGroup>,
    ship_next: Seq,
    /// Bytes of the buffer below `ship_next`: sent and not yet applied (the data window).
    shipped_bytes: u64,
    applied_ack: Seq,
    local_synced: Seq,
    sync_inflight: Option<(Token, Seq)>,
    last_sync: Time,
    /// The latest time any handler was given: `poll_timeout` names only later instants.
    last_now: Time,
    flushes: Vec<Flush>,
    wrote_alone: bool,
    wrote_alone_persisting: bool,
    /// Highest sequence dispatched when the link last came up; once applied, the peer has
    /// everything this site wrote alone.
    up_seq: Seq,
    persists: BTreeMap<Token, (PersistKind, Vec<ExtentId>)>,
    next_token: u64,
    actions: VecDeque<Action>,
    stats: PrimaryStats,
    /// Store identity: this site's, the peer's as remembered, and the full resync an
    /// amnesiac peer is owed (see `identity.rs`).
    ident: identity::Identity,
    /// The instants the deadlines of waiting writes, flushes and dispatched writes count
    /// from, mirrored from those maps (`timers.rs`).
    timers: timers::Timers,
}

impl Primary {
    /// Builds the primary from its persisted state: at first start, after a restart, or after
    /// a promotion (when the state holds the new epoch and the failback set as dirty extents).
    /// It persists a new incarnation before it accepts any write.
    pub fn new(cfg: CoreConfig, geo: Geometry, state: &SiteState, now: Time) -> Primary {
        let incarnation = state.incarnation.max(state.applied.0 >> 40) + 1;
        let first_seq = Seq(incarnation << 40);
        let mut p = Primary {
            rec: misses::RecordCopy::new(&cfg, &geo),
            dirty: dirty::DirtyMap::new(state, now),
            resync: resync::Resync::new(state),
            verify: verify::Verify::default(),
            conn: handshake::Conn::new(now),
            cfg,
            geo,
            epoch: state.epoch,
            phase: Phase::Starting,
            incarnation,
            local_busy: BTreeMap::new(),
            waiting: BTreeMap::new(),
            next_arrival: 0,
            next_seq: first_seq.next(),
            dispatched: BTreeMap::new(),
            tokens: BTreeMap::new(),
            buffer: BTreeMap::new(),
            buffer_bytes: 0,
            resync_seqs: BTreeSet::new(),
            unapplied: VecDeque::new(),
            ship_next: first_seq.next(),
            shipped_bytes: 0,
            applied_ack: first_seq,
            local_synced: first_seq,
            sync_inflight: None,
            last_sync: now,
            last_now: now,
            flushes: Vec::new(),
            wrote_alone: state.wrote_alone,
            wrote_alone_persisting: false,
            up_seq: first_seq,
            persists: BTreeMap::new(),
            next_token: 1,
            actions: VecDeque::new(),
            stats: PrimaryStats::default(),
            ident: identity::Identity::new(state, now),
            timers: timers::Timers::default(),
        };
        p.persist(PersistKind::Start, Vec::new(), vec![StoreWrite::Meta(Meta::Incarnation(incarnation))]);
        p.refresh_stats();
        p
    }

    // ----- read-only views -----

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// This start's number; sequence numbers of this incarnation begin at `incarnation << 40`.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn link(&self) -> LinkState {
        self.conn.link
    }
    pub fn stats(&self) -> &PrimaryStats {
        &self.stats
    }
    pub fn record_copy(&self) -> &Record {
        &self.rec.copy
    }
    pub fn local_dirty(&self) -> &BTreeSet<ExtentId> {
        &self.dirty.local
    }
    pub fn split_brain(&self) -> bool {
        self.conn.link == LinkState::SplitBrainHold
    }
    pub fn resync_in_progress(&self) -> bool {
        self.resync.running || !self.resync.needs_copy.is_empty()
    }
    pub fn applied_ack(&self) -> Seq {
        self.applied_ack
    }
    pub fn last_dispatched(&self) -> Seq {
        Seq(self.next_seq.0 - 1)
    }

    /// True when nothing is waiting, in flight or unapplied: both sides hold the same data.
    pub fn is_drained(&self) -> bool {
        self.waiting.is_empty()
            && self.dispatched.is_empty()
            && self.buffer.is_empty()
            && self.resync.needs_copy.is_empty()
            && self.resync.reading.is_empty()
            && self.verify.run.as_ref().is_none_or(|r| r.reading.is_empty())
            && !self.ident.full_resync_owed
            && self.conn.link == LinkState::Up
    }

    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ----- host requests -----

    pub fn handle_host_write(&mut self, now: Time, request: RequestId, op: WriteOp, fua: bool) {
        if self.geo.check_range(op.offset, op.len).is_err() || !op.is_well_formed() {
            self.ack(request, Err(HostError::OutOfRange));
            return;
        }
        if self.phase == Phase::Fenced {
            self.ack(request, Err(HostError::Fenced));
            return;
        }
        if self.phase == Phase::Draining {
            // A switchover is under way: writes already accepted finish, new ones are refused
            // so that both sides can be found equal. The host retries on the new primary.
            self.ack(request, Err(HostError::NotServing));
            return;
        }
        self.stats.writes += 1;
        let extents = self.geo.extents_of(op.offset, op.len);
        let mut obs = self.rec.detector.observe(now, op.offset..op.offset + op.len, extents.clone());
        if let Some(h) = &mut obs.hint {
            // A miss on a stream asks for what the stream needs, not a fixed window.
            h.want = self.lookahead(obs.stream);
        }
        self.consider_pre_extension(obs.stream);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.insert_waiting(
            arrival,
            Waiting { request, op, fua, arrived: now, extents, hint: obs.hint, counted_miss: false, degraded: false, throttled: false },
        );
        self.progress(now);
    }

    pub fn handle_host_flush(&mut self, now: Time, request: RequestId) {
        if self.phase == Phase::Fenced {
            self.ack(request, Err(HostError::Fenced));
            return;
        }
        self.push_flush(Flush { request, through: self.last_dispatched(), arrived: now });
        self.request_sync(now);
        self.progress(now);
    }

    // ----- media and store reports -----

    pub fn handle_local_write_done(&mut self, now: Time, token: Token, ok: bool) {
        let Some(seq) = self.tokens.remove(&token) else {
            return;
        };
        if let Some(d) = self.dispatched.get_mut(&seq) {
            debug_assert!(!d.local_done, "a local write is reported done once");
            d.local_done = true;
            let extents = d.extents.clone();
            for e in extents {
                if let Some(n) = self.local_busy.get_mut(&ExtentId(e)) {
                    *n -= 1;
                    if *n == 0 {
                        self.local_busy.remove(&ExtentId(e));
                    }
                }
            }
            if !ok {
                // The media's content is now unknown: the extents are copied again by a resync
                // before they can be clean, and the host is told its write failed.
                let d = self.remove_dispatched(seq).expect("present");
                self.resync.needs_copy.extend(d.extents.clone().map(ExtentId));
                self.stats.failed_writes += 1;
                self.ack_write(d.request, Err(HostError::Media), d.path);
            }
        }
        self.progress(now);
    }

    pub fn handle_media_synced(&mut self, now: Time, token: Token) {
        if let Some((t, through)) = self.sync_inflight {
            if t == token {
                debug_assert!(through <= self.last_dispatched(), "a sync covers only what was dispatched");
                self.sync_inflight = None;
                self.local_synced = self.local_synced.max(through);
                self.clean_dirty();
            }
        }
        self.progress(now);
    }

    pub fn handle_persisted(&mut self, now: Time, token: Token) {
        let Some((kind, extents)) = self.persists.remove(&token) else {
            return;
        };
        match kind {
            PersistKind::Start => {
                if self.phase == Phase::Starting {
                    self.phase = Phase::Serving;
                }
            }
            PersistKind::Dirty => {
                for e in extents {
                    self.dirty.persisting.remove(&e);
                    self.dirty.local.insert(e);
                }
                self.dirty.behind_since.get_or_insert(now);
            }
            PersistKind::Undirty => {}
            PersistKind::WroteAlone(v) => {
                self.wrote_alone = v;
                self.wrote_alone_persisting = false;
            }
            PersistKind::FailbackDone => self.resync.failback_pending = false,
            PersistKind::PeerMemory(g) => {
                self.ident.memory_persisted(g);
                // Only writes resting on a newer record answer wait for it (`dispatch_ready`);
                // otherwise the write path runs on as if nothing happened.
                if self.waiting.is_empty() {
                    return;
                }
            }
            PersistKind::FullResyncOwed => self.ident.memory_persisted(Generation(0)),
            PersistKind::FullResyncDone(n) => self.ident.full_resync_done(n, &mut self.stats),
            PersistKind::RebuildApproved => {}
            PersistKind::Demote => {
                self.actions.push_back(Action::RoleChanged { role: Role::Secondary });
                return;
            }
        }
        self.progress(now);
    }

    // ----- the link -----

    pub fn handle_frame(&mut self, now: Time, frame: Frame) {
        if let Err(e) = frame.validate_for(&self.geo) {
            self.refuse(&format!("invalid frame from the secondary: {e}"));
            return;
        }
        if let Frame::RecordChunk { entries, .. } = &frame {
            if self.snapshot_too_long(entries.iter().map(|e| e.run.len as u64).sum()) {
                return;
            }
        }
        if let Frame::DivergentChunk { extents, .. } = &frame {
            if self.snapshot_too_long(runs_len(extents)) {
                return;
            }
        }
        if let Frame::Hello { epoch, role, volume_bytes, extent_bytes, wrote_alone, store, remembers, promoted_from, .. } = frame {
            self.ident.hello_store = Some(store);
            if epoch > self.epoch && self.check_newer_primary(epoch, store, promoted_from).is_err() {
                return;
            }
            self.on_hello(now, epoch, role, volume_bytes, extent_bytes, wrote_alone);
            if role == Role::Secondary && epoch == self.epoch {
                self.check_secondary_hello(store, remembers);
            }
            return;
        }
        if frame.epoch() != self.epoch {
            self.stats.frames_refused += 1;
            if frame.epoch() > self.epoch {
                self.fence(frame.epoch());
            }
            return;
        }
        match frame {
            Frame::Welcome { applied, authoritative, consistent, store, next_generation, amnesiac, sync_cursor, .. }
                if self.conn.link == LinkState::Handshake =>
            {
                if std::mem::replace(&mut self.conn.welcomed, true) {
                    // The copy is rebuilt from one welcome's snapshot: a second one would clear
                    // it under writes already dispatched on the first.
                    self.refuse("a second welcome on one connection");
                    return;
                }
                let welcome = identity::Welcome { applied, store, next_generation, amnesiac, sync_cursor };
                if self.check_welcome(welcome).is_err() {
                    return;
                }
                self.conn.peer_applied_at_welcome = applied;
                self.conn.welcome_seq = self.next_seq;
                // An amnesiac's word on its record is not taken.
                self.conn.peer_authoritative = authoritative && !self.ident.full_resync_owed;
                self.conn.peer_consistent = consistent;
                // The copy becomes exactly the peer's durable record: whatever this site had
                // that the peer no longer holds must not stay covered. Extents pending eviction
                // or answered on the lost connection come back with the snapshot.
                self.rec.copy.clear();
                self.rec.generation_added.clear();
                self.rec.predicted.clear();
            }
            Frame::RecordChunk { entries, .. } if self.conn.link == LinkState::Handshake => {
                for en in entries {
                    for e in from_runs(std::slice::from_ref(&en.run)) {
                        self.rec.copy.insert(e, en.generation);
                    }
                    // The peer holds this generation now: writes may rest on it, so it is
                    // remembered like an answer's (`remembered_durably`).
                    self.ident.peer.generation = self.ident.peer.generation.max(en.generation);
                    self.rec.generation_added.entry(en.generation).or_insert(now);
                }
            }
            // A check's difference: the extent is copied (saved aside on the peer first), just
            // the blocks named when the check belongs to the running resync, else whole.
            // (`validate_for` checked that the extent is in the volume and the bitmap its size.)
            Frame::Differs { seq, extent, blocks, .. } if matches!(self.conn.link, LinkState::Handshake | LinkState::Up) => {
                if self.verify_differs(seq, extent, &blocks) {
                    self.progress(now);
                    return;
                }
                self.stats.resync_extents_mismatched += 1;
                // An amnesiac's stale extent is copied, not saved aside (the full resync's
                // `save_aside` says whether the peer may hold writes of its own).
                self.conn.peer_save_aside |= !self.ident.full_resync_owed;
                self.resync.needs_copy.insert(extent);
                if seq > self.resync.begin && self.resync.running {
                    let mask = self.resync.copy_blocks.entry(extent).or_insert_with(|| vec![0; blocks.len()]);
                    for (m, b) in mask.iter_mut().zip(&blocks) {
                        *m |= b;
                    }
                } else {
                    self.resync.copy_blocks.remove(&extent);
                }
                self.add_local_dirty(vec![extent]);
            }
            // What a demoted peer may hold of its own (in the snapshot; a failback check's
            // differences come again this way after a reconnect). Checked by a failback like
            // the rest of its set, or copied whole by another resync; saved aside on the peer
            // before any overwrite, and in the dirty map until then.
            Frame::DivergentChunk { extents, .. } if matches!(self.conn.link, LinkState::Handshake | LinkState::Up) => {
                let list: Vec<ExtentId> = from_runs(&extents).collect();
                if !list.is_empty() {
                    self.conn.peer_save_aside |= !self.ident.full_resync_owed;
                    self.resync.needs_copy.extend(list.iter().copied());
                    self.add_local_dirty(list);
                }
            }
            Frame::SnapshotEnd { .. } if self.conn.link == LinkState::Handshake => self.on_snapshot_end(now),
            Frame::RecordAnswer { id, generation, added, .. } => self.on_answer(now, id, generation, &added),
            Frame::Applied { through, .. } => self.on_applied(through),
            Frame::Refused { reason: crate::frame::Refusal::UnknownStore, .. } => {
                self.step_down_amnesiac(
                    "the peer does not know this site's store (it paired with another): this site's state was lost or \
                     replaced, so it stops serving until an operator promotes one site"
                        .into(),
                );
                return;
            }
            Frame::Refused { reason, .. } => {
                self.stats.frames_refused += 1;
                self.actions.push_back(Action::Disconnect { reason: format!("peer refused: {reason:?}") });
            }
            other => {
                self.stats.frames_refused += 1;
                self.refuse(&format!("unexpected {} frame at the primary", other.kind()));
            }
        }
        self.progress(now);
    }

    // ----- internals: the write path -----

    /// Runs everything that may have become possible. Called at the end of every handler.
    fn progress(&mut self, now: Time) {
        self.last_now = self.last_now.max(now);
        if self.phase == Phase::Fenced {
            return;
        }
        self.maybe_lag_resync();
        self.dispatch_ready(now);
        self.cover_misses();
        self.evict(now);
        self.send_record_update(now);
        self.drive_resync();
        self.drive_verify();
        self.ship();
        self.finish_writes(now);
        self.finish_flushes();
        self.undirty();
        self.maybe_clear_wrote_alone();
        self.maybe_end_failback();
        self.maybe_authoritative();
        self.maybe_persist_peer_memory(now);
        self.refresh_stats();
        #[cfg(debug_assertions)]
        if let Err(e) = self.check_invariants() {
            panic!("primary invariant broken: {e}");
        }
    }

    /// An extent is covered when a write to it may reach local media without breaking
    /// invariant R: it is in the record copy (so in the durable record) or in the durable
    /// local dirty map.
    fn covers(&self, e: ExtentId) -> bool {
        self.cfg.mode == Mode::Standalone
            || self.dirty.local.contains(&e)
            || (self.cfg.mode == Mode::Predictive && self.rec.copy.contains(e))
    }

    fn covered(&self, extents: &Range<u64>) -> bool {
        extents.clone().all(|e| self.covers(ExtentId(e)))
    }

    fn dispatch_ready(&mut self, now: Time) {
        if !matches!(self.phase, Phase::Serving | Phase::Draining) {
            return;
        }
        let link_up = self.conn.link == LinkState::Up;
        let keys: Vec<u64> = self.waiting.keys().copied().collect();
        for k in keys {
            let w = &self.waiting[&k];
            if !self.covered(&w.extents) {
                continue;
            }
            if w.extents.clone().any(|e| self.being_read(e)) {
                continue;
            }
            if !self.remembered_durably(&w.extents) {
                if !self.ident.persisting {
                    self.persist_memory_now();
                }
                continue;
            }
            if self.buffer_bytes >= self.cfg.max_lag_bytes {
                // Throttle: only reached under LagPolicy::Throttle (Resync drops the buffer).
                // This write and every later one wait; each is counted once.
                for w in self.waiting.range_mut(k..).map(|(_, w)| w).filter(|w| !w.throttled) {
                    w.throttled = true;
                    self.stats.throttled_writes += 1;
                }
                break;
            }
            if !link_up && !self.wrote_alone && self.cfg.mode != Mode::Standalone {
                // Evidence for split-brain detection must be durable before a write that the
                // peer may never see reaches media.
                if !self.wrote_alone_persisting {
                    self.wrote_alone_persisting = true;
                    self.persist(PersistKind::WroteAlone(true), Vec::new(), vec![StoreWrite::Meta(Meta::WroteAlone(true))]);
                }
                break;
            }
            let w = self.remove_waiting(k).expect("present");
            self.dispatch_write(now, w);
        }
    }

    fn dispatch_write(&mut self, now: Time, w: Waiting) {
        debug_assert!(self.covered(&w.extents), "a write reaches media only when covered");
        debug_assert!(self.remembered_durably(&w.extents), "a write reaches media only resting on answers remembered durably");
        if !w.counted_miss {
            self.stats.hits += 1;
        }
        for e in w.extents.clone() {
            let e = ExtentId(e);
            if self.rec.predicted.remove(&e) {
                self.stats.predicted_extents_used += 1;
            }
            *self.local_busy.entry(e).or_insert(0) += 1;
        }
        let seq = if self.cfg.mode == Mode::Standalone {
            // Nothing to ship or track: the sequence number only orders the local media.
            let seq = self.next_seq;
            self.next_seq = seq.next();
            seq
        } else {
            let seq = self.dispatch_item(Apply::Write(w.op.clone()));
            for e in w.extents.clone() {
                self.mark_dirty(ExtentId(e), seq);
            }
            self.note_unapplied(now, seq);
            seq
        };
        let token = self.token();
        self.tokens.insert(token, seq);
        self.insert_dispatched(
            seq,
            Dispatched {
                request: w.request,
                path: if w.counted_miss { WritePath::Miss } else { WritePath::Hit },
                extents: w.extents.clone(),
                local_done: false,
                fua: w.fua,
                at: now,
            },
        );
        self.actions.push_back(Action::LocalWrite { token, seq, op: w.op });
        if w.fua {
            self.request_sync(now);
        }
    }

    /// Acknowledges writes whose every condition holds. A write that also waits for the
    /// peer's apply (sync mode, or FUA with remote flushes) follows the link-loss policy when
    /// the link is down: `degrade` acknowledges it after the record-update timeout (its extents
    /// are in the durable local dirty map), `block` fails it after the deadline.
    fn finish_writes(&mut self, now: Time) {
        let remote_flush = self.cfg.flush_policy == FlushPolicy::Remote;
        let degrade = self.may_degrade_now(now);
        let mut done: Vec<(Seq, Result<(), HostError>)> = Vec::new();
        for (seq, d) in &self.dispatched {
            if !d.local_done || (d.fua && self.local_synced < *seq) {
                continue;
            }
            let needs_remote = self.cfg.mode == Mode::Sync || (d.fua && remote_flush);
            let age = now.since(d.at);
            let applied = !needs_remote || self.applied_ack >= *seq;
            let degraded = degrade && age >= self.cfg.record_update_timeout && self.extents_locally_covered(&d.extents);
            if applied || degraded {
                done.push((*seq, Ok(())));
            } else if age >= self.cfg.link_loss_deadline {
                done.push((*seq, Err(HostError::ReplicationTimeout)));
            }
        }
        for (seq, result) in done {
            let d = self.remove_dispatched(seq).expect("present");
            debug_assert!(d.local_done, "an ack leaves only after its local write");
            if result.is_ok() && self.cfg.mode == Mode::Sync && self.applied_ack < seq {
                self.stats.degraded_writes += 1;
            }
            if result.is_err() {
                self.stats.failed_writes += 1;
            }
            self.ack_write(d.request, result, d.path);
        }
    }

    fn finish_flushes(&mut self) {
        let remote = self.cfg.flush_policy == FlushPolicy::Remote;
        let mut i = 0;
        while i < self.flushes.len() {
            let f = &self.flushes[i];
            if self.local_synced >= f.through && (!remote || self.applied_ack >= f.through) {
                let f = self.remove_flush(i);
                self.ack(f.request, Ok(()));
            } else {
                i += 1;
            }
        }
    }

    // ----- internals: handshake and fencing -----

    // ----- small helpers -----

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn persist(&mut self, kind: PersistKind, extents: Vec<ExtentId>, batch: Vec<StoreWrite>) {
        let token = self.token();
        self.persists.insert(token, (kind, extents));
        self.actions.push_back(Action::Persist { token, batch });
    }

    fn send(&mut self, stream: Stream, frame: Frame) {
        self.actions.push_back(Action::Send { stream, frame });
    }

    fn ack(&mut self, request: RequestId, result: Result<(), HostError>) {
        self.actions.push_back(Action::Ack { request, result, path: None });
    }

    fn ack_write(&mut self, request: RequestId, result: Result<(), HostError>, path: WritePath) {
        self.actions.push_back(Action::Ack { request, result, path: Some(path) });
    }

    fn refresh_stats(&mut self) {
        if self.rec.generation_added.len() > self.rec.copy.generation_count() + 64 {
            let live: BTreeSet<Generation> = self.rec.copy.generations().map(|(g, _)| g).collect();
            self.rec.generation_added.retain(|g, _| live.contains(g));
        }
        let dispatched = self.last_dispatched().0;
        debug_assert_eq!(
            self.shipped_bytes,
            self.buffer.range(..self.ship_next).map(|(_, i)| item_bytes(i)).sum::<u64>(),
            "data window count drifted"
        );
        let inflight = self.shipped_bytes;
        let s = &mut self.stats;
        s.record_len = self.rec.copy.len() as u64;
        s.record_generations = self.rec.copy.generation_count() as u64;
        s.local_dirty_len = self.dirty.local.len() as u64;
        s.lag_bytes = self.buffer_bytes;
        s.inflight_bytes = inflight;
        s.dispatched_seq = dispatched;
        s.applied_seq = self.applied_ack.0;
    }
}
