//! Wire frames between the sites.
//!
//! Owns: the versioned `Frame` enum and its codec: a 7-byte header (magic `GM`, version,
//! big-endian payload length) followed by a postcard payload. The length is checked against
//! `MAX_FRAME_BYTES` before any payload byte is decoded or any buffer allocated.
//! `Frame::validate_for` then checks a frame against the receiver's volume: every extent it
//! names inside the volume, and no more extents in one frame than the volume has, so that no
//! handler iterates more than the volume holds whatever run lengths a peer claims.
//! Must not: interpret frames. Epoch checks and state changes belong to the site state
//! machines; this file only turns bytes into a typed value or a clear error.

use crate::digest::{check_blocks, BlockDigest};
use crate::geometry::Geometry;
use crate::ids::{Epoch, ExtentId, Generation, Seq, StoreId};
use crate::op::WriteOp;
use crate::record::ExtentRun;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const MAGIC: [u8; 2] = *b"GM";
/// Bumped on any incompatible change of `Frame`. A peer speaking another version is refused.
/// 2: store identities in `Hello` and `Welcome`, full resyncs.
pub const WIRE_VERSION: u8 = 3;
pub const HEADER_BYTES: usize = 7;
/// Largest payload accepted: a 32 MiB write (the NBD maximum we advertise) plus slack for
/// the frame's own fields.
pub const MAX_FRAME_BYTES: u32 = 32 * 1024 * 1024 + 64 * 1024;
/// Largest number of extent runs, record entries or hints in one frame. Keeps decoded frames
/// small whatever the peer sends; longer lists are split across frames.
pub const MAX_LIST_LEN: usize = 16 * 1024;
/// Largest epoch a frame may carry. A site adopts its primary's epoch and a promotion adds one
/// (2^20 for a forced one, see `secondary::AMNESIAC_EPOCH_JUMP`): half the range leaves room
/// for more promotions than could ever happen, so that adopting a peer's epoch can never make
/// a later promotion overflow.
pub const MAX_EPOCH: Epoch = Epoch(u64::MAX >> 1);

/// Which QUIC stream a frame travels on. Control frames never wait behind bulk data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    /// Ordered: hello, record updates and answers, evictions, return messages.
    Control,
    /// Host writes, by sequence number, spread over `data_lanes` ordered streams.
    Data(u8),
    /// Resync copies (a failback, a catch-up after an outage) and their markers, by sequence
    /// number, on a stream of their own: a long copy never sits in the same ordered stream as
    /// host writes, so neither waits behind the other's lost packets. The receiver orders
    /// everything by sequence number.
    Resync,
}

/// The role a site plays in an epoch. On the wire by variant index (postcard); by its
/// lowercase name in text (the site's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// What the secondary does when the primary's link is lost longer than the record-update
/// timeout; carried in `Hello` so the secondary knows whether its record may stop being
/// authoritative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkLossPolicy {
    /// Writes to unrecorded extents are held, then fail after `link_loss_deadline`.
    Block,
    /// The primary goes on with a persisted local dirty map; the record is non-authoritative
    /// until the resync after reconnect ends.
    Degrade,
}

/// One eviction instruction: remove these extents if they are still tagged `generation` or
/// older. Younger tags mean the extent was re-added after the primary decided to evict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    pub generation: Generation,
    pub extents: Vec<ExtentRun>,
}

/// A stream the primary's detector sees: the secondary's predictor extends along it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHint {
    /// Last extent the stream wrote.
    pub last: u64,
    /// Distance between consecutive writes, in extents (1 for sequential, negative backwards).
    pub stride: i64,
    /// How many consecutive strides the stream has kept; the predictor's confidence.
    pub run: u32,
    /// Strides ahead the primary wants recorded: the stream's rate times the record round
    /// trip, so that the stream never reaches unrecorded space while an update is in flight.
    pub want: u32,
}

/// A run of record members that share a generation; used for record snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntries {
    pub run: ExtentRun,
    pub generation: Generation,
}

/// What a data-stream item does on the secondary, applied strictly in sequence order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Apply {
    /// A host write, or a resync copy of an extent read back from the primary's media.
    Write(WriteOp),
    /// From here until `ResyncEnd` the image is not a prefix of the history.
    /// `save_aside` asks the receiver to keep its current content of every extent before the
    /// first overwrite (failback onto a site that may hold writes of its own).
    /// `skip` says the primary abandoned its queue: sequence numbers below this marker that
    /// have not arrived never will, and the resync that follows covers their extents.
    /// `full` says the resync checks every extent of the volume (the receiver is an amnesiac,
    /// or was rebuilt): its end, durably applied, is what makes the receiver's store trusted
    /// again. `from` is the extent a full resync's sweep starts at: 0, or the sync cursor the
    /// receiver's welcome named (the resync resumes where its last durable mark left it).
    ResyncBegin { save_aside: bool, skip: bool, full: bool, from: u64 },
    /// The image is a prefix of the history again once everything up to here is durable.
    ResyncEnd,
    /// A failback's check of one extent instead of its copy: `digests` are `block_digests`
    /// of the primary's content after every earlier item, one per 4 KiB block. The receiver
    /// compares its own content at this point of the order; when a block differs, it records
    /// the extent as divergent (durably) and reports the blocks with `Differs` before any
    /// `Applied` that covers this item, and the primary then copies those blocks.
    Verify { extent: ExtentId, digests: Vec<BlockDigest> },
    /// A full resync's sync cursor: every extent below `next` equals the primary's image as
    /// of this point of the order (its check found it equal, or the copies it needed come
    /// before this item). The receiver makes it durable with the position that covers it, and
    /// names it in its next welcome, so that the resync resumes there.
    SyncMark { next: u64 },
}

impl Apply {
    /// Bytes an item counts for in the primary's retransmit buffer and data window and in the
    /// secondary's reorder buffer: its payload or its digests, and at least 64 for its own
    /// fields. Both sites count with this one function, so that the window the primary keeps
    /// fits the reorder buffer the secondary allows (see `CoreConfig::validate`).
    pub fn buffered_bytes(&self) -> u64 {
        match self {
            Apply::Write(op) => op.payload_bytes().max(64),
            Apply::Verify { digests, .. } => (digests.len() as u64 * std::mem::size_of::<BlockDigest>() as u64).max(64),
            Apply::ResyncBegin { .. } | Apply::ResyncEnd | Apply::SyncMark { .. } => 64,
        }
    }
}

/// What the sender of a `Hello` remembers of the receiver's store (its `PeerMemory`): the
/// receiver compares it with its own store and knows, before it answers, whether it lost
/// state it had acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub store: StoreId,
    /// Highest position the receiver acknowledged as durably applied (0 when unknown).
    pub applied: Seq,
    /// Highest generation the receiver answered a record update with (0 when unknown).
    pub generation: Generation,
}

/// Where a secondary's store stood: what it had applied, and the next generation it would
/// hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub applied: Seq,
    pub next_generation: Generation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame of a connection, from each side.
    Hello {
        epoch: Epoch,
        role: Role,
        volume_bytes: u64,
        extent_bytes: u64,
        on_link_loss: LinkLossPolicy,
        /// Primary: the receiver's record covers every difference (predictive mode with an
        /// empty local dirty map). False makes the secondary persist "non-authoritative".
        authoritative: bool,
        /// The sender accepted host writes while it could not reach its peer (split-brain
        /// evidence), or, for a promoted site, accepted writes since promotion.
        wrote_alone: bool,
        /// The sender's store identity.
        store: StoreId,
        /// What the sender remembers of the receiver's store; None before the first handshake
        /// of a new pair.
        remembers: Option<Remembered>,
        /// Primary, promoted and not yet failed back: where its store stood when it was
        /// promoted. The old primary compares it with what it remembers this store
        /// acknowledged: a promotion from a store that had lost acknowledged state leaves a
        /// failback set that misses extents, and the failback must check the whole volume.
        promoted_from: Option<Position>,
        /// Primary: it owes its peer a full verified resync (it was promoted, by force, while
        /// its own store was an amnesiac, or it found the peer one): whatever the peer
        /// remembers, it is the primary an operator chose, and it checks the whole volume.
        owes_full_resync: bool,
    },
    /// The secondary's answer to a primary's hello: where it stands. `store` and
    /// `next_generation` let the primary check it against what it remembers; `amnesiac` says
    /// the secondary knows itself untrusted until a full resync ends.
    Welcome {
        epoch: Epoch,
        applied: Seq,
        consistent: bool,
        authoritative: bool,
        store: StoreId,
        next_generation: Generation,
        amnesiac: bool,
        /// The full resync's durable cursor, when this store holds one from the primary that
        /// sent the hello, in its epoch: the extent the resync may resume at.
        sync_cursor: Option<u64>,
    },
    /// Part of the secondary's durable record, sent after `Welcome`.
    RecordChunk { epoch: Epoch, entries: Vec<RecordEntries> },
    /// Extents a demoted site may hold that its peer lacks (its persisted local dirty map):
    /// in the snapshot, and during a failback for each extent a `Verify` found different.
    DivergentChunk { epoch: Epoch, extents: Vec<ExtentRun> },
    /// End of the snapshot: the primary may now accept writes.
    SnapshotEnd { epoch: Epoch, record_len: u64 },
    /// Primary to secondary: record these extents (and what you predict), evict these first.
    RecordUpdate {
        epoch: Epoch,
        id: u64,
        missed: Vec<ExtentRun>,
        hints: Vec<StreamHint>,
        /// How many extents the secondary may add beyond `missed` before the record is full.
        room: u32,
        evictions: Vec<Eviction>,
    },
    /// Secondary to primary, after a synced store: exactly the extents now recorded.
    RecordAnswer { epoch: Epoch, id: u64, generation: Generation, added: Vec<ExtentRun> },
    /// Eviction instructions sent alone when no record update carried them.
    Evict { epoch: Epoch, evictions: Vec<Eviction> },
    /// One item of the data streams.
    Data { epoch: Epoch, seq: Seq, apply: Apply },
    /// Secondary to primary: the failback check at `seq` found these blocks of the extent
    /// different (a bitmap, bit `i % 8` of byte `i / 8` for block `i`); the extent is durably
    /// divergent.
    Differs { epoch: Epoch, seq: Seq, extent: ExtentId, blocks: Vec<u8> },
    /// Return message (claim 14): everything through `through` is durably applied.
    Applied { epoch: Epoch, through: Seq },
    /// The primary's local dirty map is empty again: the record is authoritative.
    Authoritative { epoch: Epoch },
    /// The sender refuses the connection; the receiver must not retry blindly.
    Refused { epoch: Epoch, reason: Refusal },
    /// The link's liveness check on a control stream, in either direction: a probe, which
    /// the receiver's link answers at once with the same `probe` and `echo` set. A side that
    /// has had no echo of a probe sent in the last idle timeout declares the link lost. It
    /// belongs to the link: it is answered and consumed there and never reaches a state
    /// machine, so it carries no epoch.
    KeepAlive { probe: u64, echo: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The peer's epoch is older: it has been superseded by a promotion.
    StaleEpoch,
    /// Both sites claim the primary role under different epochs with writes on both sides.
    SplitBrain,
    /// Volume geometry differs between the sites.
    Geometry,
    /// Both sites are secondaries, or the roles are otherwise impossible.
    Roles,
    /// The primary's store is not the one this secondary paired with, and the primary does
    /// not know this secondary's store either: a rebuilt or replaced primary, which must not
    /// serve over a peer that holds data until an operator decides.
    UnknownStore,
}

impl Frame {
    pub fn epoch(&self) -> Epoch {
        match self {
            Frame::Hello { epoch, .. }
            | Frame::Welcome { epoch, .. }
            | Frame::RecordChunk { epoch, .. }
            | Frame::DivergentChunk { epoch, .. }
            | Frame::SnapshotEnd { epoch, .. }
            | Frame::RecordUpdate { epoch, .. }
            | Frame::RecordAnswer { epoch, .. }
            | Frame::Evict { epoch, .. }
            | Frame::Data { epoch, .. }
            | Frame::Applied { epoch, .. }
            | Frame::Differs { epoch, .. }
            | Frame::Authoritative { epoch }
            | Frame::Refused { epoch, .. } => *epoch,
            // The link's own frame has no epoch; the oldest one makes a state machine refuse it.
            Frame::KeepAlive { .. } => Epoch::default(),
        }
    }

    /// Short name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::RecordChunk { .. } => "record_chunk",
            Frame::DivergentChunk { .. } => "divergent_chunk",
            Frame::SnapshotEnd { .. } => "snapshot_end",
            Frame::RecordUpdate { .. } => "record_update",
            Frame::RecordAnswer { .. } => "record_answer",
            Frame::Evict { .. } => "evict",
            Frame::Data { .. } => "data",
            Frame::Applied { .. } => "applied",
            Frame::Differs { .. } => "differs",
            Frame::Authoritative { .. } => "authoritative",
            Frame::Refused { .. } => "refused",
            Frame::KeepAlive { .. } => "keep_alive",
        }
    }

    /// Structural checks a decoded frame must pass before a state machine sees it: list
    /// lengths within `MAX_LIST_LEN`, payload lengths matching, no run past `u64`, the epoch at
    /// most `MAX_EPOCH`, and a data item's sequence number below `u64::MAX` (so that the one
    /// after it exists).
    pub fn validate(&self) -> Result<(), FrameError> {
        let runs_ok = |runs: &[ExtentRun]| runs.len() <= MAX_LIST_LEN && runs.iter().all(|r| r.start.checked_add(r.len as u64).is_some());
        let ok = self.epoch() <= MAX_EPOCH
            && match self {
                Frame::RecordChunk { entries, .. } => {
                    entries.len() <= MAX_LIST_LEN && entries.iter().all(|e| e.run.start.checked_add(e.run.len as u64).is_some())
                }
                Frame::DivergentChunk { extents, .. } => runs_ok(extents),
                Frame::RecordUpdate { missed, hints, evictions, .. } => {
                    runs_ok(missed)
                        && hints.len() <= MAX_LIST_LEN
                        && evictions.len() <= MAX_LIST_LEN
                        && evictions.iter().all(|e| runs_ok(&e.extents))
                }
                Frame::RecordAnswer { added, .. } => runs_ok(added),
                Frame::Evict { evictions, .. } => evictions.len() <= MAX_LIST_LEN && evictions.iter().all(|e| runs_ok(&e.extents)),
                Frame::Data { seq, .. } if seq.0 == u64::MAX => false,
                Frame::Data { apply: Apply::Write(op), .. } => op.is_well_formed() && op.offset.checked_add(op.len).is_some(),
                Frame::Data { apply: Apply::Verify { digests, .. }, .. } => digests.len() <= MAX_LIST_LEN,
                Frame::Differs { blocks, .. } => blocks.len() <= MAX_LIST_LEN / 8,
                _ => true,
            };
        if ok {
            Ok(())
        } else {
            Err(FrameError::Invalid(self.kind()))
        }
    }

    /// `validate`, then the checks against the receiver's volume, made once at the entry of
    /// both state machines so that no handler needs its own: every extent run non-empty and
    /// inside the volume, the runs of each list (record entries, divergent extents, misses,
    /// additions, and all of a frame's evictions together) naming no more extents than the
    /// volume has, a data write inside the volume, and a failback check or difference of an
    /// extent of the volume with one digest (one bit) per 4 KiB block of it. An honest peer's
    /// lists name each extent once; its evictions name one twice only when it was re-added
    /// and evicted again before they left, and a refusal there costs a reconnect, after which
    /// the snapshot restores the record copy.
    pub fn validate_for(&self, geo: &Geometry) -> Result<(), FrameError> {
        self.validate()?;
        let count = geo.extent_count();
        let extent_blocks = |e: ExtentId| geo.contains(e).then(|| check_blocks(geo.extent_range(e).end - geo.extent_range(e).start));
        let why = match self {
            Frame::RecordChunk { entries, .. } => runs_in_volume(entries.iter().map(|e| &e.run), count),
            Frame::DivergentChunk { extents, .. } => runs_in_volume(extents, count),
            Frame::RecordUpdate { missed, evictions, .. } => {
                runs_in_volume(missed, count).or_else(|| runs_in_volume(evictions.iter().flat_map(|e| &e.extents), count))
            }
            Frame::RecordAnswer { added, .. } => runs_in_volume(added, count),
            Frame::Evict { evictions, .. } => runs_in_volume(evictions.iter().flat_map(|e| &e.extents), count),
            Frame::Data { apply: Apply::Write(op), .. } => geo.check_range(op.offset, op.len).err().map(|_| "a write outside the volume"),
            Frame::Data { apply: Apply::Verify { extent, digests }, .. } => (extent_blocks(*extent) != Some(digests.len()))
                .then_some("a failback check of an extent outside the volume, or with another number of digests than it has blocks"),
            Frame::Data { apply: Apply::SyncMark { next }, .. } | Frame::Data { apply: Apply::ResyncBegin { from: next, .. }, .. } => {
                (*next > count).then_some("a sync cursor past the end of the volume")
            }
            Frame::Welcome { sync_cursor: Some(next), .. } => (*next > count).then_some("a sync cursor past the end of the volume"),
            Frame::Differs { extent, blocks, .. } => (extent_blocks(*extent).map(|n| n.div_ceil(8)) != Some(blocks.len()))
                .then_some("a failback difference of an extent outside the volume, or with another bitmap size than it has blocks"),
            _ => None,
        };
        match why {
            None => Ok(()),
            Some(why) => Err(FrameError::Volume { kind: self.kind(), why }),
        }
    }
}

/// Why `runs` do not fit a volume of `count` extents, if they do not: a run empty or past the
/// end, or more extents in all than the volume has. Stops at the first fault, so its own work
/// is bounded by the runs the frame holds.
fn runs_in_volume<'a>(runs: impl IntoIterator<Item = &'a ExtentRun>, count: u64) -> Option<&'static str> {
    let mut total = 0u64;
    for r in runs {
        if r.len == 0 {
            return Some("an empty extent run");
        }
        if r.start.checked_add(r.len as u64).is_none_or(|end| end > count) {
            return Some("an extent run past the end of the volume");
        }
        total += r.len as u64;
        if total > count {
            return Some("extent runs naming more extents than the volume has");
        }
    }
    None
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("need more bytes: have {have}, frame needs {need}")]
    Incomplete { have: usize, need: usize },
    #[error("bad magic {0:02x?}: not a geomirror peer")]
    BadMagic([u8; 2]),
    #[error("wire version {0} is not supported (this build speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte cap")]
    TooLarge(u32),
    #[error("frame payload does not decode: {0}")]
    Decode(String),
    #[error("frame payload has {0} trailing bytes")]
    Trailing(usize),
    #[error("{0} frame fails validation")]
    Invalid(&'static str),
    #[error("{kind} frame does not fit this volume: {why}")]
    Volume { kind: &'static str, why: &'static str },
    #[error("frame does not encode: {0}")]
    Encode(String),
}

/// Encodes `frame` with its header.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_BYTES];
    let out = postcard::to_extend(frame, std::mem::take(&mut out)).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_BYTES;
    if len > MAX_FRAME_BYTES as usize {
        return Err(FrameError::TooLarge(len.min(u32::MAX as usize) as u32));
    }
    let mut out = out;
    out[0..2].copy_from_slice(&MAGIC);
    out[2] = WIRE_VERSION;
    out[3..7].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads a header and returns the payload length it announces, checked against the cap.
/// A stream reader calls this on the first 7 bytes, then reads exactly that many more.
pub fn decode_header(header: &[u8]) -> Result<usize, FrameError> {
    if header.len() < HEADER_BYTES {
        return Err(FrameError::Incomplete { have: header.len(), need: HEADER_BYTES });
    }
    let magic = [header[0], header[1]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if header[2] != WIRE_VERSION {
        return Err(FrameError::Version(header[2]));
    }
    let len = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len as usize)
}

/// Decodes one frame from the front of `buf`, returning it and the bytes consumed.
pub fn decode(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
    let len = decode_header(buf)?;
    let need = HEADER_BYTES + len;
    if buf.len() < need {
        return Err(FrameError::Incomplete { have: buf.len(), need });
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(&buf[HEADER_BYTES..need]).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    frame.validate()?;
    Ok((frame, need))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        let e = Epoch(7);
        vec![
            Frame::Hello {
                epoch: e,
                role: Role::Primary,
                volume_bytes: 1 << 30,
                extent_bytes: 1 << 20,
                on_link_loss: LinkLossPolicy::Degrade,
                authoritative: true,
                wrote_alone: false,
                store: StoreId(0x1234_5678_9abc_def0_0fed_cba9_8765_4321),
                remembers: Some(Remembered { store: StoreId(u128::MAX), applied: Seq(u64::MAX), generation: Generation(3) }),
                promoted_from: Some(Position { applied: Seq(9), next_generation: Generation(4) }),
                owes_full_resync: true,
            },
            Frame::Welcome {
                epoch: e,
                applied: Seq(42),
                consistent: true,
                authoritative: false,
                store: StoreId(7),
                next_generation: Generation(9),
                amnesiac: true,
                sync_cursor: Some(5),
            },
            Frame::RecordChunk {
                epoch: e,
                entries: vec![RecordEntries { run: ExtentRun { start: 3, len: 9 }, generation: Generation(2) }],
            },
            Frame::DivergentChunk { epoch: e, extents: vec![ExtentRun { start: 1, len: 1 }] },
            Frame::SnapshotEnd { epoch: e, record_len: 9 },
            Frame::RecordUpdate {
                epoch: e,
                id: 5,
                missed: vec![ExtentRun { start: 10, len: 2 }],
                hints: vec![StreamHint { last: 11, stride: 1, run: 4, want: 8 }],
                room: 100,
                evictions: vec![Eviction { generation: Generation(1), extents: vec![ExtentRun { start: 0, len: 3 }] }],
            },
            Frame::RecordAnswer { epoch: e, id: 5, generation: Generation(9), added: vec![ExtentRun { start: 10, len: 6 }] },
            Frame::Evict { epoch: e, evictions: vec![] },
            Frame::Data { epoch: e, seq: Seq(3), apply: Apply::Write(WriteOp::data(4096, Bytes::from_static(b"hello"))) },
            Frame::Data { epoch: e, seq: Seq(4), apply: Apply::Write(WriteOp::zero(0, 1 << 20)) },
            Frame::Data { epoch: e, seq: Seq(5), apply: Apply::ResyncBegin { save_aside: true, skip: true, full: true, from: 3 } },
            Frame::Data { epoch: e, seq: Seq(7), apply: Apply::SyncMark { next: 4 } },
            Frame::Data { epoch: e, seq: Seq(6), apply: Apply::ResyncEnd },
            Frame::Data { epoch: e, seq: Seq(7), apply: Apply::Verify { extent: ExtentId(9), digests: vec![[7; 16], [8; 16]] } },
            Frame::Differs { epoch: e, seq: Seq(7), extent: ExtentId(9), blocks: vec![2] },
            Frame::Applied { epoch: e, through: Seq(6) },
            Frame::Authoritative { epoch: e },
            Frame::Refused { epoch: e, reason: Refusal::StaleEpoch },
            Frame::Refused { epoch: e, reason: Refusal::UnknownStore },
            Frame::KeepAlive { probe: 1 << 40, echo: true },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let bytes = encode(&f).unwrap();
            let (back, used) = decode(&bytes).unwrap();
            assert_eq!(back, f);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn header_is_checked_before_payload() {
        let mut bytes = encode(&Frame::Authoritative { epoch: Epoch(1) }).unwrap();
        bytes[2] = 9;
        assert_eq!(decode(&bytes).unwrap_err(), FrameError::Version(9));
        bytes[0] = b'X';
        assert!(matches!(decode(&bytes).unwrap_err(), FrameError::BadMagic(_)));
        let huge = [b'G', b'M', WIRE_VERSION, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(decode(&huge).unwrap_err(), FrameError::TooLarge(u32::MAX));
    }

    #[test]
    fn truncated_frames_ask_for_more() {
        for f in samples() {
            let bytes = encode(&f).unwrap();
            for cut in 0..bytes.len() {
                assert!(matches!(decode(&bytes[..cut]), Err(FrameError::Incomplete { .. })), "cut at {cut} of {f:?}");
            }
        }
    }

    #[test]
    fn mismatched_payload_length_is_invalid() {
        let f = Frame::Data {
            epoch: Epoch(1),
            seq: Seq(1),
            apply: Apply::Write(WriteOp { offset: 0, len: 10, kind: crate::op::WriteKind::Data(Bytes::from_static(b"abc")) }),
        };
        let bytes = encode(&f).unwrap();
        assert_eq!(decode(&bytes).unwrap_err(), FrameError::Invalid("data"));
    }

    #[test]
    fn frames_are_checked_against_the_volume() {
        // 10 extents of 1 MiB, the last one 4 KiB short.
        let geo = Geometry::new((10 << 20) - 4096, 1 << 20).unwrap();
        let e = Epoch(1);
        let evict =
            |runs: Vec<ExtentRun>| Frame::Evict { epoch: e, evictions: vec![Eviction { generation: Generation(1), extents: runs }] };
        let run = |start, len| ExtentRun { start, len };
        let fits = [
            evict(vec![run(0, 10)]),
            evict(vec![run(0, 5), run(5, 5)]),
            Frame::Data { epoch: e, seq: Seq(1), apply: Apply::Write(WriteOp::zero((10 << 20) - 8192, 4096)) },
            Frame::Data { epoch: e, seq: Seq(1), apply: Apply::Verify { extent: ExtentId(9), digests: vec![[0; 16]; 255] } },
            Frame::Differs { epoch: e, seq: Seq(1), extent: ExtentId(0), blocks: vec![0; 32] },
        ];
        for f in fits {
            assert_eq!(f.validate_for(&geo), Ok(()), "{f:?}");
        }
        let refused = [
            (evict(vec![run(0, 11)]), "past the end"),
            (evict(vec![run(9, u32::MAX)]), "past the end"),
            (evict(vec![run(3, 0)]), "empty extent run"),
            (evict(vec![run(0, 6), run(0, 5)]), "more extents than the volume has"),
            (
                Frame::RecordUpdate {
                    epoch: e,
                    id: 1,
                    missed: vec![],
                    hints: vec![],
                    room: 0,
                    evictions: (0..2).map(|g| Eviction { generation: Generation(g), extents: vec![run(0, 6)] }).collect(),
                },
                "more extents than the volume has",
            ),
            (Frame::RecordAnswer { epoch: e, id: 1, generation: Generation(1), added: vec![run(10, 1)] }, "past the end"),
            (
                Frame::RecordChunk { epoch: e, entries: vec![RecordEntries { run: run(0, u32::MAX), generation: Generation(1) }] },
                "past the end",
            ),
            (Frame::DivergentChunk { epoch: e, extents: vec![run(u64::MAX, 0)] }, "empty"),
            (Frame::Data { epoch: e, seq: Seq(1), apply: Apply::Write(WriteOp::zero((10 << 20) - 4096, 4096)) }, "outside the volume"),
            (Frame::Data { epoch: e, seq: Seq(1), apply: Apply::Verify { extent: ExtentId(9), digests: vec![[0; 16]; 256] } }, "digests"),
            (Frame::Data { epoch: e, seq: Seq(1), apply: Apply::Verify { extent: ExtentId(10), digests: vec![] } }, "outside"),
            (Frame::Differs { epoch: e, seq: Seq(1), extent: ExtentId(0), blocks: vec![0; 31] }, "bitmap size"),
        ];
        for (f, why) in refused {
            let err = f.validate_for(&geo).unwrap_err();
            assert!(matches!(err, FrameError::Volume { .. }) && err.to_string().contains(why), "{f:?}: {err}");
        }
        // Structural limits come first, whatever the volume.
        let last = Frame::Data { epoch: e, seq: Seq(u64::MAX), apply: Apply::ResyncEnd };
        assert_eq!(last.validate_for(&geo), Err(FrameError::Invalid("data")));
        let far = Frame::Authoritative { epoch: Epoch(MAX_EPOCH.0 + 1) };
        assert_eq!(far.validate_for(&geo), Err(FrameError::Invalid("authoritative")));
        assert_eq!(Frame::Authoritative { epoch: MAX_EPOCH }.validate_for(&geo), Ok(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 100_000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Junk after a valid header never panics and never yields a frame that fails validation.
        #[test]
        fn garbage_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..96), claimed in 0u32..200) {
            let mut buf = vec![b'G', b'M', WIRE_VERSION];
            buf.extend_from_slice(&claimed.to_be_bytes());
            buf.extend_from_slice(&payload);
            if let Ok((f, used)) = decode(&buf) {
                prop_assert!(used <= buf.len());
                prop_assert!(f.validate().is_ok());
            }
        }

        /// Any byte string at all, header included, decodes or errors without panicking.
        #[test]
        fn raw_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&buf);
        }

        /// Flipping a byte of a real frame gives an error or another valid frame, never a panic.
        #[test]
        fn corrupted_real_frames_never_panic(which in any::<proptest::sample::Index>(), pos in any::<proptest::sample::Index>(), val in any::<u8>()) {
            let all = samples();
            let f = &all[which.index(all.len())];
            let mut bytes = encode(f).unwrap();
            let i = pos.index(bytes.len());
            bytes[i] = val;
            let _ = decode(&bytes);
        }
    }
}
