//! Online verify (`geomirror verify`) on real processes over `geomirror wan-emu`: blocks
//! changed behind the secondary's back (rot, a misdirected write) are found exactly, while
//! the host keeps writing elsewhere and no write in flight shows as a difference; the
//! secondary then stops calling its image consistent; `--repair` copies them and a last
//! verify finds both images identical. Bad input is refused and starts nothing.

use geomirror_tests::admin::{clean_primary, clean_secondary, Operator};
use geomirror_tests::pair::{stop_both_and_compare, two_sites_with_admin, PairOptions};
use geomirror_tests::site::{run_ok, tool};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const MIB: u64 = 1 << 20;
/// Longest wait for a state the pair reaches on its own (a bound on failure only).
const LIMIT: Duration = Duration::from_secs(120);

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn verify_finds_exactly_the_blocks_changed_behind_the_secondary_while_the_host_writes_and_repair_fixes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (dc1, dc2, _to_dc2, _to_dc1) = two_sites_with_admin(Path::new(BIN), dir, TOKEN, PairOptions::default());
    let op = Operator::new(Path::new(BIN), dir);
    let url = dc1.url("vol0").to_owned();
    // 40 MiB of data (fio's buffers are random), mirrored; both sites clean.
    run_ok(tool("fio", "fio").args(["--name=fill", "--ioengine=nbd", &format!("--uri={url}"), "--rw=write", "--bs=1m", "--size=40m"]));
    op.wait_for(LIMIT, "dc1", "clean after the fill", clean_primary);
    op.wait_for(LIMIT, "dc2", "clean after the fill", clean_secondary);

    // Five 4 KiB blocks of the secondary's disk change behind its back, in three extents.
    let rot = [3 * MIB + 8192, 3 * MIB + 65536, 17 * MIB, 30 * MIB + 4096, 30 * MIB + 20480];
    let media = std::fs::OpenOptions::new().write(true).open(dir.join("dc2.img")).unwrap();
    for at in rot {
        media.write_all_at(&[0xa5; 4096], at).unwrap();
    }
    media.sync_all().unwrap();

    // The host writes elsewhere (40..64 MiB) all through the verify, 8 deep.
    let mut host = tool("fio", "fio")
        .args(["--name=host", "--ioengine=nbd", &format!("--uri={url}"), "--rw=randwrite", "--bs=4k", "--iodepth=8"])
        .args(["--offset=40m", "--size=24m", "--time_based", "--runtime=600", "--thread"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = op.cli("verify", "dc1", &["--json"]);
    let found = json(&out);
    assert_eq!(out.status.code(), Some(3), "differences found exit 3: {found:#}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(found["out_of_sync_blocks"].as_u64(), Some(rot.len() as u64), "exactly the changed blocks: {found:#}");
    assert_eq!(found["out_of_sync_extents"].as_u64(), Some(3), "{found:#}");
    let ranges: Vec<(u64, u64)> =
        found["out_of_sync_ranges"].as_array().unwrap().iter().map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap())).collect();
    assert_eq!(ranges, vec![(3 * MIB, MIB), (17 * MIB, MIB), (30 * MIB, MIB)], "{found:#}");
    assert_eq!(found["checked_extents"], found["total_extents"], "{found:#}");

    // Neither site reports clean now: the secondary's image is not the primary's, and the
    // primary owes it those extents.
    let v2 = op.status("dc2")["volumes"][0].clone();
    assert_eq!(v2["consistent"], false, "{v2:#}");
    let v1 = op.status("dc1")["volumes"][0].clone();
    assert_eq!(v1["verify"]["unrepaired_extents"].as_u64(), Some(3), "{v1:#}");
    assert_eq!(v1["authoritative"], false, "{v1:#}");
    let text = String::from_utf8_lossy(&op.cli("status", "dc1", &[]).stdout).into_owned();
    assert!(text.contains("OUT OF SYNC: 3 extents"), "{text}");

    // --repair first copies what the last verify found (a resync), then compares again,
    // host writes still going: equal now.
    let out = op.cli("verify", "dc1", &["--repair"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("copying the 3 extents an earlier verify found different first"), "{text}");
    assert!(text.contains("identical on both sites"), "{text}");
    host.kill().unwrap();
    host.wait().unwrap();
    op.wait_for(LIMIT, "dc1", "clean after the repair", clean_primary);
    op.wait_for(LIMIT, "dc2", "clean after the repair", clean_secondary);

    // A last verify finds nothing, and the images are byte for byte the same.
    let out = op.cli("verify", "dc1", &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("identical on both sites"), "{text}");
    let metrics = op.cli("status", "dc1", &["--json"]);
    assert!(metrics.status.success());
    stop_both_and_compare(dir, dc1, dc2);
}

#[test]
fn verify_refuses_bad_input_and_starts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (dc1, dc2, _to_dc2, _to_dc1) = two_sites_with_admin(Path::new(BIN), dir, TOKEN, PairOptions::default());
    let op = Operator::new(Path::new(BIN), dir);
    op.wait_for(LIMIT, "dc2", "clean", clean_secondary);
    let refused = |site: &str, extra: &[&str], why: &str| {
        let out = op.cli("verify", site, extra);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // 1: refused by the site or the CLI's checks; 2: a usage error (clap's).
        assert!(matches!(out.status.code(), Some(1 | 2)), "{extra:?}: {err}");
        assert!(err.contains(why), "{extra:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    };
    refused("dc1", &["--offset", "64M"], "offset 67108864 is at or past the end of volume vol0 (67108864 bytes)");
    refused("dc1", &["--offset", "1M", "--length", "64M"], "reaches past the end");
    refused("dc1", &["--length", "0"], "the range to verify is empty");
    refused("dc1", &["--offset", "18446744073709551615", "--length", "2"], "past the end");
    refused("dc1", &["--offset", "4096", "--length", "18446744073709551615"], "reaches past the end");
    refused("dc1", &["--volume", "nope"], "no volume \"nope\"");
    refused("dc1", &["--offset", "12Q"], "unknown unit");
    refused("dc2", &[], "run verify on the primary");
    // Nothing started on either site, and both are clean as before.
    let v1 = op.wait_for(LIMIT, "dc1", "clean", clean_primary);
    assert!(v1["verify"].is_null(), "{v1:#}");
    op.wait_for(LIMIT, "dc2", "clean", clean_secondary);
    // A verify of a range works, and one already running refuses a second (409).
    let out = op.cli("verify", "dc1", &["--offset", "4k", "--length", "8k", "--json"]);
    let r = json(&out);
    assert!(out.status.success(), "{r:#}");
    assert_eq!((r["first_extent"].as_u64(), r["total_extents"].as_u64(), r["out_of_sync_extents"].as_u64()), (Some(0), Some(1), Some(0)));
    stop_both_and_compare(dir, dc1, dc2);
}
