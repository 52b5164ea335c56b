//! The admin commands against a pair's sites, as an operator runs them: `geomirror <command>
//! --config <site>.toml` with the site's address (noted by `pair::remember_admin`) and the
//! token in `<dir>/token`; status as JSON; waiting for a status to hold; what "clean" means.
//!
//! Must not: decide what a test expects beyond "clean", which every test means the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The sites of a pair in `dir`, reached with the `geomirror` binary `bin`.
#[derive(Clone, Debug)]
pub struct Operator {
    pub bin: PathBuf,
    pub dir: PathBuf,
}

impl Operator {
    pub fn new(bin: &Path, dir: &Path) -> Operator {
        Operator { bin: bin.to_owned(), dir: dir.to_owned() }
    }

    /// `geomirror <command> --config <site>.toml` with the site's address and token, plus `extra`.
    pub fn cli(&self, command: &str, site: &str, extra: &[&str]) -> Output {
        let address = std::fs::read_to_string(self.dir.join(format!("{site}.admin"))).expect("the site's admin address");
        Command::new(&self.bin)
            .arg(command)
            .arg("--config")
            .arg(self.dir.join(format!("{site}.toml")))
            .args(["--address", address.trim()])
            .arg("--token-file")
            .arg(self.dir.join("token"))
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run geomirror")
    }

    pub fn status(&self, site: &str) -> serde_json::Value {
        let out = self.cli("status", site, &["--json"]);
        assert!(out.status.success(), "status of {site}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Polls `site`'s status until `done` holds for its volume, for at most `limit` (a bound
    /// on failure); returns the volume's status.
    pub fn wait_for(&self, limit: Duration, site: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        crate::site::wait_for_volume(limit, &format!("{site} {what}"), || self.status(site), done)["volumes"][0].clone()
    }
}

/// A clean primary: linked, drained, authoritative, no amnesia, no split brain.
pub fn clean_primary(v: &serde_json::Value) -> bool {
    v["role"] == "primary" && v["drained"] == true && linked_and_trusted(v)
}

/// A clean secondary: linked, consistent, authoritative, no amnesia, no split brain.
pub fn clean_secondary(v: &serde_json::Value) -> bool {
    v["role"] == "secondary" && v["consistent"] == true && linked_and_trusted(v)
}

/// What both roles must report to be clean: linked, authoritative, no amnesia, no split brain.
fn linked_and_trusted(v: &serde_json::Value) -> bool {
    v["link_up"] == true && v["authoritative"] == true && v["amnesiac"] == false && v["split_brain"] == false
}
