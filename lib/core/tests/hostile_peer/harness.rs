//! A site in a valid session with a peer that the input plays: the harness both the
//! ordinary tests (`tests/hostile_peer.rs`, a fixed-seed loop) and the cargo-fuzz targets
//! (`tests/fuzz/fuzz_targets/frames_at_*.rs`, which include this file by path) drive.
//!
//! Owns: the session's fixed ground (volume, config, store identities, how far one input may
//! go) and the two fuzz targets' bodies. Its rooms, beside this file: `input.rs` (input bytes
//! read as numbers), `frames.rs` (frames and host writes built from input), `shell.rs` (what
//! one step emitted, and the bound on it), `secondary.rs` and `primary.rs` (a mini shell
//! around each role's state machine that does what the node's volume driver does: completes
//! stores, media syncs, reads and failback checks when the input says so, closes and reopens
//! the connection when the site asks). After each step a site drains `poll_action` and
//! checks that nothing a frame says made it emit more than its own bounded state allows.
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

// This file is included by path (from the tests and the fuzz targets), so its rooms are
// found beside it, as a `mod.rs`'s would be.
mod frames;
mod input;
mod primary;
mod secondary;
mod shell;

pub use input::Input;
pub use primary::PrimarySite;
pub use secondary::SecondarySite;

use geomirror_core::frame::MAX_FRAME_BYTES;
use geomirror_core::{CoreConfig, Geometry, StoreId};

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
