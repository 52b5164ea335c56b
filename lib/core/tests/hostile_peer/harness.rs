//! A site in a valid session with a peer that the input plays: the harness both the
//! ordinary tests (`tests/hostile_peer.rs`, a fixed-seed loop) and the cargo-fuzz targets
//! (`tests/fuzz/fuzz_targets/frames_at_*.rs`, which include this file by path) drive.
//!
//! Owns: a mini shell around one state machine that does what the node's volume driver
//! does (completes stores, media syncs, reads and failback checks when the input says so,
//! closes and reopens the connection when the site asks), and the interpretation of input
//! bytes as a sequence of steps: frames from the peer, host requests (at a primary), and
//! completions. After each step it drains `poll_action` and checks that nothing a frame
//! says made the site emit more than its own bounded state allows.
//!
//! Must not: be clever about frames' meaning beyond biasing fields towards values the site
//! accepts (its epoch, sequence numbers near its position, extents of its volume): the
//! point is to let hostile values through, not to model an honest peer.
//!
//! Why frames are built from structured input rather than decoded from raw bytes: random
//! bytes rarely make a frame of the site's epoch with sequence numbers near its position, so
//! almost every input would stop at the epoch check. Built frames reach every handler, and
//! each is still encoded and decoded with the real codec (sometimes with a byte changed on
//! the way), and one step kind decodes raw payload bytes, so the decoder is fuzzed too. The
//! input reader is a few lines here rather than the `arbitrary` crate, so that the ordinary
//! tests share it without a new dependency in the workspace.

#![allow(dead_code)]

use bytes::Bytes;
use geomirror_core::frame::{
    self, Apply, Eviction, Frame, LinkLossPolicy, Position, RecordEntries, Refusal, Remembered, Role, StreamHint, HEADER_BYTES, MAGIC,
    MAX_FRAME_BYTES, WIRE_VERSION,
};
use geomirror_core::record::ExtentRun;
use geomirror_core::{
    Action, CoreConfig, Epoch, ExtentId, Generation, Geometry, Primary, RequestId, Secondary, Seq, SiteState, StoreId, Time, Token, WriteOp,
};
use std::collections::VecDeque;
use std::time::Duration;

/// The volume: 64 extents of 64 KiB, small enough that a whole-volume run is cheap to walk
/// and large enough for runs, strides and short last blocks to matter.
pub const EXTENT_BYTES: u64 = 64 * 1024;
pub const EXTENTS: u64 = 64;
pub const PRIMARY_STORE: StoreId = StoreId(1);
pub const SECONDARY_STORE: StoreId = StoreId(2);
/// Reconnections one input may cause: each runs a whole handshake.
const MAX_RECONNECTS: u32 = 16;
/// Steps one input may take, whatever its length.
const MAX_STEPS: usize = 2048;

pub fn geometry() -> Geometry {
    Geometry::new(EXTENTS * EXTENT_BYTES, EXTENT_BYTES).expect("a valid geometry")
}

/// The smallest buffers the config allows, so that their bounds are within reach.
pub fn config() -> CoreConfig {
    let cfg = CoreConfig {
        record_capacity_extents: 16,
        max_inflight_bytes: 1 << 20,
        max_lag_bytes: 1 << 20,
        reorder_buffer_bytes: (1 << 20) + MAX_FRAME_BYTES as u64,
        resync_reads_in_flight: 2,
        ..CoreConfig::default()
    };
    cfg.validate().expect("a valid config");
    cfg
}

/// Reads input bytes as numbers; past the end every read is zero, so any input is a valid
/// (if short) program.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n <= 256 {
            self.u8() as u64 % n
        } else {
            self.u64() % n
        }
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

/// What the site emitted in one step, sorted the way the shell would act on it.
#[derive(Default)]
struct Drained {
    count: usize,
    sent: Vec<Frame>,
    persists: Vec<Token>,
    syncs: Vec<Token>,
    disconnects: Vec<String>,
    role_changed: bool,
    verifies: Vec<(Token, usize)>,
    reads: Vec<(Token, ExtentId)>,
    local_writes: Vec<Token>,
}

fn drain(mut next: impl FnMut() -> Option<Action>) -> Drained {
    let mut d = Drained::default();
    while let Some(a) = next() {
        d.count += 1;
        match a {
            Action::Send { frame, .. } => d.sent.push(frame),
            Action::Persist { token, .. } => d.persists.push(token),
            Action::SyncMedia { token } => d.syncs.push(token),
            Action::Disconnect { reason } => d.disconnects.push(reason),
            Action::RoleChanged { .. } => d.role_changed = true,
            Action::VerifyExtent { token, digests, .. } => d.verifies.push((token, digests.len())),
            Action::ReadExtent { token, extent } => d.reads.push((token, extent)),
            Action::LocalWrite { token, .. } => d.local_writes.push(token),
            Action::ApplyWrite { .. } | Action::SaveAside { .. } | Action::Ack { .. } => {}
        }
    }
    d
}

/// Passes `f` through the codec as the network would: encoded, perhaps with one byte
/// changed, and decoded. None when it does not decode (the transport closes the stream).
fn through_codec(f: &Frame, input: &mut Input) -> Option<Frame> {
    let mut bytes = frame::encode(f).ok()?;
    if input.below(16) == 0 {
        let i = input.below(bytes.len() as u64) as usize;
        bytes[i] = input.u8();
    }
    frame::decode(&bytes).ok().map(|(f, _)| f)
}

/// A frame from raw payload bytes behind a correct header.
fn raw_frame(input: &mut Input) -> Option<Frame> {
    let n = input.u8() as usize;
    let payload = input.bytes(n);
    let mut bytes = MAGIC.to_vec();
    bytes.push(WIRE_VERSION);
    bytes.extend((payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    debug_assert_eq!(bytes.len(), HEADER_BYTES + payload.len());
    frame::decode(&bytes).ok().map(|(f, _)| f)
}

fn epoch_near(input: &mut Input, current: Epoch) -> Epoch {
    match input.below(32) {
        0 => Epoch(current.0.saturating_sub(1)),
        1 => Epoch(current.0 + 1),
        2 => Epoch(input.u64()),
        _ => current,
    }
}

fn seq_near(input: &mut Input, around: u64) -> Seq {
    match input.below(16) {
        0 => Seq(input.u64()),
        1 => Seq(u64::MAX - input.below(2)),
        2 => Seq(around.saturating_sub(input.below(4))),
        _ => Seq(around.saturating_add(input.below(6))),
    }
}

fn extent_id(input: &mut Input) -> u64 {
    match input.below(16) {
        0 => input.u64(),
        1 => EXTENTS + input.below(2),
        _ => input.below(EXTENTS),
    }
}

fn run(input: &mut Input) -> ExtentRun {
    let start = extent_id(input);
    let len = match input.below(16) {
        0 => u32::MAX,
        1 => EXTENTS as u32,
        2 => input.u32(),
        3 => 0,
        _ => 1 + input.below(8) as u32,
    };
    ExtentRun { start, len }
}

fn runs(input: &mut Input) -> Vec<ExtentRun> {
    let n = if input.below(16) == 0 { input.below(64) } else { input.below(3) };
    (0..n).map(|_| run(input)).collect()
}

fn evictions(input: &mut Input) -> Vec<Eviction> {
    let n = if input.below(16) == 0 { input.below(64) } else { input.below(2) };
    (0..n).map(|_| Eviction { generation: Generation(input.below(16)), extents: runs(input) }).collect()
}

fn hints(input: &mut Input) -> Vec<StreamHint> {
    let n = if input.below(8) == 0 { input.below(256) } else { input.below(3) };
    (0..n)
        .map(|_| StreamHint {
            last: extent_id(input),
            stride: match input.below(4) {
                0 => input.u64() as i64,
                1 => -(input.below(4) as i64),
                _ => input.below(4) as i64,
            },
            run: input.below(8) as u32,
            want: if input.bool() { input.u32() } else { input.below(64) as u32 },
        })
        .collect()
}

fn write_op(input: &mut Input) -> WriteOp {
    let volume = EXTENTS * EXTENT_BYTES;
    let offset = match input.below(16) {
        0 => input.u64(),
        1 => volume - 4096 * input.below(3),
        _ => input.below(volume / 4096) * 4096 + if input.below(4) == 0 { input.below(4096) } else { 0 },
    };
    let len = match input.below(16) {
        0 => input.u64(),
        1 => EXTENT_BYTES + 4096,
        2 => 0,
        _ => 1 + input.below(8192),
    };
    match input.below(4) {
        0 => WriteOp::zero(offset, len),
        1 => WriteOp::trim(offset, len),
        _ => {
            // A payload of `len` bytes when that is small, else a mismatched one.
            let n = if len <= 3 * EXTENT_BYTES { len as usize } else { input.below(64) as usize };
            WriteOp { offset, len, kind: geomirror_core::WriteKind::Data(Bytes::from(vec![input.u8(); n])) }
        }
    }
}

fn blocks_of(input: &mut Input, extent: u64) -> usize {
    if input.below(16) == 0 {
        input.below(40) as usize
    } else {
        let g = geometry();
        if extent < EXTENTS {
            geomirror_core::digest::check_blocks(g.extent_range(ExtentId(extent)).end - g.extent_range(ExtentId(extent)).start)
        } else {
            16
        }
    }
}

/// A frame of any kind, fields biased towards what a site in this session accepts.
fn any_frame(input: &mut Input, epoch: Epoch, seq_around: u64, ids: &[u64]) -> Frame {
    let epoch = epoch_near(input, epoch);
    match input.below(16) {
        0 => Frame::Hello {
            epoch,
            role: if input.bool() { Role::Primary } else { Role::Secondary },
            volume_bytes: if input.below(8) == 0 { input.u64() } else { EXTENTS * EXTENT_BYTES },
            extent_bytes: EXTENT_BYTES,
            on_link_loss: if input.bool() { LinkLossPolicy::Block } else { LinkLossPolicy::Degrade },
            authoritative: input.bool(),
            wrote_alone: input.below(4) == 0,
            store: StoreId(input.below(4) as u128),
            remembers: input.bool().then(|| Remembered {
                store: StoreId(input.below(4) as u128),
                applied: Seq(input.below(4)),
                generation: Generation(input.below(4)),
            }),
            promoted_from: (input.below(4) == 0).then(|| Position { applied: Seq(input.u64()), next_generation: Generation(input.u64()) }),
            owes_full_resync: input.below(4) == 0,
        },
        1 => Frame::Welcome {
            epoch,
            applied: seq_near(input, seq_around),
            consistent: input.bool(),
            authoritative: input.bool(),
            store: StoreId(input.below(4) as u128),
            next_generation: Generation(input.below(64)),
            amnesiac: input.below(4) == 0,
        },
        2 => Frame::RecordChunk {
            epoch,
            entries: runs(input).into_iter().map(|run| RecordEntries { run, generation: Generation(input.below(16)) }).collect(),
        },
        3 => Frame::DivergentChunk { epoch, extents: runs(input) },
        4 => Frame::SnapshotEnd { epoch, record_len: input.below(EXTENTS) },
        5 | 6 => Frame::RecordUpdate {
            epoch,
            id: input.below(16),
            missed: runs(input),
            hints: hints(input),
            room: if input.bool() { input.u32() } else { input.below(32) as u32 },
            evictions: evictions(input),
        },
        7 => Frame::RecordAnswer {
            epoch,
            id: if !ids.is_empty() && input.below(4) != 0 { ids[input.below(ids.len() as u64) as usize] } else { input.below(16) },
            generation: Generation(input.below(64)),
            added: runs(input),
        },
        8 => Frame::Evict { epoch, evictions: evictions(input) },
        9..=11 => {
            let seq = seq_near(input, seq_around);
            let apply = match input.below(8) {
                0 => Apply::ResyncBegin { save_aside: input.bool(), skip: input.bool(), full: input.bool() },
                1 => Apply::ResyncEnd,
                2 => {
                    let extent = extent_id(input);
                    let n = blocks_of(input, extent);
                    Apply::Verify { extent: ExtentId(extent), digests: vec![[input.u8(); 16]; n] }
                }
                _ => Apply::Write(write_op(input)),
            };
            Frame::Data { epoch, seq, apply }
        }
        12 => {
            let extent = extent_id(input);
            let n = blocks_of(input, extent).div_ceil(8);
            Frame::Differs { epoch, seq: seq_near(input, seq_around), extent: ExtentId(extent), blocks: vec![input.u8(); n] }
        }
        13 => Frame::Applied { epoch, through: seq_near(input, seq_around) },
        14 => Frame::Authoritative { epoch },
        _ => match input.below(3) {
            0 => Frame::KeepAlive { probe: input.u64(), echo: input.bool() },
            _ => Frame::Refused {
                epoch,
                reason: [Refusal::StaleEpoch, Refusal::SplitBrain, Refusal::Geometry, Refusal::Roles, Refusal::UnknownStore]
                    [input.below(5) as usize],
            },
        },
    }
}

/// Most actions one step may emit, given what the site held before it: a frame may release
/// every item the site buffered (each item a media write and a save-aside per extent it
/// touches, plus stores and syncs), a snapshot of the whole record, and answers to every
/// queued record frame, but nothing in proportion to what the frame claims.
fn action_bound(items_held: u64, extents: u64) -> usize {
    let per_item = extents + 4;
    ((items_held + 2) * per_item + 4 * geomirror_core::secondary::MAX_QUEUED_RECORD_FRAMES as u64 + 4 * extents + 64) as usize
}

/// A secondary connected to the input, its handshake done.
pub struct SecondarySite {
    pub site: Secondary,
    cfg: CoreConfig,
    geo: Geometry,
    now: Time,
    persists: VecDeque<Token>,
    syncs: VecDeque<Token>,
    verifies: VecDeque<(Token, usize)>,
    reconnects: u32,
    /// Every frame the site sent, and why it closed connections, for the tests to read.
    pub sent: Vec<Frame>,
    pub disconnects: Vec<String>,
}

impl SecondarySite {
    pub fn new() -> SecondarySite {
        SecondarySite::with(config(), geometry())
    }

    pub fn with(cfg: CoreConfig, geo: Geometry) -> SecondarySite {
        let state = SiteState::fresh(Role::Secondary, SECONDARY_STORE);
        let mut s = SecondarySite {
            site: Secondary::new(cfg.clone(), geo, &state),
            cfg,
            geo,
            now: Time(1_000_000),
            persists: VecDeque::new(),
            syncs: VecDeque::new(),
            verifies: VecDeque::new(),
            reconnects: 0,
            sent: Vec::new(),
            disconnects: Vec::new(),
        };
        s.settle();
        s.handshake();
        assert!(s.sent.iter().any(|f| matches!(f, Frame::Welcome { .. })), "the handshake ends with a welcome");
        s
    }

    /// The primary's side of a handshake: connect, hello, and every store completed, so that
    /// the welcome has gone out.
    pub fn handshake(&mut self) {
        self.site.handle_connected(self.now);
        self.settle();
        let hello = Frame::Hello {
            epoch: self.site.epoch(),
            role: Role::Primary,
            volume_bytes: self.geo.volume_bytes(),
            extent_bytes: self.geo.extent_bytes(),
            on_link_loss: LinkLossPolicy::Block,
            authoritative: true,
            wrote_alone: false,
            store: PRIMARY_STORE,
            remembers: None,
            promoted_from: None,
            owes_full_resync: false,
        };
        self.site.handle_frame(self.now, hello);
        self.settle();
        self.complete_persists(usize::MAX);
    }

    /// Drains the site's actions, checking their number against what it held before.
    fn settle_from(&mut self, items_held: u64) {
        let d = drain(|| self.site.poll_action());
        let bound = action_bound(items_held, self.geo.extent_count());
        assert!(d.count <= bound, "one step emitted {} actions, more than {bound}", d.count);
        self.persists.extend(d.persists);
        self.syncs.extend(d.syncs);
        self.verifies.extend(d.verifies);
        self.sent.extend(d.sent);
        self.disconnects.extend(d.disconnects);
        let stats = self.site.stats();
        assert!(stats.reorder_bytes <= self.cfg.reorder_buffer_bytes, "the reorder buffer holds {} bytes", stats.reorder_bytes);
        assert!(self.site.record().len() as u64 <= self.geo.extent_count());
    }

    fn settle(&mut self) {
        let held = self.held();
        self.settle_from(held);
    }

    fn held(&self) -> u64 {
        self.site.stats().reorder_bytes / 64
    }

    pub fn deliver(&mut self, f: Frame) {
        let held = self.held() + 1;
        let now = self.now;
        self.site.handle_frame(now, f);
        self.settle_from(held);
    }

    pub fn complete_persists(&mut self, n: usize) {
        for _ in 0..n {
            let Some(t) = self.persists.pop_front() else { return };
            let held = self.held();
            let now = self.now;
            self.site.handle_persisted(now, t);
            self.settle_from(held);
        }
    }

    fn complete_syncs(&mut self) {
        while let Some(t) = self.syncs.pop_front() {
            let held = self.held();
            let now = self.now;
            self.site.handle_media_synced(now, t);
            self.settle_from(held);
        }
    }

    /// Pending store batches (not yet reported durable).
    pub fn pending_persists(&self) -> usize {
        self.persists.len()
    }

    /// A new connection on which the primary has sent nothing yet.
    pub fn reconnect_without_hello(&mut self) {
        self.site.handle_disconnected(self.now);
        self.site.handle_connected(self.now);
        self.settle();
    }

    /// The transport reports the connection closed, and the primary connects again.
    pub fn reconnect(&mut self) {
        self.site.handle_disconnected(self.now);
        self.settle();
        self.now = self.now + Duration::from_millis(5);
        self.handshake();
    }

    /// Runs one step of the input; false when the input is spent.
    pub fn step(&mut self, input: &mut Input) -> bool {
        if input.is_empty() {
            return false;
        }
        match input.below(12) {
            0..=5 => {
                let around = self.site.applied().0 + 1;
                let f = any_frame(input, self.site.epoch(), around, &[]);
                if let Some(f) = through_codec(&f, input) {
                    self.deliver(f);
                }
            }
            6 => {
                if let Some(f) = raw_frame(input) {
                    self.deliver(f);
                }
            }
            7 => {
                let n = 1 + input.below(4) as usize;
                self.complete_persists(n);
            }
            8 => self.complete_syncs(),
            9 => {
                if let Some((t, n)) = self.verifies.pop_front() {
                    let bitmap = if input.bool() { vec![0; n.div_ceil(8)] } else { vec![input.u8(); n.div_ceil(8)] };
                    let held = self.held();
                    let now = self.now;
                    self.site.handle_verified(now, t, bitmap);
                    self.settle_from(held);
                }
            }
            10 => {
                self.now = self.now + Duration::from_millis(input.below(5000));
                let held = self.held();
                let now = self.now;
                self.site.handle_timeout(now);
                self.settle_from(held);
            }
            _ => {
                // The transport closes the connection (the site asked, or the link broke).
                if self.reconnects >= MAX_RECONNECTS {
                    return false;
                }
                self.reconnects += 1;
                self.reconnect();
            }
        }
        true
    }
}

impl Default for SecondarySite {
    fn default() -> Self {
        SecondarySite::new()
    }
}

/// A primary serving, connected to the input, its handshake done.
pub struct PrimarySite {
    pub site: Primary,
    now: Time,
    persists: VecDeque<Token>,
    syncs: VecDeque<Token>,
    reads: VecDeque<(Token, ExtentId)>,
    local_writes: VecDeque<Token>,
    /// Record updates sent on this connection, by id, for answers that match.
    update_ids: Vec<u64>,
    /// Highest data item sent, and highest position acknowledged to the site.
    shipped: u64,
    acknowledged: u64,
    next_request: u64,
    reconnects: u32,
    /// Demoted or fenced: the shell would rebuild the machine; the run ends.
    pub ended: bool,
    pub sent: Vec<Frame>,
    pub disconnects: Vec<String>,
}

impl PrimarySite {
    pub fn new() -> PrimarySite {
        let state = SiteState::fresh(Role::Primary, PRIMARY_STORE);
        let now = Time(1_000_000);
        let mut p = PrimarySite {
            site: Primary::new(config(), geometry(), &state, now),
            now,
            persists: VecDeque::new(),
            syncs: VecDeque::new(),
            reads: VecDeque::new(),
            local_writes: VecDeque::new(),
            update_ids: Vec::new(),
            shipped: 0,
            acknowledged: 0,
            next_request: 1,
            reconnects: 0,
            ended: false,
            sent: Vec::new(),
            disconnects: Vec::new(),
        };
        p.settle();
        p.complete_persists(usize::MAX);
        p.handshake();
        p
    }

    /// The secondary's side of a handshake: hello, welcome at the position acknowledged so
    /// far, an empty snapshot, and every store completed.
    pub fn handshake(&mut self) {
        self.handshake_until(3);
    }

    /// The first `n` frames of the secondary's side of a handshake: hello, welcome, snapshot end.
    fn handshake_until(&mut self, n: usize) {
        self.site.handle_connected(self.now);
        self.settle();
        self.update_ids.clear();
        let epoch = self.site.epoch();
        let remembers = (self.reconnects > 0).then_some(Remembered { store: PRIMARY_STORE, applied: Seq(0), generation: Generation(0) });
        let frames = [
            Frame::Hello {
                epoch,
                role: Role::Secondary,
                volume_bytes: EXTENTS * EXTENT_BYTES,
                extent_bytes: EXTENT_BYTES,
                on_link_loss: LinkLossPolicy::Block,
                authoritative: true,
                wrote_alone: false,
                store: SECONDARY_STORE,
                remembers,
                promoted_from: None,
                owes_full_resync: false,
            },
            Frame::Welcome {
                epoch,
                applied: Seq(self.acknowledged),
                consistent: true,
                authoritative: true,
                store: SECONDARY_STORE,
                next_generation: Generation(1 << 20),
                amnesiac: false,
            },
            Frame::SnapshotEnd { epoch, record_len: 0 },
        ];
        for f in frames.into_iter().take(n) {
            self.deliver(f);
        }
        self.complete_persists(usize::MAX);
    }

    fn held(&self) -> u64 {
        // Buffered items (each at least 64 bytes), host requests outstanding, reads.
        self.site.stats().lag_bytes / 64 + self.next_request + self.reads.len() as u64
    }

    fn settle_from(&mut self, items_held: u64) {
        let d = drain(|| self.site.poll_action());
        let bound = action_bound(items_held, EXTENTS);
        assert!(d.count <= bound, "one step emitted {} actions, more than {bound}", d.count);
        for f in &d.sent {
            match f {
                Frame::RecordUpdate { id, .. } => self.update_ids.push(*id),
                Frame::Data { seq, .. } => self.shipped = self.shipped.max(seq.0),
                _ => {}
            }
        }
        self.sent.extend(d.sent);
        self.persists.extend(d.persists);
        self.syncs.extend(d.syncs);
        self.reads.extend(d.reads);
        self.local_writes.extend(d.local_writes);
        self.disconnects.extend(d.disconnects);
        self.ended |= d.role_changed;
        assert!(self.site.record_copy().len() as u64 <= EXTENTS);
    }

    fn settle(&mut self) {
        let held = self.held();
        self.settle_from(held);
    }

    pub fn deliver(&mut self, f: Frame) {
        if let Frame::Applied { through, .. } = &f {
            if through.0 <= self.shipped {
                self.acknowledged = self.acknowledged.max(through.0);
            }
        }
        let held = self.held();
        let now = self.now;
        self.site.handle_frame(now, f);
        self.settle_from(held);
    }

    pub fn complete_persists(&mut self, n: usize) {
        for _ in 0..n {
            let Some(t) = self.persists.pop_front() else { return };
            let held = self.held();
            let now = self.now;
            self.site.handle_persisted(now, t);
            self.settle_from(held);
        }
    }

    /// A host write; its actions are drained.
    pub fn host_write(&mut self, op: WriteOp) {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let held = self.held() + 1;
        let now = self.now;
        self.site.handle_host_write(now, request, op, false);
        self.settle_from(held);
    }

    pub fn reconnect(&mut self) {
        self.site.handle_disconnected(self.now);
        self.settle();
        self.now = self.now + Duration::from_millis(5);
        self.handshake();
    }

    /// A new connection where the secondary has welcomed the primary and not yet sent its
    /// snapshot: the link is in its handshake, taking record and divergent chunks.
    pub fn reconnect_without_snapshot(&mut self) {
        self.site.handle_disconnected(self.now);
        self.settle();
        self.handshake_until(2);
    }

    pub fn step(&mut self, input: &mut Input) -> bool {
        if input.is_empty() || self.ended {
            return false;
        }
        let held = self.held();
        let now = self.now;
        match input.below(16) {
            0..=5 => {
                let around = if input.bool() { self.shipped } else { self.acknowledged + 1 };
                let f = any_frame(input, self.site.epoch(), around, &self.update_ids);
                if let Some(f) = through_codec(&f, input) {
                    self.deliver(f);
                }
            }
            6 => {
                if let Some(f) = raw_frame(input) {
                    self.deliver(f);
                }
            }
            7 => {
                // An answer that names exactly what an update asked for, so that writes get
                // through and data flows.
                if let Some(Frame::RecordUpdate { id, missed, .. }) =
                    self.sent.iter().rev().find(|f| matches!(f, Frame::RecordUpdate { id, .. } if self.update_ids.contains(id))).cloned()
                {
                    let f = Frame::RecordAnswer { epoch: self.site.epoch(), id, generation: Generation(input.below(64)), added: missed };
                    self.deliver(f);
                }
            }
            8 => {
                let request = RequestId(self.next_request);
                self.next_request += 1;
                let op = write_op(input);
                let fua = input.below(4) == 0;
                self.site.handle_host_write(now, request, op, fua);
                self.settle_from(held + 1);
            }
            9 => {
                let request = RequestId(self.next_request);
                self.next_request += 1;
                self.site.handle_host_flush(now, request);
                self.settle_from(held + 1);
            }
            10 => {
                let n = 1 + input.below(4) as usize;
                self.complete_persists(n);
            }
            11 => {
                let ok = input.below(8) != 0;
                while let Some(t) = self.local_writes.pop_front() {
                    self.site.handle_local_write_done(now, t, ok);
                }
                while let Some(t) = self.syncs.pop_front() {
                    self.site.handle_media_synced(now, t);
                }
                self.settle_from(held);
            }
            12 => {
                if let Some((t, e)) = self.reads.pop_front() {
                    let g = geometry();
                    let len = if e.0 < EXTENTS { g.extent_range(e).end - g.extent_range(e).start } else { 0 };
                    // A short read sometimes: the rest reads as zeros.
                    let n = if input.below(4) == 0 { input.below(len + 1) } else { len };
                    self.site.handle_read_done(now, t, Bytes::from(vec![input.u8(); n as usize]));
                    self.settle_from(held);
                }
            }
            13 => {
                // Applied through what was shipped: a return message an honest peer could send.
                let f = Frame::Applied { epoch: self.site.epoch(), through: Seq(self.shipped) };
                self.deliver(f);
            }
            14 => {
                self.now = self.now + Duration::from_millis(input.below(5000));
                let now = self.now;
                self.site.handle_timeout(now);
                self.settle_from(held);
            }
            _ => {
                if self.reconnects >= MAX_RECONNECTS {
                    return false;
                }
                self.reconnects += 1;
                self.reconnect();
            }
        }
        true
    }
}

impl Default for PrimarySite {
    fn default() -> Self {
        PrimarySite::new()
    }
}

/// Runs `data` against a secondary: the fuzz target's body.
pub fn run_secondary(data: &[u8]) {
    let mut input = Input::new(data);
    let mut s = SecondarySite::new();
    for _ in 0..MAX_STEPS {
        if !s.step(&mut input) {
            break;
        }
    }
}

/// Runs `data` against a primary: the fuzz target's body.
pub fn run_primary(data: &[u8]) {
    let mut input = Input::new(data);
    let mut p = PrimarySite::new();
    for _ in 0..MAX_STEPS {
        if !p.step(&mut input) {
            break;
        }
    }
}
