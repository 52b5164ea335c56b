//! Amnesia on real processes and real RocksDB files: a site whose store lost state it had
//! acknowledged is never trusted as it is. Two `geomirror run` sites reach each other through
//! `geomirror wan-emu` both ways; the stores are damaged as an operator's mistake or a failed
//! disk would damage them, between `kill -9` and a restart.
//!
//! The sequence of the first test is the one an adversarial review ran against an earlier
//! build, which ended with the images differing in 5 MiB while both sites reported linked,
//! drained, authoritative, no debt, no flag.

use geomirror_tests::admin::{clean_primary, clean_secondary, Operator};
use geomirror_tests::pair::{remember_admin, stop_both_and_compare, two_sites_with_admin, PairOptions};
use geomirror_tests::qemu::{qemu_io, qemu_io_command};
use geomirror_tests::site::{output_within, run_ok, tool, Site};
use geomirror_tests::wait;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const MIB: u64 = 1 << 20;

fn setup(dir: &Path) -> (Site, Site, geomirror_tests::pair::WanEmu, geomirror_tests::pair::WanEmu) {
    setup_with(dir, PairOptions::default())
}

/// `setup` from other options (the admin section is this file's, with its token).
fn setup_with(dir: &Path, o: PairOptions) -> (Site, Site, geomirror_tests::pair::WanEmu, geomirror_tests::pair::WanEmu) {
    two_sites_with_admin(Path::new(BIN), dir, TOKEN, o)
}

/// Notes where a site's admin API listens (port 0 in the config), for `cli`.
fn remember(dir: &Path, name: &str, site: &Site) {
    remember_admin(dir, name, site);
}

/// `geomirror <command> --config <site>.toml` with the site's token, plus `extra`.
fn cli(dir: &Path, command: &str, site: &str, extra: &[&str]) -> Output {
    Operator::new(Path::new(BIN), dir).cli(command, site, extra)
}

fn status(dir: &Path, site: &str) -> serde_json::Value {
    Operator::new(Path::new(BIN), dir).status(site)
}

/// Polls `site`'s status until `done` holds for its volume, for at most two minutes;
/// returns the volume's status.
fn wait_for(dir: &Path, site: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    Operator::new(Path::new(BIN), dir).wait_for(Duration::from_secs(120), site, what, done)
}

/// The files of a RocksDB directory ending with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(suffix)).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn a_secondary_whose_log_was_deleted_is_refused_flagged_and_not_promoted_until_it_is_resynced_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut dc1, mut dc2, to_dc2, _to_dc1) = setup(dir);

    // 1. Eight MiB written and drained.
    qemu_io(dc1.url("vol0"), &["write -P 0x11 0 8M"]);
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true && v["lag_bytes"] == 0);

    // 2. The link slows and is cut; eight more MiB to the recorded extents are hits,
    // acknowledged at once, and lag.
    assert!(to_dc2.command("rate-mbps 1").starts_with("ok"));
    to_dc2.set_cut(true);
    qemu_io(dc1.url("vol0"), &["write -P 0x22 0 8M"]);
    wait_for(dir, "dc1", "8 MiB behind", |v| v["lag_bytes"].as_u64().unwrap() >= 8 * MIB);

    // 3. kill -9 of the secondary, and its write-ahead log deleted.
    dc2.kill();
    let store = dir.join("dc2-state/vol0");
    let logs = files_ending(&store, ".log");
    assert!(!logs.is_empty(), "the store's newest writes are in a log");
    for l in &logs {
        std::fs::remove_file(l).unwrap();
    }
    // The site refuses to start on that store, and says what to do.
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.join("dc2.toml"))
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = output_within(child, Duration::from_secs(60)).expect("a refused start exits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dc2 started on a store that lost its log:\n{err}");
    assert!(err.contains("lost state it had made durable") && err.contains("write-ahead log is missing"), "{err}");
    assert!(err.contains(&format!("mv {}", store.display())), "the refusal says how to go on:\n{err}");
    // The operator follows it: the store is moved aside and the site starts, as an amnesiac
    // secondary, since its media holds data nothing vouches for.
    std::fs::rename(&store, dir.join("dc2-state/vol0.lost")).unwrap();
    dc2.start_again();
    remember(dir, "dc2", &dc2);
    let v = status(dir, "dc2")["volumes"][0].clone();
    assert_eq!((v["role"].as_str(), v["amnesiac"].as_bool()), (Some("secondary"), Some(true)), "{v:#}");
    assert_eq!((v["authoritative"].as_bool(), v["consistent"].as_bool()), (Some(false), Some(false)), "{v:#}");
    let text = String::from_utf8_lossy(&cli(dir, "status", "dc2", &[]).stdout).to_string();
    assert!(text.contains("AMNESIAC") && text.contains("--force"), "{text}");

    // 4. kill -9 of the primary; the amnesiac is not promoted without --force.
    dc1.kill();
    let out = cli(dir, "promote", "dc2", &["--reason", "dc1 lost"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an amnesiac was promoted without --force");
    assert!(err.contains("amnesiac") && err.contains("--force"), "{err}");
    assert_eq!(status(dir, "dc2")["volumes"][0]["role"], "secondary");

    // 5. The way back: the old primary returns and finds a store it never paired with (a
    // rebuilt site). The full sync waits for an operator, who sees its size, names the
    // store (a wrong id approves nothing), and approves it; the whole volume is then
    // resynced by digest, and only the differing blocks cross.
    dc1.start_again();
    remember(dir, "dc1", &dc1);
    assert!(to_dc2.command("rate-mbps 0").starts_with("ok"));
    to_dc2.set_cut(false);
    let new_store = status(dir, "dc2")["volumes"][0]["store_id"].as_str().unwrap().to_owned();
    let v1 = wait_for(dir, "dc1", "waiting to rebuild the new store", |v| v["rebuild_pending_store"].as_str() == Some(&new_store));
    assert_eq!(v1["full_resync_total_extents"], serde_json::Value::Null, "nothing is swept before the approval: {v1:#}");
    let shown = String::from_utf8_lossy(&cli(dir, "rebuild", "dc1", &[]).stdout).to_string();
    assert!(shown.contains(&new_store) && shown.contains("reads 8.0 MiB here") && shown.contains("--approve"), "{shown}");
    let wrong = "00000000-0000-0000-0000-000000000001";
    let out = cli(dir, "rebuild", "dc1", &["--approve", wrong]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("(409)") && err.contains("nothing was approved"), "{err}");
    let out = cli(dir, "rebuild", "dc1", &["--approve", "not-a-store"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(400)"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(dir, "dc1")["volumes"][0]["rebuild_pending_store"].as_str(), Some(new_store.as_str()), "still waiting");
    let out = cli(dir, "rebuild", "dc1", &["--approve", &new_store, "--reason", "dc2 rebuilt"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v1 = wait_for(dir, "dc1", "clean after a full resync", clean_primary);
    wait_for(dir, "dc2", "clean after a full resync", clean_secondary);
    assert!(v1["amnesia_reason"].as_str().is_some_and(|r| r.contains("not the store")), "{v1:#}");
    let (verified, copied) = (v1["resync_extents_verified"].as_u64().unwrap(), v1["resync_bytes_copied"].as_u64().unwrap());
    assert!(verified >= 64, "the full resync checked every one of the 64 extents: {v1:#}");
    assert!(copied <= 16 * MIB, "only what differs crosses: {copied} bytes copied");
    stop_both_and_compare(dir, dc1, dc2);
}

#[test]
fn a_secondary_store_restored_from_an_older_copy_is_found_out_by_its_primary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (dc1, mut dc2, _to_dc2, _to_dc1) = setup(dir);
    qemu_io(dc1.url("vol0"), &["write -P 0x11 0 8M"]);
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true && v["lag_bytes"] == 0);

    // A copy of the secondary's store, taken while it is stopped: whole and consistent, so
    // nothing at open can tell it from the real one.
    let (status_code, log) = dc2.stop();
    assert!(status_code.success(), "{log}");
    let store = dir.join("dc2-state/vol0");
    copy_dir(&store, &dir.join("backup"));
    dc2.start_again();
    remember(dir, "dc2", &dc2);

    // The secondary acknowledges more, then its store is put back to the copy.
    qemu_io(dc1.url("vol0"), &["write -P 0x33 8M 8M"]);
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true && v["lag_bytes"] == 0);
    let (status_code, log) = dc2.stop();
    assert!(status_code.success(), "{log}");
    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(&dir.join("backup"), &store);
    // Lose what the copy lacks on the media too, as a restore of the whole site would.
    std::fs::write(dir.join("dc2.img"), vec![0u8; 64 * MIB as usize]).unwrap();
    dc2.start_again();
    remember(dir, "dc2", &dc2);

    // The primary remembers what this store acknowledged: it is an amnesiac, flagged, and
    // resynced whole; nothing reports clean before the images are equal.
    let v1 = wait_for(dir, "dc1", "clean after a full resync", clean_primary);
    wait_for(dir, "dc2", "clean after a full resync", clean_secondary);
    let reason = v1["amnesia_reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("lost acknowledged") || reason.contains("amnesiac"), "{v1:#}");
    // The metrics say so too (refreshed every second: read until they do, within a bound).
    let admin = dc1.admin.unwrap().port();
    wait::until(Duration::from_secs(30), "the detection and the full resync counted", || {
        let out = tool("curl", "curl")
            .args(["-s", "--cacert"])
            .arg(dir.join("certs/ca.pem"))
            .args(["--resolve", &format!("dc1:{admin}:127.0.0.1")])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .arg(format!("https://dc1:{admin}/metrics"))
            .output()
            .unwrap();
        let metrics = String::from_utf8_lossy(&out.stdout).to_string();
        let counted = |name: &str| metrics.lines().any(|l| l.starts_with(name) && !l.ends_with(" 0"));
        if counted("geomirror_amnesiac_peers_detected_total") && counted("geomirror_full_resyncs_completed_total") {
            Ok(())
        } else {
            Err(metrics)
        }
    });
    stop_both_and_compare(dir, dc1, dc2);
}

/// Whether `image` holds `pattern` in every byte of `len` bytes at `offset` (a media file of
/// a stopped or killed site).
fn holds(image: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let out = qemu_io_command(image, &[format!("read -P {pattern:#04x} {offset} {len}")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("read {len}/{len} bytes")), "qemu-io read of {}: {text}", image.display());
    !text.contains("verification failed")
}

/// `cp -a from to`, as an operator would copy a state directory.
fn cp_a(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Polls both sites until both report clean in one round, for at most `limit`; returns
/// their volumes' statuses.
fn wait_for_clean_pair(dir: &Path, limit: Duration) -> (serde_json::Value, serde_json::Value) {
    wait::until(limit, "the pair reported clean", || {
        let (v1, v2) = (status(dir, "dc1")["volumes"][0].clone(), status(dir, "dc2")["volumes"][0].clone());
        if clean_primary(&v1) && clean_secondary(&v2) {
            Ok((v1, v2))
        } else {
            Err(format!("\ndc1 {v1:#}\ndc2 {v2:#}"))
        }
    })
}

/// The double fault of a second adversarial review, which ended with the images differing in
/// the 6 MiB at 200M while both sites reported clean: a miss is recorded on the secondary and
/// acknowledged, and the primary crashes before its memory of the peer holds that answer
/// durably, together with the secondary, whose store is then put back to a hot copy taken
/// just before the miss. Whenever the pair reports clean again, the images must be identical
/// (the rolled-back secondary flagged and resynced whole, or nothing lost), with the
/// acknowledged 6 MiB on the secondary.
#[test]
fn a_secondary_store_rolled_back_past_an_answer_the_crashed_primary_rested_writes_on_is_not_trusted() {
    let began = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 8 Mbit/s both ways, so that shipping lags well behind the writes.
    let wan = ["--rtt-ms", "10", "--rate-mbps", "8"].map(String::from).to_vec();
    let (mut dc1, mut dc2, to_dc2, to_dc1) = setup_with(dir, PairOptions { size: "256M".into(), wan, ..PairOptions::default() });

    // 1. One extent written and drained.
    qemu_io(dc1.url("vol0"), &["write -P 0x01 0 1M"]);
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true && v["lag_bytes"] == 0);

    // 2. A miss far from it, then a copy of the secondary's state directory taken while both
    // sites run (the reviewer's `cp -a`), then 6 MiB of misses: recorded on the secondary
    // synchronously and acknowledged to the host, but far from shipped at 8 Mbit/s.
    qemu_io(dc1.url("vol0"), &["write -P 0x02 20M 64k"]);
    let (state, snapshot) = (dir.join("dc2-state"), dir.join("snap/S1"));
    std::fs::create_dir(dir.join("snap")).unwrap();
    cp_a(&state, &snapshot);
    qemu_io(dc1.url("vol0"), &["write -P 0x03 200M 6M"]);
    let written = Instant::now();

    // 3. Both sites die at once, within a second of the write.
    dc1.kill();
    dc2.kill();
    let kill_after = written.elapsed();
    let (img1, img2) = (dir.join("dc1.img"), dir.join("dc2.img"));
    assert!(holds(&img1, 0x03, 200 * MIB, 6 * MIB), "the acknowledged write is on the primary's media");
    assert!(!holds(&img2, 0x03, 200 * MIB, 6 * MIB), "the secondary had all of the 6 MiB before the kill: nothing lagged");

    // 4. The secondary's store goes back to the copy; both start again (the secondary first),
    // and the link's rate is restored.
    std::fs::remove_dir_all(&state).unwrap();
    cp_a(&snapshot, &state);
    dc2.start_again();
    remember(dir, "dc2", &dc2);
    dc1.start_again();
    remember(dir, "dc1", &dc1);
    for relay in [&to_dc2, &to_dc1] {
        assert!(relay.command("rate-mbps 0").starts_with("ok"));
    }
    let restarted = Instant::now();

    // 5. Once the pair reports clean, the images are identical and the 6 MiB is on dc2.
    let (v1, _) = wait_for_clean_pair(dir, Duration::from_secs(180));
    let healed_after = restarted.elapsed();
    let outcome = match v1["amnesia_reason"].as_str() {
        Some(why) => format!(
            "dc2 flagged as an amnesiac ({why}); full resync verified {} extents, copied {} bytes",
            v1["resync_extents_verified"], v1["resync_bytes_copied"]
        ),
        None => "no amnesia flagged".to_owned(),
    };
    eprintln!(
        "hot copy restored; killed {kill_after:?} after the write; clean {healed_after:?} after the restart; {outcome}; \
         {:?} so far",
        began.elapsed()
    );
    stop_both_and_compare(dir, dc1, dc2);
    assert!(holds(&img2, 0x03, 200 * MIB, 6 * MIB), "the acknowledged 6 MiB at 200M is not on dc2");
}
