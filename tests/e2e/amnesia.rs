//! Amnesia on real processes and real RocksDB files: a site whose store lost state it had
//! acknowledged is never trusted as it is. Two `geomirror run` sites reach each other through
//! `geomirror wan-emu` both ways; the stores are damaged as an operator's mistake or a failed
//! disk would damage them, between `kill -9` and a restart.
//!
//! The sequence of the first test is the one an adversarial review ran against an earlier
//! build, which ended with the images differing in 5 MiB while both sites reported linked,
//! drained, authoritative, no debt, no flag.

use geomirror_tests::pair::{stop_both_and_compare, two_sites_both_ways, PairOptions};
use geomirror_tests::site::{output_within, tool, wait_for_volume, write_secret, Site};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const MIB: u64 = 1 << 20;

fn setup(dir: &Path) -> (Site, Site, geomirror_tests::pair::WanEmu, geomirror_tests::pair::WanEmu) {
    write_secret(&dir.join("token"), &format!("{TOKEN}\n"));
    let o = PairOptions { admin: "listen = \"127.0.0.1:0\"\ntoken_file = \"token\"\n".into(), ..PairOptions::default() };
    let (dc1, dc2, a, b) = two_sites_both_ways(Path::new(BIN), dir, &o);
    remember(dir, "dc1", &dc1);
    remember(dir, "dc2", &dc2);
    (dc1, dc2, a, b)
}

/// Notes where a site's admin API listens (port 0 in the config), for `cli`.
fn remember(dir: &Path, name: &str, site: &Site) {
    std::fs::write(dir.join(format!("{name}.admin")), site.admin.unwrap().to_string()).unwrap();
}

/// `geomirror <command> --config <site>.toml` with the site's token, plus `extra`.
fn cli(dir: &Path, command: &str, site: &str, extra: &[&str]) -> Output {
    let address = std::fs::read_to_string(dir.join(format!("{site}.admin"))).unwrap();
    Command::new(BIN)
        .arg(command)
        .arg("--config")
        .arg(dir.join(format!("{site}.toml")))
        .args(["--address", address.trim()])
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn status(dir: &Path, site: &str) -> serde_json::Value {
    let out = cli(dir, "status", site, &["--json"]);
    assert!(out.status.success(), "status of {site}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `site`'s status until `done` holds for its volume, for at most two minutes;
/// returns the volume's status.
fn wait_for(dir: &Path, site: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_for_volume(Duration::from_secs(120), &format!("{site} {what}"), || status(dir, site), done)["volumes"][0].clone()
}

fn qemu_io(url: &str, command: &str) {
    let out = tool("qemu-io", "qemu-utils").args(["-f", "raw", url, "-c", command]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("failed"), "qemu-io {command}: {text}");
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

/// A clean site: linked, drained (primary) or authoritative and consistent (secondary), no
/// amnesia. What both sites must report once the pair has healed.
fn clean_primary(v: &serde_json::Value) -> bool {
    v["role"] == "primary" && v["link_up"] == true && v["drained"] == true && v["authoritative"] == true && v["amnesiac"] == false
}

fn clean_secondary(v: &serde_json::Value) -> bool {
    v["role"] == "secondary" && v["link_up"] == true && v["authoritative"] == true && v["consistent"] == true && v["amnesiac"] == false
}

#[test]
fn a_secondary_whose_log_was_deleted_is_refused_flagged_and_not_promoted_until_it_is_resynced_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut dc1, mut dc2, to_dc2, _to_dc1) = setup(dir);

    // 1. Eight MiB written and drained.
    qemu_io(dc1.url("vol0"), "write -P 0x11 0 8M");
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true && v["lag_bytes"] == 0);

    // 2. The link slows and is cut; eight more MiB to the recorded extents are hits,
    // acknowledged at once, and lag.
    assert!(to_dc2.command("rate-mbps 1").starts_with("ok"));
    to_dc2.set_cut(true);
    qemu_io(dc1.url("vol0"), "write -P 0x22 0 8M");
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

    // 5. The way back: the old primary returns, finds a store it never paired with, and
    // resyncs the whole volume by digest; only the differing blocks cross.
    dc1.start_again();
    remember(dir, "dc1", &dc1);
    assert!(to_dc2.command("rate-mbps 0").starts_with("ok"));
    to_dc2.set_cut(false);
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
    qemu_io(dc1.url("vol0"), "write -P 0x11 0 8M");
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
    qemu_io(dc1.url("vol0"), "write -P 0x33 8M 8M");
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
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
            break;
        }
        assert!(Instant::now() < deadline, "the detection and the full resync are not counted:\n{metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_both_and_compare(dir, dc1, dc2);
}
