//! Arbitrary bytes, cut into arbitrary pieces, into the NBD handshake: no panic, bounded
//! buffering, and nothing consumed after the handshake ends.
#![no_main]

// The node's NBD parser files themselves, compiled here on their own: they depend on
// nothing but `bytes`, and the sanitizer build then skips the node's network, TLS and
// RocksDB stack (see Cargo.toml).
#[allow(dead_code)]
#[path = "../../../lib/node/src/nbd/handshake.rs"]
mod handshake;
#[allow(dead_code)]
#[path = "../../../lib/node/src/nbd/proto.rs"]
mod proto;

use bytes::{BufMut, BytesMut};
use handshake::{ExportInfo, Handshake, Step, MAX_OPTION_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let exports = vec![
        ExportInfo { name: "vol0".into(), description: "first".into(), size_bytes: 1 << 30 },
        ExportInfo { name: "logs".into(), description: String::new(), size_bytes: 4096 },
    ];
    let mut h = Handshake::new(exports);
    let mut input = BytesMut::new();
    let step = (cut as usize).max(1);
    for piece in data.chunks(step) {
        input.put_slice(piece);
        match h.feed(&mut input) {
            Step::More => assert!(input.len() <= MAX_OPTION_BYTES as usize + 16),
            Step::Transmit(n) => {
                assert!(n.export < 2);
                return;
            }
            Step::Close(_) => return,
        }
        let _ = h.take_output();
    }
});
