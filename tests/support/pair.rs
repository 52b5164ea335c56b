//! Two real sites and the WAN between them, for end-to-end tests and the benchmarks: a
//! `geomirror wan-emu` process in front of the secondary, and site configs written into one
//! directory with certificates from `geomirror certs`.
//!
//! Must not: decide what a test expects of the pair; it only starts, stops and compares.

use crate::site::{run_ok, tool, Site};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A `geomirror wan-emu` process.
pub struct WanEmu {
    child: Child,
    /// The UDP port the primary connects to.
    pub port: u16,
    /// The control socket.
    pub control: SocketAddr,
}

impl WanEmu {
    /// Relays to `forward` with the given extra options (`--rtt-ms 10`, `--rate-mbps 200`...).
    pub fn start(bin: &Path, forward: u16, options: &[String]) -> WanEmu {
        let mut child = Command::new(bin)
            .args(["wan-emu", "--listen", "127.0.0.1:0", "--forward", &format!("127.0.0.1:{forward}")])
            .args(["--control", "127.0.0.1:0"])
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start geomirror wan-emu");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let (mut first, mut second) = (String::new(), String::new());
        out.read_line(&mut first).expect("wan-emu's first line");
        out.read_line(&mut second).expect("wan-emu's second line");
        // "wan-emu: udp 127.0.0.1:PORT -> ..." then "wan-emu: control at tcp ADDR (...)"
        let port = first.split_whitespace().nth(2).and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok());
        let control = second.split_whitespace().nth(4).and_then(|a| a.parse().ok());
        WanEmu {
            port: port.unwrap_or_else(|| panic!("no address in {first:?}")),
            control: control.unwrap_or_else(|| panic!("no control in {second:?}")),
            child,
        }
    }

    /// Sends one control command and returns the emulator's one-line reply.
    pub fn command(&self, command: &str) -> String {
        let mut s = std::net::TcpStream::connect(self.control).expect("wan-emu control socket");
        s.write_all(format!("{command}\n").as_bytes()).expect("send a control command");
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).expect("a control reply");
        reply
    }

    /// Cuts or restores the link; returns once the emulator has applied it.
    pub fn set_cut(&self, cut: bool) {
        let reply = self.command(if cut { "cut" } else { "restore" });
        let want = if cut { "ok link=cut" } else { "ok link=up" };
        assert!(reply.starts_with(want), "{reply}");
    }
}

impl Drop for WanEmu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the two sites' configs hold besides names, ports and paths.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// The `[link]` section's body.
    pub link: String,
    /// A `[replication]` section (or nothing).
    pub replication: String,
    /// The volume's size.
    pub size: String,
    /// Options for wan-emu.
    pub wan: Vec<String>,
    /// The `[admin]` section's body.
    pub admin: String,
    /// Settings of the `[nbd]` section besides `listen`.
    pub nbd: String,
    /// The link towards dc2 starts cut (restored by the test): nothing crosses until the
    /// pair is set up, dc2's restart included.
    pub start_cut: bool,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            link: "rtt_ms = 10\nidle_timeout_ms = 3000\n".into(),
            replication: String::new(),
            size: "64M".into(),
            wan: vec!["--rtt-ms".into(), "10".into()],
            admin: "listen = \"127.0.0.1:0\"\n".into(),
            nbd: String::new(),
            start_cut: false,
        }
    }
}

/// Writes `dir/<me>.toml`: site `me`, volume `vol0` on `dir/<me>.img`, NBD on a free
/// port, replication on `listen` (0: a free one), the peer at `peer_address`.
pub fn site_config(dir: &Path, me: &str, peer: &str, role: &str, listen: u16, peer_address: u16, o: &PairOptions) -> PathBuf {
    let PairOptions { link, replication, size, admin, nbd, .. } = o;
    let text = format!(
        r#"[site]
name = "{me}"
state_dir = "{me}-state"
[nbd]
listen = "127.0.0.1:0"
{nbd}
[peer]
name = "{peer}"
address = "127.0.0.1:{peer_address}"
listen = "127.0.0.1:{listen}"
initial_role = "{role}"
[tls]
ca = "certs/ca.pem"
cert = "certs/{me}.pem"
key = "certs/{me}.key"
[admin]
{admin}
[link]
{link}
{replication}
[[volume]]
name = "vol0"
media = "{me}.img"
size = "{size}"
"#
    );
    let path = dir.join(format!("{me}.toml"));
    std::fs::write(&path, text).expect("write a site config");
    path
}

/// The replication port a site bound.
pub fn replication_port(site: &Site) -> u16 {
    site.replication.expect("a site with a peer prints its replication port").port()
}

/// Starts dc2 as secondary on a free port (port 0), then pins that port in its config, so
/// that a restart comes back where the emulator expects it.
pub fn start_secondary(bin: &Path, dir: &Path, o: &PairOptions) -> Site {
    let site = Site::from_config(bin, &site_config(dir, "dc2", "dc1", "secondary", 0, 9, o));
    site_config(dir, "dc2", "dc1", "secondary", replication_port(&site), 9, o);
    site
}

/// Certificates, a secondary (dc2), a WAN emulator in front of it and a primary (dc1), all
/// in `dir`.
pub fn two_sites(bin: &Path, dir: &Path, o: &PairOptions) -> (Site, Site, WanEmu) {
    run_ok(Command::new(bin).args(["certs", "--dir"]).arg(dir.join("certs")).args(["--site", "dc1", "--site", "dc2"]));
    let secondary = start_secondary(bin, dir, o);
    let emu = WanEmu::start(bin, replication_port(&secondary), &o.wan);
    let primary = Site::from_config(bin, &site_config(dir, "dc1", "dc2", "primary", 0, emu.port, o));
    (primary, secondary, emu)
}

/// Two sites that can reach each other both ways, as a failover needs: dc1 (primary) reaches
/// dc2 through one emulator and dc2 reaches dc1 through another. Both sites pin the ports
/// they bound, so restarts come back where the emulators expect them; dc2 is restarted once
/// at set-up to learn dc1's address. Returns (dc1, dc2, towards dc2, towards dc1).
pub fn two_sites_both_ways(bin: &Path, dir: &Path, o: &PairOptions) -> (Site, Site, WanEmu, WanEmu) {
    two_sites_both_ways_prepared(bin, dir, o, |_| {})
}

/// `two_sites_both_ways`, with `prepare` run in `dir` once the certificates exist and before
/// either site first starts (to lay out media, or adopt a volume: `site_config` writes a
/// config to adopt with, which is rewritten with the real ports afterwards).
pub fn two_sites_both_ways_prepared(bin: &Path, dir: &Path, o: &PairOptions, prepare: impl FnOnce(&Path)) -> (Site, Site, WanEmu, WanEmu) {
    run_ok(Command::new(bin).args(["certs", "--dir"]).arg(dir.join("certs")).args(["--site", "dc1", "--site", "dc2", "--admin", "ops"]));
    prepare(dir);
    let mut dc2 = start_secondary(bin, dir, o);
    let to_dc2 = WanEmu::start(bin, replication_port(&dc2), &o.wan);
    if o.start_cut {
        to_dc2.set_cut(true);
    }
    let dc1 = Site::from_config(bin, &site_config(dir, "dc1", "dc2", "primary", 0, to_dc2.port, o));
    site_config(dir, "dc1", "dc2", "primary", replication_port(&dc1), to_dc2.port, o);
    let to_dc1 = WanEmu::start(bin, replication_port(&dc1), &o.wan);
    site_config(dir, "dc2", "dc1", "secondary", replication_port(&dc2), to_dc1.port, o);
    dc2.restart();
    (dc1, dc2, to_dc2, to_dc1)
}

/// Stops `first` (a primary drains to its peer first), then `second`, asserting that both
/// exit cleanly, and that `dc1.img` and `dc2.img` in `dir` are identical. Returns both logs.
pub fn stop_both_and_compare(dir: &Path, mut first: Site, mut second: Site) -> (String, String) {
    let (status, first_log) = first.stop();
    assert!(status.success(), "{first_log}");
    let (status, second_log) = second.stop();
    assert!(status.success(), "{second_log}");
    let out = run_ok(
        tool("qemu-img", "qemu-utils").args(["compare", "-f", "raw", "-F", "raw"]).arg(dir.join("dc1.img")).arg(dir.join("dc2.img")),
    );
    assert!(out.contains("Images are identical"), "{out}");
    (first_log, second_log)
}

/// `two_sites_both_ways` with each site's admin API (on port 0 unless `o` says otherwise)
/// taking the token `token` from `<dir>/token`; notes each admin address in `<dir>/<site>.admin` (see
/// `remember_admin`). Other options come from `o`.
pub fn two_sites_with_admin(bin: &Path, dir: &Path, token: &str, o: PairOptions) -> (Site, Site, WanEmu, WanEmu) {
    two_sites_with_admin_prepared(bin, dir, token, o, |_| {})
}

/// `two_sites_with_admin`, with `prepare` run in `dir` before either site first starts (see
/// `two_sites_both_ways_prepared`).
pub fn two_sites_with_admin_prepared(
    bin: &Path,
    dir: &Path,
    token: &str,
    o: PairOptions,
    prepare: impl FnOnce(&Path),
) -> (Site, Site, WanEmu, WanEmu) {
    crate::site::write_secret(&dir.join("token"), &format!("{token}\n"));
    // The options' [admin] section (port 0 by default), plus the token unless it names one.
    let admin = if o.admin.contains("token_file") { o.admin.clone() } else { format!("{}token_file = \"token\"\n", o.admin) };
    let o = PairOptions { admin, ..o };
    let (dc1, dc2, a, b) = two_sites_both_ways_prepared(bin, dir, &o, prepare);
    remember_admin(dir, "dc1", &dc1);
    remember_admin(dir, "dc2", &dc2);
    (dc1, dc2, a, b)
}

/// Notes where a site's admin API listens (port 0 in its config), in `<dir>/<name>.admin`.
pub fn remember_admin(dir: &Path, name: &str, site: &Site) {
    std::fs::write(dir.join(format!("{name}.admin")), site.admin.expect("the site serves its admin API").to_string()).unwrap();
}
