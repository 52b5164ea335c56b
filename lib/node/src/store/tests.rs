//! The same tests for every store: a random sequence of batches must load back as
//! `SiteState::apply` says. The RocksDB store must also survive reopening, `kill -9`
//! between synced batches, and refuse another schema version.

use super::{MemoryStore, RocksStore, Store, StoreError};
use geomirror_core::{Epoch, ExtentId, Generation, Meta, Role, Seq, SiteState, StoreWrite};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Batch `i` of the sequence of `seed`: record puts (often re-putting an extent into a newer
/// generation), deletes, occasional clears, dirty marks and every kind of meta.
fn batch(seed: u64, i: u64) -> Vec<StoreWrite> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let n = rng.gen_range(1..12);
    (0..n)
        .map(|_| {
            let e = ExtentId(rng.gen_range(0..64));
            match rng.gen_range(0..100) {
                0..=44 => StoreWrite::PutRecord(e, Generation(i + 1)),
                45..=64 => StoreWrite::DelRecord(e),
                65..=66 => StoreWrite::ClearRecord,
                67..=76 => StoreWrite::PutDirty(e),
                77..=84 => StoreWrite::DelDirty(e),
                85 => StoreWrite::Meta(Meta::Epoch(Epoch(rng.gen_range(1..9)))),
                86 => StoreWrite::Meta(Meta::Role(if rng.gen() { Role::Primary } else { Role::Secondary })),
                87 => StoreWrite::Meta(Meta::Applied(Seq(i))),
                88 => StoreWrite::Meta(Meta::ApplyHighWater(Seq(i + 3))),
                89 => StoreWrite::Meta(Meta::NextGeneration(Generation(i + 2))),
                90 => StoreWrite::Meta(Meta::Consistent(rng.gen())),
                91 => StoreWrite::Meta(Meta::Authoritative(rng.gen())),
                92 => StoreWrite::Meta(Meta::WroteAlone(rng.gen())),
                93 => StoreWrite::Meta(Meta::PeerMayDegrade(rng.gen())),
                94 => StoreWrite::Meta(Meta::FailbackPending(rng.gen())),
                95 => StoreWrite::Meta(Meta::SaveAsideOnResync(rng.gen())),
                _ => StoreWrite::Meta(Meta::Incarnation(i)),
            }
        })
        .collect()
}

fn model(seed: u64, batches: u64) -> SiteState {
    let mut s = SiteState::fresh(Role::Secondary);
    for i in 0..batches {
        s.apply(&batch(seed, i));
    }
    s
}

/// Writes `count` batches and checks `load` after each against the model.
fn conformance(store: &mut dyn Store, seed: u64, count: u64) {
    let mut expect = SiteState::fresh(Role::Secondary);
    assert_eq!(store.load(), expect);
    for i in 0..count {
        let b = batch(seed, i);
        store.write(&b).unwrap();
        expect.apply(&b);
        assert_eq!(store.load(), expect, "seed {seed}, after batch {i}: {b:?}");
    }
}

#[test]
fn memory_store_conforms() {
    for seed in 0..20 {
        conformance(&mut MemoryStore::new(SiteState::fresh(Role::Secondary)), seed, 300);
    }
}

#[test]
fn rocks_store_conforms_and_reopens_to_the_same_state() {
    for seed in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RocksStore::open(dir.path(), Role::Secondary).unwrap();
        conformance(&mut store, seed, 300);
        drop(store);
        let reopened = RocksStore::open(dir.path(), Role::Secondary).unwrap();
        assert_eq!(reopened.load(), model(seed, 300), "seed {seed}: reopened");
        // The role given at open only seeds a new store; an existing one keeps its own.
        drop(reopened);
        assert_eq!(RocksStore::open(dir.path(), Role::Primary).unwrap().load(), model(seed, 300));
    }
}

#[test]
fn rocks_group_commits_load_and_reopen_as_the_batches_one_by_one() {
    // Groups of 1 to 9 batches, each group one synced write: a batch that re-puts an extent
    // another batch of the same group put (or cleared) must leave the generation log right.
    for seed in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RocksStore::open(dir.path(), Role::Secondary).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut i = 0;
        while i < 300 {
            let n = rng.gen_range(1..10).min(300 - i);
            let group: Vec<Vec<StoreWrite>> = (i..i + n).map(|k| batch(seed, k)).collect();
            store.write_group(&group).unwrap();
            i += n;
            assert_eq!(store.load(), model(seed, i), "seed {seed}, after {i} batches");
        }
        drop(store);
        assert_eq!(RocksStore::open(dir.path(), Role::Secondary).unwrap().load(), model(seed, 300), "seed {seed}: reopened");
    }
}

#[test]
fn another_schema_version_is_refused_and_nothing_is_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RocksStore::open(dir.path(), Role::Secondary).unwrap();
    store.write(&batch(1, 0)).unwrap();
    drop(store);
    {
        let mut opts = rocksdb::Options::default();
        opts.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&opts, dir.path(), ["record", "generations", "dirty", "meta"]).unwrap();
        db.put_cf(db.cf_handle("meta").unwrap(), geomirror_core::store::keys::meta_key("schema"), [9u8]).unwrap();
    }
    match RocksStore::open(dir.path(), Role::Secondary) {
        Err(StoreError::Schema { found: 9, expected: 1, .. }) => {}
        other => panic!("expected a schema refusal, got {:?}", other.map(|s| s.load())),
    }
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), ["record", "generations", "dirty", "meta"]).unwrap();
    let schema = db.get_cf(db.cf_handle("meta").unwrap(), geomirror_core::store::keys::meta_key("schema")).unwrap();
    assert_eq!(schema, Some(vec![9u8]), "the refused store is left as it was");
}

#[test]
fn a_damaged_generation_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RocksStore::open(dir.path(), Role::Secondary).unwrap();
    store.write(&[StoreWrite::PutRecord(ExtentId(5), Generation(2))]).unwrap();
    drop(store);
    {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), ["record", "generations", "dirty", "meta"]).unwrap();
        let cf = db.cf_handle("record").unwrap();
        db.delete_cf(cf, geomirror_core::store::keys::extent_key(geomirror_core::store::keys::RECORD, ExtentId(5))).unwrap();
    }
    assert!(matches!(RocksStore::open(dir.path(), Role::Secondary), Err(StoreError::Corrupt { .. })));
}

const CRASH_CHILD: &str = "GEOMIRROR_STORE_CRASH_CHILD";
const CRASH_SEED: u64 = 77;

/// Kills a process writing synced batches at a random moment: every batch it reported
/// written is in the reopened store, and the store holds a whole prefix of the sequence.
/// The test runs itself as the child (with `CRASH_CHILD` set) so the writer is a real
/// process that `kill -9` can stop between any two instructions.
#[test]
fn rocks_store_keeps_every_synced_batch_across_kill_9() {
    if let Ok(dir) = std::env::var(CRASH_CHILD) {
        let mut store = RocksStore::open(std::path::Path::new(&dir), Role::Secondary).unwrap();
        for i in 0.. {
            store.write(&batch(CRASH_SEED, i)).unwrap();
            println!("synced {i}");
        }
        unreachable!();
    }
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::rocks_store_keeps_every_synced_batch_across_kill_9", "--nocapture", "--test-threads=1"])
            .env(CRASH_CHILD, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let want = 50 + round * 97;
        let mut acked = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("synced ") {
                acked = Some(n.parse::<u64>().unwrap());
                if acked == Some(want) {
                    break;
                }
            }
        }
        let acked = acked.expect("the child reported synced batches");
        child.kill().unwrap();
        child.wait().unwrap();
        let state = RocksStore::open(dir.path(), Role::Secondary).unwrap().load();
        // The child may have synced more batches than it reported before the kill landed;
        // the store must equal the model after some count no smaller than the reported one.
        let mut m = SiteState::fresh(Role::Secondary);
        let mut found = None;
        for n in 1..=acked + 1_000_000 {
            m.apply(&batch(CRASH_SEED, n - 1));
            if n > acked && m == state {
                found = Some(n);
                break;
            }
        }
        assert!(found.is_some(), "round {round}: after {} reported batches the store holds no prefix of at least that many", acked + 1);
    }
}
