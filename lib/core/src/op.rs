//! Host operations that change data.
//!
//! Owns: `WriteOp`, the one shape in which WRITE, WRITE_ZEROES and TRIM travel through the
//! write path, on the wire and to media. Must not: allocate payloads for zeroing or trim;
//! they travel as compact operations.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What a write does to its byte range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteKind {
    /// Store these bytes; their length is the range's length.
    Data(Bytes),
    /// Make the range read as zeros (NBD WRITE_ZEROES).
    Zero,
    /// The host no longer needs the range (NBD TRIM). It reads as zeros on both sites, so the
    /// images stay byte-identical.
    Trim,
}

/// One change to the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOp {
    pub offset: u64,
    pub len: u64,
    pub kind: WriteKind,
}

impl WriteOp {
    pub fn data(offset: u64, data: Bytes) -> WriteOp {
        WriteOp { offset, len: data.len() as u64, kind: WriteKind::Data(data) }
    }

    pub fn zero(offset: u64, len: u64) -> WriteOp {
        WriteOp { offset, len, kind: WriteKind::Zero }
    }

    pub fn trim(offset: u64, len: u64) -> WriteOp {
        WriteOp { offset, len, kind: WriteKind::Trim }
    }

    /// Bytes this operation occupies in buffers and on the wire (payload only).
    pub fn payload_bytes(&self) -> u64 {
        match &self.kind {
            WriteKind::Data(b) => b.len() as u64,
            WriteKind::Zero | WriteKind::Trim => 0,
        }
    }

    /// True when the payload length agrees with `len`; frames from the network are checked
    /// with this before anything is applied.
    pub fn is_well_formed(&self) -> bool {
        match &self.kind {
            WriteKind::Data(b) => b.len() as u64 == self.len,
            WriteKind::Zero | WriteKind::Trim => true,
        }
    }
}
