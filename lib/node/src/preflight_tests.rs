//! The checks a site runs before it creates anything, on real files in a temporary directory.

use super::*;
use crate::certs::{write_deployment, Validity};
use std::os::unix::fs::PermissionsExt;

/// A site config in `dir` (paths resolve against it) with a peer, its certificates and a
/// token, plus `extra` lines at the end of `[site]`.
pub(crate) fn config(dir: &Path, extra: &str, volume: &str) -> SiteConfig {
    let text = format!(
        r#"
        [site]
        name = "dc1"
        state_dir = "state"
        {extra}
        [peer]
        name = "dc2"
        address = "127.0.0.1:7401"
        listen = "127.0.0.1:7400"
        initial_role = "primary"
        [tls]
        ca = "certs/ca.pem"
        cert = "certs/dc1.pem"
        key = "certs/dc1.key"
        [admin]
        token_file = "admin.token"
        [[volume]]
        name = "vol0"
        size = "16M"
        {volume}
        "#
    );
    SiteConfig::parse(&text, &dir.join("site.toml"), dir).unwrap()
}

/// A directory with certificates for dc1 and dc2 and a good token, both owner-only.
pub(crate) fn deployment() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    write_deployment(&tmp.path().join("certs"), "t", &["dc1".into(), "dc2".into()], &[], Validity::days_from_now(30), false).unwrap();
    write_secret(&tmp.path().join("admin.token"), "0123456789abcdef0123\n", 0o600);
    tmp
}

fn write_secret(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn err(cfg: &SiteConfig) -> String {
    match check(cfg) {
        Ok(_) => panic!("the checks passed"),
        Err(e) => e.to_string(),
    }
}

/// Everything under `dir`, to show that a refusal created nothing.
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

#[test]
fn a_good_site_passes_and_its_token_is_read() {
    let tmp = deployment();
    let c = check(&config(tmp.path(), "", "media = \"vol0.img\"")).unwrap();
    assert!(c.tls.is_some());
    assert_eq!(c.token.as_deref(), Some("0123456789abcdef0123"));
    assert_eq!(c.metrics_token, None);
}

#[test]
fn media_needs_its_directory_and_must_be_a_file() {
    let tmp = deployment();
    let before = tree(tmp.path());
    let e = err(&config(tmp.path(), "", "media = \"/nonexistent/dir/x.img\""));
    assert!(e.starts_with("volume[0].media /nonexistent/dir/x.img: the directory /nonexistent/dir does not exist"), "{e}");
    assert!(e.contains("mkdir -p /nonexistent/dir"), "{e}");
    assert_eq!(tree(tmp.path()), before, "a refusal creates nothing");
    assert!(!Path::new("/nonexistent").exists());

    std::fs::create_dir(tmp.path().join("adir")).unwrap();
    let e = err(&config(tmp.path(), "", "media = \"adir\""));
    assert!(e.contains("volume[0].media") && e.contains("is a directory; it must be a regular file"), "{e}");

    std::os::unix::fs::symlink(tmp.path().join("elsewhere/x.img"), tmp.path().join("link.img")).unwrap();
    let e = err(&config(tmp.path(), "", "media = \"link.img\""));
    assert!(e.contains("a symbolic link to nothing"), "{e}");

    std::fs::write(tmp.path().join("file"), "").unwrap();
    let e = err(&config(tmp.path(), "", "media = \"file/x.img\""));
    assert!(e.contains("the directory of volume[0].media") && e.contains("is a regular file, not a directory"), "{e}");
}

#[test]
fn the_state_directory_is_a_directory_or_can_be_made() {
    let tmp = deployment();
    let media = "media = \"vol0.img\"";
    let mut deep = config(tmp.path(), "", media);
    deep.peer.as_mut().unwrap().state_dir = tmp.path().join("no/such/state");
    let e = err(&deep);
    assert!(e.starts_with("site.state_dir") && e.contains("the directory") && e.contains("no/such does not exist"), "{e}");
    std::fs::write(tmp.path().join("state"), "").unwrap();
    let e = err(&config(tmp.path(), "", media));
    assert!(e.contains("site.state_dir") && e.contains("is a regular file, not a directory"), "{e}");
    std::fs::remove_file(tmp.path().join("state")).unwrap();
    std::fs::create_dir_all(tmp.path().join("state")).unwrap();
    std::fs::write(tmp.path().join("state/vol0"), "").unwrap();
    let e = err(&config(tmp.path(), "", media));
    assert!(e.contains("the store of volume vol0") && e.contains("not a directory"), "{e}");
}

#[test]
fn certificates_must_be_readable_parseable_and_match() {
    let tmp = deployment();
    let media = "media = \"vol0.img\"";
    std::fs::rename(tmp.path().join("certs/dc1.pem"), tmp.path().join("certs/moved.pem")).unwrap();
    let e = check(&config(tmp.path(), "", media)).err().unwrap();
    assert!(matches!(&e, PreflightError::Read { field: "tls.cert", .. }), "{e}");
    std::fs::write(tmp.path().join("certs/dc1.pem"), "not a certificate").unwrap();
    assert!(err(&config(tmp.path(), "", media)).starts_with("tls.cert: "), "a file without a certificate names the field");
    // dc2's certificate with dc1's key.
    std::fs::copy(tmp.path().join("certs/dc2.pem"), tmp.path().join("certs/dc1.pem")).unwrap();
    let e = err(&config(tmp.path(), "", media));
    assert!(e.contains("is not the private key of tls.cert"), "{e}");
    std::fs::rename(tmp.path().join("certs/moved.pem"), tmp.path().join("certs/dc1.pem")).unwrap();
    std::fs::remove_file(tmp.path().join("certs/dc1.key")).unwrap();
    let e = err(&config(tmp.path(), "", media));
    assert!(e.starts_with("cannot read tls.key "), "{e}");
}

#[test]
fn secrets_others_can_read_are_refused_unless_allowed() {
    let tmp = deployment();
    let media = "media = \"vol0.img\"";
    let key = tmp.path().join("certs/dc1.key");
    for mode in [0o644, 0o640, 0o604, 0o660, 0o620] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = err(&config(tmp.path(), "", media));
        let want = format!("tls.key {} holds a secret but is accessible to", key.display());
        assert!(e.starts_with(&want), "{mode:o}: {e}");
        assert!(e.contains(&format!("(mode {mode:04o})")) && e.contains(&format!("chmod 600 {}", key.display())), "{e}");
        assert!(e.contains("allow_insecure_key_permissions = true"), "{e}");
    }
    check(&config(tmp.path(), "allow_insecure_key_permissions = true", media)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();

    let token = tmp.path().join("admin.token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = err(&config(tmp.path(), "", media));
    assert!(e.starts_with("admin.token_file ") && e.contains("accessible to its group and all users (mode 0644)"), "{e}");
    check(&config(tmp.path(), "allow_insecure_key_permissions = true", media)).unwrap();
    write_secret(&token, " short \n", 0o600);
    let e = err(&config(tmp.path(), "", media));
    assert!(e.contains("holds a token of 5 characters; use at least 16"), "{e}");
}

#[test]
fn group_read_is_allowed_only_where_root_shares_a_file_with_our_group() {
    let me = Process { euid: 999, groups: vec![999, 50] };
    let root = Process { euid: 0, groups: vec![0] };
    assert_eq!(exposure(0o600, 999, 999, &me), None);
    assert_eq!(exposure(0o400, 0, 0, &root), None);
    // Kubernetes' Secret under fsGroup: root, the pod's group, 0440.
    assert_eq!(exposure(0o440, 0, 999, &me), None);
    assert_eq!(exposure(0o640, 0, 50, &me), None, "Debian's ssl-cert way");
    assert_eq!(exposure(0o640, 0, 7, &me), Some("its group"), "a group this process is not in");
    assert_eq!(exposure(0o640, 999, 999, &me), Some("its group"), "our own file needs no group");
    assert_eq!(exposure(0o640, 0, 0, &root), Some("its group"), "root reads as owner");
    assert_eq!(exposure(0o660, 0, 999, &me), Some("its group"), "the group may not write it");
    assert_eq!(exposure(0o444, 0, 999, &me), Some("its group and all users"));
    assert_eq!(exposure(0o604, 999, 999, &me), Some("all users"));
}

/// `cfg` with every listener on a free port of its own (port 0), as a site that starts.
pub(crate) fn on_free_ports(mut cfg: SiteConfig) -> SiteConfig {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    cfg.nbd.listen = any;
    cfg.admin.as_mut().unwrap().listen = any;
    cfg.peer.as_mut().unwrap().listen = any;
    cfg
}

/// Starts a site that must be refused; returns the refusal, and checks that the start
/// created nothing in `dir`.
async fn refused_start(dir: &Path, cfg: SiteConfig) -> String {
    let before = tree(dir);
    let e = match crate::site::RunningSite::start(cfg).await {
        Ok(_) => panic!("the site started"),
        Err(e) => format!("{e:#}"),
    };
    assert_eq!(tree(dir), before, "a refused start creates nothing: {e}");
    e
}

#[tokio::test]
async fn media_of_another_size_is_refused_before_anything_is_created() {
    let tmp = deployment();
    let media = "media = \"vol0.img\"";
    std::fs::write(tmp.path().join("vol0.img"), vec![0u8; 1 << 20]).unwrap();
    let e = err(&config(tmp.path(), "", media));
    assert!(e.starts_with("volume[0].media ") && e.contains("is 1048576 bytes but volume[0].size is 16777216 bytes"), "{e}");
    let e = refused_start(tmp.path(), on_free_ports(config(tmp.path(), "", media))).await;
    assert!(e.contains("volume[0].size"), "{e}");
    // An empty file is sized at the start; one of the volume's size is taken as it is.
    for len in [0, 16 << 20] {
        std::fs::File::options().write(true).open(tmp.path().join("vol0.img")).unwrap().set_len(len).unwrap();
        check(&config(tmp.path(), "", media)).unwrap();
    }
}

#[tokio::test]
async fn listeners_on_one_address_are_refused_before_anything_is_created() {
    let tmp = deployment();
    let media = "media = \"vol0.img\"";
    let with = |nbd: &str, admin: &str, peer: &str| {
        let mut c = on_free_ports(config(tmp.path(), "", media));
        c.nbd.listen = nbd.parse().unwrap();
        c.admin.as_mut().unwrap().listen = admin.parse().unwrap();
        c.peer.as_mut().unwrap().listen = peer.parse().unwrap();
        c
    };
    let e = err(&with("127.0.0.1:7399", "127.0.0.1:7399", "127.0.0.1:0"));
    assert_eq!(e, "nbd.listen and admin.listen are both 127.0.0.1:7399: two listeners cannot share an address; give each its own port");
    let e = err(&with("0.0.0.0:7399", "127.0.0.1:7399", "127.0.0.1:0"));
    assert!(e.starts_with("nbd.listen and admin.listen"), "every address of a port includes the loopback one: {e}");
    let e = refused_start(tmp.path(), with("127.0.0.1:7399", "127.0.0.1:7399", "127.0.0.1:0")).await;
    assert!(e.starts_with("nbd.listen and admin.listen"), "{e}");
    // Any free port twice, two addresses of one port, and the replication port (UDP) with
    // the number of a TCP one are all fine.
    check(&with("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0")).unwrap();
    check(&with("127.0.0.1:7399", "127.0.0.2:7399", "127.0.0.1:7399")).unwrap();
}

#[tokio::test]
async fn listen_addresses_in_use_are_refused_before_anything_is_created() {
    let tmp = deployment();
    let media = "media = \"vol0.img\"";
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = on_free_ports(config(tmp.path(), "", media));
    c.nbd.listen = taken.local_addr().unwrap();
    let e = refused_start(tmp.path(), c).await;
    assert!(e.starts_with(&format!("cannot listen for NBD clients on {} (nbd.listen)", taken.local_addr().unwrap())), "{e}");
    let mut c = on_free_ports(config(tmp.path(), "", media));
    c.admin.as_mut().unwrap().listen = taken.local_addr().unwrap();
    let e = refused_start(tmp.path(), c).await;
    assert!(e.starts_with("cannot listen for the admin API on ") && e.contains("(admin.listen)"), "{e}");
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = on_free_ports(config(tmp.path(), "", media));
    c.peer.as_mut().unwrap().listen = taken.local_addr().unwrap();
    let e = refused_start(tmp.path(), c).await;
    assert!(e.starts_with("cannot listen for the peer on ") && e.contains("(peer.listen)"), "{e}");
}
