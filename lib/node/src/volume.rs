//! One volume's driver: a thread that owns the core's state machine and carries out its
//! actions.
//!
//! Owns: the `Primary` or `Secondary` of one volume (rebuilt from the store when the core
//! says the role changed), the order in which its actions are executed, the map from the
//! core's request ids to the hosts waiting for an answer, the frames it hands to the link,
//! and the volume's failure state.
//!
//! Must not: decide when a write may be acknowledged; it answers a host only when the core
//! emits `Ack`. The core's execution contract (see `geomirror_core::action`) holds here by
//! construction:
//! - media writes run inline on this thread, one after another, in the order emitted, so
//!   overlapping writes reach the media in sequence order and a `SyncMedia` (run on the sync
//!   thread, after it is emitted) covers every write emitted before it;
//! - `Persist` batches are written in order and reported only once durable;
//! - a secondary's `ApplyWrite`s run inline in order, and a `SaveAside` copy is durable
//!   before the next media action runs;
//! - `Send` frames go to the link's outbox in order.
//!
//! Why a thread and not a task: local media calls block (page-cache writeback can stall a
//! `pwrite` for a long time), and the core must see its actions done in order. A thread per
//! volume keeps the async NBD connections free and the ordering trivially true.

use crate::aside::Aside;
use crate::config::VolumeConfig;
use crate::media::{Media, MediaError};
use crate::metrics::VolumeMetrics;
use crate::store::Store;
use bytes::Bytes;
use geomirror_core::StoreWrite;
use geomirror_core::{
    Action, CoreConfig, Epoch, Frame, Geometry, HostError, LinkState, Primary, RequestId, Role, Secondary, Seq, SiteState, Stream, Time,
    Token, WriteOp, WritePath,
};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvError, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the driver polls for the next request before it sleeps (see `next_input`).
/// Measured on 2 cores: about 10% more 4 KiB writes at queue depth 1 than sleeping at once.
const SPIN: Duration = Duration::from_micros(50);

/// Called once with the result of a host request.
pub type Completion = Box<dyn FnOnce(Result<(), HostError>) + Send>;

/// Called once with the result of an operator's request.
pub type Reply<T> = Box<dyn FnOnce(Result<T, String>) + Send>;

/// A primary drained for a switchover: its peer holds every write. `record` lists the
/// extents of the record, which a switchover compares on both sites before swapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drained {
    pub epoch: Epoch,
    pub record: Vec<u64>,
}

/// What a promotion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromoteOutcome {
    /// This request promoted the volume; durable before this is reported.
    Promoted(geomirror_core::PromoteReport),
    /// The volume was already primary (of this epoch), or a concurrent request promoted it.
    AlreadyPrimary { epoch: Epoch },
}

enum Input {
    Write {
        op: WriteOp,
        fua: bool,
        done: Completion,
        /// When the host's write reached the volume: its latency runs from here.
        at: Instant,
    },
    Flush {
        done: Completion,
    },
    Synced {
        token: Token,
        result: io::Result<()>,
    },
    /// Store batches made durable together, each with the machine that asked for it.
    Persisted {
        done: Vec<(u64, Token)>,
        result: io::Result<()>,
    },
    Link(LinkEvent),
    Status(Box<dyn FnOnce(VolumeStatus) + Send>),
    /// Call this once the primary is drained (now, if it is).
    WhenDrained(Box<dyn FnOnce() + Send>),
    Promote {
        force: bool,
        reply: Reply<PromoteOutcome>,
    },
    Drain {
        deadline: Duration,
        /// Demote once drained; otherwise stay drained (writes wait) until `Resume`.
        demote: bool,
        reply: Reply<Drained>,
    },
    Resume,
    /// Keep this primary's data after a split brain: the peer saves its own aside and is
    /// resynced from here.
    ResolveSplitBrain {
        reply: Reply<()>,
    },
    /// Finish what was accepted, sync, and end the thread.
    Stop,
}

/// What the link tells a volume. Each event names the link session it belongs to; the
/// volume ignores events of any session but its current one, so nothing of a dead
/// connection reaches the core after the next one started.
#[derive(Debug)]
pub enum LinkEvent {
    /// An authenticated connection to the peer exists (its certificate was checked).
    Connected(u64),
    Disconnected(u64),
    Frame(u64, Frame),
    /// The peer was last heard from `at`, and is declared lost after `silence` without a
    /// word: what a refused promotion tells the operator.
    Heard {
        session: u64,
        at: Instant,
        silence: Duration,
    },
}

/// Why a promotion is refused while the primary of `epoch` is connected: how long ago it
/// was heard from and how long until it is declared lost, so the operator knows whether to
/// wait or force.
fn peer_alive(epoch: u64, heard: Option<(Instant, Duration)>) -> String {
    let refused = geomirror_core::PromoteError::PeerAlive(epoch);
    let Some((at, silence)) = heard else { return refused.to_string() };
    let ago = at.elapsed();
    let left = silence.saturating_sub(ago);
    format!(
        "the primary of epoch {epoch} was last heard from {:.1} s ago; it is declared lost after {:.1} s of silence, in {:.1} s; promoting before then would make two writers: wait, or use --force",
        ago.as_secs_f64(),
        silence.as_secs_f64(),
        left.as_secs_f64()
    )
}

/// What a volume asks of the link, in order, stamped with the session the volume was in
/// when it asked: the link drops anything stamped with another session.
#[derive(Debug, PartialEq)]
pub enum Outbound {
    Send {
        session: u64,
        stream: Stream,
        frame: Frame,
    },
    /// Close the connection (a refusal or a protocol error); the link reconnects later.
    Disconnect {
        session: u64,
        reason: String,
    },
}

/// Work for the store thread, done in the order sent.
enum StoreJob {
    /// A batch of `machine` (see `Driver::machine`), answered with `Input::Persisted`.
    Write { machine: u64, token: Token, batch: Vec<StoreWrite> },
    /// The state after every earlier write.
    Load(mpsc::Sender<SiteState>),
}

/// A synced store write slower than this is logged: every miss waits for one.
const SLOW_STORE_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// Most batches made durable by one synced store write.
const STORE_GROUP: usize = 256;

/// The store thread: makes batches durable off the volume's driver thread, so that a slow
/// synced write (on a disk busy with writeback, an fsync can take seconds) holds back only
/// what waits for it, never hits, flushes or status. Batches queued while one write runs are
/// made durable together by the next (group commit), in order.
///
/// Between jobs, every `CHECKPOINT_INTERVAL`, and when the volume stops, the store takes a
/// checkpoint (`Store::checkpoint`): what lived only in a log moves into the store's files.
fn run_store(mut store: Box<dyn Store>, jobs: mpsc::Receiver<StoreJob>, back: mpsc::Sender<Input>) {
    let mut next = None;
    let mut checkpoint_at = Instant::now() + crate::store::CHECKPOINT_INTERVAL;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => match jobs.recv_timeout(checkpoint_at.saturating_duration_since(Instant::now())) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) => {
                    checkpoint_at = Instant::now() + crate::store::CHECKPOINT_INTERVAL;
                    if let Err(e) = store.checkpoint() {
                        // A store that cannot flush cannot be trusted to keep what it acknowledges.
                        let _ = back.send(Input::Persisted {
                            done: Vec::new(),
                            result: Err(io::Error::other(format!("store checkpoint failed: {e}"))),
                        });
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // A clean stop: leave nothing only in a log.
                    if let Err(e) = store.checkpoint() {
                        tracing::error!(error = %e, "the store's checkpoint at stop failed; it is checked at the next open");
                    }
                    return;
                }
            },
        };
        match job {
            StoreJob::Load(reply) => {
                let _ = reply.send(store.load());
            }
            StoreJob::Write { machine, token, batch } => {
                let mut done = vec![(machine, token)];
                let mut batches = vec![batch];
                while batches.len() < STORE_GROUP {
                    match jobs.try_recv() {
                        Ok(StoreJob::Write { machine, token, batch }) => {
                            done.push((machine, token));
                            batches.push(batch);
                        }
                        Ok(load) => {
                            next = Some(load);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                let result = store.write_group(&batches);
                let took = started.elapsed();
                if took >= SLOW_STORE_WRITE {
                    tracing::warn!(
                        batches = batches.len(),
                        took_ms = took.as_millis() as u64,
                        "a synced store write was slow: misses and other writes waiting for the store wait this long"
                    );
                }
                let failed = result.is_err();
                if back.send(Input::Persisted { done, result }).is_err() || failed {
                    // After a failed write the volume fails; nothing more is written.
                    return;
                }
            }
        }
    }
}

/// A snapshot of a volume for status, tests and metrics.
#[derive(Clone, Debug)]
pub struct VolumeStatus {
    pub role: Role,
    pub epoch: Epoch,
    /// Primary: serving, draining (for a demotion), starting or fenced.
    pub phase: &'static str,
    /// Primary: the link has finished its handshake. Secondary: a primary is connected.
    pub link_up: bool,
    /// Primary: nothing waits, is in flight or unapplied; both images hold the same data.
    pub drained: bool,
    /// Primary: highest sequence the peer has durably applied. Secondary: its own.
    pub durable_applied: Seq,
    /// Extents in the record (the primary's copy, or the secondary's durable record).
    pub record_extents: u64,
    pub extent_bytes: u64,
    /// Secondary: the record covers every difference (no degrade since the last resync).
    /// Primary: no local dirty map outside the peer's record.
    pub authoritative: bool,
    /// Secondary: its image is a prefix of the primary's history (not mid-resync).
    pub consistent: bool,
    pub split_brain: bool,
    /// Primary: bytes written and not yet durably applied on the peer.
    pub lag_bytes: u64,
    /// Primary: age of the oldest write the peer may lack (the RPO now), in milliseconds.
    pub lag_ms: u64,
    /// Primary: what a failover now would copy back to this site afterwards.
    pub failback_debt_bytes: u64,
    /// Primary: what a resync onto the peer still has to copy (failback progress).
    pub resync_remaining_bytes: u64,
    pub resync_in_progress: bool,
    pub resync_bytes_copied: u64,
    /// Primary: failback extents checked by digest instead of copied, in bytes and extents,
    /// and how many of those the peer found different (copied after all).
    pub resync_bytes_verified: u64,
    pub resync_extents_verified: u64,
    pub resync_extents_mismatched: u64,
    pub writes: u64,
    pub hits: u64,
    pub misses: u64,
    pub record_updates: u64,
    pub record_rtt_avg_us: u64,
    /// Secondary: extents saved aside before a resync overwrote them.
    pub extents_saved_aside: u64,
    pub failed: bool,
    /// The record's bound (`record_capacity_extents`).
    pub record_capacity_extents: u64,
    /// This site's store identity, and its peer's as remembered (None before the first
    /// handshake of a new pair).
    pub store_id: geomirror_core::StoreId,
    pub peer_store: Option<geomirror_core::StoreId>,
    /// Secondary: this store lost state it had acknowledged and is not trusted until a full
    /// verified resync ends. Primary: the peer's store is such an amnesiac, and is owed that
    /// resync.
    pub amnesiac: bool,
    /// Why the last handshake found a store an amnesiac, when it did.
    pub amnesia_reason: Option<String>,
    /// Primary: the full resync under way, as extents checked of the volume's.
    pub full_resync: Option<(u64, u64)>,
    /// The state machine's own counters, whole, for metrics.
    pub primary_stats: Option<geomirror_core::stats::PrimaryStats>,
    pub secondary_stats: Option<geomirror_core::stats::SecondaryStats>,
}

/// The state machine of the volume's current role.
enum Machine {
    Primary(Box<Primary>),
    Secondary(Box<Secondary>),
}

impl Machine {
    fn build(cfg: &CoreConfig, geo: Geometry, state: &SiteState, now: Time) -> Machine {
        match state.role {
            Role::Primary => Machine::Primary(Box::new(Primary::new(cfg.clone(), geo, state, now))),
            Role::Secondary => Machine::Secondary(Box::new(Secondary::new(cfg.clone(), geo, state))),
        }
    }
    fn poll_action(&mut self) -> Option<Action> {
        match self {
            Machine::Primary(p) => p.poll_action(),
            Machine::Secondary(s) => s.poll_action(),
        }
    }
    fn poll_timeout(&self) -> Option<Time> {
        match self {
            Machine::Primary(p) => p.poll_timeout(),
            Machine::Secondary(s) => s.poll_timeout(),
        }
    }
    fn handle_timeout(&mut self, now: Time) {
        match self {
            Machine::Primary(p) => p.handle_timeout(now),
            Machine::Secondary(s) => s.handle_timeout(now),
        }
    }
    fn handle_persisted(&mut self, now: Time, token: Token) {
        match self {
            Machine::Primary(p) => p.handle_persisted(now, token),
            Machine::Secondary(s) => s.handle_persisted(now, token),
        }
    }
    fn handle_media_synced(&mut self, now: Time, token: Token) {
        match self {
            Machine::Primary(p) => p.handle_media_synced(now, token),
            Machine::Secondary(s) => s.handle_media_synced(now, token),
        }
    }
    fn handle_connected(&mut self, now: Time) {
        match self {
            Machine::Primary(p) => p.handle_connected(now),
            Machine::Secondary(s) => s.handle_connected(now),
        }
    }
    fn handle_disconnected(&mut self, now: Time) {
        match self {
            Machine::Primary(p) => p.handle_disconnected(now),
            Machine::Secondary(s) => s.handle_disconnected(now),
        }
    }
    fn handle_frame(&mut self, now: Time, f: Frame) {
        match self {
            Machine::Primary(p) => p.handle_frame(now, f),
            Machine::Secondary(s) => s.handle_frame(now, f),
        }
    }
    fn status(&self, now: Time, failed: bool, extent_bytes: u64) -> VolumeStatus {
        match self {
            Machine::Primary(p) => {
                let st = p.stats();
                VolumeStatus {
                    role: Role::Primary,
                    epoch: p.epoch(),
                    phase: match p.phase() {
                        geomirror_core::Phase::Starting => "starting",
                        geomirror_core::Phase::Serving => "serving",
                        geomirror_core::Phase::Draining => "draining",
                        geomirror_core::Phase::Fenced => "fenced",
                    },
                    link_up: p.link() == LinkState::Up,
                    drained: p.is_drained(),
                    durable_applied: p.applied_ack(),
                    record_extents: p.record_copy().len() as u64,
                    extent_bytes,
                    authoritative: p.local_dirty().is_empty() && !p.full_resync_owed(),
                    consistent: true,
                    split_brain: p.split_brain(),
                    lag_bytes: st.lag_bytes,
                    lag_ms: p.behind_since().map_or(0, |t| now.since(t).as_millis() as u64),
                    failback_debt_bytes: p.failback_debt().bytes,
                    resync_remaining_bytes: p.resync_plan().bytes,
                    resync_in_progress: p.resync_in_progress(),
                    resync_bytes_copied: st.resync_bytes_copied,
                    resync_bytes_verified: st.resync_bytes_verified,
                    resync_extents_verified: st.resync_extents_verified,
                    resync_extents_mismatched: st.resync_extents_mismatched,
                    writes: st.writes,
                    hits: st.hits,
                    misses: st.misses,
                    record_updates: st.record_updates_sent,
                    record_rtt_avg_us: st.record_rtt_us_total.checked_div(st.record_rtt_count).unwrap_or(0),
                    extents_saved_aside: 0,
                    failed,
                    record_capacity_extents: 0,
                    store_id: p.store_id(),
                    peer_store: p.peer_store(),
                    amnesiac: p.full_resync_owed(),
                    amnesia_reason: p.peer_amnesia().map(str::to_owned),
                    full_resync: p.full_resync_progress(),
                    primary_stats: Some(st.clone()),
                    secondary_stats: None,
                }
            }
            Machine::Secondary(s) => {
                let st = s.stats();
                VolumeStatus {
                    role: Role::Secondary,
                    epoch: s.epoch(),
                    phase: "secondary",
                    link_up: s.is_connected(),
                    drained: false,
                    durable_applied: s.durable_applied(),
                    record_extents: s.record().len() as u64,
                    extent_bytes,
                    authoritative: s.is_authoritative(),
                    consistent: s.is_consistent(),
                    split_brain: s.split_brain_evidence(),
                    lag_bytes: 0,
                    lag_ms: 0,
                    failback_debt_bytes: 0,
                    resync_remaining_bytes: 0,
                    resync_in_progress: false,
                    resync_bytes_copied: 0,
                    resync_bytes_verified: 0,
                    resync_extents_verified: 0,
                    resync_extents_mismatched: 0,
                    writes: 0,
                    hits: 0,
                    misses: 0,
                    record_updates: st.record_updates,
                    record_rtt_avg_us: 0,
                    extents_saved_aside: st.extents_saved_aside,
                    failed,
                    record_capacity_extents: 0,
                    store_id: s.store_id(),
                    peer_store: s.peer_store(),
                    amnesiac: s.is_amnesiac(),
                    amnesia_reason: s.amnesia_reason().map(str::to_owned),
                    full_resync: None,
                    primary_stats: None,
                    secondary_stats: Some(st.clone()),
                }
            }
        }
    }
}

/// Plain counters of one volume, for status and (later) metrics.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub media_errors: AtomicU64,
}

/// A handle to a running volume; cheap to clone, shared by all its connections.
#[derive(Clone)]
pub struct Volume {
    tx: mpsc::Sender<Input>,
    media: Arc<Media>,
    name: Arc<str>,
    description: Arc<str>,
    failed: Arc<AtomicBool>,
    /// True while the volume is a primary: only then do hosts read or write it.
    serving: Arc<AtomicBool>,
    /// The volume's role, for the link (a primary connects to its peer).
    role: Arc<tokio::sync::watch::Sender<Role>>,
    counters: Arc<VolumeCounters>,
    media_path: Arc<std::path::Path>,
}

impl Volume {
    /// Opens the media and starts the driver and sync threads. The store's role decides
    /// whether the volume serves hosts (primary) or applies its peer's writes (secondary).
    /// Frames for the peer go to `outbox`; a volume without a link has none.
    pub fn start(
        cfg: &VolumeConfig,
        store: Box<dyn Store>,
        outbox: Option<tokio::sync::mpsc::UnboundedSender<Outbound>>,
    ) -> Result<(Volume, JoinHandle<()>), MediaError> {
        let media = Arc::new(Media::open(&cfg.media, cfg.geometry.volume_bytes())?);
        let aside = Aside::new(&cfg.media, cfg.geometry);
        let (tx, rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel::<Token>();
        let failed = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(VolumeCounters::default());
        let started = Instant::now();
        let state: SiteState = store.load();
        let core = Machine::build(&cfg.core, cfg.geometry, &state, Time(0));
        let serving = Arc::new(AtomicBool::new(state.role == Role::Primary));
        let role = Arc::new(tokio::sync::watch::Sender::new(state.role));
        let name: Arc<str> = cfg.name.as_str().into();

        let sync_media = media.clone();
        let sync_back = tx.clone();
        std::thread::Builder::new()
            .name(format!("sync-{}", cfg.name))
            .spawn(move || {
                for token in sync_rx {
                    let result = sync_media.sync();
                    if sync_back.send(Input::Synced { token, result }).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the sync thread");

        let (store_tx, store_rx) = mpsc::channel::<StoreJob>();
        let store_back = tx.clone();
        let store_thread = std::thread::Builder::new()
            .name(format!("store-{}", cfg.name))
            .spawn(move || run_store(store, store_rx, store_back))
            .expect("spawn the store thread");

        let driver = Driver {
            core,
            link_session: None,
            link_heard: None,
            cfg: cfg.core.clone(),
            geo: cfg.geometry,
            outbox,
            aside,
            aside_epoch: 0,
            media_path: cfg.media.clone(),
            media: media.clone(),
            store_tx: Some(store_tx),
            store_thread: Some(store_thread),
            machine: 0,
            pending: BTreeMap::new(),
            metrics: VolumeMetrics::new(&cfg.name),
            next_request: 1,
            sync_tx,
            started,
            failed: failed.clone(),
            serving: serving.clone(),
            role: role.clone(),
            counters: counters.clone(),
            name: name.clone(),
            stopping: false,
            drain_waiters: Vec::new(),
            promote_waiters: Vec::new(),
            demotion: None,
        };
        let handle = std::thread::Builder::new().name(format!("volume-{}", cfg.name)).spawn(move || driver.run(rx)).expect("spawn");
        let volume = Volume {
            tx,
            media,
            name,
            description: cfg.description.as_str().into(),
            failed,
            serving,
            role,
            counters,
            media_path: cfg.media.as_path().into(),
        };
        Ok((volume, handle))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    pub fn size_bytes(&self) -> u64 {
        self.media.size_bytes()
    }
    pub fn counters(&self) -> &VolumeCounters {
        &self.counters
    }

    /// The side files of past failbacks (`<media>.aside.e<epoch>`) and their extent counts.
    pub fn aside_files(&self) -> Vec<(std::path::PathBuf, u64)> {
        crate::aside::Aside::list(&self.media_path)
    }

    /// The volume's role now, and each change of it.
    pub fn watch_role(&self) -> tokio::sync::watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Submits a write; `done` is called when the core acknowledges or fails it.
    pub fn write(&self, op: WriteOp, fua: bool, done: Completion) {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(op.payload_bytes(), Ordering::Relaxed);
        self.submit(Input::Write { op, fua, done, at: Instant::now() });
    }

    /// Hands the volume an event of its link.
    pub fn link(&self, event: LinkEvent) {
        let _ = self.tx.send(Input::Link(event));
    }

    /// Calls `f` with a snapshot of the volume, from its driver thread.
    pub fn status(&self, f: impl FnOnce(VolumeStatus) + Send + 'static) {
        let _ = self.tx.send(Input::Status(Box::new(f)));
    }

    /// Calls `f` once this volume, as primary, has nothing waiting, in flight or unapplied
    /// on its peer: the two images are equal. On a secondary or a fenced primary, at once.
    pub fn when_drained(&self, f: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(Input::WhenDrained(Box::new(f)));
    }

    /// Promotes a secondary (see `Secondary::promote`); `reply` gets the outcome once the
    /// new role is durable and serving. Idempotent: a primary answers `AlreadyPrimary`.
    pub fn promote(&self, force: bool, reply: Reply<PromoteOutcome>) {
        self.submit(Input::Promote { force, reply });
    }

    /// Planned demotion of a primary: stops accepting writes, waits (up to `deadline`) until
    /// the peer has applied everything, then becomes a secondary of the same epoch. On
    /// timeout the drain ends and the volume serves again.
    pub fn demote(&self, deadline: Duration, reply: Reply<Drained>) {
        self.submit(Input::Drain { deadline, demote: true, reply });
    }

    /// Stops accepting writes and waits (up to `deadline`) until the peer has applied
    /// everything; the volume stays drained until `resume` or a demotion.
    pub fn drain(&self, deadline: Duration, reply: Reply<Drained>) {
        self.submit(Input::Drain { deadline, demote: false, reply });
    }

    /// After a split brain, keeps this (primary) site's data: see `Primary::resolve_split_brain`.
    pub fn resolve_split_brain(&self, reply: Reply<()>) {
        self.submit(Input::ResolveSplitBrain { reply });
    }

    /// Ends a drain: the volume takes writes again.
    pub fn resume(&self) {
        self.submit(Input::Resume);
    }

    /// CRC-32C of each extent's content on this site's media (blocking; off the async
    /// threads). With the volume drained, both sites' answers must agree.
    pub fn checksums(&self, extents: &[u64], extent_bytes: u64) -> Result<Vec<u32>, HostError> {
        // Every extent is checked by the geometry before any is read: an extent number times
        // the extent size may wrap around to another extent.
        let geo = Geometry::new(self.media.size_bytes(), extent_bytes).map_err(|_| HostError::OutOfRange)?;
        if extents.iter().any(|e| !geo.contains(geomirror_core::ExtentId(*e))) {
            return Err(HostError::OutOfRange);
        }
        let mut buf = vec![0u8; geo.extent_bytes() as usize];
        let mut out = Vec::with_capacity(extents.len());
        for e in extents {
            let range = geo.extent_range(geomirror_core::ExtentId(*e));
            let len = (range.end - range.start) as usize;
            self.media.read_at(&mut buf[..len], range.start).map_err(|_| HostError::Media)?;
            out.push(crc32c::crc32c(&buf[..len]));
        }
        Ok(out)
    }

    pub fn flush(&self, done: Completion) {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.submit(Input::Flush { done });
    }

    fn submit(&self, input: Input) {
        if let Err(mpsc::SendError(input)) = self.tx.send(input) {
            // The driver has stopped: the request is answered, never dropped.
            match input {
                Input::Write { done, .. } | Input::Flush { done } => done(Err(HostError::NotServing)),
                Input::Promote { reply, .. } => reply(Err("the volume has stopped".into())),
                Input::Drain { reply, .. } => reply(Err("the volume has stopped".into())),
                Input::ResolveSplitBrain { reply } => reply(Err("the volume has stopped".into())),
                Input::Synced { .. }
                | Input::Persisted { .. }
                | Input::Stop
                | Input::Link(_)
                | Input::Status(_)
                | Input::WhenDrained(_)
                | Input::Resume => {}
            }
        }
    }

    /// Reads from the media. Blocking: call it off the async threads. Reads see every write
    /// acknowledged before they were issued, since acknowledgement follows the media write.
    pub fn read(&self, offset: u64, len: u32) -> Result<Bytes, HostError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(HostError::Media);
        }
        if !self.serving.load(Ordering::Acquire) {
            // A secondary's image is mid-apply: hosts read it only after a promotion.
            return Err(HostError::NotServing);
        }
        let mut buf = vec![0u8; len as usize];
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
        match self.media.read_at(&mut buf, offset) {
            Ok(()) => Ok(Bytes::from(buf)),
            Err(e) => {
                self.counters.media_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(volume = %self.name, offset, len, error = %e, "media read failed");
                Err(HostError::Media)
            }
        }
    }

    /// Asks the driver to finish accepted requests, sync the media and end.
    pub fn stop(&self) {
        let _ = self.tx.send(Input::Stop);
    }
}

struct Driver {
    core: Machine,
    /// The link session the core is connected through, if any.
    link_session: Option<u64>,
    /// When the current session's peer was last heard from, and the silence that declares it
    /// lost (`LinkEvent::Heard`).
    link_heard: Option<(Instant, Duration)>,
    serving: Arc<AtomicBool>,
    role: Arc<tokio::sync::watch::Sender<Role>>,
    cfg: CoreConfig,
    geo: Geometry,
    outbox: Option<tokio::sync::mpsc::UnboundedSender<Outbound>>,
    /// The side file of the current failback (its epoch), opened on first use.
    aside: Aside,
    aside_epoch: u64,
    media_path: std::path::PathBuf,
    media: Arc<Media>,
    /// The store thread's queue (None once the driver has ended), and the thread.
    store_tx: Option<mpsc::Sender<StoreJob>>,
    store_thread: Option<JoinHandle<()>>,
    /// Which state machine this is since the volume started: a store completion asked for by
    /// an earlier one (before a role change) is not given to the current one.
    machine: u64,
    /// Host requests awaiting their ack, with the arrival time of writes.
    pending: BTreeMap<RequestId, (Completion, Option<Instant>)>,
    metrics: VolumeMetrics,
    next_request: u64,
    sync_tx: mpsc::Sender<Token>,
    started: Instant,
    failed: Arc<AtomicBool>,
    counters: Arc<VolumeCounters>,
    name: Arc<str>,
    stopping: bool,
    drain_waiters: Vec<Box<dyn FnOnce() + Send>>,
    /// Promotions waiting for the new role to be durable: the report of the one that
    /// promoted, none for requests that found a promotion under way.
    promote_waiters: Vec<(Option<geomirror_core::PromoteReport>, Reply<PromoteOutcome>)>,
    /// A planned demotion: drains until the deadline, then demotes; answered once the role
    /// changed.
    demotion: Option<Demotion>,
}

struct Demotion {
    deadline: Instant,
    demote: bool,
    demoted: bool,
    reply: Reply<Drained>,
}

impl Driver {
    /// Whether this site holds nothing its peer still lacks: a serving primary once drained;
    /// a secondary or a fenced old primary always, since a newer primary has its writes'
    /// say now.
    fn nothing_to_drain(&self) -> bool {
        match &self.core {
            Machine::Primary(p) => p.is_drained() || p.phase() == geomirror_core::Phase::Fenced,
            Machine::Secondary(_) => true,
        }
    }

    fn now(&self) -> Time {
        Time(self.started.elapsed().as_micros() as u64)
    }

    /// The next input; `Ok(None)` when the core's timer is due first, `Err` once every
    /// sender is gone.
    fn next_input(&self, rx: &mpsc::Receiver<Input>) -> Result<Option<Input>, RecvError> {
        // Spin briefly before sleeping: at queue depth 1 the next request usually arrives
        // within microseconds, and waking a sleeping thread costs more than that. A timer
        // due meanwhile fires at most `SPIN` late.
        let spin_until = Instant::now() + SPIN;
        while Instant::now() < spin_until {
            match rx.try_recv() {
                Ok(i) => return Ok(Some(i)),
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
                Err(TryRecvError::Disconnected) => return Err(RecvError),
            }
        }
        let core_due = self.core.poll_timeout().map(|at| Duration::from_micros(at.0.saturating_sub(self.now().0)));
        let demotion_due = self.demotion.as_ref().filter(|d| !d.demoted).map(|d| d.deadline.saturating_duration_since(Instant::now()));
        match core_due.into_iter().chain(demotion_due).min() {
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(i) => Ok(Some(i)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(RecvError),
            },
            None => rx.recv().map(Some),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Input>) {
        self.execute();
        loop {
            let Ok(input) = self.next_input(&rx) else { break };
            match input {
                Some(i) => self.input(i),
                None => {
                    let now = self.now();
                    self.core.handle_timeout(now);
                }
            }
            self.execute();
            self.progress_demotion();
            if !self.drain_waiters.is_empty() && self.nothing_to_drain() {
                for f in std::mem::take(&mut self.drain_waiters) {
                    f();
                }
            }
            if self.stopping && self.pending.is_empty() {
                break;
            }
        }
        // The store finishes what it was given (its queue ends when the sender goes).
        self.store_tx = None;
        if let Some(t) = self.store_thread.take() {
            if t.join().is_err() {
                tracing::error!(volume = %self.name, "the store thread panicked");
            }
        }
        // Whatever was acknowledged without FUA becomes durable before the process ends.
        if !self.failed.load(Ordering::Acquire) {
            if let Err(e) = self.media.sync() {
                tracing::error!(volume = %self.name, error = %e, "final media sync failed");
            }
        }
        tracing::info!(volume = %self.name, "volume stopped");
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Write { op, fua, done, at } => {
                if let Some(refusal) = self.refuse() {
                    return done(Err(refusal));
                }
                let request = self.request(done, Some(at));
                match &mut self.core {
                    Machine::Primary(p) => p.handle_host_write(now, request, op, fua),
                    // Hosts write to the primary only; a secondary serves no writes until
                    // it is promoted.
                    Machine::Secondary(_) => self.answer(request, Err(HostError::NotServing)),
                }
            }
            Input::Flush { done } => {
                if let Some(refusal) = self.refuse() {
                    return done(Err(refusal));
                }
                let request = self.request(done, None);
                match &mut self.core {
                    Machine::Primary(p) => p.handle_host_flush(now, request),
                    Machine::Secondary(_) => self.answer(request, Err(HostError::NotServing)),
                }
            }
            Input::Link(event) => {
                if !self.failed.load(Ordering::Acquire) {
                    self.link_event(now, event);
                }
            }
            Input::Status(f) => {
                let mut status = self.core.status(self.now(), self.failed.load(Ordering::Acquire), self.geo.extent_bytes());
                status.record_capacity_extents = self.cfg.record_capacity_extents;
                f(status)
            }
            Input::WhenDrained(f) if self.nothing_to_drain() => f(),
            Input::WhenDrained(f) => self.drain_waiters.push(f),
            Input::Promote { force, reply } => match &mut self.core {
                Machine::Primary(p) => reply(Ok(PromoteOutcome::AlreadyPrimary { epoch: p.epoch() })),
                Machine::Secondary(s) => match s.promote(force) {
                    Ok(report) => {
                        tracing::warn!(volume = %self.name, epoch = report.new_epoch.0, record_extents = report.record_extents, authoritative = report.authoritative, consistent = report.consistent, "promoting to primary");
                        self.promote_waiters.push((Some(report), reply));
                    }
                    Err(geomirror_core::PromoteError::InProgress) => self.promote_waiters.push((None, reply)),
                    Err(e) => reply(Err(match e {
                        geomirror_core::PromoteError::PeerAlive(epoch) => peer_alive(epoch, self.link_heard),
                        other => other.to_string(),
                    })),
                },
            },
            Input::ResolveSplitBrain { reply } => match &mut self.core {
                Machine::Primary(p) if p.split_brain() => {
                    tracing::warn!(volume = %self.name, "split brain resolved in favour of this site: the peer saves its own data aside and is resynced from here");
                    p.resolve_split_brain(now);
                    reply(Ok(()));
                }
                Machine::Primary(_) => reply(Err("no split brain is being held on this site (is the peer connected?)".into())),
                Machine::Secondary(_) => reply(Err("run this on the site whose data you keep, the primary of the newer epoch".into())),
            },
            Input::Resume => {
                if let Machine::Primary(p) = &mut self.core {
                    // A drain or demotion still waiting for the peer is abandoned: an operator
                    // who gave up on a switchover (the link is down, say) must not leave the
                    // host's writes waiting until its deadline. One already demoted is past
                    // the point of return and finishes.
                    if let Some(d) = self.demotion.take_if(|d| !d.demoted) {
                        let what = if d.demote { "demotion" } else { "drain" };
                        (d.reply)(Err(format!(
                            "the {what} was ended by a resume before the peer had applied every write; the volume serves again"
                        )));
                    }
                    if self.demotion.is_none() && p.phase() == geomirror_core::Phase::Draining {
                        tracing::warn!(volume = %self.name, "drain ended: taking writes again");
                        p.end_drain(now);
                    }
                }
            }
            Input::Drain { deadline, demote, reply } => match &mut self.core {
                Machine::Secondary(s) if demote => reply(Ok(Drained { epoch: s.epoch(), record: Vec::new() })),
                Machine::Secondary(_) => reply(Err("a secondary has nothing to drain".into())),
                Machine::Primary(_) if self.demotion.is_some() => reply(Err("a demotion is already under way".into())),
                Machine::Primary(p) => match p.begin_drain() {
                    Ok(()) => {
                        tracing::warn!(volume = %self.name, ?deadline, demote, "draining: new writes wait until it ends");
                        self.demotion = Some(Demotion { deadline: Instant::now() + deadline, demote, demoted: false, reply });
                    }
                    Err(e) => reply(Err(format!("cannot drain now ({e:?}): the primary is not serving"))),
                },
            },
            Input::Synced { token, result } => match result {
                Ok(()) => self.core.handle_media_synced(now, token),
                Err(e) => self.fail(&format!("media sync failed: {e}")),
            },
            Input::Persisted { done, result } => match result {
                Ok(()) => {
                    for (machine, token) in done {
                        if machine == self.machine {
                            self.core.handle_persisted(now, token);
                        }
                    }
                }
                Err(e) => self.fail(&format!("store write failed: {e}")),
            },
            Input::Stop => self.stopping = true,
        }
    }

    /// Demotes once drained; gives up at the deadline.
    fn progress_demotion(&mut self) {
        let now = self.now();
        let Some(d) = &mut self.demotion else { return };
        if d.demoted {
            return;
        }
        let Machine::Primary(p) = &mut self.core else { return };
        if p.is_drained() && !d.demote {
            let record = p.record_copy().iter().map(|(e, _)| e.0).collect();
            let d = self.demotion.take().expect("present");
            (d.reply)(Ok(Drained { epoch: p.epoch(), record }));
        } else if p.is_drained() {
            match p.demote() {
                Ok(()) => d.demoted = true,
                Err(e) => {
                    let d = self.demotion.take().expect("present");
                    (d.reply)(Err(format!("demotion refused: {e:?}")));
                }
            }
            self.execute();
        } else if Instant::now() >= d.deadline {
            p.end_drain(now);
            let d = self.demotion.take().expect("present");
            tracing::warn!(volume = %self.name, "the peer did not apply everything before the deadline; demotion abandoned, serving again");
            (d.reply)(Err("the peer did not apply every write before the deadline (is the link up?); the volume serves again".into()));
            self.execute();
        }
    }

    fn refuse(&self) -> Option<HostError> {
        if self.failed.load(Ordering::Acquire) {
            Some(HostError::Media)
        } else if self.stopping {
            Some(HostError::NotServing)
        } else {
            None
        }
    }

    fn link_event(&mut self, now: Time, event: LinkEvent) {
        match event {
            LinkEvent::Connected(session) => {
                if let Some(old) = self.link_session {
                    // A newer session replaces one whose end was not reported: the peer
                    // reconnected, or both sites connected to each other (two primaries of
                    // different epochs). The old one is closed, so that its side reconnects
                    // and learns what this session decides.
                    self.core.handle_disconnected(now);
                    self.outbound(Outbound::Disconnect { session: old, reason: "replaced by a newer session".into() });
                }
                self.link_session = Some(session);
                self.link_heard = None;
                self.core.handle_connected(now);
            }
            LinkEvent::Disconnected(session) if self.link_session == Some(session) => {
                self.link_session = None;
                self.link_heard = None;
                self.core.handle_disconnected(now);
            }
            LinkEvent::Frame(session, f) if self.link_session == Some(session) => self.core.handle_frame(now, f),
            LinkEvent::Heard { session, at, silence } if self.link_session == Some(session) => self.link_heard = Some((at, silence)),
            // Of a session already replaced: ignored.
            LinkEvent::Disconnected(_) | LinkEvent::Frame(..) | LinkEvent::Heard { .. } => {}
        }
    }

    fn answer(&mut self, request: RequestId, result: Result<(), HostError>) {
        self.answer_path(request, result, None);
    }

    /// Answers a host request; a write the core acknowledged by `path` is counted and timed.
    fn answer_path(&mut self, request: RequestId, result: Result<(), HostError>, path: Option<WritePath>) {
        if let Some((done, at)) = self.pending.remove(&request) {
            if let (Some(path), Some(at), Ok(())) = (path, at, result) {
                self.metrics.write_acked(path, at.elapsed());
            }
            done(result);
        }
    }

    fn request(&mut self, done: Completion, at: Option<Instant>) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.pending.insert(id, (done, at));
        id
    }

    /// Runs the core's actions until it has none, in the order emitted.
    fn execute(&mut self) {
        while let Some(action) = self.core.poll_action() {
            if self.failed.load(Ordering::Acquire) {
                return;
            }
            let now = self.now();
            match action {
                Action::LocalWrite { token, op, .. } => {
                    let ok = self.apply(&op).is_ok();
                    if let Machine::Primary(p) = &mut self.core {
                        p.handle_local_write_done(now, token, ok);
                    }
                }
                Action::ApplyWrite { op, .. } => {
                    // The secondary's image must stay a prefix of the primary's history: a
                    // write that did not reach the media stops the volume.
                    if let Err(e) = self.apply(&op) {
                        self.fail(&format!("applying a replicated write failed: {e}"));
                    }
                }
                Action::SaveAside { extent } => {
                    let epoch = match &self.core {
                        Machine::Secondary(s) => s.epoch().0,
                        Machine::Primary(p) => p.epoch().0,
                    };
                    if self.aside_epoch != epoch {
                        self.aside = Aside::for_epoch(&self.media_path, epoch, self.geo);
                        self.aside_epoch = epoch;
                    }
                    if let Err(e) = self.aside.save(&self.media, extent) {
                        self.fail(&format!("saving extent {} aside failed: {e}", extent.0));
                    }
                }
                Action::VerifyExtent { token, extent, digests } => {
                    // Inline like every media action, so after each write emitted before it.
                    let range = self.geo.extent_range(extent);
                    let mut buf = vec![0u8; (range.end - range.start) as usize];
                    match self.media.read_at(&mut buf, range.start) {
                        Ok(()) => {
                            let mine = geomirror_core::block_digests(&buf, range.end - range.start);
                            let differing = geomirror_core::differing_blocks(&mine, &digests);
                            if let Machine::Secondary(s) = &mut self.core {
                                s.handle_verified(now, token, differing);
                            }
                        }
                        Err(e) => self.fail(&format!("reading extent {} for a failback check failed: {e}", extent.0)),
                    }
                }
                Action::ReadExtent { token, extent } => {
                    let range = self.geo.extent_range(extent);
                    let mut buf = vec![0u8; (range.end - range.start) as usize];
                    match self.media.read_at(&mut buf, range.start) {
                        Ok(()) => {
                            if let Machine::Primary(p) = &mut self.core {
                                p.handle_read_done(now, token, Bytes::from(buf));
                            }
                        }
                        Err(e) => self.fail(&format!("reading extent {} for a resync failed: {e}", extent.0)),
                    }
                }
                Action::SyncMedia { token } => {
                    if self.sync_tx.send(token).is_err() {
                        self.fail("the sync thread has ended");
                    }
                }
                Action::Persist { token, batch } => {
                    let job = StoreJob::Write { machine: self.machine, token, batch };
                    if self.store_tx.as_ref().is_none_or(|tx| tx.send(job).is_err()) {
                        self.fail("the store thread has ended");
                    }
                }
                Action::Ack { request, result, path } => self.answer_path(request, result, path),
                Action::Send { stream, frame } => {
                    let session = self.link_session.unwrap_or(0);
                    self.outbound(Outbound::Send { session, stream, frame })
                }
                Action::Disconnect { reason } => {
                    tracing::warn!(volume = %self.name, reason, "closing the link to the peer");
                    let session = self.link_session.unwrap_or(0);
                    self.outbound(Outbound::Disconnect { session, reason });
                }
                Action::RoleChanged { role } => {
                    tracing::info!(volume = %self.name, ?role, "role changed; rebuilding the state machine from the store");
                    // Requests waiting on the old role are answered: the new role decides
                    // afresh what a host may do.
                    for (_, (done, _)) in std::mem::take(&mut self.pending) {
                        done(Err(HostError::NotServing));
                    }
                    // Everything queued before the change is durable first: the store runs
                    // its jobs in order.
                    let (reply, answer) = mpsc::channel();
                    let state = match self.store_tx.as_ref().map(|tx| tx.send(StoreJob::Load(reply))) {
                        Some(Ok(())) => answer.recv().ok(),
                        _ => None,
                    };
                    let Some(state) = state else {
                        self.fail("the store thread has ended");
                        return;
                    };
                    self.machine += 1;
                    self.serving.store(state.role == Role::Primary, Ordering::Release);
                    self.role.send_replace(state.role);
                    self.core = Machine::build(&self.cfg, self.geo, &state, now);
                    // The new machine starts disconnected; the link reconnects it. The old
                    // session is closed so that the peer starts over too.
                    if let Some(old) = self.link_session.take() {
                        self.outbound(Outbound::Disconnect { session: old, reason: format!("this site is now {:?}", state.role) });
                    }
                    for (report, reply) in std::mem::take(&mut self.promote_waiters) {
                        reply(match (state.role, report) {
                            (Role::Primary, Some(r)) => Ok(PromoteOutcome::Promoted(r)),
                            (Role::Primary, None) => Ok(PromoteOutcome::AlreadyPrimary { epoch: state.epoch }),
                            (role, _) => Err(format!("the volume became {role:?} instead")),
                        });
                    }
                    if let Some(d) = self.demotion.take() {
                        (d.reply)(match state.role {
                            Role::Secondary => Ok(Drained { epoch: state.epoch, record: Vec::new() }),
                            Role::Primary => Err("the volume is still primary".into()),
                        });
                    }
                }
            }
        }
    }

    fn apply(&self, op: &WriteOp) -> io::Result<()> {
        self.media.apply(op).inspect_err(|e| {
            self.counters.media_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(volume = %self.name, offset = op.offset, len = op.len, error = %e, "media write failed");
        })
    }

    fn outbound(&mut self, o: Outbound) {
        match &self.outbox {
            // A closed outbox means the link is being torn down; the core learns of that
            // through `Disconnected` and resends what matters after the next connection.
            Some(tx) => {
                let _ = tx.send(o);
            }
            None => {
                debug_assert!(false, "a volume without a link asked to send {o:?}");
                tracing::error!(volume = %self.name, "a volume without a link asked to reach its peer; ignored");
            }
        }
    }

    /// After a failed sync or store write nothing about durability can be promised: the
    /// volume stops serving (every waiting and later request fails with an I/O error) until
    /// an operator restarts the site. Retrying an fsync after it failed can report success
    /// for data the kernel has already dropped.
    fn fail(&mut self, why: &str) {
        tracing::error!(volume = %self.name, why, "volume failed; every request now fails until the site is restarted");
        self.failed.store(true, Ordering::Release);
        for (_, (done, _)) in std::mem::take(&mut self.pending) {
            done(Err(HostError::Media));
        }
    }
}
