//! The simulated shells around each site's core, and the link between the sites.
//!
//! Owns: what a real site's shell does for its core, done in memory and on virtual time: the
//! store (`MemStore`, batches durable in order), the media (`Media`, media actions completing
//! in order), the side store for saved-aside extents, timers, booting a core (the core's
//! `Machine`, in the role its store holds), a crash (unsynced state lost), and the link:
//! connections, per-stream FIFO delivery with delay and bandwidth, and frames lost mid-send.
//! Must not: decide anything for the core; it executes the core's actions and reports back.
//! Nor dispatch an input by role itself where `Machine` dispatches it.

use super::{Ev, World, OTHER};
use crate::media::{decode_stamps, encode_stamps, Media, BLOCK};
use geomirror_core::frame::encode;
use geomirror_core::{
    Action, Epoch, ExtentId, Frame, Machine, MemStore, Primary, Role, SiteState, StoreId, Stream, Time, WriteKind, WriteOp,
};
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// A site: 0 starts as the primary, 1 as the secondary.
pub(super) type SiteId = usize;

/// One site: its shell's state, and its core while it is up.
pub(super) struct Site {
    pub(super) store: MemStore,
    pub(super) media: Media,
    /// Saved-aside extents: content before a failback overwrote it.
    pub(super) side: BTreeMap<ExtentId, Vec<u64>>,
    /// The core's state machine, in the role its store holds.
    pub(super) core: Option<Machine>,
    /// Bumped at every crash and rebuild; completions of an older life are dropped.
    pub(super) life: u64,
    persist_done_at: Time,
    media_done_at: Time,
    /// Image when the site was demoted; save-aside is judged against it.
    pub(super) pre_demotion: Option<Vec<u64>>,
    pub(super) was_consistent: bool,
    /// Durable states of the store, newest last (bounded): what a rollback goes back to.
    pub(super) history: VecDeque<SiteState>,
    /// The role a new store of this site starts in (its configured role).
    pub(super) home_role: Role,
}

impl Site {
    /// A site that has never run: a fresh store in `role`, blank media, no core yet.
    pub(super) fn new(role: Role, store_id: StoreId, volume_bytes: u64) -> Site {
        Site {
            store: MemStore::new(SiteState::fresh(role, store_id)),
            media: Media::new(volume_bytes),
            side: BTreeMap::new(),
            core: None,
            life: 0,
            persist_done_at: Time::ZERO,
            media_done_at: Time::ZERO,
            pre_demotion: None,
            was_consistent: true,
            history: VecDeque::new(),
            home_role: role,
        }
    }
}

impl World {
    /// Starts site `s`'s core in the role its durable store holds.
    pub(super) fn boot(&mut self, s: SiteId) {
        let state = self.sites[s].store.durable().clone();
        let cfg = self.cfg.core.clone();
        let core = Machine::new(cfg, self.geo, &state, self.now);
        if let Some(p) = core.primary() {
            let first = p.incarnation() << 40;
            // What it applied as a secondary was numbered in another primary's sequence
            // space; when it is a secondary again, O3 starts over from its next apply.
            self.last_applied_write[s] = 0;
            self.synced_applied_write[s] = 0;
            self.bases[s].push((first, self.sites[s].media.current().to_vec()));
            self.model_cache = None;
        }
        self.sites[s].life += 1;
        self.sites[s].core = Some(core);
        self.sites[s].was_consistent = state.consistent;
        self.drain_actions(s);
    }

    pub(super) fn is_primary(&self, s: SiteId) -> bool {
        matches!(self.sites[s].core, Some(Machine::Primary(_)))
    }

    pub(super) fn primary(&mut self, s: SiteId) -> Option<&mut Primary> {
        self.sites[s].core.as_mut().and_then(Machine::primary_mut)
    }

    pub(super) fn connect_later(&mut self, after: Duration) {
        self.conn += 1;
        let conn = self.conn;
        self.schedule(after, Ev::Connect { conn });
    }

    pub(super) fn disconnect(&mut self, reconnect: bool) {
        if self.link_up {
            self.link_up = false;
            self.link_changes += 1;
            for s in 0..2 {
                self.with_core(s, |c, now| c.handle_disconnected(now));
            }
        }
        self.conn += 1;
        if reconnect && !self.cut {
            let d = self.us(2_000, 20_000);
            self.connect_later(d);
        }
    }

    pub(super) fn with_core<F: FnOnce(&mut Machine, Time)>(&mut self, s: SiteId, f: F) {
        let now = self.now;
        if let Some(c) = &mut self.sites[s].core {
            f(c, now);
        }
        self.drain_actions(s);
    }

    /// Power loss at site `s`: its core is gone, its store and media keep only what was
    /// synced, and the host's requests there fail.
    pub(super) fn crash(&mut self, s: SiteId) {
        if self.sites[s].core.is_none() {
            return;
        }
        self.report.crashes += 1;
        self.disconnect(false);
        let site = &mut self.sites[s];
        site.core = None;
        site.life += 1;
        site.store.crash();
        site.media.crash();
        let _ = site;
        self.last_applied_write[s] = self.synced_applied_write[s];
        // A demoted site that crashes before its failback ends legitimately loses its own
        // unsynced writes: what must be saved aside is what survived, for extents not saved yet.
        let per_extent = (self.geo.extent_bytes() / BLOCK) as usize;
        let img = self.sites[s].media.current().to_vec();
        let site = &mut self.sites[s];
        if let Some(pre) = &mut site.pre_demotion {
            for (e, chunk) in pre.chunks_mut(per_extent).enumerate() {
                if !site.side.contains_key(&ExtentId(e as u64)) {
                    chunk.copy_from_slice(&img[e * per_extent..e * per_extent + chunk.len()]);
                }
            }
        }
        if !self.host_sees_crash(s) {
            return;
        }
        if self.restarts_after_crash() {
            let d = self.us(1_000, 50_000);
            self.schedule(d, Ev::Restart { site: s });
        }
    }

    // ----- actions -----

    /// Executes the actions core `s` has queued, then arms its next timer.
    pub(super) fn drain_actions(&mut self, s: SiteId) {
        loop {
            let action = self.sites[s].core.as_mut().and_then(Machine::poll_action);
            let Some(action) = action else { break };
            self.execute(s, action);
            if self.sites[s].core.is_none() {
                break;
            }
        }
        // Timers: one pending wake-up per site is enough, it re-arms itself.
        let t = self.sites[s].core.as_ref().and_then(Machine::poll_timeout);
        if let Some(t) = t {
            let life = self.sites[s].life;
            let at = t.max(self.now + Duration::from_micros(1));
            if self.armed[s].is_none_or(|(armed_at, armed_life)| at < armed_at || armed_life != life) {
                self.armed[s] = Some((at, life));
                self.schedule_at(at, Ev::Timer { site: s, life });
            }
        }
    }

    /// Does what the shell does for one action of site `s`'s core.
    fn execute(&mut self, s: SiteId, action: Action) {
        let life = self.sites[s].life;
        if self.cfg.trace {
            eprintln!("{:>9}    site {s}: {}", self.now.0, brief_action(&action));
        }
        match action {
            Action::Send { stream, frame } => self.send(s, stream, frame),
            Action::Persist { token, batch } => {
                let batch = self.sites[s].store.stage(batch);
                let d = self.us(50, 800);
                let at = (self.now + d).max(self.sites[s].persist_done_at);
                self.sites[s].persist_done_at = at;
                self.schedule_at(at, Ev::PersistDone { site: s, life, token, batch });
            }
            Action::LocalWrite { token, seq, op } => {
                let epoch = self.sites[s].core.as_ref().and_then(Machine::primary).map_or(Epoch(0), Primary::epoch);
                if let Some(other) = self.writers.get(&epoch) {
                    if *other != s {
                        self.violate("O5", format!("sites {other} and {s} both wrote in epoch {}", epoch.0));
                    }
                }
                self.writers.insert(epoch, s);
                let (first, stamps) = op_stamps(&op);
                self.sites[s].media.write_stamps(op.offset, &stamps);
                self.history[s].insert(seq.0, (first, stamps));
                self.model_cache = None;
                let d = self.us(20, 300);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                let ok = self.rng.gen_range(0..1_000_000) >= self.cfg.faults.media_error_ppm;
                self.report.media_errors += u64::from(!ok);
                self.schedule_at(at, Ev::LocalWriteDone { site: s, life, token, ok });
            }
            Action::ApplyWrite { seq, op } => {
                let (_, stamps) = op_stamps(&op);
                self.sites[s].media.write_stamps(op.offset, &stamps);
                self.last_applied_write[s] = seq.0;
                self.mix(seq.0);
            }
            Action::SaveAside { extent } => {
                let r = self.geo.extent_range(extent);
                let content = self.sites[s].media.read(r.start, r.end - r.start);
                self.sites[s].side.entry(extent).or_insert(content);
                self.report.saved_aside_extents += 1;
            }
            Action::VerifyExtent { token, extent, digests } => {
                let r = self.geo.extent_range(extent);
                let data = encode_stamps(&self.sites[s].media.read(r.start, r.end - r.start));
                let differing = geomirror_core::differing_blocks(&geomirror_core::block_digests(&data, r.end - r.start), &digests);
                self.report.extents_verified += 1;
                self.report.extents_verified_equal += u64::from(differing.iter().all(|b| *b == 0));
                let d = self.us(20, 400);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                self.schedule_at(at, Ev::VerifyDone { site: s, life, token, differing });
            }
            Action::ReadExtent { token, extent } => {
                let r = self.geo.extent_range(extent);
                let data = encode_stamps(&self.sites[s].media.read(r.start, r.end - r.start));
                let d = self.us(20, 400);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                self.schedule_at(at, Ev::ReadDone { site: s, life, token, data });
            }
            Action::SyncMedia { token } => {
                let snapshot = self.sites[s].media.snapshot();
                let applied_write = self.last_applied_write[s];
                let d = self.us(50, 2_000);
                let at = (self.now + d).max(self.sites[s].media_done_at);
                self.sites[s].media_done_at = at;
                self.schedule_at(at, Ev::SyncDone { site: s, life, token, snapshot, applied_write });
            }
            Action::Ack { request, result, .. } => self.on_ack(s, request, result),
            Action::Disconnect { reason } => {
                self.mix(reason.len() as u64);
                self.disconnect(true);
            }
            Action::RoleChanged { role } => {
                if role == Role::Secondary {
                    self.sites[s].pre_demotion = Some(self.sites[s].media.current().to_vec());
                    self.sites[s].side.clear();
                }
                self.sites[s].core = None;
                self.boot(s);
                self.disconnect(true);
            }
        }
    }

    /// Puts a frame on the link, if it is up: it arrives after the link's delay, in order
    /// with the earlier frames of its stream.
    fn send(&mut self, from: SiteId, stream: Stream, frame: Frame) {
        if !self.link_up {
            return;
        }
        let bytes = match encode(&frame) {
            Ok(b) => b,
            Err(e) => {
                self.violate("codec", format!("frame failed to encode: {e}"));
                return;
            }
        };
        if self.rng.gen_range(0..1_000_000) < self.cfg.faults.drop_mid_frame_ppm && !self.quiescing {
            // The connection dies with this frame half sent.
            self.report.link_cuts += 1;
            self.disconnect(true);
            return;
        }
        let to = OTHER[from];
        let (lo, hi) = self.cfg.delay_us;
        let d = self.us(lo, hi);
        // Bulk data serialises on the link at its bandwidth; control frames use their own
        // connection and never queue behind it.
        let mut leave = self.now;
        if let (Stream::Data(_) | Stream::Resync, Some(rate)) = (stream, self.cfg.link_bytes_per_sec) {
            let busy = self.link_busy_until[from].max(self.now);
            leave = busy + Duration::from_micros((bytes.len() as u64 * 1_000_000).div_ceil(rate.max(1)));
            self.link_busy_until[from] = leave;
        }
        let last = self.last_delivery.get(&(from, stream)).copied().unwrap_or(Time::ZERO);
        let at = (leave + d).max(last);
        self.last_delivery.insert((from, stream), at);
        let conn = self.conn;
        self.schedule_at(at, Ev::Deliver { to, conn, bytes });
    }
}

/// A frame as one line of the trace.
pub(super) fn brief_frame(f: &Frame) -> String {
    match f {
        Frame::Data { seq, apply: geomirror_core::frame::Apply::Write(op), .. } => {
            format!("data seq {} write {}+{}", seq.0, op.offset, op.len)
        }
        Frame::Data { seq, apply, .. } => format!("data seq {} {apply:?}", seq.0),
        other => format!("{other:?}"),
    }
}

/// An action as one line of the trace.
fn brief_action(a: &Action) -> String {
    match a {
        Action::Send { stream, frame } => format!("send {stream:?} {}", brief_frame(frame)),
        Action::LocalWrite { token, seq, op } => {
            format!("local write {token:?} seq {} {}+{} stamp {}", seq.0, op.offset, op.len, op_stamps(op).1.first().map_or(0, |s| s >> 16))
        }
        Action::ApplyWrite { seq, op } => {
            format!("apply seq {} {}+{} stamp {}", seq.0, op.offset, op.len, op_stamps(op).1.first().map_or(0, |s| s >> 16))
        }
        Action::Persist { token, batch } if batch.len() > 6 => format!("persist {token:?} {} writes {:?}..", batch.len(), &batch[..6]),
        other => format!("{other:?}"),
    }
}

/// The first block and the stamps of a write.
fn op_stamps(op: &WriteOp) -> (usize, Vec<u64>) {
    let first = (op.offset / BLOCK) as usize;
    let n = (op.len / BLOCK) as usize;
    match &op.kind {
        WriteKind::Data(b) => (first, decode_stamps(b)),
        WriteKind::Zero | WriteKind::Trim => (first, vec![0; n]),
    }
}
