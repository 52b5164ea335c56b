//! Arbitrary request headers into the request gate: no panic, and whatever passes lies
//! inside the export and within the payload limit.
#![no_main]

// The node's NBD parser files themselves, compiled here on their own: they depend on
// nothing but `bytes`, and the sanitizer build then skips the node's network, TLS and
// RocksDB stack (see Cargo.toml).
#[allow(dead_code)]
#[path = "../../../lib/node/src/nbd/proto.rs"]
mod proto;

use libfuzzer_sys::fuzz_target;
use proto::{check_request, parse_request_header, Command, Limits, MAX_BLOCK_BYTES, REQUEST_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    if data.len() < REQUEST_HEADER_BYTES + 9 {
        return;
    }
    let raw: [u8; REQUEST_HEADER_BYTES] = data[..REQUEST_HEADER_BYTES].try_into().unwrap();
    let size = u64::from_be_bytes(data[REQUEST_HEADER_BYTES..REQUEST_HEADER_BYTES + 8].try_into().unwrap()).max(1);
    let structured = data[REQUEST_HEADER_BYTES + 8] & 1 == 1;
    let Ok(h) = parse_request_header(&raw) else { return };
    match check_request(&h, &Limits { export_bytes: size, structured }) {
        Ok(Command::Read { offset, len }) | Ok(Command::Write { offset, len, .. }) => {
            assert!(len > 0 && len <= MAX_BLOCK_BYTES && offset.checked_add(len as u64).unwrap() <= size)
        }
        Ok(Command::Trim { offset, len, .. }) | Ok(Command::WriteZeroes { offset, len, .. }) => {
            assert!(len > 0 && offset.checked_add(len as u64).unwrap() <= size)
        }
        Ok(_) => {}
        Err(r) => assert!(r.skip_payload <= MAX_BLOCK_BYTES),
    }
});
