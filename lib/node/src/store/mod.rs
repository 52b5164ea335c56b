//! Where a site keeps the state the core asks to persist.
//!
//! Owns: the `Store` trait, the one interface between the core's `Persist` actions and a
//! durable medium; `RocksStore`, the durable one; and `MemoryStore`, the store of a
//! standalone site. Both pass the same conformance tests (`tests.rs`).
//!
//! Must not: interpret what it stores. `SiteState::apply` is the one meaning of a batch.
//!
//! A standalone site has no peer, so nothing it would persist (its incarnation, a dirty map
//! for a peer, an epoch) has a reader after a restart: `MemoryStore` is honest for it. Sites
//! with a peer use the RocksDB store, which implements the same trait.

use geomirror_core::{SiteState, StoreWrite};
use std::io;

pub mod identity_file;
mod rocks;
#[cfg(test)]
mod tests;

pub use rocks::{RocksStore, StoreError, CHECKPOINT_INTERVAL};

/// A new store identity: 128 random bits from the operating system.
pub fn new_store_id() -> io::Result<geomirror_core::StoreId> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(io::Error::other)?;
    Ok(geomirror_core::StoreId(u128::from_be_bytes(b)))
}

pub trait Store: Send {
    /// The state as of the last successful `write`.
    fn load(&self) -> SiteState;
    /// Applies a batch atomically; when it returns `Ok`, the batch is durable.
    fn write(&mut self, batch: &[StoreWrite]) -> io::Result<()>;
    /// Applies batches in order, each atomically; when it returns `Ok`, all are durable. A
    /// store may make them durable together, with one sync (group commit). After an error
    /// the store must not be used again.
    fn write_group(&mut self, batches: &[Vec<StoreWrite>]) -> io::Result<()> {
        for b in batches {
            self.write(b)?;
        }
        Ok(())
    }
    /// Moves what is durable only in a log into the store's files and records the moment
    /// outside it (see `RocksStore`, "Checkpoints"); called periodically and at a clean stop.
    fn checkpoint(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Keeps the state in memory: durable for the life of the process only.
pub struct MemoryStore {
    state: SiteState,
}

impl MemoryStore {
    pub fn new(state: SiteState) -> MemoryStore {
        MemoryStore { state }
    }
}

impl Store for MemoryStore {
    fn load(&self) -> SiteState {
        self.state.clone()
    }

    fn write(&mut self, batch: &[StoreWrite]) -> io::Result<()> {
        self.state.apply(batch);
        Ok(())
    }
}
