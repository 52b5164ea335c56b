//! A real `geomirror run` process for end-to-end tests: started from a config written into
//! a temporary directory, stopped with SIGTERM, and checked to exit cleanly.
//!
//! Must not: leave a process running after its test (a stop past its limit is a SIGKILL and
//! a reap), or skip a test whose tool is missing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Waits for `child` to exit, for at most `limit`: Ok with its status, or Err once the
/// limit passed, after a SIGKILL (the process is then reaped, so nothing outlives the test).
pub fn wait_within(child: Child, limit: Duration) -> Result<ExitStatus, ExitStatus> {
    output_within(child, limit).map(|o| o.status).map_err(|o| o.status)
}

/// `wait_within`, collecting what the child wrote to its piped stdout and stderr.
pub fn output_within(child: Child, limit: Duration) -> Result<Output, Output> {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output().expect("wait"));
    });
    match rx.recv_timeout(limit) {
        Ok(output) => Ok(output),
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            Err(rx.recv().expect("the waiting thread reports"))
        }
    }
}

/// How long a site may take to print its URLs before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct Site {
    child: Option<Child>,
    /// The directory holding the config (and, by default, the media).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// Volume name to `nbd://host:port/name`.
    pub urls: BTreeMap<String, String>,
    /// host:port of the NBD server.
    pub addr: String,
    /// The replication port the site bound (with a peer).
    pub replication: Option<std::net::SocketAddr>,
    /// The admin API's address (with a peer).
    pub admin: Option<std::net::SocketAddr>,
    stderr: mpsc::Receiver<String>,
    bin: PathBuf,
    config: PathBuf,
}

impl Site {
    /// Writes `config` (the volumes and any `[nbd]` settings; `[site]` is added and
    /// `listen` defaults to a free loopback port) to a new directory and starts the site.
    pub fn start(bin: &Path, config: &str) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut text = String::from("[site]\nname = \"test\"\n");
        if !config.contains("[nbd]") {
            text.push_str("[nbd]\nlisten = \"127.0.0.1:0\"\n");
        }
        text.push_str(config);
        let path = dir.path().join("site.toml");
        std::fs::write(&path, text).expect("write config");
        Site::spawned(bin, &path, Some(dir))
    }

    /// Starts a site from a complete config file that already exists (with its certificates
    /// and media paths); `dir` is the directory `path` resolves against.
    pub fn from_config(bin: &Path, config: &Path) -> Site {
        Site::spawned(bin, config, None)
    }

    /// Starts the site of `config`, whose directory is the site's (and, with `tmp`, is
    /// removed with it).
    fn spawned(bin: &Path, config: &Path, tmp: Option<tempfile::TempDir>) -> Site {
        let mut site = Site {
            child: None,
            dir: config.parent().expect("config in a directory").to_owned(),
            _tmp: tmp,
            urls: BTreeMap::new(),
            addr: String::new(),
            replication: None,
            admin: None,
            stderr: mpsc::channel().1,
            bin: bin.to_owned(),
            config: config.to_owned(),
        };
        site.spawn();
        site
    }

    fn spawn(&mut self) {
        let mut child = Command::new(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start geomirror run");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (etx, erx) = mpsc::channel();
        let mut stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        self.stderr = erx;
        self.child = Some(child);
        let volumes = std::fs::read_to_string(&self.config).unwrap().matches("[[volume]]").count();
        self.urls.clear();
        while self.urls.len() < volumes {
            match rx.recv_timeout(START_DEADLINE) {
                Ok(line) if line.contains("replication at udp ") => {
                    self.replication = line.rsplit(' ').next().and_then(|a| a.parse().ok());
                }
                Ok(line) if line.contains("admin API at https://") => {
                    self.admin = line.rsplit("https://").next().and_then(|a| a.parse().ok());
                }
                Ok(line) => {
                    let url =
                        line.split_whitespace().find(|w| w.starts_with("nbd://")).unwrap_or_else(|| panic!("unexpected line {line:?}"));
                    let name = url.rsplit('/').next().unwrap().to_owned();
                    self.addr = url.trim_start_matches("nbd://").split('/').next().unwrap().to_owned();
                    self.urls.insert(name, url.to_owned());
                }
                Err(_) => {
                    let _ = self.child.as_mut().unwrap().kill();
                    panic!("the site did not start; its log:\n{}", self.stderr.recv_timeout(START_DEADLINE).unwrap_or_default());
                }
            }
        }
    }

    pub fn url(&self, volume: &str) -> &str {
        &self.urls[volume]
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then waits; returns the exit status and the log.
    pub fn stop(&mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let status = child.wait().expect("wait");
        (status, self.stderr.recv_timeout(START_DEADLINE).unwrap_or_default())
    }

    /// `kill -9`: the process gets no chance to finish anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
    }

    /// Starts the process again on the same config, state and media (after `kill`).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// Stops (asserting a clean exit) and starts again on the same config and media. The
    /// port may change when the config asked for port 0.
    pub fn restart(&mut self) {
        let (status, log) = self.stop();
        assert!(status.success(), "site exited with {status}; log:\n{log}");
        self.spawn();
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes a secret (a bearer token) readable by its owner only, as a site requires: it refuses
/// a key or token file that others may read.
pub fn write_secret(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Runs an external tool, failing loudly when it is missing (tests/run installs it).
pub fn tool(name: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    assert!(found, "{name} is not installed: run tests/run, which installs it (apt-get install {package})");
    Command::new(name)
}

/// Runs a command to completion and fails the test, with its output, unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd:?} failed with {}:\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Polls a site's status (`status` runs `geomirror status --json` or the like) until `done`
/// holds for its first volume, for at most `limit` (a bound on failure, not a measurement);
/// returns the whole status. `what` names the awaited state in the failure message.
pub fn wait_for_volume(
    limit: Duration,
    what: &str,
    mut status: impl FnMut() -> serde_json::Value,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    crate::wait::until(limit, what, || {
        let s = status();
        if done(&s["volumes"][0]) {
            Ok(s)
        } else {
            Err(format!("{s:#}"))
        }
    })
}

/// Bytes that compress to nothing like zeros (xorshift), `len` of them from `seed`: data for
/// an image that must cross the link byte for byte.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
