//! Random input against the NBD parsers, in every test run. The cargo-fuzz targets in
//! `tests/fuzz` drive the same two entry points with coverage guidance (see
//! docs/nbd.md); these property tests keep a floor under them in the ordinary suite.

use super::handshake::{ExportInfo, Handshake, Step, MAX_OPTIONS, MAX_OPTION_BYTES};
use super::proto::*;
use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

fn exports() -> Vec<ExportInfo> {
    vec![ExportInfo { name: "vol0".into(), description: "d".into(), size_bytes: 1 << 30 }]
}

/// Bytes that often look like NBD: the magic words and option numbers appear among noise.
fn nbdish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        any::<u8>().prop_map(|b| vec![b]),
        Just(IHAVEOPT.to_be_bytes().to_vec()),
        (0u32..12).prop_map(|o| o.to_be_bytes().to_vec()),
        (0u32..6000).prop_map(|l| l.to_be_bytes().to_vec()),
        Just(b"vol0".to_vec()),
        Just(3u32.to_be_bytes().to_vec()),
    ];
    proptest::collection::vec(piece, 0..64).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    /// Any byte stream, split anywhere: no panic, bounded output, and a finished handshake
    /// consumes nothing more.
    #[test]
    fn handshake_survives_any_input(data in nbdish(), cuts in proptest::collection::vec(0usize..64, 0..8)) {
        let mut h = Handshake::new(exports());
        let mut out = h.take_output().len();
        let mut input = BytesMut::new();
        let mut at: usize = 0;
        let mut finished = false;
        for cut in cuts.into_iter().chain([usize::MAX]) {
            let end = at.saturating_add(cut).min(data.len());
            input.put_slice(&data[at..end]);
            at = end;
            if finished {
                break;
            }
            match h.feed(&mut input) {
                Step::More => {}
                Step::Transmit(n) => { prop_assert_eq!(n.export, 0); finished = true; }
                Step::Close(_) => finished = true,
            }
            out += h.take_output().len();
            prop_assert!(input.len() <= MAX_OPTION_BYTES as usize + 16, "buffered input is bounded");
        }
        // Replies are bounded by the options that can be sent.
        prop_assert!(out <= 18 + (MAX_OPTIONS as usize) * (20 + 4096 + 64));
    }

    /// Any request header: the gate never panics, and what it lets through lies inside the
    /// export and within the payload limit.
    #[test]
    fn request_gate_only_passes_in_range_requests(raw in proptest::array::uniform28(any::<u8>()), size in 1u64..(1 << 40), structured: bool, magic: bool) {
        let mut raw = raw;
        if magic {
            raw[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let Ok(h) = parse_request_header(&raw) else { return Ok(()) };
        match check_request(&h, &Limits { export_bytes: size, structured }) {
            Ok(Command::Read { offset, len }) | Ok(Command::Write { offset, len, .. }) => {
                prop_assert!(len > 0 && len <= MAX_BLOCK_BYTES && offset + len as u64 <= size);
            }
            Ok(Command::Trim { offset, len, .. }) | Ok(Command::WriteZeroes { offset, len, .. }) => {
                prop_assert!(len > 0 && offset + len as u64 <= size);
            }
            Ok(Command::Flush) | Ok(Command::Disconnect) => {}
            Err(r) => prop_assert!(r.skip_payload <= MAX_BLOCK_BYTES && !(r.close && r.skip_payload > 0)),
        }
    }
}
