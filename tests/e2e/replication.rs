//! Two real sites, each a `geomirror run` process with its own RocksDB state, mirroring a
//! volume over QUIC with mutual TLS through a real `geomirror wan-emu` process, written to
//! by real NBD clients. After the primary stops (which drains it to the secondary), the
//! two media files must be identical.

use geomirror_core::ExtentId;
use geomirror_node::certs::{Ca, Validity};
use geomirror_node::store::{RocksStore, Store};
use geomirror_tests::pair::{self, replication_port, PairOptions, WanEmu};
use geomirror_tests::qemu::{qemu_io, qemu_io_command};
use geomirror_tests::site::{run_ok, tool, Site};
use geomirror_tests::wait;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");

/// Connects to a replication port as a client that presents no certificate, opens a stream
/// and sends a frame's worth of bytes; returns once the connection has ended.
fn connect_without_certificate(ca: &Path, to: std::net::SocketAddr) {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![geomirror_node::transport::tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = client.connect_with(quinn::ClientConfig::new(std::sync::Arc::new(quic)), to, "dc2").unwrap().await;
        if let Ok(conn) = conn {
            if let Ok(mut s) = conn.open_uni().await {
                let _ = s.write_all(b"GS\x01\x01\x00 this never reaches a volume").await;
                let _ = s.finish();
            }
            let reason = conn.closed().await;
            assert!(reason.to_string().to_lowercase().contains("certificate"), "{reason}");
        }
    });
}

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn with_replication(replication: &str) -> PairOptions {
    PairOptions { replication: replication.to_owned(), ..PairOptions::default() }
}

/// Certificates, a secondary, a WAN emulator (10 ms) in front of it and a primary, in `dir`.
fn two_sites(dir: &Path) -> (Site, Site, WanEmu) {
    two_sites_with(dir, "")
}

/// As `two_sites`, with a `[replication]` section (or none) for both sites.
fn two_sites_with(dir: &Path, replication: &str) -> (Site, Site, WanEmu) {
    pair::two_sites(bin(), dir, &with_replication(replication))
}

fn start_secondary(dir: &Path, replication: &str) -> Site {
    pair::start_secondary(bin(), dir, &with_replication(replication))
}

fn site_config(dir: &Path, me: &str, peer: &str, role: &str, listen: u16, peer_address: u16, replication: &str) -> PathBuf {
    pair::site_config(dir, me, peer, role, listen, peer_address, &with_replication(replication))
}

/// Stops the primary (which drains it), then the secondary, and compares their media.
fn stop_and_compare(dir: &Path, primary: Site, secondary: Site) {
    let (log, _) = pair::stop_both_and_compare(dir, primary, secondary);
    assert!(log.contains("drained"), "the primary stopped without draining:\n{log}");
}

/// Writes `pattern` over `[first, first + count)` MiB, one MiB per write.
fn write_mib(url: &str, first: u64, count: u64, pattern: u8) {
    let cmds: Vec<String> = (first..first + count).map(|m| format!("write -P {pattern:#x} {} 1M", m << 20)).collect();
    qemu_io(url, &cmds);
}

#[test]
fn two_sites_mirror_a_volume_over_mtls_quic_through_wan_emu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (primary, secondary, emu) = two_sites(dir);
    let url = primary.url("vol0").to_owned();

    // A real filesystem image through qemu-img, then fio's verified random writes on top.
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for i in 0..20u64 {
        std::fs::write(tree.join(format!("f{i}")), vec![i as u8; (i as usize + 1) * 70_000]).unwrap();
    }
    let fs = dir.join("fs.img");
    run_ok(tool("mkfs.ext4", "e2fsprogs").args(["-q", "-F", "-d"]).arg(&tree).arg(&fs).arg("64M"));
    run_ok(tool("qemu-img", "qemu-utils").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&fs).arg(&url));
    let out = run_ok(tool("qemu-img", "qemu-utils").args(["compare", "-f", "raw", "-F", "raw"]).arg(&fs).arg(&url));
    assert!(out.contains("Images are identical"), "{out}");
    run_ok(
        tool("fio", "fio")
            .current_dir(dir)
            .args(["--name=verify", "--ioengine=nbd", &format!("--uri={url}"), "--rw=randwrite", "--bs=4k", "--iodepth=32"])
            .args(["--offset=32m", "--size=32m", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]),
    );

    // The secondary serves no host I/O while it is the secondary.
    let read = qemu_io_command(secondary.url("vol0"), &["read 0 4096"]).output().unwrap();
    assert!(!read.status.success(), "a secondary served a read: {}", String::from_utf8_lossy(&read.stdout));

    // Stopping the primary drains it: the secondary has applied every write.
    stop_and_compare(dir, primary, secondary);
    drop(emu);
}

/// `kill -9` of each site in turn between writes: the secondary resumes from its stored
/// apply position, the primary reloads its record copy from the secondary and resends every
/// recorded extent. Nothing acknowledged is lost and the images end equal.
#[test]
fn both_sites_survive_kill_9_and_the_images_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut primary, mut secondary, emu) = two_sites(dir);
    write_mib(primary.url("vol0"), 0, 16, 0x11);
    secondary.kill();
    secondary.start_again();
    // These wait (misses) or go ahead (hits) until the new secondary process is reached.
    write_mib(primary.url("vol0"), 8, 16, 0x22);
    primary.kill();
    primary.start_again();
    write_mib(primary.url("vol0"), 20, 16, 0x33);
    // What the host was acknowledged is there, on the primary, after both restarts.
    let url = primary.url("vol0").to_owned();
    qemu_io(
        &url,
        &[
            format!("read -P 0x11 0 {}", 8 << 20),
            format!("read -P 0x22 {} {}", 8 << 20, 12 << 20),
            format!("read -P 0x33 {} {}", 20 << 20, 16 << 20),
            format!("read -P 0 {} {}", 36 << 20, 28 << 20),
        ],
    );
    stop_and_compare(dir, primary, secondary);
    drop(emu);
}

/// Link loss under `block`: with the link cut, a write that needs the record waits, then
/// fails with an I/O error after the deadline, and never reaches either image. Writes to
/// recorded extents go on. After the link is restored, writes succeed again and the images
/// converge.
#[test]
fn under_block_a_miss_fails_after_the_deadline_while_the_link_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let policy = "[replication]\non_link_loss = \"block\"\nrecord_update_timeout_ms = 300\nlink_loss_deadline_ms = 1500\n";
    let (primary, secondary, emu) = two_sites_with(dir, policy);
    let url = primary.url("vol0").to_owned();
    write_mib(&url, 0, 4, 0x11);
    emu.set_cut(true);
    // A recorded extent (just written): a hit, acknowledged at once although the link is cut.
    qemu_io(&url, &["write -P 0x12 0 64k"]);
    // Far from anything recorded: a miss, held, then failed.
    let out = qemu_io_command(&url, &[format!("write -P 0x66 {} 64k", 60 << 20)]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("write failed"), "the miss did not fail: {text}");
    emu.set_cut(false);
    write_mib(&url, 30, 2, 0x44);
    qemu_io(&url, &[format!("read -P 0 {} 64k", 60 << 20), "read -P 0x12 0 64k".into()]);
    stop_and_compare(dir, primary, secondary);
    drop(emu);
}

/// Link loss under `degrade`: with the link cut, misses go ahead after the record-update
/// timeout, tracked in the primary's durable dirty map. After the link is restored, the
/// resync copies those extents and the images converge.
#[test]
fn under_degrade_writes_go_on_and_the_resync_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A lost link is known after the idle timeout (3 s here); misses wait until then, plus
    // the record-update timeout, and then go ahead.
    let policy = "[replication]\non_link_loss = \"degrade\"\nrecord_update_timeout_ms = 300\nlink_loss_deadline_ms = 10000\n";
    let (primary, secondary, emu) = two_sites_with(dir, policy);
    let url = primary.url("vol0").to_owned();
    write_mib(&url, 0, 4, 0x11);
    emu.set_cut(true);
    write_mib(&url, 40, 6, 0x55);
    emu.set_cut(false);
    write_mib(&url, 50, 2, 0x66);
    qemu_io(&url, &[format!("read -P 0x55 {} {}", 40 << 20, 6 << 20)]);
    stop_and_compare(dir, primary, secondary);
    drop(emu);
}

/// `flush_policy = remote`: a FLUSH returns only once the secondary has durably applied
/// every write before it, so the secondary holds them even if the primary dies right after.
/// With the link cut, the flush cannot be honoured and fails after the deadline, while
/// writes to recorded extents still succeed.
#[test]
fn a_remote_flush_means_the_secondary_has_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let policy = "[replication]\nflush_policy = \"remote\"\nrecord_update_timeout_ms = 300\nlink_loss_deadline_ms = 1500\n";
    let (mut primary, mut secondary, emu) = two_sites_with(dir, policy);
    let url = primary.url("vol0").to_owned();
    // Writethrough (qemu-io's default): each write carries FUA, which under the remote policy
    // also waits for the secondary; the flush then covers everything.
    qemu_io(&url, &[format!("write -P 0x77 {} 2M", 10 << 20), "flush".into()]);
    // The primary dies at once; nothing more is shipped.
    primary.kill();
    let (status, log) = secondary.stop();
    assert!(status.success(), "{log}");
    let image = std::fs::read(dir.join("dc2.img")).unwrap();
    assert!(image[10 << 20..12 << 20].iter().all(|b| *b == 0x77), "the secondary lacks data a remote flush covered");

    // The link cut: a hit is acknowledged locally, the flush after it cannot be.
    secondary.start_again();
    primary.start_again();
    let url = primary.url("vol0").to_owned();
    qemu_io(&url, &[format!("write -P 0x78 {} 64k", 10 << 20)]);
    emu.set_cut(true);
    // qemu-io's default cache mode is writethrough (every write with FUA); writeback keeps
    // the write plain, so that only the flush needs the peer.
    let out =
        qemu_io_command(&url, &[format!("write -P 0x79 {} 64k", 10 << 20), "flush".into()]).args(["-t", "writeback"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("wrote 65536/65536"), "the hit was not acknowledged: {text}");
    assert!(!out.status.success(), "a remote flush succeeded with the link cut: {text}");
    emu.set_cut(false);
    // A primary stops at once while its link is down, so the comparison waits for the link:
    // a remote flush succeeds again once the secondary has applied every write (each try
    // while the link is still down fails after the deadline).
    wait::until(std::time::Duration::from_secs(60), "a remote flush succeeding again after the link came back", || {
        let out = qemu_io_command(&url, &["flush"]).output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    });
    stop_and_compare(dir, primary, secondary);
    drop(emu);
}

/// Certificates from openssl, made with the commands of certs/README.md, work as well as
/// those of `geomirror certs`.
#[test]
fn certificates_made_with_openssl_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let script = r#"
set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=geomirror CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign"
for site in dc1 dc2; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$site" -keyout $site.key -out $site.csr
  printf 'subjectAltName=DNS:%s,URI:geomirror:site:%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' $site $site > $site.ext
  openssl x509 -req -in $site.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -out $site.pem -extfile $site.ext
done
"#;
    run_ok(tool("openssl", "openssl").args(["version"]));
    run_ok(Command::new("bash").arg("-c").arg(script).current_dir(&certs));
    let secondary = start_secondary(dir, "");
    let primary = Site::from_config(Path::new(BIN), &site_config(dir, "dc1", "dc2", "primary", 0, replication_port(&secondary), ""));
    write_mib(primary.url("vol0"), 0, 8, 0x5a);
    stop_and_compare(dir, primary, secondary);
}

/// fio with crc32c verification headers on `[offset, offset+size)` of `url`, one pass of
/// random 16 KiB writes held to `rate_iops` so that the run is long enough to be hit mid-way.
/// With `verify_only` it writes nothing and checks what an earlier run wrote.
fn fio_verified(dir: &Path, url: &str, name: &str, offset_mib: u64, size_mib: u64, rate_iops: u64, verify_only: bool) -> Command {
    let mut cmd = tool("fio", "fio");
    cmd.current_dir(dir)
        .args([&format!("--name={name}"), "--ioengine=nbd", &format!("--uri={url}"), "--rw=randwrite", "--bs=16k", "--iodepth=8"])
        .args([format!("--offset={offset_mib}m"), format!("--size={size_mib}m"), format!("--rate_iops={rate_iops}")])
        .args(["--verify=crc32c", "--verify_fatal=1", "--randrepeat=1", "--verify_state_save=0"]);
    if verify_only {
        cmd.arg("--verify_only");
    } else {
        cmd.arg("--do_verify=0");
    }
    cmd
}

/// Waits until the file's allocated size reaches `bytes`: the host's writes are landing.
fn wait_until_allocated(path: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    wait::until(std::time::Duration::from_secs(60), &format!("{bytes} bytes allocated in {}", path.display()), || {
        let allocated = std::fs::metadata(path).map_or(0, |m| m.blocks() * 512);
        if allocated >= bytes {
            Ok(())
        } else {
            Err(format!("{allocated} bytes allocated"))
        }
    });
}

/// O2 on real processes: every 1 MiB extent where the two media differ is in the secondary's
/// durable record, read from its RocksDB store (the site must be stopped).
fn assert_invariant_r(dir: &Path) {
    let store = RocksStore::open(&dir.join("dc2-state/vol0"), || Err(std::io::Error::other("dc2 has no store to read"))).unwrap();
    let record = store.load().record;
    drop(store);
    let (a, b) = (std::fs::read(dir.join("dc1.img")).unwrap(), std::fs::read(dir.join("dc2.img")).unwrap());
    assert_eq!(a.len(), b.len());
    let differing: Vec<u64> =
        (0..a.len() / MIB).filter(|e| a[e * MIB..(e + 1) * MIB] != b[e * MIB..(e + 1) * MIB]).map(|e| e as u64).collect();
    let uncovered: Vec<&u64> = differing.iter().filter(|e| !record.contains_key(&ExtentId(**e))).collect();
    assert!(uncovered.is_empty(), "extents differ but are not in the secondary's durable record: {uncovered:?} (differing: {differing:?})");
    eprintln!("invariant R: {} extent(s) differ, all in the record of {} extent(s)", differing.len(), record.len());
}

const MIB: usize = 1 << 20;

/// Restarts while a host is writing. `kill -9` of the secondary in the middle of a fio run:
/// the run finishes without an error (misses wait for the secondary to come back) and reads
/// back verified. `kill -9` of the primary in the middle of another run: at that moment every
/// extent where the images differ is in the secondary's durable record; after the restart
/// the first run's data is intact, and once drained the images are identical.
#[test]
fn restarts_mid_run_lose_nothing_and_keep_invariant_r() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let options = PairOptions { size: "128M".into(), ..PairOptions::default() };
    let (mut primary, mut secondary, emu) = pair::two_sites(bin(), dir, &options);
    let url = primary.url("vol0").to_owned();

    // 64 MiB at 1,000 writes of 16 KiB a second: about four seconds of writing.
    let spawn = |cmd: &mut Command| cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let first = spawn(&mut fio_verified(dir, &url, "first", 0, 64, 1000, false));
    wait_until_allocated(&dir.join("dc1.img"), 16 << 20);
    secondary.kill();
    secondary.start_again();
    let out = first.wait_with_output().unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the host's run failed across a secondary restart:\n{output}");
    run_ok(&mut fio_verified(dir, &url, "first", 0, 64, 1000, true));

    let mut second = spawn(&mut fio_verified(dir, &url, "second", 64, 64, 1000, false));
    wait_until_allocated(&dir.join("dc1.img"), 80 << 20);
    primary.kill();
    // The host lost its server; fio's nbd engine does not always notice, so it goes too.
    let _ = second.kill();
    let _ = second.wait();
    let (status, log) = secondary.stop();
    assert!(status.success(), "{log}");
    assert_invariant_r(dir);

    secondary.start_again();
    primary.start_again();
    let url = primary.url("vol0").to_owned();
    run_ok(&mut fio_verified(dir, &url, "first", 0, 64, 1000, true));
    stop_and_compare(dir, primary, secondary);
    drop(emu);
}

/// A primary presenting the wrong certificate (another CA's, another site's, an admin's, an
/// expired one, one not valid yet, a self-signed one made by openssl) is refused by the
/// secondary during the TLS handshake, with the reason logged; nothing it sends is processed,
/// so a write that needs the record fails after the deadline instead of being recorded. A
/// client with no certificate at all is refused too, and counted as such.
#[test]
fn the_secondary_refuses_a_primary_with_the_wrong_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dir.join("certs");
    run_ok(
        Command::new(BIN).args(["certs", "--dir"]).arg(&certs).args(["--site", "dc1", "--site", "dc2", "--site", "dc3", "--admin", "ops"]),
    );
    run_ok(Command::new(BIN).args(["certs", "--dir"]).arg(dir.join("other")).args(["--site", "dc1"]));
    // dc1 certificates from the right CA with the wrong dates, and a self-signed one with
    // dc1's identity, made by openssl.
    let ca =
        Ca::load(&std::fs::read_to_string(certs.join("ca.pem")).unwrap(), &std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let dated = |name: &str, from: i64, to: i64| {
        let issued =
            ca.issue_site("dc1", Validity { not_before: now + time::Duration::days(from), not_after: now + time::Duration::days(to) });
        let issued = issued.unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), issued.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), issued.key_pem).unwrap();
    };
    dated("expired", -30, -1);
    dated("future", 1, 30);
    run_ok(tool("openssl", "openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=dc1",
        "-addext",
        "subjectAltName=DNS:dc1,URI:geomirror:site:dc1",
        "-keyout",
        "self.key",
        "-out",
        "self.pem",
    ]));
    let (good_cert, good_key) = (std::fs::read(certs.join("dc1.pem")).unwrap(), std::fs::read(certs.join("dc1.key")).unwrap());
    let policy = "[replication]\nrecord_update_timeout_ms = 300\nlink_loss_deadline_ms = 1500\n";
    let mut secondary = start_secondary(dir, policy);
    let primary_config = site_config(dir, "dc1", "dc2", "primary", 0, replication_port(&secondary), policy);
    let cases = [
        ("unknown_ca", dir.join("other/dc1.pem"), dir.join("other/dc1.key")),
        ("wrong_identity", certs.join("dc3.pem"), certs.join("dc3.key")),
        ("admin_certificate", certs.join("admin-ops.pem"), certs.join("admin-ops.key")),
        ("expired", dir.join("expired.pem"), dir.join("expired.key")),
        ("not_yet_valid", dir.join("future.pem"), dir.join("future.key")),
        ("self_signed", dir.join("self.pem"), dir.join("self.key")),
    ];
    for (reason, cert, key) in &cases {
        let (c, k) = (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
        std::fs::write(certs.join("dc1.pem"), c).unwrap();
        std::fs::write(certs.join("dc1.key"), k).unwrap();
        let mut primary = Site::from_config(Path::new(BIN), &primary_config);
        let out = qemu_io_command(primary.url("vol0"), &["write -P 0x66 0 64k"]).output().unwrap();
        assert!(!out.status.success(), "{reason}: a write was recorded through a refused link");
        primary.kill();
    }
    // A client with no certificate at all: its connect may look successful, but the
    // secondary ends the handshake before any stream is read.
    connect_without_certificate(&certs.join("ca.pem"), secondary.replication.unwrap());
    let (status, log) = secondary.stop();
    assert!(status.success());
    for reason in cases.iter().map(|c| c.0).chain(["no_certificate"]) {
        assert!(log.contains(&format!("reason=\"{reason}\"")), "the secondary did not log a {reason} refusal:\n{log}");
    }
    assert!(!log.contains("replication session up"), "a refused primary got a session:\n{log}");
    let image = std::fs::read(dir.join("dc2.img")).unwrap();
    assert!(image.iter().all(|b| *b == 0), "the secondary's image changed");
    // With its own certificate back, the primary gets through and replicates.
    std::fs::write(certs.join("dc1.pem"), good_cert).unwrap();
    std::fs::write(certs.join("dc1.key"), good_key).unwrap();
    secondary.start_again();
    let primary = Site::from_config(Path::new(BIN), &primary_config);
    write_mib(primary.url("vol0"), 0, 2, 0x67);
    stop_and_compare(dir, primary, secondary);
}
