//! deploy/ as an operator uses it: the two example site configs, started exactly as their
//! comments describe (certificates from `geomirror certs`, tokens from `openssl rand` as
//! docs/operations.md makes them), with only paths and addresses substituted for one
//! machine; the systemd unit checked by `systemd-analyze verify`; the Kubernetes manifests
//! checked against the API's schemas by `kubernetes-validate`; and the binary itself, built
//! without the core's deliberate bugs.

use geomirror_tests::qemu::qemu_io;
use geomirror_tests::site::{run_ok, tool, Site};
use geomirror_tests::wait;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_geomirror");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `text` with each `(from, to)` replaced; every `from` must occur.
fn substitute(name: &str, text: &str, pairs: &[(&str, String)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in pairs {
        assert!(out.contains(from), "deploy/{name} no longer holds {from:?}: update this test with the example");
        out = out.replace(from, to);
    }
    out
}

fn status(config: &Path) -> serde_json::Value {
    let out = run_ok(Command::new(BIN).args(["status", "--json", "--config"]).arg(config).env("RUST_BACKTRACE", "0"));
    serde_json::from_str(&out).expect("status JSON")
}

/// Polls the primary's status until `done` holds, up to a minute.
fn wait_status(config: &Path, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    wait::until(Duration::from_secs(60), what, || {
        let s = status(config);
        if done(&s) {
            Ok(())
        } else {
            Err(format!("status: {s:#}"))
        }
    });
}

#[test]
fn the_two_example_sites_start_and_mirror_as_deploy_describes() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    // As the comments of deploy/dc1.toml say.
    run_ok(Command::new(BIN).args(["certs", "--dir"]).arg(etc.join("certs")).args(["--site", "dc1", "--site", "dc2", "--admin", "ops"]));
    // As docs/operations.md says: owner-only, or the site refuses them.
    run_ok(tool("openssl", "openssl").arg("version"));
    for token in ["admin.token", "metrics.token"] {
        run_ok(Command::new("sh").arg("-c").arg(format!("(umask 077 && openssl rand -hex 32 > {token})")).current_dir(&etc));
    }
    let (nbd1, nbd2, adm1, adm2, rep1, rep2) = (tcp_port(), tcp_port(), tcp_port(), tcp_port(), udp_port(), udp_port());
    let etc_s = etc.display().to_string();
    let mut configs = Vec::new();
    for (site, nbd, admin) in [("dc1", nbd1, adm1), ("dc2", nbd2, adm2)] {
        let text = std::fs::read_to_string(format!("{DEPLOY}/{site}.toml")).unwrap();
        // /var/lib/geomirror exists before a site starts (the unit's StateDirectory=, the
        // image's `install -d`, the pod's volume): a site creates no parent directories.
        let var = tmp.path().join(format!("{site}-var"));
        std::fs::create_dir(&var).unwrap();
        let var = var.display().to_string();
        let own_ip = if site == "dc1" { "10.1.0.10" } else { "10.2.0.10" };
        let text = substitute(
            &format!("{site}.toml"),
            &text,
            &[
                ("/etc/geomirror", etc_s.clone()),
                ("/var/lib/geomirror", var),
                (&format!("{own_ip}:10809"), format!("127.0.0.1:{nbd}")),
                ("10.1.0.10:7401", format!("127.0.0.1:{rep1}")),
                ("10.2.0.10:7401", format!("127.0.0.1:{rep2}")),
                ("127.0.0.1:7300", format!("127.0.0.1:{admin}")),
            ],
        );
        assert!(
            !text.lines().any(|l| !l.starts_with('#') && l.contains("10.")),
            "deploy/{site}.toml: an address left unsubstituted:\n{text}"
        );
        let path = etc.join(format!("{site}.toml"));
        std::fs::write(&path, text).unwrap();
        configs.push(path);
    }

    // The secondary first, then the primary; both from their config files alone.
    let mut dc2 = Site::from_config(Path::new(BIN), &configs[1]);
    let mut dc1 = Site::from_config(Path::new(BIN), &configs[0]);
    let up = |s: &serde_json::Value| s["volumes"][0]["link_up"] == true;
    wait_status(&configs[0], "dc1's link up", up);
    let s = status(&configs[0]);
    assert_eq!((s["site"].as_str(), s["volumes"][0]["role"].as_str()), (Some("dc1"), Some("primary")), "{s:#}");
    assert_eq!(status(&configs[1])["volumes"][0]["role"], "secondary");

    qemu_io(format!("nbd://127.0.0.1:{nbd1}/db0"), &["write -P 0x5a 0 4M", "write -P 0xa5 40G 1M"]);
    wait_status(&configs[0], "dc1 drained", |s| s["volumes"][0]["lag_bytes"] == 0 && s["volumes"][0]["applied"].as_u64() > Some(0));
    let (st1, log1) = dc1.stop();
    assert!(st1.success(), "{log1}");
    let (st2, log2) = dc2.stop();
    assert!(st2.success(), "{log2}");
    let images: Vec<String> = ["dc1", "dc2"].iter().map(|s| tmp.path().join(format!("{s}-var/db0.img")).display().to_string()).collect();
    let out = run_ok(tool("qemu-img", "qemu-utils").args(["compare", "-f", "raw", "-F", "raw", &images[0], &images[1]]));
    assert!(out.contains("identical"), "{out}");

    // The systemd unit, for an instance, with the binary and config where this test has them.
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/geomirror@.service")).unwrap();
    let unit = substitute("systemd/geomirror@.service", &unit, &[("/usr/local/bin/geomirror", BIN.to_owned()), ("/etc/geomirror", etc_s)]);
    let units = tmp.path().join("units");
    std::fs::create_dir(&units).unwrap();
    std::fs::write(units.join("geomirror@dc1.service"), unit).unwrap();
    let out = tool("systemd-analyze", "systemd").arg("verify").arg(units.join("geomirror@dc1.service")).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !said.contains("geomirror@"), "systemd-analyze verify:\n{said}");

    // The Kubernetes manifests, against the API's schemas.
    let out = tool("kubernetes-validate", "pip: kubernetes-validate")
        .arg("--strict")
        .args([format!("{DEPLOY}/k8s/dc1.yaml"), format!("{DEPLOY}/k8s/dc2.yaml")])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !said.contains("ERROR") && said.matches("passed").count() == 10, "kubernetes-validate:\n{said}");
}

/// The binary these tests run (and a deployment installs) has none of the core's deliberate
/// bugs: the `mutations` feature is enabled only by tests/mutations, outside the workspace,
/// so no feature unification can compile it into `geomirror`. A build that has it says so in
/// its version.
#[test]
fn the_binary_under_test_has_no_deliberate_bugs_compiled_in() {
    let out = run_ok(Command::new(BIN).arg("--version"));
    assert_eq!(out, format!("geomirror {}\n", env!("CARGO_PKG_VERSION")), "the binary under test was built with the mutations feature");
}
