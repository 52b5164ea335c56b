//! The same tests for every store: a random sequence of batches must load back as
//! `SiteState::apply` says. The RocksDB store must also survive reopening, `kill -9`
//! between synced batches, and refuse another schema version.

use super::{MemoryStore, RocksStore, Store, StoreError};
use geomirror_core::{Epoch, ExtentId, Generation, Meta, Role, Seq, SiteState, StoreId, StoreWrite};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Opens (or creates, as a new store of `role` with identity 2) the RocksDB store at `path`.
fn open_store(path: &std::path::Path, role: Role) -> Result<RocksStore, StoreError> {
    RocksStore::open(path, || Ok(SiteState::fresh(role, StoreId(2))))
}

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
                77..=83 => StoreWrite::DelDirty(e),
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
                96 => StoreWrite::Meta(Meta::Amnesiac(rng.gen())),
                97 => StoreWrite::Meta(Meta::FullResyncOwed(rng.gen())),
                98 if rng.gen() => StoreWrite::Meta(Meta::RebuildPending(rng.gen())),
                84 => StoreWrite::Meta(Meta::SyncCursor(rng.gen::<bool>().then(|| geomirror_core::SyncCursor {
                    primary: geomirror_core::StoreId(rng.gen()),
                    epoch: Epoch(rng.gen_range(1..9)),
                    next: rng.gen_range(0..1000),
                }))),
                99 if rng.gen() => StoreWrite::Meta(Meta::PromotedFrom(geomirror_core::frame::Position {
                    applied: Seq(rng.gen()),
                    next_generation: Generation(rng.gen()),
                })),
                98 => StoreWrite::Meta(Meta::Peer(geomirror_core::PeerMemory {
                    store: rng.gen::<bool>().then(|| StoreId(rng.gen())),
                    applied: Seq(rng.gen()),
                    generation: Generation(rng.gen()),
                })),
                _ => StoreWrite::Meta(Meta::Incarnation(i)),
            }
        })
        .collect()
}

fn model(seed: u64, batches: u64) -> SiteState {
    let mut s = SiteState::fresh(Role::Secondary, StoreId(2));
    for i in 0..batches {
        s.apply(&batch(seed, i));
    }
    s
}

/// Writes `count` batches and checks `load` after each against the model.
fn conformance(store: &mut dyn Store, seed: u64, count: u64) {
    let mut expect = SiteState::fresh(Role::Secondary, StoreId(2));
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
        conformance(&mut MemoryStore::new(SiteState::fresh(Role::Secondary, StoreId(2))), seed, 300);
    }
}

#[test]
fn rocks_store_conforms_and_reopens_to_the_same_state() {
    for seed in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_store(dir.path(), Role::Secondary).unwrap();
        conformance(&mut store, seed, 300);
        drop(store);
        let reopened = open_store(dir.path(), Role::Secondary).unwrap();
        assert_eq!(reopened.load(), model(seed, 300), "seed {seed}: reopened");
        // The role given at open only seeds a new store; an existing one keeps its own.
        drop(reopened);
        assert_eq!(open_store(dir.path(), Role::Primary).unwrap().load(), model(seed, 300));
    }
}

#[test]
fn rocks_group_commits_load_and_reopen_as_the_batches_one_by_one() {
    // Groups of 1 to 9 batches, each group one synced write: a batch that re-puts an extent
    // another batch of the same group put (or cleared) must leave the generation log right.
    for seed in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_store(dir.path(), Role::Secondary).unwrap();
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
        assert_eq!(open_store(dir.path(), Role::Secondary).unwrap().load(), model(seed, 300), "seed {seed}: reopened");
    }
}

#[test]
fn another_schema_version_is_refused_and_nothing_is_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_store(dir.path(), Role::Secondary).unwrap();
    store.write(&batch(1, 0)).unwrap();
    drop(store);
    {
        let mut opts = rocksdb::Options::default();
        opts.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&opts, dir.path(), ["record", "generations", "dirty", "meta"]).unwrap();
        db.put_cf(db.cf_handle("meta").unwrap(), geomirror_core::store::keys::meta_key("schema"), [9u8]).unwrap();
    }
    match open_store(dir.path(), Role::Secondary) {
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
    let mut store = open_store(dir.path(), Role::Secondary).unwrap();
    store.write(&[StoreWrite::PutRecord(ExtentId(5), Generation(2))]).unwrap();
    drop(store);
    {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), ["record", "generations", "dirty", "meta"]).unwrap();
        let cf = db.cf_handle("record").unwrap();
        db.delete_cf(cf, geomirror_core::store::keys::extent_key(geomirror_core::store::keys::RECORD, ExtentId(5))).unwrap();
    }
    assert!(matches!(open_store(dir.path(), Role::Secondary), Err(StoreError::Corrupt { .. })));
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
        let mut store = open_store(std::path::Path::new(&dir), Role::Secondary).unwrap();
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
        let state = open_store(dir.path(), Role::Secondary).unwrap().load();
        // The child may have synced more batches than it reported before the kill landed;
        // the store must equal the model after some count no smaller than the reported one.
        let mut m = SiteState::fresh(Role::Secondary, StoreId(2));
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

/// A store with some history, closed: `batches` written after open, then dropped.
fn store_with_history(dir: &std::path::Path, batches: u64) {
    let mut store = open_store(dir, Role::Secondary).unwrap();
    for i in 0..batches {
        store.write(&batch(5, i)).unwrap();
    }
}

fn files_ending(dir: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix)))
        .collect();
    v.sort();
    v
}

/// Every file of the directory with its content: a refused open must leave it exactly so.
fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    v.sort();
    v
}

/// Opens twice (a supervisor restarting the site) and checks both refusals changed nothing.
fn refused_twice_untouched(dir: &std::path::Path) -> StoreError {
    let before = snapshot(dir);
    let Err(first) = open_store(dir, Role::Secondary) else { panic!("the store must be refused") };
    assert!(open_store(dir, Role::Secondary).is_err(), "refused again");
    let after = snapshot(dir);
    assert_eq!(
        before.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        after.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        "a refused open adds or removes no file"
    );
    assert!(before == after, "a refused open leaves every file's content as it was");
    first
}

#[test]
fn a_new_store_has_an_identity_in_a_file_beside_it_and_its_state_in_table_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), Role::Secondary).unwrap();
    assert!(store.created());
    let id = super::identity_file::read(dir.path()).unwrap().expect("an identity file");
    assert_eq!(id.store, StoreId(2));
    drop(store);
    assert!(!files_ending(dir.path(), ".sst").is_empty(), "the state is flushed into table files at creation, not left in a log");
    let again = open_store(dir.path(), Role::Secondary).unwrap();
    assert!(!again.created());
    let id2 = super::identity_file::read(dir.path()).unwrap().unwrap();
    assert_eq!(id2.store, id.store);
    assert!(id2.checkpoint > id.checkpoint, "every open moves the checkpoint on");
}

#[test]
fn a_deleted_write_ahead_log_is_refused_as_lost_state() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path(), 40);
    let logs = files_ending(dir.path(), ".log");
    assert!(!logs.is_empty(), "the writes since the last checkpoint are in a log");
    for l in logs {
        std::fs::remove_file(l).unwrap();
    }
    match refused_twice_untouched(dir.path()) {
        e @ StoreError::Lost { .. } => {
            let text = e.to_string();
            assert!(text.contains("write-ahead log is missing") && text.contains("mv "), "{text}");
        }
        other => panic!("a store that lost its newest log must be refused as lost, got {other}"),
    }
}

#[test]
fn a_corrupted_write_ahead_log_is_refused_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path(), 40);
    let log = files_ending(dir.path(), ".log").pop().unwrap();
    let mut bytes = std::fs::read(&log).unwrap();
    assert!(bytes.len() > 64, "the log holds the batches");
    // Four bytes in the middle of the log: RocksDB's default recovery would stop there and
    // roll the state back without a word.
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4] {
        *b ^= 0x5a;
    }
    std::fs::write(&log, bytes).unwrap();
    match refused_twice_untouched(dir.path()) {
        StoreError::Corrupt { .. } | StoreError::Lost { .. } => {}
        other => panic!("a corrupted log must be refused as corrupt or lost, got {other}"),
    }
}

#[test]
fn a_missing_table_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path(), 40);
    let mut store = open_store(dir.path(), Role::Secondary).unwrap();
    store.checkpoint().unwrap();
    drop(store);
    let sst = files_ending(dir.path(), ".sst");
    assert!(!sst.is_empty());
    std::fs::remove_file(&sst[sst.len() - 1]).unwrap();
    assert!(matches!(open_store(dir.path(), Role::Secondary), Err(StoreError::Corrupt { .. } | StoreError::Lost { .. })));
}

#[test]
fn a_missing_or_foreign_identity_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path(), 5);
    let path = super::identity_file::path(dir.path());
    let saved = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(open_store(dir.path(), Role::Secondary), Err(StoreError::Corrupt { .. })), "no identity file");
    let mut other = super::identity_file::read_bytes(&saved).unwrap();
    other.store = StoreId(99);
    super::identity_file::write(dir.path(), other).unwrap();
    assert!(matches!(open_store(dir.path(), Role::Secondary), Err(StoreError::Corrupt { .. })), "another store's identity file");
}

#[test]
fn an_emptied_state_directory_makes_a_new_store_with_a_new_identity() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path(), 5);
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    let store = RocksStore::open(dir.path(), || Ok(SiteState::amnesiac(StoreId(7)))).unwrap();
    assert!(store.created(), "nothing of the old store is left: the site decides what the new one is");
    assert!(store.load().amnesiac && store.load().store_id == StoreId(7));
}
