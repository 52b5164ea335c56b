//! A site's config and the files it names, on a real `geomirror run`: a refused start says
//! which field is wrong and leaves the disk exactly as it was (no state directory, no media,
//! no directory created on the way), and a secret others may read stops the start unless
//! the config allows it.

use geomirror_tests::site::{write_secret, Site};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");

/// A directory holding certificates for dc1 and dc2 (from `geomirror certs`) and an
/// owner-only admin token.
fn deployment() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["certs", "--dir"]).arg(tmp.path().join("certs")).args(["--site", "dc1", "--site", "dc2"]).output();
    assert!(out.unwrap().status.success(), "geomirror certs");
    write_secret(&tmp.path().join("admin.token"), "0123456789abcdef0123456789abcdef\n");
    tmp
}

/// Writes `dir/site.toml`: dc1, primary, its peer on a port nothing listens on, every port
/// of its own picked by the kernel; `[site]` gets `site_extra`, `[tls]` the cert `cert`,
/// and the one volume `volume` (its name and media lines).
fn write_config(dir: &Path, site_extra: &str, cert: &str, volume: &str) -> PathBuf {
    let text = format!(
        r#"[site]
name = "dc1"
state_dir = "state"
{site_extra}
[nbd]
listen = "127.0.0.1:0"
[peer]
name = "dc2"
address = "127.0.0.1:9"
listen = "127.0.0.1:0"
initial_role = "primary"
[tls]
ca = "certs/ca.pem"
cert = "{cert}"
key = "certs/dc1.key"
[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"
[[volume]]
size = "16M"
{volume}
"#
    );
    let path = dir.join("site.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every path under `dir`, to compare before and after.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Runs `geomirror run --config config`, which must refuse to start: it exits with an
/// error before it prints anything (a started site prints its addresses, and the test then
/// fails at once). Returns what it wrote to standard error.
fn refused(config: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start geomirror run");
    let mut stderr = child.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let first = BufReader::new(child.stdout.take().expect("stdout")).lines().next();
    if let Some(line) = first {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the site started instead of refusing: {line:?}\n{}", log.join().unwrap_or_default());
    }
    let status = child.wait().expect("wait");
    let log = log.join().expect("the stderr reader");
    assert!(!status.success(), "the site exited {status} without serving:\n{log}");
    log
}

/// `..` as a volume's name would put its RocksDB store in state_dir's parent. It is refused
/// by name and rule, before anything is created.
#[test]
fn a_volume_named_dot_dot_is_refused_and_nothing_is_written() {
    let tmp = deployment();
    let config = write_config(tmp.path(), "", "certs/dc1.pem", "name = \"..\"\nmedia = \"vol0.img\"");
    let before = tree(tmp.path());
    let log = refused(&config);
    assert!(log.contains("volume[0].name: \"..\" is not allowed: it starts with \".\""), "{log}");
    assert!(log.contains("a name is 1 to 64 characters from A-Z, a-z, 0-9"), "the rule is stated:\n{log}");
    assert_eq!(tree(tmp.path()), before, "a refused start left files behind");
}

/// A certificate path that does not exist, a media directory that does not exist, and media
/// that is a directory: each refused with its field, after creating nothing at all (no
/// state directory, no media file, no directory on the way).
#[test]
fn a_bad_certificate_or_media_path_leaves_nothing_behind() {
    let tmp = deployment();
    let dir = tmp.path();
    let vol0 = "name = \"vol0\"\nmedia = \"vol0.img\"";

    let config = write_config(dir, "", "certs/nonexistent.pem", vol0);
    let before = tree(dir);
    let log = refused(&config);
    assert_eq!(tree(dir), before, "a refused start left files behind:\n{log}");
    assert!(!dir.join("state").exists() && !dir.join("vol0.img").exists());
    assert!(log.contains(&format!("cannot read tls.cert {}", dir.join("certs/nonexistent.pem").display())), "{log}");

    let config = write_config(dir, "", "certs/dc1.pem", "name = \"vol0\"\nmedia = \"nodir/deeper/vol0.img\"");
    let before = tree(dir);
    let log = refused(&config);
    assert_eq!(tree(dir), before, "a refused start left files behind:\n{log}");
    assert!(!dir.join("nodir").exists(), "the media's directory was created");
    let media = dir.join("nodir/deeper/vol0.img");
    let want = format!("volume[0].media {}: the directory {} does not exist", media.display(), dir.join("nodir/deeper").display());
    assert!(log.contains(&want), "{log}");

    std::fs::create_dir(dir.join("adir")).unwrap();
    let config = write_config(dir, "", "certs/dc1.pem", "name = \"vol0\"\nmedia = \"adir\"");
    let before = tree(dir);
    let log = refused(&config);
    assert!(log.contains(&format!("volume[0].media {} is a directory; it must be a regular file", dir.join("adir").display())), "{log}");
    assert_eq!(tree(dir), before, "a refused start left files behind");
}

/// A private key or token file that group or others may read stops the start, saying the
/// mode and the fix; `allow_insecure_key_permissions = true` starts anyway, with a warning
/// in the log.
#[test]
fn secrets_others_can_read_stop_the_start_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = deployment();
    let dir = tmp.path();
    let vol0 = "name = \"vol0\"\nmedia = \"vol0.img\"";
    let key = dir.join("certs/dc1.key");
    let token = dir.join("admin.token");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = write_config(dir, "", "certs/dc1.pem", vol0);
    let before = tree(dir);
    let log = refused(&config);
    let want = format!(
        "tls.key {k} holds a secret but is accessible to its group and all users (mode 0644): run `chmod 600 {k}`",
        k = key.display()
    );
    assert!(log.contains(&want), "{log}");
    assert!(log.contains("allow_insecure_key_permissions = true"), "{log}");
    assert_eq!(tree(dir), before);

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let log = refused(&config);
    assert!(
        log.contains(&format!("admin.token_file {} holds a secret but is accessible to its group (mode 0640)", token.display())),
        "{log}"
    );
    assert_eq!(tree(dir), before);

    write_config(dir, "allow_insecure_key_permissions = true", "certs/dc1.pem", vol0);
    // As a secondary, which stops at once: a primary would wait for its absent peer to drain.
    let text = std::fs::read_to_string(&config).unwrap().replace("initial_role = \"primary\"", "initial_role = \"secondary\"");
    std::fs::write(&config, text).unwrap();
    let mut site = Site::from_config(Path::new(BIN), &config);
    assert!(site.admin.is_some() && site.urls.contains_key("vol0"), "the site serves");
    let (status, log) = site.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("INSECURE") && log.contains("admin.token_file") && log.contains("allow_insecure_key_permissions"), "{log}");
}
