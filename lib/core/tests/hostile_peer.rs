//! A peer with a valid certificate (a compromised site) must not be able to crash or wedge
//! the other: every frame it can send is refused or handled with work and memory bounded by
//! the site's own volume and buffers. Scenarios pin down each bound; a fixed-seed loop runs
//! the harness the cargo-fuzz targets run (`tests/fuzz`, see docs/protocol.md "Bad input").
//!
//! `GEOMIRROR_FRAME_SEEDS=N` runs N seeds per role instead of the default;
//! `GEOMIRROR_FRAME_SEED=S` replays seed S alone.

#[path = "hostile_peer/harness.rs"]
mod harness;

use bytes::Bytes;
use geomirror_core::config::ConfigError;
use geomirror_core::frame::{Apply, Eviction, Frame, LinkLossPolicy, RecordEntries, Refusal, StreamHint, MAX_EPOCH};
use geomirror_core::record::ExtentRun;
use geomirror_core::secondary::{MAX_QUEUED_HINTS, MAX_QUEUED_RECORD_FRAMES, QUEUED_EXTENTS_PER_VOLUME};
use geomirror_core::{CoreConfig, Epoch, ExtentId, Generation, Geometry, Role, Seq, WriteOp};
use harness::{PrimarySite, SecondarySite, EXTENTS, EXTENT_BYTES};

const E: Epoch = Epoch(1);

fn run(start: u64, len: u32) -> ExtentRun {
    ExtentRun { start, len }
}

fn update(id: u64, missed: Vec<ExtentRun>, evictions: Vec<Eviction>) -> Frame {
    Frame::RecordUpdate { epoch: E, id, missed, hints: vec![], room: 0, evictions }
}

fn answers(sent: &[Frame]) -> Vec<(u64, Vec<ExtentRun>)> {
    sent.iter()
        .filter_map(|f| match f {
            Frame::RecordAnswer { id, added, .. } => Some((*id, added.clone())),
            _ => None,
        })
        .collect()
}

/// Asserts that the site has just closed the connection, for a reason that says `why`.
fn refused(disconnects: &[String], why: &str) {
    let last = disconnects.last().unwrap_or_else(|| panic!("expected the connection closed ({why}), but it was not"));
    assert!(last.contains(why), "closed for {last:?}, expected {why:?}");
}

// ----- run lengths up to u32::MAX -----

#[test]
fn the_secondary_refuses_eviction_runs_past_its_volume_before_walking_them() {
    for evictions in [
        vec![Eviction { generation: Generation(1), extents: vec![run(0, u32::MAX)] }],
        vec![Eviction { generation: Generation(1), extents: vec![run(EXTENTS - 1, 2)] }],
        vec![Eviction { generation: Generation(1), extents: vec![run(3, 0)] }],
        // Each run inside the volume, but more extents in all than it has.
        (0..3).map(|g| Eviction { generation: Generation(g), extents: vec![run(0, EXTENTS as u32)] }).collect(),
    ] {
        for piggybacked in [false, true] {
            let mut s = SecondarySite::new();
            // A record batch in flight: anything accepted now waits in the queue.
            s.deliver(update(1, vec![run(0, 1)], vec![]));
            assert_eq!(s.pending_persists(), 1);
            let f =
                if piggybacked { update(2, vec![], evictions.clone()) } else { Frame::Evict { epoch: E, evictions: evictions.clone() } };
            s.deliver(f);
            refused(&s.disconnects, "does not fit this volume");
            assert_eq!(s.pending_persists(), 1, "nothing of the refused frame is stored");
        }
    }
}

#[test]
fn the_secondary_refuses_misses_past_its_volume() {
    for missed in [vec![run(0, u32::MAX)], vec![run(u64::MAX - 1, 1)], vec![run(0, 40), run(30, 40)]] {
        let mut s = SecondarySite::new();
        s.deliver(update(1, missed, vec![]));
        refused(&s.disconnects, "does not fit this volume");
        assert!(answers(&s.sent).is_empty() && s.site.record().is_empty());
    }
}

#[test]
fn the_primary_refuses_snapshot_runs_past_its_volume_before_walking_them() {
    for f in [
        Frame::RecordChunk { epoch: E, entries: vec![RecordEntries { run: run(0, u32::MAX), generation: Generation(1) }] },
        Frame::DivergentChunk { epoch: E, extents: vec![run(1, u32::MAX)] },
        Frame::DivergentChunk { epoch: E, extents: vec![run(EXTENTS, 1)] },
    ] {
        let mut p = PrimarySite::new();
        p.reconnect_without_snapshot();
        p.deliver(f);
        refused(&p.disconnects, "does not fit this volume");
        assert!(p.site.record_copy().is_empty() && p.site.local_dirty().is_empty());
    }
}

#[test]
fn the_primary_refuses_a_snapshot_naming_the_volume_more_than_twice() {
    let mut p = PrimarySite::new();
    p.reconnect_without_snapshot();
    let whole = || Frame::RecordChunk { epoch: E, entries: vec![RecordEntries { run: run(0, EXTENTS as u32), generation: Generation(1) }] };
    p.deliver(whole());
    p.deliver(whole());
    assert!(p.disconnects.is_empty(), "twice the volume is what an honest record and divergent set can name");
    p.deliver(whole());
    refused(&p.disconnects, "snapshot names more than");
}

#[test]
fn the_primary_refuses_a_record_answer_adding_more_than_its_update_allowed() {
    let mut p = PrimarySite::new();
    p.host_write(WriteOp::data(5 * EXTENT_BYTES, Bytes::from(vec![1u8; 4096])));
    let (id, missed, room) = p
        .sent
        .iter()
        .rev()
        .find_map(|f| match f {
            Frame::RecordUpdate { id, missed, room, .. } => Some((*id, missed.clone(), *room)),
            _ => None,
        })
        .expect("a miss sends a record update");
    assert_eq!(missed, vec![run(5, 1)]);
    // The miss and `room` predictions are what the secondary may add; the whole volume is not.
    assert!((room as u64) + 1 < EXTENTS);
    p.deliver(Frame::RecordAnswer { epoch: E, id, generation: Generation(1), added: vec![run(0, EXTENTS as u32)] });
    refused(&p.disconnects, "more than the");
    assert!(p.site.record_copy().is_empty());
}

#[test]
fn failback_checks_and_differences_must_fit_their_extent() {
    let mut s = SecondarySite::new();
    let seq = Seq(s.site.applied().0 + 5);
    s.deliver(Frame::Data { epoch: E, seq, apply: Apply::Verify { extent: ExtentId(EXTENTS), digests: vec![[0; 16]; 16] } });
    refused(&s.disconnects, "failback check of an extent outside the volume");
    let mut s = SecondarySite::new();
    s.deliver(Frame::Data { epoch: E, seq, apply: Apply::Verify { extent: ExtentId(1), digests: vec![[0; 16]; 17] } });
    refused(&s.disconnects, "failback check of an extent outside the volume");
    let mut p = PrimarySite::new();
    p.deliver(Frame::Differs { epoch: E, seq: Seq(1), extent: ExtentId(2), blocks: vec![1; 3] });
    refused(&p.disconnects, "failback difference");
}

// ----- the secondary's queue -----

#[test]
fn a_flood_of_record_updates_is_refused_once_the_queue_is_full() {
    let mut s = SecondarySite::new();
    s.deliver(update(1, vec![run(0, 1)], vec![]));
    assert_eq!(s.pending_persists(), 1, "the first update's batch is being persisted");
    for id in 0..MAX_QUEUED_RECORD_FRAMES as u64 {
        s.deliver(update(100 + id, vec![run(id % EXTENTS, 1)], vec![]));
    }
    assert!(s.disconnects.is_empty(), "{MAX_QUEUED_RECORD_FRAMES} frames fit while a batch is persisted");
    s.deliver(Frame::Evict { epoch: E, evictions: vec![] });
    refused(&s.disconnects, &format!("limits {MAX_QUEUED_RECORD_FRAMES} frames"));
    // What was queued is still answered, once, after its store: nothing accepted is lost.
    s.complete_persists(usize::MAX);
    assert_eq!(answers(&s.sent).len(), 1 + MAX_QUEUED_RECORD_FRAMES);
}

#[test]
fn queued_frames_may_name_only_a_few_volumes_of_extents() {
    // A volume larger than `MAX_LIST_LEN` extents, so that the bound is the volume's.
    let extents = 1u64 << 16;
    let geo = Geometry::new(extents * EXTENT_BYTES, EXTENT_BYTES).unwrap();
    let mut s = SecondarySite::with(harness::config(), geo);
    s.deliver(update(1, vec![run(0, 1)], vec![]));
    let whole =
        || Frame::Evict { epoch: E, evictions: vec![Eviction { generation: Generation(1), extents: vec![run(0, extents as u32)] }] };
    for _ in 0..QUEUED_EXTENTS_PER_VOLUME {
        s.deliver(whole());
    }
    assert!(s.disconnects.is_empty());
    s.deliver(whole());
    refused(&s.disconnects, &format!("{} extents", QUEUED_EXTENTS_PER_VOLUME * extents));
}

#[test]
fn stream_hints_past_the_queue_bound_are_dropped_not_followed() {
    let useful = StreamHint { last: 10, stride: 1, run: 4, want: 4 };
    let mut s = SecondarySite::new();
    s.deliver(update(1, vec![run(0, 1)], vec![]));
    // Hints that predict nothing fill the queue's allowance of hints...
    let idle = vec![StreamHint { last: 0, stride: 0, run: 0, want: 0 }; MAX_QUEUED_HINTS];
    s.deliver(Frame::RecordUpdate { epoch: E, id: 2, missed: vec![], hints: idle, room: 0, evictions: vec![] });
    // ...so a useful one in the same batch is dropped: its update records only its miss.
    s.deliver(Frame::RecordUpdate { epoch: E, id: 3, missed: vec![run(10, 1)], hints: vec![useful], room: 8, evictions: vec![] });
    s.complete_persists(usize::MAX);
    assert!(s.disconnects.is_empty(), "hints are clipped, not refused");
    assert!(answers(&s.sent).contains(&(3, vec![run(10, 1)])), "{:?}", answers(&s.sent));
    // The allowance is per batch: on its own the same hint predicts along the stream.
    s.deliver(Frame::RecordUpdate { epoch: E, id: 4, missed: vec![run(20, 1)], hints: vec![useful], room: 8, evictions: vec![] });
    s.complete_persists(usize::MAX);
    let (_, added) = answers(&s.sent).into_iter().find(|(id, _)| *id == 4).expect("answered");
    assert!(added.iter().map(|r| r.len).sum::<u32>() > 1, "{added:?}");
}

// ----- numbers that would overflow -----

#[test]
fn a_data_item_at_the_last_sequence_number_is_refused() {
    let mut s = SecondarySite::new();
    s.deliver(Frame::Data {
        epoch: E,
        seq: Seq(u64::MAX),
        apply: Apply::ResyncBegin { save_aside: false, skip: true, full: false, from: 0 },
    });
    refused(&s.disconnects, "data frame fails validation");
    assert_eq!(s.site.applied(), Seq(0));
}

#[test]
fn an_epoch_a_promotion_could_not_step_past_is_refused() {
    let mut s = SecondarySite::new();
    s.reconnect_without_hello();
    let hello = Frame::Hello {
        epoch: Epoch(MAX_EPOCH.0 + 1),
        role: Role::Primary,
        volume_bytes: EXTENTS * EXTENT_BYTES,
        extent_bytes: EXTENT_BYTES,
        on_link_loss: LinkLossPolicy::Block,
        authoritative: true,
        wrote_alone: false,
        store: harness::PRIMARY_STORE,
        remembers: None,
        promoted_from: None,
        owes_full_resync: false,
    };
    s.deliver(hello);
    refused(&s.disconnects, "hello frame fails validation");
    assert_eq!(s.site.epoch(), E);
}

#[test]
fn failback_digests_count_towards_the_reorder_buffer() {
    let mut s = SecondarySite::new();
    let ahead = Seq(s.site.applied().0 + 10);
    s.deliver(Frame::Data { epoch: E, seq: ahead, apply: Apply::Verify { extent: ExtentId(3), digests: vec![[0; 16]; 16] } });
    assert!(s.disconnects.is_empty());
    assert_eq!(s.site.stats().reorder_bytes, 16 * 16);
}

#[test]
fn a_refused_item_does_not_use_up_the_reorder_buffer() {
    let mut s = SecondarySite::new();
    let whole = Bytes::from(vec![9u8; (EXTENTS * EXTENT_BYTES) as usize]);
    let base = s.site.applied().0 + 2;
    let limit = harness::config().reorder_buffer_bytes;
    let fit = limit / whole.len() as u64;
    for i in 0..=fit {
        s.deliver(Frame::Data { epoch: E, seq: Seq(base + i), apply: Apply::Write(WriteOp::data(0, whole.clone())) });
    }
    refused(&s.disconnects, "overran the reorder buffer");
    // A small item still fits beside what is held (until the transport closes the
    // connection, frames already on the way keep coming).
    let closed = s.disconnects.len();
    s.deliver(Frame::Data { epoch: E, seq: Seq(base + fit + 1), apply: Apply::Write(WriteOp::zero(0, 4096)) });
    assert_eq!(s.disconnects.len(), closed, "{:?}", s.disconnects.last());
    assert_eq!(s.site.stats().reorder_bytes, fit * whole.len() as u64 + 64);
}

// ----- epochs and the handshake -----

#[test]
fn the_secondary_refuses_frames_before_the_handshake_and_of_other_epochs() {
    let mut s = SecondarySite::new();
    s.reconnect_without_hello();
    s.deliver(update(1, vec![run(0, 1)], vec![]));
    refused(&s.disconnects, "refused at epoch 1");
    assert!(matches!(s.sent.last(), Some(Frame::Refused { reason: Refusal::StaleEpoch, .. })));
    for epoch in [Epoch(0), Epoch(2)] {
        let mut s = SecondarySite::new();
        s.deliver(Frame::RecordUpdate { epoch, id: 1, missed: vec![run(0, 1)], hints: vec![], room: 0, evictions: vec![] });
        refused(&s.disconnects, &format!("of epoch {} refused at epoch 1", epoch.0));
        assert_eq!(s.pending_persists(), 0, "nothing of it is stored");
        assert!(s.site.record().is_empty());
    }
}

#[test]
fn a_second_hello_on_one_connection_is_refused() {
    let mut s = SecondarySite::new();
    let welcomes = |s: &SecondarySite| s.sent.iter().filter(|f| matches!(f, Frame::Welcome { .. })).count();
    assert_eq!(welcomes(&s), 1);
    s.deliver(Frame::Hello {
        epoch: E,
        role: Role::Primary,
        volume_bytes: EXTENTS * EXTENT_BYTES,
        extent_bytes: EXTENT_BYTES,
        on_link_loss: LinkLossPolicy::Block,
        authoritative: true,
        wrote_alone: false,
        store: harness::PRIMARY_STORE,
        remembers: None,
        promoted_from: None,
        owes_full_resync: false,
    });
    refused(&s.disconnects, "a second hello");
    s.complete_persists(usize::MAX);
    assert_eq!(welcomes(&s), 1, "no second snapshot");
    // A new connection starts a new handshake.
    s.reconnect();
    assert_eq!(welcomes(&s), 2);
}

#[test]
fn the_primary_ignores_older_epochs_and_is_fenced_by_newer_ones() {
    let mut p = PrimarySite::new();
    let refused_before = p.site.stats().frames_refused;
    p.deliver(Frame::Applied { epoch: Epoch(0), through: Seq(1) });
    assert_eq!(p.site.stats().frames_refused, refused_before + 1);
    assert_eq!(p.site.phase(), geomirror_core::Phase::Serving);
    p.deliver(Frame::Authoritative { epoch: Epoch(2) });
    assert_eq!(p.site.phase(), geomirror_core::Phase::Fenced);
    refused(&p.disconnects, "fenced by epoch 2");
}

#[test]
fn the_config_keeps_updates_in_flight_within_the_peer_queue() {
    let cfg = CoreConfig { max_record_updates_in_flight: MAX_QUEUED_RECORD_FRAMES / 2 + 1, ..CoreConfig::default() };
    assert_eq!(
        cfg.validate(),
        Err(ConfigError::TooLarge {
            field: "max_record_updates_in_flight",
            max: MAX_QUEUED_RECORD_FRAMES as u64 / 2,
            got: MAX_QUEUED_RECORD_FRAMES as u64 / 2 + 1
        })
    );
    assert!(CoreConfig { max_record_updates_in_flight: MAX_QUEUED_RECORD_FRAMES / 2, ..CoreConfig::default() }.validate().is_ok());
}

// ----- random sequences of frames -----

/// splitmix64: the input bytes of seed `seed`, 16 to 4096 of them.
fn input_of(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let len = 16 + (next() % 4080) as usize;
    (0..len).map(|_| next() as u8).collect()
}

fn seeds() -> std::ops::Range<u64> {
    if let Some(s) = std::env::var("GEOMIRROR_FRAME_SEED").ok().and_then(|v| v.parse().ok()) {
        return s..s + 1;
    }
    0..std::env::var("GEOMIRROR_FRAME_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

fn each_seed(role: &str, body: fn(&[u8])) {
    for seed in seeds() {
        let input = input_of(seed);
        if std::panic::catch_unwind(|| body(&input)).is_err() {
            panic!(
                "{role} seed {seed} failed; replay: GEOMIRROR_FRAME_SEED={seed} cargo test --release -p geomirror-core --test hostile_peer"
            );
        }
    }
}

#[test]
fn random_frames_at_a_secondary_neither_panic_nor_grow_its_buffers() {
    each_seed("secondary", harness::run_secondary);
}

#[test]
fn random_frames_and_host_writes_at_a_primary_neither_panic_nor_grow_its_buffers() {
    each_seed("primary", harness::run_primary);
}

#[test]
fn the_random_inputs_reach_past_the_handshake() {
    // The loop above is only worth its time if its frames get to the handlers behind the
    // epoch check: record batches answered and data applied at the secondary, answers taken
    // and data applied (acknowledged) at the primary.
    let (mut answered, mut applied, mut taken, mut acknowledged) = (0, 0, 0, 0);
    for seed in 0..200 {
        let input = input_of(seed);
        let mut s = SecondarySite::new();
        let mut i = harness::Input::new(&input);
        while s.step(&mut i) {}
        answered += answers(&s.sent).len();
        applied += s.site.stats().writes_applied;
        let mut p = PrimarySite::new();
        let mut i = harness::Input::new(&input);
        while p.step(&mut i) {}
        taken += p.site.stats().record_answers;
        acknowledged += u64::from(p.site.stats().applied_seq > p.site.incarnation() << 40);
    }
    assert!(
        answered > 100 && applied > 20 && taken > 100 && acknowledged > 20,
        "secondary: {answered} answers, {applied} writes applied; primary: {taken} answers, {acknowledged} runs with data applied"
    );
}
