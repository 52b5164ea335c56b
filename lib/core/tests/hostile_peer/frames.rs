//! Frames and host writes built from input, fields biased towards what a site in its session
//! accepts, and passed through the real codec as the network would.
//!
//! Owns: every value the peer (or the host) sends, drawn from the input.
//! Must not: model an honest peer: hostile values must get through (see the harness's header).

use super::{geometry, Input, EXTENTS, EXTENT_BYTES};
use bytes::Bytes;
use geomirror_core::frame::{
    self, Apply, Eviction, Frame, LinkLossPolicy, Position, RecordEntries, Refusal, Remembered, Role, StreamHint, HEADER_BYTES, MAGIC,
    WIRE_VERSION,
};
use geomirror_core::record::ExtentRun;
use geomirror_core::{Epoch, ExtentId, Generation, Seq, StoreId, WriteOp};

/// One frame from the peer, as one step of the input: with `built` (the site's epoch, and a
/// sequence number to draw near), a frame built from the input and passed through the codec;
/// without, one decoded from raw payload bytes. None when it does not decode.
pub(super) fn from_peer(input: &mut Input, built: Option<(Epoch, u64)>, ids: &[u64]) -> Option<Frame> {
    match built {
        Some((epoch, seq_around)) => {
            let f = any_frame(input, epoch, seq_around, ids);
            through_codec(&f, input)
        }
        None => raw_frame(input),
    }
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

pub(super) fn write_op(input: &mut Input) -> WriteOp {
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
            sync_cursor: (input.below(4) == 0).then(|| input.below(1 << 12)),
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
                0 => Apply::ResyncBegin { save_aside: input.bool(), skip: input.bool(), full: input.bool(), from: input.below(1 << 12) },
                1 => Apply::ResyncEnd,
                3 => Apply::SyncMark { next: input.below(1 << 12) },
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
