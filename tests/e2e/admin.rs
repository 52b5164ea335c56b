//! The admin API and the disaster-recovery path on real processes: two `geomirror run`
//! sites reaching each other through `geomirror wan-emu` both ways, driven by the
//! `geomirror` CLI and by a raw HTTPS client.

use geomirror_node::admin_client::{AdminClient, Credentials};
use geomirror_tests::pair::{remember_admin, stop_both_and_compare, two_sites_with_admin, PairOptions};
use geomirror_tests::qemu::{qemu_io, qemu_io_command};
use geomirror_tests::site::{tool, wait_for_volume, Site};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

#[path = "admin/limits.rs"]
mod limits;

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn options() -> PairOptions {
    PairOptions { admin: "listen = \"127.0.0.1:0\"\ntoken_file = \"token\"\n".into(), ..PairOptions::default() }
}

fn setup(dir: &Path) -> (Site, Site, geomirror_tests::pair::WanEmu, geomirror_tests::pair::WanEmu) {
    setup_with(dir, options())
}

fn setup_with(dir: &Path, o: PairOptions) -> (Site, Site, geomirror_tests::pair::WanEmu, geomirror_tests::pair::WanEmu) {
    two_sites_with_admin(Path::new(BIN), dir, TOKEN, o)
}

/// Notes where a site's admin API listens (port 0 in the config), for `cli`.
fn remember(dir: &Path, name: &str, site: &Site) {
    remember_admin(dir, name, site);
}

/// `geomirror <command> --config <site>.toml` as the admin `ops`, plus `extra`, at the
/// admin address `remember` noted.
fn cli_command(dir: &Path, command: &str, site: &str, extra: &[&str]) -> Command {
    let certs = dir.join("certs");
    let address = std::fs::read_to_string(dir.join(format!("{site}.admin"))).unwrap();
    let mut c = Command::new(BIN);
    c.arg(command)
        .arg("--config")
        .arg(dir.join(format!("{site}.toml")))
        .args(["--address", address.trim()])
        .arg("--cert")
        .arg(certs.join("admin-ops.pem"))
        .arg("--key")
        .arg(certs.join("admin-ops.key"))
        .args(extra)
        .env("RUST_BACKTRACE", "0");
    c
}

fn cli(dir: &Path, command: &str, site: &str, extra: &[&str]) -> Output {
    cli_command(dir, command, site, extra).output().unwrap()
}

/// Runs `cmd` on a pseudo-terminal (util-linux `script`), as an operator at a terminal would,
/// and returns a child whose stdout is the terminal's output.
fn on_a_terminal(cmd: &Command) -> std::process::Child {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', "'\\''"));
    let line: Vec<String> = std::iter::once(quote(cmd.get_program())).chain(cmd.get_args().map(quote)).collect();
    tool("script", "bsdutils")
        .args(["--quiet", "--return", "--command"])
        .arg(line.join(" "))
        .arg("/dev/null")
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn status_json(dir: &Path, site: &str) -> serde_json::Value {
    let out = cli(dir, "status", site, &["--json"]);
    assert!(out.status.success(), "status of {site}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `site`'s status until `done` holds for its volume, for at most a minute.
fn wait_for(dir: &Path, site: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_for_volume(Duration::from_secs(60), &format!("{site} {what}"), || status_json(dir, site), done)
}

/// Raw calls with each kind of caller, against the secondary.
fn raw(site: &Site, dir: &Path, credentials: Credentials<'_>, method: &str, path: &str) -> u16 {
    let client = AdminClient::new(site.admin.unwrap(), "dc2", &dir.join("certs/ca.pem"), credentials).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let body = (method == "POST").then(|| serde_json::json!({ "reason": "test" }));
    rt.block_on(client.call(method, path, body)).unwrap().0
}

/// Anonymous callers, a wrong token and a site's certificate are refused; an admin
/// certificate and the right token are served. A promotion while the primary is alive is
/// refused as two writers.
#[test]
fn the_admin_api_refuses_anonymous_and_wrong_role_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (primary, secondary, _to_dc2, _to_dc1) = setup(dir);
    let certs = dir.join("certs");
    for (method, path) in [("GET", "/v1/status"), ("POST", "/v1/promote"), ("POST", "/v1/demote")] {
        assert_eq!(raw(&secondary, dir, Credentials::Anonymous, method, path), 401, "anonymous {method} {path}");
        assert_eq!(raw(&secondary, dir, Credentials::Token("wrong-token-wrong-token".into()), method, path), 401, "wrong token");
        let site_cert = Credentials::Certificate { cert: &certs.join("dc1.pem"), key: &certs.join("dc1.key") };
        assert_eq!(raw(&secondary, dir, site_cert, method, path), 403, "a site certificate for {method} {path}");
    }
    assert_eq!(raw(&secondary, dir, Credentials::Token(TOKEN.into()), "GET", "/v1/status"), 200);
    let admin = Credentials::Certificate { cert: &certs.join("admin-ops.pem"), key: &certs.join("admin-ops.key") };
    assert_eq!(raw(&secondary, dir, admin, "GET", "/v1/status"), 200);

    // Nothing above changed a role.
    let s = wait_for(dir, "dc2", "connected", |v| v["link_up"] == true);
    assert_eq!(s["volumes"][0]["role"], "secondary", "{s:#}");
    let p = wait_for(dir, "dc1", "linked", |v| v["link_up"] == true);
    assert_eq!(p["volumes"][0]["role"], "primary");

    // The primary is connected and alive: promoting would make two writers.
    let out = cli(dir, "promote", "dc2", &["--reason", "test"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("two writers"), "{err}");
    assert_eq!(status_json(dir, "dc2")["volumes"][0]["role"], "secondary");

    // The text form teaches what it shows.
    let text = String::from_utf8_lossy(&cli(dir, "status", "dc1", &[]).stdout).into_owned();
    assert!(text.contains("primary of epoch 1") && text.contains("failback debt"), "{text}");
    drop((primary, secondary));
}

/// Failover and failback: the primary dies with a write its peer never got, twenty
/// concurrent promotes of the secondary make exactly one transition, the promoted site
/// serves the data the old one replicated, the old primary comes back, fences itself and
/// joins as secondary, and the failback copies only the failback set, saving aside what the
/// old primary held there first: the images end identical and nothing is destroyed.
#[test]
fn failover_then_the_old_primary_fences_and_fails_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut dc1, dc2, to_dc2, _to_dc1) = setup(dir);
    qemu_io(dc1.url("vol0"), &["write -P 0x5a 0 8M"]);
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true && v["lag_bytes"] == 0 && v["lag_seconds"] == 0.0);
    // The link fails silently (dc1 notices only after its idle timeout), dc1 acknowledges a
    // write to a recorded extent that never reaches dc2, and dies.
    to_dc2.set_cut(true);
    qemu_io(dc1.url("vol0"), &["write -P 0x99 1M 64k"]);
    // Status shows the write the peer lacks, and its age growing: the RPO of a failover now.
    wait_for(dir, "dc1", "a lag of one write, growing", |v| {
        v["lag_bytes"].as_u64().unwrap() >= 65536 && v["lag_seconds"].as_f64().unwrap() >= 0.5
    });
    dc1.kill();
    to_dc2.set_cut(false);
    // The secondary notices after the link's idle timeout; until then a promotion is refused
    // as two writers (tested above).
    wait_for(dir, "dc2", "disconnected", |v| v["link_up"] == false);

    // Twenty promotes at once: one promotes, the others find it done.
    let outputs: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..20).map(|i| s.spawn(move || cli(dir, "promote", "dc2", &["--json", "--reason", &format!("drill {i}")]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut changed = 0;
    let mut record_extents = 0;
    for out in &outputs {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if r["changed"] == true {
            changed += 1;
            record_extents = r["volumes"][0]["record_extents"].as_u64().unwrap();
        }
        assert_eq!(r["volumes"][0]["epoch"], 2, "{r:#}");
    }
    assert_eq!(changed, 1, "twenty promotes made {changed} transitions");

    // The promoted site serves what the old primary wrote, and takes new writes. The write
    // dc1 acknowledged last is missing here, inside a recorded extent (O1 allows that).
    qemu_io(dc2.url("vol0"), &["read -P 0x5a 0 8M"]);
    qemu_io(dc2.url("vol0"), &["write -P 0x6b 16M 4M"]);

    // The old primary returns, finds epoch 2, fences itself and joins as secondary: its
    // hosts are refused, and the new primary copies it the failback set.
    dc1.start_again();
    remember(dir, "dc1", &dc1);
    wait_for(dir, "dc1", "a secondary of epoch 2", |v| v["role"] == "secondary" && v["epoch"] == 2);
    let refused = qemu_io_command(dc1.url("vol0"), &["write -P 0x77 0 4k"]).output().unwrap();
    assert!(!refused.status.success(), "a fenced site took a host write");
    let s = wait_for(dir, "dc2", "drained onto dc1", |v| v["drained"] == true && v["link_up"] == true);
    let copied = s["volumes"][0]["resync_bytes_copied"].as_u64().unwrap();
    let volume = 64 << 20;
    // The failback set: the record at promotion, plus the 4 MiB written since.
    let bound = (record_extents + 4) << 20;
    assert!(copied <= bound, "failback copied {copied} bytes, more than the failback set's {bound}");
    assert!(copied < volume / 2, "failback copied {copied} of a {volume}-byte volume");
    eprintln!("failback copied {copied} bytes of a {volume}-byte volume (record at promotion: {record_extents} extents)");
    // Every extent of the set was checked by digest, and only the blocks that differ were
    // copied: dc1's lost 64 KiB write in extent 1 and the 4 MiB written on dc2 since the
    // promotion.
    let v = &s["volumes"][0];
    assert_eq!(v["resync_extents_mismatched"], 5, "{s:#}");
    assert_eq!(copied, (4 << 20) + 65536, "only the blocks that differ cross the WAN: {s:#}");
    assert!(v["resync_extents_verified"].as_u64().unwrap() >= record_extents, "{s:#}");

    // Nothing dc1 held is destroyed: its last write was saved aside before the failback
    // overwrote extent 1, in the side file of this failback, which its status lists.
    let s1 = status_json(dir, "dc1");
    let files = s1["volumes"][0]["aside_files"].as_array().unwrap().clone();
    assert_eq!(files.len(), 1, "{s1:#}");
    let aside = std::fs::read(files[0]["path"].as_str().unwrap()).unwrap();
    assert!(aside[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0x99), "the side file lacks dc1's last write");

    let (log2, log1) = stop_both_and_compare(dir, dc2, dc1);
    // A stop follows each site's present role, not its configured one: the promoted dc2
    // (configured secondary) drained before it stopped, and the demoted dc1 (configured
    // primary) had nothing to wait for, though its peer was already gone.
    assert!(log2.contains("drained: nothing left for the peer to apply"), "{log2}");
    assert!(!log1.contains("stopping before the peer applied every write"), "{log1}");
    assert_eq!(log2.matches("promoted to primary").count(), 1, "{log2}");
    assert!(log2.contains("who=admin:ops"), "the log names who asked:\n{log2}");
}

/// `geomirror switchover` from `from` to `to`, as the admin `ops`.
fn switchover(dir: &Path, from: &str, to: &str) -> Output {
    let to_address = std::fs::read_to_string(dir.join(format!("{to}.admin"))).unwrap();
    cli(
        dir,
        "switchover",
        from,
        &["--peer-config", dir.join(format!("{to}.toml")).to_str().unwrap(), "--peer-address", to_address.trim(), "--reason", "planned"],
    )
}

/// Where the host's blocks of 16 KiB go during the switchovers, and how many fit.
const BLOCKS_AT: u64 = 16 << 20;
const BLOCKS: u64 = 3000;

/// A planned switchover and back, while a host keeps writing: every write the host saw
/// acknowledged is on the new primary, and after the round trip the images are identical.
/// A failback dry run on the primary reports what a failback would copy.
#[test]
fn a_switchover_round_trip_under_load_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (dc1, dc2, _to_dc2, _to_dc1) = setup(dir);
    let write = |url: &str, i: u64| {
        let cmd = format!("write -P {} {} 16k", i % 250 + 1, BLOCKS_AT + i * 16384);
        qemu_io_command(url, &[cmd]).output().unwrap().status.success()
    };
    wait_for(dir, "dc1", "linked", |v| v["link_up"] == true);
    let dry = cli(dir, "failback", "dc1", &["--dry-run"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(String::from_utf8_lossy(&dry.stdout).contains("a failback now copies"), "{}", String::from_utf8_lossy(&dry.stdout));

    for (from, to, url, epoch) in [("dc1", "dc2", dc1.url("vol0").to_owned(), 2), ("dc2", "dc1", dc2.url("vol0").to_owned(), 3)] {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = AtomicBool::new(false);
        // The writer reports each acknowledgement, so the switchover can start under load.
        let (ack_tx, ack_rx) = std::sync::mpsc::channel::<u64>();
        let (acked, out) = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut acked = Vec::new();
                // Each round writes its own blocks, so no write overwrites another.
                let (mut i, end) = if epoch == 2 { (0, BLOCKS / 2) } else { (BLOCKS / 2, BLOCKS) };
                while !stop.load(Ordering::Relaxed) && i < end {
                    if write(&url, i) {
                        acked.push(i);
                        let _ = ack_tx.send(i);
                    }
                    i += 1;
                }
                acked
            });
            // Let the host get going first: the switchover starts under load.
            for _ in 0..20 {
                if ack_rx.recv_timeout(Duration::from_secs(60)).is_err() {
                    panic!("the host's writes to {from} are not acknowledged: {:#} {:#}", status_json(dir, from), status_json(dir, to));
                }
            }
            let out = switchover(dir, from, to);
            stop.store(true, Ordering::Relaxed);
            (writer.join().unwrap(), out)
        });
        assert!(
            out.status.success(),
            "switchover {from} -> {to}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!acked.is_empty(), "the host wrote nothing before the switchover");
        let s = status_json(dir, to);
        assert_eq!((s["volumes"][0]["role"].as_str(), s["volumes"][0]["epoch"].as_u64()), (Some("primary"), Some(epoch)), "{s:#}");
        let new_url = if to == "dc2" { dc2.url("vol0") } else { dc1.url("vol0") };
        for i in &acked {
            let cmd = format!("read -P {} {} 16k", i % 250 + 1, BLOCKS_AT + i * 16384);
            let out = qemu_io_command(new_url, &[cmd]).output().unwrap();
            assert!(out.status.success(), "acknowledged write {i} is missing on {to}: {}", String::from_utf8_lossy(&out.stdout));
        }
        eprintln!("switchover {from} -> {to}: {} acknowledged writes all present", acked.len());
    }
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true);
    stop_both_and_compare(dir, dc1, dc2);
}

/// A promotion after the old primary degraded: under `on_link_loss = "degrade"` it went on
/// writing to extents the secondary never recorded, so the secondary's record no longer
/// covers every difference. The promotion still happens (the operator needs a site), but it
/// says so loudly, in the CLI and in the log.
#[test]
fn a_promotion_after_a_degrade_warns_loudly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = PairOptions {
        link: "rtt_ms = 10\nidle_timeout_ms = 1000\nkeep_alive_ms = 300\n".into(),
        replication: "[replication]\non_link_loss = \"degrade\"\nrecord_update_timeout_ms = 500\nlink_loss_deadline_ms = 5000\n".into(),
        ..options()
    };
    let (mut dc1, mut dc2, to_dc2, to_dc1) = setup_with(dir, o);
    qemu_io(dc1.url("vol0"), &["write -P 0x11 0 4M"]);
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true);
    let before = status_json(dir, "dc2");
    assert_eq!(before["volumes"][0]["authoritative"], true, "{before:#}");
    // The link fails; a write to an extent nobody recorded is acknowledged anyway, once the
    // record update has timed out, and kept in dc1's dirty map.
    to_dc2.set_cut(true);
    to_dc1.set_cut(true);
    qemu_io(dc1.url("vol0"), &["write -P 0x44 40M 64k"]);
    wait_for(dir, "dc1", "degraded", |v| v["authoritative"] == false);
    dc1.kill();
    // The secondary knows the primary may degrade (its Hello said so): once the link has
    // been down longer than a record update may take, its record stops being authoritative.
    wait_for(dir, "dc2", "no longer authoritative", |v| v["link_up"] == false && v["authoritative"] == false);
    let out = cli(dir, "promote", "dc2", &["--reason", "dc1 lost after a degrade"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("WARNING: THE RECORD IS NOT AUTHORITATIVE"), "the promotion did not warn:\n{said}");
    // The warning was warranted: the degraded write is not here, and nothing recorded it.
    qemu_io(dc2.url("vol0"), &["read -P 0x11 0 4M"]);
    qemu_io(dc2.url("vol0"), &["read -P 0 40M 64k"]);
    let text = String::from_utf8_lossy(&cli(dir, "status", "dc2", &[]).stdout).into_owned();
    assert!(text.contains("primary of epoch 2"), "{text}");
    let (exit, log) = dc2.stop();
    assert!(exit.success(), "{log}");
    assert!(log.contains("promoted with a warning") && log.contains("NOT AUTHORITATIVE"), "the log does not carry the warning:\n{log}");
}

/// An operator who gives up on a switchover while the demotion waits for a peer that cannot
/// be reached gets the site back at once with `resume`, not when the drain timeout expires:
/// the waiting demotion fails, saying why, and the host's writes flow again.
#[test]
fn a_resume_abandons_a_demotion_that_is_waiting_for_the_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = PairOptions { link: "rtt_ms = 10\nidle_timeout_ms = 1000\nkeep_alive_ms = 300\n".into(), ..options() };
    let (dc1, _dc2, to_dc2, to_dc1) = setup_with(dir, o);
    wait_for(dir, "dc1", "connected", |v| v["link_up"] == true);
    to_dc2.set_cut(true);
    to_dc1.set_cut(true);
    wait_for(dir, "dc1", "cut off", |v| v["link_up"] == false);
    let demote = cli_command(dir, "demote", "dc1", &["--drain-timeout", "3600", "--reason", "switchover"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(dir, "dc1", "draining", |v| v["phase"] == "draining");
    let out = cli(dir, "resume", "dc1", &["--reason", "the switchover is off"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let demote_out = geomirror_tests::site::output_within(demote, Duration::from_secs(60))
        .unwrap_or_else(|o| panic!("the demotion still waits after the resume: {}", String::from_utf8_lossy(&o.stderr)));
    let said = String::from_utf8_lossy(&demote_out.stderr);
    assert!(!demote_out.status.success(), "the demotion succeeded with the peer cut off: {said}");
    assert!(said.contains("ended by a resume"), "the demotion did not say why it failed:\n{said}");
    let s = wait_for(dir, "dc1", "serving", |v| v["phase"] == "serving");
    assert_eq!(s["volumes"][0]["role"], "primary", "{s:#}");
    // The host's writes flow again (the policy is block, so with the link cut a miss fails:
    // a read shows the site answers, and the drain no longer holds anything).
    qemu_io(dc1.url("vol0"), &["read 0 64k"]);
}

/// Split brain: the link is cut, the secondary is promoted while the old primary keeps
/// writing, and both write. When the link heals both sites report it and neither
/// overwrites the other until an operator chooses; then the loser saves its own data aside
/// and is resynced, and the images end identical.
#[test]
fn a_split_brain_is_reported_on_both_sides_and_nothing_is_destroyed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (dc1, dc2, to_dc2, to_dc1) = setup(dir);
    qemu_io(dc1.url("vol0"), &["write -P 0x11 0 8M"]);
    wait_for(dir, "dc1", "drained", |v| v["drained"] == true);
    to_dc2.set_cut(true);
    to_dc1.set_cut(true);
    wait_for(dir, "dc2", "disconnected", |v| v["link_up"] == false);
    let out = cli(dir, "promote", "dc2", &["--reason", "dc1 unreachable"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Both take writes: dc1 to an extent it had recorded, dc2 anywhere.
    qemu_io(dc1.url("vol0"), &["write -P 0x22 2M 64k"]);
    qemu_io(dc2.url("vol0"), &["write -P 0x33 4M 64k"]);
    to_dc2.set_cut(false);
    to_dc1.set_cut(false);
    wait_for(dir, "dc2", "reporting a split brain", |v| v["split_brain"] == true);
    wait_for(dir, "dc1", "reporting a split brain", |v| v["split_brain"] == true);
    // Nothing was overwritten meanwhile: each site still holds its own write.
    let held = |site: &str, at: usize, byte: u8| {
        std::fs::read(dir.join(format!("{site}.img"))).unwrap()[at..at + 65536].iter().all(|b| *b == byte)
    };
    assert!(held("dc1", 2 << 20, 0x22) && held("dc2", 4 << 20, 0x33), "a site lost its own write before anyone chose");
    let text = String::from_utf8_lossy(&cli(dir, "status", "dc1", &[]).stdout).into_owned();
    assert!(text.contains("SPLIT BRAIN"), "{text}");

    // The operator keeps dc2's data.
    let out = cli(dir, "resolve-split-brain", "dc2", &["--reason", "dc2 took the orders"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(dir, "dc2", "drained onto dc1", |v| v["drained"] == true && v["split_brain"] == false);
    let s1 = status_json(dir, "dc1");
    let files = s1["volumes"][0]["aside_files"].as_array().unwrap().clone();
    assert!(!files.is_empty(), "dc1 saved nothing aside: {s1:#}");
    let aside = std::fs::read(files.last().unwrap()["path"].as_str().unwrap()).unwrap();
    assert!(aside[2 << 20..(2 << 20) + 65536].iter().all(|b| *b == 0x22), "dc1's own write is not in its side file");
    stop_both_and_compare(dir, dc2, dc1);
}

/// The version of a stamped block (see `stamped_writer.py`) in an image: 0 when never
/// written; a block that is neither zero nor a valid stamp of itself fails the test.
fn stamp_version(image: &[u8], block: u64) -> u64 {
    let b = &image[block as usize * 4096..(block as usize + 1) * 4096];
    if b.iter().all(|x| *x == 0) {
        return 0;
    }
    let (body, crc) = b.split_at(4092);
    assert_eq!(crc32fast_ieee(body).to_be_bytes(), crc, "block {block} is torn or foreign");
    let at = |i: usize| u64::from_be_bytes(body[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(at(0), block, "block {block} holds another block's data");
    at(1)
}

/// CRC-32 (IEEE, as Python's zlib.crc32), bitwise: the checker needs nothing of geomirror.
fn crc32fast_ieee(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= *byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// The failover drill: a host writes stamped blocks while an outside history
/// records each write before it is sent and after it is acknowledged; `kill -9` hits the
/// primary after a random number of acknowledged writes; the secondary is promoted. Then:
/// the promoted image is the history applied up to some write k (prefix consistency, O3),
/// and every acknowledged write missing from it lies in an extent of the failback set, the
/// record at promotion (O1). The old primary then fails back and the images end equal.
#[test]
fn failover_drill_with_a_stamped_history() {
    // The host writes the first 32 MiB (32 extents of 1 MiB) of a 1 GiB volume at random: a
    // failback must copy about what was written, far less than the volume.
    const BLOCKS: u64 = 8192;
    const VOLUME: u64 = 1 << 30;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // An 80 ms path of 2 Mbit/s, slower than the host writes: acknowledged writes queue up
    // behind it and are lost with the primary.
    let o = PairOptions {
        link: "rtt_ms = 80\nbandwidth_mbps = 2\nidle_timeout_ms = 3000\n".into(),
        wan: ["--rtt-ms", "80", "--rate-mbps", "2"].map(String::from).to_vec(),
        size: "1G".into(),
        ..options()
    };
    let (mut dc1, mut dc2, to_dc2, to_dc1) = setup_with(dir, o.clone());
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000;
    let kill_after = 200 + seed % 600;
    eprintln!("drill seed {seed}: kill -9 after {kill_after} acknowledged writes");
    let history = dir.join("history");
    let writer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/stamped_writer.py");
    assert!(Path::new("/usr/bin/nbdsh").exists(), "libnbd for Python is not installed: run tests/run (apt-get install python3-libnbd)");
    let mut host = Command::new("/usr/bin/python3")
        .arg(&writer)
        .arg(dc1.url("vol0"))
        .arg(&history)
        .arg(seed.to_string())
        .arg(BLOCKS.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The writer prints each acknowledgement as it logs it; a thread turns the lines into
    // messages, so the test waits on them with a deadline.
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<String>();
    let stdout = host.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if ack_tx.send(line).is_err() {
                return;
            }
        }
    });
    for _ in 0..kill_after {
        if ack_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = host.kill();
            let mut err = String::new();
            std::io::Read::read_to_string(host.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the host's writes are not being acknowledged (or the writer ended): {err}");
        }
    }
    dc1.kill();
    let _ = host.wait();
    wait_for(dir, "dc2", "disconnected", |v| v["link_up"] == false);
    let out = cli(dir, "promote", "dc2", &["--reason", "drill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Stop the promoted site before it takes any write, to read its image and its failback
    // set (the record at promotion, now its dirty map) from its RocksDB store. The promotion
    // was durable before it was reported, so `kill -9` loses nothing of it.
    dc2.kill();
    let store =
        geomirror_node::store::RocksStore::open(&dir.join("dc2-state/vol0"), || Err(std::io::Error::other("dc2 has no store to read")))
            .unwrap();
    let failback_set = geomirror_node::store::Store::load(&store).dirty;
    drop(store);
    let mut image = vec![0u8; (BLOCKS * 4096) as usize];
    std::io::Read::read_exact(&mut std::fs::File::open(dir.join("dc2.img")).unwrap(), &mut image).unwrap();

    // The history: every write in the order sent (one at a time), and which were acknowledged.
    let text = std::fs::read_to_string(&history).unwrap();
    let mut order: Vec<(u64, u64)> = Vec::new();
    let mut acknowledged = std::collections::BTreeSet::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (b, v) = (f[1].parse::<u64>().unwrap(), f[2].parse::<u64>().unwrap());
        match f[0] {
            "W" => order.push((b, v)),
            "A" => {
                acknowledged.insert((b, v));
            }
            _ => {}
        }
    }
    let index: std::collections::BTreeMap<(u64, u64), usize> = order.iter().enumerate().map(|(i, w)| (*w, i)).collect();
    let versions: Vec<u64> = (0..BLOCKS).map(|b| stamp_version(&image, b)).collect();
    // The smallest k the image can be a prefix at: the latest write it shows.
    let mut k: Option<usize> = None;
    for (b, v) in versions.iter().enumerate() {
        if *v > 0 {
            let i = *index.get(&(b as u64, *v)).unwrap_or_else(|| panic!("block {b} version {v} was never written"));
            k = k.max(Some(i));
        }
    }
    let applied = k.map_or(0, |k| k + 1);
    let mut expected = vec![0u64; BLOCKS as usize];
    for (b, v) in &order[..applied] {
        expected[*b as usize] = *v;
    }
    for b in 0..BLOCKS as usize {
        assert_eq!(versions[b], expected[b], "block {b}: the promoted image is not the history's first {applied} writes (O3)");
    }
    // Acknowledged writes the promoted image lacks: all inside the failback set (O1).
    let mut missing = 0;
    for (b, v) in &acknowledged {
        if versions[*b as usize] < *v {
            missing += 1;
            let extent = geomirror_core::ExtentId(b * 4096 / (1 << 20));
            assert!(failback_set.contains(&extent), "acknowledged write {b}/{v} is missing outside the record at promotion (O1)");
        }
    }
    eprintln!(
        "drill: {} writes sent, {} acknowledged; the promoted image is the first {applied}; {missing} acknowledged write(s) missing, all in the {} extent(s) of the failback set",
        order.len(),
        acknowledged.len(),
        failback_set.len()
    );

    // Fail back over a faster link, 32 Mbit/s (tens of MiB at 2 Mbit/s would take minutes):
    // the old primary returns, fences itself and is resynced.
    let fast = PairOptions { link: "rtt_ms = 80\nbandwidth_mbps = 32\nidle_timeout_ms = 3000\n".into(), ..o };
    let (p1, p2) = (dc1.replication.unwrap().port(), dc2.replication.unwrap().port());
    geomirror_tests::pair::site_config(dir, "dc1", "dc2", "primary", p1, to_dc2.port, &fast);
    geomirror_tests::pair::site_config(dir, "dc2", "dc1", "secondary", p2, to_dc1.port, &fast);
    for emu in [&to_dc2, &to_dc1] {
        assert!(emu.command("rate-mbps 32").starts_with("ok"));
    }
    dc2.start_again();
    remember(dir, "dc2", &dc2);

    // The operator's view: a dry run gives the bytes and the time, then the real run follows
    // the copy with a progress bar until both sites hold the same data.
    let bound = failback_set.len() as u64 * (1 << 20);
    let out = cli(dir, "failback", "dc2", &["--dry-run", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let planned = plan["failback"][0]["bytes"].as_u64().unwrap();
    assert!(planned > 0 && planned <= bound, "the dry run plans {planned} bytes for a failback set of {bound}: {plan:#}");
    assert!(plan["failback"][0]["estimated_seconds"].as_f64().is_some_and(|t| t > 0.0), "no time estimate: {plan:#}");
    let mut failback = on_a_terminal(&cli_command(dir, "failback", "dc2", &[]));
    let terminal = failback.stdout.take().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(terminal), &mut text);
        let _ = done_tx.send(text);
    });
    dc1.start_again();
    remember(dir, "dc1", &dc1);
    // Host writes on the new primary go on during the failback. The link is cut while the
    // copy runs, so it cannot have finished when the write is acknowledged.
    wait_for(dir, "dc2", "failing back", |v| v["resync_in_progress"] == true && v["resync_bytes_copied"].as_u64().unwrap() > 0);
    to_dc1.set_cut(true);
    to_dc2.set_cut(true);
    let out = qemu_io_command(dc2.url("vol0"), &["write -P 0x5e 8M 1M"]).output().unwrap();
    assert!(out.status.success(), "a host write during the failback failed: {}", String::from_utf8_lossy(&out.stdout));
    let during = status_json(dir, "dc2");
    assert_eq!(during["volumes"][0]["resync_in_progress"], true, "{during:#}");
    to_dc1.set_cut(false);
    to_dc2.set_cut(false);
    let Ok(terminal) = done_rx.recv_timeout(Duration::from_secs(120)) else {
        let _ = failback.kill();
        panic!("geomirror failback did not finish within two minutes");
    };
    let status = failback.wait().unwrap();
    assert!(status.success(), "geomirror failback failed:\n{terminal}");
    assert!(terminal.contains("[="), "no progress bar was drawn:\n{terminal}");
    assert!(terminal.contains("failback done:") && terminal.contains("both sites hold the same data"), "{terminal}");
    let s1 = status_json(dir, "dc1");
    assert_eq!((s1["volumes"][0]["role"].as_str(), s1["volumes"][0]["epoch"].as_u64()), (Some("secondary"), Some(2)), "{s1:#}");
    let s = status_json(dir, "dc2");
    assert_eq!((s["volumes"][0]["drained"].as_bool(), s["volumes"][0]["link_up"].as_bool()), (Some(true), Some(true)), "{s:#}");
    let copied = s["volumes"][0]["resync_bytes_copied"].as_u64().unwrap();
    assert!(copied <= bound, "failback copied {copied} bytes, more than the failback set's {bound}");
    assert!(copied <= VOLUME / 16, "failback copied {copied} bytes of a {VOLUME}-byte volume: not far less than the volume");
    eprintln!("drill: failback copied {copied} bytes of a {VOLUME}-byte volume (failback set: {bound} bytes)");
    stop_both_and_compare(dir, dc2, dc1);
}
