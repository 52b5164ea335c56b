//! Frames from a hostile primary at a secondary whose handshake is done: decoded through the
//! real codec, interleaved with store, media and failback-check completions and reconnects.
//! No panic, and no step makes the site emit more than its own bounded state allows (the
//! harness asserts it). The harness is the one `cargo test -p geomirror-core --test
//! hostile_peer` runs on fixed seeds; see its header for how input bytes become steps.
#![no_main]

#[path = "../../../lib/core/tests/hostile_peer/harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::run_secondary(data));
