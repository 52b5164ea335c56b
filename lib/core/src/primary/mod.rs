//! The primary site's state machine: the write path of PRODUCT.md.
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

mod identity;

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
    /// What this site remembers of its peer's store (see `identity.rs`).
    PeerMemory,
    /// The peer's store was found an amnesiac: the full resync it is owed is durable.
    FullResyncOwed,
    /// The full resync numbered so (`full_resyncs_owed`) ended on the peer, durably.
    FullResyncDone(u64),
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
    copy: Record,
    /// Durable local dirty map: extents the peer's record may not cover.
    local_dirty: BTreeSet<ExtentId>,
    dirty_persisting: BTreeSet<ExtentId>,
    /// Extents whose peer copy is stale with no write pending to fix it: they must be copied
    /// by a resync before they can be clean.
    needs_copy: BTreeSet<ExtentId>,
    /// Last dispatched sequence per extent, until durably applied remotely and synced locally.
    dirty: BTreeMap<ExtentId, Seq>,
    dirty_by_seq: BTreeMap<Seq, BTreeSet<ExtentId>>,
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
    /// Since when the peer has been behind by more than the buffer knows: a dirty map found at
    /// start, or written while the link was down. Cleared once the dirty map empties.
    behind_since: Option<Time>,
    ship_next: Seq,
    /// Bytes of the buffer below `ship_next`: sent and not yet applied (the data window).
    shipped_bytes: u64,
    applied_ack: Seq,
    local_synced: Seq,
    sync_inflight: Option<(Token, Seq)>,
    last_sync: Time,
    link: LinkState,
    link_changed: Time,
    peer_applied_at_welcome: Seq,
    peer_wrote_alone: bool,
    peer_save_aside: bool,
    peer_authoritative: bool,
    peer_consistent: bool,
    /// A resync must run even if nothing needs copying (the peer is inconsistent).
    force_resync: bool,
    updates: BTreeMap<u64, Update>,
    next_update_id: u64,
    requested: BTreeSet<ExtentId>,
    pending_hints: Vec<StreamHint>,
    pending_evictions: Vec<Eviction>,
    evictions_since: Option<Time>,
    resend_record_on_snapshot: bool,
    /// Extents named by the snapshot chunks of this connection: an honest secondary names each
    /// recorded and each divergent extent once, so past twice the volume it is refused.
    snapshot_extents: u64,
    resync_end: Option<Seq>,
    resync_running: bool,
    /// The running resync checks extents by digest (a failback) rather than copying them.
    resync_verifies: bool,
    /// The last check dispatched: the resync may end only once the peer has applied it, since
    /// every difference it finds is reported before that.
    last_verify: Option<Seq>,
    /// Extents a check of the running resync found different in some blocks: copied, those
    /// blocks only (bitmaps as `differing_blocks` makes them).
    copy_blocks: BTreeMap<ExtentId, Vec<u8>>,
    /// The running resync's `ResyncBegin`: a difference found by an earlier check names
    /// blocks that may no longer be all (its later writes may have been abandoned).
    resync_begin: Seq,
    reading: BTreeMap<Token, ExtentId>,
    detector: StreamDetector,
    /// Smoothed record-update round trip, µs: how far ahead a stream must be recorded.
    srtt_us: u64,
    /// When each generation in the copy was added (from its answer or the snapshot); bounded
    /// by the record's generations, pruned as they are evicted or emptied.
    generation_added: BTreeMap<Generation, Time>,
    /// The latest time any handler was given: `poll_timeout` names only later instants.
    last_now: Time,
    predicted: BTreeSet<ExtentId>,
    flushes: Vec<Flush>,
    wrote_alone: bool,
    wrote_alone_persisting: bool,
    /// Promoted, failback not yet complete (see `writes_alone_on_link_loss`).
    failback_pending: bool,
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
    /// The running resync checks every extent of the volume (`ResyncBegin { full }`), and
    /// the next extent its sweep reads.
    resync_full: bool,
    sweep: Option<u64>,
}

impl Primary {
    /// Builds the primary from its persisted state: at first start, after a restart, or after
    /// a promotion (when the state holds the new epoch and the failback set as dirty extents).
    /// It persists a new incarnation before it accepts any write.
    pub fn new(cfg: CoreConfig, geo: Geometry, state: &SiteState, now: Time) -> Primary {
        let incarnation = state.incarnation.max(state.applied.0 >> 40) + 1;
        let first_seq = Seq(incarnation << 40);
        let mut p = Primary {
            detector: StreamDetector::new(cfg.predictor.max_streams),
            copy: Record::new(geo.extent_count()),
            cfg,
            geo,
            epoch: state.epoch,
            phase: Phase::Starting,
            incarnation,
            local_dirty: state.dirty.clone(),
            dirty_persisting: BTreeSet::new(),
            needs_copy: state.dirty.clone(),
            dirty: BTreeMap::new(),
            dirty_by_seq: BTreeMap::new(),
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
            behind_since: (!state.dirty.is_empty()).then_some(now),
            ship_next: first_seq.next(),
            shipped_bytes: 0,
            applied_ack: first_seq,
            local_synced: first_seq,
            sync_inflight: None,
            last_sync: now,
            link: LinkState::Down,
            link_changed: now,
            peer_applied_at_welcome: Seq(0),
            peer_wrote_alone: false,
            peer_save_aside: false,
            peer_authoritative: true,
            peer_consistent: true,
            force_resync: false,
            updates: BTreeMap::new(),
            next_update_id: 1,
            requested: BTreeSet::new(),
            pending_hints: Vec::new(),
            pending_evictions: Vec::new(),
            evictions_since: None,
            resend_record_on_snapshot: true,
            snapshot_extents: 0,
            resync_end: None,
            resync_running: false,
            resync_verifies: false,
            last_verify: None,
            copy_blocks: BTreeMap::new(),
            resync_begin: Seq(0),
            reading: BTreeMap::new(),
            srtt_us: 0,
            generation_added: BTreeMap::new(),
            last_now: now,
            predicted: BTreeSet::new(),
            flushes: Vec::new(),
            wrote_alone: state.wrote_alone,
            failback_pending: state.failback_pending,
            wrote_alone_persisting: false,
            up_seq: first_seq,
            persists: BTreeMap::new(),
            next_token: 1,
            actions: VecDeque::new(),
            stats: PrimaryStats::default(),
            ident: identity::Identity::new(state, now),
            resync_full: false,
            sweep: None,
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
        self.link
    }
    pub fn stats(&self) -> &PrimaryStats {
        &self.stats
    }
    pub fn record_copy(&self) -> &Record {
        &self.copy
    }
    pub fn local_dirty(&self) -> &BTreeSet<ExtentId> {
        &self.local_dirty
    }
    pub fn split_brain(&self) -> bool {
        self.link == LinkState::SplitBrainHold
    }
    pub fn resync_in_progress(&self) -> bool {
        self.resync_running || !self.needs_copy.is_empty()
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
            && self.needs_copy.is_empty()
            && self.reading.is_empty()
            && !self.ident.full_resync_owed
            && self.link == LinkState::Up
    }

    /// What a resync onto the current peer would copy now: the extents that may differ and
    /// that retransmission alone will not fix. Planning for a dry run and for status.
    pub fn resync_plan(&self) -> FailbackPlan {
        let mut set: BTreeSet<ExtentId> = self.local_dirty.iter().copied().collect();
        set.extend(self.needs_copy.iter().copied());
        set.extend(self.dirty.keys().copied());
        if self.resend_record_on_snapshot {
            set.extend(self.copy.iter().map(|(e, _)| e));
        }
        self.plan(set)
    }

    /// Failback debt: what a failover now would have to copy back to this site afterwards.
    /// The promoted secondary's failback set starts as its durable record, a superset of the
    /// record copy, plus whatever this site's dirty map names (unknown to the record).
    pub fn failback_debt(&self) -> FailbackPlan {
        let mut set: BTreeSet<ExtentId> = self.copy.iter().map(|(e, _)| e).collect();
        set.extend(self.local_dirty.iter().copied());
        set.extend(self.dirty.keys().copied());
        set.extend(self.needs_copy.iter().copied());
        self.plan(set)
    }

    fn plan(&self, set: BTreeSet<ExtentId>) -> FailbackPlan {
        let bytes = set.iter().map(|e| self.geo.extent_range(*e).end - self.geo.extent_range(*e).start).sum();
        FailbackPlan { extents: set.into_iter().collect(), bytes, lag_bytes: self.buffer_bytes }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next instant at which `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut at = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        let degrade = self.cfg.mode == Mode::Predictive && self.writes_alone_on_link_loss() && self.link == LinkState::Down;
        let degrade_from = self.link_changed + self.cfg.record_update_timeout;
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
        let degrade_any = self.writes_alone_on_link_loss() && self.link == LinkState::Down;
        for d in self.dispatched.values() {
            if self.cfg.mode == Mode::Sync || (d.fua && remote_flush) {
                at(if degrade_any {
                    (d.at + self.cfg.record_update_timeout).max(degrade_from)
                } else {
                    d.at + self.cfg.link_loss_deadline
                });
            }
        }
        if let Some(since) = self.evictions_since {
            at(since + self.cfg.eviction_idle_delay);
        }
        if let Some(age) = self.cfg.clean_generation_max_age {
            // The next generation to come of age. One already of age but not yet clean is
            // evicted when it becomes clean, which an `Applied` or a sync report signals.
            if let Some(t) = self.generation_added.values().map(|added| *added + age).filter(|t| *t > self.last_now).min() {
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
        let mut obs = self.detector.observe(now, op.offset..op.offset + op.len, extents.clone());
        if let Some(h) = &mut obs.hint {
            // A miss on a stream asks for what the stream needs, not a fixed window.
            h.want = self.lookahead(obs.stream);
        }
        self.consider_pre_extension(obs.stream);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.waiting.insert(
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
        self.flushes.push(Flush { request, through: self.last_dispatched(), arrived: now });
        self.request_sync(now);
        self.progress(now);
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
        if self.link == LinkState::SplitBrainHold {
            self.peer_save_aside = true;
            self.needs_copy.extend(self.copy.iter().map(|(e, _)| e));
            self.needs_copy.extend(self.local_dirty.iter().copied());
            self.set_link(now, LinkState::Up);
            self.start_shipping_after_snapshot();
            self.progress(now);
        }
    }

    // ----- media and store reports -----

    pub fn handle_local_write_done(&mut self, now: Time, token: Token, ok: bool) {
        let Some(seq) = self.tokens.remove(&token) else {
            return;
        };
        if let Some(d) = self.dispatched.get_mut(&seq) {
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
                let d = self.dispatched.remove(&seq).expect("present");
                self.needs_copy.extend(d.extents.clone().map(ExtentId));
                self.stats.failed_writes += 1;
                self.ack_write(d.request, Err(HostError::Media), d.path);
            }
        }
        self.progress(now);
    }

    pub fn handle_media_synced(&mut self, now: Time, token: Token) {
        if let Some((t, through)) = self.sync_inflight {
            if t == token {
                self.sync_inflight = None;
                self.local_synced = self.local_synced.max(through);
                self.clean_dirty();
            }
        }
        self.progress(now);
    }

    pub fn handle_read_done(&mut self, now: Time, token: Token, data: Bytes) {
        let Some(e) = self.reading.remove(&token) else {
            return;
        };
        let range = self.geo.extent_range(e);
        let blocks = self.copy_blocks.remove(&e);
        if self.resync_verifies && blocks.is_none() {
            // The peer compares its own content at this point of the order; only a difference
            // brings the extent back, with the blocks to copy.
            let digests = block_digests(&data, range.end - range.start);
            let seq = self.dispatch_resync_item(Apply::Verify { extent: e, digests });
            self.mark_dirty(e, seq);
            self.last_verify = Some(seq);
            self.stats.resync_extents_verified += 1;
            self.stats.resync_bytes_verified += range.end - range.start;
            self.progress(now);
            return;
        }
        // Whole, unless a check named the blocks that differ.
        let whole = blocks.is_none();
        let n = check_blocks(range.end - range.start);
        let mut i = 0;
        while i < n {
            if !whole && !blocks.as_deref().is_some_and(|b| block_set(b, i)) {
                i += 1;
                continue;
            }
            // A run of blocks to copy, in chunks of at most RESYNC_CHUNK_BYTES.
            let first = i;
            while i < n && (whole || blocks.as_deref().is_some_and(|b| block_set(b, i))) {
                i += 1;
            }
            let run_end = (range.start + i as u64 * CHECK_BLOCK).min(range.end);
            let mut off = range.start + first as u64 * CHECK_BLOCK;
            while off < run_end {
                let len = (run_end - off).min(RESYNC_CHUNK_BYTES);
                let start = (off - range.start) as usize;
                let chunk = data.slice(start.min(data.len())..(start + len as usize).min(data.len()));
                let op = if chunk.len() as u64 == len { WriteOp::data(off, chunk) } else { WriteOp::zero(off, len) };
                let seq = self.dispatch_resync_item(Apply::Write(op));
                self.mark_dirty(e, seq);
                self.stats.resync_bytes_copied += len;
                off += len;
            }
        }
        self.stats.resync_extents_copied += 1;
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
                    self.dirty_persisting.remove(&e);
                    self.local_dirty.insert(e);
                }
                self.behind_since.get_or_insert(now);
            }
            PersistKind::Undirty => {}
            PersistKind::WroteAlone(v) => {
                self.wrote_alone = v;
                self.wrote_alone_persisting = false;
            }
            PersistKind::FailbackDone => self.failback_pending = false,
            PersistKind::PeerMemory => {
                // Nothing waits for it: the write path runs on as if nothing happened.
                self.ident.memory_persisted();
                return;
            }
            PersistKind::FullResyncOwed => {}
            PersistKind::FullResyncDone(n) => self.ident.full_resync_done(n, &mut self.stats),
            PersistKind::Demote => {
                self.actions.push_back(Action::RoleChanged { role: Role::Secondary });
                return;
            }
        }
        self.progress(now);
    }

    // ----- the link -----

    pub fn handle_connected(&mut self, now: Time) {
        if self.cfg.mode == Mode::Standalone {
            self.actions.push_back(Action::Disconnect { reason: "this site is configured without a peer".into() });
            return;
        }
        self.set_link(now, LinkState::Handshake);
        self.snapshot_extents = 0;
        let hello = Frame::Hello {
            epoch: self.epoch,
            role: Role::Primary,
            volume_bytes: self.geo.volume_bytes(),
            extent_bytes: self.geo.extent_bytes(),
            // A primary that writes alone when the link is lost says so, whatever its policy.
            // (the configured policy, even before this site first paired and may degrade: the
            // secondary must give up authority on link loss from this connection on).
            on_link_loss: if self.failback_pending { LinkLossPolicy::Degrade } else { self.cfg.on_link_loss },
            authoritative: self.cfg.mode == Mode::Predictive && self.local_dirty.is_empty() && self.dirty_persisting.is_empty(),
            wrote_alone: self.wrote_alone,
            store: self.ident.store_id,
            remembers: self.ident.remembered(),
            promoted_from: self.failback_pending.then_some(self.ident.promoted_from).flatten(),
            owes_full_resync: self.ident.full_resync_owed,
        };
        self.send(Stream::Control, hello);
    }

    pub fn handle_disconnected(&mut self, now: Time) {
        self.set_link(now, LinkState::Down);
        self.updates.clear();
        self.requested.clear();
        self.pending_hints.clear();
        // Unsent evictions are forgotten: the secondary still holds those extents, and the
        // next snapshot puts them back in the copy.
        self.pending_evictions.clear();
        self.evictions_since = None;
        self.ship_next = self.applied_ack.next();
        self.recount_shipped();
        self.progress(now);
    }

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
            Frame::Welcome { applied, authoritative, consistent, store, next_generation, amnesiac, .. }
                if self.link == LinkState::Handshake =>
            {
                let welcome = identity::Welcome { applied, store, next_generation, amnesiac };
                if self.check_welcome(welcome).is_err() {
                    return;
                }
                self.peer_applied_at_welcome = applied;
                // An amnesiac's word on its record is not taken.
                self.peer_authoritative = authoritative && !self.ident.full_resync_owed;
                self.peer_consistent = consistent;
                // The copy becomes exactly the peer's durable record: whatever this site had
                // that the peer no longer holds must not stay covered. Extents pending eviction
                // or answered on the lost connection come back with the snapshot.
                self.copy.clear();
                self.generation_added.clear();
                self.predicted.clear();
            }
            Frame::RecordChunk { entries, .. } if self.link == LinkState::Handshake => {
                for en in entries {
                    for e in from_runs(std::slice::from_ref(&en.run)) {
                        self.copy.insert(e, en.generation);
                    }
                    self.generation_added.entry(en.generation).or_insert(now);
                }
            }
            // A check's difference: the extent is copied (saved aside on the peer first), just
            // the blocks named when the check belongs to the running resync, else whole.
            // (`validate_for` checked that the extent is in the volume and the bitmap its size.)
            Frame::Differs { seq, extent, blocks, .. } if matches!(self.link, LinkState::Handshake | LinkState::Up) => {
                self.stats.resync_extents_mismatched += 1;
                // An amnesiac's stale extent is copied, not saved aside (the full resync's
                // `save_aside` says whether the peer may hold writes of its own).
                self.peer_save_aside |= !self.ident.full_resync_owed;
                self.needs_copy.insert(extent);
                if seq > self.resync_begin && self.resync_running {
                    let mask = self.copy_blocks.entry(extent).or_insert_with(|| vec![0; blocks.len()]);
                    for (m, b) in mask.iter_mut().zip(&blocks) {
                        *m |= b;
                    }
                } else {
                    self.copy_blocks.remove(&extent);
                }
                self.add_local_dirty(vec![extent]);
            }
            // What a demoted peer may hold of its own (in the snapshot; a failback check's
            // differences come again this way after a reconnect). Checked by a failback like
            // the rest of its set, or copied whole by another resync; saved aside on the peer
            // before any overwrite, and in the dirty map until then.
            Frame::DivergentChunk { extents, .. } if matches!(self.link, LinkState::Handshake | LinkState::Up) => {
                let list: Vec<ExtentId> = from_runs(&extents).collect();
                if !list.is_empty() {
                    self.peer_save_aside |= !self.ident.full_resync_owed;
                    self.needs_copy.extend(list.iter().copied());
                    self.add_local_dirty(list);
                }
            }
            Frame::SnapshotEnd { .. } if self.link == LinkState::Handshake => self.on_snapshot_end(now),
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
                    if !self.copy.contains(e) && !self.local_dirty.contains(&e) {
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
        if let Some(since) = self.evictions_since {
            if now.since(since) >= self.cfg.eviction_idle_delay && self.link == LinkState::Up && !self.pending_evictions.is_empty() {
                let evictions = std::mem::take(&mut self.pending_evictions);
                self.evictions_since = None;
                self.send(Stream::Control, Frame::Evict { epoch: self.epoch, evictions });
            }
        }
        if self.sync_inflight.is_none() && self.sync_would_help() && now.since(self.last_sync) >= self.cfg.local_sync_interval {
            self.request_sync(now);
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
        self.ship();
        self.finish_writes(now);
        self.finish_flushes();
        self.undirty();
        self.maybe_clear_wrote_alone();
        self.maybe_end_failback();
        self.maybe_authoritative();
        self.maybe_persist_peer_memory(now);
        self.refresh_stats();
    }

    /// An extent is covered when a write to it may reach local media without breaking
    /// invariant R: it is in the record copy (so in the durable record) or in the durable
    /// local dirty map.
    fn covers(&self, e: ExtentId) -> bool {
        self.cfg.mode == Mode::Standalone || self.local_dirty.contains(&e) || (self.cfg.mode == Mode::Predictive && self.copy.contains(e))
    }

    fn covered(&self, extents: &Range<u64>) -> bool {
        extents.clone().all(|e| self.covers(ExtentId(e)))
    }

    fn dispatch_ready(&mut self, now: Time) {
        if !matches!(self.phase, Phase::Serving | Phase::Draining) {
            return;
        }
        let link_up = self.link == LinkState::Up;
        let keys: Vec<u64> = self.waiting.keys().copied().collect();
        for k in keys {
            let w = &self.waiting[&k];
            if !self.covered(&w.extents) {
                continue;
            }
            if w.extents.clone().any(|e| self.reading.values().any(|r| r.0 == e)) {
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
            let w = self.waiting.remove(&k).expect("present");
            self.dispatch_write(now, w);
        }
    }

    fn dispatch_write(&mut self, now: Time, w: Waiting) {
        if !w.counted_miss {
            self.stats.hits += 1;
        }
        for e in w.extents.clone() {
            let e = ExtentId(e);
            if self.predicted.remove(&e) {
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
        self.dispatched.insert(
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

    /// Remembers when host write `seq` was dispatched, for the lag in seconds. Writes within a
    /// millisecond share a group, and the groups are bounded: past the bound, neighbours merge
    /// under the older time, so the lag is never understated.
    fn note_unapplied(&mut self, now: Time, seq: Seq) {
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

    /// When the oldest write the peer may lack was made: the replication lag is `now` minus
    /// this. `None` when the peer has applied everything.
    pub fn behind_since(&self) -> Option<Time> {
        let buffered = self.unapplied.front().map(|g| g.at);
        match (buffered, self.behind_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Dispatches an item of a resync: it ships on the resync stream.
    fn dispatch_resync_item(&mut self, item: Apply) -> Seq {
        let seq = self.dispatch_item(item);
        self.resync_seqs.insert(seq);
        seq
    }

    /// Gives an item the next sequence number and puts it in the retransmit buffer.
    fn dispatch_item(&mut self, item: Apply) -> Seq {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        self.buffer_bytes += item_bytes(&item);
        self.buffer.insert(seq, item);
        seq
    }

    fn mark_dirty(&mut self, e: ExtentId, seq: Seq) {
        if let Some(old) = self.dirty.insert(e, seq) {
            if let Some(s) = self.dirty_by_seq.get_mut(&old) {
                s.remove(&e);
                if s.is_empty() {
                    self.dirty_by_seq.remove(&old);
                }
            }
        }
        self.dirty_by_seq.entry(seq).or_default().insert(e);
    }

    /// Extents whose every write is durably applied remotely and synced locally are clean.
    fn clean_dirty(&mut self) {
        let bound = self.applied_ack.min(self.local_synced);
        let keep = self.dirty_by_seq.split_off(&bound.next());
        let done = std::mem::replace(&mut self.dirty_by_seq, keep);
        for (_, set) in done {
            for e in set {
                self.dirty.remove(&e);
            }
        }
    }

    fn is_clean(&self, e: ExtentId) -> bool {
        !self.dirty.contains_key(&e)
            && !self.needs_copy.contains(&e)
            && !self.reading.values().any(|r| *r == e)
            && !self.local_busy.contains_key(&e)
    }

    /// Misses: ask the secondary to record them, or cover them locally.
    fn cover_misses(&mut self) {
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
                        if !self.requested.contains(&e) && !self.dirty_persisting.contains(&e) {
                            self.requested.insert(e);
                        }
                    }
                }
                Mode::Async | Mode::Sync => local.extend(missing.into_iter().filter(|e| !self.dirty_persisting.contains(e))),
                Mode::Standalone => {}
            }
        }
        for h in hints {
            if !self.pending_hints.contains(&h) {
                self.pending_hints.push(h);
            }
        }
        if !local.is_empty() {
            self.add_local_dirty(local.into_iter().collect());
        }
    }

    /// Requested extents not yet sent, oldest waiting write first, so that a batch cut short by
    /// the record's capacity still completes whole writes. `requested` holds both these and
    /// those in flight; the ones in flight are exactly those named by `updates`.
    fn pending_miss(&self) -> Vec<ExtentId> {
        let inflight: BTreeSet<ExtentId> = self.updates.values().flat_map(|u| u.missed.iter().copied()).collect();
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for w in self.waiting.values() {
            for e in w.extents.clone().map(ExtentId) {
                if self.requested.contains(&e) && !inflight.contains(&e) && seen.insert(e) {
                    out.push(e);
                }
            }
        }
        out
    }

    /// Extents the oldest waiting miss still needs: an empty record admits at least these.
    fn oldest_miss_span(&self) -> u64 {
        self.waiting.values().find(|w| !self.covered(&w.extents)).map_or(0, |w| w.extents.end - w.extents.start)
    }

    fn add_local_dirty(&mut self, extents: Vec<ExtentId>) {
        let new: Vec<ExtentId> =
            extents.into_iter().filter(|e| !self.local_dirty.contains(e) && !self.dirty_persisting.contains(e)).collect();
        if new.is_empty() {
            return;
        }
        self.dirty_persisting.extend(new.iter().copied());
        let batch = new.iter().map(|e| StoreWrite::PutDirty(*e)).collect();
        self.persist(PersistKind::Dirty, new, batch);
    }

    fn send_record_update(&mut self, now: Time) {
        if self.link != LinkState::Up || self.cfg.mode != Mode::Predictive {
            return;
        }
        while self.updates.len() < self.cfg.max_record_updates_in_flight {
            let mut missed = self.pending_miss();
            if missed.is_empty() && self.pending_hints.is_empty() {
                return;
            }
            missed.truncate(MAX_LIST_LEN);
            let reserved: u64 = self.updates.values().map(|u| u.reserved).sum();
            // The record stays within its capacity: misses beyond the free room wait until an
            // eviction frees some. An empty record with nothing in flight admits a whole miss
            // even if one write spans more extents than the capacity, so that it can progress.
            let free = self.cfg.record_capacity_extents.saturating_sub(self.copy.len() as u64 + reserved);
            let lone = self.copy.is_empty() && self.updates.is_empty();
            let admit = if lone { free.max(self.oldest_miss_span()) } else { free };
            if (missed.len() as u64) > admit {
                missed.truncate(admit as usize);
                self.stats.record_full_waits += 1;
            }
            let hints: Vec<StreamHint> = self.pending_hints.iter().take(MAX_LIST_LEN).copied().collect();
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
            self.pending_hints.clear();
            let id = self.next_update_id;
            self.next_update_id += 1;
            let evictions = std::mem::take(&mut self.pending_evictions);
            self.evictions_since = None;
            if missed.is_empty() {
                self.stats.pre_extensions_sent += 1;
            }
            self.stats.record_updates_sent += 1;
            self.updates.insert(id, Update { missed: missed.clone(), reserved: missed.len() as u64 + room as u64, sent_at: now });
            self.send(Stream::Control, Frame::RecordUpdate { epoch: self.epoch, id, missed: to_runs(missed), hints, room, evictions });
        }
    }

    /// How far ahead a stream must be recorded: as far as it goes in two record round trips,
    /// one for the update in flight and one of margin.
    fn lookahead(&self, stream: usize) -> u32 {
        let horizon = Duration::from_micros(2 * self.srtt_us.max(1));
        let p = &self.cfg.predictor;
        self.detector.lookahead(stream, horizon, p.pre_extend_within, p.max_ahead)
    }

    /// Extends the record ahead of a stream before the stream reaches unrecorded space, so the
    /// host never waits: once less than one lookahead of recorded (or requested) space is
    /// left, ask for two, so that requests go out about once per lookahead, not per write.
    fn consider_pre_extension(&mut self, stream: usize) {
        if self.cfg.mode != Mode::Predictive || self.cfg.predictor.kind != crate::config::PredictorKind::Adaptive {
            return;
        }
        let within = self.lookahead(stream);
        let Some((hint, ahead)) = self.detector.ahead(stream, within) else {
            return;
        };
        let asked = self.detector.asked_through(stream);
        let remaining = (asked - hint.last as i64) / hint.stride;
        if remaining >= within as i64 {
            return;
        }
        let gap = ahead
            .iter()
            .any(|e| *e < self.geo.extent_count() && !self.copy.contains(ExtentId(*e)) && !self.requested.contains(&ExtentId(*e)));
        if !gap {
            return;
        }
        let want = within.saturating_mul(2).min(self.cfg.predictor.max_ahead);
        self.detector.mark_asked(stream, hint.last as i64 + hint.stride * want as i64);
        let hint = StreamHint { want, ..hint };
        if !self.pending_hints.contains(&hint) {
            self.pending_hints.push(hint);
        }
    }

    fn on_answer(&mut self, now: Time, id: u64, generation: Generation, added: &[crate::record::ExtentRun]) {
        let Some(u) = self.updates.remove(&id) else {
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
        self.srtt_us = if self.srtt_us == 0 { rtt } else { (7 * self.srtt_us + rtt) / 8 };
        self.stats.record_rtt_us_total += rtt;
        self.stats.record_rtt_count += 1;
        self.stats.record_rtt_smoothed_us = self.srtt_us;
        let missed: BTreeSet<ExtentId> = u.missed.iter().copied().collect();
        for e in &u.missed {
            self.requested.remove(e);
        }
        for e in from_runs(added) {
            self.copy.insert(e, generation);
            self.generation_added.entry(generation).or_insert(now);
            if !missed.contains(&e) {
                self.stats.predicted_extents += 1;
                self.predicted.insert(e);
            }
        }
        // An answer that lacks a missed extent (a peer bug) leaves the write waiting; it is
        // asked for again rather than assumed.
        for e in &u.missed {
            if !self.copy.contains(*e) {
                self.requested.insert(*e);
            }
        }
    }

    fn on_applied(&mut self, through: Seq) {
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
        if let Some(end) = self.resync_end {
            if through >= end {
                self.resync_end = None;
                self.resync_running = false;
                if std::mem::take(&mut self.resync_full) {
                    self.sweep = None;
                    self.finish_full_resync();
                }
            }
        }
    }

    /// Drops the unshipped part of the retransmit buffer when it is full and the policy says
    /// resync. While a resync runs over a live link, a full buffer throttles instead: starting
    /// over would never finish if the host outpaces the link.
    fn maybe_lag_resync(&mut self) {
        let full = self.buffer_bytes > self.cfg.max_lag_bytes;
        let policy = self.cfg.on_lag_full == LagPolicy::Resync || (self.link != LinkState::Up && self.writes_alone_on_link_loss());
        let resyncing_live = self.resync_running && self.link == LinkState::Up;
        if full && policy && !resyncing_live {
            self.abandon_buffer();
        }
    }

    /// Forgets everything queued for the peer and not yet sent; a resync of every extent that
    /// may differ replaces it. Items already sent stay until applied, so the data window
    /// keeps counting the bytes on the wire.
    fn abandon_buffer(&mut self) {
        let unsent = self.buffer.split_off(&self.ship_next);
        self.resync_seqs.split_off(&self.ship_next);
        for item in unsent.values() {
            self.buffer_bytes -= item_bytes(item);
        }
        self.ship_next = self.next_seq;
        self.needs_copy.extend(self.copy.iter().map(|(e, _)| e));
        self.needs_copy.extend(self.local_dirty.iter().copied());
        self.needs_copy.extend(self.dirty.keys().copied());
        // The marker goes first, so that the peer can bridge the gap at once.
        self.start_resync(true);
        // Seqs that will never be applied must not keep extents dirty forever: the copies
        // shipped by the resync re-mark them.
        self.dirty.clear();
        self.dirty_by_seq.clear();
    }

    /// A failback (onto a promoted site's old primary, or a split brain's loser) checks
    /// extents by digest, when configured: there the peer holds a recent image, and most of
    /// the failback set is usually equal on both sites. Other resyncs copy: their extents
    /// are known to differ.
    fn begin_checks(&mut self) {
        // A full resync always checks: most of an amnesiac's image is usually right.
        self.resync_verifies = self.resync_full || (self.cfg.verify_failback && (self.failback_pending || self.peer_save_aside));
        self.last_verify = None;
        // A check's block list holds only while every later write reaches the peer in order;
        // a new resync (after an abandoned buffer, say) starts from whole extents again, and
        // ignores the block lists of checks made before it. Called just before the
        // `ResyncBegin` is dispatched, so that is the next sequence number.
        self.copy_blocks.clear();
        self.resync_begin = self.next_seq;
    }

    /// Starts a resync: full (every extent of the volume, checked by digest) while the peer
    /// is owed one, else of `needs_copy`. `skip` bridges an abandoned buffer (see
    /// `abandon_buffer`).
    fn start_resync(&mut self, skip: bool) {
        assert!(self.link == LinkState::Up || skip, "a resync starts on a live link, or bridges an abandoned buffer");
        // (One whose end is being settled is done: what follows is an ordinary resync.)
        let full = self.ident.full_resync_owed && !self.ident.settling;
        self.resync_running = true;
        self.resync_end = None;
        self.resync_full = full;
        self.sweep = full.then_some(0);
        self.stats.full_resync_swept_extents = 0;
        self.begin_checks();
        self.stats.resyncs_started += 1;
        // A promoted site's peer is the old primary, which may hold acknowledged writes of
        // its own anywhere when the full resync is owed (this site was an amnesiac).
        let save_aside = self.peer_save_aside || (full && self.failback_pending);
        self.dispatch_resync_item(Apply::ResyncBegin { save_aside, skip, full });
    }

    fn drive_resync(&mut self) {
        if self.link != LinkState::Up || self.phase == Phase::Fenced {
            return;
        }
        // A full resync owed replaces a partial one under way: its marker tells the peer that
        // this resync's end vouches for the whole image.
        let full_due = self.ident.full_resync_owed && !self.resync_full && !self.ident.settling;
        if (!self.resync_running && (!self.needs_copy.is_empty() || self.force_resync)) || full_due {
            self.force_resync = false;
            self.start_resync(false);
        }
        if !self.resync_running {
            return;
        }
        let extent_bytes = self.geo.extent_bytes();
        while self.reading.len() < self.cfg.resync_reads_in_flight {
            // Resync copies share the lag budget with host writes, so they are paced by it.
            let pending = (self.reading.len() as u64 + 1) * extent_bytes;
            if self.buffer_bytes > 0 && self.buffer_bytes + pending > self.cfg.max_lag_bytes {
                break;
            }
            let next = self.needs_copy.iter().copied().find(|e| !self.local_busy.contains_key(e));
            let e = match (next, self.sweep) {
                (Some(e), _) => {
                    self.needs_copy.remove(&e);
                    e
                }
                // A full resync's sweep, in extent order, once nothing else is owed; an extent
                // a local write is busy with waits for it.
                (None, Some(c)) if c < self.geo.extent_count() && !self.local_busy.contains_key(&ExtentId(c)) => {
                    self.sweep = Some(c + 1);
                    self.stats.full_resync_swept_extents = c + 1;
                    ExtentId(c)
                }
                _ => break,
            };
            let token = self.token();
            self.reading.insert(token, e);
            self.actions.push_back(Action::ReadExtent { token, extent: e });
        }
        let checks_answered = self.last_verify.is_none_or(|v| self.applied_ack >= v);
        let swept = self.sweep.is_none_or(|c| c >= self.geo.extent_count());
        if self.needs_copy.is_empty() && self.reading.is_empty() && self.resync_end.is_none() && checks_answered && swept {
            let end = self.dispatch_resync_item(Apply::ResyncEnd);
            self.resync_end = Some(end);
        }
    }

    fn ship(&mut self) {
        if self.link != LinkState::Up {
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
            let stream = if self.resync_seqs.contains(&seq) { Stream::Resync } else { Stream::Data((seq.0 % lanes) as u8) };
            self.send(stream, Frame::Data { epoch: self.epoch, seq, apply });
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
            let d = self.dispatched.remove(&seq).expect("present");
            if result.is_ok() && self.cfg.mode == Mode::Sync && self.applied_ack < seq {
                self.stats.degraded_writes += 1;
            }
            if result.is_err() {
                self.stats.failed_writes += 1;
            }
            self.ack_write(d.request, result, d.path);
        }
    }

    fn extents_locally_covered(&self, extents: &Range<u64>) -> bool {
        extents.clone().all(|e| self.local_dirty.contains(&ExtentId(e)))
    }

    fn finish_flushes(&mut self) {
        let remote = self.cfg.flush_policy == FlushPolicy::Remote;
        let mut i = 0;
        while i < self.flushes.len() {
            let f = &self.flushes[i];
            if self.local_synced >= f.through && (!remote || self.applied_ack >= f.through) {
                let f = self.flushes.remove(i);
                self.ack(f.request, Ok(()));
            } else {
                i += 1;
            }
        }
    }

    fn sync_would_help(&self) -> bool {
        self.dirty_by_seq.keys().next().is_some_and(|s| *s <= self.applied_ack && *s > self.local_synced)
    }

    fn request_sync(&mut self, now: Time) {
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

    /// Predictive mode: keep the record copy under its capacity by evicting the oldest whole
    /// generations whose every extent is clean (claims 13-17).
    fn evict(&mut self, now: Time) {
        if self.cfg.mode != Mode::Predictive || self.link != LinkState::Up {
            return;
        }
        let cap = self.cfg.record_capacity_extents;
        let target = cap - cap / 8;
        let reserved: u64 = self.updates.values().map(|u| u.reserved).sum();
        let max_age = self.cfg.clean_generation_max_age;
        let oldest_expired = self.copy.generations().next().is_some_and(|(g, _)| self.generation_expired(g, now, max_age));
        if self.copy.len() as u64 + reserved <= target && self.pending_miss().is_empty() && !oldest_expired {
            return;
        }
        // Extents a waiting host write needs are in flight from the host's point of view:
        // evicting one would only make that write miss again.
        let pinned: BTreeSet<ExtentId> = self.waiting.values().flat_map(|w| w.extents.clone().map(ExtentId)).collect();
        let mut victims: Vec<Generation> = Vec::new();
        let mut size = self.copy.len() as u64 + reserved + self.pending_miss().len() as u64;
        for (g, members) in self.copy.generations().take(EVICTION_SCAN_GENERATIONS) {
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
            let members: Vec<ExtentId> = self.copy.members_of(g).map(|m| m.iter().copied().collect()).unwrap_or_default();
            for e in &members {
                self.copy.remove(*e);
                self.predicted.remove(e);
            }
            self.stats.evicted_extents += members.len() as u64;
            self.stats.evicted_generations += 1;
            self.pending_evictions.push(Eviction { generation: g, extents: to_runs(members) });
            self.generation_added.remove(&g);
            if self.evictions_since.is_none() {
                self.evictions_since = Some(now);
            }
        }
    }

    fn generation_expired(&self, g: Generation, now: Time, max_age: Option<std::time::Duration>) -> bool {
        match (max_age, self.generation_added.get(&g)) {
            (Some(age), Some(added)) => now.since(*added) >= age,
            _ => false,
        }
    }

    /// Removes clean extents from the local dirty map.
    fn undirty(&mut self) {
        if self.link != LinkState::Up || self.local_dirty.is_empty() {
            return;
        }
        // Extents a waiting host write needs stay covered, as in `evict`: withdrawing one
        // while the write waits for another to be persisted made the write miss again, and
        // a write spanning extents could chase its own coverage forever (found by the bench:
        // sync mode, qemu-img convert's 2 MiB writes across 1 MiB extents).
        #[cfg(feature = "mutations")]
        let pin = !crate::mutations::undirty_waiting();
        #[cfg(not(feature = "mutations"))]
        let pin = true;
        let pinned: BTreeSet<ExtentId> =
            if pin { self.waiting.values().flat_map(|w| w.extents.clone().map(ExtentId)).collect() } else { BTreeSet::new() };
        let clean: Vec<ExtentId> = self
            .local_dirty
            .iter()
            .copied()
            .filter(|e| self.is_clean(*e) && !self.dirty_persisting.contains(e) && !pinned.contains(e))
            .collect();
        if clean.is_empty() {
            return;
        }
        // Withdrawn from coverage before the delete is persisted: a write arriving meanwhile
        // misses and re-adds the extent in a later batch, which the store applies after this.
        for e in &clean {
            self.local_dirty.remove(e);
        }
        if self.local_dirty.is_empty() {
            self.behind_since = None;
        }
        let batch = clean.iter().map(|e| StoreWrite::DelDirty(*e)).collect();
        self.persist(PersistKind::Undirty, clean, batch);
    }

    /// With the link down, misses are tracked in the dirty map rather than held: under
    /// `degrade`, and on a promoted primary whose failback has not completed (no secondary
    /// holds a record worth protecting; the dirty map is the failback set).
    ///
    /// A primary that has never paired with its peer (no memory of the peer's store) does not
    /// degrade: it may be a rebuilt site whose peer holds all the data, and writing alone
    /// before the first handshake would take acknowledged writes that the peer refuses (see
    /// `Refusal::UnknownStore`). A new pair pairs within the first connection.
    fn writes_alone_on_link_loss(&self) -> bool {
        (self.cfg.on_link_loss == LinkLossPolicy::Degrade && self.ident.peer.store.is_some()) || self.failback_pending
    }

    /// The failback is complete once the peer has applied everything, no resync runs and
    /// the dirty map is empty: from then on `on_link_loss` applies as configured.
    fn maybe_end_failback(&mut self) {
        if self.failback_pending
            && !self.persists.values().any(|(k, _)| *k == PersistKind::FailbackDone)
            && self.link == LinkState::Up
            && self.applied_ack >= self.up_seq
            && !self.resync_in_progress()
            && self.local_dirty.is_empty()
        {
            self.persist(PersistKind::FailbackDone, Vec::new(), vec![StoreWrite::Meta(Meta::FailbackPending(false))]);
        }
    }

    fn maybe_clear_wrote_alone(&mut self) {
        if self.wrote_alone
            && !self.wrote_alone_persisting
            && self.link == LinkState::Up
            && self.applied_ack >= self.up_seq
            && !self.resync_in_progress()
            && self.local_dirty.is_empty()
        {
            self.wrote_alone_persisting = true;
            self.persist(PersistKind::WroteAlone(false), Vec::new(), vec![StoreWrite::Meta(Meta::WroteAlone(false))]);
        }
    }

    fn maybe_authoritative(&mut self) {
        if !self.peer_authoritative
            && self.link == LinkState::Up
            && !self.ident.full_resync_owed
            && self.cfg.mode == Mode::Predictive
            && self.local_dirty.is_empty()
            && self.dirty_persisting.is_empty()
            && !self.persists.values().any(|(k, _)| *k == PersistKind::Undirty)
        {
            self.peer_authoritative = true;
            assert!(!self.ident.full_resync_owed, "an amnesiac peer is told its record is authoritative before its full resync ended");
            self.send(Stream::Control, Frame::Authoritative { epoch: self.epoch });
        }
    }

    // ----- internals: handshake and fencing -----

    fn on_hello(&mut self, now: Time, epoch: Epoch, role: Role, volume_bytes: u64, extent_bytes: u64, wrote_alone: bool) {
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
            Role::Secondary => self.peer_wrote_alone = wrote_alone,
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

    fn on_snapshot_end(&mut self, now: Time) {
        if self.resend_record_on_snapshot {
            // First contact of this incarnation: whatever was in flight before a restart is
            // unknown, so every recorded extent is copied again.
            self.resend_record_on_snapshot = false;
            self.needs_copy.extend(self.copy.iter().map(|(e, _)| e));
        }
        if self.peer_wrote_alone && self.wrote_alone {
            self.set_link(now, LinkState::SplitBrainHold);
            return;
        }
        if self.peer_wrote_alone {
            self.peer_save_aside = true;
        }
        if !self.peer_consistent && !self.resync_running {
            // Only a resync can make the peer's image a prefix again; by invariant R, copying
            // the record and the dirty map is enough, even when both are empty.
            self.needs_copy.extend(self.copy.iter().map(|(e, _)| e));
            self.needs_copy.extend(self.local_dirty.iter().copied());
            self.force_resync = true;
        }
        self.set_link(now, LinkState::Up);
        self.start_shipping_after_snapshot();
    }

    fn start_shipping_after_snapshot(&mut self) {
        self.up_seq = self.last_dispatched();
        let from = self.peer_applied_at_welcome.next();
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
        let applied = self.peer_applied_at_welcome.min(self.last_dispatched());
        if applied > self.applied_ack && self.buffer.keys().next().is_some_and(|f| *f <= applied.next()) {
            self.on_applied(applied);
        }
    }

    fn fence(&mut self, newer: Epoch) {
        if self.step_down(newer, None) {
            self.actions.push_back(Action::Disconnect { reason: format!("fenced by epoch {}", newer.0) });
        }
    }

    /// Stops serving and becomes a secondary of epoch `epoch`: fenced by a newer epoch, or
    /// (with `amnesia`) because this site's own store lost state. Returns false if already
    /// stepping down.
    fn step_down(&mut self, epoch: Epoch, amnesia: Option<&str>) -> bool {
        if self.phase == Phase::Fenced {
            return false;
        }
        self.phase = Phase::Fenced;
        for (_, w) in std::mem::take(&mut self.waiting) {
            self.ack(w.request, Err(HostError::Fenced));
        }
        for (_, d) in std::mem::take(&mut self.dispatched) {
            self.ack_write(d.request, Err(HostError::Fenced), d.path);
        }
        for f in std::mem::take(&mut self.flushes) {
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
            StoreWrite::Meta(Meta::SaveAsideOnResync(self.resend_record_on_snapshot)),
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
            self.dirty.keys().filter(|e| !self.local_dirty.contains(e)).map(|e| StoreWrite::PutDirty(*e)).collect();
        batch.extend(extra);
        self.persist(PersistKind::Demote, Vec::new(), batch);
        true
    }

    /// Counts `named` more extents in this connection's snapshot chunks; past twice the volume
    /// (its record and its divergent extents, each named once) the peer is refused.
    fn snapshot_too_long(&mut self, named: u64) -> bool {
        self.snapshot_extents += named;
        let limit = 2 * self.geo.extent_count();
        if self.snapshot_extents > limit {
            self.refuse(&format!("the secondary's snapshot names more than {limit} extents, twice the volume's"));
            return true;
        }
        false
    }

    fn refuse(&mut self, reason: &str) {
        self.stats.frames_refused += 1;
        self.actions.push_back(Action::Disconnect { reason: reason.to_string() });
    }

    /// `link_changed` marks when the connection last appeared or disappeared: the link-loss
    /// clock. Both sites see a connection drop within the detection skew, which is what lets
    /// the secondary give up authority before this site may degrade.
    fn set_link(&mut self, now: Time, state: LinkState) {
        if (self.link == LinkState::Down) != (state == LinkState::Down) {
            self.link_changed = now;
        }
        self.link = state;
    }

    /// Degrade applies only with no connection at all, for at least the record-update timeout.
    /// While connected (even mid-handshake or split-brain hold) the secondary believes itself
    /// in contact and keeps its record's authority, so degrading would leave it unaware.
    fn may_degrade_now(&self, now: Time) -> bool {
        self.writes_alone_on_link_loss() && self.link == LinkState::Down && now.since(self.link_changed) >= self.cfg.record_update_timeout
    }

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
        if self.generation_added.len() > self.copy.generation_count() + 64 {
            let live: BTreeSet<Generation> = self.copy.generations().map(|(g, _)| g).collect();
            self.generation_added.retain(|g, _| live.contains(g));
        }
        let dispatched = self.last_dispatched().0;
        debug_assert_eq!(
            self.shipped_bytes,
            self.buffer.range(..self.ship_next).map(|(_, i)| item_bytes(i)).sum::<u64>(),
            "data window count drifted"
        );
        let inflight = self.shipped_bytes;
        let s = &mut self.stats;
        s.record_len = self.copy.len() as u64;
        s.record_generations = self.copy.generation_count() as u64;
        s.local_dirty_len = self.local_dirty.len() as u64;
        s.lag_bytes = self.buffer_bytes;
        s.inflight_bytes = inflight;
        s.dispatched_seq = dispatched;
        s.applied_seq = self.applied_ack.0;
    }
}

impl Primary {
    /// Recounts the bytes sent and not yet applied, after `ship_next` moved back (a new
    /// connection); everywhere else the count is kept as items are sent and applied.
    fn recount_shipped(&mut self) {
        self.shipped_bytes = self.buffer.range(..self.ship_next).map(|(_, i)| item_bytes(i)).sum();
    }
}

/// Groups of host writes dispatched within this long of each other share one time.
const LAG_CLOCK_GRAIN: Duration = Duration::from_millis(1);

/// Most dispatch-time groups kept; beyond, neighbours merge.
const LAG_CLOCK_GROUPS: usize = 4096;

/// Host writes dispatched from `at` on, through sequence `last`.
#[derive(Clone, Copy, Debug)]
struct UnappliedGroup {
    at: Time,
    last: Seq,
}

fn item_bytes(item: &Apply) -> u64 {
    item.buffered_bytes()
}
