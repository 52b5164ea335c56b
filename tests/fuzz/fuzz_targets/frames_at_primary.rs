//! Frames from a hostile secondary at a serving primary whose handshake is done, interleaved
//! with host writes and flushes, store, media and read completions, and reconnects. No panic,
//! and no step makes the site emit more than its own bounded state allows (the harness
//! asserts it). The harness is the one `cargo test -p geomirror-core --test hostile_peer`
//! runs on fixed seeds; see its header for how input bytes become steps.
#![no_main]

#[path = "../../../lib/core/tests/hostile_peer/harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::run_primary(data));
