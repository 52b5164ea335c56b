//! The driver thread of one volume: the core's state machine, and its actions carried out.
//!
//! Owns: the volume's `Machine` (rebuilt from the store when the core says the role
//! changed), executing its actions in the order emitted, the map from the core's request ids
//! to the hosts waiting for an answer, link events in and frames out, operators' requests
//! (promotion, drain, demotion, split-brain resolution) and the volume's failure state.
//!
//! Must not: decide when a write may be acknowledged (see the module above for the
//! execution contract it keeps).

use super::handle::Shared;
use super::status;
use super::store_thread::{self, StoreJob};
use super::{AfterDrain, Completion, Drained, LinkEvent, OperatorReply, Outbound, PeerAlive, PromoteOutcome, Refused, SessionId, ToDriver};
use crate::aside::Aside;
use crate::config::VolumeConfig;
use crate::media::Media;
use crate::metrics::VolumeMetrics;
use crate::store::Store;
use crate::volume::VolumeCounters;
use bytes::Bytes;
use geomirror_core::{
    Action, CoreConfig, Geometry, HostError, Machine, Phase, RequestId, Role, SiteState, Time, Token, WriteOp, WritePath,
};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvError, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Starts the driver thread of a volume whose store holds `state`, with its sync and store
/// threads. Returns the driver's queue and its thread, which ends after `ToDriver::Stop`.
pub(super) fn start(
    cfg: &VolumeConfig,
    state: &SiteState,
    store: Box<dyn Store>,
    media: Arc<Media>,
    outbox: Option<tokio::sync::mpsc::UnboundedSender<Outbound>>,
    shared: Shared,
) -> (mpsc::Sender<ToDriver>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let sync_tx = spawn_sync(&cfg.name, media.clone(), tx.clone());
    let (store_tx, store_thread) = store_thread::spawn(&cfg.name, store, tx.clone());
    let Shared { name, failed, serving, role, counters } = shared;
    let driver = Driver {
        core: Machine::new(cfg.core.clone(), cfg.geometry, state, Time(0)),
        link_session: None,
        link_heard: None,
        cfg: cfg.core.clone(),
        geo: cfg.geometry,
        outbox,
        aside: Aside::new(&cfg.media, cfg.geometry),
        aside_epoch: 0,
        media_path: cfg.media.clone(),
        media,
        store_tx: Some(store_tx),
        store_thread: Some(store_thread),
        role_changes: 0,
        pending: BTreeMap::new(),
        metrics: VolumeMetrics::new(&cfg.name),
        next_request: 1,
        sync_tx,
        started,
        failed,
        serving,
        role,
        counters,
        name,
        stopping: false,
        drain_waiters: Vec::new(),
        promote_waiters: Vec::new(),
        drain: None,
        amnesia_seen: AmnesiaSeen::default(),
    };
    let handle = std::thread::Builder::new().name(format!("volume-{}", cfg.name)).spawn(move || driver.run(rx)).expect("spawn");
    (tx, handle)
}

/// The sync thread: runs each `SyncMedia` it is given, in order, and answers on `back`.
fn spawn_sync(name: &str, media: Arc<Media>, back: mpsc::Sender<ToDriver>) -> mpsc::Sender<Token> {
    let (tx, tokens) = mpsc::channel::<Token>();
    std::thread::Builder::new()
        .name(format!("sync-{name}"))
        .spawn(move || {
            for token in tokens {
                let result = media.sync();
                if back.send(ToDriver::Synced { token, result }).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the sync thread");
    tx
}

struct Driver {
    core: Machine,
    /// The link session the core is connected through, if any.
    link_session: Option<SessionId>,
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
    /// How many times the role changed since the volume started, which names the current
    /// state machine: a store completion asked for by an earlier one is not given to it.
    role_changes: u64,
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
    promote_waiters: Vec<(Option<geomirror_core::PromoteReport>, OperatorReply<PromoteOutcome>)>,
    /// A drain under way, until its deadline; one that demotes is answered once the role
    /// changed.
    drain: Option<Drain>,
    /// What the log last said of store identity (see `log_amnesia`).
    amnesia_seen: AmnesiaSeen,
}

/// The amnesia events the log has reported: counters and states of the current machine.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct AmnesiaSeen {
    peers_detected: u64,
    self_detected: u64,
    stepped_down: u64,
    full_resync_running: bool,
    full_resyncs_completed: u64,
    /// Online verify: extents found different, and verifies ended.
    verify_found: u64,
    verifies_completed: u64,
}

struct Drain {
    deadline: Instant,
    then: AfterDrain,
    /// The core was asked to demote: past the point of return.
    demoted: bool,
    reply: OperatorReply<Drained>,
}

impl Driver {
    /// Whether this site holds nothing its peer still lacks: a serving primary once drained;
    /// a secondary or a fenced old primary always, since a newer primary has its writes'
    /// say now.
    fn nothing_to_drain(&self) -> bool {
        match &self.core {
            Machine::Primary(p) => p.is_drained() || p.phase() == Phase::Fenced,
            Machine::Secondary(_) => true,
        }
    }

    fn now(&self) -> Time {
        Time(self.started.elapsed().as_micros() as u64)
    }

    /// The next input; `Ok(None)` when the core's timer is due first, `Err` once every
    /// sender is gone.
    fn next_input(&self, rx: &mpsc::Receiver<ToDriver>) -> Result<Option<ToDriver>, RecvError> {
        // No spinning before sleeping: on a CPU shared with the workloads the site serves,
        // a spinning driver takes the time the NBD reader needs to hand it the next request
        // (docs/benchmarks.md, "The NBD front end").
        let core_due = self.core.poll_timeout().map(|at| Duration::from_micros(at.0.saturating_sub(self.now().0)));
        let drain_due = self.drain.as_ref().filter(|d| !d.demoted).map(|d| d.deadline.saturating_duration_since(Instant::now()));
        match core_due.into_iter().chain(drain_due).min() {
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(i) => Ok(Some(i)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(RecvError),
            },
            None => rx.recv().map(Some),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<ToDriver>) {
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
            self.log_amnesia();
            self.progress_drain();
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

    fn input(&mut self, input: ToDriver) {
        let now = self.now();
        match input {
            ToDriver::Write { op, fua, done, at } => {
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
            ToDriver::Flush { done } => {
                if let Some(refusal) = self.refuse() {
                    return done(Err(refusal));
                }
                let request = self.request(done, None);
                match &mut self.core {
                    Machine::Primary(p) => p.handle_host_flush(now, request),
                    Machine::Secondary(_) => self.answer(request, Err(HostError::NotServing)),
                }
            }
            ToDriver::Link(event) => {
                if !self.failed.load(Ordering::Acquire) {
                    self.link_event(now, event);
                }
            }
            ToDriver::Status(f) => {
                let failed = self.failed.load(Ordering::Acquire);
                f(status::of(&self.core, self.now(), failed, self.geo.extent_bytes(), self.cfg.record_capacity_extents))
            }
            ToDriver::WhenDrained(f) if self.nothing_to_drain() => f(),
            ToDriver::WhenDrained(f) => self.drain_waiters.push(f),
            ToDriver::Promote { force, reply } => match &mut self.core {
                Machine::Primary(p) => reply(Ok(PromoteOutcome::AlreadyPrimary { epoch: p.epoch() })),
                Machine::Secondary(s) => match s.promote(force) {
                    Ok(report) => {
                        tracing::warn!(volume = %self.name, epoch = report.new_epoch.0, record_extents = report.record_extents, authoritative = report.authoritative, consistent = report.consistent, "promoting to primary");
                        self.promote_waiters.push((Some(report), reply));
                    }
                    Err(geomirror_core::PromoteError::InProgress) => self.promote_waiters.push((None, reply)),
                    Err(geomirror_core::PromoteError::PeerAlive(epoch)) => {
                        let heard = self.link_heard.map(|(at, silence)| (at.elapsed(), silence));
                        reply(Err(Refused::PeerAlive(PeerAlive { epoch, heard })))
                    }
                    Err(e) => reply(Err(Refused::Promote(e))),
                },
            },
            ToDriver::ResolveSplitBrain { reply } => match &mut self.core {
                Machine::Primary(p) if p.split_brain() => {
                    tracing::warn!(volume = %self.name, "split brain resolved in favour of this site: the peer saves its own data aside and is resynced from here");
                    p.resolve_split_brain(now);
                    reply(Ok(()));
                }
                Machine::Primary(_) => reply(Err(Refused::NoSplitBrain)),
                Machine::Secondary(_) => reply(Err(Refused::NotTheKeeper)),
            },
            ToDriver::Resume => {
                if let Machine::Primary(p) = &mut self.core {
                    // A drain or demotion still waiting for the peer is abandoned: an operator
                    // who gave up on a switchover (the link is down, say) must not leave the
                    // host's writes waiting until its deadline. One already demoted is past
                    // the point of return and finishes.
                    if let Some(d) = self.drain.take_if(|d| !d.demoted) {
                        (d.reply)(Err(Refused::EndedByResume { then: d.then }));
                    }
                    if self.drain.is_none() && p.phase() == Phase::Draining {
                        tracing::warn!(volume = %self.name, "drain ended: taking writes again");
                        p.end_drain(now);
                    }
                }
            }
            ToDriver::Drain { deadline, then, reply } => match &mut self.core {
                Machine::Secondary(s) if then == AfterDrain::Demote => reply(Ok(Drained { epoch: s.epoch(), record: Vec::new() })),
                Machine::Secondary(_) => reply(Err(Refused::NothingToDrain)),
                Machine::Primary(_) if self.drain.is_some() => reply(Err(Refused::DrainUnderWay)),
                Machine::Primary(p) => match p.begin_drain() {
                    Ok(()) => {
                        let demote = then == AfterDrain::Demote;
                        tracing::warn!(volume = %self.name, ?deadline, demote, "draining: new writes wait until it ends");
                        self.drain = Some(Drain { deadline: Instant::now() + deadline, then, demoted: false, reply });
                    }
                    Err(_) if p.phase() == Phase::Starting => reply(Err(Refused::Starting)),
                    Err(_) => reply(Err(Refused::Fenced)),
                },
            },
            ToDriver::Verify { extents, repair, reply } => match &mut self.core {
                Machine::Primary(p) => {
                    let (from, to) = (extents.start, extents.end);
                    match p.start_verify(now, geomirror_core::VerifyRequest { extents, repair }) {
                        Ok(()) => {
                            tracing::warn!(volume = %self.name, from, to, repair, "VERIFY started: extents {from}..{to} are compared with the peer by digest");
                            reply(Ok(()));
                        }
                        Err(e) => reply(Err(Refused::Verify(e))),
                    }
                }
                Machine::Secondary(_) => reply(Err(Refused::VerifyOnSecondary)),
            },
            ToDriver::ApproveRebuild { store, reply } => match &mut self.core {
                Machine::Primary(p) => match p.approve_rebuild(now, store) {
                    Ok(()) => {
                        tracing::warn!(volume = %self.name, peer_store = %store, "REBUILD approved: the full sync of the whole volume onto the peer's new store starts");
                        reply(Ok(()));
                    }
                    Err(e) => {
                        tracing::warn!(volume = %self.name, peer_store = %store, error = %e, "rebuild approval refused");
                        reply(Err(Refused::Approve(e)))
                    }
                },
                Machine::Secondary(_) => reply(Err(Refused::ApproveOnSecondary)),
            },
            ToDriver::CancelVerify { reply } => match &mut self.core {
                Machine::Primary(p) => {
                    let cancelled = p.cancel_verify(now);
                    if cancelled {
                        tracing::warn!(volume = %self.name, "verify cancelled by an operator");
                    }
                    reply(Ok(cancelled));
                }
                Machine::Secondary(_) => reply(Err(Refused::VerifyOnSecondary)),
            },
            ToDriver::Synced { token, result } => match result {
                Ok(()) => self.core.handle_media_synced(now, token),
                Err(e) => self.fail(&format!("media sync failed: {e}")),
            },
            ToDriver::Persisted { done, result } => match result {
                Ok(()) => {
                    for (role_changes, token) in done {
                        if role_changes == self.role_changes {
                            self.core.handle_persisted(now, token);
                        }
                    }
                }
                Err(e) => self.fail(&format!("store write failed: {e}")),
            },
            ToDriver::Stop => self.stopping = true,
        }
    }

    /// Once drained, answers a drain that holds or demotes; gives up at the deadline.
    fn progress_drain(&mut self) {
        let now = self.now();
        let Some(d) = &mut self.drain else { return };
        if d.demoted {
            return;
        }
        let Machine::Primary(p) = &mut self.core else { return };
        if p.is_drained() && d.then == AfterDrain::Hold {
            let record = p.record_copy().iter().map(|(e, _)| e.0).collect();
            let d = self.drain.take().expect("present");
            (d.reply)(Ok(Drained { epoch: p.epoch(), record }));
        } else if p.is_drained() {
            match p.demote() {
                Ok(()) => d.demoted = true,
                Err(e) => {
                    let d = self.drain.take().expect("present");
                    (d.reply)(Err(Refused::DemotionRefused(e)));
                }
            }
            self.execute();
        } else if Instant::now() >= d.deadline {
            p.end_drain(now);
            let d = self.drain.take().expect("present");
            tracing::warn!(volume = %self.name, "the peer did not apply everything before the deadline; demotion abandoned, serving again");
            (d.reply)(Err(Refused::DrainDeadline));
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
    /// Logs each amnesia event once, as it happens: a peer found an amnesiac, this store
    /// finding itself one, a primary stepping down over its own store, and a full verified
    /// resync starting and ending. (The counters start over with each machine: a role
    /// change resets what was seen.)
    fn log_amnesia(&mut self) {
        let name = &self.name;
        let now = match &self.core {
            Machine::Primary(p) => {
                let s = p.stats();
                AmnesiaSeen {
                    peers_detected: s.amnesiac_peers_detected,
                    self_detected: 0,
                    stepped_down: s.stepped_down_amnesiac,
                    full_resync_running: p.full_resync_progress().is_some(),
                    full_resyncs_completed: s.full_resyncs_completed,
                    verify_found: s.verify_extents_found,
                    verifies_completed: s.verifies_completed,
                }
            }
            Machine::Secondary(s) => AmnesiaSeen {
                self_detected: s.stats().amnesia_detected,
                full_resyncs_completed: s.stats().full_resyncs_completed,
                ..AmnesiaSeen::default()
            },
        };
        let was = self.amnesia_seen;
        if now == was {
            return;
        }
        if now.peers_detected > was.peers_detected {
            let why = self.core.primary().and_then(|p| p.peer_amnesia()).unwrap_or("").to_owned();
            match self.core.primary().and_then(|p| p.rebuild_pending()) {
                Some(store) => {
                    tracing::error!(volume = %name, why, peer_store = %store, "THE PEER IS AN AMNESIAC with a new store (a rebuilt site): its record is not trusted; the full verified resync of the whole volume WAITS FOR APPROVAL: geomirror rebuild --approve {store} (docs/operations.md, \"Rebuilding a lost site\")")
                }
                None => {
                    tracing::error!(volume = %name, why, "THE PEER IS AN AMNESIAC: its record is not trusted; a full verified resync of the whole volume follows (docs/operations.md, \"Amnesia\")")
                }
            }
        }
        if now.self_detected > was.self_detected {
            let why = self.core.secondary().and_then(|s| s.amnesia_reason()).unwrap_or("").to_owned();
            tracing::error!(volume = %name, why, "THIS STORE IS AN AMNESIAC: it lost state it had acknowledged; its primary rebuilds it with a full verified resync");
        }
        if now.stepped_down > was.stepped_down {
            tracing::error!(volume = %name, "this primary's own store lost state: it stopped serving and waits for an operator to promote one site (docs/operations.md, \"Amnesia\")");
        }
        if now.full_resync_running && !was.full_resync_running {
            tracing::warn!(volume = %name, "full verified resync started: every extent is compared by block digests, and the blocks that differ are copied");
        }
        if now.full_resyncs_completed > was.full_resyncs_completed {
            tracing::warn!(volume = %name, "full verified resync ended: the peer's record is trusted again");
        }
        if now.verify_found > was.verify_found || now.verifies_completed > was.verifies_completed {
            if let Some(v) = self.core.primary().and_then(|p| p.verify_status()) {
                let ranges: Vec<String> = v.found.keys().take(16).map(|e| format!("extent {}", e.0)).collect();
                if now.verify_found > was.verify_found {
                    tracing::error!(volume = %name, found = v.found.len(), first = ranges.join(", "), "VERIFY found extents that differ between the sites: the secondary's image is inconsistent until a resync copies them (docs/operations.md, \"Verifying the two images\")");
                }
                if now.verifies_completed > was.verifies_completed {
                    tracing::warn!(volume = %name, checked = v.checked, differ = v.found.len(), "VERIFY ended: {} extents compared, {} differ", v.checked, v.found.len());
                }
            }
        }
        self.amnesia_seen = now;
    }

    fn execute(&mut self) {
        while let Some(action) = self.core.poll_action() {
            if self.failed.load(Ordering::Acquire) {
                return;
            }
            let now = self.now();
            match action {
                Action::LocalWrite { token, op, .. } => {
                    let ok = self.apply(&op).is_ok();
                    self.core.handle_local_write_done(now, token, ok);
                }
                Action::ApplyWrite { op, .. } => {
                    // The secondary's image must stay a prefix of the primary's history: a
                    // write that did not reach the media stops the volume.
                    if let Err(e) = self.apply(&op) {
                        self.fail(&format!("applying a replicated write failed: {e}"));
                    }
                }
                Action::SaveAside { extent } => {
                    let epoch = self.core.epoch().0;
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
                            self.core.handle_verified(now, token, differing);
                        }
                        Err(e) => self.fail(&format!("reading extent {} for a failback check failed: {e}", extent.0)),
                    }
                }
                Action::ReadExtent { token, extent } => {
                    let range = self.geo.extent_range(extent);
                    let mut buf = vec![0u8; (range.end - range.start) as usize];
                    match self.media.read_at(&mut buf, range.start) {
                        Ok(()) => self.core.handle_read_done(now, token, Bytes::from(buf)),
                        Err(e) => self.fail(&format!("reading extent {} for a resync failed: {e}", extent.0)),
                    }
                }
                Action::SyncMedia { token } => {
                    if self.sync_tx.send(token).is_err() {
                        self.fail("the sync thread has ended");
                    }
                }
                Action::Persist { token, batch } => {
                    let job = StoreJob::Write { role_changes: self.role_changes, token, batch };
                    if self.store_tx.as_ref().is_none_or(|tx| tx.send(job).is_err()) {
                        self.fail("the store thread has ended");
                    }
                }
                Action::Ack { request, result, path } => self.answer_path(request, result, path),
                Action::Send { stream, frame } => {
                    let session = self.link_session.unwrap_or(SessionId::NONE);
                    self.outbound(Outbound::Send { session, stream, frame })
                }
                Action::Disconnect { reason } => {
                    tracing::warn!(volume = %self.name, reason, "closing the link to the peer");
                    let session = self.link_session.unwrap_or(SessionId::NONE);
                    self.outbound(Outbound::Disconnect { session, reason });
                }
                Action::RoleChanged { role } => {
                    if !self.role_changed(role, now) {
                        return;
                    }
                }
            }
        }
    }

    /// The core changed its role (durably): the machine is rebuilt from the store, the
    /// hosts and operators waiting on the old one are answered, and the link starts over.
    /// False if the store thread has ended (the volume failed).
    fn role_changed(&mut self, role: Role, now: Time) -> bool {
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
            return false;
        };
        self.role_changes += 1;
        self.serving.store(state.role == Role::Primary, Ordering::Release);
        self.role.send_replace(state.role);
        self.core = Machine::new(self.cfg.clone(), self.geo, &state, now);
        // The new machine starts disconnected; the link reconnects it. The old
        // session is closed so that the peer starts over too.
        if let Some(old) = self.link_session.take() {
            self.outbound(Outbound::Disconnect { session: old, reason: format!("this site is now {:?}", state.role) });
        }
        for (report, reply) in std::mem::take(&mut self.promote_waiters) {
            reply(match (state.role, report) {
                (Role::Primary, Some(r)) => Ok(PromoteOutcome::Promoted(r)),
                (Role::Primary, None) => Ok(PromoteOutcome::AlreadyPrimary { epoch: state.epoch }),
                (role, _) => Err(Refused::Became(role)),
            });
        }
        if let Some(d) = self.drain.take() {
            (d.reply)(match state.role {
                Role::Secondary => Ok(Drained { epoch: state.epoch, record: Vec::new() }),
                Role::Primary => Err(Refused::StillPrimary),
            });
        }
        true
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
