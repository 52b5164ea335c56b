//! Simulated block media: one stamp per 4 KiB block, with a durable layer that a crash
//! falls back to.
//!
//! Owns: the image of one site's volume as the oracles see it. A block holds the id of the
//! host write that last wrote it (0 for zeros), so images compare in microseconds. Payloads
//! passed through the core are real bytes carrying the stamp at the front of each block.
//! Must not: know about the core's state; it is the "disk".

use bytes::{BufMut, Bytes, BytesMut};

pub const BLOCK: u64 = 4096;

#[derive(Clone, Debug)]
pub struct Media {
    current: Vec<u64>,
    durable: Vec<u64>,
}

impl Media {
    pub fn new(volume_bytes: u64) -> Media {
        let n = (volume_bytes / BLOCK) as usize;
        Media { current: vec![0; n], durable: vec![0; n] }
    }

    pub fn blocks(&self) -> usize {
        self.current.len()
    }

    pub fn current(&self) -> &[u64] {
        &self.current
    }

    pub fn durable(&self) -> &[u64] {
        &self.durable
    }

    /// Writes a range: `stamp` 0 means zeros (WRITE_ZEROES, TRIM).
    pub fn write_stamps(&mut self, offset: u64, stamps: &[u64]) {
        let first = (offset / BLOCK) as usize;
        self.current[first..first + stamps.len()].copy_from_slice(stamps);
    }

    pub fn read(&self, offset: u64, len: u64) -> Vec<u64> {
        let first = (offset / BLOCK) as usize;
        self.current[first..first + (len / BLOCK) as usize].to_vec()
    }

    /// A sync makes durable what was current when it was issued.
    pub fn snapshot(&self) -> Vec<u64> {
        self.current.clone()
    }

    pub fn make_durable(&mut self, snapshot: Vec<u64>) {
        self.durable = snapshot;
    }

    /// The disk changes a block by itself (bit rot, a misdirected write): durably.
    pub fn rot(&mut self, block: usize, stamp: u64) {
        self.current[block] = stamp;
        self.durable[block] = stamp;
    }

    /// Power loss: unsynced writes vanish.
    pub fn crash(&mut self) {
        self.current = self.durable.clone();
    }
}

/// Payload bytes for a run of block stamps.
pub fn encode_stamps(stamps: &[u64]) -> Bytes {
    let mut b = BytesMut::with_capacity(stamps.len() * BLOCK as usize);
    for s in stamps {
        b.put_u64_le(*s);
        b.put_bytes(0, BLOCK as usize - 8);
    }
    b.freeze()
}

/// Stamps back from payload bytes (the inverse of `encode_stamps`).
pub fn decode_stamps(data: &[u8]) -> Vec<u64> {
    data.chunks(BLOCK as usize).map(|c| if c.len() >= 8 { u64::from_le_bytes(c[..8].try_into().expect("8 bytes")) } else { 0 }).collect()
}
